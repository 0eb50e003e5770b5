"""How many ops one forward + backward dispatches, and how many host syncs.

Counted from ``torch.profiler`` CPU events at every nesting depth: an ``aten::``
op counts when it is not an allocation / view / metadata op and has no counted
op beneath it (``zeros_like -> zero_`` is one op, ``to -> _to_copy -> copy_``
is one); each of the package's own ops counts once (the innermost, so the
Python op wrapping a native one is not counted twice); a collective counts as
the ``c10d::`` op it dispatches (``c10d::allreduce_``, ``c10d::_allgather_base_``),
once. The ``cpu`` backend
shares all its glue with the GPU backends, so these counts bound the GPU's
kernel launches too. ``aten::_local_scalar_dense`` is a host sync (``.item()``,
``int(t)``, ``bool(t)``).
"""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import mhpo_kernels as mk

pytestmark = pytest.mark.skipif("cpu" not in mk.available_backends("cpu"), reason="the cpu backend is not built")

NOT_WORK = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "view", "_unsafe_view",
    "reshape", "_reshape_alias", "detach", "detach_", "alias", "as_strided", "expand", "expand_as", "select",
    "slice", "narrow", "to", "unsqueeze", "squeeze", "t", "transpose", "permute", "contiguous", "view_as",
    "flatten", "unflatten", "unbind", "split", "chunk", "lift_fresh", "resolve_conj", "resolve_neg",
    "result_type", "is_nonzero", "set_", "size", "stride", "numel", "dim", "diagonal", "squeeze_", "unsqueeze_",
}
PACKAGE = ("mhpo_kernels::", "mhpo_kernels_C::", "c10d::")  # counted once each: our ops and the collectives
SYNC = "aten::_local_scalar_dense"


@pytest.fixture(autouse=True)
def nan_poison():
    """Overrides conftest's: NaN-filling every allocation would add a fill per torch.empty to the counts."""
    yield


def _is_package(e):
    return e.name.startswith(PACKAGE)


def _is_aten_work(e):
    return e.name.startswith("aten::") and e.name[len("aten::"):] not in NOT_WORK


def count_ops(fn):
    """Counter of the work ops ``fn()`` dispatches (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    memo = {}

    def below(e, pred):
        key = (id(e), pred)
        if key not in memo:
            memo[key] = any(pred(c) or below(c, pred) for c in e.cpu_children)
        return memo[key]

    counted = collections.Counter()
    for e in prof.events():
        if _is_package(e):
            if not below(e, _is_package):
                counted[e.name] += 1
        elif _is_aten_work(e) and not below(e, lambda c: _is_package(c) or _is_aten_work(c)):
            counted[e.name] += 1
    return counted


def total(c):
    return sum(c.values())


N, V = 64, 512


def inputs(shape=(N,), seed=0, ref=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, V, generator=g)
    ids = torch.randint(0, V, shape, generator=g)
    ids[..., 3] = -100
    old = torch.randn(shape, generator=g) * 0.3 - 6.5
    adv = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.2).float()
    extra = dict(ref_logprobs=old + 0.1, beta=0.05) if ref else {}
    return logits, ids, old, adv, mask, extra


def fwd_bwd(loss_fn, logits, *args, **kw):
    x = logits.detach().requires_grad_(True)

    def step():
        out = loss_fn(x, *args, **kw)
        out.loss.backward()
    return step


# ---------------------------------------------------------------------------- the counter itself


def test_counter_counts_work_not_views():
    logits, ids, *_ = inputs()
    x, ids = logits.detach().requires_grad_(True), ids.clamp(min=0)
    c = count_ops(lambda: F.cross_entropy(x, ids).backward())
    # log_softmax, nll_loss forward; the seed gradient's fill; nll_loss backward's zero fill; log_softmax backward
    assert total(c) == 5, c
    y = torch.randn(8)

    def views_and_three_ops():
        e = y.view(2, 4).t().unsqueeze(0).squeeze(0).detach().exp()
        (e + e).amax().item()
    c = count_ops(views_and_three_ops)
    # amax initialises its output with a fill_ beneath it: counted once, as that fill_
    assert c == collections.Counter({"aten::exp": 1, "aten::add": 1, "aten::fill_": 1, SYNC: 1}), c


def test_counter_counts_package_ops_once():
    logits, ids, old, adv, mask, _ = inputs()
    c = count_ops(lambda: mk.mhpo_loss(logits, ids, old, adv, mask, backend="cpu"))
    assert c["mhpo_kernels_C::fwd"] == 1 and c["mhpo_kernels_C::finish"] == 1
    assert not any(k.startswith("mhpo_kernels::") for k in c), c  # the Python op around them is not counted again


# ---------------------------------------------------------------------------- entry points


@pytest.mark.parametrize("mask_kind", ["float", "none", "bool"])
@pytest.mark.parametrize("check_ids", [True, False])
def test_mhpo_loss(mask_kind, check_ids):
    logits, ids, old, adv, mask, _ = inputs()
    mask = {"float": mask, "none": None, "bool": mask.bool()}[mask_kind]
    c = count_ops(fwd_bwd(mk.mhpo_loss, logits, ids, old, adv, mask, backend="cpu", check_ids=check_ids))
    assert total(c) <= 12, c
    assert c[SYNC] == (1 if check_ids else 0), c


def test_mhpo_loss_batched_entropy_kl_inplace():
    logits, ids, old, adv, mask, extra = inputs((4, 16), ref=True)
    x = logits.detach().requires_grad_(True)
    z = x.clone()  # in-place backward writes the gradient into these logits
    g_ent = torch.randn(4, 16)

    def step():
        out = mk.mhpo_loss(z, ids, old, adv[:, 0], mask, backend="cpu", loss_agg_mode="seq-mean-token-mean",
                           return_entropy=True, inplace_backward=True, **extra)
        torch.autograd.backward([out.loss, out.entropy], [torch.ones(()), g_ent])
    c = count_ops(step)
    assert total(c) <= 12, c
    assert c[SYNC] == 1, c


CONTROLS = {
    "mhpo": (mk.MHPOConfig(), "token"),
    "mhpo_seq": (mk.MHPOConfig(), "sequence"),
    "clip": (mk.ClipConfig(0.2, 0.28, dual_clip_c=3.0), "token"),
    "sapo": (mk.SAPOConfig(), "token"),
    "gspo": (mk.GSPOConfig(), "sequence"),
}
AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("control", list(CONTROLS))
def test_policy_loss(control, agg, packed):
    cfg, level = CONTROLS[control]
    logits, ids, old, adv, mask, extra = inputs(ref=True)
    kw = dict(ratio_control=cfg, importance_sampling_level=level, loss_agg_mode=agg, backend="cpu", **extra)
    if packed:
        kw["cu_seqlens"] = torch.tensor([0, 10, 30, 30, N], dtype=torch.int32)
    c = count_ops(fwd_bwd(mk.policy_loss, logits, ids, old, adv, mask, **kw))
    assert total(c) <= 12, c
    assert c[SYNC] <= 1, c
    c = count_ops(fwd_bwd(mk.policy_loss, logits, ids, old, adv, mask, check_ids=False, **kw))
    assert total(c) <= 12 and c[SYNC] == 0, c


FINISH_INPUTS = {  # the finishing launch reads / writes them: no pass of their own
    "importance_weights": lambda w, up: dict(importance_weights=w),
    "kl_estimator": lambda w, up: dict(kl_estimator="low_var_kl"),
    "cispo": lambda w, up: dict(ratio_control=mk.CISPOConfig(0.2, 0.28)),
    "reduce_false": lambda w, up: dict(reduce=False),
    "all": lambda w, up: dict(importance_weights=w, kl_estimator="k2", ratio_control=mk.CISPOConfig(), reduce=False),
}


@pytest.mark.parametrize("case", list(FINISH_INPUTS))
def test_finish_inputs_add_no_pass(case):
    """importance_weights, kl_estimator, CISPO and reduce=False cost no op of their own on the two-kernel path:
    the same count as the call without them, plus one with reduce=False (the per-token upstream gradient times
    d loss / d logp, which a 0-d upstream gradient does inside the backward launch)."""
    logits, ids, old, adv, mask, extra = inputs(ref=True)
    w, up = torch.rand(N), torch.rand(N)
    x = logits.detach().requires_grad_(True)
    kw = dict(backend="cpu", fused_gradient=False, **extra)

    def step(**more):
        def run():
            x.grad = None
            out = mk.policy_loss(x, ids, old, adv, mask, **kw, **more)
            torch.autograd.backward(out.loss, up if out.loss.dim() else None)
        return run
    base = count_ops(step())
    more = FINISH_INPUTS[case](w, up)
    c = count_ops(step(**more))
    assert total(c) <= total(base) + (0 if more.get("reduce", True) else 1), (c, base)
    assert c[SYNC] == base[SYNC] == 1, c


def test_importance_weights_keep_the_fused_gradient_forward():
    """Importance weights alone (no KL term, no entropy bonus) fold into the aggregation weights' launch:
    the forward that writes the gradient runs with the same op count as without them."""
    logits, ids, old, adv, mask, _ = inputs()
    base = count_ops(fwd_bwd(mk.policy_loss, logits, ids, old, adv, mask, backend="cpu", fused_gradient=True))
    c = count_ops(fwd_bwd(mk.policy_loss, logits, ids, old, adv, mask, backend="cpu", fused_gradient=True,
                          importance_weights=torch.rand(N)))
    assert c["mhpo_kernels_C::fwd_grad"] == 1, c
    assert total(c) == total(base), (c, base)


@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs(entropy):
    logits, ids, *_ = inputs()
    x = logits.detach().requires_grad_(True)
    g = torch.randn(N), torch.randn(N)

    def step():
        out = mk.token_logprobs(x, ids, return_entropy=entropy, backend="cpu")
        torch.autograd.backward(out if entropy else [out], list(g[:1 + entropy]))
    c = count_ops(step)
    assert total(c) <= 8, c
    assert c[SYNC] == 1, c
    c = count_ops(lambda: mk.token_logprobs(x, ids, backend="cpu", check_ids=False))
    assert c[SYNC] == 0, c


# ---------------------------------------------------------------------------- the one sync still catches bad input


def test_bad_id_raises_after_one_sync():
    logits, ids, old, adv, mask, _ = inputs()
    ids = ids.clone()
    ids[17] = V
    with pytest.raises(ValueError, match=rf"target_ids\[17\] \(flattened\) = {V} is outside \[0, {V}\)"):
        mk.mhpo_loss(logits, ids, old, adv, mask, backend="cpu")
    ids[17], ids[40] = 1, -7
    with pytest.raises(ValueError, match=r"target_ids\[40\] \(flattened\) = -7 is outside"):
        mk.token_logprobs(logits, ids, backend="cpu")
    out = mk.mhpo_loss(logits, ids, old, adv, mask, backend="cpu", check_ids=False)  # the caller vouches for ids
    assert out.logprobs[40] == 0 and torch.isfinite(out.loss)


def test_vocab_parallel_single_rank(tmp_path):
    """One gloo rank: the layout all-gather, the shard pass, one all-gather of the packed shard
    statistics, one combine launch, the finishing launch, the backward. Collectives count as their
    ``c10d::`` op. Before the combine launch: 26 ops (3 collectives); before the finishing kernel:
    154 ops and 5 host syncs."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        logits, ids, old, adv, mask, extra = inputs(ref=True)
        kw = dict(backend="cpu", process_group=dist.group.WORLD, **extra)
        for entropy in (False, True):
            c = count_ops(fwd_bwd(mk.mhpo_loss, logits, ids, old, adv, mask, return_entropy=entropy, **kw))
            assert total(c) <= 12, c
            assert c["mhpo_kernels_C::combine"] == 1 and c["mhpo_kernels_C::finish"] == 1, c
            assert c[SYNC] == 1, c  # the id check; the shard layout is read with one tolist (no op on gloo's CPU)
            assert sum(v for k, v in c.items() if k.startswith("c10d::")) <= 2, c  # layout + statistics
        c = count_ops(fwd_bwd(mk.mhpo_loss, logits, ids, old, adv, mask, check_ids=False, **kw))
        assert total(c) <= 11 and c[SYNC] == 0, c
        want = mk.mhpo_loss(logits, ids, old, adv, mask, backend="cpu", return_entropy=True, **extra)
        got = mk.mhpo_loss(logits, ids, old, adv, mask, return_entropy=True, **kw)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-6)
        assert got.metrics.keys() == want.metrics.keys()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- fused lm_head

GEMMS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::addmm_"}
H = 16


def fused_linear_ops(vocab_chunks, token_chunks, entropy=False, bias=True):
    """Work ops of one fused_linear_mhpo_loss forward + backward (hidden, weight and bias gradients)
    over ``vocab_chunks`` x ``token_chunks`` tiles, the GEMMs left out."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    b = torch.zeros(V, requires_grad=True) if bias else None
    _, ids, old, adv, mask, _ = inputs()
    kw = dict(bias=b, backend="cpu", chunk_size=N // token_chunks, vocab_chunk_size=V // vocab_chunks,
              return_entropy=entropy)

    def step():
        out = mk.fused_linear_mhpo_loss(hidden, weight, ids, old, adv, mask, **kw)
        (out.loss + (out.entropy.sum() if entropy else 0)).backward()
    c = count_ops(step)
    return collections.Counter({k: v for k, v in c.items() if k not in GEMMS})


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("token_chunks", [1, 2])
def test_fused_linear_ops_per_chunk(token_chunks, entropy):
    """Beyond its GEMMs, one tile (a vocabulary slice of a token chunk) costs at most 12 work ops
    forward + backward; everything else (validation, the combine and finish launches) is per call."""
    one = fused_linear_ops(1, token_chunks, entropy)
    many = fused_linear_ops(4, token_chunks, entropy)
    per_tile = (total(many) - total(one)) / (3 * token_chunks)
    assert per_tile <= 12, (per_tile, one, many)
    assert many["mhpo_kernels_C::fwd"] == many["mhpo_kernels_C::bwd"] == 4 * token_chunks, many
    assert many["mhpo_kernels_C::combine"] == 1 and many["mhpo_kernels_C::finish"] == 1, many
    assert total(one) <= 12 + 12 * token_chunks, one
