// Argument checks and output allocation shared by the CPU, CUDA and Meta
// implementations of the mhpo_kernels_C ops (schemas: mhpo_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "mhpo_epilogue.h"

namespace mhpo {

using at::Tensor;
using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The logits' DType (mhpo_constants.h; csrc/cpu/rows.h and the CUDA launcher read the same).
inline int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DTYPE_FLOAT32;
    case at::kBFloat16: return DTYPE_BFLOAT16;
    case at::kHalf: return DTYPE_FLOAT16;
    default: TORCH_CHECK(false, "mhpo_kernels_C: logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

inline void check_logits(const Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "mhpo_kernels_C: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "mhpo_kernels_C: logits need V >= 1, got ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= INT32_MAX, "mhpo_kernels_C: V must fit in int32, got V = ", logits.size(1));
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1,
              "mhpo_kernels_C: logits need stride(1) == 1, got strides ", logits.strides());
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= 0, "mhpo_kernels_C: negative row stride ",
              logits.stride(0));
  dtype_code(logits);
}

inline void check_row(const char* name, const Tensor& t, const Tensor& logits, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), "mhpo_kernels_C: ", name, " must be [N] with N = ",
              logits.size(0), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "mhpo_kernels_C: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), "mhpo_kernels_C: ", name, " is on ", t.device(), ", logits on ",
              logits.device());
  TORCH_CHECK(t.is_contiguous(), "mhpo_kernels_C: ", name, " must be contiguous");
}

inline void check_fwd(const Tensor& logits, const Tensor& target, const Tensor& old, const Tensor& adv,
                      const Tensor& mask, const std::optional<Tensor>& ref, int64_t mode, c10::ArrayRef<double> params,
                      double temperature) {
  check_logits(logits);
  check_row("target", target, logits, at::kLong);
  check_row("old", old, logits, at::kFloat);
  check_row("adv", adv, logits, at::kFloat);
  check_row("mask", mask, logits, at::kFloat);
  if (ref.has_value()) check_row("ref", *ref, logits, at::kFloat);
  TORCH_CHECK(mode >= MODE_NONE && mode <= MODE_SAPO, "mhpo_kernels_C: unknown mode ", mode, " (expected ",
              static_cast<int>(MODE_NONE), " to ", static_cast<int>(MODE_SAPO), ")");
  TORCH_CHECK(params.size() == KERNEL_PARAMS, "mhpo_kernels_C: params must have ", KERNEL_PARAMS, " values, got ",
              params.size());
  TORCH_CHECK(temperature > 0, "mhpo_kernels_C: temperature must be > 0, got ", temperature);
}

inline void check_bwd(const Tensor& logits, const Tensor& target, const Tensor& lse,
                      const std::optional<Tensor>& entropy, const Tensor& dlogp, const std::optional<Tensor>& dent,
                      double temperature, const Tensor& out) {
  check_logits(logits);
  check_row("target", target, logits, at::kLong);
  check_row("lse", lse, logits, at::kFloat);
  check_row("dlogp", dlogp, logits, at::kFloat);
  if (dent.has_value()) {
    TORCH_CHECK(entropy.has_value(), "mhpo_kernels_C: dent needs the forward's entropy");
    check_row("dent", *dent, logits, at::kFloat);
    check_row("entropy", *entropy, logits, at::kFloat);
  }
  TORCH_CHECK(out.sizes() == logits.sizes(), "mhpo_kernels_C: out must have the logits' shape ", logits.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == logits.scalar_type(), "mhpo_kernels_C: out must have the logits' dtype ",
              logits.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == logits.device(), "mhpo_kernels_C: out must be on the logits' device ",
              logits.device(), ", got ", out.device());
  TORCH_CHECK(out.stride(1) == 1 || out.size(1) == 1, "mhpo_kernels_C: out needs stride(1) == 1, got strides ",
              out.strides());
  TORCH_CHECK(temperature > 0, "mhpo_kernels_C: temperature must be > 0, got ", temperature);
}

inline void params_to_float(c10::ArrayRef<double> params, float* p) {
  for (int i = 0; i < KERNEL_PARAMS; ++i) p[i] = static_cast<float>(params[i]);
}

// (logp, entropy, lse, loss, coef): [N] fp32 each; entropy is [0] when not wanted.
inline FwdOut alloc_fwd(const Tensor& logits, bool want_entropy) {
  const auto opts = logits.options().dtype(at::kFloat);
  const int64_t N = logits.size(0);
  return {at::empty({N}, opts), at::empty({want_entropy ? N : 0}, opts), at::empty({N}, opts), at::empty({N}, opts),
          at::empty({N}, opts)};
}

}  // namespace mhpo

// Each extension is also a (nearly empty) Python module, so `import
// mhpo_kernels._C_cpu` loads it and runs its op registrations.
#define MHPO_PY_MODULE(name)                                                      \
  PyMODINIT_FUNC PyInit_##name(void) {                                            \
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, #name, nullptr, -1, nullptr}; \
    return PyModule_Create(&def);                                                 \
  }
