"""Plain-PyTorch reference: the ground truth every backend is tested against.

It mirrors ``MHPO_SPEC.md`` line by line and is also the ``"torch"`` backend:
any device, any float dtype (math in float32, or float64 for float64 logits).
It materialises ``log_softmax`` over ``[N, V]``, which is exactly the memory the
fused backends avoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._inputs import MHPOOutput, check_target_ids, prepare, safe_div
from .config import CLIP_LOG_RATIO_LIMIT, ClipConfig, MHPOConfig, SAPOConfig
from .metrics import policy_metrics

__all__ = ["mhpo_loss", "token_logprobs_entropy", "lfm", "dhp", "token_loss", "aggregate"]


def token_logprobs_entropy(logits2d, target, temperature, ignore_index, dtype=torch.float32):
    """logp_n = z_n[y_n]/T - logsumexp(z_n/T) and H_n = -sum_v p log p; 0 on ignored rows."""
    z = logits2d.to(dtype) / temperature
    valid = target != ignore_index
    logp_all = F.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1)
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def lfm(delta, cfg: MHPOConfig):
    """Log-Fidelity Modulator: psi = c * tanh(delta / c) (psi = delta for "DHP only")."""
    return cfg.c * torch.tanh(delta / cfg.c) if cfg.use_lfm else delta


def dhp(psi, cfg: MHPOConfig):
    """Decoupled Hazard Penalty on a stop-gradient psi (zeta = 0 for "LFM only")."""
    psi = psi.detach()
    if not cfg.use_dhp:
        return torch.zeros_like(psi)
    return (F.softplus(psi) / cfg.lam_pos) ** cfg.k_pos + (F.softplus(-psi) / cfg.lam_neg) ** cfg.k_neg


def token_loss(delta, adv, cfg):
    """Per-token surrogate loss of one ratio control, differentiable w.r.t. delta."""
    if isinstance(cfg, MHPOConfig):
        psi = lfm(delta, cfg)
        zeta = dhp(psi, cfg)
        return -torch.exp(psi - zeta.detach()) * adv
    if isinstance(cfg, ClipConfig):  # verl's compute_policy_loss convention
        ratio = torch.exp(delta.clamp(-CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT))
        unclipped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)
        loss = torch.maximum(-unclipped * adv, -ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
        if cfg.dual_clip_c is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -cfg.dual_clip_c * adv), loss)
        return loss
    if isinstance(cfg, SAPOConfig):
        # r is capped at exp(20), where sigmoid(tau*(r-1)) is already 1 in fp32
        ratio = torch.exp(delta.clamp(max=CLIP_LOG_RATIO_LIMIT))
        tau = torch.where(adv > 0, cfg.tau_pos, cfg.tau_neg)
        return -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv
    raise TypeError(f"unsupported ratio control {type(cfg).__name__}")


def aggregate(L, m, loss_agg_mode):
    """The spec's aggregation table over [B, T] (fully masked sequences are not counted)."""
    if loss_agg_mode == "token-mean":
        return safe_div((m * L).sum(), m.sum())
    seq_sum, seq_count = (m * L).sum(-1), m.sum(-1)
    n_seq = (seq_count != 0).sum().to(L.dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        return safe_div(safe_div(seq_sum, seq_count).sum(), n_seq)
    if loss_agg_mode == "seq-mean-token-sum":
        return safe_div(seq_sum.sum(), n_seq)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return (m * L).sum() / max(L.numel(), 1)  # B * T_max
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


def policy_loss_reference(
    logits, target_ids, old_logprobs, advantages, mask=None, *, ratio_control,
    temperature=1.0, loss_agg_mode="token-mean", ignore_index=-100,
    ref_logprobs=None, beta=0.0, return_entropy=False,
):
    x = prepare(
        logits, target_ids, old_logprobs, advantages, mask, temperature=temperature,
        loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta,
    )
    if not torch.compiler.is_compiling():
        check_target_ids(x.target, x.logits.shape[-1], ignore_index)
    logp, entropy = token_logprobs_entropy(x.logits, x.target, temperature, ignore_index, x.old.dtype)

    active = x.mask != 0
    zero = torch.zeros_like(logp)
    # where() before the math: padding may hold inf / NaN old log-probs
    delta = torch.where(active, logp - x.old, zero)  # log r
    adv = torch.where(active, x.adv, zero)
    L = token_loss(delta, adv, ratio_control)
    kl = None
    if x.ref is not None:
        d = torch.where(active, x.ref - logp, zero)
        kl = torch.exp(d) - d - 1  # k3 estimator
        L = L + beta * kl

    loss = aggregate(L.reshape(x.seq_shape), x.mask.reshape(x.seq_shape), loss_agg_mode)
    metrics = policy_metrics(ratio_control, delta, active, entropy if return_entropy else None, kl)
    return MHPOOutput(
        loss,
        logp.detach().reshape(x.shape),
        entropy.reshape(x.shape) if return_entropy else None,
        metrics,
    )


def mhpo_loss(
    logits, target_ids, old_logprobs, advantages, mask=None, *, config=None,
    temperature=1.0, loss_agg_mode="token-mean", ignore_index=-100,
    ref_logprobs=None, beta=0.0, return_entropy=False, backend="torch", inplace_backward=False,
):
    """Reference MHPO loss; same signature and output as :func:`mhpo_kernels.mhpo_loss`.

    ``backend`` and ``inplace_backward`` are accepted for signature parity and ignored.
    """
    config = MHPOConfig() if config is None else config
    if not isinstance(config, MHPOConfig):
        raise TypeError(f"config must be an MHPOConfig, got {type(config).__name__}")
    return policy_loss_reference(
        logits, target_ids, old_logprobs, advantages, mask, ratio_control=config,
        temperature=temperature, loss_agg_mode=loss_agg_mode, ignore_index=ignore_index,
        ref_logprobs=ref_logprobs, beta=beta, return_entropy=return_entropy,
    )
