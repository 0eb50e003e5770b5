"""Per-token epilogues, shared by the fused forward kernel and the finishing kernel. Scalar fp32 math.

Each ``*_token`` returns ``(loss, coef)`` with ``coef = d loss / d logp``; its parameters after
``(delta, adv)`` carry the names of ``mhpo_kernels._constants.PARAM_LAYOUT``, in that order. The
C++ / CUDA twin is ``csrc/mhpo_epilogue.h``: the same formulas, except where noted below.
"""
import triton
import triton.language as tl

from .constants import (
    K3_SERIES_BELOW, KL_K1, KL_K2, KL_LOW_VAR_KL, LOW_VAR_KL_D_LIMIT, LOW_VAR_KL_LIMIT, MODE_CLIP, MODE_MHPO,
    TANH_SERIES_BELOW,
)


@triton.jit
def _log1p(y):
    # log(1 + y) accurate for tiny y (Goldberg): u = 1 + y rounded, then correct. (C++: log1pf.)
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _pow(base, k):
    # base >= 0; 0 ** k = 0 for k > 0 (C++: powf). The clamp is FLT_MIN: a smaller literal would be
    # typed fp64 by Triton and pull the whole epilogue into fp64
    return tl.where(base > 0.0, tl.exp(k * tl.log(tl.maximum(base, 1.1754943508222875e-38))), 0.0)


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def mhpo_token(delta, adv, c, k_pos, lam_pos, k_neg, lam_neg, use_lfm, use_dhp):
    loss, coef, psi, zeta = mhpo_token_parts(delta, adv, c, k_pos, lam_pos, k_neg, lam_neg, use_lfm, use_dhp)
    return loss, coef


@triton.jit
def mhpo_token_parts(delta, adv, c, k_pos, lam_pos, k_neg, lam_neg, use_lfm, use_dhp):
    # (loss, coef, psi, zeta): the metrics also want psi and zeta
    # psi = c tanh(delta / c);  dpsi/ddelta = sech^2(delta / c) = 4t / (1 + t)^2, t = e^{-2|delta/c|}
    u = delta / c
    t = tl.exp(-2.0 * tl.abs(u))
    th = (1.0 - t) / (1.0 + t)
    th = tl.where(tl.abs(u) < TANH_SERIES_BELOW, u * (1.0 - u * u / 3.0), th)  # avoid 1 - t cancellation
    th = tl.where(u < 0, -tl.abs(th), tl.abs(th))
    lfm = use_lfm != 0.0
    psi = tl.where(lfm, c * th, delta)
    dpsi = tl.where(lfm, 4.0 * t / ((1.0 + t) * (1.0 + t)), 1.0)
    # zeta: Weibull cumulative hazards of the stop-gradient psi
    zeta = _pow(_softplus(psi) / lam_pos, k_pos) + _pow(_softplus(-psi) / lam_neg, k_neg)
    zeta = tl.where(use_dhp != 0.0, zeta, 0.0)
    w = tl.exp(psi - zeta)  # exp(psi) alone may overflow for DHP-only; zeta wins
    return -w * adv, -adv * w * dpsi, psi, zeta


@triton.jit
def clip_token_limits(delta, adv, eps_low, eps_high, dual_clip_c, ratio_cap, LO: tl.constexpr, HI: tl.constexpr):
    # verl's clip with the log-ratio clamped to [LO, HI] (clip: +-20; GSPO: (-inf, 10], its layout
    # is the clip's prefix with dual_clip_c = ratio_cap = 0). Returns (loss, coef, the loss before
    # the dual-clip cap, r): the finishing kernel's metrics want the last two
    r = tl.exp(tl.minimum(tl.maximum(delta, LO), HI))
    dr = tl.where((delta >= LO) & (delta <= HI), r, 0.0)  # dr / dlogp
    capped = (ratio_cap > 0.0) & (r > ratio_cap)  # TRL two-sided clipping caps the unclipped ratio
    r1 = tl.where(capped, ratio_cap, r)
    dr1 = tl.where(capped, 0.0, dr)
    r2 = tl.minimum(tl.maximum(r, 1.0 - eps_low), 1.0 + eps_high)
    dr2 = tl.where((r >= 1.0 - eps_low) & (r <= 1.0 + eps_high), dr, 0.0)
    l1 = -r1 * adv
    l2 = -r2 * adv
    c1 = -dr1 * adv
    c2 = -dr2 * adv
    # max / min split the gradient evenly on an exact tie, as torch.maximum / minimum do
    loss = tl.maximum(l1, l2)
    coef = tl.where(l1 > l2, c1, tl.where(l1 < l2, c2, 0.5 * (c1 + c2)))
    cap = -dual_clip_c * adv
    dual = (dual_clip_c > 0.0) & (adv < 0.0)
    coef = tl.where(dual & (loss > cap), 0.0, tl.where(dual & (loss == cap), 0.5 * coef, coef))
    return tl.where(dual, tl.minimum(loss, cap), loss), coef, loss, r


@triton.jit
def clip_token(delta, adv, eps_low, eps_high, dual_clip_c, ratio_cap, LIMIT: tl.constexpr):
    # verl's convention: r = exp(clamp(delta, -LIMIT, LIMIT))
    loss, coef, pre, r = clip_token_limits(delta, adv, eps_low, eps_high, dual_clip_c, ratio_cap, -LIMIT, LIMIT)
    return loss, coef


@triton.jit
def clip_fracs(r, adv, pre, eps_low, eps_high, dual_clip_c):
    # the clip metrics' indicators: clipped below, clipped above, capped by the dual clip
    lo = (r < 1.0 - eps_low) & (adv < 0.0)
    hi = (r > 1.0 + eps_high) & (adv > 0.0)
    return lo, hi, (dual_clip_c > 0.0) & (adv < 0.0) & (pre > -dual_clip_c * adv)


@triton.jit
def sapo_token(delta, adv, tau_pos, tau_neg, LIMIT: tl.constexpr):
    r = tl.exp(tl.minimum(delta, LIMIT))  # sigmoid(tau (r - 1)) is already 1 in fp32 past exp(20)
    dr = tl.where(delta <= LIMIT, r, 0.0)
    tau = tl.where(adv > 0.0, tau_pos, tau_neg)
    s = _sigmoid(tau * (r - 1.0))
    s_neg = _sigmoid(-tau * (r - 1.0))  # (C++: the slope as e / (1 + e)^2, an ulp apart)
    return -(4.0 / tau) * s * adv, -adv * 4.0 * s * s_neg * dr


@triton.jit
def cispo_token_parts(delta, adv, ratio_low, ratio_high, logp, LIMIT: tl.constexpr):
    # CISPO (finishing kernel only): -sg(clamp(r, ratio_low, ratio_high)) * adv * logp with r =
    # exp(clamp(delta, -LIMIT, LIMIT)); the clamped ratio is a stop-gradient: coef = -clamp(r) * adv.
    # Returns (loss, coef, r < ratio_low, r > ratio_high): clipfrac's indicators (no advantage sign)
    r = tl.exp(tl.minimum(tl.maximum(delta, -LIMIT), LIMIT))
    c = tl.minimum(tl.maximum(r, ratio_low), ratio_high)
    return -c * adv * logp, -c * adv, r < ratio_low, r > ratio_high


@triton.jit
def k3(d):
    # the k3 KL estimator e^d - d - 1 and e^d - 1 (= -d k3 / d logp) at d = ref - logp; below
    # |d| = K3_SERIES_BELOW both from k3's Taylor series (1 - e^d and e^d - d - 1 would cancel)
    series = d * d * (0.5 + d * (1.0 / 6 + d * (1.0 / 24 + d * (1.0 / 120 + d * (1.0 / 720 + d * (
        1.0 / 5040 + d / 40320.0))))))
    small = tl.abs(d) < K3_SERIES_BELOW
    em1 = tl.where(small, series + d, tl.exp(d) - 1.0)
    return tl.where(small, series, em1 - d), em1


@triton.jit
def kl_estimate(d, KL_EST: tl.constexpr):
    # (kl, d kl / d logp) of the KL estimator KL_EST at d = ref - logp (finishing kernel): k3
    # e^d - d - 1 (k3 above); k1 -d; k2 d^2 / 2; low_var_kl verl's k3 at d clamped to
    # +-LOW_VAR_KL_D_LIMIT, the value clamped to LOW_VAR_KL_LIMIT (k3 >= 0: the lower clamp never
    # bites), 0 derivative where a clamp bites (torch.clamp's: the gradient passes at equality)
    if KL_EST == KL_K1:
        kl = -d
        dkl = tl.full(d.shape, 1.0, tl.float32)
    elif KL_EST == KL_K2:
        kl = 0.5 * d * d
        dkl = -d
    elif KL_EST == KL_LOW_VAR_KL:
        kl, em1 = k3(tl.minimum(tl.maximum(d, -LOW_VAR_KL_D_LIMIT), LOW_VAR_KL_D_LIMIT))
        dkl = tl.where((d >= -LOW_VAR_KL_D_LIMIT) & (d <= LOW_VAR_KL_D_LIMIT) & (kl <= LOW_VAR_KL_LIMIT), -em1, 0.0)
        kl = tl.minimum(kl, LOW_VAR_KL_LIMIT)
    else:
        kl, em1 = k3(d)
        dkl = -em1
    return kl, dkl


@triton.jit
def scale_rn(z, inv_t):
    # x = z * inv_t rounded once, where every backend subtracts it from lse (the CPU / CUDA
    # kernels: scale_rn in csrc/mhpo_epilogue.h). An explicit fma with a zero addend: a plain
    # multiply may be fused by ptxas into the subtraction that follows (z * inv_t - lse), which
    # leaves the product's rounding error in log p where it must be exactly 0 (V = 1).
    return tl.math.fma(z, inv_t, 0.0)


@triton.jit
def token_loss(MODE: tl.constexpr, HAS_REF: tl.constexpr, LIMIT: tl.constexpr, active, logp, old_ptr, adv_ptr,
               ref_ptr, p0, p1, p2, p3, p4, p5, p6, beta):
    # (loss, coef = d loss / d logp) of one token: the ratio control MODE (MHPO, clip, else SAPO) at
    # delta = logp - old, plus beta * k3 KL to ref when HAS_REF; both 0 where not active (old / adv /
    # ref are loaded there but never used: padding may hold inf / NaN). p0..p6: the kernel parameters.
    delta = tl.where(active, logp - tl.load(old_ptr), 0.0)
    adv = tl.where(active, tl.load(adv_ptr), 0.0)
    if MODE == MODE_MHPO:
        loss, coef = mhpo_token(delta, adv, p0, p1, p2, p3, p4, p5, p6)
    elif MODE == MODE_CLIP:
        loss, coef = clip_token(delta, adv, p0, p1, p2, p3, LIMIT)
    else:
        loss, coef = sapo_token(delta, adv, p0, p1, LIMIT)
    if HAS_REF:
        # k3 KL: exp(ref - logp) - (ref - logp) - 1; d k3 / d logp = -(exp(ref - logp) - 1)
        kl, em1 = k3(tl.where(active, tl.load(ref_ptr) - logp, 0.0))
        loss += beta * kl
        coef -= beta * em1
    return tl.where(active, loss, 0.0), tl.where(active, coef, 0.0)
