"""Random test cases shared by the backend tests, and the device each backend is tested on.

Every test that runs a backend builds its tensors on ``device_for(backend)``
(the case builders take the backend). ``MHPO_TEST_DEVICE_AUDIT=1`` simulates a
GPU machine on a CPU-only one, with the ``meta`` device standing in for CUDA;
tests/test_devices.py runs the suite that way to catch tests that build their
tensors anywhere else (see tests/conftest.py).
"""
import os

import torch

DEVICE_AUDIT = os.environ.get("MHPO_TEST_DEVICE_AUDIT") == "1"
if DEVICE_AUDIT:
    GPU = torch.device("meta")
elif torch.cuda.is_available():
    GPU = torch.device("cuda")
else:
    GPU = None
DEVICE = GPU or torch.device("cpu")  # the default device: the GPU where there is one


def device_for(backend):
    """The device whose tensors ``backend`` is tested on in this process.

    ``cpu``: CPU (also on a GPU machine); ``cuda``: the GPU; ``triton``: the GPU,
    or CPU tensors under Triton's interpreter where there is none; the reference
    (``torch``) and backend-free paths: DEVICE.
    """
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "cuda":
        return GPU or torch.device("cuda")
    if backend == "triton":
        return GPU or torch.device("cpu")
    return DEVICE


def fused_backends():
    """Every fused backend this process can test, each on its own device: the union of
    the backends available for CPU and for CUDA tensors (the reference excluded)."""
    import mhpo_kernels as mk

    have = mk.available_backends("cpu") + mk.available_backends("cuda")
    return [b for b in ("triton", "cuda", "cpu") if b in have]


def case_device(backend=None, device=None):
    """The device a builder puts its tensors on: the backend's, else ``device``, else CPU."""
    if backend is None:
        return torch.device(device or "cpu")
    want = device_for(backend)
    if device is not None and torch.device(device) != want:
        raise ValueError(f"backend {backend!r} is tested on {want}, not {device}")
    return want


def make_case(shape, V, dtype, *, backend=None, device=None, seed=0, mask_frac=0.2, ignore_frac=0.1,
              ratio_spread=0.3, ref=True, masked_seq=True, ignore_index=-100):
    """logits, ids, old, adv, mask, ref for a [N] or [B, T] token shape, on ``device_for(backend)``
    (or ``device`` for tests that run no particular backend).

    old / ref log-probs are the true log-probs plus noise, so ratios sit around
    1 as in training; padding positions hold inf / NaN garbage that no backend
    may read into the loss.
    """
    device = case_device(backend, device)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, shape, generator=g)
    ids[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    old = (logp + ratio_spread * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) >= mask_frac).float()
    if len(shape) == 2 and masked_seq and shape[0] > 1:
        mask[1] = 0  # a fully masked sequence
    old[mask == 0] = float("inf")
    adv[mask == 0] = float("nan")
    refl = None
    if ref:
        refl = (logp + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
        refl[mask == 0] = float("-inf")
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(logits), to(ids), to(old), to(adv), to(mask), to(refl)
