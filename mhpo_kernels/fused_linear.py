"""lm_head + policy loss, fused: the ``[N, V]`` logits never exist all at once.

At 128k-256k vocabularies the logits (and their gradient), not the model,
dominate RL memory. :func:`fused_linear_mhpo_loss` takes the last hidden states
and the lm_head weight and works over the tokens chunk by chunk::

    for each chunk of rows c:
        z = hidden[c] @ weight.T (+ bias)           # [M, V], input dtype (fp32 accumulation in the matmul)
        logp, entropy, lse, loss, coef = fwd(z)     # the backend's fused forward, one read of z
        bwd(z, dlogp = w[c] * coef) -> z            # d loss / d z, written over z (in place)
        grad_hidden[c] = z @ weight
        grad_weight   += z.T @ hidden[c]            # float32 accumulator, cast once at the end
        grad_bias     += z.sum(0)                   # float32

The loss is a scalar whose per-token weights ``w`` are known from the mask up
front (:func:`mhpo_kernels.loss.aggregation_weights`), so the gradient is
computed during the forward and backward only scales it by the upstream
gradient. Extra memory: one chunk of logits, the float32 ``grad_weight``
accumulator (2x the weight in bf16) and the gradients themselves.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import backends, reference
from ._inputs import MHPOOutput, aggregation_weights, check_target_ids, prepare
from .config import MHPOConfig, resolve_ratio_control
from .metrics import metrics_from_logprobs

__all__ = ["fused_linear_mhpo_loss", "MHPOLinearLoss", "default_chunk_size"]

_HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_chunk_size(V: int, H: int, device_type: str = "cpu") -> int:
    """Token rows per chunk: H rounded to a power of two, clamped to [256, 4096] (CUDA: [512, 4096]).

    Each chunk pays a fixed cost independent of its row count M: reading the
    weight twice and reading + writing the float32 ``grad_weight`` accumulator
    (about 12 bytes per weight element), against ``6 * M * V * H`` flops, so M
    must be a few hundred rows for the matmuls to dominate (measured on a
    2-core CPU at V = 151,936, H = 512, bf16: 256 rows cost 1.25x the time of
    1024 rows, 512 rows 1.1x). M = H makes one chunk of logits ``M * V`` the
    size of the weight ``V * H`` (half the float32 accumulator), whatever V:
    the peak extra memory stays a small multiple of the weight, independent of
    the number of tokens. E.g. H = 512 -> 512 rows (V = 151,936: 156 MB of
    bf16 logits per chunk); H = 4096 -> 4096 rows.
    """
    lo = 512 if device_type == "cuda" else 256
    rows = 2 ** int(round(math.log2(max(H, 1))))
    return int(min(max(rows, lo), 4096))


def _check_linear(hidden, weight, bias):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]}, got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have V >= 1 rows")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be a [V] = [{weight.shape[0]}] tensor")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError("bias must have the weight's dtype and device")


def _linear_grads(z, h, weight, grad_h, acc_w, acc_b, rows):
    """Given z = d loss / d logits of one chunk: grad_hidden rows, grad_weight / grad_bias accumulation."""
    if grad_h is not None:
        torch.mm(z, weight, out=grad_h[rows])
    if acc_w is not None:
        if z.dtype == torch.float32:
            acc_w.addmm_(z.t(), h)
        else:  # bf16 / fp16 products (fp32 inside the matmul), accumulated across chunks in fp32;
            # in blocks of vocabulary rows, so the product's temporary stays small (~16 MB)
            step = max(1, (1 << 23) // max(h.shape[1], 1))
            for v in range(0, acc_w.shape[0], step):
                acc_w[v : v + step].add_(torch.mm(z[:, v : v + step].t(), h))
    if acc_b is not None:
        acc_b.add_(z.sum(0, dtype=torch.float32))


class _FusedLinearPolicyLoss(torch.autograd.Function):
    """Chunked lm_head + fused policy loss; gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, old, adv, mask, ref, agg_w, opts):
        be = _chunk_backend(opts)
        N, V = hidden.shape[0], weight.shape[0]
        want_ent, T, ii = opts["return_entropy"], opts["temperature"], opts["ignore_index"]
        # needs_input_grad ignores no_grad mode: the caller records whether grad mode was on
        need_h, need_w, need_b = (n and opts["grad_enabled"] for n in ctx.needs_input_grad[:3])
        need_grad = need_h or need_w or need_b
        f32 = dict(device=hidden.device, dtype=torch.float32)
        logp, lse, loss_tok, coef = (torch.zeros(N, **f32) for _ in range(4))
        entropy = torch.zeros(N if want_ent else 0, **f32)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_w = torch.zeros(weight.shape, **f32) if need_w else None
        acc_b = torch.zeros(V, **f32) if need_b else None
        wt = weight.t()
        M = opts["chunk_size"]
        for s in range(0, N, M):
            r = slice(s, min(s + M, N))
            h = hidden[r]
            z = torch.addmm(bias, h, wt) if bias is not None else torch.mm(h, wt)
            out = be.fwd(z, target[r], old[r], adv[r], mask[r], None if ref is None or not opts["beta"] else ref[r],
                         opts["mode"], opts["params"], opts["beta"], T, ii, want_ent)
            for dst, src in zip((logp, entropy, lse, loss_tok, coef), out):
                if dst.numel():
                    dst[r] = src
            if need_grad:
                be.bwd(z, target[r], lse[r], None, (agg_w[r] * coef[r]).contiguous(), None, T, ii, z)
                _linear_grads(z, h, weight, grad_h, acc_w, acc_b, r)
            del z
        if grad_h is not None and opts["group"] is not None:
            dist.all_reduce(grad_h, group=opts["group"])  # every vocabulary shard contributes to d hidden
        ctx.grads = (
            grad_h,
            None if acc_w is None else acc_w.to(weight.dtype),
            None if acc_b is None else acc_b.to(weight.dtype),
        )
        del acc_w, acc_b
        ctx.opts = opts
        ctx.mark_non_differentiable(logp)
        ctx.set_materialize_grads(False)
        if want_ent:  # a gradient through the entropy needs one more chunked pass (recompute)
            ctx.save_for_backward(hidden, weight, bias, target, lse, entropy, agg_w * coef)
        loss = (loss_tok * agg_w).sum()
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_ent):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_mhpo_loss: backward ran twice through the same graph; its gradients "
                "are precomputed and released after the first backward (retain_graph is not supported)"
            )
        grads, ctx.grads = ctx.grads, None
        none = (None,) * 7
        if g_ent is not None:
            return _recompute_grads(ctx, g_loss, g_ent) + none
        if g_loss is None:
            return (None, None, None) + none
        if bool(g_loss != 1):  # the usual loss.backward() has g_loss == 1: hand the buffers over as they are
            grads = tuple(None if g is None else g.mul_(g_loss.to(g.dtype)) for g in grads)
        return grads + none


def _recompute_grads(ctx, g_loss, g_ent):
    """Gradients of g_loss * loss + sum(g_ent * entropy): one more chunked pass over recomputed logits."""
    hidden, weight, bias, target, lse, entropy, dloss_dlogp = ctx.saved_tensors
    opts = ctx.opts
    be = _chunk_backend(opts)
    dlogp = dloss_dlogp * g_loss if g_loss is not None else torch.zeros_like(lse)
    dent = g_ent.float().contiguous()
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    grad_h = torch.empty_like(hidden) if need_h else None
    acc_w = torch.zeros(weight.shape, **f32) if need_w else None
    acc_b = torch.zeros(weight.shape[0], **f32) if need_b else None
    wt, M = weight.t(), opts["chunk_size"]
    for s in range(0, hidden.shape[0], M):
        r = slice(s, min(s + M, hidden.shape[0]))
        h = hidden[r]
        z = torch.addmm(bias, h, wt) if bias is not None else torch.mm(h, wt)
        be.bwd(z, target[r], lse[r], entropy[r], dlogp[r].contiguous(), dent[r], opts["temperature"],
               opts["ignore_index"], z)
        _linear_grads(z, h, weight, grad_h, acc_w, acc_b, r)
        del z
    if grad_h is not None and opts["group"] is not None:
        dist.all_reduce(grad_h, group=opts["group"])
    return (
        grad_h,
        None if acc_w is None else acc_w.to(weight.dtype),
        None if acc_b is None else acc_b.to(weight.dtype),
    )


def _chunk_backend(opts):
    """The backend's launchers; on a vocabulary shard, wrapped to combine statistics across ranks."""
    if opts["group"] is None:
        return backends.get(opts["backend"])
    from .distributed import ShardedBackend, _kernels

    return ShardedBackend(_kernels(opts["backend"]), opts["group"], opts["vocab_start"])


def _ratio_control(config, ratio_control):
    if config is not None and ratio_control is not None:
        raise ValueError("pass either config= (an MHPOConfig) or ratio_control=, not both")
    if ratio_control is None:
        ratio_control = MHPOConfig() if config is None else config
        if not isinstance(ratio_control, MHPOConfig):
            raise TypeError(f"config must be an MHPOConfig, got {type(ratio_control).__name__}; "
                            "other ratio controls go through ratio_control=")
    cfg, level = resolve_ratio_control(ratio_control, None)
    if level != "token":
        raise ValueError(f"fused_linear_mhpo_loss takes token-level ratio controls (MHPOConfig, ClipConfig, "
                         f"SAPOConfig), not {type(cfg).__name__}: a sequence-level ratio needs every token's "
                         "log-prob before any gradient; use mk.policy_loss on the logits")
    return cfg


def fused_linear_mhpo_loss(
    hidden, weight, target_ids, old_logprobs, advantages, mask=None, *, bias=None, chunk_size=None,
    config=None, temperature=1.0, loss_agg_mode="token-mean", ignore_index=-100, ref_logprobs=None,
    beta=0.0, return_entropy=False, backend="auto", ratio_control=None, process_group=None,
    vocab_start_index=None,
) -> MHPOOutput:
    """Policy loss of ``hidden @ weight.T + bias`` without materialising the ``[N, V]`` logits.

    Same result as ``mk.mhpo_loss(F.linear(hidden, weight, bias), ...)``, with
    gradients for ``hidden``, ``weight`` and ``bias``.

    Args:
        hidden: [B, T, H] or [N, H] last hidden states; float32 / bfloat16 / float16
            (float64 with ``backend="torch"``); CPU or CUDA.
        weight: [V, H] lm_head weight, hidden's dtype and device.
        target_ids, old_logprobs, advantages, mask: as :func:`mhpo_kernels.mhpo_loss`
            (shape ``hidden.shape[:-1]``; advantages may be [B] for [B, T, H]).
        bias: optional [V] lm_head bias.
        chunk_size: token rows per chunk; None = :func:`default_chunk_size`.
        config: :class:`MHPOConfig` shorthand (None = paper defaults).
        ratio_control: any token-level ratio control (``MHPOConfig``, ``ClipConfig``,
            ``SAPOConfig``); exclusive with ``config``.
        temperature, loss_agg_mode, ignore_index, ref_logprobs, beta, backend:
            as :func:`mhpo_kernels.mhpo_loss`. ``backend`` resolves against the
            hidden states' device; ``"torch"`` (the reference, also what "auto"
            gives where no fused backend exists) computes the plain unfused
            ``F.linear`` + reference loss, chunk-free.
        return_entropy: also return the per-token entropy. It is differentiable;
            backpropagating through it costs one more chunked pass (the logits
            are recomputed), while the loss alone needs none.
        process_group, vocab_start_index: a vocabulary-parallel lm_head (tensor
            parallelism): ``weight`` (and ``bias``) hold this rank's vocabulary
            rows ``[vocab_start_index, vocab_start_index + V_local)`` (default:
            after the rows of lower ranks), ``hidden`` is replicated. Per chunk
            only O(chunk) statistics are all-reduced; the gradient of ``hidden``
            is all-reduced once (O(N * H)); each rank gets its weight shard's
            gradient. ``chunk_size`` must agree across ranks (checked).

    Returns:
        :class:`MHPOOutput` ``(loss, logprobs, entropy, metrics)``.

    The gradient is computed during the forward pass (when any of hidden,
    weight, bias requires grad) and kept until backward, which scales it by the
    upstream gradient; a second backward through the same graph raises.

    Example::

        >>> import torch, mhpo_kernels as mk
        >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> head = torch.nn.Linear(16, 1000, bias=False)
        >>> ids = torch.randint(0, 1000, (2, 5))
        >>> old = torch.full((2, 5), -7.0)
        >>> out = mk.fused_linear_mhpo_loss(hidden, head.weight, ids, old, torch.tensor([1.0, -1.0]))
        >>> out.loss.backward()
    """
    ratio_control = _ratio_control(config, ratio_control)
    _check_linear(hidden, weight, bias)
    name = backends.resolve(backend, hidden.device)
    sharded = process_group is not None
    common = dict(
        ratio_control=ratio_control, temperature=temperature, loss_agg_mode=loss_agg_mode,
        ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta, return_entropy=return_entropy,
    )
    if name == "torch" and not sharded:
        return reference.policy_loss(
            F.linear(hidden, weight, bias), target_ids, old_logprobs, advantages, mask,
            importance_sampling_level="token", **common
        )
    if hidden.dtype not in _HIDDEN_DTYPES and name != "torch":
        raise TypeError(f"backend {name!r} takes float32 / bfloat16 / float16 hidden states, got {hidden.dtype}; "
                        "use backend='torch' for float64")
    V, H = weight.shape
    if chunk_size is None:
        chunk_size = default_chunk_size(V, H, hidden.device.type)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    start, V_total = 0, V
    if sharded:
        from .distributed import shard_layout

        N = math.prod(hidden.shape[:-1])
        start, V_total = shard_layout(V, N, process_group, vocab_start_index, chunk_size)
    # a [.., V] view of V elements stands in for the logits: prepare() validates and flattens the rest
    proxy = torch.zeros(V_total, device=hidden.device, dtype=hidden.dtype).expand(*hidden.shape[:-1], V_total)
    x = prepare(
        proxy, target_ids, old_logprobs, advantages, mask, temperature=temperature,
        loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs,
        beta=beta, compute_dtype=torch.float32,
    )
    check_target_ids(x.target, V_total, ignore_index)
    agg_w = aggregation_weights(x.mask, x.seq_shape, loss_agg_mode)
    opts = dict(
        backend=name, mode=ratio_control.kernel_mode, params=list(ratio_control.kernel_params()),
        beta=float(beta), temperature=float(temperature), ignore_index=int(ignore_index),
        return_entropy=bool(return_entropy), chunk_size=chunk_size,
        grad_enabled=torch.is_grad_enabled(), group=process_group, vocab_start=start,
    )
    h2d = hidden.reshape(-1, H)
    if h2d.numel() and h2d.stride(-1) != 1:
        h2d = h2d.contiguous()
    loss, logp, entropy = _FusedLinearPolicyLoss.apply(
        h2d, weight, bias, x.target, x.old, x.adv, x.mask, x.ref, agg_w, opts
    )
    metrics = metrics_from_logprobs(ratio_control, logp, x.old, x.adv, x.mask, x.ref,
                                    entropy if return_entropy else None)
    return MHPOOutput(loss, logp.reshape(x.shape), entropy.reshape(x.shape) if return_entropy else None, metrics)


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
        _ratio_control(config, kwargs.get("ratio_control"))  # fail early on a bad config

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
