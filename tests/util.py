"""The tests' shared helpers: random cases, the device each backend is tested on, the one
tolerance table and the comparisons (conftest.py keeps only fixtures and hooks).

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
    to = lambda t: None if t is None else t.to(device)
    return to(logits), to(ids), to(old), to(adv), to(mask), to(refl)


# ---------------------------------------------------------------------------- tolerances

# The one tolerance table: (atol relative to max|expected|, rtol). A dtype row is for the
# gradient, which is stored in the logits dtype; per-token outputs and the loss are computed
# in fp32 whatever the input dtype and use the "scalar" row; the fp32 metrics against the
# float64 reference use the "metric" row (with floor=1e-2: a metric near 0 is compared
# absolutely).
TOL = {
    torch.float32: (2e-6, 2e-5),
    torch.bfloat16: (2e-3, 1.6e-2),
    torch.float16: (2e-4, 2e-3),
    torch.float64: (1e-12, 1e-10),
    "scalar": (2e-5, 2e-5),
    "metric": (1e-4, 1e-4),
}
SCALAR_TOL = TOL["scalar"]


def assert_close(actual, expected, atol_rel, rtol, what="", floor=1e-30):
    """|actual - expected| <= atol_rel * max(max|expected|, floor) + rtol * |expected|, in float64."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs()
    bound = atol_rel * max(scale, floor) + rtol * expected.abs()
    worst = (err - bound).max().item() if err.numel() else -1
    assert worst <= 0, f"{what}: max err {err.max().item():.3e} (scale {scale:.3e}) exceeds tolerance"


def check_outputs(out, grad, want, want_grad, dtype):
    """A fused call's outputs and logits gradient against the float64 reference's: the loss,
    log-probs and entropy (fp32 whatever the input dtype), the gradient in ``dtype``, every metric."""
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
    assert_close(out.logprobs, want.logprobs, *SCALAR_TOL, "logprobs")
    assert (out.entropy is None) == (want.entropy is None)
    if want.entropy is not None:
        assert_close(out.entropy, want.entropy, *SCALAR_TOL, "entropy")
    assert_close(grad, want_grad, *TOL[dtype], "grad")
    assert out.metrics.keys() == want.metrics.keys()
    for k in want.metrics:
        assert_close(out.metrics[k], want.metrics[k], *TOL["metric"], f"metric {k}", floor=1e-2)


def backward_random(out, seed):
    """Backpropagate loss * u + sum(entropy * g) with random u and g (not just .sum())."""
    g = torch.Generator().manual_seed(seed)
    total = out.loss * (1 + torch.rand((), generator=g)).to(out.loss)
    if out.entropy is not None:
        total = total + (out.entropy * torch.randn(out.entropy.shape, generator=g).to(out.entropy)).sum()
    total.backward()


def assert_compiled_matches_eager(f, logits):
    """f(z) -> (loss, metric): torch.compile(f, fullgraph=True) gives eager's loss, metric and gradient."""
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        z = logits.clone().requires_grad_()
        loss, metric = fn(z)
        loss.backward()
        results.append((loss.detach(), metric, z.grad))
    (l0, s0, g0), (l1, s1, g1) = results
    assert_close(l1, l0, *SCALAR_TOL, "loss")
    assert_close(s1, s0, *SCALAR_TOL, "metric")
    assert_close(g1, g0, *TOL[torch.float32], "grad")
