// How the CUDA fwd_grad (the forward that writes the gradient) covers one row of V
// logits: which kernel, how many CTAs of a thread-block cluster, which columns each CTA holds in
// shared memory and how many bytes that takes. Host + device (MHPO_HD): the CUDA launcher and
// kernel (mhpo_fused_grad.cu) use it, and the CPU extension exposes it as the op
// mhpo_kernels_C::fused_grad_plan, so the partition is unit-tested without a GPU
// (tests/test_fused_grad_plan.py).
//
// Kinds:
//   FG_CLUSTER (sm_90): a row is split over `cluster` CTAs (1..8, the portable cluster size); CTA r
//     copies columns [fg_slice_begin(r), fg_slice_end(r)) into its shared memory once, the CTAs
//     exchange (max, sum-exp, entropy part, target logit) through distributed shared memory, and
//     each writes the gradient of its slice from shared memory: 1 read + 1 write of the logits.
//     The cluster is the smallest power of two whose slice is at most FG_SLICE_TARGET_BYTES:
//     small slices let several CTAs share an SM (an SM's 228 KB holds five 38 KB slices), so one
//     CTA's loads overlap another's reductions, cluster barrier and stores. V = 151936 bf16
//     (297 KB a row) -> 8 CTAs of 18992 columns (38 KB); fp32 -> 8 CTAs of 74 KB. Rows that
//     need more than 8 CTAs' worth (cluster 8 with a slice above the device's per-block
//     shared memory) take the two-read kernel.
//   FG_TWO_READ_WARP / FG_TWO_READ_BLOCK (sm_80, rows too long for a cluster, rows of at most
//     FG_WARP_ROW_BYTES): a warp (small rows) or a block per row reads the row once for the
//     statistics and once more, right after, to write the gradient (L1 / L2 hits when they fit).
#pragma once

#include <cstdint>

#include "mhpo_constants.h"

namespace mhpo {

enum FusedGradKind : int {
  FG_TWO_READ_WARP = 0,
  FG_TWO_READ_BLOCK = 1,
  FG_CLUSTER = 2,
};

constexpr int FG_THREADS = 256;                    // threads per CTA, every kernel
constexpr int FG_MAX_CLUSTER = 8;                  // the portable cluster size limit
constexpr int64_t FG_WARP_ROW_BYTES = 8192;        // rows up to this take a warp (as the fwd / bwd kernels)
constexpr int64_t FG_SLICE_TARGET_BYTES = 48 * 1024;
constexpr int64_t FG_SM90_SMEM_OPTIN = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100
// the cluster kernel's static shared memory (statistics, warp partials, the row's scalars: under
// 200 bytes; cuobjdump shows 1 KB more on sm_90) is below this; the dynamic slice buffer gets
// the device's per-block limit less this much
constexpr int64_t FG_STATIC_SMEM_RESERVE = 2048;
constexpr int64_t FG_SLICE_PAD_BYTES = 16;  // the slice is stored at its global address's offset mod 16

struct FusedGradPlan {
  int32_t kind;     // FusedGradKind
  int32_t cluster;  // CTAs per row (FG_CLUSTER), else 1
  int32_t chunk;    // columns per CTA: CTA r holds [r * chunk, min(V, (r + 1) * chunk)); V for the two-read kinds
  int32_t smem_bytes;  // dynamic shared memory per CTA (FG_CLUSTER), else 0
};

MHPO_HD int fg_elem_bytes(int dtype) { return dtype == DTYPE_FLOAT32 ? 4 : 2; }

// Columns per 16-byte vector: slices start on multiples of it, so every slice of a row has the
// same alignment as the row itself (16-byte copies on both sides when the row is aligned).
MHPO_HD int fg_granule(int dtype) { return 16 / fg_elem_bytes(dtype); }

// max_smem: the device's shared memory per block (opt-in); clusters: the device runs
// thread-block clusters (compute capability >= 9). V >= 1 and V <= INT32_MAX (checked by the op).
MHPO_HD FusedGradPlan fused_grad_plan(int64_t V, int dtype, int64_t max_smem, bool clusters) {
  const int64_t eb = fg_elem_bytes(dtype), g = fg_granule(dtype);
  const FusedGradPlan two_read{V * eb <= FG_WARP_ROW_BYTES ? FG_TWO_READ_WARP : FG_TWO_READ_BLOCK, 1,
                               static_cast<int32_t>(V), 0};
  if (!clusters || two_read.kind == FG_TWO_READ_WARP) return two_read;
  for (int c = 1; c <= FG_MAX_CLUSTER; c *= 2) {
    const int64_t chunk = ((V + c - 1) / c + g - 1) / g * g;
    if (chunk * eb > FG_SLICE_TARGET_BYTES && c < FG_MAX_CLUSTER) continue;
    const int64_t smem = chunk * eb + FG_SLICE_PAD_BYTES;
    if (smem + FG_STATIC_SMEM_RESERVE > max_smem) return two_read;  // more than 8 CTAs' worth
    return {FG_CLUSTER, c, static_cast<int32_t>(chunk), static_cast<int32_t>(smem)};
  }
  return two_read;
}

// The columns [begin, end) of CTA `rank` (empty when rank * chunk >= V).
MHPO_HD int32_t fg_slice_begin(const FusedGradPlan& p, int64_t V, int rank) {
  const int64_t b = static_cast<int64_t>(rank) * p.chunk;
  return static_cast<int32_t>(b < V ? b : V);
}

MHPO_HD int32_t fg_slice_end(const FusedGradPlan& p, int64_t V, int rank) {
  const int64_t e = static_cast<int64_t>(rank + 1) * p.chunk;
  return static_cast<int32_t>(e < V ? e : V);
}

// The CTA holding column y (0 <= y < V).
MHPO_HD int fg_owner(const FusedGradPlan& p, int64_t y) { return static_cast<int>(y / p.chunk); }

}  // namespace mhpo
