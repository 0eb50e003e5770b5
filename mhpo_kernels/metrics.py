"""Trainer metrics over the masked tokens, computed from per-token log-ratios."""
from __future__ import annotations

import torch

from .config import CLIP_LOG_RATIO_LIMIT, ClipConfig, MHPOConfig


def _mean(x, active, n):
    return torch.where(active, x, torch.zeros_like(x)).sum() / n


@torch.no_grad()
def policy_metrics(cfg, delta, active, entropy=None, kl=None) -> dict:
    """delta: [N] log-ratios (0 where inactive); active: [N] bool.

    Means are over active tokens (0 when there are none); ratio_max / ratio_min
    are exp of the extreme log-ratios (1.0 when there are no active tokens).
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
        low, high = (r < 1 - cfg.eps_low).float(), (r > 1 + cfg.eps_high).float()
        out["clipfrac_low"] = _mean(low, active, n)
        out["clipfrac_high"] = _mean(high, active, n)
        out["clipfrac"] = _mean(low + high, active, n)
    if entropy is not None:
        out["entropy_mean"] = _mean(entropy.detach().float(), active, n)
    if kl is not None:
        out["kl_ref"] = _mean(kl.detach().float(), active, n)
    return out
