"""Smoke tests so the benchmark harness, the check CLI and the GPU report script cannot rot.

Tiny shapes only; timings are never asserted.
"""
import glob
import inspect
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

import mhpo_kernels as mk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)  # the check CLI decides for itself
    return env


@pytest.fixture(autouse=True)
def nan_poison():
    """The suite-wide NaN poisoning of torch.empty is for kernels, not for the harness: off here."""
    yield


def test_bench_utils_quantiles_and_memory():
    from mhpo_kernels.tools import bench_utils as bu

    assert bu.quantiles([3.0, 1.0, 2.0]) == [1.4, 2.0, 2.6]
    x = bu.make_policy_inputs(8, 33, torch.bfloat16, "cpu")
    assert x["logits"].shape == (8, 33) and x["logits"].requires_grad
    assert torch.count_nonzero(x["logits"]) > 0
    big = 64 << 20
    peak = bu.peak_extra_bytes(lambda: torch.ones(big, dtype=torch.uint8), "cpu")
    if bu.cpu_peak_method() == "vmhwm":
        assert peak >= big * 0.9
    info = bu.env_info("cpu")
    assert {"device_name", "torch", "triton", "mhpo_kernels", "commit"} <= set(info)


def test_peak_memory_sees_reused_heap_pages():
    """A call whose allocation reuses free pages the C heap still holds (left by earlier work in the
    process) must still be measured: glibc's malloc_trim hands them back first. Forced here by raising
    the mmap threshold so large blocks come from the heap, in a process of its own."""
    code = ("import ctypes, torch\n"
            "from mhpo_kernels.tools import bench_utils as bu\n"
            "if bu.cpu_peak_method() != 'vmhwm':\n    print(-1); raise SystemExit\n"
            "ctypes.CDLL('libc.so.6').mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD\n"
            "xs = [torch.ones(70 << 20, dtype=torch.uint8) for _ in range(2)]\n"
            "del xs\n"
            "print(bu.peak_extra_bytes(lambda: torch.ones(64 << 20, dtype=torch.uint8), 'cpu'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.split()[-1])
    if peak == -1:
        pytest.skip("no resettable resident-set peak (/proc/self/clear_refs) here")
    assert peak >= 0.9 * (64 << 20), peak


@pytest.mark.slow
def test_harness_tiny_shape(tmp_path):
    """bench_mhpo_loss through the shared harness: rows, CSV/JSON, summary, plots."""
    sys.path.insert(0, BENCH)
    try:
        import bench_mhpo_loss
        import harness
        import plots
    finally:
        sys.path.remove(BENCH)
    rows = harness.run(bench_mhpo_loss, ["--device", "cpu", "--N", "16", "--V", "64", "256", "--repeats", "2",
                                         "--peers", "liger", "cce", "--no-subprocess", "--out", str(tmp_path)])
    measured = [r for r in rows if r["ms_p50"] is not None]
    assert {r["mode"] for r in measured} == {"fwd", "bwd", "fwd+bwd"}
    assert any(r["variant"] == "torch" for r in measured)
    for r in measured:
        assert r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
        assert r["peak_bytes"] is not None and r["gbs"] > 0 and r["copy_gbs"] > 0
        assert r["bytes_floor"] == {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[r["mode"]] * r["N"] * r["V"] * 2
        assert r["commit"] and r["torch"] == torch.__version__
    eager = [r for r in measured if r["variant"] == "torch"]
    assert all(abs(r["speedup_eager"] - 1.0) < 1e-9 for r in eager)
    # Liger's Triton GRPO loss cannot run on CPU: reported as skipped, not as an error
    assert any(r["variant"] == "liger-grpo" and r["status"].startswith("skipped") for r in rows) or \
        torch.cuda.is_available()
    assert (tmp_path / "mhpo_loss.csv").exists()
    assert len(json.loads((tmp_path / "mhpo_loss.json").read_text())) == len(rows)
    summary = harness.summary(rows)
    assert "fwd+bwd" in summary and "vs eager" in summary
    pytest.importorskip("matplotlib")
    pngs = plots.plot_rows(rows, str(tmp_path))
    assert any(p.endswith("vs-V.png") for p in pngs)


@pytest.mark.slow
def test_check_cli_quick():
    proc = subprocess.run([sys.executable, "-m", "mhpo_kernels", "check", "--quick", "--interpret", "off"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "err grad" in proc.stdout and "OK:" in proc.stdout


GOAL_LINE = re.compile(r"^goal: \[#1[123]\] .+  measured: .+  (PASS|FAIL|DRY|NOT MEASURED|NOT IMPLEMENTED)$")
# what one device call brings back: at most 8 files, names of letters, digits, '.', '_', '-'
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _gpu_report(out_dir, *args, extra_env=None, timeout=600):
    env = _env()
    env["PYTHON"] = sys.executable
    # the suite's own expectation (CI sets triton,cpu: Triton under the interpreter here) is not the
    # script's: its dry mode checks the backends it runs, its default
    env.pop("MHPO_EXPECT_BACKENDS", None)
    env.update(extra_env or {})
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_report.sh"), *args, str(out_dir)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr


def _check_out_dir(out_dir):
    files = sorted(p.name for p in out_dir.iterdir())
    assert len(files) <= 8 and all(OUT_NAME.match(f) for f in files), files
    assert all((out_dir / f).is_file() for f in files), files
    return files


@pytest.mark.slow
def test_gpu_report_dry_run(tmp_path):
    proc, out = _gpu_report(tmp_path, "--dry-run")
    assert proc.returncode == 0, out
    assert out.rstrip().splitlines()[-1].startswith("DRY RUN")  # the summary comes last
    files = _check_out_dir(tmp_path)
    assert {"summary.txt", "goals.txt", "profile.txt", "pytest.txt", "dry-run.md", "dry-run.csv",
            "logs.tar.gz"} <= set(files), files
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.strip() in out  # printed at the end, word for word
    lines = summary.splitlines()
    # a missing backend is checked before anything runs
    assert any(ln.startswith("[backends] backends on cpu: expected cpu,") and ln.endswith(": OK") for ln in lines)
    assert any(ln.startswith("[link] _C_cpu") for ln in lines)
    # the issues' GPU targets, one verdict per line
    goals = [ln for ln in lines if ln.startswith("goal: ")]
    assert goals and all(GOAL_LINE.match(g) for g in goals), "\n".join(g for g in goals if not GOAL_LINE.match(g))
    for tag in ("[#11] mhpo_loss fwd+bwd bf16 N=1024 V=151936 <= 0.70 ms",
                "[#11] mhpo_loss fwd+bwd bf16 N=4096 V=151936 <= 1.50 ms",
                "[#11] mhpo_loss fwd+bwd bf16 N=16384 V=151936 <= 5.00 ms",
                "[#11] not slower than Liger triton_grpo_loss, N=8192",
                "[#12] mhpo_loss fwd+bwd bf16 N=16384 V=151936 <= 3.70 ms",
                "[#12] mhpo_loss fwd+bwd bf16 N=4096 V=151936 <= 1.00 ms",
                "[#13] fused_linear_mhpo_loss fwd+bwd bf16 N=16384 H=4096 V=151936 <= 85 ms",
                "[#13] fused_linear_mhpo_loss N=16384 H=4096 V=151936 peak extra <= 1.6 GB",
                "[#13] fused_linear peak extra <= unfused",
                "[#11] work ops per mhpo_loss fwd+bwd (cpu backend"):
        assert any(g.startswith("goal: " + tag) for g in goals), tag
    # a dry run never passes or fails a GPU target: it measures tiny CPU shapes
    assert not any(g.startswith("goal: [#1") and "V=151936" in g and g.endswith(("PASS", "FAIL")) for g in goals)
    if "entropy_coeff" not in inspect.signature(mk.mhpo_loss).parameters:
        assert all(g.endswith("NOT IMPLEMENTED") and "not implemented yet" in g for g in goals if "[#12]" in g)
    assert any(ln.startswith("[tests] ") and "1 passed" in ln for ln in lines)
    assert "[tests] failed: none" in lines
    assert lines[-1].startswith("RESULT: every step passed")
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        members = {m.name[2:] if m.name.startswith("./") else m.name: m for m in tar.getmembers()}
        assert {"env.txt", "junit.xml", "goals.json", "profile.json", "report/dry-run.md", "bench.txt"} <= \
            set(members), sorted(members)
        goals_json = json.loads(tar.extractfile(members["goals.json"]).read())
    assert goals_json["dry"] and goals_json["goals"] and set(goals_json["goals"]) <= set(goals)


FAKE_TESTS = """
import os
def test_ok():
    pass
def test_bad():
    assert 1 == 2
def test_crash():
    os.abort()
"""


@pytest.mark.slow
def test_gpu_report_lists_failing_and_crashing_tests(tmp_path):
    """A crashing test costs one test (with pytest-xdist) or ends the run (without), and either way the
    summary names the failing and the crashed test ids; the step fails the script."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_fake.py").write_text(FAKE_TESTS)
    out_dir = tmp_path / "out"
    proc, out = _gpu_report(out_dir, "--dry-run", "--steps", "tests", timeout=180,
                            extra_env={"MHPO_PYTEST_ARGS": str(tmp_path / "t" / "test_fake.py"),
                                       "MHPO_PYTEST_WORKERS": "2"})
    assert proc.returncode == 1, out
    _check_out_dir(out_dir)
    summary = (out_dir / "summary.txt").read_text()
    assert "test_fake.py::test_bad" in summary and "test_fake.py::test_crash" in summary, summary
    assert "test_fake.py::test_ok" not in summary
    assert "RESULT: FAILED steps: tests" in summary
    assert "test_fake.py::test_ok PASSED" in (out_dir / "pytest.txt").read_text()


XDIST_LOG = """\
[gw0] [ 25%] PASSED tests/test_a.py::test_ok Fatal Python error: Aborted
tests/test_a.py::test_bad
[gw1] node down: Not properly terminated
[gw1] [ 50%] FAILED tests/test_a.py::test_crash

replacing crashed worker gw1
[gw0] [ 75%] FAILED tests/test_a.py::test_bad
[gw2] [100%] PASSED tests/test_b.py::test_grid[bf16-V1-N1-triton]
=================================== FAILURES ===================================
worker 'gw1' crashed while running 'tests/test_a.py::test_crash'
=========================== short test summary info ============================
FAILED tests/test_a.py::test_crash - worker 'gw1' crashed while running 'tests/te...
FAILED tests/test_a.py::test_bad - assert 1 == 2
========================= 2 failed, 2 passed in 8.58s ==========================
"""


def test_gpu_report_tools(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import gpu_report_tools as T
    finally:
        sys.path.remove(BENCH)
    log = T.parse_log(XDIST_LOG)
    assert log["failed"] == ["tests/test_a.py::test_crash", "tests/test_a.py::test_bad"]
    assert log["crashed"] == ["tests/test_a.py::test_crash"] and log["final"] == "2 failed, 2 passed"
    assert log["counts"]["passed"] == 2 and log["unfinished"] == []
    cut = T.parse_log("tests/test_a.py::test_ok PASSED [ 50%]\ntests/test_a.py::test_hang ")
    assert cut["unfinished"] == ["tests/test_a.py::test_hang"] and cut["final"] is None
    (tmp_path / "log.txt").write_text(XDIST_LOG)
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_c.TestK" name="test_e[x]" file="tests/test_c.py">'
        '<error message="boom"/></testcase><testcase classname="tests.test_c" name="test_p" file="tests/test_c.py"/>'
        '</testsuite></testsuites>')
    n, lines = T.test_summary(str(tmp_path / "log.txt"), str(tmp_path / "j.xml"))
    assert n == 3 and "  tests/test_c.py::TestK::test_e[x]" in lines and "  tests/test_a.py::test_bad" in lines
    # each backend on the device it runs on (tests/util.py::device_for)
    assert T.parse_expect("triton,cuda,cpu", gpu=True) == {"cuda": ["triton", "cuda"], "cpu": ["cpu"]}
    assert T.parse_expect("triton,cpu", gpu=False) == {"cpu": ["triton", "cpu"]}
    with pytest.raises(ValueError, match="unknown backend 'cuda:triton'"):
        T.parse_expect("cuda:triton", gpu=True)
    ok, msgs = T.check_backends("torch,cpu" if "cpu" in mk.available_backends("cpu") else "torch")
    assert ok, msgs
    ok, msgs = T.check_backends("cuda") if not torch.cuda.is_available() else (False, ["NO CUDA DEVICE"])
    assert not ok and "NO CUDA DEVICE" in msgs[0]
    # the C++ runtime check reads DT_NEEDED itself
    so = glob.glob(os.path.join(ROOT, "mhpo_kernels", "_C_cpu*.so"))
    if so:
        assert "libstdc++.so.6" in T.elf_needed(so[0])
    (tmp_path / "not.so").write_bytes(b"nope")
    ok, msgs = T.check_link([str(tmp_path / "not.so")])
    assert not ok and "cannot read" in msgs[0]
