"""Tests that run a backend build their tensors on that backend's device (util.device_for).

On a GPU machine the GPU backends need CUDA tensors and the native cpu backend
CPU tensors; a CPU-only run cannot see a test that gets this wrong, so the device
audit simulates a GPU machine here: the suite runs with MHPO_TEST_DEVICE_AUDIT=1
('meta' stands in for the GPU), each backend test up to its first call into the
package, which must receive tensors on the backend's device only (tests/conftest.py).
"""
import os
import subprocess
import sys

import pytest
import torch

import util
from util import device_for, fused_backends, make_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDITED = ["tests"]  # every test file: a new one is audited as soon as it parametrizes a backend


def audit(*args, probe=False):
    env = {**os.environ, "MHPO_TEST_DEVICE_AUDIT": "1", "MHPO_TEST_DEVICE_AUDIT_PROBE": "1" if probe else "0"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_device_for_maps_each_backend_to_its_device(monkeypatch):
    for gpu in (None, torch.device("meta")):  # a CPU-only machine, then a (simulated) GPU machine
        monkeypatch.setattr(util, "GPU", gpu)
        monkeypatch.setattr(util, "DEVICE", gpu or torch.device("cpu"))
        want = {"cpu": "cpu", "triton": "meta" if gpu else "cpu", "cuda": "meta" if gpu else "cuda",
                "torch": "meta" if gpu else "cpu", "from_logprobs": "meta" if gpu else "cpu"}
        assert {b: util.device_for(b).type for b in want} == want
        for backend in ("cpu", "triton", "torch"):
            case = util.make_case((2, 3), 5, torch.bfloat16, backend=backend)
            assert {t.device.type for t in case} == {want[backend]}, backend
        with pytest.raises(ValueError, match="is tested on"):
            util.make_case((2, 3), 5, torch.float32, backend="cpu", device="meta")


def test_fused_backends_cover_cpu_and_cuda_devices():
    import mhpo_kernels as mk

    have = set(mk.available_backends("cpu") + mk.available_backends("cuda")) - {"torch", "reference"}
    assert set(fused_backends()) == have
    for b in fused_backends():
        assert b in mk.available_backends(device_for(b)), b


@pytest.mark.slow
def test_every_backend_test_builds_on_its_backends_device():
    r = audit(*AUDITED)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    passed = int(r.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed > 500, tail  # every backend test was audited, not just a few


@pytest.mark.slow
def test_device_audit_catches_a_test_that_builds_cpu_tensors():
    """The audit itself can fail: the probe below builds CPU tensors whatever the backend."""
    r = audit("tests/test_devices.py", probe=True)
    out = r.stdout
    assert r.returncode == 1, out[-4000:]
    assert "test_audit_probe[triton]" in out and "got tensors on ['cpu'] in a test of backend 'triton'" in out, out
    assert "1 failed, 1 passed" in out or "cpu" not in fused_backends(), out[-4000:]


if os.environ.get("MHPO_TEST_DEVICE_AUDIT_PROBE") == "1":
    @pytest.mark.parametrize("backend", fused_backends())
    def test_audit_probe(backend):
        import mhpo_kernels as mk

        logits, ids, *_ = make_case((3,), 5, torch.float32, device="cpu")  # wrong for a GPU backend
        mk.token_logprobs(logits, ids, backend=backend)
