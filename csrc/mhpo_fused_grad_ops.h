// Argument checks of the fwd_grad / scale_grad ops (the forward that writes the gradient),
// shared by their CPU and Meta kernels (mhpo_cpu.cpp) and their CUDA kernels (mhpo_fused_grad_ops.cpp).
#pragma once

#include "mhpo_finish_ops.h"  // check_scale
#include "mhpo_ops.h"

namespace mhpo {

inline void check_fwd_grad(const Tensor& logits, const Tensor& target, const Tensor& old, const Tensor& adv,
                           const std::optional<Tensor>& ref, const Tensor& weight, int64_t mode,
                           c10::ArrayRef<double> params, double temperature, const Tensor& grad) {
  check_fwd(logits, target, old, adv, weight, ref, mode, params, temperature);
  TORCH_CHECK(mode != MODE_NONE, "mhpo_kernels_C.fwd_grad: needs a ratio control (mode != 0)");
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  grad.device() == logits.device(),
              "mhpo_kernels_C.fwd_grad: grad must have the logits' shape, dtype and device (", logits.sizes(), " ",
              logits.scalar_type(), "), got ", grad.sizes(), " ", grad.scalar_type(), " on ", grad.device());
  TORCH_CHECK(grad.stride(1) == 1 || grad.size(1) == 1, "mhpo_kernels_C.fwd_grad: grad needs stride(1) == 1, got ",
              grad.strides());
  TORCH_CHECK(grad.size(0) <= 1 || grad.stride(0) >= grad.size(1),
              "mhpo_kernels_C.fwd_grad: the rows of grad overlap (stride(0) = ", grad.stride(0), " < V)");
}

inline void check_scale_grad(const Tensor& grad, const Tensor& scale) {
  check_logits(grad);
  check_scale(scale, grad);
  TORCH_CHECK(grad.size(0) <= 1 || grad.stride(0) >= grad.size(1),
              "mhpo_kernels_C.scale_grad: the rows of grad overlap (stride(0) = ", grad.stride(0), ")");
}

}  // namespace mhpo
