"""Smoke tests so the benchmark harness, the check CLI and the GPU report script cannot rot.

Tiny shapes only; timings are never asserted.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

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
    from mhpo_kernels import _bench_utils as bu

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


def test_check_cli_quick():
    proc = subprocess.run([sys.executable, "-m", "mhpo_kernels", "check", "--quick", "--interpret", "off"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "err grad" in proc.stdout and "OK:" in proc.stdout


def test_gpu_report_dry_run(tmp_path):
    env = _env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_report.sh"), "--dry-run", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "DRY RUN" in out and "SKIPPED" in out
    assert (tmp_path / "summary.txt").exists() and (tmp_path / "dry-run.md").exists()
    assert out.rstrip().splitlines()[-1].startswith("DRY RUN")  # the summary comes last
