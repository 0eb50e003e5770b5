"""Public entry points: the fused MHPO loss and its dispatch."""
from __future__ import annotations

import torch

from . import backends, reference
from ._inputs import MHPOOutput, prepare, safe_div
from ._ops import fused_fwd
from .config import MHPOConfig
from .metrics import policy_metrics


def aggregation_weights(mask, seq_shape, loss_agg_mode):
    """Per-token weights w with ``loss = sum(w * L)`` for each aggregation mode of the spec."""
    B, T = seq_shape
    m = mask.reshape(B, T)
    if loss_agg_mode == "token-mean":
        w = safe_div(m, m.sum())
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        w = m / max(B * T, 1)
    else:
        count = m.sum(-1, keepdim=True)
        n_seq = (count != 0).sum().to(m.dtype)  # fully masked sequences are not counted
        w = safe_div(safe_div(m, count) if loss_agg_mode == "seq-mean-token-mean" else m, n_seq)
    return w.reshape(-1)


def fused_policy_loss(
    logits, target_ids, old_logprobs, advantages, mask=None, *, ratio_control,
    temperature=1.0, loss_agg_mode="token-mean", ignore_index=-100, ref_logprobs=None,
    beta=0.0, return_entropy=False, backend="auto", inplace_backward=False,
) -> MHPOOutput:
    """Token-level policy loss of any ratio control through the fused kernels."""
    name = backends.resolve(backend, logits.device) if isinstance(logits, torch.Tensor) else "torch"
    common = dict(
        ratio_control=ratio_control, temperature=temperature, loss_agg_mode=loss_agg_mode,
        ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta, return_entropy=return_entropy,
    )
    if name == "torch":
        return reference.policy_loss_reference(logits, target_ids, old_logprobs, advantages, mask, **common)
    if logits.dtype == torch.float64:
        raise TypeError(f"backend {name!r} takes float32 / bfloat16 / float16 logits; use backend='torch' for float64")
    x = prepare(
        logits, target_ids, old_logprobs, advantages, mask, temperature=temperature,
        loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs,
        beta=beta, compute_dtype=torch.float32,
    )
    logp, entropy, _, loss_tok, _ = fused_fwd(
        x.logits, x.target, x.old, x.adv, x.mask, x.ref, ratio_control.kernel_mode,
        list(ratio_control.kernel_params()), float(beta), float(temperature), int(ignore_index),
        bool(return_entropy), bool(inplace_backward), name,
    )
    loss = (loss_tok * aggregation_weights(x.mask, x.seq_shape, loss_agg_mode)).sum()

    with torch.no_grad():
        active = x.mask != 0
        zero = torch.zeros_like(x.old)
        delta = torch.where(active, logp - x.old, zero)
        kl = None
        if x.ref is not None:
            d = torch.where(active, x.ref - logp, zero)
            kl = torch.expm1(d) - d  # k3, accurate near d = 0
    metrics = policy_metrics(ratio_control, delta, active, entropy if return_entropy else None, kl,
                             adv=torch.where(active, x.adv, zero))
    return MHPOOutput(
        loss, logp.detach().reshape(x.shape), entropy.reshape(x.shape) if return_entropy else None, metrics
    )


def mhpo_loss(
    logits, target_ids, old_logprobs, advantages, mask=None, *, config=None,
    temperature=1.0, loss_agg_mode="token-mean", ignore_index=-100,
    ref_logprobs=None, beta=0.0, return_entropy=False, backend="auto", inplace_backward=False,
) -> MHPOOutput:
    """MHPO policy loss from logits, fused: no [N, V] float32 temporary.

    Args:
        logits: [B, T, V] or [N, V]; float32 / bfloat16 / float16 (float64 with
            ``backend="torch"``); CPU or CUDA. Rows may be strided; V must be unit-stride.
        target_ids: [B, T] or [N] integer ids in [0, V), or ``ignore_index``.
        old_logprobs: rollout-policy log-probs, shape of target_ids.
        advantages: shape of target_ids, or [B] for [B, T, V] logits.
        mask: shape of target_ids, bool or float (0 = padding); None = all ones.
        config: :class:`MHPOConfig` (None = paper defaults).
        temperature: logits are divided by it.
        loss_agg_mode: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" |
            "seq-mean-token-sum-norm" (verl's names; [N, V] counts as one sequence).
        ref_logprobs, beta: optional k3 KL to a reference policy, ``+ beta * kl``.
        return_entropy: also return the per-token entropy (differentiable).
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch" (the reference);
            ``MHPO_BACKEND`` overrides "auto".
        inplace_backward: write the gradient into the logits' storage instead of
            a new buffer (saves one [N, V] allocation). The logits hold the
            gradient after backward: do not read them again, nor backpropagate
            through anything else that saved them. Ignored under torch.compile.

    Returns:
        :class:`MHPOOutput` ``(loss, logprobs, entropy, metrics)``.

    Example::

        >>> import torch, mhpo_kernels as mk
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)
        >>> ids = torch.randint(0, 11, (2, 5))
        >>> old = torch.randn(2, 5).clamp(max=0) - 2.0
        >>> out = mk.mhpo_loss(logits, ids, old, torch.tensor([1.0, -1.0]))
        >>> out.loss.backward()
    """
    config = MHPOConfig() if config is None else config
    if not isinstance(config, MHPOConfig):
        raise TypeError(f"config must be an MHPOConfig, got {type(config).__name__}")
    return fused_policy_loss(
        logits, target_ids, old_logprobs, advantages, mask, ratio_control=config,
        temperature=temperature, loss_agg_mode=loss_agg_mode, ignore_index=ignore_index,
        ref_logprobs=ref_logprobs, beta=beta, return_entropy=return_entropy, backend=backend,
        inplace_backward=inplace_backward,
    )
