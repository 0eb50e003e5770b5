import os

import pytest
import torch

# Without a GPU, the Triton backend runs through Triton's interpreter on CPU
# tensors; the variable must be set before triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# One tolerance table per dtype: (atol relative to max|expected|, rtol) for the
# gradient, which is stored in the logits dtype; per-token outputs and the loss
# are computed in fp32 whatever the input dtype and use the "fp32" row.
TOL = {
    torch.float32: (2e-6, 2e-5),
    torch.bfloat16: (2e-3, 1.6e-2),
    torch.float16: (2e-4, 2e-3),
    torch.float64: (1e-12, 1e-10),
}
SCALAR_TOL = (2e-5, 2e-5)


def assert_close(actual, expected, atol_rel, rtol, what="", floor=1e-30):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs()
    bound = atol_rel * max(scale, floor) + rtol * expected.abs()
    worst = (err - bound).max().item() if err.numel() else -1
    assert worst <= 0, f"{what}: max err {err.max().item():.3e} (scale {scale:.3e}) exceeds tolerance"


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


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: errors must come first."""
    from mhpo_kernels import backends

    class Trap:
        def fwd(self, *a, **k):
            raise AssertionError("kernel launched")
        bwd = fwd

    monkeypatch.setattr(backends, "get", lambda name: Trap())


def backward_random(out, seed):
    """Backpropagate loss * u + sum(entropy * g) with random u and g (not just .sum())."""
    g = torch.Generator().manual_seed(seed)
    total = out.loss * (1 + torch.rand((), generator=g)).to(out.loss)
    if out.entropy is not None:
        total = total + (out.entropy * torch.randn(out.entropy.shape, generator=g).to(out.entropy)).sum()
    total.backward()


@pytest.fixture(autouse=True)
def nan_poison():
    """Uninitialised memory is NaN (torch.empty* from Python and at::empty in the native
    kernels alike), so a kernel that leaves part of its output unwritten fails loudly."""
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill
