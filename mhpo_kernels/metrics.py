"""Trainer metrics over the masked tokens, computed from per-token log-ratios."""
from __future__ import annotations

import torch

from .config import CLIP_LOG_RATIO_LIMIT, GSPO_LOG_RATIO_LIMIT, ClipConfig, GSPOConfig, MHPOConfig


def _mean(x, active, n):
    return torch.where(active, x, torch.zeros_like(x)).sum() / n


def _clip_fractions(r, cfg, adv, active, n):
    low, high = r < 1 - cfg.eps_low, r > 1 + cfg.eps_high
    if adv is not None:
        low, high = low & (adv < 0), high & (adv > 0)
    low, high = low.float(), high.float()
    return {"clipfrac_low": _mean(low, active, n), "clipfrac_high": _mean(high, active, n),
            "clipfrac": _mean(low + high, active, n)}


@torch.no_grad()
def policy_metrics(cfg, delta, active, entropy=None, kl=None, adv=None) -> dict:
    """delta: [N] log-ratios (0 where inactive); active: [N] bool; adv: [N] or None.

    Means are over active tokens (0 when there are none); ratio_max / ratio_min
    are exp of the extreme log-ratios (1.0 when there are no active tokens).
    For sequence-level importance sampling, ``delta`` is each token's sequence
    log-ratio, so every ratio metric is about the sequence ratios.

    Clip modes (TRL's ``clip_ratio/low_mean``, ``high_mean``, ``region_mean``):
    ``clipfrac_low`` counts tokens with ``r < 1 - eps_low`` and ``A < 0``,
    ``clipfrac_high`` those with ``r > 1 + eps_high`` and ``A > 0`` (where the
    clip is active and the token's gradient is cut), ``clipfrac`` either; without
    ``adv`` the sign condition is dropped. With ``dual_clip_c`` and ``adv``,
    ``dual_clipfrac`` is verl's ``pg_clipfrac_lower`` (A < 0 tokens whose loss
    is capped at ``-dual_clip_c * A``).
    """
    from .reference import dhp, lfm  # the reference's own formulas

    delta = delta.detach().float()
    n = active.sum().clamp(min=1).float()
    out = {"kl_old": _mean(-delta, active, n)}
    neg_inf = torch.full_like(delta, float("-inf"))
    any_active = active.any()
    dmax = torch.where(active, delta, neg_inf).max() if delta.numel() else delta.new_zeros(())
    dmin = (-torch.where(active, -delta, neg_inf).max()) if delta.numel() else delta.new_zeros(())
    out["ratio_max"] = torch.where(any_active, dmax, torch.zeros_like(dmax)).exp()
    out["ratio_min"] = torch.where(any_active, dmin, torch.zeros_like(dmin)).exp()
    if isinstance(cfg, MHPOConfig):
        psi = lfm(delta, cfg)
        zeta = dhp(psi, cfg)
        survival = torch.exp(-zeta)
        out["psi_mean"] = _mean(psi, active, n)
        out["zeta_mean"] = _mean(zeta, active, n)
        out["survival_mean"] = _mean(survival, active, n)
        out["low_survival_frac"] = _mean((survival < 0.5).float(), active, n)
    elif isinstance(cfg, ClipConfig):
        r = torch.exp(delta.clamp(-CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT))
        out.update(_clip_fractions(r, cfg, adv, active, n))
        if cfg.dual_clip_c is not None and adv is not None:
            adv = adv.detach().float()
            unclipped = r if cfg.delta is None else r.clamp(max=cfg.delta)
            loss = torch.maximum(-unclipped * adv, -r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
            out["dual_clipfrac"] = _mean(((adv < 0) & (loss > -cfg.dual_clip_c * adv)).float(), active, n)
    elif isinstance(cfg, GSPOConfig):
        r = torch.exp(delta.clamp(max=GSPO_LOG_RATIO_LIMIT))
        out.update(_clip_fractions(r, cfg, adv, active, n))
    if entropy is not None:
        out["entropy_mean"] = _mean(entropy.detach().float(), active, n)
    if kl is not None:
        out["kl_ref"] = _mean(kl.detach().float(), active, n)
    return out


@torch.no_grad()
def metrics_from_logprobs(cfg, logp, old, adv, mask, ref=None, entropy=None) -> dict:
    """:func:`policy_metrics` of token-level log-probs over prepared [N] inputs
    (old / adv / ref may hold inf or NaN where ``mask == 0``)."""
    active = mask != 0
    zero = torch.zeros_like(old)
    delta = torch.where(active, logp - old, zero)
    kl = None
    if ref is not None:
        d = torch.where(active, ref - logp, zero)
        kl = torch.expm1(d) - d  # k3, accurate near d = 0
    return policy_metrics(cfg, delta, active, entropy, kl, adv=torch.where(active, adv, zero))
