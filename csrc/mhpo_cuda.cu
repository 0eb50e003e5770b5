// CUDA kernels of the fused MHPO op (launcher contract: mhpo_kernels/backends.py).
//
// fwd: one pass over each row. A warp per row when the row is small (<= 8 KiB),
//      else a 256-thread block per row. 128-bit loads on the 16-byte aligned
//      body of the row (scalar head / tail, so any V and any row stride), an
//      online (max, sum-exp, entropy) state per thread in fp32, merged by warp
//      shuffles and shared memory; then the target gather and the per-token
//      epilogue (mhpo_epilogue.h, shared with the CPU kernels).
// bwd: one pass writing (dlogp (onehot - p) - dent p (log p + H)) / T, in place or not.
// Rows: a grid-stride loop with int64 row offsets (N * V > 2^31 is fine).
#include <cuda_runtime.h>

#include <cstdint>

#include "mhpo_cuda.h"
#include "mhpo_cuda_rows.cuh"  // Elem, segments, fold, warp_merge, row_state, row_grad
#include "mhpo_epilogue.h"

namespace mhpo::cuda {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kWarpRowBytes = 8192;  // rows up to this size get a warp, larger ones a block

// ---- forward ----

template <int DT, int TPR, bool ENT>
__global__ void __launch_bounds__(kBlock) fwd_kernel(const FwdArgs a) {
  using E = Elem<DT>;
  using S = typename E::S;
  constexpr int RPB = kBlock / TPR, NW = TPR / 32;
  __shared__ SoftmaxState partial[NW];
  const int lane = threadIdx.x % TPR;
  const int V = a.V;
  const float inv_t = 1.0f / a.temperature;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR; row < a.N;
       row += static_cast<int64_t>(gridDim.x) * RPB) {
    const S* p = static_cast<const S*>(a.logits) + row * a.row_stride;
    const int64_t y = a.target[row], yl = y - a.vocab_start;
    const bool valid = y != a.ignore_index, owned = valid && yl >= 0 && yl < V;  // never read out of bounds
    float zy = 0.0f;
    if (lane == 0 && owned) zy = E::to_f(p[yl]);

    SoftmaxState st = row_state<DT, TPR, ENT>(p, V, lane, inv_t);
    st = warp_merge(st, inv_t);
    if constexpr (NW > 1) {
      const int w = lane / 32;
      if ((lane & 31) == 0) partial[w] = st;
      __syncthreads();
      if (w == 0) st = warp_merge(lane < NW ? partial[lane] : softmax_state_empty(), inv_t);
      __syncthreads();  // partial[] is reused by the next row
    }

    if (lane == 0) {
      float lse, h;
      softmax_state_finalize(st, inv_t, &lse, &h);
      // (z_y - m) / T - log s, not z_y / T - lse: exactly 0 for a one-element row, whether or
      // not the compiler fuses the multiply into the subtraction
      const float lp = owned ? (zy - st.m) * inv_t - logf(st.s) : 0.0f;
      a.lse[row] = lse;
      a.logp[row] = lp;
      if (ENT) a.entropy[row] = valid ? h : 0.0f;
      TokenOut o{0.0f, 0.0f};
      if (valid && a.mask[row] != 0.0f) {  // old / adv / ref are read on active rows only
        float pr[KERNEL_PARAMS];
#pragma unroll
        for (int k = 0; k < KERNEL_PARAMS; ++k) pr[k] = a.params[k];
        o = token_epilogue(a.mode, pr, lp, a.old[row], a.adv[row], a.ref != nullptr,
                           a.ref != nullptr ? a.ref[row] : 0.0f, a.beta);
      }
      a.loss[row] = o.loss;
      a.coef[row] = o.coef;
    }
  }
}

// ---- backward ----

template <int DT, int TPR, bool ENT>
__global__ void __launch_bounds__(kBlock) bwd_kernel(const BwdArgs a) {
  using S = typename Elem<DT>::S;
  constexpr int RPB = kBlock / TPR;
  const int lane = threadIdx.x % TPR;
  const int V = a.V;
  const float inv_t = 1.0f / a.temperature;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR; row < a.N;
       row += static_cast<int64_t>(gridDim.x) * RPB) {
    const S* p = static_cast<const S*>(a.logits) + row * a.row_stride;
    S* o = static_cast<S*>(a.out) + row * a.out_row_stride;
    const int64_t y = a.target[row];
    if (y == a.ignore_index) {  // exact zeros
      row_zero<DT, TPR>(o, V, lane);
      continue;
    }
    RowGrad r;
    r.lse = a.lse[row];
    r.dl = a.scale != nullptr ? a.dlogp[row] * *a.scale : a.dlogp[row];
    r.H = ENT ? a.entropy[row] : 0.0f;
    r.de = ENT ? a.dent[row] : 0.0f;
    const int64_t yl = y - a.vocab_start;  // -1: the target is in another vocabulary shard
    r.yi = (yl >= 0 && yl < V) ? static_cast<int>(yl) : -1;
    row_grad<DT, TPR, ENT>(p, o, V, lane, r, inv_t);  // in place is safe: each element read, then written
  }
}

// ---- launchers ----

inline unsigned grid_for(int64_t N, int rows_per_block, int num_sms) {
  const int64_t want = (N + rows_per_block - 1) / rows_per_block;
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * 32;  // grid-stride beyond
  return static_cast<unsigned>(want < cap ? want : cap);
}

template <int DT, bool ENT>
void fwd_dt(const FwdArgs& a, cudaStream_t stream, int num_sms) {
  const int64_t bytes = static_cast<int64_t>(a.V) * sizeof(typename Elem<DT>::S);
  if (bytes <= kWarpRowBytes) {
    fwd_kernel<DT, 32, ENT><<<grid_for(a.N, kBlock / 32, num_sms), kBlock, 0, stream>>>(a);
  } else {
    fwd_kernel<DT, kBlock, ENT><<<grid_for(a.N, 1, num_sms), kBlock, 0, stream>>>(a);
  }
}

template <int DT, bool ENT>
void bwd_dt(const BwdArgs& a, cudaStream_t stream, int num_sms) {
  const int64_t bytes = static_cast<int64_t>(a.V) * sizeof(typename Elem<DT>::S);
  if (bytes <= kWarpRowBytes) {
    bwd_kernel<DT, 32, ENT><<<grid_for(a.N, kBlock / 32, num_sms), kBlock, 0, stream>>>(a);
  } else {
    bwd_kernel<DT, kBlock, ENT><<<grid_for(a.N, 1, num_sms), kBlock, 0, stream>>>(a);
  }
}

template <bool ENT>
void fwd_ent(const FwdArgs& a, cudaStream_t s, int sms) {
  if (a.dtype == DTYPE_FLOAT32) return fwd_dt<DTYPE_FLOAT32, ENT>(a, s, sms);
  if (a.dtype == DTYPE_BFLOAT16) return fwd_dt<DTYPE_BFLOAT16, ENT>(a, s, sms);
  return fwd_dt<DTYPE_FLOAT16, ENT>(a, s, sms);
}

template <bool ENT>
void bwd_ent(const BwdArgs& a, cudaStream_t s, int sms) {
  if (a.dtype == DTYPE_FLOAT32) return bwd_dt<DTYPE_FLOAT32, ENT>(a, s, sms);
  if (a.dtype == DTYPE_BFLOAT16) return bwd_dt<DTYPE_BFLOAT16, ENT>(a, s, sms);
  return bwd_dt<DTYPE_FLOAT16, ENT>(a, s, sms);
}

}  // namespace

cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream, int num_sms) {
  if (a.N > 0) {
    if (a.entropy != nullptr) {
      fwd_ent<true>(a, stream, num_sms);
    } else {
      fwd_ent<false>(a, stream, num_sms);
    }
  }
  return cudaGetLastError();
}

cudaError_t launch_bwd(const BwdArgs& a, cudaStream_t stream, int num_sms) {
  if (a.N > 0) {
    if (a.dent != nullptr) {
      bwd_ent<true>(a, stream, num_sms);
    } else {
      bwd_ent<false>(a, stream, num_sms);
    }
  }
  return cudaGetLastError();
}

}  // namespace mhpo::cuda
