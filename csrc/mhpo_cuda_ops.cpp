// CUDA kernels of the mhpo_kernels_C ops (schemas in mhpo_cpu.cpp), built as
// mhpo_kernels._C_cuda: checks, allocation and the current stream; the
// kernels themselves are in mhpo_cuda.cu.
#include <Python.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "mhpo_cuda.h"
#include "mhpo_finish_ops.h"
#include "mhpo_ops.h"

namespace mhpo::cuda {
cudaError_t launch_finish(const FinishArgs& a, cudaStream_t stream);  // mhpo_finish.cu
}  // namespace mhpo::cuda

namespace mhpo {
namespace {

int num_sms(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device));
  }
  return cache[device];
}

FwdOut fwd_cuda(const Tensor& logits, const Tensor& target, const Tensor& old, const Tensor& adv, const Tensor& mask,
                const std::optional<Tensor>& ref, int64_t mode, c10::ArrayRef<double> params, double beta,
                double temperature, int64_t ignore_index, bool want_entropy, int64_t vocab_start) {
  check_fwd(logits, target, old, adv, mask, ref, mode, params, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = alloc_fwd(logits, want_entropy);
  auto& [logp, ent, lse, loss, coef] = out;
  cuda::FwdArgs a{};
  a.logits = logits.const_data_ptr();
  a.row_stride = logits.stride(0);
  a.N = logits.size(0);
  a.V = static_cast<int32_t>(logits.size(1));
  a.dtype = dtype_code(logits);
  a.target = target.const_data_ptr<int64_t>();
  a.old = old.const_data_ptr<float>();
  a.adv = adv.const_data_ptr<float>();
  a.mask = mask.const_data_ptr<float>();
  a.ref = ref.has_value() ? ref->const_data_ptr<float>() : nullptr;
  a.logp = logp.mutable_data_ptr<float>();
  a.entropy = want_entropy ? ent.mutable_data_ptr<float>() : nullptr;
  a.lse = lse.mutable_data_ptr<float>();
  a.loss = loss.mutable_data_ptr<float>();
  a.coef = coef.mutable_data_ptr<float>();
  a.mode = static_cast<int32_t>(mode);
  params_to_float(params, a.params);
  a.beta = static_cast<float>(beta);
  a.temperature = static_cast<float>(temperature);
  a.ignore_index = ignore_index;
  a.vocab_start = vocab_start;
  const int dev = logits.get_device();
  C10_CUDA_CHECK(cuda::launch_fwd(a, c10::cuda::getCurrentCUDAStream(dev).stream(), num_sms(dev)));
  return out;
}

void bwd_cuda(const Tensor& logits, const Tensor& target, const Tensor& lse, const std::optional<Tensor>& entropy,
              const Tensor& dlogp, const std::optional<Tensor>& dent, double temperature, int64_t ignore_index,
              const Tensor& out, int64_t vocab_start, const std::optional<Tensor>& scale) {
  check_bwd(logits, target, lse, entropy, dlogp, dent, temperature, out);
  check_scale(scale, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda::BwdArgs a{};
  a.logits = logits.const_data_ptr();
  a.out = out.data_ptr();
  a.row_stride = logits.stride(0);
  a.out_row_stride = out.stride(0);
  a.N = logits.size(0);
  a.V = static_cast<int32_t>(logits.size(1));
  a.dtype = dtype_code(logits);
  a.target = target.const_data_ptr<int64_t>();
  a.lse = lse.const_data_ptr<float>();
  a.dlogp = dlogp.const_data_ptr<float>();
  a.entropy = dent.has_value() ? entropy->const_data_ptr<float>() : nullptr;
  a.dent = dent.has_value() ? dent->const_data_ptr<float>() : nullptr;
  a.scale = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;  // read on the device: no sync
  a.temperature = static_cast<float>(temperature);
  a.ignore_index = ignore_index;
  a.vocab_start = vocab_start;
  const int dev = logits.get_device();
  C10_CUDA_CHECK(cuda::launch_bwd(a, c10::cuda::getCurrentCUDAStream(dev).stream(), num_sms(dev)));
}

FinishOut finish_cuda(const Tensor& logp, const std::optional<Tensor>& entropy, const Tensor& old, const Tensor& adv,
                      const std::optional<Tensor>& mask, const std::optional<Tensor>& ref, const Tensor& target,
                      const std::optional<Tensor>& cu_seqlens, int64_t num_seqs, int64_t seq_len, int64_t mode,
                      c10::ArrayRef<double> params, double beta, bool seq_level, int64_t agg, int64_t ignore_index,
                      int64_t num_classes, bool check, c10::ArrayRef<double> agg_norm,
                      const std::optional<Tensor>& iw, int64_t kl_est, const std::optional<Tensor>& token_out) {
  check_finish(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode, params, agg,
               agg_norm, iw, kl_est, token_out);
  const c10::cuda::CUDAGuard guard(logp.device());
  auto out = alloc_finish(logp);
  const FinishArgs a = finish_args(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode,
                                   params, beta, seq_level, agg, agg_norm, ignore_index, num_classes, check, iw, kl_est,
                                   token_out, out);
  C10_CUDA_CHECK(cuda::launch_finish(a, c10::cuda::getCurrentCUDAStream(logp.get_device()).stream()));
  return out;
}

}  // namespace
}  // namespace mhpo

TORCH_LIBRARY_IMPL(mhpo_kernels_C, CUDA, m) {
  m.impl("fwd", &mhpo::fwd_cuda);
  m.impl("bwd", &mhpo::bwd_cuda);
  m.impl("finish", &mhpo::finish_cuda);
}

MHPO_PY_MODULE(_C_cuda)
