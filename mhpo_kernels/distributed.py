"""Vocabulary-parallel log-probs: logits (or the lm_head) sharded along V across ranks.

Rank ``r`` holds vocabulary ids ``[start_r, start_r + V_r)`` of every token row.
By default ``start_r`` is the sum of ``V_q`` over ranks ``q < r`` (so an even
split is ``rank * V_local``); pass ``vocab_start_index`` for any other tiling.
Each rank runs the single-device fused kernels on its shard (with
``vocab_start``), and only O(N) fp32 statistics cross the wire, in one collective:

1. the shard's pass: ``lse_r``, ``logp_r`` (``x_y - lse_r`` on the rank owning the
   target, else 0) and, with entropy, ``H_r``, packed as one ``[k, N]`` tensor;
2. one all-gather of it -> ``[world, k, N]``;
3. one ``combine`` launch (the backend's, or :func:`combine_torch`): ``lse = M + log s``,
   ``logp = logp_q + lse_q - lse`` (``q`` the owner), ``H = C / s + log s`` with
   ``M = max_r lse_r``, ``s = sum_r e^(lse_r - M)``, ``C = sum_r e^(lse_r - M) (H_r + M - lse_r)``.

Every rank then holds identical log-probs, entropy and loss. The backward needs
no communication: each shard's gradient uses the global ``lse`` and ``H``.
Collectives are issued the same number of times on every rank (no data-dependent
branches); the layout check before them is one all-gather of 4 integers per rank.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.distributed as dist

from . import backends
from ._finish import raise_bad_input
from ._ops import finish_launch, upstream
from ._inputs import check_ignore_index, check_target_ids
from .config import KERNEL_PARAMS, MODE_NONE

_NO_PARAMS = [0.0] * KERNEL_PARAMS  # MODE_NONE reads no ratio-control parameters


# all_gather_into_tensor (torch 2.11 - 2.13) is deprecated from torch 2.14 on, as all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(out, mine, group):
    """``out`` (``world`` times ``mine``, concatenated along dim 0) = every rank's ``mine``, one collective."""
    _all_gather_single(out, mine, group=group)


class ShardLayout(NamedTuple):
    """This rank's shard and the whole tiling: ``starts[r]`` / ``sizes[r]`` of every rank ``r``."""

    start: int
    total: int
    starts: Tuple[int, ...]
    sizes: Tuple[int, ...]


def shard_layout(V_local: int, N: int, group, vocab_start_index=None, chunk_size: int = 0) -> ShardLayout:
    """The vocabulary tiling of the group, checked across it before any O(N) collective.

    Raises ValueError when the shards do not tile [0, V_total), or when N (or the
    chunk size, which sets how many collectives follow) differs across ranks.
    One all-gather of 4 integers per rank, read with one device-to-host copy (none for
    gloo's CPU tensors).
    """
    world = dist.get_world_size(group)
    # NCCL has no CPU backend: the layout travels on this rank's GPU there
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([V_local, -1 if vocab_start_index is None else int(vocab_start_index), N, chunk_size],
                        dtype=torch.int64, device=device)
    everyone = mine.new_empty(world * 4)
    _all_gather(everyone, mine, group)
    rows = everyone.view(world, 4).tolist()
    sizes = [r[0] for r in rows]
    starts = [r[1] for r in rows]
    counts = [r[2] for r in rows]
    if len(set(counts)) != 1:
        raise ValueError(f"vocabulary-parallel ranks hold different token counts N: {counts}")
    chunks = [r[3] for r in rows]
    if len(set(chunks)) != 1:
        raise ValueError(f"vocabulary-parallel ranks use different chunk sizes: {chunks}")
    if all(s == -1 for s in starts):
        starts = [sum(sizes[:r]) for r in range(world)]
    elif any(s == -1 for s in starts):
        raise ValueError("vocab_start_index must be given on every rank or on none")
    order = sorted(range(world), key=lambda r: starts[r])
    pos = 0
    for r in order:
        if starts[r] != pos or sizes[r] < 1:
            raise ValueError(
                f"vocabulary shards do not tile [0, V): rank {r} holds [{starts[r]}, {starts[r] + sizes[r]}) "
                f"(all ranks: {[(s, s + v) for s, v in zip(starts, sizes)]})"
            )
        pos += sizes[r]
    return ShardLayout(starts[dist.get_rank(group)], pos, tuple(starts), tuple(sizes))


def combine_torch(stats, target, starts, sizes, ignore_index):
    """The ``combine`` launcher in torch ops (any device and float dtype; backends without their own).

    ``stats``: ``[P, k, N]``, per vocabulary partition ``p`` (ids ``[starts[p], starts[p] + sizes[p])``)
    its log-sum-exp, its log-prob (``x_y - lse_p`` where it holds the target, else 0) and, for
    ``k == 3``, its entropy. Returns the whole vocabulary's ``(logp, entropy or [0], lse)``, with the
    shard conventions of ``fwd``: logp 0 where no partition holds the target; logp and entropy 0 on
    ``ignore_index`` rows.
    """
    lse_p, logp_p = stats[:, 0], stats[:, 1]
    m = lse_p.amax(0)
    e = torch.exp(lse_p - m)  # 0 for an all -inf partition row (m is finite unless the whole row is -inf)
    s = e.sum(0)
    log_s = torch.log(s)
    lse = m + log_s
    ignored = target == ignore_index
    lo, hi = torch.tensor([list(starts), [a + n for a, n in zip(starts, sizes)]], device=target.device)[:, :, None]
    not_owned = (target < lo) | (target >= hi) | ignored  # [P, N]: at most one partition owns a row
    logp = (logp_p + (lse_p - lse)).masked_fill_(not_owned, 0.0).sum(0)
    if stats.shape[1] < 3:
        return logp, lse.new_empty(0), lse
    C = (e * (stats[:, 2] + (m - lse_p))).masked_fill_(e == 0, 0.0).sum(0)  # e = 0: lse_p = -inf adds nothing
    return logp, (C / s + log_s).masked_fill_(ignored, 0.0), lse


def combine(kernels, stats, target, starts, sizes, ignore_index):
    """The backend's ``combine`` launch where it has one, else :func:`combine_torch`."""
    f = getattr(kernels, "combine", None)
    if f is None:
        return combine_torch(stats, target, starts, sizes, ignore_index)
    return f(stats, target, starts, sizes, ignore_index)


def gather_stats(parts, group):
    """``[world, k, N]``: every rank's ``k`` statistics ``[N]`` (this rank's ``parts``), one collective."""
    mine = torch.stack(parts)
    world = dist.get_world_size(group)
    out = mine.new_empty((world * mine.shape[0], mine.shape[1]))  # concatenated along dim 0: every backend takes it
    _all_gather(out, mine, group)
    return out.view(world, *mine.shape)


class ShardedBackend:
    """The launchers of a backend (``mhpo_kernels.backends``) on a vocabulary shard.

    ``fwd`` (MODE_NONE) runs the base backend's log-prob pass on the shard and
    combines the O(N) statistics across the group: it returns global
    ``(logp, entropy, lse)``, identical on every rank. ``bwd`` is the base
    backend's, with the global lse / entropy and this shard's ``vocab_start``.
    """

    def __init__(self, base, group, layout: ShardLayout):
        self.base, self.group, self.layout, self.start = base, group, layout, layout.start

    def fwd(self, logits, target, rows, temperature, ignore_index, want_entropy):
        logp_l, ent_l, lse_l, _, _ = self.base.fwd(
            logits, target, rows, rows, rows, None, MODE_NONE, _NO_PARAMS, 0.0, temperature, ignore_index,
            want_entropy, vocab_start=self.start)
        stats = gather_stats((lse_l, logp_l, ent_l) if want_entropy else (lse_l, logp_l), self.group)
        return combine(self.base, stats, target, self.layout.starts, self.layout.sizes, ignore_index)

    def bwd(self, logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, scale=None):
        return self.base.bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out,
                             vocab_start=self.start, scale=scale)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, ignore_index, want_entropy, backend, group, layout):
        k = ShardedBackend(backends.get(backend), group, layout)
        # the shard's pass reads no per-token loss inputs: any [N] buffer of the compute dtype stands in
        rows = logits.new_empty(logits.shape[0],
                                dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
        logp, entropy, lse = k.fwd(logits, target, rows, temperature, ignore_index, want_entropy)
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.args = (temperature, ignore_index, want_entropy, k)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, target, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, want_entropy, k = ctx.args
        dlogp = torch.zeros_like(lse) if g_logp is None else g_logp.to(lse.dtype).contiguous()
        dent = g_ent.to(lse.dtype).contiguous() if (want_entropy and g_ent is not None) else None
        grad = torch.empty_like(logits)
        k.bwd(logits, target, lse, entropy if dent is not None else None, dlogp, dent, temperature,
              ignore_index, grad)
        return grad, None, None, None, None, None, None, None


class _VocabParallelPolicy(torch.autograd.Function):
    """The policy loss on a vocabulary shard: the shard's pass and the O(N) combine, then the
    backend's one finishing launch on the global log-probs (identical on every rank); the
    backward is the shard's one backward launch with the loss's upstream gradient as ``scale``."""

    @staticmethod
    def forward(ctx, logits, a, group, layout):
        ctx.set_materialize_grads(False)
        k = ShardedBackend(backends.get(a.backend), group, layout)
        V_total = layout.total
        logp, entropy, lse = k.fwd(logits, a.target, a.old, a.temperature, a.ignore_index, a.want_entropy)
        loss, dlogp, metrics, bad, tok = finish_launch(k.base, a, logp, entropy if a.want_entropy else None, V_total,
                                                       a.check_ids)
        if a.check_ids and not (a.target.is_cuda and torch.cuda.is_current_stream_capturing()):
            raise_bad_input(bad, a.target, a.cu_seqlens, V_total, a.ignore_index)
        tok = logp.new_empty(0, logp.shape[0]) if tok is None else tok
        ctx.mark_non_differentiable(logp, metrics, tok)
        ctx.save_for_backward(logits, a.target, lse, entropy, dlogp)
        ctx.args = (a.temperature, a.ignore_index, a.want_entropy, k)
        return loss, logp, entropy, metrics, tok

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_ent, g_metrics, g_tok):
        logits, target, lse, entropy, dlogp = ctx.saved_tensors
        temperature, ignore_index, want_entropy, k = ctx.args
        if g_loss is None:
            dlogp = torch.zeros_like(lse)
        dlogp, g_loss = upstream(dlogp, g_loss)  # reduce=False: a per-token upstream gradient
        dent = g_ent.to(lse.dtype).contiguous() if (want_entropy and g_ent is not None) else None
        grad = torch.empty_like(logits)
        k.bwd(logits, target, lse, entropy if dent is not None else None, dlogp, dent, temperature, ignore_index, grad,
              scale=None if g_loss is None else g_loss)
        return grad, None, None, None


def vocab_parallel_policy(a, *, group, vocab_start_index=None):
    """``(loss, logp, entropy, metrics, tok)`` of the fused policy loss on a vocabulary shard: ``a`` is the
    :class:`mhpo_kernels._ops.FwdArgs` of the call, with ``a.logits`` this rank's ``[N, V_local]``."""
    layout = shard_layout(a.logits.shape[1], a.logits.shape[0], group, vocab_start_index)
    check_ignore_index(a.ignore_index, layout.total)
    return _VocabParallelPolicy.apply(a.logits, a, group, layout)


def vocab_parallel_logprobs(logits2d, target, *, group, temperature=1.0, ignore_index=-100,
                            return_entropy=False, backend="auto", vocab_start_index=None):
    """Global per-token log-probs (and entropy) from a vocabulary shard ``[N, V_local]``.

    ``target`` holds global ids. Differentiable w.r.t. the shard. Returns
    ``(logp [N], entropy [N] or None, vocab_start, V_total)``.
    """
    name = backends.resolve(backend, logits2d.device)
    layout = shard_layout(logits2d.shape[1], logits2d.shape[0], group, vocab_start_index)
    check_ignore_index(ignore_index, layout.total)
    if not torch.compiler.is_compiling():
        check_target_ids(target, layout.total, ignore_index)
    logp, entropy = _VocabParallelLogprobs.apply(logits2d, target, float(temperature), int(ignore_index),
                                                 bool(return_entropy), name, group, layout)
    return logp, (entropy if return_entropy else None), layout.start, layout.total
