"""The demo: ``python -m mhpo_kernels demo --smoke`` end to end, and its device-specific
branches (the CUDA memory probe runs here on CPU tensors with faked ``torch.cuda`` counters)."""
import ctypes
import importlib.util
import json

import pytest
import torch

import mhpo_kernels as mk
from mhpo_kernels import fused_linear
from mhpo_kernels.tools import bench_utils as _bench_utils
from mhpo_kernels.tools import demo


@pytest.mark.slow
def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    assert demo.main(["--smoke", "--quiet", "--out", str(out)]) == 0
    log = json.loads((out / "demo_log.json").read_text())
    assert set(log["runs"]) == {"mhpo", "clip"}
    for name, rows in log["runs"].items():
        assert len(rows) == log["args"]["steps"]
        for key in ("reward", "loss", "grad_norm", "kl_old", "tokens_per_s"):
            assert all(isinstance(r[key], (float, int)) for r in rows), (name, key)
    assert all(r["survival_mean"] is not None for r in log["runs"]["mhpo"])
    mem = log["loss_memory"]
    if demo.memory_probe("cpu") is not None:  # measured where the high-water mark can be reset
        assert 0 < mem["fused_bytes_measured"] < mem["eager_bytes_measured"]
    else:
        assert mem is None
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "demo_curves.png").stat().st_size > 0


def _fake_cuda_counters(monkeypatch, base, peaks):
    """torch.cuda's memory counters as PeakMemory("cuda") reads them, without a GPU."""
    calls = []
    peaks = iter(peaks)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: base)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: next(peaks))
    return calls


def _no_libc(*a, **k):
    raise OSError("libc must not be needed on this path")


def test_memory_probe_cuda_branch(monkeypatch):
    """The CUDA branch of the demo's memory probe (it crashed on the H100: release() was called
    with an argument the CUDA no-op does not take), driven with CPU tensors."""
    calls = _fake_cuda_counters(monkeypatch, base=10_000, peaks=[10_000 + 300, 10_000 + 700])
    monkeypatch.setattr(ctypes, "CDLL", _no_libc)  # the CUDA probe never touches glibc
    head = torch.nn.Linear(8, 64, bias=False)
    g = torch.Generator().manual_seed(0)
    measured = demo.measure_loss_memory(head, 3, 2, "auto", g, kind="cuda")
    assert measured == (300, 700)  # (fused, eager): peak minus the allocation at entry, each reset
    assert calls == ["synchronize", "reset", "synchronize"] * 2


def test_memory_probe_cpu_branch(monkeypatch):
    trims = []

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(_bench_utils, "cpu_peak_method", lambda: "vmhwm")
    peak_memory, release = demo.memory_probe("cpu")
    release()
    assert trims == [0]
    assert peak_memory().device.type == "cpu"
    monkeypatch.setattr(ctypes, "CDLL", _no_libc)
    assert demo.memory_probe("cpu") is None  # no glibc: no trustworthy CPU measurement
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(_bench_utils, "cpu_peak_method", lambda: "ru_maxrss")
    assert demo.memory_probe("cpu") is None  # the high-water mark cannot be reset
    assert demo.memory_probe("mps") is None


def test_default_device_follows_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.parse([]).device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.parse([]).device == "cpu"


@pytest.mark.slow
def test_chunk_size_reaches_the_loss(monkeypatch, tmp_path):
    seen = []
    real = fused_linear.fused_linear_mhpo_loss

    def spy(*a, chunk_size=None, **k):
        seen.append(chunk_size)
        return real(*a, chunk_size=chunk_size, **k)

    monkeypatch.setattr(fused_linear, "fused_linear_mhpo_loss", spy)  # MHPOLinearLoss's call
    monkeypatch.setattr(mk, "fused_linear_mhpo_loss", spy)  # the memory probe's call
    args = ["--smoke", "--quiet", "--out", str(tmp_path), "--runs", "mhpo", "--steps", "1", "--chunk-size", "5"]
    assert demo.main(args) == 0
    assert seen and set(seen) == {5}
