// Row-level device code shared by the CUDA kernels (mhpo_cuda.cu: fwd / bwd; mhpo_fused_grad.cu:
// fwd_grad): the element types, the 16-byte segments of a row, the online softmax fold, the
// warp merge, one thread group's pass over a row in global memory for the statistics
// (row_state) and for the gradient (row_grad). Included by .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mhpo_epilogue.h"

namespace mhpo::cuda {

constexpr int kUnroll = 4;  // 16-byte loads in flight per thread

// ---- element types: storage S, 16-byte packs of VEC elements ----
template <int DT>
struct Elem;

template <>
struct Elem<DTYPE_FLOAT32> {
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
struct Elem<DTYPE_BFLOAT16> {  // (bits)
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
struct Elem<DTYPE_FLOAT16> {  // (bits)
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

// One thread's part of the statistics of a row in global memory, read by TPR threads (lane in
// [0, TPR)): 128-bit loads on the 16-byte aligned body, scalar head and tail. Merge afterwards.
template <int DT, int TPR, bool ENT>
__device__ __forceinline__ SoftmaxState row_state(const typename Elem<DT>::S* p, int V, int lane, float inv_t) {
  using E = Elem<DT>;
  using S = typename E::S;
  constexpr int VEC = E::VEC;
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
  return st;
}

// What the gradient of a row needs: lse, dl = d loss / d logp, H = entropy, de = d loss / d H
// and yi, the target's column in this buffer (-1: none here).
struct RowGrad {
  float lse, dl, H, de;
  int yi;
};

// (dl (1[v == y] - p) - de p (log p + H)) / T of one logit z at column v.
template <bool ENT>
__device__ __forceinline__ float grad_elem(float z, int v, const RowGrad& r, float inv_t) {
  const float lp = scale_rn(z, inv_t) - r.lse;  // never fused: z * inv_t rounded as in lse
  const float pv = __expf(lp);
  float gr = (v == r.yi ? r.dl : 0.0f) - r.dl * pv;
  if (ENT) gr -= r.de * (pv > 0.0f ? pv * (lp + r.H) : 0.0f);
  return gr * inv_t;
}

// Exact zeros over a row of V elements (an ignore_index row), TPR threads.
template <int DT, int TPR>
__device__ __forceinline__ void row_zero(typename Elem<DT>::S* o, int V, int lane) {
  using S = typename Elem<DT>::S;
  const Segments g = segments<S, Elem<DT>::VEC>(o, V, true);
  uint4* ov = reinterpret_cast<uint4*>(o + g.head);
  for (int i = lane; i < g.head; i += TPR) o[i] = S(0);
  for (int j = lane; j < g.nvec; j += TPR) ov[j] = make_uint4(0u, 0u, 0u, 0u);
  for (int i = g.tail + lane; i < V; i += TPR) o[i] = S(0);
}

// The gradient of one row read from p, written to o (may be p: each element is read before it
// is written, by the same thread), TPR threads.
template <int DT, int TPR, bool ENT>
__device__ __forceinline__ void row_grad(const typename Elem<DT>::S* p, typename Elem<DT>::S* o, int V, int lane,
                                         const RowGrad& r, float inv_t) {
  using E = Elem<DT>;
  using S = typename E::S;
  constexpr int VEC = E::VEC;
  // the 16-byte body is shared only when input and output have the same alignment
  const bool same = (reinterpret_cast<uintptr_t>(p) & 15) == (reinterpret_cast<uintptr_t>(o) & 15);
  const Segments g = segments<S, VEC>(o, V, same);
  uint4* ov = reinterpret_cast<uint4*>(o + g.head);
  for (int i = lane; i < g.head; i += TPR) o[i] = E::from_f(grad_elem<ENT>(E::to_f(p[i]), i, r, inv_t));
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
      for (int k = 0; k < VEC; ++k) f[k] = grad_elem<ENT>(f[k], base + k, r, inv_t);
      ov[j + u * TPR] = E::pack(f);
    }
  }
  for (; j < g.nvec; j += TPR) {
    float f[VEC];
    E::unpack(pv[j], f);
    const int base = g.head + j * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) f[k] = grad_elem<ENT>(f[k], base + k, r, inv_t);
    ov[j] = E::pack(f);
  }
  for (int i = g.tail + lane; i < V; i += TPR) o[i] = E::from_f(grad_elem<ENT>(E::to_f(p[i]), i, r, inv_t));
}

}  // namespace mhpo::cuda
