// Per-token math shared by the CPU and CUDA kernels, so the two cannot drift.
//
// Everything is fp32 and branch-light. Two pieces:
//   * SoftmaxState: the online (max, sum-exp, entropy) accumulator of one row
//     and its merge / finalize;
//   * token_epilogue: loss[n] and coef[n] = d loss[n] / d logp[n] of each mode
//     (MODE_*, params = that config's kernel_params(), read through the named
//     views of mhpo_constants.h: generated from mhpo_kernels/_constants.py).
// Ground truth: mhpo_kernels/reference.py (token_loss and the KL term).
//
// The Triton twin (triton_kernels/epilogue.py) uses the same formulas, except
// where it has no such function: log1p (Triton: Goldberg's log(1 + y)), powf
// (Triton: exp(k log x)) and the exp / log of each device, so the two agree to
// a few ulp, not bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "mhpo_constants.h"

namespace mhpo {

// ---------------------------------------------------------------------------
// Online softmax statistics of one row of x = z / T.
//   m: max of the raw logits z (so no rounding of z / T enters the max),
//   s: sum_v exp((z_v - m) / T),
//   t: sum_v exp((z_v - m) / T) * (z_v - m) / T   (<= 0; 0 * -inf counts as 0).
// Then lse = m / T + log s and H = lse - E[x] = log s - t / s (no cancellation:
// both terms are >= 0).
struct SoftmaxState {
  float m, s, t;
};

MHPO_HD SoftmaxState softmax_state_empty() { return {-INFINITY, 0.0f, 0.0f}; }

// Rescale a state to a new (larger or equal) max. An empty state (s == 0) stays empty.
MHPO_HD void softmax_state_rescale(SoftmaxState& a, float new_m, float inv_t) {
  if (a.s > 0.0f) {
    const float d = (a.m - new_m) * inv_t;  // <= 0
    const float e = expf(d);
    a.t = e * (a.t + d * a.s);
    a.s = e * a.s;
  }
  a.m = new_m;
}

MHPO_HD SoftmaxState softmax_state_merge(SoftmaxState a, SoftmaxState b, float inv_t) {
  if (a.s == 0.0f) return b;  // empty side (NaN states fall through and stay NaN)
  if (b.s == 0.0f) return a;
  const float m = fmaxf(a.m, b.m);
  softmax_state_rescale(a, m, inv_t);
  softmax_state_rescale(b, m, inv_t);
  return {m, a.s + b.s, a.t + b.t};
}

// inv_t = 1 / T correctly rounded (Triton: div_rn); every kernel multiplies by it,
// none divides by T. Here the forward rounds (z - m) * inv_t with m the raw max;
// the Triton forward (triton_kernels/fused_logprob.py) orders its scaling its own
// way, so lse agrees to an ulp or so across backends, not bit for bit. Each gives
// log p exactly 0 for V == 1: here lse = m * inv_t, and the target's z * inv_t is
// rounded alone (scale_rn), never fused into the "- lse" that follows.
MHPO_HD void softmax_state_finalize(SoftmaxState a, float inv_t, float* lse, float* entropy) {
  const float log_s = logf(a.s);
  *lse = a.m * inv_t + log_s;
  *entropy = log_s - a.t / a.s;
}

// z * inv_t rounded once, never contracted into a following add or subtract (an
// fma with a 0 addend): what the backward (and CPU forward) subtract lse from.
MHPO_HD float scale_rn(float z, float inv_t) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(z, inv_t);
#else
  return std::fma(z, inv_t, 0.0f);
#endif
}

// ---------------------------------------------------------------------------
// Stable scalar helpers.

MHPO_HD float softplus_f(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

// x ** k for x >= 0, with 0 ** k = 0 (k > 0 always: validated by the configs).
// Triton has no pow: exp(k * log(x)) there.
MHPO_HD float pow_nonneg(float x, float k) { return x > 0.0f ? powf(x, k) : 0.0f; }

// tanh(u) and sech^2(u) from t = exp(-2|u|) in (0, 1]: never overflows. Below
// |u| = TANH_SERIES_BELOW, tanh(u) = u (1 - u^2 / 3) (1 - t would cancel). The
// same expressions as triton_kernels/epilogue.py mhpo_token_parts.
MHPO_HD void tanh_sech2(float u, float* th, float* sech2) {
  const float au = fabsf(u);
  const float t = expf(-2.0f * au);
  const float a = au < TANH_SERIES_BELOW ? au * (1.0f - au * au / 3.0f) : (1.0f - t) / (1.0f + t);
  *th = u < 0.0f ? -a : a;
  *sech2 = 4.0f * t / ((1.0f + t) * (1.0f + t));
}

// sigmoid(x) and sigmoid(x) * (1 - sigmoid(x)), from e = exp(-|x|) in (0, 1].
// (Triton: the slope as sigmoid(x) * sigmoid(-x), an ulp apart.)
MHPO_HD void sigmoid_and_slope(float x, float* sig, float* slope) {
  const float e = expf(-fabsf(x));
  const float r = 1.0f / (1.0f + e);
  *sig = x >= 0.0f ? r : e * r;
  *slope = e * r * r;
}

struct TokenOut {
  float loss, coef;
};

// MHPO: psi = c tanh(delta / c), zeta = (sp(psi)/lam+)^k+ + (sp(-psi)/lam-)^k- on a
// stop-gradient psi, loss = -exp(psi - zeta) A, d loss / d delta = loss * dpsi.
// params: MhpoParams. Also hands back psi and zeta.
MHPO_HD TokenOut mhpo_token_parts(float delta, float adv, const float* params, float* psi_out, float* zeta_out) {
  const MhpoParams q = MhpoParams::load(params);
  float psi = delta, dpsi = 1.0f;
  if (q.use_lfm != 0.0f) {
    float th;
    tanh_sech2(delta / q.c, &th, &dpsi);
    psi = q.c * th;
  }
  float zeta = 0.0f;
  if (q.use_dhp != 0.0f) {
    zeta = pow_nonneg(softplus_f(psi) / q.lam_pos, q.k_pos) + pow_nonneg(softplus_f(-psi) / q.lam_neg, q.k_neg);
  }
  const float w = expf(psi - zeta);  // jointly: exp(psi) alone overflows for "DHP only"
  *psi_out = psi, *zeta_out = zeta;
  return {-w * adv, -adv * w * dpsi};
}

MHPO_HD TokenOut mhpo_token(float delta, float adv, const float* p) {
  float psi, zeta;
  return mhpo_token_parts(delta, adv, p, &psi, &zeta);
}

// torch.maximum's gradient: the larger side, half of each on a tie.
MHPO_HD void pick_max(float la, float ga, float lb, float gb, float* l, float* g) {
  if (la > lb) {
    *l = la, *g = ga;
  } else if (la < lb) {
    *l = lb, *g = gb;
  } else {
    *l = la, *g = 0.5f * (ga + gb);
  }
}

// verl's clipped surrogate with the log-ratio clamped to [lo, hi] (clip: +-20;
// GSPO: (-inf, 10]). params: ClipParams (GSPO's layout is its prefix: no dual clip, no cap).
// *pre_dual: the loss before the dual-clip cap (what the dual_clipfrac metric compares).
MHPO_HD TokenOut clip_token_limits(float delta, float adv, const float* params, float lo_lim, float hi_lim,
                                   float* pre_dual) {
  const ClipParams q = ClipParams::load(params);
  const float ld = fminf(fmaxf(delta, lo_lim), hi_lim);
  const float r = expf(ld);
  const float dr = (delta >= lo_lim && delta <= hi_lim) ? r : 0.0f;
  float u = r, du = dr;
  if (q.ratio_cap > 0.0f && r > q.ratio_cap) u = q.ratio_cap, du = 0.0f;  // TRL's two-sided clipping
  const float lo = 1.0f - q.eps_low, hi = 1.0f + q.eps_high;
  const float c = fminf(fmaxf(r, lo), hi);
  const float dc = (r >= lo && r <= hi) ? dr : 0.0f;
  float loss, g;
  pick_max(-u * adv, -du * adv, -c * adv, -dc * adv, &loss, &g);
  *pre_dual = loss;
  if (q.dual_clip_c > 0.0f && adv < 0.0f) {  // dual clip: min(loss, -c3 A), constant side has no gradient
    const float cap = -q.dual_clip_c * adv;
    if (loss > cap) {
      loss = cap, g = 0.0f;
    } else if (loss == cap) {
      g = 0.5f * g;
    }
  }
  return {loss, g};
}

MHPO_HD TokenOut clip_token(float delta, float adv, const float* p) {
  float pre;
  return clip_token_limits(delta, adv, p, -CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT, &pre);
}

// SAPO: loss = -(4/tau) sigmoid(tau (r - 1)) A with r = exp(min(delta, 20)).
// params: SapoParams.
MHPO_HD TokenOut sapo_token(float delta, float adv, const float* params) {
  const SapoParams q = SapoParams::load(params);
  const float r = expf(fminf(delta, CLIP_LOG_RATIO_LIMIT));
  const float dr = delta <= CLIP_LOG_RATIO_LIMIT ? r : 0.0f;
  const float tau = adv > 0.0f ? q.tau_pos : q.tau_neg;
  float sig, slope;
  sigmoid_and_slope(tau * (r - 1.0f), &sig, &slope);
  return {-(4.0f / tau) * sig * adv, -4.0f * adv * slope * dr};
}

// The k3 KL estimator exp(d) - d - 1 at d = ref - logp, and exp(d) - 1 (= -d k3 / d logp).
// Below |d| = K3_SERIES_BELOW both come from the Taylor series of k3 (no cancellation in
// either), as in triton_kernels/epilogue.py k3 and mhpo_kernels/epilogue.py k3.
MHPO_HD float k3_kl(float d, float* em1) {
  if (fabsf(d) < K3_SERIES_BELOW) {
    const float k3 =
        d * d *
        (0.5f + d * (1.0f / 6.0f +
                     d * (1.0f / 24.0f + d * (1.0f / 120.0f + d * (1.0f / 720.0f + d * (1.0f / 5040.0f + d / 40320.0f))))));
    *em1 = k3 + d;
    return k3;
  }
  *em1 = expf(d) - 1.0f;
  return *em1 - d;
}

// loss and d loss / d logp of one active token (+ beta * k3 KL when has_ref).
// Inactive tokens never get here: the caller writes 0 and reads nothing.
MHPO_HD TokenOut token_epilogue(int mode, const float* params, float logp, float old, float adv,
                                bool has_ref, float ref, float beta) {
  const float delta = logp - old;
  TokenOut out{0.0f, 0.0f};
  if (mode == MODE_MHPO) {
    out = mhpo_token(delta, adv, params);
  } else if (mode == MODE_CLIP) {
    out = clip_token(delta, adv, params);
  } else if (mode == MODE_SAPO) {
    out = sapo_token(delta, adv, params);
  } else {
    return out;  // MODE_NONE: log-probs only
  }
  if (has_ref) {
    float em1;
    const float kl = k3_kl(ref - logp, &em1);
    out.loss += beta * kl;
    out.coef -= beta * em1;
  }
  return out;
}

}  // namespace mhpo
