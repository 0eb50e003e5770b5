"""fused_linear_mhpo_loss / MHPOLinearLoss against the unfused path and the float64 reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import mhpo_kernels as mk
from mhpo_kernels._inputs import LOSS_AGG_MODES

from util import DEVICE, SCALAR_TOL, TOL, assert_close, device_for, fused_backends

FUSED = fused_backends()  # each on its own device (util.device_for)
BACKENDS = FUSED + ["torch"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = {"N1": (1,), "N37": (37,), "B3T13": (3, 13)}
CONTROLS = {"mhpo": mk.MHPOConfig(), "clip": mk.ClipConfig(eps_low=0.2, eps_high=0.28), "sapo": mk.SAPOConfig()}
H, V = 24, 257  # V = 257 is not a multiple of any chunk; N = 37 is not a multiple of chunk_size = 16


def make_linear_case(shape, V, H, dtype, *, backend, seed=0, bias=True, ratio_spread=0.3):
    """hidden, weight, bias, ids, old, adv, mask, ref on device_for(backend); old / ref are the true
    log-probs plus noise."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    ids = torch.randint(0, V, shape, generator=g)
    ids[torch.rand(shape, generator=g) < 0.1] = -100
    logits = F.linear(hidden.double(), weight.double(), None if b is None else b.double())
    logp = torch.log_softmax(logits, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    old = (logp + ratio_spread * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) >= 0.2).float()
    if len(shape) == 2:
        mask[1] = 0  # a fully masked sequence
    old[mask == 0] = float("inf")
    adv[mask == 0] = float("nan")
    ref = (logp + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    ref[mask == 0] = float("-inf")
    to = lambda t: None if t is None else t.to(device_for(backend))
    return tuple(to(t) for t in (hidden, weight, b, ids, old, adv, mask, ref))


def run(fn, case, *, upstream_seed=0, return_entropy=True, beta=0.0, unit_upstream=False, **kw):
    """Loss, entropy and the gradients of hidden / weight / bias for random upstream gradients.

    fn: "fused" (fused_linear_mhpo_loss on ``backend``) or "unfused" (mk.mhpo_loss on F.linear).
    """
    hidden, weight, bias, ids, old, adv, mask, ref = case
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    common = dict(ref_logprobs=ref if beta else None, beta=beta, return_entropy=return_entropy, **kw)
    if fn == "fused":
        out = mk.fused_linear_mhpo_loss(h, w, ids, old, adv, mask, bias=b, **common)
    else:
        ctrl = common.pop("ratio_control", None) or common.pop("config", None) or mk.MHPOConfig()
        common.pop("chunk_size", None)
        backend = common.pop("backend", "auto")
        logits = F.linear(h, w, b)
        if logits.dtype == torch.float64:
            backend = "reference"
        out = mk.policy_loss(logits, ids, old, adv, mask, ratio_control=ctrl, backend=backend, **common)
    g = torch.Generator().manual_seed(upstream_seed)
    scale = 1.0 if unit_upstream else 1 + torch.rand((), generator=g).item()
    total = out.loss * scale
    if return_entropy:
        total = total + (out.entropy * torch.randn(out.entropy.shape, generator=g).to(out.entropy)).sum()
    total.backward()
    return out, [None if t is None else t.grad for t in leaves]


def f64(case):
    return tuple(None if t is None else (t.double() if t.is_floating_point() else t) for t in case)


def rel_err(actual, expected):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return (actual.double() - expected.double()).abs().max().item() / max(scale, 1e-30) if actual.numel() else 0.0


def check(backend, case, dtype, **kw):
    """fp32: tight against float64. bf16: the fused error is at most about the unfused same-dtype error."""
    out, grads = run("fused", case, backend=backend, **kw)
    want, want_grads = run("unfused", f64(case), backend="reference", **kw)
    assert out.loss.dtype == torch.float32 and out.logprobs.dtype == torch.float32
    names = ("grad_hidden", "grad_weight", "grad_bias")
    if dtype == torch.float32:
        assert_close(out.loss, want.loss, *SCALAR_TOL, "loss", floor=1e-2)  # a loss near 0 is a cancellation
        assert_close(out.logprobs, want.logprobs, *SCALAR_TOL, "logprobs")
        if kw.get("return_entropy", True):
            assert_close(out.entropy, want.entropy, *SCALAR_TOL, "entropy")
        for name, gr, wg in zip(names, grads, want_grads):
            if wg is not None:
                assert gr.dtype == dtype
                assert_close(gr, wg, *TOL[dtype], name)
    else:
        naive, naive_grads = run("unfused", case, backend=backend, **kw)
        atol = TOL[dtype][0]
        for name, a, n, w in [("loss", out.loss, naive.loss, want.loss),
                              ("logprobs", out.logprobs, naive.logprobs, want.logprobs)] + list(
                zip(names, grads, naive_grads, want_grads)):
            if w is None:
                continue
            assert a.dtype == n.dtype, name
            assert torch.isfinite(a).all(), name
            assert rel_err(a, w) <= 2 * rel_err(n, w) + atol, (
                f"{name}: fused err {rel_err(a, w):.2e} vs unfused {dtype} err {rel_err(n, w):.2e}")
    assert out.metrics.keys() == want.metrics.keys()
    n_active = max(int(((case[6] != 0) & (case[3] != -100)).sum()), 1)
    for k in want.metrics:
        tol, floor = (1e-4, 1e-2) if dtype == torch.float32 else (5e-2, 0.1)
        if "frac" in k:  # counts of tokens past an edge: one token at the edge may flip
            assert abs(out.metrics[k].item() - want.metrics[k].item()) <= 1 / n_active + 1e-6, k
            continue
        assert_close(out.metrics[k], want.metrics[k], tol, tol, f"metric {k}", floor=floor)
    return out, grads


def grid():
    """dtype x shape x ratio control, the remaining options cycled over it; the id spells every option."""
    for i, (dtype, shape, ctrl) in enumerate(itertools.product(DTYPES, SHAPES, CONTROLS)):
        T, agg, beta, bias, entropy = (1.0, 0.7)[i % 2], LOSS_AGG_MODES[(i // 2) % 4], (0.0, 0.1)[(i // 3) % 2], \
            i % 3 != 0, i % 2 == 1
        yield pytest.param(dtype, shape, ctrl, T, agg, beta, bias, entropy, i,
                           id=f"{dtype}-{shape}-{ctrl}-T{T}-{agg}-beta{beta}-{('nobias', 'bias')[bias]}-"
                              f"{('logp', 'entropy')[entropy]}-seed{i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,shape,ctrl,temperature,agg,beta,bias,return_entropy,seed", list(grid()))
def test_grid(backend, dtype, shape, ctrl, temperature, agg, beta, bias, return_entropy, seed):
    kw = dict(temperature=temperature, loss_agg_mode=agg, beta=beta, chunk_size=16, ratio_control=CONTROLS[ctrl])
    case = make_linear_case(SHAPES[shape], V, H, DTYPES[dtype], backend=backend, seed=seed, bias=bias)
    check(backend, case, DTYPES[dtype], upstream_seed=seed, return_entropy=return_entropy, **kw)


OPTIONS = list(itertools.product(LOSS_AGG_MODES, (1.0, 0.7), (0.0, 0.1)))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg,temperature,beta", OPTIONS,
                         ids=[f"{a}-T{t}-beta{b}" for a, t, b in OPTIONS])
def test_options(backend, agg, temperature, beta):
    case = make_linear_case((3, 13), V, H, torch.float32, backend=backend, seed=7)
    check(backend, case, torch.float32, loss_agg_mode=agg, temperature=temperature, beta=beta, chunk_size=8,
          return_entropy=False, unit_upstream=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("chunk_size", [1, 5, 37, 1000, None])
def test_chunk_sizes_agree(backend, chunk_size):
    """The result does not depend on the chunking (up to fp32 summation order)."""
    case = make_linear_case((37,), V, H, torch.float32, backend=backend, seed=9)
    out, grads = run("fused", case, backend=backend, chunk_size=chunk_size, beta=0.1)
    want, want_grads = run("unfused", case, backend=backend, beta=0.1)
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
    for name, gr, wg in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert_close(gr, wg, *TOL[torch.float32], name)


@pytest.mark.parametrize("backend", FUSED)
def test_inactive_rows_get_exact_zero_gradient(backend):
    hidden, weight, bias, ids, old, adv, mask, ref = make_linear_case((4, 8), V, H, torch.bfloat16, backend=backend,
                                                                      seed=5)
    _, (gh, _, _) = run("fused", (hidden, weight, bias, ids, old, adv, mask, ref), backend=backend, beta=0.1,
                        return_entropy=False, chunk_size=6)
    inactive = (mask == 0) | (ids == -100)
    assert inactive.any() and (~inactive).any()
    assert torch.equal(gh[inactive], torch.zeros_like(gh[inactive]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_frozen_and_empty(backend):
    hidden, weight, bias, ids, old, adv, mask, _ = make_linear_case((37,), V, H, torch.float32, backend=backend, seed=2)
    with torch.no_grad():
        out = mk.fused_linear_mhpo_loss(hidden.requires_grad_(), weight, ids, old, adv, mask, bias=bias,
                                        backend=backend, chunk_size=8)
    want = mk.mhpo_loss(F.linear(hidden, weight, bias), ids, old, adv, mask, backend="reference")
    assert_close(out.logprobs, want.logprobs, *SCALAR_TOL, "logprobs")
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
    # frozen lm_head: only the hidden states get a gradient
    h = hidden.detach().clone().requires_grad_()
    mk.fused_linear_mhpo_loss(h, weight, ids, old, adv, mask, bias=bias, backend=backend).loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    # N = 0
    h0 = torch.randn(0, H, device=hidden.device, requires_grad=True)
    w0 = weight.clone().requires_grad_()
    z = torch.zeros(0, device=hidden.device)
    out = mk.fused_linear_mhpo_loss(h0, w0, z.long(), z, z, backend=backend, return_entropy=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.equal(w0.grad, torch.zeros_like(w0))


@pytest.mark.parametrize("backend", FUSED)
def test_bad_inputs(backend):
    dev = device_for(backend)
    h, w = torch.randn(4, 8, device=dev), torch.randn(11, 8, device=dev)
    ids, z = torch.zeros(4, dtype=torch.long, device=dev), torch.zeros(4, device=dev)
    with pytest.raises(ValueError, match="weight must be"):
        mk.fused_linear_mhpo_loss(h, torch.randn(11, 7, device=dev), ids, z, z)
    with pytest.raises(TypeError, match="same dtype"):
        mk.fused_linear_mhpo_loss(h, w.double(), ids, z, z)
    with pytest.raises(ValueError, match="bias"):
        mk.fused_linear_mhpo_loss(h, w, ids, z, z, bias=torch.zeros(10, device=dev))
    with pytest.raises(ValueError, match="not both"):
        mk.fused_linear_mhpo_loss(h, w, ids, z, z, config=mk.MHPOConfig(), ratio_control=mk.ClipConfig())
    with pytest.raises(TypeError, match="MHPOConfig"):
        mk.fused_linear_mhpo_loss(h, w, ids, z, z, config=mk.ClipConfig())
    with pytest.raises(ValueError, match=r"target_ids\[2\]"):
        mk.fused_linear_mhpo_loss(h, w, torch.tensor([0, 1, 11, 2], device=dev), z, z, backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        mk.fused_linear_mhpo_loss(h, w, ids, z, z, chunk_size=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    hidden, weight, bias, ids, old, adv, mask, _ = make_linear_case((3, 13), V, H, torch.float32, backend=backend,
                                                                    seed=11)
    head = torch.nn.Linear(H, V).to(hidden.device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    loss_fn = mk.MHPOLinearLoss(head, ratio_control=mk.ClipConfig(), loss_agg_mode="seq-mean-token-sum",
                                backend=backend, chunk_size=8)
    h = hidden.clone().requires_grad_()
    out = loss_fn(h, ids, old, adv, mask, temperature=0.7)
    out.loss.backward()
    (want, (gh, gw, gb)) = run("unfused", (hidden, weight, bias, ids, old, adv, mask, None), backend="reference",
                               ratio_control=mk.ClipConfig(), loss_agg_mode="seq-mean-token-sum",
                               temperature=0.7, return_entropy=False, unit_upstream=True)
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
    for name, a, b in (("hidden", h.grad, gh), ("weight", head.weight.grad, gw), ("bias", head.bias.grad, gb)):
        assert_close(a, b, *TOL[torch.float32], name)
    assert "forward" not in vars(head)  # the temporary forward is removed again
    with pytest.raises(TypeError, match="nn.Linear"):
        mk.MHPOLinearLoss(torch.nn.Conv1d(2, 2, 1))


def _fsdp_wrappers():
    import torch.distributed.fsdp as fsdp

    out = []
    if hasattr(fsdp, "fully_shard"):
        out.append("fsdp2")
    out.append("fsdp1")
    return out


@pytest.mark.parametrize("backend", [next(b for b in BACKENDS if device_for(b) == DEVICE)])
@pytest.mark.parametrize("wrapper", _fsdp_wrappers())
def test_fsdp_single_process_gloo(wrapper, backend, tmp_path):
    """MHPOLinearLoss gathers an FSDP-sharded lm_head: the loss runs inside lm_head's forward.
    The module, inputs and targets live on the device under test (the GPU where there is one)."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    hidden, weight, bias, ids, old, adv, mask, _ = make_linear_case((3, 13), V, H, torch.float32, backend=backend,
                                                                    seed=12)
    pg = "nccl" if DEVICE.type == "cuda" else "gloo"
    dist.init_process_group(pg, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        head = torch.nn.Linear(H, V).to(DEVICE)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        if wrapper == "fsdp2":
            fsdp.fully_shard(head)
        else:
            try:
                head = fsdp.FullyShardedDataParallel(head, use_orig_params=True)
            except RuntimeError as e:  # torch 2.14: FSDP1 needs an accelerator; FSDP2 runs on CPU
                if "accelerator" in str(e):
                    pytest.skip(f"FSDP1: {e}")
                raise
        loss_fn = mk.MHPOLinearLoss(head, backend=backend, chunk_size=8)
        h = hidden.clone().requires_grad_()
        out = loss_fn(h, ids, old, adv, mask)
        out.loss.backward()
        params = dict(head.named_parameters())
        gw = next(p.grad for n, p in params.items() if n.endswith("weight"))
        gb = next(p.grad for n, p in params.items() if n.endswith("bias"))
        if hasattr(gw, "full_tensor"):  # FSDP2: DTensor gradients
            gw, gb = gw.full_tensor(), gb.full_tensor()
    finally:
        dist.destroy_process_group()
    want, (wh, ww, wb) = run("unfused", (hidden, weight, bias, ids, old, adv, mask, None), backend="reference",
                             return_entropy=False, unit_upstream=True)
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
    assert_close(h.grad, wh, *TOL[torch.float32], "hidden")
    assert_close(gw.reshape(ww.shape), ww, *TOL[torch.float32], "weight")
    assert_close(gb.reshape(wb.shape), wb, *TOL[torch.float32], "bias")
