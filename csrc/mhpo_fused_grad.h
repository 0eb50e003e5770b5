// Launchers of the CUDA fwd_grad / scale_grad kernels (mhpo_fused_grad.cu): plain pointers and a
// stream, as mhpo_cuda.h; the ATen glue is mhpo_fused_grad_ops.cpp. Semantics: the fwd_grad and
// scale_grad launchers of the contract in mhpo_kernels/backends/__init__.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mhpo_constants.h"

namespace mhpo::cuda {

struct FwdGradArgs {
  const void* logits;  // [N, V], dtype: a DType
  void* grad;          // [N, V], same dtype; may equal logits
  int64_t row_stride, grad_row_stride;  // elements
  int64_t N;
  int32_t V;
  int32_t dtype;
  const int64_t* target;
  const float *old, *adv, *ref, *weight;  // ref may be null; weight: the aggregation weight (0 = inactive)
  float *logp, *entropy, *lse, *loss, *coef;  // entropy null when not wanted
  int32_t mode;  // != MODE_NONE
  float params[KERNEL_PARAMS];
  float beta, temperature, ent_coef;
  int64_t ignore_index;
};

struct ScaleGradArgs {
  void* grad;
  int64_t row_stride;
  int64_t N;
  int32_t V;
  int32_t dtype;
  const float* scale;  // one value, read on the device
};

// The device facts the plan needs (mhpo_fused_grad_plan.h).
struct DeviceInfo {
  int num_sms;
  int cc_major;
  int max_smem_optin;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
};

// Both return the launch's cudaGetLastError().
cudaError_t launch_fwd_grad(const FwdGradArgs& a, cudaStream_t stream, const DeviceInfo& dev);
cudaError_t launch_scale_grad(const ScaleGradArgs& a, cudaStream_t stream, const DeviceInfo& dev);

}  // namespace mhpo::cuda
