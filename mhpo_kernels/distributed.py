"""Vocabulary-parallel log-probs: logits (or the lm_head) sharded along V across ranks.

Rank ``r`` holds vocabulary ids ``[start_r, start_r + V_r)`` of every token row.
By default ``start_r`` is the sum of ``V_q`` over ranks ``q < r`` (so an even
split is ``rank * V_local``); pass ``vocab_start_index`` for any other tiling.
Each rank runs the single-device fused kernels on its shard (with
``vocab_start``), and only O(N) fp32 statistics cross the wire:

1. ``all_reduce(MAX)`` of the shard log-sum-exps ``lse_r``  -> ``M``
2. ``all_reduce(SUM)`` of ``[exp(lse_r - M), x_y (owner only), exp(lse_r - M) * E_r[x]]``
   -> ``lse = M + log(sum)``, ``logp = x_y - lse``, ``H = lse - E[x]``.

Every rank then holds identical log-probs, entropy and loss. The backward needs
no communication: each shard's gradient uses the global ``lse`` and ``H``.
Collectives are issued the same number of times on every rank (no data-dependent
branches); the layout check before them is one all-gather of 3 integers per rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import backends
from ._inputs import check_target_ids
from .config import KERNEL_PARAMS, MODE_NONE, from_kernel_params


class _TorchShard:
    """The backend contract (MODE_NONE, vocab_start) in plain PyTorch, for backend="torch"."""

    @staticmethod
    def fwd(logits, target, old, adv, mask, ref, mode, params, beta, temperature, ignore_index, want_entropy,
            vocab_start=0):
        z = logits.float() / temperature
        N, V = z.shape
        lse = torch.logsumexp(z, -1) if V else z.new_full((N,), float("-inf"))
        y = target - vocab_start
        owned = (target != ignore_index) & (y >= 0) & (y < V)
        logp = torch.where(owned, z.gather(1, torch.where(owned, y, 0)[:, None])[:, 0] - lse, 0.0)
        entropy = z.new_empty(0)
        if want_entropy:
            logp_all = z - lse[:, None]
            p = logp_all.exp()
            entropy = torch.where(target != ignore_index, -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1), 0.0)
        return logp, entropy, lse, torch.zeros_like(lse), torch.zeros_like(lse)

    @staticmethod
    def bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, vocab_start=0):
        logp_all = logits.float() / temperature - lse[:, None]
        p = logp_all.exp()
        cols = torch.arange(logits.shape[1], device=logits.device) + vocab_start
        grad = (cols[None, :] == target[:, None]).float() * dlogp[:, None] - dlogp[:, None] * p
        if dent is not None:
            grad = grad - dent[:, None] * p * torch.where(p > 0, logp_all + entropy[:, None], 0.0)
        grad = torch.where((target != ignore_index)[:, None], grad / temperature, 0.0)
        out.copy_(grad)
        return out


def _kernels(backend: str):
    return _TorchShard if backend == "torch" else backends.get(backend)


def shard_layout(V_local: int, N: int, group, vocab_start_index=None, chunk_size: int = 0):
    """(vocab_start, V_total) of this rank, checked across the group before any O(N) collective.

    Raises ValueError when the shards do not tile [0, V_total), or when N (or the
    chunk size, which sets how many collectives follow) differs across ranks.
    """
    world = dist.get_world_size(group)
    # NCCL has no CPU backend: the layout travels on this rank's GPU there
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([V_local, -1 if vocab_start_index is None else int(vocab_start_index), N, chunk_size],
                        dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    rows = torch.stack(everyone).tolist()  # one device-to-host copy
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
    return starts[dist.get_rank(group)], pos


class ShardedBackend:
    """The backend contract (``mhpo_kernels.backends``) on a vocabulary shard.

    ``fwd`` runs the base backend's log-prob pass on the shard (MODE_NONE),
    combines the O(N) statistics across the group, and computes the ratio
    control's per-token loss and coefficient from the global log-probs in torch
    (O(N)); it returns global ``(logp, entropy, lse, loss, coef)``, identical on
    every rank. ``bwd`` is the base backend's, with the global lse / entropy.
    """

    def __init__(self, base, group, vocab_start):
        self.base, self.group, self.start = base, group, vocab_start

    def fwd(self, logits, target, old, adv, mask, ref, mode, params, beta, temperature, ignore_index,
            want_entropy):
        N, V = logits.shape
        logp_l, ent_l, lse_l, _, _ = self.base.fwd(
            logits, target, old, adv, mask, None, MODE_NONE, params, 0.0, temperature, ignore_index,
            want_entropy, vocab_start=self.start)
        valid = target != ignore_index
        owned = valid & (target >= self.start) & (target < self.start + V)
        M = lse_l.clone()
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=self.group)
        e = torch.exp(lse_l - M)
        parts = [e, torch.where(owned, logp_l + lse_l, 0.0)]  # x_y / T, on the owning rank only
        if want_entropy:
            parts.append(torch.where(e > 0, e * (lse_l - ent_l), 0.0))  # exp(lse_r - M) * E_r[x]; 0 for an all -inf shard row
        stats = torch.stack(parts)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        lse = M + torch.log(stats[0])
        logp = torch.where(valid, stats[1] - lse, 0.0)
        entropy = torch.where(valid, lse - stats[2] / stats[0], 0.0) if want_entropy else lse.new_empty(0)
        loss, coef = torch.zeros_like(lse), torch.zeros_like(lse)
        if mode != MODE_NONE:  # the kernels' epilogue, in torch, on the global log-probs
            from .policy import token_epilogue

            active = valid & (mask != 0)
            zero = torch.zeros_like(lse)
            d = torch.where(active, ref - logp, zero) if ref is not None else None
            loss, coef, _ = token_epilogue(from_kernel_params(mode, params), torch.where(active, logp - old, zero),
                                           torch.where(active, adv, zero), d, beta, active)
        return logp, entropy, lse, loss, coef

    def bwd(self, logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, scale=None):
        if scale is None:
            return self.base.bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out,
                                 vocab_start=self.start)
        return self.base.bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out,
                             vocab_start=self.start, scale=scale)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, ignore_index, want_entropy, backend, group, start):
        k = ShardedBackend(_kernels(backend), group, start)
        dummy = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32)
        logp, entropy, lse, _, _ = k.fwd(logits, target, dummy, dummy, dummy, None, MODE_NONE,
                                         [0.0] * KERNEL_PARAMS, 0.0, temperature, ignore_index, want_entropy)
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.args = (temperature, ignore_index, want_entropy, k)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, target, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, want_entropy, k = ctx.args
        dlogp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        dent = g_ent.float().contiguous() if (want_entropy and g_ent is not None) else None
        grad = torch.empty_like(logits)
        k.bwd(logits, target, lse, entropy if dent is not None else None, dlogp, dent, temperature,
              ignore_index, grad)
        return grad, None, None, None, None, None, None, None


class _VocabParallelPolicy(torch.autograd.Function):
    """The policy loss on a vocabulary shard: the shard's pass and the O(N) combine, then the
    backend's one finishing launch on the global log-probs (identical on every rank); the
    backward is the shard's one backward launch with the loss's upstream gradient as ``scale``."""

    @staticmethod
    def forward(ctx, logits, target, old, adv, mask, ref, cu_seqlens, finish_args, check_ids, backend, group, start,
                V_total):
        ctx.set_materialize_grads(False)
        num_seqs, seq_len, mode, params, beta, seq_level, agg, temperature, ignore_index, want_entropy = finish_args
        k = ShardedBackend(backends.get(backend), group, start)
        logp, entropy, lse, _, _ = k.fwd(logits, target, old, adv, old, None, MODE_NONE, params, 0.0, temperature,
                                         ignore_index, want_entropy)
        from ._finish import raise_bad_input

        loss, dlogp, metrics, bad = k.base.finish(
            logp, entropy if want_entropy else None, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode,
            params, beta, seq_level, agg, ignore_index, V_total, check_ids)
        if check_ids and not (target.is_cuda and torch.cuda.is_current_stream_capturing()):
            raise_bad_input(bad, target, cu_seqlens, V_total, ignore_index)
        ctx.mark_non_differentiable(logp, metrics)
        ctx.save_for_backward(logits, target, lse, entropy, dlogp)
        ctx.args = (temperature, ignore_index, want_entropy, k)
        return loss, logp, entropy, metrics

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_ent, g_metrics):
        logits, target, lse, entropy, dlogp = ctx.saved_tensors
        temperature, ignore_index, want_entropy, k = ctx.args
        if g_loss is None:
            dlogp = torch.zeros_like(lse)
        dent = g_ent.float().contiguous() if (want_entropy and g_ent is not None) else None
        grad = torch.empty_like(logits)
        k.bwd(logits, target, lse, entropy if dent is not None else None, dlogp, dent, temperature, ignore_index, grad,
              scale=None if g_loss is None else g_loss.float())
        return (grad,) + (None,) * 12


def vocab_parallel_policy(logits2d, target, old, adv, mask, ref, cu_seqlens, finish_args, *, group, check_ids,
                          backend, vocab_start_index=None):
    """``(loss, logp, entropy, metrics)`` of the fused policy loss on a vocabulary shard ``[N, V_local]``
    (a fused backend; ``finish_args`` as :func:`mhpo_kernels._finish.policy_fwd` takes them)."""
    start, V_total = shard_layout(logits2d.shape[1], logits2d.shape[0], group, vocab_start_index)
    ignore_index = finish_args[8]
    if 0 <= ignore_index < V_total:
        raise ValueError(f"ignore_index={ignore_index} is a valid token id for V={V_total}; use a negative value")
    return _VocabParallelPolicy.apply(logits2d, target, old, adv, mask, ref, cu_seqlens, finish_args, bool(check_ids),
                                      backend, group, start, V_total)


def vocab_parallel_logprobs(logits2d, target, *, group, temperature=1.0, ignore_index=-100,
                            return_entropy=False, backend="auto", vocab_start_index=None):
    """Global per-token log-probs (and entropy) from a vocabulary shard ``[N, V_local]``.

    ``target`` holds global ids. Differentiable w.r.t. the shard. Returns
    ``(logp [N], entropy [N] or None, vocab_start, V_total)``.
    """
    name = backends.resolve(backend, logits2d.device)
    start, V_total = shard_layout(logits2d.shape[1], logits2d.shape[0], group, vocab_start_index)
    if 0 <= ignore_index < V_total:
        raise ValueError(f"ignore_index={ignore_index} is a valid token id for V={V_total}; use a negative value")
    if not torch.compiler.is_compiling():
        check_target_ids(target, V_total, ignore_index)
    logp, entropy = _VocabParallelLogprobs.apply(logits2d, target, float(temperature), int(ignore_index),
                                                 bool(return_entropy), name, group, start)
    return logp, (entropy if return_entropy else None), start, V_total
