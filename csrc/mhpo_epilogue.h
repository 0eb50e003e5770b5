// Per-token math shared by the CPU and CUDA kernels, so the two cannot drift.
//
// Everything is fp32 and branch-light. Two pieces:
//   * SoftmaxState: the online (max, sum-exp, entropy) accumulator of one row
//     and its merge / finalize;
//   * token_epilogue: loss[n] and coef[n] = d loss[n] / d logp[n] of each mode
//     (mhpo_kernels/config.py MODE_*, params = that config's kernel_params()).
// Ground truth: mhpo_kernels/reference.py (token_loss and the KL term).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MHPO_HD __host__ __device__ __forceinline__
#else
#define MHPO_HD inline
#endif

namespace mhpo {

enum Mode : int { MODE_NONE = 0, MODE_MHPO = 1, MODE_CLIP = 2, MODE_SAPO = 3 };
constexpr int kNumParams = 8;
// verl clamps log r at +-20 in its clip loss; SAPO caps r at exp(20).
constexpr float kLogRatioLimit = 20.0f;

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

// Every kernel scales logits as x = z * inv_t (one rounding, the same everywhere),
// so log p = z * inv_t - lse is exactly 0 where it should be (V == 1).
MHPO_HD void softmax_state_finalize(SoftmaxState a, float inv_t, float* lse, float* entropy) {
  const float log_s = logf(a.s);
  *lse = a.m * inv_t + log_s;
  *entropy = log_s - a.t / a.s;
}

// ---------------------------------------------------------------------------
// Stable scalar helpers.

MHPO_HD float softplus_f(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

// x ** k for x >= 0, with 0 ** k = 0 (k > 0 always: validated by the configs).
MHPO_HD float pow_nonneg(float x, float k) { return x > 0.0f ? powf(x, k) : 0.0f; }

// tanh(u) and sech^2(u) from t = exp(-2|u|) in (0, 1]: never overflows.
MHPO_HD void tanh_sech2(float u, float* th, float* sech2) {
  const float t = expf(-2.0f * fabsf(u));
  const float r = 1.0f / (1.0f + t);
  const float a = (1.0f - t) * r;
  *th = u < 0.0f ? -a : a;
  *sech2 = 4.0f * t * r * r;
}

// sigmoid(x) and sigmoid(x) * (1 - sigmoid(x)), from e = exp(-|x|) in (0, 1].
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
// params: (c, k_pos, lam_pos, k_neg, lam_neg, use_lfm, use_dhp, 0). Also hands back psi and zeta.
MHPO_HD TokenOut mhpo_token_parts(float delta, float adv, const float* p, float* psi_out, float* zeta_out) {
  float psi = delta, dpsi = 1.0f;
  if (p[5] != 0.0f) {
    float th;
    tanh_sech2(delta / p[0], &th, &dpsi);
    psi = p[0] * th;
  }
  float zeta = 0.0f;
  if (p[6] != 0.0f) {
    zeta = pow_nonneg(softplus_f(psi) / p[2], p[1]) + pow_nonneg(softplus_f(-psi) / p[4], p[3]);
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
// GSPO: (-inf, 10]). params: (eps_low, eps_high, dual_clip_c or 0, delta cap or 0).
// *pre_dual: the loss before the dual-clip cap (what the dual_clipfrac metric compares).
MHPO_HD TokenOut clip_token_limits(float delta, float adv, const float* p, float lo_lim, float hi_lim,
                                   float* pre_dual) {
  const float ld = fminf(fmaxf(delta, lo_lim), hi_lim);
  const float r = expf(ld);
  const float dr = (delta >= lo_lim && delta <= hi_lim) ? r : 0.0f;
  float u = r, du = dr;
  if (p[3] > 0.0f && r > p[3]) u = p[3], du = 0.0f;
  const float lo = 1.0f - p[0], hi = 1.0f + p[1];
  const float c = fminf(fmaxf(r, lo), hi);
  const float dc = (r >= lo && r <= hi) ? dr : 0.0f;
  float loss, g;
  pick_max(-u * adv, -du * adv, -c * adv, -dc * adv, &loss, &g);
  *pre_dual = loss;
  if (p[2] > 0.0f && adv < 0.0f) {  // dual clip: min(loss, -c3 A), constant side has no gradient
    const float cap = -p[2] * adv;
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
  return clip_token_limits(delta, adv, p, -kLogRatioLimit, kLogRatioLimit, &pre);
}

// SAPO: loss = -(4/tau) sigmoid(tau (r - 1)) A with r = exp(min(delta, 20)).
// params: (tau_pos, tau_neg).
MHPO_HD TokenOut sapo_token(float delta, float adv, const float* p) {
  const float r = expf(fminf(delta, kLogRatioLimit));
  const float dr = delta <= kLogRatioLimit ? r : 0.0f;
  const float tau = adv > 0.0f ? p[0] : p[1];
  float sig, slope;
  sigmoid_and_slope(tau * (r - 1.0f), &sig, &slope);
  return {-(4.0f / tau) * sig * adv, -4.0f * adv * slope * dr};
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
    // k3 = exp(d) - d - 1 with d = ref - logp; d k3 / d logp = 1 - exp(d)
    const float d = ref - logp;
    const float em1 = expm1f(d);
    out.loss += beta * (em1 - d);
    out.coef -= beta * em1;
  }
  return out;
}

}  // namespace mhpo
