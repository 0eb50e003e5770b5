"""The policy-loss family (issue 4): every mode against its reference on every fused
backend, packed vs padded, token_logprobs, ablations, peer parity, metrics, bad input."""
import itertools

import math

import pytest
import torch
import torch.nn.functional as F

import mhpo_kernels as mk
from mhpo_kernels import reference as R
from mhpo_kernels._inputs import LOSS_AGG_MODES

from util import (SCALAR_TOL, TOL, assert_close, assert_compiled_matches_eager, backward_random, check_outputs,
                  device_for, fused_backends, make_case)

FUSED = fused_backends()  # each on its own device (util.device_for)
FROM_LOGPROBS = "from_logprobs"  # the backend-free path: tensors on util.DEVICE
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# name -> (ratio_control, importance_sampling_level)
MODES = {
    "mhpo": (mk.MHPOConfig(), "token"),
    "mhpo_lfm_only": (mk.MHPOConfig(use_dhp=False), "token"),
    "mhpo_dhp_only": (mk.MHPOConfig(use_lfm=False), "token"),
    "grpo_clip": (mk.ClipConfig(), "token"),
    "dapo_dual_delta": (mk.ClipConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, delta=4.0), "token"),
    "sapo": (mk.SAPOConfig(), "token"),
    "gspo": (mk.GSPOConfig(), None),
    "gspo_wide": (mk.GSPOConfig(eps_low=0.05, eps_high=0.08), "sequence"),
    "mhpo_seq": (mk.MHPOConfig(), "sequence"),
    "mhpo_seq_sym": (mk.MHPOConfig(c=1.0, k_neg=1.5, lam_neg=1.0), "sequence"),
    "clip_seq": (mk.ClipConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0), "sequence"),
    "sapo_seq": (mk.SAPOConfig(), "sequence"),
}
# token shape, cu_seqlens (packed: an empty sequence and a fully masked one)
SHAPES = {"N37": ((37,), None), "B3T13": ((3, 13), None), "packed37": ((37,), [0, 5, 5, 17, 30, 37])}
MASKED_SEQ = slice(17, 30)


def case_for(shape_name, V, dtype, seed, *, backend, **kw):
    """make_case for a named token shape, plus cu_seqlens, on device_for(backend)."""
    shape, cu = SHAPES[shape_name]
    logits, ids, old, adv, mask, ref = make_case(shape, V, dtype, seed=seed, device="cpu", **kw)
    if cu is not None:
        mask[MASKED_SEQ] = 0
        old[MASKED_SEQ], adv[MASKED_SEQ] = float("inf"), float("nan")
        cu = torch.tensor(cu, dtype=torch.int32)
    to = lambda t: None if t is None else t.to(device_for(backend))
    return tuple(to(t) for t in (logits, ids, old, adv, mask, ref, cu))


def run(backend, case, *, mode, beta=0.0, upstream_seed=0, return_entropy=True, inplace_backward=False, **kw):
    """Loss, outputs and logits gradient for random upstream gradients (loss and entropy)."""
    logits, ids, old, adv, mask, ref, cu = case
    cfg, level = MODES[mode]
    leaf = logits.clone().requires_grad_()
    z = leaf + 0 if inplace_backward else leaf
    out = mk.policy_loss(z, ids, old, adv, mask, ratio_control=cfg, importance_sampling_level=level,
                         cu_seqlens=cu, ref_logprobs=ref if beta else None, beta=beta,
                         return_entropy=return_entropy, backend=backend, inplace_backward=inplace_backward, **kw)
    backward_random(out, upstream_seed)
    return out, leaf.grad


def double(case):
    return tuple(None if t is None else (t.double() if t.is_floating_point() else t) for t in case)


def grid():
    """mode x shape, the remaining options cycled over it; the id spells every option."""
    for i, (mode, shape) in enumerate(itertools.product(MODES, SHAPES)):
        dtype, agg, V = list(DTYPES)[i % 3], LOSS_AGG_MODES[(i // 3) % 4], (127, 1031)[(i // 7) % 2]
        T, beta, entropy, inplace = (1.0, 0.7)[i % 2], (0.0, 0.1)[(i // 2) % 2], (i // 4) % 2 == 0, (i // 5) % 2
        yield pytest.param(mode, shape, dtype, V, T, agg, beta, entropy, bool(inplace), i,
                           id=f"{mode}-{shape}-{dtype}-V{V}-T{T}-{agg}-beta{beta}-{('logp', 'entropy')[entropy]}-"
                              f"{('alloc', 'inplace')[inplace]}-seed{i}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode,shape,dtype,V,temperature,agg,beta,return_entropy,inplace,seed", list(grid()))
def test_mode_vs_reference(backend, mode, shape, dtype, V, temperature, agg, beta, return_entropy, inplace, seed):
    """Each mode through the fused kernels against reference.policy_loss in float64."""
    i, dtype = seed, DTYPES[dtype]
    kw = dict(loss_agg_mode=agg, temperature=temperature, beta=beta, return_entropy=return_entropy,
              inplace_backward=inplace)
    case = case_for(shape, V, dtype, seed=i, backend=backend, ratio_spread=0.5)
    out, grad = run(backend, case, mode=mode, upstream_seed=i, **kw)
    kw.pop("inplace_backward")
    want, want_grad = run("reference", double(case), mode=mode, upstream_seed=i, **kw)
    check_outputs(out, grad, want, want_grad, dtype)
    if not kw["return_entropy"]:
        assert out.entropy is None and "entropy_mean" not in out.metrics


def logprob_case(shape_name, seed, dtype=torch.float64):
    logits, ids, old, adv, mask, ref, cu = case_for(shape_name, 17, torch.float64, seed=seed, backend=FROM_LOGPROBS,
                                                    ratio_spread=0.5)
    logp = torch.log_softmax(logits, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    mask = mask * (ids != -100)
    logp = torch.where(mask != 0, logp, torch.full_like(logp, float("-inf")))  # garbage where masked
    return logp.to(dtype), old, adv, mask, ref, cu


FROM_GRID = [pytest.param(m, s, a, (0.0, 0.1)[i % 2], i, id=f"{m}-{s}-{a}-beta{(0.0, 0.1)[i % 2]}-seed{i}")
             for i, (m, s, a) in enumerate(itertools.product(MODES, ["B3T13", "packed37"], LOSS_AGG_MODES))]


@pytest.mark.parametrize("mode,shape,agg,beta,seed", FROM_GRID)
def test_from_logprobs_vs_reference(mode, shape, agg, beta, seed):
    """policy_loss_from_logprobs (analytic dL/dlogp) against autograd through the reference formulas."""
    cfg, level = MODES[mode]
    logp, old, adv, mask, ref, cu = logprob_case(shape, seed=seed)
    kw = dict(ratio_control=cfg, importance_sampling_level=level, cu_seqlens=cu, loss_agg_mode=agg,
              ref_logprobs=ref, beta=beta)
    results = []
    for fn in (mk.policy_loss_from_logprobs, R.policy_loss_from_logprobs):
        x = logp.clone().requires_grad_()
        out = fn(x, old, adv, mask, **kw)
        out.loss.backward()
        results.append((out, x.grad))
    (out, grad), (want, want_grad) = results
    tol = TOL[torch.float64]
    assert_close(out.loss, want.loss, *tol, "loss")
    assert_close(grad, want_grad, *tol, "grad")
    assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))
    assert out.metrics.keys() == want.metrics.keys()
    for k in want.metrics:
        assert_close(out.metrics[k], want.metrics[k], 2e-6, 1e-6, f"metric {k}", floor=1.0)  # metrics are fp32


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", ["mhpo", "dapo_dual_delta", "sapo"])
def test_token_modes_epilogue_vs_from_logprobs(backend, mode):
    """The kernel epilogue and the torch surrogate of policy_loss_from_logprobs agree (same gradient w.r.t. logits)."""
    logits, ids, old, adv, mask, ref, _ = case_for("B3T13", 127, torch.float32, seed=11, backend=backend,
                                                   ratio_spread=1.0)
    cfg, level = MODES[mode]
    want, want_grad = run(backend, (logits, ids, old, adv, mask, ref, None), mode=mode, beta=0.1,
                          return_entropy=False)
    z = logits.clone().requires_grad_()
    logp = mk.token_logprobs(z, ids, backend=backend)
    out = mk.policy_loss_from_logprobs(logp, old, adv, mask * (ids != -100), ratio_control=cfg, ref_logprobs=ref,
                                       beta=0.1)
    g = torch.Generator().manual_seed(0)
    (out.loss * (1 + torch.rand((), generator=g))).backward()
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
    assert_close(z.grad, want_grad, *TOL[torch.float32], "grad")


# ---------------------------------------------------------------------------- packed vs padded

LENGTHS = [6, 0, 11, 3, 11]  # an empty sequence; T_max = 11


def padded_and_packed(V, seed, backend):
    """The same data as [B, T_max, V] (padded to the longest sequence) and packed [N, V] + cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 2] = -100
    valid = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    mask = (valid & (torch.rand(B, T, generator=g) > 0.2)).float()
    mask[3] = 0  # a fully masked (non-empty) sequence
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    old = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).clone()
    old[~valid], adv[~valid] = float("inf"), float("nan")  # garbage in the padding
    cu = torch.tensor([0] + list(itertools.accumulate(LENGTHS)), dtype=torch.int64)
    pack = lambda t: t[valid]
    dev = lambda ts: tuple(t.to(device_for(backend)) for t in ts)
    padded = dev((logits, ids, old, adv, mask, ref))
    packed = dev((pack(logits), pack(ids), pack(old), pack(adv), pack(mask), pack(ref), cu))
    return padded, packed, valid.to(device_for(backend))


PACK_GRID = [pytest.param(m, a, i, id=f"{m}-{a}-seed{i}")
             for i, (m, a) in enumerate(itertools.product(["mhpo", "dapo_dual_delta", "gspo_wide", "mhpo_seq"],
                                                          LOSS_AGG_MODES))]


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("mode,agg,seed", PACK_GRID)
def test_packed_equals_padded(backend, mode, agg, seed):
    padded, packed, valid = padded_and_packed(V=67, seed=seed, backend=backend)
    cfg, level = MODES[mode]
    g = torch.Generator().manual_seed(1)
    ent_w = torch.randn(valid.shape, generator=g).to(valid.device) * valid  # the same upstream entropy gradient
    results = []
    for (logits, ids, old, adv, mask, ref), cu_, w in ((padded, None, ent_w), (packed[:6], packed[6], ent_w[valid])):
        z = logits.clone().requires_grad_()
        out = mk.policy_loss(z, ids, old, adv, mask, ratio_control=cfg, importance_sampling_level=level,
                             cu_seqlens=cu_, loss_agg_mode=agg, ref_logprobs=ref, beta=0.05, temperature=0.9,
                             return_entropy=True, backend=backend)
        (out.loss * 1.5 + (out.entropy * w).sum()).backward()
        results.append((out, z.grad))
    (out_p, grad_p), (out_k, grad_k) = results
    assert_close(out_k.loss, out_p.loss, *SCALAR_TOL, "loss")
    assert_close(grad_k, grad_p[valid], *TOL[torch.float32], "grad")
    assert torch.equal(grad_p[~valid], torch.zeros_like(grad_p[~valid]))
    assert_close(out_k.entropy, out_p.entropy[valid], *SCALAR_TOL, "entropy")
    for k in out_p.metrics:
        assert_close(out_k.metrics[k], out_p.metrics[k], 1e-5, 1e-5, f"metric {k}", floor=1e-2)


@pytest.mark.parametrize("mode", list(MODES))
def test_packed_equals_padded_from_logprobs(mode):
    padded, packed, valid = padded_and_packed(V=13, seed=3, backend=FROM_LOGPROBS)
    cfg, level = MODES[mode]
    lp = torch.log_softmax(padded[0].double(), -1).gather(-1, padded[1].clamp(min=0)[..., None])[..., 0]
    for agg in LOSS_AGG_MODES:
        kw = dict(ratio_control=cfg, importance_sampling_level=level, loss_agg_mode=agg, beta=0.05)
        x_p = lp.clone().requires_grad_()
        out_p = mk.policy_loss_from_logprobs(x_p, *padded[2:5], ref_logprobs=padded[5], **kw)
        out_p.loss.backward()
        x_k = lp[valid].clone().requires_grad_()
        out_k = mk.policy_loss_from_logprobs(x_k, *packed[2:5], ref_logprobs=packed[5], cu_seqlens=packed[6], **kw)
        out_k.loss.backward()
        assert_close(out_k.loss, out_p.loss, 1e-12, 1e-10, f"{agg} loss")
        assert_close(x_k.grad, x_p.grad[valid], 1e-12, 1e-10, f"{agg} grad")


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("mode", ["mhpo", "gspo"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_packed_empty_and_all_masked(backend, mode, agg):
    cfg, level = MODES[mode]
    dev = device_for(backend)
    for cu in ([0], [0, 0, 0]):  # no sequences; only empty sequences
        logits = torch.randn(0, 17, device=dev, requires_grad=True)
        z = torch.zeros(0, device=dev)
        out = mk.policy_loss(logits, z.long(), z, z, ratio_control=cfg, cu_seqlens=torch.tensor(cu, device=dev),
                             loss_agg_mode=agg, backend=backend, return_entropy=True)
        out.loss.backward()
        assert out.loss.item() == 0.0 and logits.grad.shape == logits.shape
    logits, ids, old, adv, mask, ref, cu = case_for("packed37", 17, torch.float32, seed=6, backend=backend)
    out, grad = run(backend, (logits, ids, old, adv, torch.zeros_like(mask), ref, cu), mode=mode,
                    loss_agg_mode=agg, beta=0.1, return_entropy=False)
    assert out.loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v) for v in out.metrics.values())


# ---------------------------------------------------------------------------- token_logprobs

TLP_GRID = [("fp32", 1031, (37,)), ("bf16", 127, (3, 13)), ("fp16", 4099, (5,)), ("fp32", 1, (2, 3)),
            ("bf16", 2, (7,))]


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("dtype,V,shape", TLP_GRID, ids=[f"{d}-V{v}-{'x'.join(map(str, s))}" for d, v, s in TLP_GRID])
@pytest.mark.parametrize("return_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_token_logprobs(backend, dtype, V, shape, return_entropy):
    """Against log_softmax(...).gather and -sum(p log p) in float64, in value and gradient."""
    dtype = DTYPES[dtype]
    logits, ids, *_ = make_case(shape, V, dtype, backend=backend, seed=V, ref=False)
    T = 0.8
    z = logits.clone().requires_grad_()
    got = mk.token_logprobs(z, ids, temperature=T, return_entropy=return_entropy, backend=backend)
    logp, ent = got if return_entropy else (got, None)
    assert isinstance(got, tuple) == return_entropy
    z64 = logits.double().requires_grad_()
    lsm = F.log_softmax(z64 / T, -1)
    valid = ids != -100
    want = torch.where(valid, lsm.gather(-1, ids.clamp(min=0)[..., None])[..., 0], 0.0)
    want_ent = torch.where(valid, -(lsm.exp() * lsm).sum(-1), 0.0)
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(shape, generator=g).to(ids.device), torch.randn(shape, generator=g).to(ids.device)
    assert logp.shape == ids.shape and logp.dtype == torch.float32
    assert_close(logp, want, *SCALAR_TOL, "logprobs")
    total, want_total = (logp * g_logp).sum(), (want * g_logp).sum()
    if return_entropy:
        assert_close(ent, want_ent, *SCALAR_TOL, "entropy")
        total, want_total = total + (ent * g_ent).sum(), want_total + (want_ent * g_ent).sum()
    total.backward()
    want_total.backward()
    assert z.grad.dtype == dtype
    assert_close(z.grad, z64.grad, *TOL[dtype], "grad")
    assert torch.equal(z.grad[~valid], torch.zeros_like(z.grad[~valid]))


@pytest.mark.parametrize("backend", FUSED + ["torch"])
def test_token_logprobs_sum_backward(backend):
    """logp.sum().backward() hands the backward an expanded (stride-0) gradient: one-hot minus softmax."""
    logits, ids, *_ = make_case((2, 5), 11, torch.float32, backend=backend, seed=3, ref=False, ignore_frac=0.0)
    z = logits.clone().requires_grad_()
    mk.token_logprobs(z, ids, backend=backend).sum().backward()
    want = F.one_hot(ids, 11).double() - torch.softmax(logits.double(), -1)
    assert_close(z.grad, want, *TOL[torch.float32], "grad")


@pytest.mark.parametrize("backend", FUSED)
def test_token_logprobs_matches_policy_loss_outputs(backend):
    logits, ids, old, adv, mask, ref, cu = case_for("packed37", 131, torch.bfloat16, seed=2, backend=backend)
    logp, ent = mk.token_logprobs(logits, ids, return_entropy=True, backend=backend)
    out = mk.policy_loss(logits, ids, old, adv, mask, ratio_control=mk.GSPOConfig(), cu_seqlens=cu,
                         return_entropy=True, backend=backend)
    assert torch.equal(logp, out.logprobs) and torch.equal(ent, out.entropy)


@pytest.mark.parametrize("backend", FUSED)
def test_many_tokens_no_grid_limit(backend):
    """More rows than 65,535 (the CUDA limit of grid axes y / z; ours use axis x): every row is
    computed, the rows past 65,535 checked against the reference in value and gradient."""
    if backend == "triton" and device_for(backend).type == "cpu":
        pytest.skip("Triton's interpreter is too slow for 70k rows")
    N, V, tail = 70_001, 7, slice(65_535, None)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=g).to(device_for(backend))
    ids = torch.randint(0, V, (N,), generator=g).to(logits.device)
    logp, ent = mk.token_logprobs(logits, ids, return_entropy=True, backend=backend)
    lsm = torch.log_softmax(logits.double(), -1)
    assert_close(logp[tail], lsm.gather(-1, ids[:, None])[tail, 0], *SCALAR_TOL, "logprobs past row 65,535")
    assert_close(ent[tail], -(lsm.exp() * lsm).sum(-1)[tail], *SCALAR_TOL, "entropy past row 65,535")
    # sequence ratios e^0.01 inside GSPO's clip range (its default eps, 3e-4 / 4e-4, would clip
    # them: a zero gradient by design), so every row has a gradient to check
    cu = torch.tensor([0, 1, 40_000, N], device=logits.device)
    old = lsm.gather(-1, ids[:, None])[:, 0].float() - 0.01
    grads = []
    for b, x in ((backend, logits), ("reference", logits.double())):
        z = x.clone().requires_grad_()
        mk.policy_loss(z, ids, old, torch.ones(N, device=logits.device), cu_seqlens=cu, backend=b,
                       ratio_control=mk.GSPOConfig(eps_low=0.2, eps_high=0.28),
                       loss_agg_mode="seq-mean-token-mean").loss.backward()
        grads.append(z.grad)
    got, want = grads
    assert (want[tail] != 0).any(-1).all(), "the case must leave a gradient on every row"
    assert_close(got[tail], want[tail], *TOL[torch.float32], "grad past row 65,535")
    assert_close(got, want, *TOL[torch.float32], "grad")


# ---------------------------------------------------------------------------- ablations

def per_token(cfg, delta, adv, level="token"):
    """Per-token loss and dL/dlogp through policy_loss_from_logprobs (one sequence, seq-mean-token-sum = sum)."""
    logp = (delta - 3.0).clone().requires_grad_()
    out = mk.policy_loss_from_logprobs(logp, torch.full_like(delta, -3.0), adv, ratio_control=cfg,
                                       importance_sampling_level=level, loss_agg_mode="seq-mean-token-sum")
    out.loss.backward()
    return out, logp.grad


def test_ablation_definitions():
    delta = torch.linspace(-4, 4, 41, dtype=torch.float64)
    adv = torch.linspace(-1, 1.5, 41, dtype=torch.float64)
    c = 1.5
    sech2 = 1 / torch.cosh(delta / c) ** 2
    # LFM only: zeta = 0
    out, grad = per_token(mk.MHPOConfig(use_dhp=False), delta, adv)
    psi = c * torch.tanh(delta / c)
    torch.testing.assert_close(out.loss, (-torch.exp(psi) * adv).sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, -adv * torch.exp(psi) * sech2, rtol=1e-10, atol=1e-12)
    assert out.metrics["zeta_mean"].item() == 0.0 and out.metrics["survival_mean"].item() == 1.0
    # DHP only: psi = delta, zeta on delta
    d = mk.MHPOConfig()
    zeta = (F.softplus(delta) / d.lam_pos) ** d.k_pos + (F.softplus(-delta) / d.lam_neg) ** d.k_neg
    out, grad = per_token(mk.MHPOConfig(use_lfm=False), delta, adv)
    torch.testing.assert_close(out.loss, (-torch.exp(delta - zeta) * adv).sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, -adv * torch.exp(delta - zeta), rtol=1e-10, atol=1e-12)
    assert out.metrics["psi_mean"].item() == pytest.approx(delta.mean().item(), abs=1e-6)  # metrics are fp32
    # symmetric DHP: zeta(psi) = zeta(-psi)
    sym = mk.MHPOConfig(k_neg=1.5, lam_neg=1.0)
    _, g_pos = per_token(sym, delta, torch.ones_like(delta))
    _, g_neg = per_token(sym, -delta, torch.ones_like(delta))
    torch.testing.assert_close(g_pos * torch.exp(-psi), g_neg * torch.exp(psi), rtol=1e-10, atol=1e-12)
    # full MHPO: exp(psi - sg(zeta(psi))), gradient exp(psi - zeta) sech^2
    zeta = (F.softplus(psi) / d.lam_pos) ** d.k_pos + (F.softplus(-psi) / d.lam_neg) ** d.k_neg
    out, grad = per_token(d, delta, adv)
    torch.testing.assert_close(grad, -adv * torch.exp(psi - zeta) * sech2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("ablation", ["lfm_only", "dhp_only"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ablations_through_policy_loss(backend, ablation, level):
    """The switches through the logits path, against the closed form on log_softmax log-probs."""
    cfg = mk.MHPOConfig(use_dhp=False) if ablation == "lfm_only" else mk.MHPOConfig(use_lfm=False)
    logits, ids, old, adv, mask, _, _ = case_for("B3T13", 31, torch.float32, seed=9, backend=backend, ignore_frac=0.0,
                                                mask_frac=0.0, masked_seq=False)
    out = mk.policy_loss(logits, ids, old, adv, mask, ratio_control=cfg, importance_sampling_level=level,
                         loss_agg_mode="seq-mean-token-mean", backend=backend)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
    delta = (logp - old.double()).cpu()
    if level == "sequence":
        delta = delta.mean(-1, keepdim=True).expand_as(delta)
    if ablation == "lfm_only":
        L = -torch.exp(1.5 * torch.tanh(delta / 1.5))
    else:
        L = -torch.exp(delta - ((F.softplus(delta) / 1.0) ** 1.5 + (F.softplus(-delta) / 0.8) ** 2.0))
    want = (L * adv.double().cpu()).mean()
    assert_close(out.loss, want, *SCALAR_TOL, "loss")


# ---------------------------------------------------------------------------- peer parity

def trl_grpo_loss(logp, old, adv, mask, eps_low, eps_high, loss_type, delta=None, level="token"):
    """TRL GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py, v0.20+), transcribed:

        log_ratio = per_token_logps - old_per_token_logps
        log_importance_weights = log_ratio                                  # "token"
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # "sequence" (GSPO)
        coef_1 = exp(log_importance_weights); coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None: coef_1 = clamp(coef_1, max=delta)             # two-sided clipping
        per_token_loss = -min(coef_1 * A, coef_2 * A)
        grpo:    ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        bnpo:    (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        dr_grpo: (per_token_loss * mask).sum() / (B * max_completion_length)
    """
    log_ratio = logp - old
    if level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    coef_1 = torch.exp(liw)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (logp.shape[0] * logp.shape[1])


def verl_vanilla_loss(logp, old, adv, mask, clip_low, clip_high, clip_ratio_c):
    """verl compute_policy_loss_vanilla (verl/trainer/ppo/core_algos.py), token-mean, transcribed:

        ratio = exp(clamp(log_prob - old_log_prob, -20, 20))
        pg_losses1 = -A * ratio;  pg_losses2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)
        clip_pg_losses1 = maximum(pg_losses1, pg_losses2)
        pg_clipfrac = masked_mean(gt(pg_losses2, pg_losses1))
        pg_losses3 = -A * clip_ratio_c;  clip_pg_losses2 = min(pg_losses3, clip_pg_losses1)
        pg_clipfrac_lower = masked_mean(gt(clip_pg_losses1, pg_losses3) * (A < 0))
        pg_losses = where(A < 0, clip_pg_losses2, clip_pg_losses1)
    """
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -adv * clip_ratio_c
    clip2 = torch.min(pg3, clip1)
    lower = ((clip1 > pg3) & (adv < 0)).double()
    pg = torch.where(adv < 0, clip2, clip1)
    return (pg * mask).sum() / mask.sum(), (lower * mask).sum() / mask.sum()


def peer_case(seed, backend):
    """float64 logits, ids, log-probs, old, adv, mask on device_for(backend)."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 4, 9, 23
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor([9, 4, 7, 1])[:, None]).double()  # no empty completion
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    old = logp + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)[:, None].expand(B, T)
    return tuple(t.to(device_for(backend)) for t in (logits, ids, logp, old, adv, mask))


PEERS = {  # name -> (our config, level, our loss_agg_mode, TRL loss_type, TRL kwargs)
    "grpo": (mk.ClipConfig(0.2, 0.28), "token", "seq-mean-token-mean", "grpo", {}),
    "bnpo_dapo": (mk.ClipConfig(0.2, 0.28), "token", "token-mean", "bnpo", {}),
    "dr_grpo": (mk.ClipConfig(0.2, 0.28), "token", "seq-mean-token-sum-norm", "dr_grpo", {}),
    "two_sided_delta": (mk.ClipConfig(0.2, 0.28, delta=1.5), "token", "token-mean", "bnpo", dict(delta=1.5)),
    "gspo_trl": (mk.GSPOConfig(0.05, 0.08), "sequence", "seq-mean-token-mean", "grpo", dict(level="sequence")),
    "gspo_trl_clip": (mk.ClipConfig(0.05, 0.08), "sequence", "seq-mean-token-mean", "grpo", dict(level="sequence")),
}


@pytest.mark.parametrize("path", FUSED + [FROM_LOGPROBS])
@pytest.mark.parametrize("peer", list(PEERS))
def test_parity_with_trl(path, peer):
    cfg, level, agg, loss_type, extra = PEERS[peer]
    logits, ids, logp, old, adv, mask = peer_case(seed=len(peer), backend=path)
    eps = (cfg.eps_low, cfg.eps_high)
    if path == FROM_LOGPROBS:
        x = logp.clone().requires_grad_()
        want_x = logp.clone().requires_grad_()
        out = mk.policy_loss_from_logprobs(x, old, adv[:, 0], mask, ratio_control=cfg, importance_sampling_level=level,
                                           loss_agg_mode=agg)
        tol = TOL[torch.float64]
    else:
        x = logits.float().requires_grad_()
        want_x = logits.float().double().requires_grad_()
        out = mk.policy_loss(x, ids, old.float(), adv[:, 0].float(), mask, ratio_control=cfg,
                             importance_sampling_level=level, loss_agg_mode=agg, backend=path)
        tol = TOL[torch.float32]
    want_logp = want_x if path == FROM_LOGPROBS else \
        torch.log_softmax(want_x, -1).gather(-1, ids[..., None])[..., 0]
    want = trl_grpo_loss(want_logp, old, adv, mask, *eps, loss_type, **extra)
    out.loss.backward()
    want.backward()
    assert_close(out.loss, want, *(tol if path == FROM_LOGPROBS else SCALAR_TOL), "loss")
    assert_close(x.grad, want_x.grad, *tol, "grad")


@pytest.mark.parametrize("path", FUSED + [FROM_LOGPROBS])
def test_parity_with_verl_dual_clip(path):
    logits, ids, logp, old, adv, mask = peer_case(seed=5, backend=path)
    old = logp + 2.5 * (old - logp)  # wide ratios: dual-clip and both clip edges are hit
    cfg = mk.ClipConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    if path == FROM_LOGPROBS:
        x, want_x = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        out = mk.policy_loss_from_logprobs(x, old, adv, mask, ratio_control=cfg)
        want_logp, tol = want_x, TOL[torch.float64]
    else:
        x, want_x = logits.float().requires_grad_(), logits.float().double().requires_grad_()
        out = mk.policy_loss(x, ids, old.float(), adv.float(), mask, ratio_control=cfg, backend=path)
        want_logp, tol = torch.log_softmax(want_x, -1).gather(-1, ids[..., None])[..., 0], TOL[torch.float32]
    want, lower = verl_vanilla_loss(want_logp, old, adv, mask, 0.2, 0.28, 3.0)
    assert 0 < lower.item() < 1, "the case must exercise the dual clip"
    out.loss.backward()
    want.backward()
    assert_close(out.loss, want, *SCALAR_TOL, "loss")
    assert_close(x.grad, want_x.grad, *tol, "grad")
    assert_close(out.metrics["dual_clipfrac"], lower, 1e-6, 1e-6, "dual_clipfrac")


# ---------------------------------------------------------------------------- metrics

def test_metrics_per_mode():
    r = torch.tensor([0.5, 0.79, 0.9, 1.0, 1.2, 1.3, 5.0, 2.0], dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    logp = torch.log(r) - 2.0
    old = torch.full_like(r, -2.0)
    clip = mk.policy_loss_from_logprobs(logp, old, adv, ratio_control=mk.ClipConfig(0.2, 0.28, dual_clip_c=3.0)).metrics
    # TRL's clip_ratio convention: the clip is active only where it cuts the gradient
    assert clip["clipfrac_low"].item() == pytest.approx(1 / 8)  # r = 0.5 with A < 0 (not r = 0.79, A > 0)
    assert clip["clipfrac_high"].item() == pytest.approx(2 / 8)  # r = 1.3, 2.0 with A > 0 (not r = 5, A < 0)
    assert clip["clipfrac"].item() == pytest.approx(3 / 8)
    assert clip["dual_clipfrac"].item() == pytest.approx(1 / 8)  # r = 5 > c = 3 with A < 0
    assert clip["ratio_max"].item() == pytest.approx(5.0) and clip["ratio_min"].item() == pytest.approx(0.5)
    mhpo = mk.policy_loss_from_logprobs(logp, old, adv).metrics
    assert {"kl_old", "ratio_max", "ratio_min", "psi_mean", "zeta_mean", "survival_mean",
            "low_survival_frac"} == set(mhpo)
    assert mhpo["kl_old"].item() == pytest.approx(-torch.log(r).mean().item())
    # GSPO: the ratio metrics are over the sequence ratio, each token counted
    seq = mk.policy_loss_from_logprobs(logp.reshape(2, 4), old.reshape(2, 4), adv.reshape(2, 4),
                                       ratio_control=mk.GSPOConfig()).metrics
    s = torch.log(r).reshape(2, 4).mean(-1).exp()
    assert seq["ratio_max"].item() == pytest.approx(s.max().item())
    s_tok, a = s[:, None].expand(2, 4), adv.reshape(2, 4)
    active_clip = ((s_tok < 1 - 3e-4) & (a < 0)) | ((s_tok > 1 + 4e-4) & (a > 0))
    assert seq["clipfrac"].item() == pytest.approx(active_clip.double().mean().item())
    assert set(seq) == {"kl_old", "ratio_max", "ratio_min", "clipfrac_low", "clipfrac_high", "clipfrac"}


def metrics_by_formula(cfg, level, logp, old, adv, active, entropy=None, ref=None):
    """Every metric a call reports, written out in float64 from docs/mhpo.md and the docstring of
    reference.policy_metrics (TRL's clip_ratio, verl's pg_clipfrac_lower), independent of the package."""
    logp, old, adv, m = logp.double().cpu(), old.double().cpu(), adv.double().cpu(), active.cpu()
    delta = torch.where(m, logp - old, 0.0)
    if level == "sequence":  # each token carries its sequence's mean log-ratio
        delta = torch.where(m, (delta.sum(-1) / m.sum(-1).clamp(min=1))[:, None], 0.0)
    mean = lambda x: x[m].double().mean() if m.any() else torch.zeros((), dtype=torch.float64)
    d = delta[m]
    want = {"kl_old": mean(-delta), "ratio_max": d.max().exp(), "ratio_min": d.min().exp()}
    if isinstance(cfg, mk.MHPOConfig):
        psi = cfg.c * torch.tanh(delta / cfg.c) if cfg.use_lfm else delta
        zeta = ((F.softplus(psi) / cfg.lam_pos) ** cfg.k_pos + (F.softplus(-psi) / cfg.lam_neg) ** cfg.k_neg
                if cfg.use_dhp else torch.zeros_like(psi))
        want.update(psi_mean=mean(psi), zeta_mean=mean(zeta), survival_mean=mean(torch.exp(-zeta)),
                    low_survival_frac=mean(torch.exp(-zeta) < 0.5))
    elif isinstance(cfg, (mk.ClipConfig, mk.GSPOConfig)):
        r = delta.exp()
        low, high = (r < 1 - cfg.eps_low) & (adv < 0), (r > 1 + cfg.eps_high) & (adv > 0)
        want.update(clipfrac_low=mean(low), clipfrac_high=mean(high), clipfrac=mean(low | high))
        if isinstance(cfg, mk.ClipConfig) and cfg.dual_clip_c is not None:
            r1 = r if cfg.delta is None else r.clamp(max=cfg.delta)
            ppo = -torch.minimum(r1 * adv, r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
            want["dual_clipfrac"] = mean((adv < 0) & (ppo > -cfg.dual_clip_c * adv))
    if entropy is not None:
        want["entropy_mean"] = mean(entropy.double().cpu())
    if ref is not None:
        k = ref.double().cpu() - logp
        want["kl_ref"] = mean(torch.expm1(k) - k)
    return want


@pytest.mark.parametrize("path", FUSED + ["torch", "reference", FROM_LOGPROBS])
@pytest.mark.parametrize("mode", list(MODES))
def test_metrics_by_formula(path, mode):
    """Every metric of every mode against its formula in float64, on every path."""
    cfg, level = MODES[mode]
    level = level or "sequence"
    logits, ids, old, adv, mask, ref, _ = case_for("B3T13", 31, torch.float32, seed=12, backend=path,
                                                   ratio_spread=1.5)  # wide ratios: clip edges and the dual clip hit
    active = (mask != 0) & (ids != -100)
    lsm = torch.log_softmax(logits.double(), -1)
    logp = torch.where(active, lsm.gather(-1, ids.clamp(min=0)[..., None])[..., 0], float("-inf"))
    kw = dict(ratio_control=cfg, importance_sampling_level=level, ref_logprobs=ref, beta=0.1)
    if path == FROM_LOGPROBS:
        out = mk.policy_loss_from_logprobs(logp, old, adv, active.double(), **kw)
        entropy = None
    else:
        out = mk.policy_loss(logits, ids, old, adv, mask, return_entropy=True, backend=path, **kw)
        entropy = -(lsm.exp() * lsm).sum(-1)
    want = metrics_by_formula(cfg, level, logp, old, adv, active, entropy, ref)
    assert out.metrics.keys() == want.keys()
    if level == "token":  # (3 sequences: their 2 active ratios may all sit inside the clip range)
        assert all(want[k] > 0 for k in ("clipfrac", "dual_clipfrac") if k in want), "the case must hit the clips"
    dtype = torch.float64 if path == FROM_LOGPROBS else torch.float32  # from float64 log-probs: float64
    for k in want:
        assert out.metrics[k].dtype == dtype, k
        assert_close(out.metrics[k], want[k], *TOL["metric" if dtype == torch.float32 else dtype], f"metric {k}",
                     floor=1e-2)


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("mode", ["mhpo", "gspo"])
def test_kl_and_entropy_metrics_when_computed(backend, mode):
    logits, ids, old, adv, mask, ref, cu = case_for("packed37", 17, torch.float32, seed=4, backend=backend)
    cfg, level = MODES[mode]
    base = mk.policy_loss(logits, ids, old, adv, mask, ratio_control=cfg, cu_seqlens=cu, backend=backend).metrics
    assert "kl_ref" not in base and "entropy_mean" not in base
    out = mk.policy_loss(logits, ids, old, adv, mask, ratio_control=cfg, cu_seqlens=cu, backend=backend,
                         ref_logprobs=ref, beta=0.1, return_entropy=True)
    active = (mask != 0) & (ids != -100)
    assert_close(out.metrics["entropy_mean"], out.entropy[active].mean(), 1e-6, 1e-6, "entropy_mean")
    d = (ref - out.logprobs)[active].double()
    assert_close(out.metrics["kl_ref"], (d.exp() - d - 1).mean(), 1e-5, 1e-5, "kl_ref")


# ---------------------------------------------------------------------------- API

@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_mhpo_loss_is_policy_loss_with_mhpo(backend, agg):
    logits, ids, old, adv, mask, ref, _ = case_for("B3T13", 127, torch.bfloat16, seed=8, backend=backend)
    results = []
    for fn in (mk.mhpo_loss, mk.policy_loss):
        z = logits.clone().requires_grad_()
        out = fn(z, ids, old, adv, mask, ref_logprobs=ref, beta=0.1, loss_agg_mode=agg, return_entropy=True,
                 backend=backend)
        (out.loss + 0.1 * out.entropy.sum()).backward()
        results.append((out, z.grad))
    (a, ga), (b, gb) = results
    assert_close(b.loss, a.loss, 1e-7, 1e-7, "loss")
    assert_close(gb, ga, *TOL[torch.bfloat16], "grad")
    assert torch.equal(a.logprobs, b.logprobs) and a.metrics.keys() == b.metrics.keys()


def test_level_defaults():
    from mhpo_kernels.config import resolve_ratio_control
    assert resolve_ratio_control(None, None) == (mk.MHPOConfig(), "token")
    assert resolve_ratio_control(mk.GSPOConfig(), None)[1] == "sequence"
    assert resolve_ratio_control(mk.SAPOConfig(), "sequence")[1] == "sequence"
    for bad in [dict(eps_low=1.0), dict(eps_high=0.0), dict(eps_low=float("nan"))]:
        with pytest.raises(ValueError):
            mk.GSPOConfig(**bad)


def packed_args(backend):
    logits, ids, old, adv, mask, _, cu = case_for("packed37", 11, torch.float32, seed=0, backend=backend)
    return dict(logits=logits, target_ids=ids, old_logprobs=old, advantages=adv, mask=mask, cu_seqlens=cu)


def cu(values, **kw):
    return lambda a: a.update(cu_seqlens=torch.tensor(values, **{"device": a["logits"].device, **kw}))


# the offsets themselves are checked by the finishing kernel, read after the launches (one host sync)
BAD_LAYOUT = {
    "cu_start": (cu([1, 20, 37]), ValueError, r"cu_seqlens\[0\] must be 0, got 1"),
    "cu_end": (cu([0, 20, 36]), ValueError, r"cu_seqlens\[-1\] must be the token count N=37, got 36"),
    "cu_decreasing": (cu([0, 20, 10, 37]), ValueError, r"non-decreasing: cu_seqlens\[2\]=10 < cu_seqlens\[1\]=20"),
}
BAD = {
    "cu_float": (cu([0.0, 37.0]), TypeError, "cu_seqlens must be int32 or int64"),
    "cu_2d": (cu([[0, 37]]), ValueError, r"cu_seqlens must be a 1-D \[S\+1\]"),
    "cu_empty": (cu([], dtype=torch.int64), ValueError, "cu_seqlens must be a 1-D"),
    "cu_list": (lambda a: a.update(cu_seqlens=[0, 37]), TypeError, "cu_seqlens must be a torch.Tensor"),
    "cu_device": (lambda a: a.update(cu_seqlens=torch.tensor([0, 37], device="meta")), ValueError,
                  "cu_seqlens is on meta"),
    "cu_3d_logits": (lambda a: a.update(logits=a["logits"][None], target_ids=a["target_ids"][None],
                                        old_logprobs=a["old_logprobs"][None], advantages=a["advantages"][None],
                                        mask=a["mask"][None]), ValueError, r"cu_seqlens needs packed \[N, V\]"),
    "level": (lambda a: a.update(importance_sampling_level="seq"), ValueError, "importance_sampling_level must be"),
    "gspo_token": (lambda a: a.update(ratio_control=mk.GSPOConfig(), importance_sampling_level="token"), ValueError,
                   "GSPOConfig is sequence-level"),
    "ratio_control": (lambda a: a.update(ratio_control="clip"), TypeError, "ratio_control must be one of"),
    "adv_shape": (lambda a: a.update(advantages=a["advantages"][:5]), ValueError, "advantages has shape"),
}


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.wrong_device) if k == "cu_device" else k
                                  for k in BAD])
def test_bad_inputs(backend, case, no_launch):
    a = packed_args(backend)
    edit, exc, msg = BAD[case]
    edit(a)
    with pytest.raises(exc, match=msg):
        mk.policy_loss(**a, backend=backend)


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("case", list(BAD_LAYOUT))
def test_bad_layout(backend, case):
    a = packed_args(backend)
    edit, exc, msg = BAD_LAYOUT[case]
    edit(a)
    logits = a.pop("logits").requires_grad_()
    with pytest.raises(exc, match=msg):
        mk.policy_loss(logits, **a, backend=backend)
    assert logits.grad is None


@pytest.mark.parametrize("backend", FUSED + ["torch"])
def test_token_logprobs_bad_ids(backend):
    a = packed_args(backend)
    logits, ids = a["logits"], a["target_ids"]
    bad = ids.clone()
    bad[3] = 11
    with pytest.raises(ValueError, match=r"target_ids\[3\] \(flattened\) = 11 is outside \[0, 11\)"):
        mk.token_logprobs(logits, bad, backend=backend)


@pytest.mark.parametrize("backend", FUSED + ["torch"])
def test_token_logprobs_bad_inputs(backend, no_launch):
    a = packed_args(backend)
    logits, ids = a["logits"], a["target_ids"]
    with pytest.raises(ValueError, match="target_ids has shape"):
        mk.token_logprobs(logits, ids[:5], backend=backend)
    with pytest.raises(ValueError, match="ignore_index=3 is a valid token id"):
        mk.token_logprobs(logits, ids, ignore_index=3, backend=backend)
    with pytest.raises(ValueError, match="temperature must be"):
        mk.token_logprobs(logits, ids, temperature=-1.0, backend=backend)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        mk.token_logprobs(logits.tolist(), ids, backend=backend)
    if backend != "torch":
        with pytest.raises(TypeError, match="use backend='torch' for float64"):
            mk.token_logprobs(logits.double(), ids, backend=backend)


def test_from_logprobs_bad_inputs():
    logp, old, adv, mask, ref, cu_ = logprob_case("B3T13", seed=0)
    call = mk.policy_loss_from_logprobs
    with pytest.raises(TypeError, match="logprobs must have a float dtype"):
        call(logp.long(), old, adv, mask)
    with pytest.raises(ValueError, match=r"logprobs must be \[N\] or \[B, T\]"):
        call(logp[None], old, adv, mask)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        call(logp, old[:, :4], adv, mask)
    with pytest.raises(ValueError, match=r"cu_seqlens needs packed \[N\] log-probs"):
        call(logp, old, adv, mask, cu_seqlens=torch.tensor([0, 39], device=logp.device))
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        call(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        call(logp, old, adv, mask, loss_agg_mode="sum")
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must be the token count N=39"):
        call(logp.reshape(-1), old.reshape(-1), adv.reshape(-1), mask.reshape(-1),
             cu_seqlens=torch.tensor([0, 38], device=logp.device))


@pytest.fixture
def no_poison():
    torch.use_deterministic_algorithms(False)  # compile runs with torch's defaults


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED[:1])
def test_compile_fullgraph_sequence_level_packed(backend, no_poison):
    torch._dynamo.reset()
    logits, ids, old, adv, mask, ref, cu_ = case_for("packed37", 37, torch.float32, seed=1, backend=backend)

    def f(z):
        out = mk.policy_loss(z, ids, old, adv, mask, ratio_control=mk.MHPOConfig(),
                             importance_sampling_level="sequence", cu_seqlens=cu_, ref_logprobs=ref, beta=0.05,
                             return_entropy=True, backend=backend,
                             loss_agg_mode="seq-mean-token-sum-norm")
        return out.loss + 0.01 * out.entropy.sum(), out.metrics["survival_mean"]

    assert_compiled_matches_eager(f, logits)


@pytest.mark.parametrize("path", FUSED + [FROM_LOGPROBS])
@pytest.mark.parametrize("r,A", [(3.0, -1.0), (2.5, -1.0)], ids=["dual-clip-tie", "dual-clip-capped"])
def test_clip_gradient_same_on_every_path(path, r, A):
    """Every backend and policy_loss_from_logprobs agree with torch.minimum's tie rule (half the gradient)."""
    V = 5
    cfg = mk.ClipConfig(0.2, 0.28, dual_clip_c=r if r == 3.0 else 2.0)
    dev = device_for(path)
    old = torch.tensor([math.log(1 / V) - math.log(r)], device=dev)
    adv = torch.tensor([A], device=dev)

    def grad(b):
        z = torch.zeros(1, V, device=dev, requires_grad=True)
        if b == FROM_LOGPROBS:
            lp = torch.log_softmax(z, -1)[:, 0]
            mk.policy_loss_from_logprobs(lp, old, adv, ratio_control=cfg).loss.backward()
        else:
            ids = torch.tensor([0], device=dev)
            mk.policy_loss(z, ids, old, adv, ratio_control=cfg, backend=b).loss.backward()
        return z.grad

    assert_close(grad(path), grad("reference"), 1e-5, 1e-5, f"{path} vs reference")
