"""Per-token epilogues, shared by the fused forward kernel. Scalar fp32 math.

Each ``*_token`` returns ``(loss, coef)`` with ``coef = d loss / d logp``.
Mode ids and parameter layouts: ``mhpo_kernels.config``.
"""
import triton
import triton.language as tl


@triton.jit
def _log1p(y):
    # log(1 + y) accurate for tiny y (Goldberg): u = 1 + y rounded, then correct.
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _pow(base, k):
    # base >= 0; 0 ** k = 0 for k > 0. The clamp is FLT_MIN: a smaller literal would be typed fp64
    # by Triton and pull the whole epilogue into fp64
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
    th = tl.where(tl.abs(u) < 1e-3, u * (1.0 - u * u / 3.0), th)  # avoid 1 - t cancellation
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
def clip_token(delta, adv, eps_low, eps_high, dual_c, cap, LIMIT: tl.constexpr):
    # verl's convention: r = exp(clamp(delta, -LIMIT, LIMIT))
    inside = (delta >= -LIMIT) & (delta <= LIMIT)
    r = tl.exp(tl.minimum(tl.maximum(delta, -LIMIT), LIMIT))
    dr = tl.where(inside, r, 0.0)  # dr / dlogp
    capped = (cap > 0.0) & (r > cap)  # TRL two-sided clipping caps the unclipped ratio
    r1 = tl.where(capped, cap, r)
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
    cap = -dual_c * adv
    dual = (dual_c > 0.0) & (adv < 0.0)
    coef = tl.where(dual & (loss > cap), 0.0, tl.where(dual & (loss == cap), 0.5 * coef, coef))
    return tl.where(dual, tl.minimum(loss, cap), loss), coef


@triton.jit
def sapo_token(delta, adv, tau_pos, tau_neg, LIMIT: tl.constexpr):
    r = tl.exp(tl.minimum(delta, LIMIT))  # sigmoid(tau (r - 1)) is already 1 in fp32 past exp(20)
    dr = tl.where(delta <= LIMIT, r, 0.0)
    tau = tl.where(adv > 0.0, tau_pos, tau_neg)
    s = _sigmoid(tau * (r - 1.0))
    s_neg = _sigmoid(-tau * (r - 1.0))
    return -(4.0 / tau) * s * adv, -adv * 4.0 * s * s_neg * dr
