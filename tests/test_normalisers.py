"""The aggregation's normalisers: ``token-sum``, ``loss_scale_factor``,
``global_batch_size``, ``global_num_tokens``, ``dp_size``, verl 0.9.1's ``agg_loss``.

Every backend's finishing launch against the float64 reference, on every entry point; a
batch split into micro-batches over simulated data-parallel ranks adds up to the whole
batch's loss and gradient; the reference's aggregation against verl's own ``agg_loss``.
"""
import importlib.util

import pytest
import torch
from util import SCALAR_TOL, TOL, assert_close, check_outputs, fused_backends, make_case

import mhpo_kernels as mk
from mhpo_kernels import reference as R
from mhpo_kernels._inputs import LOSS_AGG_MODES

BACKENDS = fused_backends() + ["torch"]
CU = [0, 5, 5, 12, 18]  # packed: 4 sequences, one empty
NORMS = {
    "local": {},
    "global": dict(global_batch_size=7, global_num_tokens=40, dp_size=3),
    "scaled": dict(global_batch_size=5, global_num_tokens=33.5, dp_size=2, loss_scale_factor=11.5),
}


def _case(backend, packed, seed=0):
    shape = (CU[-1],) if packed else (3, 6)
    logits, ids, old, adv, mask, refl = make_case(shape, 17, torch.float32, backend=backend, seed=seed)
    cu = torch.tensor(CU, device=logits.device) if packed else None
    return logits, ids, old, adv, mask, refl, cu


def _reference(logits, ids, old, adv, mask, **kw):
    z = logits.detach().double().requires_grad_()
    want = R.policy_loss(z, ids, old.double(), adv.double(), mask, **kw)
    want.loss.backward()
    return want, z.grad


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("packed", [False, True], ids=["B3T6", "packed"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_normalisers_vs_reference(backend, agg, packed, norm):
    logits, ids, old, adv, mask, refl, cu = _case(backend, packed)
    kw = dict(loss_agg_mode=agg, cu_seqlens=cu, ref_logprobs=refl, beta=0.1, **NORMS[norm])
    z = logits.clone().requires_grad_()
    out = mk.policy_loss(z, ids, old, adv, mask, backend=backend, **kw)
    out.loss.backward()
    want, want_grad = _reference(logits, ids, old, adv, mask, **kw)
    check_outputs(out, z.grad, want, want_grad, torch.float32)
    assert want.loss.abs() > 1e-3  # the case is not trivially 0


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_logprobs_and_fused_linear_normalisers(backend, agg):
    logits, ids, old, adv, mask, refl, cu = _case(backend, True, seed=1)
    mask = _active(ids, mask)  # the log-probs do not know the ignored ids
    kw = dict(loss_agg_mode=agg, cu_seqlens=cu, **NORMS["scaled"])
    logp = mk.token_logprobs(logits, ids, backend=backend).requires_grad_()  # the first call into the package
    got = mk.policy_loss_from_logprobs(logp, old, adv, mask, backend=backend, **kw)
    want, _ = _reference(logits, ids, old, adv, mask, **kw)
    want_lp = R.policy_loss_from_logprobs(logp.detach().double().requires_grad_(), old, adv, mask, **kw)
    assert_close(got.loss, want.loss, *SCALAR_TOL, "from_logprobs loss")
    assert_close(got.loss, want_lp.loss, *SCALAR_TOL, "from_logprobs loss (its reference)")

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(CU[-1], 8, generator=g).to(logits.device)
    weight = torch.randn(17, 8, generator=g).to(logits.device)
    fl = mk.fused_linear_mhpo_loss(hidden, weight, ids, old, adv, mask, backend=backend, **kw)
    want_fl = R.policy_loss(hidden.double() @ weight.double().T, ids, old.double(), adv.double(), mask, **kw)
    assert_close(fl.loss, want_fl.loss, *SCALAR_TOL, "fused_linear loss")


def _active(ids, mask):
    return torch.where(ids == -100, torch.zeros_like(mask), mask)


@pytest.mark.parametrize("packed", [False, True], ids=["B4T6", "packed"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_micro_batches_over_ranks_add_up(backend, agg, packed):
    """k = 2 micro-batches on each of d = 2 simulated ranks, every call given the global counts and
    dp_size: the 4 losses summed and averaged over the ranks (DDP) are the whole batch's loss, and
    the 4 gradients (averaged over ranks) are its gradient."""
    d = 2
    dtype = torch.float64 if backend in ("reference", "torch") else torch.float32
    cu = [0, 4, 10, 10, 15] if packed else None  # sequence 2 empty
    shape = (15,) if packed else (4, 6)
    logits, ids, old, adv, mask, _ = make_case(shape, 13, dtype, backend=backend,
                                               seed=3, masked_seq=not packed)
    m = _active(ids, mask)
    if packed:
        seq_counts = torch.stack([m[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
        pieces = [slice(a, b) for a, b in zip(cu[:-1], cu[1:])]
    else:
        seq_counts = m.sum(-1)
        pieces = [slice(i, i + 1) for i in range(4)]
    kw = dict(loss_agg_mode=agg, backend=backend)
    dev = logits.device
    scale = 6.0 if packed else None
    whole_cu = torch.tensor(cu, device=dev) if packed else None
    z = logits.clone().requires_grad_()
    whole = mk.policy_loss(z, ids, old, adv, mask, cu_seqlens=whole_cu, loss_scale_factor=scale, **kw)
    whole.loss.backward()
    norm = dict(global_num_tokens=float(m.sum()), global_batch_size=int((seq_counts != 0).sum()),
                loss_scale_factor=scale)

    def run(sl, **extra):
        z = logits[sl].clone().requires_grad_()
        n = z.shape[0]
        cu_s = torch.tensor([0, n], device=dev) if packed else None
        out = mk.policy_loss(z, ids[sl], old[sl], adv[sl], mask[sl], cu_seqlens=cu_s, **kw, **extra)
        out.loss.backward()
        return out.loss.detach(), z.grad

    parts = [run(sl, dp_size=d, **norm) for sl in pieces]  # pieces 0, 1 on rank 0; 2, 3 on rank 1
    total = sum(p[0] for p in parts) / d
    grad = torch.cat([p[1] for p in parts]) / d
    tol = TOL[torch.float64] if dtype == torch.float64 else SCALAR_TOL
    assert_close(total, whole.loss.detach(), *tol, f"{agg}: micro-batch losses")
    assert_close(grad, z.grad, *(TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]),
                 f"{agg}: micro-batch gradients")
    assert whole.loss.abs() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_norm_defaults_and_the_old_normaliser(backend):
    """seq-mean-token-sum-norm: the token sum / non-empty sequences / T (verl 0.9.1); the previous
    ``sum / (B * T)`` is ``global_batch_size=B``; packed, T is the longest sequence."""
    logits, ids, old, adv, mask, _, _ = _case(backend, False, seed=4)  # sequence 1 fully masked
    B, T = ids.shape
    kw = dict(backend=backend)
    token_sum = mk.policy_loss(logits, ids, old, adv, mask, loss_agg_mode="token-sum", **kw).loss
    n_seq = int((_active(ids, mask).sum(-1) != 0).sum())
    assert n_seq == B - 1
    norm = mk.policy_loss(logits, ids, old, adv, mask, loss_agg_mode="seq-mean-token-sum-norm", **kw).loss
    assert_close(norm, token_sum / (n_seq * T), *SCALAR_TOL, "verl's default")
    old_norm = mk.policy_loss(logits, ids, old, adv, mask, loss_agg_mode="seq-mean-token-sum-norm",
                              global_batch_size=B, **kw).loss
    assert_close(old_norm, token_sum / (B * T), *SCALAR_TOL, "the previous normaliser")
    packed = [t.reshape(-1) for t in (ids, old, adv, mask)]
    cu = torch.tensor([0, 6, 10, 18], device=logits.device)  # lengths 6, 4, 8: T = 8
    p_sum = mk.policy_loss(logits.reshape(-1, 17), *packed[:3], packed[3], cu_seqlens=cu, loss_agg_mode="token-sum",
                           **kw).loss
    p_norm = mk.policy_loss(logits.reshape(-1, 17), *packed[:3], packed[3], cu_seqlens=cu,
                            loss_agg_mode="seq-mean-token-sum-norm", **kw).loss
    p_active = _active(packed[0], packed[3])
    n_packed = sum(int(p_active[a:b].sum() != 0) for a, b in ((0, 6), (6, 10), (10, 18)))
    assert_close(p_norm, p_sum / (n_packed * 8), *SCALAR_TOL, "packed: the longest sequence")


def test_bad_normalisers():
    logits, ids, old, adv, mask, _, _ = _case("torch", False)
    call = lambda **kw: mk.policy_loss(logits, ids, old, adv, mask, backend="torch", **kw)
    with pytest.raises(ValueError, match="dp_size > 1 needs global_num_tokens"):
        call(dp_size=2)
    with pytest.raises(ValueError, match="dp_size > 1 needs global_batch_size"):
        call(dp_size=2, loss_agg_mode="seq-mean-token-mean", global_num_tokens=5)
    call(dp_size=2, loss_agg_mode="token-sum")  # needs no count
    for kw, what in [(dict(dp_size=0), "dp_size"), (dict(dp_size=1.5), "dp_size"),
                     (dict(loss_scale_factor=0), "loss_scale_factor"),
                     (dict(global_batch_size=-1), "global_batch_size"),
                     (dict(global_num_tokens=float("nan")), "global_num_tokens"),
                     (dict(global_num_tokens=torch.ones(2)), "global_num_tokens"),
                     (dict(loss_agg_mode="token-max"), "loss_agg_mode")]:
        with pytest.raises(ValueError, match=what):
            call(**kw)
        with pytest.raises(ValueError, match=what):
            mk.policy_loss_from_logprobs(old.clamp(max=0).nan_to_num(), old, adv, mask, backend="torch", **kw)
    # a 0-d tensor count is read (verl's batch_num_tokens may be one)
    a = call(global_num_tokens=torch.tensor(40.0)).loss
    assert_close(a, call(global_num_tokens=40).loss, 0, 0, "tensor count")


HAVE_VERL = importlib.util.find_spec("verl") is not None


@pytest.mark.skipif(not HAVE_VERL, reason="verl is not installed (bash .ci/peers.sh installs it)")
@pytest.mark.parametrize("info", ["none", "global", "global+scale"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_reference_aggregate_is_verls_agg_loss(agg, info):
    """The reference's aggregation (every mode, every normaliser, float masks, an empty sequence)
    == verl 0.9.1's own ``core_algos.agg_loss`` on the same matrix."""
    from verl.trainer.ppo.core_algos import agg_loss

    g = torch.Generator().manual_seed(5)
    L = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 7, generator=g, dtype=torch.float64) > 0.3) * (0.5 + torch.rand(4, 7, generator=g))
    mask[2] = 0
    theirs = {"none": {}, "global": dict(dp_size=4, batch_num_tokens=29.0, global_batch_size=9),
              "global+scale": dict(dp_size=2, batch_num_tokens=17.0, global_batch_size=6, loss_scale_factor=11)}[info]
    ours = dict(dp_size=theirs.get("dp_size", 1), global_num_tokens=theirs.get("batch_num_tokens"),
                global_batch_size=theirs.get("global_batch_size"), loss_scale_factor=theirs.get("loss_scale_factor"))
    want = agg_loss(L, mask, agg, **theirs)
    got = R.aggregate(L, mask, agg, **ours)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-14)
