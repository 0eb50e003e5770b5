// CUDA kernel of the finish op (math: mhpo_finish.h; ATen glue: mhpo_cuda_ops.cpp).
//
// One block of kThreads threads: the step is O(N) and tiny next to the pass
// over the logits; one block keeps every reduction in a fixed order
// (block-strided partials, then a shared-memory tree), so the loss, the
// per-token d loss / d logp and the metrics are deterministic, run to run.
#include <cuda_runtime.h>

#include <cstdint>

#include "mhpo_finish.h"

namespace mhpo::cuda {
namespace {

constexpr int kThreads = 256;

// Tree sums / maxima over the block; every thread gets the result.
__device__ float block_sum(float v, float* sh) {
  __syncthreads();
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  return sh[0];
}

__device__ int64_t block_min_i64(int64_t v, int64_t* sh) {
  __syncthreads();
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w && sh[threadIdx.x + w] < sh[threadIdx.x]) sh[threadIdx.x] = sh[threadIdx.x + w];
    __syncthreads();
  }
  return sh[0];
}

__device__ int64_t block_max_i64(int64_t v, int64_t* sh) { return -block_min_i64(-v, sh); }

__device__ FinishAcc block_merge(FinishAcc v, FinishAcc* sh) {
  __syncthreads();
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) finish_acc_merge(sh[threadIdx.x], sh[threadIdx.x + w]);
    __syncthreads();
  }
  return sh[0];
}

// One block per launch (minimum 1 resident): ptxas then gives sm_80 the registers it needs
// (with the default, it held the kernel to 48 and spilled to an 8-byte stack frame).
__global__ void __launch_bounds__(kThreads, 1) finish_kernel(FinishArgs a) {
  __shared__ FinishAcc sh_acc[kThreads];
  __shared__ float sh_f[kThreads];
  __shared__ int64_t sh_i[kThreads];
  const int tid = threadIdx.x;
  for (int64_t n = tid; n < a.N; n += kThreads) finish_zero_row(a, n);

  // packed offsets: start at 0, end at N, never decrease (else nothing below reads them)
  int64_t bad_layout = 0;
  if (a.cu != nullptr) {
    if (tid == 0 && (finish_cu(a, 0) != 0 || finish_cu(a, a.S) != a.N)) bad_layout = 1;
    for (int64_t s = tid; s < a.S; s += kThreads) {
      if (finish_cu(a, s + 1) < finish_cu(a, s)) bad_layout = 1;
    }
  }
  if (block_max_i64(bad_layout, sh_i) != 0) {
    if (tid == 0) {
      float m[NUM_METRICS];
      finish_metrics(finish_acc_empty(), m);
      for (int i = 0; i < NUM_METRICS; ++i) a.metrics[i] = m[i];
      a.loss[0] = 0.0f, a.bad[0] = BAD_CU_SEQLENS, a.bad[1] = -1;
    }
    return;
  }

  int64_t first_bad = INT64_MAX;
  if (a.check) {
    for (int64_t n = tid; n < a.N; n += kThreads) {
      if (finish_bad_target(a, n)) {
        first_bad = n;
        break;
      }
    }
  }
  first_bad = block_min_i64(first_bad, sh_i);

  // pass 1: the batch-wide denominators
  const bool per_seq_count = finish_counts_sequences(a.agg);
  float total = 0.0f, n_seq = 0.0f;
  if (per_seq_count) {
    for (int64_t s = 0; s < a.S; ++s) {
      float c = 0.0f;
      for (int64_t n = finish_cu(a, s) + tid, e = finish_cu(a, s + 1); n < e; n += kThreads) c += finish_mask(a, n);
      c = block_sum(c, sh_f);
      total += c;
      n_seq += c != 0.0f ? 1.0f : 0.0f;
    }
  } else {
    float c = 0.0f;
    for (int64_t n = tid; n < a.N; n += kThreads) c += finish_mask(a, n);
    total = block_sum(c, sh_f);
  }
  int64_t t_max = 0;
  if (a.cu != nullptr) {
    for (int64_t s = tid; s < a.S; s += kThreads) t_max = max(t_max, finish_cu(a, s + 1) - finish_cu(a, s));
    t_max = block_max_i64(t_max, sh_i);
  }
  const float t_norm = static_cast<float>(a.cu != nullptr ? t_max : a.T);

  // pass 2: each token (per sequence when its weight or log-ratio needs the sequence's sums)
  FinishAcc acc = finish_acc_empty();
  const bool per_seq = a.seq_level || a.agg == AGG_SEQ_MEAN_TOKEN_MEAN;
  const int64_t S = per_seq ? a.S : 1;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t b = per_seq ? finish_cu(a, s) : 0, e = per_seq ? finish_cu(a, s + 1) : a.N;
    float count = 0.0f, seq_delta = 0.0f;
    if (per_seq) {
      float c = 0.0f, sd = 0.0f;
      for (int64_t n = b + tid; n < e; n += kThreads) {
        const float m = finish_mask(a, n);
        c += m;
        if (a.seq_level && m != 0.0f) sd += m * (a.logp[n] - a.old[n]);
      }
      count = block_sum(c, sh_f);
      if (a.seq_level) seq_delta = safe_div_f(block_sum(sd, sh_f), count);
    }
    for (int64_t n = b + tid; n < e; n += kThreads) {
      const float m = finish_mask(a, n);
      if (m == 0.0f) continue;  // old / adv / ref / iw are read only on active rows
      const float delta = a.seq_level ? seq_delta : a.logp[n] - a.old[n];
      finish_row(a, n, delta, finish_weight(a.agg, a.norm, m, count, total, n_seq, t_norm), acc);
    }
  }
  acc = block_merge(acc, sh_acc);
  if (tid == 0) {
    float m[NUM_METRICS];
    finish_metrics(acc, m);
    for (int i = 0; i < NUM_METRICS; ++i) a.metrics[i] = m[i];
    a.loss[0] = acc.loss;
    a.bad[0] = first_bad == INT64_MAX ? BAD_NONE : BAD_TARGET;
    a.bad[1] = first_bad == INT64_MAX ? -1 : first_bad;
  }
}

}  // namespace

cudaError_t launch_finish(const FinishArgs& a, cudaStream_t stream) {
  finish_kernel<<<1, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace mhpo::cuda
