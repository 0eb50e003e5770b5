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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mhpo_cuda.h"
#include "mhpo_epilogue.h"

namespace mhpo::cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kUnroll = 4;              // 16-byte loads in flight per thread
constexpr int64_t kWarpRowBytes = 8192;  // rows up to this size get a warp, larger ones a block

// ---- element types: storage S, 16-byte packs of VEC elements ----
template <int DT>
struct Elem;

template <>
struct Elem<0> {  // fp32
  using S = float;
  static constexpr int VEC = 4;
  __device__ static float to_f(S x) { return x; }
  __device__ static S from_f(float x) { return x; }
  __device__ static void unpack(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x), f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z), f[3] = __uint_as_float(v.w);
  }
  __device__ static uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

template <>
struct Elem<1> {  // bf16 (bits)
  using S = uint16_t;
  static constexpr int VEC = 8;
  __device__ static float to_f(S x) { return __uint_as_float(static_cast<uint32_t>(x) << 16); }
  __device__ static S from_f(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
  __device__ static void unpack2(uint32_t w, float* f) {
    f[0] = __uint_as_float(w << 16), f[1] = __uint_as_float(w & 0xFFFF0000u);
  }
  __device__ static uint32_t pack2(float a, float b) {
    return static_cast<uint32_t>(from_f(a)) | (static_cast<uint32_t>(from_f(b)) << 16);
  }
  __device__ static void unpack(const uint4& v, float* f) {
    unpack2(v.x, f), unpack2(v.y, f + 2), unpack2(v.z, f + 4), unpack2(v.w, f + 6);
  }
  __device__ static uint4 pack(const float* f) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
};

template <>
struct Elem<2> {  // fp16 (bits)
  using S = uint16_t;
  static constexpr int VEC = 8;
  __device__ static float to_f(S x) { return __half2float(__ushort_as_half(x)); }
  __device__ static S from_f(float x) { return __half_as_ushort(__float2half_rn(x)); }
  __device__ static void unpack2(uint32_t w, float* f) {
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w));
    f[0] = v.x, f[1] = v.y;
  }
  __device__ static uint32_t pack2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static void unpack(const uint4& v, float* f) {
    unpack2(v.x, f), unpack2(v.y, f + 2), unpack2(v.z, f + 4), unpack2(v.w, f + 6);
  }
  __device__ static uint4 pack(const float* f) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
};

// A row split into [0, head) scalar, nvec 16-byte packs, [tail, V) scalar.
struct Segments {
  int head, nvec, tail;
};

template <typename S, int VEC>
__device__ __forceinline__ Segments segments(const void* p, int V, bool vector_ok) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int head = V;
  if (vector_ok && a % sizeof(S) == 0) head = min(V, static_cast<int>(((16 - (a & 15)) & 15) / sizeof(S)));
  const int nvec = (V - head) / VEC;
  return {head, nvec, head + nvec * VEC};
}

// ---- forward ----

// Fold K logits into a thread's online state: one max, (rarely) one rescale, K exps.
template <bool ENT, int K>
__device__ __forceinline__ void fold(SoftmaxState& st, const float* z, float inv_t) {
  float gm = z[0];
  bool nan = z[0] != z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) gm = fmaxf(gm, z[k]), nan |= z[k] != z[k];
  if (nan) {  // fmaxf drops NaN: poison the state instead (merges and rescales keep s = NaN)
    st.s = NAN;
    return;
  }
  if (gm > st.m) softmax_state_rescale(st, gm, inv_t);
  if (st.m == -INFINITY) return;  // only -inf so far
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = (z[k] - st.m) * inv_t;  // <= 0
    const float e = __expf(d);
    st.s += e;
    if (ENT) st.t += e > 0.0f ? e * d : 0.0f;  // 0 * -inf counts as 0
  }
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState st, float inv_t) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    SoftmaxState o;
    o.m = __shfl_xor_sync(0xFFFFFFFFu, st.m, off);
    o.s = __shfl_xor_sync(0xFFFFFFFFu, st.s, off);
    o.t = __shfl_xor_sync(0xFFFFFFFFu, st.t, off);
    st = softmax_state_merge(st, o, inv_t);
  }
  return st;
}

template <int DT, int TPR, bool ENT>
__global__ void __launch_bounds__(kBlock) fwd_kernel(const FwdArgs a) {
  using E = Elem<DT>;
  using S = typename E::S;
  constexpr int VEC = E::VEC, RPB = kBlock / TPR, NW = TPR / 32;
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

    SoftmaxState st = softmax_state_empty();
    const Segments g = segments<S, VEC>(p, V, true);
    for (int i = lane; i < g.head; i += TPR) {
      const float z = E::to_f(p[i]);
      fold<ENT, 1>(st, &z, inv_t);
    }
    const uint4* pv = reinterpret_cast<const uint4*>(p + g.head);
    int j = lane;
    for (; j + (kUnroll - 1) * TPR < g.nvec; j += kUnroll * TPR) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(pv + j + u * TPR);
      float f[kUnroll * VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) E::unpack(v[u], f + u * VEC);
      fold<ENT, kUnroll * VEC>(st, f, inv_t);
    }
    for (; j < g.nvec; j += TPR) {
      float f[VEC];
      E::unpack(__ldg(pv + j), f);
      fold<ENT, VEC>(st, f, inv_t);
    }
    for (int i = g.tail + lane; i < V; i += TPR) {
      const float z = E::to_f(p[i]);
      fold<ENT, 1>(st, &z, inv_t);
    }

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
        float pr[kNumParams];
#pragma unroll
        for (int k = 0; k < kNumParams; ++k) pr[k] = a.params[k];
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
  using E = Elem<DT>;
  using S = typename E::S;
  constexpr int VEC = E::VEC, RPB = kBlock / TPR;
  const int lane = threadIdx.x % TPR;
  const int V = a.V;
  const float inv_t = 1.0f / a.temperature;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR; row < a.N;
       row += static_cast<int64_t>(gridDim.x) * RPB) {
    const S* p = static_cast<const S*>(a.logits) + row * a.row_stride;
    S* o = static_cast<S*>(a.out) + row * a.out_row_stride;
    const int64_t y = a.target[row];
    // the 16-byte body is shared only when input and output have the same alignment
    const bool same = (reinterpret_cast<uintptr_t>(p) & 15) == (reinterpret_cast<uintptr_t>(o) & 15);
    const Segments g = segments<S, VEC>(o, V, same);
    uint4* ov = reinterpret_cast<uint4*>(o + g.head);

    if (y == a.ignore_index) {  // exact zeros
      for (int i = lane; i < g.head; i += TPR) o[i] = S(0);
      for (int j = lane; j < g.nvec; j += TPR) ov[j] = make_uint4(0u, 0u, 0u, 0u);
      for (int i = g.tail + lane; i < V; i += TPR) o[i] = S(0);
      continue;
    }
    const float lse = a.lse[row], dl = a.scale != nullptr ? a.dlogp[row] * *a.scale : a.dlogp[row];
    const float H = ENT ? a.entropy[row] : 0.0f, de = ENT ? a.dent[row] : 0.0f;
    const int64_t yl = y - a.vocab_start;  // -1: the target is in another vocabulary shard
    const int yi = (yl >= 0 && yl < V) ? static_cast<int>(yl) : -1;
    auto grad = [&](float z, int v) {
      const float lp = __fmul_rn(z, inv_t) - lse;  // never fused: z * inv_t rounded as in lse
      const float pv = __expf(lp);
      float gr = (v == yi ? dl : 0.0f) - dl * pv;
      if (ENT) gr -= de * (pv > 0.0f ? pv * (lp + H) : 0.0f);
      return gr * inv_t;
    };

    for (int i = lane; i < g.head; i += TPR) o[i] = E::from_f(grad(E::to_f(p[i]), i));
    // each element is read before it is written, by the same thread: in-place is safe
    const uint4* pv = reinterpret_cast<const uint4*>(p + g.head);
    int j = lane;
    for (; j + (kUnroll - 1) * TPR < g.nvec; j += kUnroll * TPR) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = pv[j + u * TPR];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float f[VEC];
        E::unpack(v[u], f);
        const int base = g.head + (j + u * TPR) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) f[k] = grad(f[k], base + k);
        ov[j + u * TPR] = E::pack(f);
      }
    }
    for (; j < g.nvec; j += TPR) {
      float f[VEC];
      E::unpack(pv[j], f);
      const int base = g.head + j * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) f[k] = grad(f[k], base + k);
      ov[j] = E::pack(f);
    }
    for (int i = g.tail + lane; i < V; i += TPR) o[i] = E::from_f(grad(E::to_f(p[i]), i));
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
  if (a.dtype == 0) return fwd_dt<0, ENT>(a, s, sms);
  if (a.dtype == 1) return fwd_dt<1, ENT>(a, s, sms);
  return fwd_dt<2, ENT>(a, s, sms);
}

template <bool ENT>
void bwd_ent(const BwdArgs& a, cudaStream_t s, int sms) {
  if (a.dtype == 0) return bwd_dt<0, ENT>(a, s, sms);
  if (a.dtype == 1) return bwd_dt<1, ENT>(a, s, sms);
  return bwd_dt<2, ENT>(a, s, sms);
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
