// mhpo_kernels_C::combine: merge the per-row statistics of P vocabulary partitions
// (the ranks of a vocabulary-parallel group, or the vocabulary slices of the fused
// lm_head) into those of the whole vocabulary, in one launch. Semantics: the
// ``combine`` launcher in mhpo_kernels/backends/__init__.py; the torch twin is
// mhpo_kernels.distributed.combine_torch.
//
// stats [P, k, N] float32: row 0 the partition's log-sum-exp lse_p, row 1 its
// log-prob logp_p (x_y - lse_p for a target inside the partition, else 0), row 2
// (k == 3) its entropy H_p. Partition p holds vocabulary ids
// [starts[p], starts[p] + sizes[p]). Per row, with m = max_p lse_p,
// e_p = exp(lse_p - m), s = sum_p e_p:
//   lse = m + log s
//   logp = logp_q + (lse_q - lse) for the partition q holding the target (0 when
//          none does or the target is ignore_index)
//   H = C / s + log s, C = sum_p e_p (H_p + m - lse_p)   (0 on ignored rows)
// One partition gives its own values exactly. Partitions are read in index order
// (deterministic).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace mhpo {
namespace {

using at::Tensor;
using CombineOut = std::tuple<Tensor, Tensor, Tensor>;  // logp, entropy ([0] when k == 2), lse

void check_combine(const Tensor& stats, const Tensor& target, c10::IntArrayRef starts, c10::IntArrayRef sizes) {
  TORCH_CHECK(stats.dim() == 3 && (stats.size(1) == 2 || stats.size(1) == 3) && stats.size(0) >= 1,
              "mhpo_kernels_C.combine: stats must be [P, 2 or 3, N] with P >= 1, got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous(),
              "mhpo_kernels_C.combine: stats must be contiguous float32, got ", stats.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == stats.size(2) && target.scalar_type() == at::kLong &&
                  target.is_contiguous() && target.device() == stats.device(),
              "mhpo_kernels_C.combine: target must be a contiguous [N] int64 tensor on the stats' device, N = ",
              stats.size(2));
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == stats.size(0) && static_cast<int64_t>(sizes.size()) == stats.size(0),
              "mhpo_kernels_C.combine: starts and sizes need one entry per partition (P = ", stats.size(0), ")");
}

CombineOut alloc_combine(const Tensor& stats) {
  const auto f = stats.options();
  const int64_t N = stats.size(2);
  return {at::empty({N}, f), at::empty({stats.size(1) == 3 ? N : 0}, f), at::empty({N}, f)};
}

CombineOut combine_cpu(const Tensor& stats, const Tensor& target, c10::IntArrayRef starts, c10::IntArrayRef sizes,
                       int64_t ignore_index) {
  check_combine(stats, target, starts, sizes);
  auto out = alloc_combine(stats);
  const int64_t P = stats.size(0), k = stats.size(1), N = stats.size(2);
  const float* st = stats.const_data_ptr<float>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  float* logp = std::get<0>(out).mutable_data_ptr<float>();
  float* ent = k == 3 ? std::get<1>(out).mutable_data_ptr<float>() : nullptr;
  float* lse = std::get<2>(out).mutable_data_ptr<float>();
  const std::vector<int64_t> lo(starts.begin(), starts.end()), n_ids(sizes.begin(), sizes.end());
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const auto L = [&](int64_t p) { return st[(p * k + 0) * N + n]; };
      float m = kNegInf;
      for (int64_t p = 0; p < P; ++p) m = std::fmax(m, L(p));
      float s = 0.0f, C = 0.0f;
      for (int64_t p = 0; p < P; ++p) {
        const float l = L(p);
        if (l == kNegInf) continue;  // an all -inf partition row: nothing to add
        const float e = std::exp(l - m);
        s += e;
        if (ent != nullptr) C += e * (st[(p * k + 2) * N + n] + (m - l));
      }
      const float log_s = std::log(s);
      const float total = m + log_s;
      lse[n] = total;
      const int64_t y = tgt[n];
      const bool valid = y != ignore_index;
      float lp = 0.0f;
      if (valid) {
        for (int64_t p = 0; p < P; ++p) {
          if (y >= lo[p] && y < lo[p] + n_ids[p]) {
            lp = st[(p * k + 1) * N + n] + (L(p) - total);
            break;
          }
        }
      }
      logp[n] = lp;
      if (ent != nullptr) ent[n] = valid ? C / s + log_s : 0.0f;
    }
  });
  return out;
}

CombineOut combine_meta(const Tensor& stats, const Tensor& target, c10::IntArrayRef starts, c10::IntArrayRef sizes,
                        int64_t ignore_index) {
  check_combine(stats, target, starts, sizes);
  return alloc_combine(stats);
}

}  // namespace
}  // namespace mhpo

TORCH_LIBRARY_FRAGMENT(mhpo_kernels_C, m) {
  m.def("combine(Tensor stats, Tensor target, int[] starts, int[] sizes, int ignore_index) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mhpo_kernels_C, CPU, m) { m.impl("combine", &mhpo::combine_cpu); }

TORCH_LIBRARY_IMPL(mhpo_kernels_C, Meta, m) { m.impl("combine", &mhpo::combine_meta); }
