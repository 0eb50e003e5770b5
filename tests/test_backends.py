"""Every fused backend against the float64 reference, through the public API."""
import importlib.util
import itertools
import os

import pytest
import torch

import mhpo_kernels as mk
from mhpo_kernels._inputs import LOSS_AGG_MODES

from util import SCALAR_TOL, TOL, assert_close, backward_random, check_outputs, device_for, fused_backends, make_case

FUSED = fused_backends()  # each on its own device: the cpu backend on CPU tensors on a GPU machine too
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCABS = [1, 2, 127, 1031, 32768 + 13]
SHAPES = {"N1": (1,), "N37": (37,), "B3T13": (3, 13)}


def expected_backends():
    """MHPO_EXPECT_BACKENDS (CI names the backends it built), else what every development install has:
    the native cpu backend (built wherever a C++ compiler is) and triton wherever Triton is installed."""
    spec = os.environ.get("MHPO_EXPECT_BACKENDS")
    if spec is not None:
        return [b for b in spec.split(",") if b]
    return ["cpu"] + (["triton"] if importlib.util.find_spec("triton") else [])


def test_expected_backends_available():
    """A missing backend fails instead of skipping. Each is looked for on the device it runs on (cpu: CPU
    tensors, also on a GPU machine); the pure-torch ones are always there."""
    missing = [b for b in expected_backends() if b not in mk.available_backends(device_for(b))]
    assert not missing, (f"backends {missing} not available; have {FUSED} (set MHPO_EXPECT_BACKENDS to the "
                         f"backends this install built, comma-separated)")
    assert all(b in mk.available_backends(device_for(b)) for b in FUSED)
    assert mk.available_backends("cpu")[-2:] == ["torch", "reference"]


def run(backend, case, *, beta=0.0, upstream_seed=0, inplace_backward=False, return_entropy=True, **kw):
    """Loss, per-token outputs and the logits gradient for random upstream gradients."""
    logits, ids, old, adv, mask, ref = case
    leaf = logits.clone().requires_grad_()
    z = leaf + 0 if inplace_backward else leaf  # a non-leaf, like an lm_head output
    out = mk.mhpo_loss(z, ids, old, adv, mask, ref_logprobs=ref if beta else None, beta=beta,
                       return_entropy=return_entropy, backend=backend, inplace_backward=inplace_backward, **kw)
    backward_random(out, upstream_seed)
    if inplace_backward:
        assert torch.equal(z.detach(), leaf.grad), "in-place backward must leave the gradient in the logits buffer"
    return out, leaf.grad


def check_against_reference(backend, case, dtype, **kw):
    out, grad = run(backend, case, **kw)
    ref_case = tuple(None if t is None else (t.double() if t.is_floating_point() else t) for t in case)
    kw.pop("inplace_backward", None)
    want, want_grad = run("reference", ref_case, **kw)
    check_outputs(out, grad, want, want_grad, dtype)
    return out, grad


def grid():
    """dtype x vocabulary x shape, the remaining options cycled over it; the id spells every option."""
    for i, (dtype, V, shape) in enumerate(itertools.product(DTYPES, VOCABS, SHAPES)):
        T, agg, beta, inplace = (1.0, 0.7)[i % 2], LOSS_AGG_MODES[(i // 2) % 4], (0.0, 0.1)[(i // 3) % 2], (i // 5) % 2
        yield pytest.param(dtype, V, shape, T, agg, beta, bool(inplace), i,
                           id=f"{dtype}-V{V}-{shape}-T{T}-{agg}-beta{beta}-{('alloc', 'inplace')[inplace]}-seed{i}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype,V,shape,temperature,agg,beta,inplace,seed", list(grid()))
def test_grid(backend, dtype, V, shape, temperature, agg, beta, inplace, seed):
    case = make_case(SHAPES[shape], V, DTYPES[dtype], backend=backend, seed=seed)
    check_against_reference(backend, case, DTYPES[dtype], upstream_seed=seed, temperature=temperature,
                            loss_agg_mode=agg, beta=beta, inplace_backward=inplace)


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_one_token_vocabulary_is_exact(backend, dtype, temperature):
    """V = 1: log-prob, entropy and gradient are exactly 0 (no tolerance), whatever the
    temperature: x = z / T must be rounded the same way wherever the kernels use it."""
    case = make_case((5, 8), 1, DTYPES[dtype], backend=backend, seed=17, ignore_frac=0.2)
    logits, ids = case[0] * 40, case[1]  # large logits: z / T is rarely exact
    zero = torch.zeros(ids.shape, device=ids.device)
    z = logits.clone().requires_grad_()
    logp, ent = mk.token_logprobs(z, ids, temperature=temperature, return_entropy=True, backend=backend)
    assert torch.equal(logp, zero) and torch.equal(ent, zero), (logp.abs().max().item(), ent.abs().max().item())
    g = torch.Generator().manual_seed(1)
    u, w = torch.randn(ids.shape, generator=g).to(zero), torch.randn(ids.shape, generator=g).to(zero)
    (logp * u + ent * w).sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z)), z.grad.abs().max().item()
    out, grad = run(backend, (logits,) + case[1:], temperature=temperature, beta=0.1)
    assert torch.equal(out.logprobs, zero) and torch.equal(out.entropy, zero)
    assert torch.equal(grad, torch.zeros_like(grad)), grad.abs().max().item()


OPTIONS = list(itertools.product(LOSS_AGG_MODES, (1.0, 0.7), (0.0, 0.1), (False, True)))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("agg,temperature,beta,inplace", OPTIONS,
                         ids=[f"{a}-T{t}-beta{b}-{'inplace' if i else 'alloc'}" for a, t, b, i in OPTIONS])
def test_options(backend, agg, temperature, beta, inplace):
    case = make_case((3, 13), 127, torch.float32, backend=backend, seed=7)
    check_against_reference(backend, case, torch.float32, loss_agg_mode=agg, temperature=temperature,
                            beta=beta, inplace_backward=inplace)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config", [mk.MHPOConfig(), mk.MHPOConfig(use_dhp=False), mk.MHPOConfig(use_lfm=False),
                                    mk.MHPOConfig(c=0.5, k_neg=1.5, lam_neg=1.0)],
                         ids=["default", "lfm_only", "dhp_only", "sym_c0.5"])
def test_configs_without_entropy(backend, config):
    case = make_case((37,), 1031, torch.float32, backend=backend, seed=3, ratio_spread=1.5)
    out, _ = check_against_reference(backend, case, torch.float32, config=config, return_entropy=False)
    assert out.entropy is None


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("shift", [300.0, -300.0, 1e4, -1e4])
@pytest.mark.parametrize("config", [mk.MHPOConfig(), mk.MHPOConfig(use_dhp=False), mk.MHPOConfig(use_lfm=False)],
                         ids=["default", "lfm_only", "dhp_only"])
def test_extreme_log_ratios(backend, shift, config):
    logits, ids, old, adv, mask, ref = make_case((2, 9), 127, torch.float32, backend=backend, seed=4)
    old = old - shift  # delta = logp - old = shift + noise
    out, grad = run(backend, (logits, ids, old, adv, mask, ref), config=config, beta=0.1)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for k, v in out.metrics.items() if not k.startswith("ratio_"))
    if backend != "reference":
        want, want_grad = run("reference", (logits, ids, old, adv, mask, ref), config=config, beta=0.1)
        assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
        assert_close(grad, want_grad, *TOL[torch.float32], "grad")


@pytest.mark.parametrize("backend", FUSED + ["torch"])
def test_inactive_rows_get_exact_zero_gradient(backend):
    logits, ids, old, adv, mask, ref = make_case((4, 8), 131, torch.bfloat16, backend=backend, seed=5,
                                                 ignore_frac=0.3, mask_frac=0.3)
    _, grad = run(backend, (logits, ids, old, adv, mask, ref), beta=0.1, return_entropy=False)
    inactive = (mask == 0) | (ids == -100)
    assert inactive.any() and (~inactive).any()
    assert torch.equal(grad[inactive], torch.zeros_like(grad[inactive]))
    assert (grad[~inactive] != 0).any(dim=-1).all()


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_empty_and_all_masked(backend, agg):
    dev = device_for(backend)
    for shape in [(0,), (2, 0), (0, 5)]:
        logits = torch.randn(*shape, 17, device=dev, requires_grad=True)
        z = torch.zeros(shape, device=dev)
        out = mk.mhpo_loss(logits, z.long(), z, z, loss_agg_mode=agg, backend=backend, return_entropy=True)
        out.loss.backward()
        assert out.loss.item() == 0.0 and logits.grad.shape == logits.shape
    logits, ids, old, adv, mask, ref = make_case((3, 6), 17, torch.float32, backend=backend, seed=6)
    out, grad = run(backend, (logits, ids, old, adv, torch.zeros_like(mask), ref), loss_agg_mode=agg,
                    beta=0.1, return_entropy=False)
    assert out.loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("backend", FUSED)
def test_noncontiguous_and_strided_logits(backend):
    logits, ids, old, adv, mask, ref = make_case((37,), 129, torch.float32, backend=backend, seed=8)
    wide = torch.randn(37, 200, device=device_for(backend))
    wide[:, :129] = logits
    strided = wide[:, :129]  # row stride 200, unit stride along V: used as is
    transposed = logits.t().contiguous().t()  # V not unit-stride: copied
    want, want_grad = run("reference", (logits, ids, old, adv, mask, ref), beta=0.1)
    for z in (strided, transposed):
        out, grad = run(backend, (z, ids, old, adv, mask, ref), beta=0.1)
        assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
        assert_close(grad, want_grad, *TOL[torch.float32], "grad")


@pytest.mark.slow(audit=False)  # a 4 GiB buffer before the first call: left out of the device audit
@pytest.mark.parametrize("backend", FUSED)
def test_int64_row_offsets(backend):
    """Rows past element 2^31 of the buffer: the row offset must be computed in int64."""
    V, stride = 97, 2**30 + 3
    dev = device_for(backend)
    storage = torch.empty(2 * stride + V, dtype=torch.bfloat16, device=dev)
    logits = storage.as_strided((3, V), (stride, 1))
    assert logits.stride(0) * 2 > 2**31
    logits.copy_(torch.randn(3, V))
    ids = torch.tensor([5, 96, 0], device=dev)
    old = torch.full((3,), -4.0, device=dev)
    adv = torch.tensor([1.0, -0.5, 2.0], device=dev)
    out, grad = run(backend, (logits, ids, old, adv, None, None))
    want, want_grad = run("reference", (logits.clone().double(), ids, old, adv, None, None))
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
    assert_close(grad, want_grad, *TOL[torch.bfloat16], "grad")
