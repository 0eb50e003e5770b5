"""lm_head + policy loss, fused: the ``[N, V]`` logits never exist all at once.

At 128k-256k vocabularies the logits (and their gradient), not the model,
dominate RL memory. :func:`fused_linear_mhpo_loss` takes the last hidden states
and the lm_head weight and works over tiles of ``M`` token rows by ``Vc``
vocabulary rows (by default ``M = N``: every token at once)::

    forward (no gradient kept):
        for each vocabulary chunk c, token chunk r:
            z = hidden[r] @ weight[c].T (+ bias[c])       # [M, Vc]
            partial lse / entropy / target logit of z     # the backend's forward on a vocabulary slice,
                                                          # stacked into a [slices, k, N] buffer
        merge the partials per row -> logp, entropy, lse  # one combine launch, O(N)
        loss from logp (token- or sequence-level ratio control, any aggregation)  # one finish launch, O(N)
    backward (d loss / d logp and d / d entropy known now):
        for each vocabulary chunk c:
            for each token chunk r:
                z = hidden[r] @ weight[c].T (+ bias[c])   # recomputed
                bwd(z) -> d loss / d z, over z            # the backend's backward on the slice
                grad_hidden[r] += z @ weight[c]           # float32 [N, H] accumulator
                gw_c (+)= z.T @ hidden[r]                 # M = N: one GEMM writes grad_weight[c]
            grad_weight[c] = gw_c; grad_bias[c] = z.sum(0)

**Why the vocabulary is the outer loop.** A slice ``grad_weight[c]`` is
finished, with float32 accumulation inside one GEMM over all N tokens, before
the next slice starts, so the extra memory is the gradients themselves
(``grad_weight`` in the weight's dtype, ``grad_hidden``) plus one tile of
scratch: no ``[V, H]`` float32 accumulator (the earlier token-chunked design
kept one, 4·V·H bytes, more than the unfused path at small N). Finishing a
slice needs every row's log-sum-exp first, so the backward recomputes the
logits: 4 GEMMs of ``2·N·V·H`` flops instead of 3. The alternative that keeps
token chunks outermost cannot avoid the ``[V, H]`` fp32 accumulator (every
token chunk touches every slice); the variant with token chunks *inside* a
vocabulary chunk (``chunk_size < N``: a ``[Vc, H]`` fp32 accumulator per
slice) is kept for very large N, where one ``[N, Vc]`` tile would not fit the
scratch budget. Measured on a shared 2-core AVX2 CPU (N = 4096, H = 512,
V = 151,936 bf16, fwd + bwd, alternating runs in one process, load average ~10
from other jobs): all tokens per tile (``M = N``, Vc = 6,400) 287 s and 396 s;
``M = 512`` token chunks (Vc = 16,384, the same scratch) 437 s and 388 s. No gain
from token chunks, which also need the ``[Vc, H]`` accumulator's extra read and
write per chunk: ``M = N`` is the default (commands in
``bench/results/fused-linear-N4096-bf16/README.md``).

**GEMM precision.** On CUDA (and on CPUs with native bf16 matmuls) the tiles
are computed in the input dtype with float32 accumulation inside the GEMM, as
eager ``F.linear`` does. On a CPU without bf16 / fp16 matrix instructions
PyTorch's half-precision matmuls fall back to slow generic loops (measured
here: up to 75x slower than float32), so half-precision inputs are upcast per
tile and multiplied in float32: faster, and the logits are not rounded to bf16.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import backends
from ._finish import AGG_IDS, finish_mode, metric_names, metrics_dict, token_metrics
from ._inputs import (
    MHPOOutput, _flat, agg_norm, check_cu_seqlens, check_ignore_index, check_loss_args, check_target_ids,
    check_reduce, check_temperature, kl_estimator_id, prepare_rows, prepare_weights, seq_shape_of,
)
from ._ops import FinishedLoss
from .distributed import combine, gather_stats, shard_layout
from .config import KERNEL_PARAMS, MODE_NONE, MHPOConfig, resolve_ratio_control

__all__ = ["fused_linear_mhpo_loss", "MHPOLinearLoss", "default_chunk_sizes"]

_SCRATCH_CAP = 128 * 2**20  # bytes of tile scratch at most (a [4096, 8192] fp32 tile); GEMMs are efficient well below
_SCRATCH_MIN = 4 * 2**20
_MIN_COLS = 512  # fewest vocabulary rows per tile worth a GEMM call


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the tile GEMMs run in: the input dtype, except half types on a CPU without
    native half-precision matmul instructions (AVX-512 BF16 / AMX), where float32 is much faster."""
    if dtype == torch.float32 or torch.device(device).type != "cpu":
        return dtype
    forced = os.environ.get("MHPO_FUSED_LINEAR_GEMM")
    if forced in ("native", "float32"):
        return dtype if forced == "native" else torch.float32
    cpu = torch.cpu
    if dtype == torch.bfloat16 and (getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)()):
        return dtype
    if dtype == torch.float16 and getattr(cpu, "_is_amx_fp16_supported", lambda: False)():
        return dtype
    return torch.float32


def _free_bytes(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_chunk_sizes(N: int, V: int, H: int, dtype=torch.bfloat16, device="cpu", free_bytes=None):
    """``(token rows, vocabulary rows)`` per tile, from N, V, H, the dtype and free memory.

    The tile scratch (the ``[M, Vc]`` logits tile in the GEMM dtype, plus, where
    the GEMMs run in float32 on half inputs or with token chunks, ``[Vc, H]``
    float32 copies of the weight slice and its gradient) is held under
    ``min(128 MiB, free / 16, N * V * elem)``: never more than the unfused logits
    would take, so the fused path's extra memory stays below the unfused path's at
    every N. All N tokens go in one tile (``M = N``, one GEMM finishes each
    weight-gradient slice) unless that leaves fewer than 512 vocabulary rows per
    tile; then token chunks of the largest size that fits.
    """
    device = torch.device(device)
    ge = torch.empty((), dtype=gemm_dtype(dtype, device)).element_size()
    elem = torch.empty((), dtype=dtype).element_size()
    if free_bytes is None:
        free_bytes = _free_bytes(device)
    budget = _SCRATCH_CAP if free_bytes is None else min(_SCRATCH_CAP, free_bytes // 16)
    budget = max(min(budget, N * V * elem), _SCRATCH_MIN)
    convert = ge != elem
    per_col_w = H * ge * convert  # the weight slice's GEMM-dtype copy
    rows = max(N, 1)
    if rows * _MIN_COLS * ge + _MIN_COLS * (per_col_w + H * 4 * convert) > budget:
        rows = max(1, (budget // 2) // (_MIN_COLS * ge))  # token chunks: [Vc, H] fp32 accumulator per slice
    acc = H * 4 if (rows < N or convert) else 0
    cols = budget // (rows * ge + per_col_w + acc)
    cols = int(max(1, min(V, cols if cols < V else V)))
    if cols > 256 and cols < V:
        cols -= cols % 256
    return int(min(rows, max(N, 1))), cols


def _check_linear(hidden, weight, bias, prefix=""):
    h, w, b = prefix + "hidden", prefix + "weight", prefix + "bias"
    for name, t in ((h, hidden), (w, weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{h} must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w} must be [V, H] with H = {hidden.shape[-1]}, got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{w} must have V >= 1 rows")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{h} ({hidden.dtype}) and {w} ({weight.dtype}) must have the same dtype")
    if hidden.device != weight.device:
        raise ValueError(f"{h} is on {hidden.device} but {w} is on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{b} must be a [V] = [{weight.shape[0]}] tensor")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"{b} must have the {w}'s dtype and device")


def _tiles(N, V, rows, cols):
    for c0 in range(0, V, cols):
        c = slice(c0, min(c0 + cols, V))
        yield c, [slice(r0, min(r0 + rows, N)) for r0 in range(0, N, rows)]


def _gemm_operands(hidden, weight, bias, cdt):
    """hidden in the GEMM dtype (one copy for the whole pass when it differs) and a per-slice converter."""
    h = hidden if hidden.dtype == cdt else hidden.to(cdt)

    def slice_(c):
        w = weight[c]
        b = None if bias is None else bias[c]
        if w.dtype != cdt:
            w = w.to(cdt)
            b = None if b is None else b.to(cdt)
        return w, b
    return h, slice_


def _logits_tile(h, w, b):
    return torch.addmm(b, h, w.t()) if b is not None else torch.mm(h, w.t())


@dataclass(frozen=True)
class _TileOpts:
    """How the tile loop runs: the backend's launchers, the softmax's temperature and ignored id,
    the tile shape, and the vocabulary shard (``group`` None: one device holds all of V)."""

    kernels: object
    temperature: float
    ignore_index: int
    want_entropy: bool
    rows: int
    cols: int
    group: object = None
    vocab_start: int = 0
    layout: object = None  # distributed.ShardLayout of the group


class _LinearLogprobs(torch.autograd.Function):
    """Per-token log-probs (and entropy) of ``softmax((hidden @ weight.T + bias) / T)``, chunked,
    for one or two heads (the policy and, optionally, a reference lm_head) in the same tile loop.

    Differentiable w.r.t. every tensor input; the backward is one more chunked pass
    (logits recomputed) that writes each weight-gradient slice once.
    """

    @staticmethod
    def forward(ctx, opts, target, hidden, weight, bias, ref_hidden, ref_weight, ref_bias):
        kern = opts.kernels
        N, V = hidden.shape[0], weight.shape[0]
        T, ii, start = opts.temperature, opts.ignore_index, opts.vocab_start
        heads = [(hidden, weight, bias, opts.want_entropy)]
        if ref_weight is not None:
            heads.append((ref_hidden, ref_weight, ref_bias, False))
        cdt = gemm_dtype(hidden.dtype, hidden.device)
        rows, cols = opts.rows, opts.cols
        unused = hidden.new_empty(N, dtype=torch.float32)  # MODE_NONE: the pass never reads old / adv / mask
        params = [0.0] * KERNEL_PARAMS
        results = []
        for h_in, w_in, b_in, want_ent in heads:
            h, slice_ = _gemm_operands(h_in, w_in, b_in, cdt)
            tiles = list(_tiles(N, V, rows, cols))
            # per vocabulary slice: lse, logp (x_y - lse where the slice holds the target, else 0), entropy
            stats = torch.empty(len(tiles), 3 if want_ent else 2, N, device=hidden.device, dtype=torch.float32)
            for i, (c, rs) in enumerate(tiles):
                w, b = slice_(c)
                for r in rs:
                    z = _logits_tile(h[r], w, b)
                    logp_k, ent_k, lse_k, _, _ = kern.fwd(z, target[r], unused[r], unused[r], unused[r], None,
                                                          MODE_NONE, params, 0.0, T, ii, want_ent,
                                                          vocab_start=start + c.start)
                    torch.stack((lse_k, logp_k, ent_k) if want_ent else (lse_k, logp_k), out=stats[i, :, r])
                    del z
            del h
            # one combine launch merges the slices; a vocabulary shard then merges with the other ranks'
            logp, ent, lse = combine(kern, stats, target, [start + c.start for c, _ in tiles],
                                     [c.stop - c.start for c, _ in tiles], ii)
            if opts.group is not None:
                stats = gather_stats((lse, logp, ent) if want_ent else (lse, logp), opts.group)
                logp, ent, lse = combine(kern, stats, target, opts.layout.starts, opts.layout.sizes, ii)
            results.append((logp, ent if want_ent else None, lse))
        logp, ent, lse = results[0]
        ref_logp, _, ref_lse = results[1] if len(results) > 1 else (logp.new_empty(0), None, None)
        ent = ent if ent is not None else logp.new_empty(0)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(target, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ent, ref_lse)
        return logp, ent, ref_logp

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_ref):
        target, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ent, ref_lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = [None] * 8
        heads = [(2, hidden, weight, bias, lse, ent if g_ent is not None else None, g_logp, g_ent)]
        if ref_weight is not None:
            heads.append((5, ref_hidden, ref_weight, ref_bias, ref_lse, None, g_ref, None))
        for i, h, w, b, lse_h, ent_h, dlogp, dent in heads:
            want = (need[i], need[i + 1], need[i + 2] and b is not None)
            if any(want):
                grads[i:i + 3] = _grad_pass(ctx.opts, target, h, w, b, lse_h, ent_h, dlogp, dent, want)
        return tuple(grads)


def _has_out_dtype() -> bool:
    try:
        x = torch.empty(1, 1, device="meta", dtype=torch.bfloat16)
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


_OUT_DTYPE = _has_out_dtype()  # torch.mm(..., out_dtype=float32): bf16 / fp16 products in fp32 (CUDA)


def _addmm_f32(acc, a, b):
    """acc (float32) += a @ b, with the product kept in float32 where the GEMM can write it."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _OUT_DTYPE:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:  # half-precision product rounded once per tile, then accumulated in float32
        acc.add_(torch.mm(a, b))


def _grad_pass(opts, target, hidden, weight, bias, lse, entropy, dlogp, dent, want):
    """Gradients of ``sum(dlogp * logp) + sum(dent * entropy)`` w.r.t. (hidden, weight, bias)."""
    need_h, need_w, need_b = want
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    grad_w = torch.empty(weight.shape, device=dev, dtype=weight.dtype) if need_w else None
    grad_b = torch.empty(V, device=dev, dtype=weight.dtype) if need_b else None
    if N == 0 or (dlogp is None and dent is None):  # nothing flows back: exact zeros, no pass
        zeros = [torch.zeros_like(hidden) if need_h else None, grad_w, grad_b]
        for g in zeros[1:]:
            if g is not None:
                g.zero_()
        return zeros
    dlogp = torch.zeros(N, **f32) if dlogp is None else dlogp.float().contiguous()
    if dent is not None:
        dent = dent.float().contiguous()
    else:
        entropy = None
    kern, T, ii, start = opts.kernels, opts.temperature, opts.ignore_index, opts.vocab_start
    cdt = gemm_dtype(hidden.dtype, dev)
    rows, cols = opts.rows, opts.cols
    acc_h = None
    if need_h:  # float32 across vocabulary slices; the gradient itself when hidden is float32
        acc_h = torch.zeros(N, H, **f32)
    h, slice_ = _gemm_operands(hidden, weight, bias, cdt)
    one_tile = rows >= N
    for c, rs in _tiles(N, V, rows, cols):
        w, b = slice_(c)
        gw = None
        if need_w and not (one_tile and cdt == weight.dtype):
            gw = torch.zeros(c.stop - c.start, H, **f32)  # [Vc, H] slice accumulator
        gb = torch.zeros(c.stop - c.start, **f32) if need_b else None
        for r in rs:
            z = _logits_tile(h[r], w, b)
            ent_r = None if entropy is None else entropy[r]
            dent_r = None if dent is None else dent[r]
            kern.bwd(z, target[r], lse[r], ent_r, dlogp[r], dent_r, T, ii, z, vocab_start=start + c.start)
            if need_h:
                _addmm_f32(acc_h[r], z, w)
            if need_w:
                if gw is None:  # all tokens in one tile, GEMM in the weight's dtype: fp32 inside the GEMM
                    torch.mm(z.t(), h[r], out=grad_w[c])
                else:
                    _addmm_f32(gw, z.t(), h[r])
            if need_b:
                gb.add_(z.sum(0, dtype=torch.float32))
            del z
        if gw is not None:
            grad_w[c].copy_(gw)
        if need_b:
            grad_b[c].copy_(gb)
        del w, b, gw
    del h
    grad_h = None
    if need_h:
        if opts.group is not None:
            dist.all_reduce(acc_h, group=opts.group)  # every vocabulary shard contributes to d hidden
        grad_h = acc_h if hidden.dtype == torch.float32 else acc_h.to(hidden.dtype)
    return grad_h, grad_w, grad_b


def _ratio_control(config, ratio_control, importance_sampling_level=None):
    if config is not None and ratio_control is not None:
        raise ValueError("pass either config= (an MHPOConfig) or ratio_control=, not both")
    if ratio_control is None:
        ratio_control = MHPOConfig() if config is None else config
        if not isinstance(ratio_control, MHPOConfig):
            raise TypeError(f"config must be an MHPOConfig, got {type(ratio_control).__name__}; "
                            "other ratio controls go through ratio_control=")
    return resolve_ratio_control(ratio_control, importance_sampling_level)


def _ref_head(hidden, weight, ref_hidden, ref_weight, ref_bias, ref_logprobs):
    """(ref_hidden, ref_weight, ref_bias) as [N, H'] / [V, H'] / [V], or None without a reference head."""
    if ref_hidden is None and ref_weight is None:
        if ref_bias is not None:
            raise ValueError("ref_bias needs ref_weight (or ref_hidden)")
        return None
    if ref_logprobs is not None:
        raise ValueError("pass either ref_logprobs or ref_weight / ref_hidden (the reference head), not both")
    # the reference head shares what is not given; shared hidden states carry no gradient through it
    rh = hidden.detach() if ref_hidden is None else ref_hidden
    rw = weight.detach() if ref_weight is None else ref_weight
    _check_linear(rh, rw, ref_bias, prefix="ref_")
    if tuple(rh.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden must be [{', '.join(map(str, hidden.shape[:-1]))}, H'], "
                         f"got shape {tuple(rh.shape)}")
    if rw.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have the policy's V = {weight.shape[0]} rows, got {rw.shape[0]}")
    if rh.dtype != hidden.dtype or rh.device != hidden.device:
        raise TypeError("the reference head must have hidden's dtype and device")
    rh = rh.reshape(-1, rh.shape[-1])
    return (rh if rh.stride(-1) == 1 else rh.contiguous()), rw, ref_bias


def _check_chunk(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def fused_linear_mhpo_loss(
    hidden, weight, target_ids, old_logprobs, advantages, mask=None, *, bias=None, chunk_size=None,
    vocab_chunk_size=None, config=None, temperature=1.0, loss_agg_mode="token-mean", ignore_index=-100,
    ref_logprobs=None, beta=0.0, return_entropy=False, backend="auto", ratio_control=None,
    importance_sampling_level=None, cu_seqlens=None, ref_hidden=None, ref_weight=None, ref_bias=None,
    process_group=None, vocab_start_index=None, loss_scale_factor=None, global_batch_size=None,
    global_num_tokens=None, dp_size=1, importance_weights=None, kl_estimator="k3", reduce=True,
) -> MHPOOutput:
    """Policy loss of ``hidden @ weight.T + bias`` without materialising the ``[N, V]`` logits.

    Same result as ``mk.policy_loss(F.linear(hidden, weight, bias), ...)``, with
    gradients for ``hidden``, ``weight`` and ``bias`` (and the reference head's
    tensors, when given and requiring grad). Extra memory: the gradients
    themselves plus one tile of scratch (:func:`default_chunk_sizes`).

    Args:
        hidden: [B, T, H] or [N, H] last hidden states; float32 / bfloat16 / float16
            (float64 with ``backend="reference"``); CPU or CUDA.
        weight: [V, H] lm_head weight, hidden's dtype and device.
        target_ids, old_logprobs, advantages, mask: as :func:`mhpo_kernels.policy_loss`
            (shape ``hidden.shape[:-1]``; advantages may be [B] for [B, T, H]).
        bias: optional [V] lm_head bias.
        chunk_size, vocab_chunk_size: token rows and vocabulary rows per tile;
            None = :func:`default_chunk_sizes` (all tokens, and as many
            vocabulary rows as fit the scratch budget).
        config: :class:`MHPOConfig` shorthand (None = paper defaults).
        ratio_control, importance_sampling_level: any ratio control of
            :func:`mhpo_kernels.policy_loss` (``MHPOConfig``, ``ClipConfig``,
            ``SAPOConfig``, ``GSPOConfig``, ``CISPOConfig``), token- or sequence-level; exclusive
            with ``config``. Sequence-level ratios work unchanged: every log-prob
            is computed (no gradient kept) before the gradient pass.
        cu_seqlens: packed sequences over ``[N, H]`` hidden states, as in
            :func:`mhpo_kernels.policy_loss`.
        temperature, loss_agg_mode, ignore_index, ref_logprobs, beta, backend,
        loss_scale_factor, global_batch_size, global_num_tokens, dp_size,
        importance_weights, kl_estimator, reduce:
            as :func:`mhpo_kernels.policy_loss`. ``backend`` resolves against the
            hidden states' device (the tiles run its launchers; ``"torch"`` on any
            device); ``"reference"`` computes the plain unfused ``F.linear`` +
            reference loss.
        ref_hidden, ref_weight, ref_bias: a reference policy's lm_head (Liger's
            ``ref_input`` / ``ref_weight``) instead of ``ref_logprobs``: its
            log-probs come from the same chunked tile loop, the reference logits
            never exist at once. Either may be omitted: a missing ``ref_hidden``
            means the policy's hidden states, a missing ``ref_weight`` the policy's
            weight (both then used detached). Given tensors that require grad get
            the KL term's gradient.
        return_entropy: also return the per-token entropy (differentiable).
        process_group, vocab_start_index: a vocabulary-parallel lm_head (tensor
            parallelism): ``weight`` (and ``bias``, ``ref_weight``) hold this
            rank's vocabulary rows ``[vocab_start_index, vocab_start_index +
            V_local)`` (default: after the rows of lower ranks), ``hidden`` is
            replicated. Per call, O(N) statistics are all-gathered once per head;
            the gradient of ``hidden`` is all-reduced once (O(N * H)); each rank
            gets its weight shard's gradient.

    Returns:
        :class:`MHPOOutput` ``(loss, logprobs, entropy, metrics)``.

    The forward keeps only O(N) statistics (and references to its inputs); the
    backward recomputes the logits tile by tile, so ``retain_graph=True`` and
    repeated backwards work like any autograd graph.

    Example::

        >>> import torch, mhpo_kernels as mk
        >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> head = torch.nn.Linear(16, 1000, bias=False)
        >>> ids = torch.randint(0, 1000, (2, 5))
        >>> old = torch.full((2, 5), -7.0)
        >>> out = mk.fused_linear_mhpo_loss(hidden, head.weight, ids, old, torch.tensor([1.0, -1.0]))
        >>> out.loss.backward()
    """
    cfg, level = _ratio_control(config, ratio_control, importance_sampling_level)
    _check_linear(hidden, weight, bias)
    ref_head = _ref_head(hidden, weight, ref_hidden, ref_weight, ref_bias, ref_logprobs)
    _check_chunk("chunk_size", chunk_size)
    _check_chunk("vocab_chunk_size", vocab_chunk_size)
    name = backends.resolve(backend, hidden.device)
    sharded = process_group is not None
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(f"cu_seqlens needs packed [N, H] hidden states, got shape {tuple(hidden.shape)}")
        # the data checks read the offsets (a host sync) before the tile loop's GEMMs, not after them
        check_cu_seqlens(cu_seqlens, math.prod(hidden.shape[:-1]), hidden.device)
    if name == backends.REFERENCE:
        if sharded:
            raise ValueError("backend='reference' has no vocabulary-parallel form; use backend='torch'")
        ref = backends.reference()
        if ref_head is not None:
            rh, rw, rb = ref_head
            ref_logprobs = ref.token_logprobs(F.linear(rh, rw, rb).reshape(*hidden.shape[:-1], -1), target_ids,
                                              temperature=temperature, ignore_index=ignore_index)
        return ref.policy_loss(
            F.linear(hidden, weight, bias), target_ids, old_logprobs, advantages, mask, ratio_control=cfg,
            importance_sampling_level=level, cu_seqlens=cu_seqlens, temperature=temperature,
            loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta,
            return_entropy=return_entropy, loss_scale_factor=loss_scale_factor, global_batch_size=global_batch_size,
            global_num_tokens=global_num_tokens, dp_size=dp_size, importance_weights=importance_weights,
            kl_estimator=kl_estimator, reduce=reduce,
        )
    backends.check_dtype(name, hidden.dtype, "hidden states")
    if hidden.dtype == torch.float64:
        raise TypeError("the fused lm_head tiles take float32 / bfloat16 / float16 hidden states, got "
                        "torch.float64; use backend='reference' for float64")
    check_loss_args(loss_agg_mode, beta, ref_logprobs is not None or ref_head is not None)
    kl_est = kl_estimator_id(kl_estimator)
    check_reduce(reduce)
    norm = agg_norm(loss_agg_mode, loss_scale_factor, global_batch_size, global_num_tokens, dp_size)
    check_temperature(temperature)

    V, H = weight.shape
    shape = tuple(hidden.shape[:-1])
    N = math.prod(shape)
    rows, cols = default_chunk_sizes(N, V, H, hidden.dtype, hidden.device)
    rows, cols = chunk_size or rows, vocab_chunk_size or cols
    start, V_total, layout = 0, V, None
    if sharded:
        layout = shard_layout(V, N, process_group, vocab_start_index, rows)
        start, V_total = layout.start, layout.total
    check_ignore_index(ignore_index, V_total)
    target = _flat("target_ids", target_ids, shape, hidden.device, torch.int64, allow=("int",))
    check_target_ids(target, V_total, ignore_index)  # before the GEMMs (one host sync)
    old, adv, m, ref = prepare_rows(shape, hidden.device, old_logprobs, advantages, mask, ref_logprobs,
                                    torch.float32)
    iw = prepare_weights(importance_weights, shape, hidden.device, torch.float32)
    opts = _TileOpts(backends.get(name), float(temperature), int(ignore_index), bool(return_entropy), rows, cols,
                     process_group, start, layout)
    h2d = hidden.reshape(-1, H)
    if h2d.numel() and h2d.stride(-1) != 1:
        h2d = h2d.contiguous()
    rh, rw, rb = ref_head if ref_head is not None else (None, None, None)
    logp, entropy, ref_logp = _LinearLogprobs.apply(opts, target, h2d, weight, bias, rh, rw, rb)
    if ref_head is not None:
        ref = ref_logp
    B, T = seq_shape_of(shape)
    loss, metrics, tok = FinishedLoss.apply(
        logp, entropy if return_entropy else None, old, adv, m, ref, target, cu_seqlens, B, T, finish_mode(cfg),
        list(cfg.kernel_params()), float(beta), level == "sequence", AGG_IDS[loss_agg_mode], int(ignore_index),
        V_total, False, name, norm, iw, kl_est, reduce)
    metrics = metrics_dict(metrics, metric_names(cfg, return_entropy, ref is not None))
    if not reduce:
        loss = loss.reshape(shape)
        metrics.update(token_metrics(cfg, tok, shape, ref is not None))
    return MHPOOutput(loss, logp.detach().reshape(shape), entropy.reshape(shape) if return_entropy else None, metrics)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module that owns ``weight`` / ``bias`` under FSDP1's wrapper (FSDP2 / ZeRO-3 keep the module)."""
    while hasattr(module, "_fsdp_wrapped_module"):
        module = module._fsdp_wrapped_module
    return module


class MHPOLinearLoss(nn.Module):
    """:func:`fused_linear_mhpo_loss` over an ``nn.Linear`` lm_head, as a module.

    The loss runs *inside* ``lm_head.__call__`` (its ``forward`` is swapped for
    the duration of the call), so wrappers that gather parameters in forward
    hooks see an ordinary forward of the lm_head and hand it the full weight:
    FSDP1 ``FullyShardedDataParallel(lm_head)``, FSDP2 ``fully_shard(lm_head)``
    and DeepSpeed ZeRO-3. Only ``hidden`` goes through the wrapper (so
    mixed-precision input casts never touch the float32 log-probs and
    advantages). Call it inside the model's forward like the lm_head itself;
    forward hooks that expect logits from the lm_head see an MHPOOutput instead.
    A vocabulary-parallel lm_head takes ``process_group=`` (and optionally
    ``vocab_start_index=``) like :func:`fused_linear_mhpo_loss`.

    Example::

        >>> import torch, mhpo_kernels as mk
        >>> head = torch.nn.Linear(16, 1000, bias=False)
        >>> loss_fn = mk.MHPOLinearLoss(head, loss_agg_mode="seq-mean-token-mean")
        >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> ids, old = torch.randint(0, 1000, (2, 5)), torch.full((2, 5), -7.0)
        >>> out = loss_fn(hidden, ids, old, torch.tensor([1.0, -1.0]))
        >>> out.loss.backward()
    """

    def __init__(self, lm_head: nn.Module, config=None, **kwargs):
        super().__init__()
        if not isinstance(_unwrap(lm_head), nn.Linear):
            raise TypeError(f"lm_head must be an nn.Linear (possibly FSDP-wrapped), got {type(lm_head).__name__}")
        self.lm_head = lm_head
        self.defaults = dict(kwargs, config=config)
        _ratio_control(config, kwargs.get("ratio_control"), kwargs.get("importance_sampling_level"))  # fail early

    def forward(self, hidden, target_ids, old_logprobs, advantages, mask=None, **overrides) -> MHPOOutput:
        kw = {**self.defaults, **overrides}
        if "ratio_control" in overrides and "config" not in overrides:
            kw["config"] = None
        inner = _unwrap(self.lm_head)

        def run(h):
            return fused_linear_mhpo_loss(h, inner.weight, target_ids, old_logprobs, advantages, mask,
                                          bias=inner.bias, **kw)

        inner.forward = run
        try:
            return self.lm_head(hidden)
        finally:
            del inner.forward

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.defaults.items() if v is not None)
