// The mhpo_kernels_C op library: schemas, the CPU kernels and the Meta (fake)
// kernels. Built as mhpo_kernels._C_cpu; the CUDA kernels (mhpo_cuda_ops.cpp)
// register into the same library from mhpo_kernels._C_cuda.
//
// fwd: one read of each row (csrc/cpu/rows_impl.inc), then the per-token
// epilogue (mhpo_epilogue.h). bwd: one read and one write of each row.
// fwd_grad: both, row by row (the gradient written in the forward).
// Semantics: the launcher contract in mhpo_kernels/backends.py.
#include <Python.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/rows.h"
#include "mhpo_finish_ops.h"
#include "mhpo_fused_grad_ops.h"
#include "mhpo_ops.h"

namespace mhpo {
namespace {

using cpu::RowKernels;

bool cpu_supports(const std::string& isa) {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  }
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  }
#endif
  return isa == "default";
}

// The best compiled row kernels this CPU runs. MHPO_CPU_ISA (default | avx2 |
// avx512) forces one (an error if this CPU or build lacks it); otherwise
// ATEN_CPU_CAPABILITY, when set, caps the choice as it caps PyTorch's own kernels.
RowKernels select_row_kernels() {
  const RowKernels all[] = {cpu::row_kernels_avx512(), cpu::row_kernels_avx2(), cpu::row_kernels_default()};
  const char* forced = std::getenv("MHPO_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    for (const auto& k : all) {
      if (k.isa != nullptr && forced == std::string(k.isa)) {
        TORCH_CHECK(cpu_supports(k.isa), "MHPO_CPU_ISA=", forced, ": this CPU does not support it");
        return k;
      }
    }
    TORCH_CHECK(false, "MHPO_CPU_ISA=", forced, ": not one of the ISAs built here (default, avx2, avx512)");
  }
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string cap_s = cap == nullptr ? "" : cap;
  for (const auto& k : all) {
    if (k.isa == nullptr || !cpu_supports(k.isa)) continue;
    if (cap_s == "default" && std::string(k.isa) != "default") continue;
    if (cap_s == "avx2" && std::string(k.isa) == "avx512") continue;
    return k;
  }
  return all[2];
}

std::string cpu_isa() { return select_row_kernels().isa; }

inline float load_scalar(const char* row, int64_t i, int dt) {
  switch (dt) {
    case cpu::kF32: return reinterpret_cast<const float*>(row)[i];
    case cpu::kBF16: return static_cast<float>(reinterpret_cast<const c10::BFloat16*>(row)[i]);
    default: return static_cast<float>(reinterpret_cast<const c10::Half*>(row)[i]);
  }
}

inline void store_scalar(char* row, int64_t i, int dt, float v) {
  switch (dt) {
    case cpu::kF32: reinterpret_cast<float*>(row)[i] = v; break;
    case cpu::kBF16: reinterpret_cast<c10::BFloat16*>(row)[i] = c10::BFloat16(v); break;
    default: reinterpret_cast<c10::Half*>(row)[i] = c10::Half(v); break;
  }
}

inline int64_t cpu_itemsize(int dt) { return dt == cpu::kF32 ? 4 : 2; }

// Rows per parallel task: at least ~32k logits of work each.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// at::parallel_for over rows, inline when there is at most one task's worth of
// work: waking a thread pool costs more than a small batch's whole pass.
template <typename F>
void for_rows(int64_t N, int64_t V, const F& f) {
  const int64_t grain = row_grain(V);
  if (N <= grain) {
    f(0, N);
  } else {
    at::parallel_for(0, N, grain, f);
  }
}

// The forward of one row, shared by fwd and fwd_grad, so the fused-gradient forward's log-prob,
// entropy, loss and coef are bit for bit the two-kernel forward's: the sweep (lse, entropy), the
// target's log-prob, the per-token epilogue where the row is active (old / adv / ref read only there).
struct FwdRows {
  RowKernels rk;
  int dt;
  int64_t V, row_bytes, ignore_index, vocab_start;
  int mode;
  float T, beta, pr[KERNEL_PARAMS];
  const char* base;
  const int64_t* tgt;
  const float *old_p, *adv_p, *ref_p;
  float *logp, *lse, *loss, *coef, *ent;

  FwdRows(const Tensor& logits, const Tensor& target, const Tensor& old, const Tensor& adv,
          const std::optional<Tensor>& ref, int64_t mode_, c10::ArrayRef<double> params, double beta_,
          double temperature, int64_t ignore_index_, int64_t vocab_start_, FwdOut& out)
      : rk(select_row_kernels()), dt(dtype_code(logits)), V(logits.size(1)),
        row_bytes(logits.stride(0) * static_cast<int64_t>(logits.element_size())), ignore_index(ignore_index_),
        vocab_start(vocab_start_), mode(static_cast<int>(mode_)), T(static_cast<float>(temperature)),
        beta(static_cast<float>(beta_)), base(static_cast<const char*>(logits.const_data_ptr())),
        tgt(target.const_data_ptr<int64_t>()), old_p(old.const_data_ptr<float>()),
        adv_p(adv.const_data_ptr<float>()), ref_p(ref.has_value() ? ref->const_data_ptr<float>() : nullptr) {
    params_to_float(params, pr);
    auto& [logp_t, ent_t, lse_t, loss_t, coef_t] = out;
    logp = logp_t.mutable_data_ptr<float>();
    lse = lse_t.mutable_data_ptr<float>();
    loss = loss_t.mutable_data_ptr<float>();
    coef = coef_t.mutable_data_ptr<float>();
    ent = ent_t.numel() > 0 ? ent_t.mutable_data_ptr<float>() : nullptr;
  }

  struct Row {
    float lse, h;
    bool valid;
    TokenOut o;
  };

  // row n: writes logp / lse / entropy / loss / coef[n]; want_h: compute the entropy; act: the row's
  // mask (fwd) or aggregation weight (fwd_grad), 0 = inactive
  Row run(int64_t n, bool want_h, float act) const {
    const char* row = base + n * row_bytes;
    Row r{0.0f, 0.0f, false, TokenOut{0.0f, 0.0f}};
    rk.fwd(row, V, dt, T, want_h, &r.lse, &r.h);
    lse[n] = r.lse;
    const int64_t y = tgt[n], yl = y - vocab_start;  // this buffer holds ids [vocab_start, vocab_start + V)
    r.valid = y != ignore_index;
    const bool owned = r.valid && yl >= 0 && yl < V;
    // z * inv_t rounded alone, as in lse (scale_rn): exactly 0 for V = 1 whatever the compiler contracts
    const float lp = owned ? scale_rn(load_scalar(row, yl, dt), 1.0f / T) - r.lse : 0.0f;
    logp[n] = lp;
    if (ent != nullptr) ent[n] = r.valid ? r.h : 0.0f;
    if (r.valid && act != 0.0f) {  // old / adv / ref are read only on active rows
      r.o = token_epilogue(mode, pr, lp, old_p[n], adv_p[n], ref_p != nullptr, ref_p != nullptr ? ref_p[n] : 0.0f,
                           beta);
    }
    loss[n] = r.o.loss;
    coef[n] = r.o.coef;
    return r;
  }
};

FwdOut fwd_cpu(const Tensor& logits, const Tensor& target, const Tensor& old, const Tensor& adv, const Tensor& mask,
               const std::optional<Tensor>& ref, int64_t mode, c10::ArrayRef<double> params, double beta,
               double temperature, int64_t ignore_index, bool want_entropy, int64_t vocab_start) {
  check_fwd(logits, target, old, adv, mask, ref, mode, params, temperature);
  auto out = alloc_fwd(logits, want_entropy);
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return out;
  const FwdRows rows(logits, target, old, adv, ref, mode, params, beta, temperature, ignore_index, vocab_start, out);
  const float* mask_p = mask.const_data_ptr<float>();
  for_rows(N, V, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) rows.run(n, want_entropy, mask_p[n]);
  });
  return out;
}

// One row of the backward: out = (dl * (1[v == y] - p) - de * p * (log p + h)) / T, zeros where
// y == ignore_index. Shared by bwd and fwd_grad, so the gradient the fused-gradient forward
// writes is bit for bit the one the two-kernel backward writes. out may be row (in place).
inline void bwd_one_row(const RowKernels& rk, const char* row, char* orow, int64_t V, int dt, int64_t y,
                        int64_t ignore_index, int64_t vocab_start, float inv_t, float l, float dl, bool has_ent,
                        float h, float de) {
  if (y == ignore_index) {
    std::memset(orow, 0, V * cpu_itemsize(dt));  // +0.0 in every float format
    return;
  }
  const int64_t yl = y - vocab_start;
  const bool owned = yl >= 0 && yl < V;  // else the target is in another vocabulary shard
  const float zy = owned ? load_scalar(row, yl, dt) : 0.0f;  // read before the row is (maybe) overwritten
  rk.bwd(row, orow, V, dt, inv_t, l, h, dl, de, has_ent);
  if (!owned) return;
  // the target element gets the one-hot term
  const float lp = scale_rn(zy, inv_t) - l, p = std::exp(lp);  // never contracted (V = 1: exactly 0)
  float g = dl * (1.0f - p);
  if (has_ent && p > 0.0f) g -= de * p * (lp + h);
  store_scalar(orow, yl, dt, g * inv_t);
}

void bwd_cpu(const Tensor& logits, const Tensor& target, const Tensor& lse, const std::optional<Tensor>& entropy,
             const Tensor& dlogp, const std::optional<Tensor>& dent, double temperature, int64_t ignore_index,
             const Tensor& out, int64_t vocab_start, const std::optional<Tensor>& scale) {
  check_bwd(logits, target, lse, entropy, dlogp, dent, temperature, out);
  check_scale(scale, logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return;
  const float sc = scale.has_value() ? scale->const_data_ptr<float>()[0] : 1.0f;  // the upstream gradient of a loss

  const RowKernels rk = select_row_kernels();
  const int dt = dtype_code(logits);
  const int64_t esz = logits.element_size();
  const int64_t in_row_bytes = logits.stride(0) * esz, out_row_bytes = out.stride(0) * esz;
  const char* in_base = static_cast<const char*>(logits.const_data_ptr());
  char* out_base = static_cast<char*>(out.data_ptr());
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const float *lse_p = lse.const_data_ptr<float>(), *dl_p = dlogp.const_data_ptr<float>();
  const bool has_ent = dent.has_value();
  const float* ent_p = has_ent ? entropy->const_data_ptr<float>() : nullptr;
  const float* de_p = has_ent ? dent->const_data_ptr<float>() : nullptr;
  const float inv_t = 1.0f / static_cast<float>(temperature);

  for_rows(N, V, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float h = has_ent ? ent_p[n] : 0.0f, de = has_ent ? de_p[n] : 0.0f;
      bwd_one_row(rk, in_base + n * in_row_bytes, out_base + n * out_row_bytes, V, dt, tgt[n], ignore_index,
                  vocab_start, inv_t, lse_p[n], dl_p[n] * sc, has_ent, h, de);
    }
  });
}

// ---- fwd_grad: the forward that also writes the gradient. The loss is the root of the
// graph, so its upstream gradient is taken as 1 and d loss / d logits is written while the row is
// still in cache: per row, the forward's sweep (lse, entropy), the per-token epilogue, then the
// backward's sweep over the same row (bwd_one_row), which a row of a few hundred KB finds in L2.
// weight[n]: the aggregation weight w_n (0 = inactive: old / adv / ref are not read there);
// the row's gradient is that of w_n * (loss_n - ent_coef * H_n). ----
// (check_fwd_grad, check_scale_grad: mhpo_fused_grad_ops.h, shared with the CUDA kernels)
FwdOut fwd_grad_cpu(const Tensor& logits, const Tensor& target, const Tensor& old, const Tensor& adv,
                    const std::optional<Tensor>& ref, const Tensor& weight, int64_t mode, c10::ArrayRef<double> params,
                    double beta, double temperature, int64_t ignore_index, bool want_entropy, double ent_coef,
                    const Tensor& grad) {
  check_fwd_grad(logits, target, old, adv, ref, weight, mode, params, temperature, grad);
  auto out = alloc_fwd(logits, want_entropy);
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return out;
  const FwdRows rows(logits, target, old, adv, ref, mode, params, beta, temperature, ignore_index, 0, out);
  const int64_t in_row_bytes = rows.row_bytes, out_row_bytes = grad.stride(0) * logits.element_size();
  char* gbase = static_cast<char*>(grad.data_ptr());
  const float* w_p = weight.const_data_ptr<float>();
  const float inv_t = 1.0f / rows.T, ec = static_cast<float>(ent_coef);
  const bool has_ent = ent_coef != 0.0, need_h = want_entropy || has_ent;

  for_rows(N, V, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float w = w_p[n];
      const FwdRows::Row r = rows.run(n, need_h, w);
      // d loss / d logp = w * coef (what finish returns as dlogp), d loss / d H = -ent_coef * w
      bwd_one_row(rows.rk, rows.base + n * in_row_bytes, gbase + n * out_row_bytes, V, rows.dt, rows.tgt[n],
                  ignore_index, 0, inv_t, r.lse, w * r.o.coef, has_ent, r.valid ? r.h : 0.0f, -ec * w);
    }
  });
  return out;
}

// grad *= scale unless scale == 1 (read here, on the device: no host sync). The fused-gradient
// forward wrote the gradient for an upstream gradient of 1; AMP's loss scaling sends another.
void scale_grad_cpu(const Tensor& grad, const Tensor& scale) {
  check_scale_grad(grad, scale);
  const float sc = scale.const_data_ptr<float>()[0];
  const int64_t N = grad.size(0), V = grad.size(1);
  if (sc == 1.0f || N == 0) return;
  const int dt = dtype_code(grad);
  const int64_t row_bytes = grad.stride(0) * static_cast<int64_t>(grad.element_size());
  char* base = static_cast<char*>(grad.data_ptr());
  for_rows(N, V, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      char* row = base + n * row_bytes;
      for (int64_t v = 0; v < V; ++v) store_scalar(row, v, dt, load_scalar(row, v, dt) * sc);
    }
  });
}

// ---- finish: the O(N) step after the forward pass (mhpo_finish.h), one serial
// loop in a fixed order (deterministic). ----
void finish_serial(const FinishArgs& a) {
  a.bad[0] = BAD_NONE, a.bad[1] = -1;
  for (int64_t n = 0; n < a.N; ++n) finish_zero_row(a, n);
  FinishAcc acc = finish_acc_empty();
  if (!finish_layout_ok(a)) {
    a.bad[0] = BAD_CU_SEQLENS;
  } else {
    if (a.check) {
      for (int64_t n = 0; n < a.N; ++n) {
        if (finish_bad_target(a, n)) {
          a.bad[0] = BAD_TARGET, a.bad[1] = n;
          break;
        }
      }
    }
    // pass 1: the batch-wide denominators (the launch's agg_norm may replace them)
    float total = 0.0f, n_seq = 0.0f;
    int64_t t_max = 0;
    for (int64_t s = 0; s < a.S; ++s) {
      const int64_t b = finish_cu(a, s), e = finish_cu(a, s + 1);
      float count = 0.0f;
      for (int64_t n = b; n < e; ++n) count += finish_mask(a, n);
      total += count;
      n_seq += count != 0.0f ? 1.0f : 0.0f;
      t_max = e - b > t_max ? e - b : t_max;
    }
    const float t_norm = static_cast<float>(a.cu != nullptr ? t_max : a.T);
    // pass 2: per sequence, its mask sum (and log-ratio), then each token
    for (int64_t s = 0; s < a.S; ++s) {
      const int64_t b = finish_cu(a, s), e = finish_cu(a, s + 1);
      float count = 0.0f, sum_delta = 0.0f;
      for (int64_t n = b; n < e; ++n) {
        const float m = finish_mask(a, n);
        count += m;
        if (a.seq_level && m != 0.0f) sum_delta += m * (a.logp[n] - a.old[n]);
      }
      const float seq_delta = safe_div_f(sum_delta, count);
      for (int64_t n = b; n < e; ++n) {
        const float m = finish_mask(a, n);
        if (m == 0.0f) continue;  // old / adv / ref / iw are read only on active rows
        const float delta = a.seq_level ? seq_delta : a.logp[n] - a.old[n];
        finish_row(a, n, delta, finish_weight(a.agg, a.norm, m, count, total, n_seq, t_norm), acc);
      }
    }
  }
  a.loss[0] = acc.loss;
  finish_metrics(acc, a.metrics);
}

FinishOut finish_cpu(const Tensor& logp, const std::optional<Tensor>& entropy, const Tensor& old, const Tensor& adv,
                     const std::optional<Tensor>& mask, const std::optional<Tensor>& ref, const Tensor& target,
                     const std::optional<Tensor>& cu_seqlens, int64_t num_seqs, int64_t seq_len, int64_t mode,
                     c10::ArrayRef<double> params, double beta, bool seq_level, int64_t agg, int64_t ignore_index,
                     int64_t num_classes, bool check, c10::ArrayRef<double> agg_norm, const std::optional<Tensor>& iw,
                     int64_t kl_est, const std::optional<Tensor>& token_out) {
  check_finish(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode, params, agg,
               agg_norm, iw, kl_est, token_out);
  auto out = alloc_finish(logp);
  FinishArgs a = finish_args(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode, params,
                             beta, seq_level, agg, agg_norm, ignore_index, num_classes, check, iw, kl_est, token_out,
                             out);
  finish_serial(a);
  return out;
}

// ---- Meta: shapes only (FakeTensor / torch.compile) ----
FwdOut fwd_meta(const Tensor& logits, const Tensor& target, const Tensor& old, const Tensor& adv, const Tensor& mask,
                const std::optional<Tensor>& ref, int64_t mode, c10::ArrayRef<double> params, double beta,
                double temperature, int64_t ignore_index, bool want_entropy, int64_t vocab_start) {
  check_fwd(logits, target, old, adv, mask, ref, mode, params, temperature);
  return alloc_fwd(logits, want_entropy);
}

void bwd_meta(const Tensor& logits, const Tensor& target, const Tensor& lse, const std::optional<Tensor>& entropy,
              const Tensor& dlogp, const std::optional<Tensor>& dent, double temperature, int64_t ignore_index,
              const Tensor& out, int64_t vocab_start, const std::optional<Tensor>& scale) {
  check_bwd(logits, target, lse, entropy, dlogp, dent, temperature, out);
  check_scale(scale, logits);
}

FwdOut fwd_grad_meta(const Tensor& logits, const Tensor& target, const Tensor& old, const Tensor& adv,
                     const std::optional<Tensor>& ref, const Tensor& weight, int64_t mode, c10::ArrayRef<double> params,
                     double beta, double temperature, int64_t ignore_index, bool want_entropy, double ent_coef,
                     const Tensor& grad) {
  check_fwd_grad(logits, target, old, adv, ref, weight, mode, params, temperature, grad);
  return alloc_fwd(logits, want_entropy);
}

void scale_grad_meta(const Tensor& grad, const Tensor& scale) { check_scale_grad(grad, scale); }

FinishOut finish_meta(const Tensor& logp, const std::optional<Tensor>& entropy, const Tensor& old, const Tensor& adv,
                      const std::optional<Tensor>& mask, const std::optional<Tensor>& ref, const Tensor& target,
                      const std::optional<Tensor>& cu_seqlens, int64_t num_seqs, int64_t seq_len, int64_t mode,
                      c10::ArrayRef<double> params, double beta, bool seq_level, int64_t agg, int64_t ignore_index,
                      int64_t num_classes, bool check, c10::ArrayRef<double> agg_norm,
                      const std::optional<Tensor>& iw, int64_t kl_est, const std::optional<Tensor>& token_out) {
  check_finish(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode, params, agg,
               agg_norm, iw, kl_est, token_out);
  return alloc_finish(logp);
}

}  // namespace
}  // namespace mhpo

TORCH_LIBRARY(mhpo_kernels_C, m) {
  m.def(
      "fwd(Tensor logits, Tensor target, Tensor old, Tensor adv, Tensor mask, Tensor? ref, int mode, "
      "float[] params, float beta, float temperature, int ignore_index, bool want_entropy, int vocab_start=0) "
      "-> (Tensor logp, Tensor entropy, Tensor lse, Tensor loss, Tensor coef)");
  m.def(
      "bwd(Tensor logits, Tensor target, Tensor lse, Tensor? entropy, Tensor dlogp, Tensor? dent, "
      "float temperature, int ignore_index, Tensor(a!) out, int vocab_start=0, Tensor? scale=None) -> ()");
  // finish's mode is named kernel_mode: torch.compile functionalizes an op with a mutable argument
  // (token_out) through auto_functionalized, which passes the op's arguments by name beside its own "mode".
  m.def(
      "finish(Tensor logp, Tensor? entropy, Tensor old, Tensor adv, Tensor? mask, Tensor? ref, Tensor target, "
      "Tensor? cu_seqlens, int num_seqs, int seq_len, int kernel_mode, float[] params, float beta, bool seq_level, "
      "int agg, int ignore_index, int num_classes, bool check, float[] agg_norm, Tensor? iw=None, int kl_est=0, "
      "Tensor(a!)? token_out=None) -> (Tensor loss, Tensor dlogp, Tensor metrics, Tensor bad)");
  m.def(
      "fwd_grad(Tensor logits, Tensor target, Tensor old, Tensor adv, Tensor? ref, Tensor weight, int mode, "
      "float[] params, float beta, float temperature, int ignore_index, bool want_entropy, float ent_coef, "
      "Tensor(a!) grad) -> (Tensor logp, Tensor entropy, Tensor lse, Tensor loss, Tensor coef)");
  m.def("scale_grad(Tensor(a!) grad, Tensor scale) -> ()");
  m.def("cpu_isa() -> str", &mhpo::cpu_isa);
}

TORCH_LIBRARY_IMPL(mhpo_kernels_C, CPU, m) {
  m.impl("fwd", &mhpo::fwd_cpu);
  m.impl("bwd", &mhpo::bwd_cpu);
  m.impl("finish", &mhpo::finish_cpu);
  m.impl("fwd_grad", &mhpo::fwd_grad_cpu);
  m.impl("scale_grad", &mhpo::scale_grad_cpu);
}

TORCH_LIBRARY_IMPL(mhpo_kernels_C, Meta, m) {
  m.impl("fwd", &mhpo::fwd_meta);
  m.impl("bwd", &mhpo::bwd_meta);
  m.impl("finish", &mhpo::finish_meta);
  m.impl("fwd_grad", &mhpo::fwd_grad_meta);
  m.impl("scale_grad", &mhpo::scale_grad_meta);
}

MHPO_PY_MODULE(_C_cpu)
