// The finishing step of the fused policy loss, shared by the CPU and CUDA
// kernels (the Triton twin is triton_kernels/finish.py). O(N) work after the
// forward pass over the logits: per-sequence sums, the ratio control's
// per-token surrogate at the token (or sequence) log-ratio, the aggregation
// weights, the loss, the per-token d loss / d logp the backward kernel scales
// by the upstream gradient, every metric and (optionally) the per-token loss
// terms, KL estimates and fraction-metric flags, in one launch.
//
// Python side (error decoding): mhpo_kernels/_finish.py; the mode, aggregation and
// bad-input ids and the metric slots: mhpo_constants.h (from mhpo_kernels/_constants.py).
#pragma once

#include <cmath>
#include <cstdint>

#include "mhpo_epilogue.h"

namespace mhpo {

// MODE_GSPO (finish only): GSPO's clip of the sequence log-ratio (clamped at max =
// GSPO_LOG_RATIO_LIMIT, no lower clamp); MODE_CISPO (finish only, token level):
// cispo_token. metrics[] (Metric slots): means over active tokens; ratio_* = exp of the
// extreme log-ratio. bad[] = (BadKind, position): what the host raises about after the launch.

// Sums over active tokens (ACC_* index s[]), plus the loss, the active count and the extremes.
enum AccSlot : int {
  ACC_NEG_DELTA = 0, ACC_PSI, ACC_ZETA, ACC_SURVIVAL, ACC_LOW_SURVIVAL, ACC_CLIP_LOW, ACC_CLIP_HIGH,
  ACC_DUAL_CLIP, ACC_ENTROPY, ACC_KL_REF, kNumAcc
};

struct FinishAcc {
  float loss, n, dmax, dmin;
  float s[kNumAcc];
};

MHPO_HD FinishAcc finish_acc_empty() {
  FinishAcc a;
  a.loss = 0.0f, a.n = 0.0f, a.dmax = -INFINITY, a.dmin = INFINITY;
  for (int i = 0; i < kNumAcc; ++i) a.s[i] = 0.0f;
  return a;
}

// max / min that propagate NaN, as torch's reductions do.
MHPO_HD float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }
MHPO_HD float nan_min(float a, float b) { return (b < a || b != b) ? b : a; }

MHPO_HD void finish_acc_merge(FinishAcc& a, const FinishAcc& b) {
  a.loss += b.loss;
  a.n += b.n;
  a.dmax = nan_max(a.dmax, b.dmax);
  a.dmin = nan_min(a.dmin, b.dmin);
  for (int i = 0; i < kNumAcc; ++i) a.s[i] += b.s[i];
}

// a / b with b == 0 read as 1 (an empty or fully masked batch gives 0, not NaN).
MHPO_HD float safe_div_f(float a, float b) { return a / (b == 0.0f ? 1.0f : b); }

// x clamped to [lo, hi], NaN passed through (torch.clamp; fminf / fmaxf would drop it).
MHPO_HD float clamp_nan(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// The KL estimator est (KlEstimator) at d = ref - logp; *dkl = d kl / d logp. k3 and
// low_var_kl (verl's: k3 at d clamped to +-LOW_VAR_KL_D_LIMIT, clamped to +-LOW_VAR_KL_LIMIT;
// no gradient where either clamp is active, gradient kept at equality) share k3_kl.
MHPO_HD float kl_estimate(int est, float d, float* dkl) {
  if (est == KL_K1) {
    *dkl = 1.0f;
    return -d;
  }
  if (est == KL_K2) {
    *dkl = -d;
    return 0.5f * d * d;
  }
  float em1;
  if (est == KL_LOW_VAR_KL) {
    const float k = k3_kl(clamp_nan(d, -LOW_VAR_KL_D_LIMIT, LOW_VAR_KL_D_LIMIT), &em1);
    *dkl = (d >= -LOW_VAR_KL_D_LIMIT && d <= LOW_VAR_KL_D_LIMIT && k <= LOW_VAR_KL_LIMIT) ? -em1 : 0.0f;
    return clamp_nan(k, -LOW_VAR_KL_LIMIT, LOW_VAR_KL_LIMIT);
  }
  const float k = k3_kl(d, &em1);
  *dkl = -em1;
  return k;
}

// CISPO (finish only): loss = -sg(c) A logp with c = clamp(r, ratio_low, ratio_high) and
// r = exp(delta clamped to +-CLIP_LOG_RATIO_LIMIT); ratio_low 0: no lower bound. params:
// CispoParams. *r_out: r (the clip fractions compare it).
MHPO_HD TokenOut cispo_token(float delta, float adv, float logp, const float* params, float* r_out) {
  const CispoParams q = CispoParams::load(params);
  const float r = expf(fminf(fmaxf(delta, -CLIP_LOG_RATIO_LIMIT), CLIP_LOG_RATIO_LIMIT));
  const float c = fminf(fmaxf(r, q.ratio_low), q.ratio_high);
  *r_out = r;
  return {-c * adv * logp, -c * adv};
}

// What finish_token hands back for one active token: w * d L / d logp (dlogp), w * L (its
// term of the loss), its KL estimate and its fraction-metric flag (the TokenOutRow rows).
struct FinishTok {
  float coef, loss, kl, flag;
};

// One active token. delta: its log-ratio (the sequence's for sequence-level modes); logp:
// its own log-prob (for the KL and CISPO); iw: its importance weight, multiplying the ratio
// control's loss and coef (1: none); w: its aggregation weight. Adds its loss w * L and its
// metric terms to acc. flag: what the mode's fraction metric counts (clipfrac,
// low_survival_frac).
MHPO_HD FinishTok finish_token(int mode, const float* p, float beta, int kl_est, float delta, float adv, float logp,
                               float iw, bool has_ref, float ref, bool has_ent, float ent, float w, FinishAcc& acc) {
  TokenOut o{0.0f, 0.0f};
  FinishTok t{0.0f, 0.0f, 0.0f, 0.0f};
  acc.n += 1.0f;
  acc.s[ACC_NEG_DELTA] -= delta;
  acc.dmax = nan_max(acc.dmax, delta);
  acc.dmin = nan_min(acc.dmin, delta);
  if (mode == MODE_MHPO) {
    float psi, zeta;
    o = mhpo_token_parts(delta, adv, p, &psi, &zeta);
    const float survival = expf(-zeta);
    t.flag = survival < 0.5f ? 1.0f : 0.0f;
    acc.s[ACC_PSI] += psi;
    acc.s[ACC_ZETA] += zeta;
    acc.s[ACC_SURVIVAL] += survival;
    acc.s[ACC_LOW_SURVIVAL] += t.flag;
  } else if (mode == MODE_CLIP || mode == MODE_GSPO) {
    const bool gspo = mode == MODE_GSPO;
    const float lo = gspo ? -INFINITY : -CLIP_LOG_RATIO_LIMIT, hi = gspo ? GSPO_LOG_RATIO_LIMIT : CLIP_LOG_RATIO_LIMIT;
    float unclipped_loss;
    o = clip_token_limits(delta, adv, p, lo, hi, &unclipped_loss);
    const ClipParams q = ClipParams::load(p);  // GSPO's layout is its prefix
    const float r = expf(fminf(fmaxf(delta, lo), hi));
    const bool low = r < 1.0f - q.eps_low && adv < 0.0f, high = r > 1.0f + q.eps_high && adv > 0.0f;
    t.flag = low || high ? 1.0f : 0.0f;
    acc.s[ACC_CLIP_LOW] += low ? 1.0f : 0.0f;
    acc.s[ACC_CLIP_HIGH] += high ? 1.0f : 0.0f;
    acc.s[ACC_DUAL_CLIP] +=
        (q.dual_clip_c > 0.0f && adv < 0.0f && unclipped_loss > -q.dual_clip_c * adv) ? 1.0f : 0.0f;
  } else if (mode == MODE_CISPO) {  // clip fractions without the advantage's sign (verl's pg_clipfrac)
    float r;
    o = cispo_token(delta, adv, logp, p, &r);
    const CispoParams q = CispoParams::load(p);
    const bool low = r < q.ratio_low, high = r > q.ratio_high;
    t.flag = low || high ? 1.0f : 0.0f;
    acc.s[ACC_CLIP_LOW] += low ? 1.0f : 0.0f;
    acc.s[ACC_CLIP_HIGH] += high ? 1.0f : 0.0f;
  } else if (mode == MODE_SAPO) {
    o = sapo_token(delta, adv, p);
  }
  o.loss *= iw, o.coef *= iw;
  if (has_ref) {
    float dkl;
    t.kl = kl_estimate(kl_est, ref - logp, &dkl);
    acc.s[ACC_KL_REF] += t.kl;
    if (beta != 0.0f) {  // with beta = 0, ref only feeds the metric (0 * inf would be NaN)
      o.loss += beta * t.kl;
      o.coef += beta * dkl;
    }
  }
  if (has_ent) acc.s[ACC_ENTROPY] += ent;
  t.loss = w * o.loss;
  t.coef = w * o.coef;
  acc.loss += t.loss;
  return t;
}

// The metrics[] of a finished accumulator.
MHPO_HD void finish_metrics(const FinishAcc& a, float* m) {
  const float n = fmaxf(a.n, 1.0f);
  const bool any = a.n > 0.0f;
  m[MET_KL_OLD] = a.s[ACC_NEG_DELTA] / n;
  m[MET_RATIO_MAX] = expf(any ? a.dmax : 0.0f);
  m[MET_RATIO_MIN] = expf(any ? a.dmin : 0.0f);
  m[MET_PSI_MEAN] = a.s[ACC_PSI] / n;
  m[MET_ZETA_MEAN] = a.s[ACC_ZETA] / n;
  m[MET_SURVIVAL_MEAN] = a.s[ACC_SURVIVAL] / n;
  m[MET_LOW_SURVIVAL_FRAC] = a.s[ACC_LOW_SURVIVAL] / n;
  m[MET_CLIPFRAC_LOW] = a.s[ACC_CLIP_LOW] / n;
  m[MET_CLIPFRAC_HIGH] = a.s[ACC_CLIP_HIGH] / n;
  m[MET_CLIPFRAC] = (a.s[ACC_CLIP_LOW] + a.s[ACC_CLIP_HIGH]) / n;
  m[MET_DUAL_CLIPFRAC] = a.s[ACC_DUAL_CLIP] / n;
  m[MET_ENTROPY_MEAN] = a.s[ACC_ENTROPY] / n;
  m[MET_KL_REF] = a.s[ACC_KL_REF] / n;
}

// The normalisers of the aggregation (verl 0.9.1's agg_loss): agg_norm[] of the launch
// (mhpo_kernels/_inputs.py agg_norm). global_count > 0 replaces the local denominator
// (token-mean: the mask sum; seq-mean-*: the non-empty sequences); loss_scale_factor > 0
// replaces seq-mean-token-sum-norm's T; dp_size multiplies every weight.
struct AggNorm {
  float global_count, loss_scale_factor, dp_size;
};

// The weight w_n = m_n * a_s of a token (safe_div: an empty batch gives 0). count: its
// sequence's mask sum; total: the batch's; n_seq: sequences with count != 0; t_norm: the
// default loss_scale_factor, T (padded) or the longest sequence (packed).
MHPO_HD float finish_weight(int agg, const AggNorm& g, float m, float count, float total, float n_seq,
                            float t_norm) {
  const float md = m * g.dp_size;
  const float n_tok = g.global_count > 0.0f ? g.global_count : total;
  const float n_sq = g.global_count > 0.0f ? g.global_count : n_seq;
  switch (agg) {
    case AGG_TOKEN_MEAN: return safe_div_f(md, n_tok);
    case AGG_TOKEN_SUM: return md;
    case AGG_SEQ_MEAN_TOKEN_MEAN: return safe_div_f(safe_div_f(md, count), n_sq);
    case AGG_SEQ_MEAN_TOKEN_SUM: return safe_div_f(md, n_sq);
    default: return safe_div_f(md, n_sq * (g.loss_scale_factor > 0.0f ? g.loss_scale_factor : t_norm));
  }
}

// Whether pass 1 needs the per-sequence mask sums (the non-empty sequence count).
MHPO_HD bool finish_counts_sequences(int agg) {
  return agg == AGG_SEQ_MEAN_TOKEN_MEAN || agg == AGG_SEQ_MEAN_TOKEN_SUM || agg == AGG_SEQ_MEAN_TOKEN_SUM_NORM;
}

// Everything a finish launch reads and writes (plain pointers: CPU or device).
struct FinishArgs {
  const float *logp, *entropy, *old, *adv, *mask, *ref;  // entropy / mask / ref may be null (mask null = ones)
  const float* iw;  // importance weights or null (ones)
  const int64_t* target;
  const void* cu;  // packed offsets [S+1] or null (padded: S sequences of T tokens)
  bool cu_is_int64;
  int64_t N, S, T;
  int32_t mode;
  float params[KERNEL_PARAMS];
  float beta;
  int32_t kl_est;  // KlEstimator of the beta term and the kl_ref metric
  bool seq_level;
  int32_t agg;
  AggNorm norm;
  int64_t ignore_index, num_classes;
  bool check;  // scan for target ids outside [0, num_classes)
  float *loss, *dlogp, *metrics;  // loss: 1 value; dlogp: [N]; metrics: [NUM_METRICS]
  float* tok;  // token_out [NUM_TOKEN_OUT, N] (TokenOutRow) or null
  int64_t* bad;  // [2]: (BadKind, position)
};

MHPO_HD int64_t finish_cu(const FinishArgs& a, int64_t s) {
  if (a.cu == nullptr) return s * a.T;
  return a.cu_is_int64 ? static_cast<const int64_t*>(a.cu)[s] : static_cast<const int32_t*>(a.cu)[s];
}

MHPO_HD float finish_mask(const FinishArgs& a, int64_t n) {
  if (a.target[n] == a.ignore_index) return 0.0f;
  return a.mask == nullptr ? 1.0f : a.mask[n];
}

// Packed offsets start at 0, never decrease and end at N (padded: always).
// Serial; the CUDA kernel checks the same in parallel.
MHPO_HD bool finish_layout_ok(const FinishArgs& a) {
  if (a.cu == nullptr) return true;
  if (finish_cu(a, 0) != 0 || finish_cu(a, a.S) != a.N) return false;
  for (int64_t s = 0; s < a.S; ++s) {
    if (finish_cu(a, s + 1) < finish_cu(a, s)) return false;
  }
  return true;
}

// Token n's outputs before pass 2: dlogp and token_out 0 (what inactive rows keep).
MHPO_HD void finish_zero_row(const FinishArgs& a, int64_t n) {
  a.dlogp[n] = 0.0f;
  if (a.tok != nullptr) a.tok[TOK_LOSS * a.N + n] = a.tok[TOK_KL * a.N + n] = a.tok[TOK_FLAG * a.N + n] = 0.0f;
}

// Active token n (log-ratio delta, aggregation weight w): its dlogp and token_out column.
// adv / ref / iw are read here only (inactive rows may hold inf / NaN).
MHPO_HD void finish_row(const FinishArgs& a, int64_t n, float delta, float w, FinishAcc& acc) {
  const FinishTok t = finish_token(a.mode, a.params, a.beta, a.kl_est, delta, a.adv[n], a.logp[n],
                                   a.iw != nullptr ? a.iw[n] : 1.0f, a.ref != nullptr,
                                   a.ref != nullptr ? a.ref[n] : 0.0f, a.entropy != nullptr,
                                   a.entropy != nullptr ? a.entropy[n] : 0.0f, w, acc);
  a.dlogp[n] = t.coef;
  if (a.tok != nullptr) {
    a.tok[TOK_LOSS * a.N + n] = t.loss;
    a.tok[TOK_KL * a.N + n] = t.kl;
    a.tok[TOK_FLAG * a.N + n] = t.flag;
  }
}

MHPO_HD bool finish_bad_target(const FinishArgs& a, int64_t n) {
  const int64_t y = a.target[n];
  return y != a.ignore_index && (y < 0 || y >= a.num_classes);
}

}  // namespace mhpo
