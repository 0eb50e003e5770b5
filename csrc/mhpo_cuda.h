// Launchers of the CUDA kernels (mhpo_cuda.cu). Plain pointers and a stream:
// the .cu file includes no torch header, which keeps nvcc fast; the ATen glue
// (checks, allocation, current stream) is mhpo_cuda_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mhpo_constants.h"

namespace mhpo::cuda {

struct FwdArgs {
  const void* logits;  // [N, V], dtype: a DType (DTYPE_FLOAT32, DTYPE_BFLOAT16, DTYPE_FLOAT16)
  int64_t row_stride;  // elements
  int64_t N;
  int32_t V;
  int32_t dtype;
  const int64_t* target;
  const float *old, *adv, *mask, *ref;  // ref may be null
  float *logp, *entropy, *lse, *loss, *coef;  // entropy null when not wanted
  int32_t mode;
  float params[KERNEL_PARAMS];
  float beta, temperature;
  int64_t ignore_index;
  int64_t vocab_start;  // the buffer holds vocabulary ids [vocab_start, vocab_start + V)
};

struct BwdArgs {
  const void* logits;
  void* out;  // may equal logits
  int64_t row_stride, out_row_stride;
  int64_t N;
  int32_t V;
  int32_t dtype;
  const int64_t* target;
  const float *lse, *entropy, *dlogp, *dent;  // entropy / dent null: no entropy term
  const float* scale;  // one value multiplying every dlogp (the loss's upstream gradient), or null
  float temperature;
  int64_t ignore_index;
  int64_t vocab_start;  // the buffer holds vocabulary ids [vocab_start, vocab_start + V)
};

// Both return the launch's cudaGetLastError().
cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream, int num_sms);
cudaError_t launch_bwd(const BwdArgs& a, cudaStream_t stream, int num_sms);

}  // namespace mhpo::cuda
