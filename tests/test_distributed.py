"""Vocabulary-parallel log-probs over gloo: 1, 2 and 3 CPU ranks against the single-process result."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mhpo_kernels as mk
import mhpo_kernels.distributed as dm
from mhpo_kernels.distributed import vocab_parallel_logprobs

from util import TOL, assert_close, device_for

BACKENDS = [b for b in mk.available_backends("cpu") if b != "reference"]  # launchers: the reference has no shards
N, V = 13, 101


def full_case(seed, n=N, v=V):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 2
    ids = torch.randint(0, v, (n,), generator=g)
    ids[3] = -100
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return logits, ids, g_logp, g_ent


def expected(logits, ids, g_logp, g_ent, T):
    z = logits.double().requires_grad_()
    ls = torch.log_softmax(z / T, -1)
    valid = ids != -100
    logp = torch.where(valid, ls.gather(1, ids.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(ls.exp() * ls).sum(-1), 0.0)
    ((logp * g_logp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return logp.detach(), ent.detach(), z.grad


def _check_layout(rank, backend, sizes, starts, seed, sent):
    """Shard the full case as ``sizes`` / ``starts`` and compare against the full-logits result."""
    v_total = sum(sizes)
    logits, ids, g_logp, g_ent = full_case(seed, v=v_total)
    lo = starts[rank] if starts else sum(sizes[:rank])
    assert ((ids >= lo) & (ids < lo + sizes[rank])).any(), "every shard should own some targets"
    shard = logits[:, lo:lo + sizes[rank]].clone().requires_grad_()
    sent.clear()
    logp, ent, start, vt = vocab_parallel_logprobs(shard, ids, group=None, temperature=0.7, return_entropy=True,
                                                   backend=backend,
                                                   vocab_start_index=starts[rank] if starts else None)
    assert (start, vt) == (lo, v_total)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    w_logp, w_ent, w_grad = expected(logits, ids, g_logp, g_ent, 0.7)
    where = f"{backend} sizes={sizes} starts={starts} rank {rank}"
    assert_close(logp, w_logp, 2e-6, 2e-6, f"logp {where}")
    assert_close(ent, w_ent, 2e-6, 2e-6, f"entropy {where}")
    assert_close(shard.grad, w_grad[:, lo:lo + sizes[rank]], *TOL[torch.float32], f"grad {where}")
    return sum(sent)


def _check_bad(rank, case):
    n = N + (rank if case == "n_mismatch" else 0)
    logits, ids, _, _ = full_case(0, n=n)
    starts = {"gap": [0, 60], "overlap": [0, 40], "n_mismatch": None}[case]
    msg = {"gap": "do not tile", "overlap": "do not tile", "n_mismatch": "different token counts"}[case]
    try:
        vocab_parallel_logprobs(logits[:, :50], ids, group=None, backend="torch",
                                vocab_start_index=starts[rank] if starts else None)
    except ValueError as e:
        assert msg in str(e), str(e)
    else:
        raise AssertionError(f"{case}: no error on rank {rank}")


def _check_losses(rank, backend, sizes):
    """mhpo_loss (token-level MHPO, KL, entropy), policy_loss (GSPO, packed; CISPO with importance weights,
    the k2 KL, per-token terms) and token_logprobs on shards."""
    from util import make_case

    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    logits, ids, old, adv, mask, ref = make_case((3, 7), sum(sizes), torch.float32, device="cpu", seed=5)
    group = dist.group.WORLD
    calls = [
        lambda z, **k: mk.mhpo_loss(z, ids, old, adv, mask, ref_logprobs=ref, beta=0.1, return_entropy=True,
                                    loss_agg_mode="seq-mean-token-mean", temperature=0.9, **k),
        lambda z, **k: mk.policy_loss(z.reshape(21, -1), ids.reshape(-1), old.reshape(-1), adv.reshape(-1),
                                      mask.reshape(-1), ratio_control=mk.GSPOConfig(),
                                      cu_seqlens=torch.tensor([0, 5, 14, 21]), **k),
    ]
    # the finishing step's per-token inputs and outputs: importance weights (NaN where masked), k2 (unlike
    # low_var_kl, different from k3 at every |d|), CISPO, per-token terms with a per-token upstream gradient,
    # the entropy bonus
    g = torch.Generator().manual_seed(3)
    iw = torch.where(mask > 0, torch.rand(3, 7, generator=g) * 2, torch.full((3, 7), float("nan")))
    up = torch.rand(3, 7, generator=g)
    calls.append(lambda z, **k: mk.policy_loss(z, ids, old, adv, mask, ratio_control=mk.CISPOConfig(None, 0.3),
                                               ref_logprobs=ref, beta=0.1, kl_estimator="k2",
                                               importance_weights=iw, reduce=False, entropy_coeff=0.01, **k))
    for call in calls:
        full = logits.clone().requires_grad_()
        want = call(full, backend="reference")
        (want.loss * (up if want.loss.dim() else 1.0)).sum().backward()
        shard = logits[..., lo:hi].clone().requires_grad_()
        got = call(shard, backend=backend, process_group=group)
        (got.loss * (up if got.loss.dim() else 1.0)).sum().backward()
        where = f"{backend} sizes={sizes} rank {rank}"
        assert_close(got.loss, want.loss, 2e-6, 2e-6, f"loss {where}")
        assert_close(got.logprobs, want.logprobs, 2e-6, 2e-6, f"logprobs {where}")
        if want.entropy is not None:
            assert_close(got.entropy, want.entropy, 2e-6, 2e-6, f"entropy {where}")
        assert_close(shard.grad, full.grad[..., lo:hi], *TOL[torch.float32], f"grad {where}")
        for k in want.metrics:
            assert_close(got.metrics[k], want.metrics[k], 1e-5, 1e-5, f"metric {k} {where}", floor=1e-2)
    logp, ent = mk.token_logprobs(logits[..., lo:hi], ids, return_entropy=True, backend=backend,
                                  process_group=group)
    w_logp, w_ent = mk.token_logprobs(logits, ids, return_entropy=True, backend="reference")
    assert_close(logp, w_logp, 2e-6, 2e-6, "token_logprobs")
    assert_close(ent, w_ent, 2e-6, 2e-6, "token_logprobs entropy")


def _check_fused_linear(rank, backend, sizes, sent=None):
    """fused_linear_mhpo_loss on a vocabulary-sharded lm_head vs the unsharded reference: the
    gradients precomputed in the forward (loss only) and recomputed (through the entropy too)."""
    return [_check_fused_linear_once(rank, backend, sizes, sent, through_entropy) for through_entropy in (False, True)]


def _check_fused_linear_once(rank, backend, sizes, sent, through_entropy):
    from util import make_case

    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    V, H = sum(sizes), 16
    g = torch.Generator().manual_seed(6)
    hidden, W, b = torch.randn(3, 7, H, generator=g), torch.randn(V, H, generator=g) * 0.3, torch.randn(V, generator=g)
    _, ids, old, adv, mask, ref = make_case((3, 7), V, torch.float32, device="cpu", seed=6)
    with torch.no_grad():  # old / ref log-probs near the model's own: ratios around 1
        lp = torch.log_softmax(hidden @ W.T + b, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
        old = torch.where(torch.isfinite(old), lp + 0.3 * torch.randn(3, 7, generator=g), old)
    g_ent = torch.randn(3, 7, generator=g)
    kw = dict(ref_logprobs=ref, beta=0.1, return_entropy=True, loss_agg_mode="seq-mean-token-sum",
              temperature=0.8, ratio_control=mk.ClipConfig(0.2, 0.28, dual_clip_c=3.0))
    results = []
    for sharded in (False, True):
        h = hidden.clone().requires_grad_()
        w = (W[lo:hi] if sharded else W).clone().requires_grad_()
        bb = (b[lo:hi] if sharded else b).clone().requires_grad_()
        if sharded:
            if sent is not None:
                sent.clear()
            out = mk.fused_linear_mhpo_loss(h, w, ids, old, adv, mask, bias=bb, backend=backend, chunk_size=5,
                                            process_group=dist.group.WORLD, **kw)
        else:
            out = mk.fused_linear_mhpo_loss(h, w, ids, old, adv, mask, bias=bb, backend="torch", **kw)
        (out.loss + (out.entropy * g_ent).sum() if through_entropy else out.loss).backward()
        results.append((out, h.grad, w.grad[lo:hi] if not sharded else w.grad,
                        bb.grad[lo:hi] if not sharded else bb.grad))
    (want, wh, ww, wb), (got, gh, gw, gb) = results
    where = f"fused-linear {backend} sizes={sizes} rank {rank} through_entropy={through_entropy}"
    assert_close(got.loss, want.loss, 2e-6, 2e-6, f"loss {where}")
    assert_close(got.logprobs, want.logprobs, 2e-6, 2e-6, f"logprobs {where}")
    assert_close(got.entropy, want.entropy, 2e-6, 2e-6, f"entropy {where}")
    for name, a, e in (("hidden", gh, wh), ("weight shard", gw, ww), ("bias shard", gb, wb)):
        assert_close(a, e, 1e-5, 1e-5, f"grad {name} {where}")
    return None if sent is None else sum(sent)


def _check_all_inf_shard(rank, backend):
    """A shard whose part of a row is all -inf (e.g. padded vocabulary) adds nothing, not NaN."""
    logits, ids, g_logp, g_ent = full_case(2, v=60)
    logits[:, 30:] = float("-inf")
    ids = ids % 30
    ids[3] = -100
    shard = logits[:, 30 * rank:30 * (rank + 1)].clone().requires_grad_()
    logp, ent, _, _ = vocab_parallel_logprobs(shard, ids, group=None, return_entropy=True, backend=backend)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    w_logp, w_ent, w_grad = expected(logits[:, :30], ids, g_logp, g_ent, 1.0)
    assert_close(logp, w_logp, 2e-6, 2e-6, "logp with an all -inf shard")
    assert_close(ent, w_ent, 2e-6, 2e-6, "entropy with an all -inf shard")
    if rank == 0:
        assert_close(shard.grad, w_grad, *TOL[torch.float32], "grad with an all -inf shard")
    else:
        assert torch.equal(shard.grad, torch.zeros_like(shard.grad))


def _check_one_token_vocabulary(backend):
    """V = 1 on one rank: log-prob, entropy and gradient exactly 0 through the sharded path too."""
    logits, ids, g_logp, g_ent = full_case(3, v=1)
    shard = (logits * 40).requires_grad_()
    logp, ent, _, _ = vocab_parallel_logprobs(shard, ids, group=None, temperature=0.7, return_entropy=True,
                                              backend=backend)
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(ent, torch.zeros_like(ent)), backend
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    assert torch.equal(shard.grad, torch.zeros_like(shard.grad)), backend


# Layouts per world size: (sizes, explicit starts or None). Spawning ranks is
# the slow part, so each world size runs every layout and backend in one group.
LAYOUTS = {
    1: [([V], None)],
    2: [([50, 51], None), ([60, 41], [41, 0])],
    3: [([30, 40, 31], None), ([30, 40, 31], [71, 0, 40])],  # uneven; explicit, not in rank order
}


def _worker(rank, world, init_file, backends_):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sent = []
        real = dist.all_reduce

        def counting(t, *a, **k):
            sent.append(t.numel() * t.element_size())
            return real(t, *a, **k)

        dist.all_reduce = counting
        gather = dm._all_gather_single

        def counting_gather(out, t, *a, **k):
            sent.append(t.numel() * t.element_size())
            return gather(out, t, *a, **k)

        dm._all_gather_single = counting_gather
        for backend in backends_:
            for sizes, starts in LAYOUTS[world]:
                _check_layout(rank, backend, sizes, starts, 0, sent)
            _check_losses(rank, backend, LAYOUTS[world][0][0])
            _check_fused_linear(rank, backend, LAYOUTS[world][0][0])
            if world == 1:
                _check_one_token_vocabulary(backend)
        if world == 2:
            # O(N) communication: the same bytes for a 10x larger vocabulary
            small = _check_layout(rank, "torch", [32, 32], None, 1, sent)
            large = _check_layout(rank, "torch", [320, 320], None, 1, sent)
            # the layout's 4 int64, then one gather of this rank's [3, N] fp32 statistics
            assert small == large == 4 * 8 + 3 * N * 4, (small, large)
            fl_small = _check_fused_linear(rank, "torch", [32, 32], sent)
            fl_large = _check_fused_linear(rank, "torch", [320, 320], sent)
            assert fl_small == fl_large, (fl_small, fl_large)  # chunk statistics + grad_hidden: no V term
            for case in ("gap", "overlap", "n_mismatch"):
                _check_bad(rank, case)
            for backend in backends_:
                _check_all_inf_shard(rank, backend)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_vocab_parallel_matches_single_process(world):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), BACKENDS), nprocs=world, join=True)


LAUNCHERS = [b for b in dict.fromkeys(mk.available_backends("cpu") + mk.available_backends("cuda")) if b != "reference"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("want_entropy", [False, True])
def test_combine_matches_the_whole_vocabulary(launcher, want_entropy):
    """The ``combine`` launch (or combine_torch) of partition statistics equals the backend's pass over
    the whole vocabulary: partitions out of id order, a partition row that is all -inf, ignored and
    out-of-range ids. One partition gives its own values bit for bit. (Named ``launcher``: it calls
    the launchers directly, on the launcher's own device, which the device audit does not see.)"""
    from mhpo_kernels import backends
    from mhpo_kernels.distributed import combine, combine_torch

    backend = launcher
    kb = backends.get(backend)
    dev = device_for(backend)
    logits, ids, _, _ = full_case(7)
    logits[5, 60:] = float("-inf")
    ids[7], ids[9] = V + 3, -5  # no partition holds these: log-prob 0, as in the whole-vocabulary pass
    logits, ids = logits.to(dev), ids.to(dev)
    rows = torch.zeros(N, device=dev)
    params = [0.0] * mk.config.KERNEL_PARAMS

    def fwd(x, start=0):
        logp, ent, lse, _, _ = kb.fwd(x, ids, rows, rows, rows, None, mk.config.MODE_NONE, params, 0.0, 0.8, -100,
                                      want_entropy, vocab_start=start)
        return (lse, logp, ent) if want_entropy else (lse, logp)

    want = fwd(logits)
    bounds = [(60, 101), (0, 25), (25, 60)]
    stats = torch.stack([torch.stack(fwd(logits[:, a:b].contiguous(), a)) for a, b in bounds])
    starts, sizes = [a for a, _ in bounds], [b - a for a, b in bounds]
    for got in (combine(kb, stats, ids, starts, sizes, -100), combine_torch(stats, ids, starts, sizes, -100)):
        logp, ent, lse = got
        assert_close(lse, want[0], 2e-6, 2e-6, f"lse {backend}")
        assert_close(logp, want[1], 2e-6, 2e-6, f"logp {backend}")
        assert ent.numel() == (N if want_entropy else 0)
        if want_entropy:
            assert_close(ent, want[2], 2e-6, 2e-6, f"entropy {backend}")
    one = combine(kb, torch.stack(want)[None], ids, [0], [V], -100)
    assert torch.equal(one[2], want[0]) and torch.equal(one[0], want[1])
    if want_entropy:
        assert torch.equal(one[1], want[2])


def test_combine_op_registration():
    if "cpu" not in mk.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    stats = torch.randn(3, 3, 8)
    ids = torch.tensor([0, 5, 9, -100, 2, 7, 11, 4])
    torch.library.opcheck(torch.ops.mhpo_kernels_C.combine.default, (stats, ids, [0, 4, 8], [4, 4, 4], -100))
    with pytest.raises(RuntimeError, match="one entry per partition"):
        torch.ops.mhpo_kernels_C.combine(stats, ids, [0, 4], [4, 4], -100)
