// mhpo_kernels_C::fused_grad_plan: the CUDA fwd_grad's partition of a row (mhpo_fused_grad_plan.h,
// the very functions the CUDA launcher and kernel use), computed on the host so CPU tests check it.
// Part of mhpo_kernels._C_cpu (no GPU needed).
#include <torch/library.h>

#include <vector>

#include "mhpo_fused_grad_plan.h"

namespace mhpo {
namespace {

// [kind, cluster, chunk, smem_bytes, begin_0, end_0, ..., begin_{cluster-1}, end_{cluster-1}]
// for a row of V logits of `dtype`; max_shared: the device's shared memory per block (0: an H100's).
std::vector<int64_t> fused_grad_plan_op(int64_t V, at::ScalarType dtype, int64_t max_shared, bool clusters) {
  TORCH_CHECK(V >= 1 && V <= INT32_MAX, "mhpo_kernels_C.fused_grad_plan: V must be in [1, 2^31), got ", V);
  TORCH_CHECK(max_shared >= 0, "mhpo_kernels_C.fused_grad_plan: max_shared must be >= 0, got ", max_shared);
  int dt = -1;
  switch (dtype) {
    case at::kFloat: dt = DTYPE_FLOAT32; break;
    case at::kBFloat16: dt = DTYPE_BFLOAT16; break;
    case at::kHalf: dt = DTYPE_FLOAT16; break;
    default: TORCH_CHECK(false, "mhpo_kernels_C.fused_grad_plan: float32, bfloat16 or float16, got ", dtype);
  }
  const FusedGradPlan p = fused_grad_plan(V, dt, max_shared > 0 ? max_shared : FG_SM90_SMEM_OPTIN, clusters);
  std::vector<int64_t> out{p.kind, p.cluster, p.chunk, p.smem_bytes};
  for (int r = 0; r < p.cluster; ++r) {
    out.push_back(fg_slice_begin(p, V, r));
    out.push_back(fg_slice_end(p, V, r));
  }
  return out;
}

}  // namespace
}  // namespace mhpo

TORCH_LIBRARY_FRAGMENT(mhpo_kernels_C, m) {
  m.def("fused_grad_plan(int V, ScalarType dtype, int max_shared=0, bool clusters=True) -> int[]",
        &mhpo::fused_grad_plan_op);
}
