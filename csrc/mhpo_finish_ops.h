// ATen glue of the finish op (schema in mhpo_cpu.cpp, math in mhpo_finish.h):
// argument checks, output allocation and the FinishArgs of a call, shared by
// the CPU, CUDA and Meta implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "mhpo_finish.h"

namespace mhpo {

using FinishOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // loss, dlogp, metrics, bad

inline void check_finish_row(const char* name, const at::Tensor& t, const at::Tensor& logp) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logp.size(0), "mhpo_kernels_C.finish: ", name, " must be [N] with N = ",
              logp.size(0), ", got ", t.sizes());
  TORCH_CHECK(t.device() == logp.device(), "mhpo_kernels_C.finish: ", name, " is on ", t.device(), ", logp on ",
              logp.device());
  TORCH_CHECK(t.is_contiguous(), "mhpo_kernels_C.finish: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == (std::string(name) == "target" ? at::kLong : at::kFloat), "mhpo_kernels_C.finish: ",
              name, " has dtype ", t.scalar_type());
}

inline void check_finish(const at::Tensor& logp, const std::optional<at::Tensor>& entropy, const at::Tensor& old,
                         const at::Tensor& adv, const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& ref, const at::Tensor& target,
                         const std::optional<at::Tensor>& cu, int64_t num_seqs, int64_t seq_len, int64_t mode,
                         c10::ArrayRef<double> params, int64_t agg, c10::ArrayRef<double> agg_norm,
                         const std::optional<at::Tensor>& iw, int64_t kl_est,
                         const std::optional<at::Tensor>& token_out) {
  TORCH_CHECK(logp.dim() == 1 && logp.scalar_type() == at::kFloat && logp.is_contiguous(),
              "mhpo_kernels_C.finish: logp must be a contiguous [N] float32 tensor");
  if (entropy.has_value()) check_finish_row("entropy", *entropy, logp);
  check_finish_row("old", old, logp);
  check_finish_row("adv", adv, logp);
  if (mask.has_value()) check_finish_row("mask", *mask, logp);
  if (ref.has_value()) check_finish_row("ref", *ref, logp);
  check_finish_row("target", target, logp);
  if (iw.has_value()) check_finish_row("iw", *iw, logp);
  if (token_out.has_value()) {
    TORCH_CHECK(token_out->dim() == 2 && token_out->size(0) == NUM_TOKEN_OUT && token_out->size(1) == logp.size(0) &&
                    token_out->scalar_type() == at::kFloat && token_out->is_contiguous(),
                "mhpo_kernels_C.finish: token_out must be a contiguous [", NUM_TOKEN_OUT,
                ", N] float32 tensor with N = ", logp.size(0), ", got ", token_out->sizes(), " ",
                token_out->scalar_type());
    TORCH_CHECK(token_out->device() == logp.device(), "mhpo_kernels_C.finish: token_out is on ", token_out->device(),
                ", logp on ", logp.device());
  }
  if (cu.has_value()) {
    TORCH_CHECK(cu->dim() == 1 && cu->size(0) >= 1 && cu->is_contiguous() &&
                    (cu->scalar_type() == at::kInt || cu->scalar_type() == at::kLong),
                "mhpo_kernels_C.finish: cu_seqlens must be a contiguous [S+1] int32 / int64 tensor");
    TORCH_CHECK(cu->device() == logp.device(), "mhpo_kernels_C.finish: cu_seqlens is on ", cu->device());
  } else {
    TORCH_CHECK(num_seqs >= 0 && seq_len >= 0 && num_seqs * seq_len == logp.size(0),
                "mhpo_kernels_C.finish: num_seqs * seq_len must be N = ", logp.size(0), ", got ", num_seqs, " * ",
                seq_len);
  }
  TORCH_CHECK(mode >= MODE_NONE && mode <= MODE_CISPO, "mhpo_kernels_C.finish: unknown mode ", mode);
  TORCH_CHECK(params.size() == KERNEL_PARAMS, "mhpo_kernels_C.finish: params must have ", KERNEL_PARAMS, " values");
  TORCH_CHECK(kl_est >= KL_K3 && kl_est <= KL_LOW_VAR_KL, "mhpo_kernels_C.finish: unknown kl_est ", kl_est);
  TORCH_CHECK(agg >= 0 && agg < NUM_AGG, "mhpo_kernels_C.finish: unknown agg ", agg);
  TORCH_CHECK(agg_norm.size() == NUM_AGG_NORM, "mhpo_kernels_C.finish: agg_norm must have ", NUM_AGG_NORM, " values");
  TORCH_CHECK(agg_norm[0] >= 0 && agg_norm[1] >= 0 && agg_norm[2] >= 1,
              "mhpo_kernels_C.finish: agg_norm must be (count >= 0, loss_scale_factor >= 0, dp_size >= 1)");
}

// bwd's optional scale: one float32 value (0-d or [1]) on the logits' device, multiplying dlogp.
inline void check_scale(const std::optional<at::Tensor>& scale, const at::Tensor& logits) {
  if (!scale.has_value()) return;
  TORCH_CHECK(scale->numel() == 1 && scale->scalar_type() == at::kFloat && scale->device() == logits.device(),
              "mhpo_kernels_C.bwd: scale must be one float32 value on the logits' device, got ", scale->sizes(), " ",
              scale->scalar_type(), " on ", scale->device());
}

inline FinishOut alloc_finish(const at::Tensor& logp) {
  const auto f = logp.options().dtype(at::kFloat);
  return {at::empty({}, f), at::empty({logp.size(0)}, f), at::empty({NUM_METRICS}, f),
          at::empty({2}, logp.options().dtype(at::kLong))};
}

inline FinishArgs finish_args(const at::Tensor& logp, const std::optional<at::Tensor>& entropy, const at::Tensor& old,
                              const at::Tensor& adv, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& ref, const at::Tensor& target,
                              const std::optional<at::Tensor>& cu, int64_t num_seqs, int64_t seq_len, int64_t mode,
                              c10::ArrayRef<double> params, double beta, bool seq_level, int64_t agg,
                              c10::ArrayRef<double> agg_norm, int64_t ignore_index, int64_t num_classes, bool check,
                              const std::optional<at::Tensor>& iw, int64_t kl_est,
                              const std::optional<at::Tensor>& token_out, FinishOut& out) {
  FinishArgs a{};
  a.logp = logp.const_data_ptr<float>();
  a.entropy = entropy.has_value() ? entropy->const_data_ptr<float>() : nullptr;
  a.old = old.const_data_ptr<float>();
  a.adv = adv.const_data_ptr<float>();
  a.mask = mask.has_value() ? mask->const_data_ptr<float>() : nullptr;
  a.ref = ref.has_value() ? ref->const_data_ptr<float>() : nullptr;
  a.iw = iw.has_value() ? iw->const_data_ptr<float>() : nullptr;
  a.target = target.const_data_ptr<int64_t>();
  a.cu = cu.has_value() ? cu->const_data_ptr() : nullptr;
  a.cu_is_int64 = cu.has_value() && cu->scalar_type() == at::kLong;
  a.N = logp.size(0);
  a.S = cu.has_value() ? cu->size(0) - 1 : num_seqs;
  a.T = cu.has_value() ? 0 : seq_len;
  a.mode = static_cast<int32_t>(mode);
  for (int i = 0; i < KERNEL_PARAMS; ++i) a.params[i] = static_cast<float>(params[i]);
  a.beta = static_cast<float>(beta);
  a.kl_est = static_cast<int32_t>(kl_est);
  a.seq_level = seq_level;
  a.agg = static_cast<int32_t>(agg);
  a.norm = AggNorm{static_cast<float>(agg_norm[0]), static_cast<float>(agg_norm[1]), static_cast<float>(agg_norm[2])};
  a.ignore_index = ignore_index;
  a.num_classes = num_classes;
  a.check = check;
  auto& [loss, dlogp, metrics, bad] = out;
  a.loss = loss.mutable_data_ptr<float>();
  a.dlogp = dlogp.mutable_data_ptr<float>();
  a.metrics = metrics.mutable_data_ptr<float>();
  a.bad = bad.mutable_data_ptr<int64_t>();
  a.tok = token_out.has_value() ? token_out->mutable_data_ptr<float>() : nullptr;
  return a;
}

}  // namespace mhpo
