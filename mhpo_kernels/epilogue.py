"""The per-token epilogue of the fused kernels, in torch.

``triton_kernels/epilogue.py`` and ``csrc/mhpo_epilogue.h`` compute the same
quantities per row inside the kernels; this module is their torch twin, used
by the ``torch`` backend (:mod:`mhpo_kernels.backends.torch`) and by the
vocabulary-parallel combine. It is fast-path code: the readable ground truth
is :mod:`mhpo_kernels.reference`, which shares nothing with it.

Every function takes the log-ratio ``delta`` (0 on inactive rows) and returns
``(loss, coef)`` with ``coef = d loss / d logp``, the analytic derivative the
backward kernels scale by the upstream gradient (no autograd through it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._constants import K3_SERIES_BELOW, KL_ESTIMATORS, LOW_VAR_KL_D_LIMIT, LOW_VAR_KL_LIMIT
from .config import (
    CLIP_LOG_RATIO_LIMIT, GSPO_LOG_RATIO_LIMIT, CISPOConfig, ClipConfig, GSPOConfig, MHPOConfig, SAPOConfig,
)

KL_K3, KL_K1, KL_K2, KL_LOW_VAR_KL = (KL_ESTIMATORS[k] for k in ("k3", "k1", "k2", "low_var_kl"))


def mhpo_parts(delta, cfg: MHPOConfig):
    """``(psi, dpsi / ddelta, zeta)`` of MHPO at log-ratio ``delta``.

    ``psi = c tanh(delta / c)`` (LFM; ``delta`` for "DHP only"), its derivative
    ``sech^2(delta / c)`` written as ``4t / (1 + t)^2`` with ``t = e^{-2|u|}`` (no
    ``1 - tanh^2`` cancellation), and the DHP hazard ``zeta`` of a stop-gradient
    ``psi`` (0 for "LFM only"). ``torch.tanh`` here; the kernels build tanh from ``t`` too, with
    ``u (1 - u^2 / 3)`` below ``|u| = TANH_SERIES_BELOW``: a few ulp apart.
    """
    if cfg.use_lfm:
        u = delta / cfg.c
        t = torch.exp(-2 * u.abs())
        psi, dpsi = cfg.c * torch.tanh(u), 4 * t / (1 + t) ** 2
    else:
        psi, dpsi = delta, torch.ones_like(delta)
    zeta = torch.zeros_like(delta)
    if cfg.use_dhp:
        zeta = (F.softplus(psi) / cfg.lam_pos) ** cfg.k_pos + (F.softplus(-psi) / cfg.lam_neg) ** cfg.k_neg
    return psi, dpsi, zeta


def clip_limits(cfg):
    """The log-ratio clamp ``(lo, hi)`` of a clip-family config (verl: ±20; GSPO: max = 10 only)."""
    if isinstance(cfg, GSPOConfig):
        return float("-inf"), GSPO_LOG_RATIO_LIMIT
    return -CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT


def _clip(delta, adv, cfg):
    """``(loss, coef, unclipped_loss)`` of the PPO clip (GSPO: of the sequence log-ratio)."""
    lo, hi = clip_limits(cfg)
    cap, dual_c = (None, None) if isinstance(cfg, GSPOConfig) else (cfg.delta, cfg.dual_clip_c)
    r = torch.exp(delta.clamp(lo, hi))
    dr = torch.where((delta >= lo) & (delta <= hi), r, torch.zeros_like(r))  # dr / dlogp
    r1, dr1 = r, dr
    if cap is not None:  # TRL two-sided clipping caps the unclipped ratio
        r1, dr1 = r.clamp(max=cap), torch.where(r > cap, torch.zeros_like(dr), dr)
    r_lo, r_hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    r2 = r.clamp(r_lo, r_hi)
    dr2 = torch.where((r >= r_lo) & (r <= r_hi), dr, torch.zeros_like(dr))
    l1, l2, c1, c2 = -r1 * adv, -r2 * adv, -dr1 * adv, -dr2 * adv
    # max / min split the gradient evenly on an exact tie, as torch.maximum / minimum do
    loss = torch.maximum(l1, l2)
    coef = torch.where(l1 > l2, c1, torch.where(l1 < l2, c2, 0.5 * (c1 + c2)))
    unclipped = loss
    if dual_c is not None:
        cap = -dual_c * adv
        dual = adv < 0
        coef = torch.where(dual & (loss > cap), torch.zeros_like(coef),
                           torch.where(dual & (loss == cap), 0.5 * coef, coef))
        loss = torch.where(dual, torch.minimum(loss, cap), loss)
    return loss, coef, unclipped


def cispo_ratio(delta, cfg: CISPOConfig):
    """``(r, clip(r))`` of CISPO: ``r = exp(clamp(delta, -20, 20))`` clamped to ``[ratio_low, ratio_high]``."""
    r = torch.exp(delta.clamp(-CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT))
    return r, r.clamp(cfg.ratio_low, cfg.ratio_high)


def surrogate(delta, adv, cfg, logp=None):
    """Per-token ``(loss, d loss / d logp)`` of a ratio control at log-ratio ``delta``
    (for GSPO and sequence-level modes, the sequence log-ratio). CISPO's loss also reads
    ``logp`` (``-sg(clip(r)) A logp``). ``cfg`` None (no ratio control, ``MODE_NONE``): 0, 0."""
    if cfg is None:
        return torch.zeros_like(delta), torch.zeros_like(delta)
    if isinstance(cfg, CISPOConfig):
        c = cispo_ratio(delta, cfg)[1]
        return -c * adv * logp, -c * adv
    if isinstance(cfg, MHPOConfig):
        psi, dpsi, zeta = mhpo_parts(delta, cfg)  # zeta is a stop-gradient factor
        w = torch.exp(psi - zeta)
        return -w * adv, -adv * w * dpsi
    if isinstance(cfg, (ClipConfig, GSPOConfig)):
        return _clip(delta, adv, cfg)[:2]
    if isinstance(cfg, SAPOConfig):
        r = torch.exp(delta.clamp(max=CLIP_LOG_RATIO_LIMIT))
        dr = torch.where(delta <= CLIP_LOG_RATIO_LIMIT, r, torch.zeros_like(r))
        tau = torch.full_like(adv, cfg.tau_neg).masked_fill(adv > 0, cfg.tau_pos)
        s, s_neg = torch.sigmoid(tau * (r - 1)), torch.sigmoid(-tau * (r - 1))
        return -(4 / tau) * s * adv, -adv * 4 * s * s_neg * dr
    raise TypeError(f"unsupported ratio control {type(cfg).__name__}")


def k3(d):
    """k3 KL estimator ``e^d - d - 1`` at ``d = ref - logp`` and ``e^d - 1``, whose negative is its
    derivative w.r.t. logp. Below ``|d| = K3_SERIES_BELOW`` both come from k3's Taylor series (no
    cancellation in either), the formula of every kernel (``k3`` in triton_kernels/epilogue.py,
    ``k3_kl`` in csrc/mhpo_epilogue.h). In float64 (the torch backend's float64 path) the series'
    truncation error, ``2 |d|^7 / 9!`` relative (1e-9 at |d| = 0.3), would show: there it is used
    below ``|d| = 1e-2`` only (error < 1e-19), and ``expm1(d) - d`` (relative error ``2 eps / |d|``)
    above."""
    series = d * d * (0.5 + d * (1 / 6 + d * (1 / 24 + d * (1 / 120 + d * (1 / 720 + d * (1 / 5040 + d / 40320))))))
    small = d.abs() < (1e-2 if d.dtype == torch.float64 else K3_SERIES_BELOW)
    em1 = torch.where(small, series + d, torch.expm1(d))
    return torch.where(small, series, em1 - d), em1


def kl_estimate(d, est: int = KL_K3):
    """``(kl, d kl / d logp)`` of KL estimator ``est`` (``_constants.KL_ESTIMATORS``) at ``d = ref - logp``:
    k3 ``e^d - d - 1`` (:func:`k3`), k1 ``-d``, k2 ``d^2 / 2``, low_var_kl verl's clamped k3 (``d`` clamped
    to ±20, the value to ±10; the derivative is 0 where either clamp bites, as torch.clamp's)."""
    if est == KL_K1:
        return -d, torch.ones_like(d)
    if est == KL_K2:
        return 0.5 * d * d, -d
    if est == KL_LOW_VAR_KL:
        lim = LOW_VAR_KL_D_LIMIT
        kl, em1 = k3(d.clamp(-lim, lim))
        live = (d >= -lim) & (d <= lim) & (kl <= LOW_VAR_KL_LIMIT)
        return kl.clamp(max=LOW_VAR_KL_LIMIT), torch.where(live, -em1, torch.zeros_like(em1))
    if est != KL_K3:
        raise ValueError(f"unknown KL estimator id {est}")
    kl, em1 = k3(d)
    return kl, -em1


def token_epilogue(cfg, delta, adv, ref_minus_logp, beta, active, iw=None, kl_est: int = KL_K3, logp=None):
    """``(loss, coef, kl)`` per token: ``iw *`` the surrogate at ``delta`` plus ``beta *`` the KL
    estimate ``kl_est`` (the importance weight ``iw`` multiplies the ratio control's part only).

    Both are exactly 0 where ``active`` is False; ``ref_minus_logp`` (0 on
    inactive rows) or None: no KL, ``kl`` is None then. With ``beta = 0`` the
    reference only feeds the ``kl_ref`` metric (``0 * inf`` would be NaN).
    ``iw``: None, or per-token weights (read where ``active`` only).
    """
    zero = torch.zeros_like(delta)
    value, coef = surrogate(delta, adv, cfg, logp)
    if iw is not None:
        w = torch.where(active, iw, zero)
        value, coef = value * w, coef * w
    kl = None
    if ref_minus_logp is not None:
        kl, dkl = kl_estimate(ref_minus_logp, kl_est)
        if beta:
            value, coef = value + beta * kl, coef + beta * dkl
    return torch.where(active, value, zero), torch.where(active, coef, zero), kl
