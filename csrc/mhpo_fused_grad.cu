// CUDA kernels of the forward that writes the gradient (contract: the fwd_grad and
// scale_grad launchers in mhpo_kernels/backends/__init__.py; CPU twin: fwd_grad_cpu in mhpo_cpu.cpp).
//
// Per row: the statistics (max, sum-exp, entropy part) and the target logit, the per-token
// epilogue (mhpo_epilogue.h) with the aggregation weight w in place of the mask, then the
// gradient (w coef (1[v == y] - p) + ent_coef w p (log p + H)) / T written into `grad`.
// Which kernel runs: mhpo_fused_grad_plan.h.
//
// fg_cluster_kernel (sm_90, FG_CLUSTER): a row is split over the CTAs of a thread-block cluster.
//   Each CTA copies its slice into shared memory once (16-byte cp.async), folds it into its
//   statistics, and publishes them (and the target logit, when it holds it) in its shared memory;
//   after a cluster barrier every CTA merges all of them, in rank order, through distributed
//   shared memory (so every CTA gets the same lse bits), runs the epilogue and writes the gradient
//   of its slice from shared memory: 1 read + 1 write of the logits. The published statistics are
//   double-buffered by row parity: a CTA's next row cannot overwrite a buffer a peer still reads
//   (it would first have to pass the next row's barrier, which the peer reaches only after reading).
// fg_rows_kernel (sm_80, rows too long for a cluster, small rows): the two-read form. A warp or a
//   block per row: the statistics pass, then right after it the gradient pass re-reading the same
//   row (mhpo_cuda_rows.cuh: row_state and row_grad, the fwd / bwd kernels' own loops).
// scale_kernel: grad *= scale unless scale == 1 (read on the device: no host sync).
// Rows: grid-stride loops with int64 row offsets; any row stride; grad may be the logits.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "mhpo_cuda_rows.cuh"
#include "mhpo_epilogue.h"
#include "mhpo_fused_grad.h"
#include "mhpo_fused_grad_plan.h"

namespace mhpo::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = FG_THREADS;

// One CTA's statistics of its slice, and the target logit when the slice holds it.
struct SlicePart {
  float m, s, t, zy;
};

// The row's outputs (logp, lse, entropy, loss, coef; when `write`) from its merged statistics and
// the target logit; returns what the gradient needs. Same formulas as fwd_kernel (mhpo_cuda.cu):
// log p = (z_y - m) / T - log s, exactly 0 for a one-element row.
__device__ __forceinline__ RowGrad finish_row(const FwdGradArgs& a, int64_t row, SoftmaxState st, float zy,
                                              float inv_t, bool write) {
  const int64_t y = a.target[row];
  const bool valid = y != a.ignore_index, owned = valid && y >= 0 && y < a.V;
  float lse, h;
  softmax_state_finalize(st, inv_t, &lse, &h);
  const float lp = owned ? (zy - st.m) * inv_t - logf(st.s) : 0.0f;
  const float w = a.weight[row];
  TokenOut o{0.0f, 0.0f};
  if (valid && w != 0.0f) {  // old / adv / ref are read on active rows only
    float pr[KERNEL_PARAMS];
#pragma unroll
    for (int k = 0; k < KERNEL_PARAMS; ++k) pr[k] = a.params[k];
    o = token_epilogue(a.mode, pr, lp, a.old[row], a.adv[row], a.ref != nullptr, a.ref != nullptr ? a.ref[row] : 0.0f,
                       a.beta);
  }
  if (write) {
    a.lse[row] = lse;
    a.logp[row] = lp;
    if (a.entropy != nullptr) a.entropy[row] = valid ? h : 0.0f;
    a.loss[row] = o.loss;
    a.coef[row] = o.coef;
  }
  // d loss / d logp = w coef (finish's dlogp), d loss / d H = -ent_coef w
  RowGrad r;
  r.lse = lse;
  r.dl = w * o.coef;
  r.H = valid ? h : 0.0f;
  r.de = -a.ent_coef * w;
  r.yi = owned ? static_cast<int>(y) : -1;
  return r;
}

// ---- two reads: a warp (TPR = 32) or a block (TPR = kThreads) per row ----

// (at least 3 blocks an SM: without that bound ptxas spills a few bytes on sm_80, at 48-64 registers)
template <int DT, int TPR, bool ENT>
__global__ void __launch_bounds__(kThreads, 3) fg_rows_kernel(const FwdGradArgs a) {
  using E = Elem<DT>;
  using S = typename E::S;
  constexpr int RPB = kThreads / TPR, NW = TPR / 32;
  __shared__ SoftmaxState partial[NW];
  __shared__ RowGrad rows[RPB];
  const int lane = threadIdx.x % TPR, slot = threadIdx.x / TPR;
  const int V = a.V;
  const float inv_t = 1.0f / a.temperature;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + slot; row < a.N;
       row += static_cast<int64_t>(gridDim.x) * RPB) {
    const S* p = static_cast<const S*>(a.logits) + row * a.row_stride;
    S* o = static_cast<S*>(a.grad) + row * a.grad_row_stride;
    float zy = 0.0f;
    if (lane == 0) {
      const int64_t y = a.target[row];
      if (y != a.ignore_index && y >= 0 && y < V) zy = E::to_f(p[y]);  // never read out of bounds
    }

    SoftmaxState st = warp_merge(row_state<DT, TPR, ENT>(p, V, lane, inv_t), inv_t);
    if constexpr (NW > 1) {
      const int w = lane / 32;
      if ((lane & 31) == 0) partial[w] = st;
      __syncthreads();
      if (w == 0) st = warp_merge(lane < NW ? partial[lane] : softmax_state_empty(), inv_t);
    }
    if (lane == 0) rows[slot] = finish_row(a, row, st, zy, inv_t, true);
    // every read of the first pass is done (in place: the second pass overwrites the row)
    if constexpr (NW > 1) __syncthreads(); else __syncwarp();
    const RowGrad r = rows[slot];
    if constexpr (NW > 1) __syncthreads(); else __syncwarp();  // rows[] / partial[] are reused by the next row
    if (a.target[row] == a.ignore_index) {
      row_zero<DT, TPR>(o, V, lane);
    } else {
      row_grad<DT, TPR, ENT>(p, o, V, lane, r, inv_t);  // the second read of the row, right after the first
    }
  }
}

// ---- one read: a row split over the CTAs of a cluster (sm_90) ----

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // used by the cluster kernel only
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}
#endif

// This thread's part of the statistics of buf[0, len) in shared memory; the 16-byte words of
// buf start at buf + head.
template <int DT, bool ENT>
__device__ __forceinline__ SoftmaxState slice_state(const typename Elem<DT>::S* buf, int len, int head, int nvec,
                                                    float inv_t) {
  using E = Elem<DT>;
  constexpr int VEC = E::VEC;
  const int tid = threadIdx.x, tail = head + nvec * VEC;
  SoftmaxState st = softmax_state_empty();
  for (int i = tid; i < head; i += kThreads) {
    const float z = E::to_f(buf[i]);
    fold<ENT, 1>(st, &z, inv_t);
  }
  const uint4* sv = reinterpret_cast<const uint4*>(buf + head);
  int j = tid;
  for (; j + (kUnroll - 1) * kThreads < nvec; j += kUnroll * kThreads) {
    float f[kUnroll * VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) E::unpack(sv[j + u * kThreads], f + u * VEC);
    fold<ENT, kUnroll * VEC>(st, f, inv_t);
  }
  for (; j < nvec; j += kThreads) {
    float f[VEC];
    E::unpack(sv[j], f);
    fold<ENT, VEC>(st, f, inv_t);
  }
  for (int i = tail + tid; i < len; i += kThreads) {
    const float z = E::to_f(buf[i]);
    fold<ENT, 1>(st, &z, inv_t);
  }
  return st;
}

// chunk: columns per CTA (FusedGradPlan::chunk); the cluster size is the launch's.
template <int DT, bool ENT>
__global__ void __launch_bounds__(kThreads) fg_cluster_kernel(const FwdGradArgs a, const int chunk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using E = Elem<DT>;
  using S = typename E::S;
  constexpr int VEC = E::VEC;
  extern __shared__ uint4 fg_slice[];  // chunk * sizeof(S) + FG_SLICE_PAD_BYTES
  __shared__ SoftmaxState partial[kThreads / 32];
  __shared__ SlicePart part[2];  // this CTA's, by row parity; read by every CTA of the cluster
  __shared__ RowGrad rowg;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), ncta = static_cast<int>(cluster.num_blocks());
  const int tid = threadIdx.x;
  const int V = a.V;
  const float inv_t = 1.0f / a.temperature;
  const int begin = min(V, rank * chunk), len = min(V - begin, chunk);  // [begin, begin + len)
  const int64_t n_clusters = gridDim.x / ncta;

  int parity = 0;
  for (int64_t row = blockIdx.x / ncta; row < a.N; row += n_clusters, parity ^= 1) {
    const S* src = static_cast<const S*>(a.logits) + row * a.row_stride + begin;
    S* dst = static_cast<S*>(a.grad) + row * a.grad_row_stride + begin;
    // buf[i] = src[i], stored at src's offset mod 16: 16-byte copies on both sides
    const int shift = static_cast<int>((reinterpret_cast<uintptr_t>(src) & 15) / sizeof(S));
    S* buf = reinterpret_cast<S*>(fg_slice) + shift;
    const int head = min(len, (VEC - shift) % VEC), nvec = (len - head) / VEC, tail = head + nvec * VEC;

    __syncthreads();  // the previous row's gradient is written: buf is free
    for (int j = tid; j < nvec; j += kThreads) cp_async16(buf + head + j * VEC, src + head + j * VEC);
    for (int i = tid; i < head; i += kThreads) buf[i] = src[i];
    for (int i = tail + tid; i < len; i += kThreads) buf[i] = src[i];
    cp_async_wait_all();
    __syncthreads();

    SoftmaxState st = warp_merge(slice_state<DT, ENT>(buf, len, head, nvec, inv_t), inv_t);
    if ((tid & 31) == 0) partial[tid / 32] = st;
    __syncthreads();
    const int64_t y = a.target[row];
    if (tid < 32) {
      st = warp_merge(tid < kThreads / 32 ? partial[tid] : softmax_state_empty(), inv_t);
      if (tid == 0) {
        const float zy = (y >= begin && y < begin + len) ? E::to_f(buf[y - begin]) : 0.0f;
        part[parity] = SlicePart{st.m, st.s, st.t, zy};
      }
    }
    cluster.sync();  // every CTA's part[parity] is written (release / acquire across the cluster)

    if (tid == 0) {
      const int owner = (y >= 0 && y < V) ? static_cast<int>(y / chunk) : -1;
      SoftmaxState tot = softmax_state_empty();
      float zy = 0.0f;
      for (int r = 0; r < ncta; ++r) {  // rank order: the same bits in every CTA
        const SlicePart q = *cluster.map_shared_rank(&part[parity], r);
        tot = softmax_state_merge(tot, SoftmaxState{q.m, q.s, q.t}, inv_t);
        if (r == owner) zy = q.zy;
      }
      rowg = finish_row(a, row, tot, zy, inv_t, rank == 0);
    }
    __syncthreads();
    const RowGrad r = rowg;

    // the gradient of the slice, from shared memory
    if (y == a.ignore_index) {
      row_zero<DT, kThreads>(dst, len, tid);
    } else if ((reinterpret_cast<uintptr_t>(dst) & 15) == (reinterpret_cast<uintptr_t>(src) & 15)) {
      for (int i = tid; i < head; i += kThreads) dst[i] = E::from_f(grad_elem<ENT>(E::to_f(buf[i]), begin + i, r, inv_t));
      const uint4* sv = reinterpret_cast<const uint4*>(buf + head);
      uint4* ov = reinterpret_cast<uint4*>(dst + head);
#pragma unroll 2
      for (int j = tid; j < nvec; j += kThreads) {
        float f[VEC];
        E::unpack(sv[j], f);
        const int base = begin + head + j * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) f[k] = grad_elem<ENT>(f[k], base + k, r, inv_t);
        ov[j] = E::pack(f);
      }
      for (int i = tail + tid; i < len; i += kThreads) {
        dst[i] = E::from_f(grad_elem<ENT>(E::to_f(buf[i]), begin + i, r, inv_t));
      }
    } else {  // grad aligned unlike the logits: element by element
      for (int i = tid; i < len; i += kThreads) dst[i] = E::from_f(grad_elem<ENT>(E::to_f(buf[i]), begin + i, r, inv_t));
    }
  }
  cluster.sync();  // no CTA exits while a peer may still read its part[]
#endif
}

// ---- scale_grad ----

template <int DT, int TPR>
__global__ void __launch_bounds__(kThreads) scale_kernel(const ScaleGradArgs a) {
  using E = Elem<DT>;
  using S = typename E::S;
  constexpr int VEC = E::VEC, RPB = kThreads / TPR;
  const float sc = *a.scale;
  if (sc == 1.0f) return;
  const int lane = threadIdx.x % TPR, V = a.V;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR; row < a.N;
       row += static_cast<int64_t>(gridDim.x) * RPB) {
    S* o = static_cast<S*>(a.grad) + row * a.row_stride;
    const Segments g = segments<S, VEC>(o, V, true);
    for (int i = lane; i < g.head; i += TPR) o[i] = E::from_f(E::to_f(o[i]) * sc);
    uint4* ov = reinterpret_cast<uint4*>(o + g.head);
    for (int j = lane; j < g.nvec; j += TPR) {
      float f[VEC];
      E::unpack(ov[j], f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) f[k] *= sc;
      ov[j] = E::pack(f);
    }
    for (int i = g.tail + lane; i < V; i += TPR) o[i] = E::from_f(E::to_f(o[i]) * sc);
  }
}

// ---- launchers ----

inline unsigned grid_for(int64_t N, int rows_per_block, int num_sms) {
  const int64_t want = (N + rows_per_block - 1) / rows_per_block;
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * 32;  // grid-stride beyond
  return static_cast<unsigned>(want < cap ? want : cap);
}

// The cluster launch; cudaErrorNotSupported (nothing launched, no error left pending) when the
// device cannot co-schedule one such cluster: the caller takes the two-read kernel.
template <int DT, bool ENT>
cudaError_t launch_cluster(const FwdGradArgs& a, const FusedGradPlan& plan, cudaStream_t stream,
                           const DeviceInfo& dev) {
  void (*kernel)(const FwdGradArgs, const int) = fg_cluster_kernel<DT, ENT>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes) != cudaSuccess) {
    cudaGetLastError();
    return cudaErrorNotSupported;
  }
  const int64_t cap = static_cast<int64_t>(dev.num_sms > 0 ? dev.num_sms : 132) * 64;  // grid-stride beyond
  const int64_t clusters = a.N < cap ? a.N : cap;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * plan.cluster), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(plan.smem_bytes);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // whether one such cluster fits the device, asked once per (device, cluster, shared memory)
  static std::mutex mu;
  static std::map<std::tuple<int, int, int>, bool> fits;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return cudaGetLastError();
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto key = std::make_tuple(device, plan.cluster, plan.smem_bytes);
    auto it = fits.find(key);
    if (it == fits.end()) {
      int active = 0;
      const bool ok = cudaOccupancyMaxActiveClusters(&active, kernel, &cfg) == cudaSuccess && active >= 1;
      if (!ok) cudaGetLastError();
      it = fits.emplace(key, ok).first;
    }
    if (!it->second) return cudaErrorNotSupported;
  }
  return cudaLaunchKernelEx(&cfg, kernel, a, static_cast<int>(plan.chunk));
}

template <int DT, bool ENT>
cudaError_t fwd_grad_dt(const FwdGradArgs& a, cudaStream_t stream, const DeviceInfo& dev) {
  const FusedGradPlan plan = fused_grad_plan(a.V, DT, dev.max_smem_optin, dev.cc_major >= 9);
  if (plan.kind == FG_CLUSTER) {
    const cudaError_t e = launch_cluster<DT, ENT>(a, plan, stream, dev);
    if (e != cudaErrorNotSupported) return e;
  }
  if (plan.kind == FG_TWO_READ_WARP) {
    fg_rows_kernel<DT, 32, ENT><<<grid_for(a.N, kThreads / 32, dev.num_sms), kThreads, 0, stream>>>(a);
  } else {
    fg_rows_kernel<DT, kThreads, ENT><<<grid_for(a.N, 1, dev.num_sms), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <bool ENT>
cudaError_t fwd_grad_ent(const FwdGradArgs& a, cudaStream_t s, const DeviceInfo& d) {
  if (a.dtype == DTYPE_FLOAT32) return fwd_grad_dt<DTYPE_FLOAT32, ENT>(a, s, d);
  if (a.dtype == DTYPE_BFLOAT16) return fwd_grad_dt<DTYPE_BFLOAT16, ENT>(a, s, d);
  return fwd_grad_dt<DTYPE_FLOAT16, ENT>(a, s, d);
}

template <int DT>
void scale_dt(const ScaleGradArgs& a, cudaStream_t stream, int num_sms) {
  if (static_cast<int64_t>(a.V) * sizeof(typename Elem<DT>::S) <= FG_WARP_ROW_BYTES) {
    scale_kernel<DT, 32><<<grid_for(a.N, kThreads / 32, num_sms), kThreads, 0, stream>>>(a);
  } else {
    scale_kernel<DT, kThreads><<<grid_for(a.N, 1, num_sms), kThreads, 0, stream>>>(a);
  }
}

}  // namespace

cudaError_t launch_fwd_grad(const FwdGradArgs& a, cudaStream_t stream, const DeviceInfo& dev) {
  if (a.N == 0) return cudaGetLastError();
  // the entropy statistics when the entropy is returned or its bonus enters the gradient
  if (a.entropy != nullptr || a.ent_coef != 0.0f) return fwd_grad_ent<true>(a, stream, dev);
  return fwd_grad_ent<false>(a, stream, dev);
}

cudaError_t launch_scale_grad(const ScaleGradArgs& a, cudaStream_t stream, const DeviceInfo& dev) {
  if (a.N > 0) {
    if (a.dtype == DTYPE_FLOAT32) {
      scale_dt<DTYPE_FLOAT32>(a, stream, dev.num_sms);
    } else if (a.dtype == DTYPE_BFLOAT16) {
      scale_dt<DTYPE_BFLOAT16>(a, stream, dev.num_sms);
    } else {
      scale_dt<DTYPE_FLOAT16>(a, stream, dev.num_sms);
    }
  }
  return cudaGetLastError();
}

}  // namespace mhpo::cuda
