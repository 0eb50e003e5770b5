// CUDA kernels of the fwd_grad / scale_grad ops (schemas, CPU and Meta kernels: mhpo_cpu.cpp), part
// of mhpo_kernels._C_cuda: checks, allocation, the device facts and the current stream; the kernels
// are in mhpo_fused_grad.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "mhpo_fused_grad.h"
#include "mhpo_fused_grad_ops.h"

namespace mhpo {
namespace {

cuda::DeviceInfo device_info(int device) {
  static std::mutex mu;
  static std::vector<cuda::DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, cuda::DeviceInfo{0, 0, 0});
  cuda::DeviceInfo& d = cache[device];
  if (d.num_sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, device));
  }
  return d;
}

FwdOut fwd_grad_cuda(const Tensor& logits, const Tensor& target, const Tensor& old, const Tensor& adv,
                     const std::optional<Tensor>& ref, const Tensor& weight, int64_t mode,
                     c10::ArrayRef<double> params, double beta, double temperature, int64_t ignore_index,
                     bool want_entropy, double ent_coef, const Tensor& grad) {
  check_fwd_grad(logits, target, old, adv, ref, weight, mode, params, temperature, grad);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = alloc_fwd(logits, want_entropy);
  auto& [logp, ent, lse, loss, coef] = out;
  cuda::FwdGradArgs a{};
  a.logits = logits.const_data_ptr();
  a.grad = grad.data_ptr();
  a.row_stride = logits.stride(0);
  a.grad_row_stride = grad.stride(0);
  a.N = logits.size(0);
  a.V = static_cast<int32_t>(logits.size(1));
  a.dtype = dtype_code(logits);
  a.target = target.const_data_ptr<int64_t>();
  a.old = old.const_data_ptr<float>();
  a.adv = adv.const_data_ptr<float>();
  a.ref = ref.has_value() ? ref->const_data_ptr<float>() : nullptr;
  a.weight = weight.const_data_ptr<float>();
  a.logp = logp.mutable_data_ptr<float>();
  a.entropy = want_entropy ? ent.mutable_data_ptr<float>() : nullptr;
  a.lse = lse.mutable_data_ptr<float>();
  a.loss = loss.mutable_data_ptr<float>();
  a.coef = coef.mutable_data_ptr<float>();
  a.mode = static_cast<int32_t>(mode);
  params_to_float(params, a.params);
  a.beta = static_cast<float>(beta);
  a.temperature = static_cast<float>(temperature);
  a.ent_coef = static_cast<float>(ent_coef);
  a.ignore_index = ignore_index;
  const int dev = logits.get_device();
  C10_CUDA_CHECK(cuda::launch_fwd_grad(a, c10::cuda::getCurrentCUDAStream(dev).stream(), device_info(dev)));
  return out;
}

void scale_grad_cuda(const Tensor& grad, const Tensor& scale) {
  check_scale_grad(grad, scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  cuda::ScaleGradArgs a{};
  a.grad = grad.data_ptr();
  a.row_stride = grad.stride(0);
  a.N = grad.size(0);
  a.V = static_cast<int32_t>(grad.size(1));
  a.dtype = dtype_code(grad);
  a.scale = scale.const_data_ptr<float>();  // read on the device: no sync
  const int dev = grad.get_device();
  C10_CUDA_CHECK(cuda::launch_scale_grad(a, c10::cuda::getCurrentCUDAStream(dev).stream(), device_info(dev)));
}

}  // namespace
}  // namespace mhpo

TORCH_LIBRARY_IMPL(mhpo_kernels_C, CUDA, m) {
  m.impl("fwd_grad", &mhpo::fwd_grad_cuda);
  m.impl("scale_grad", &mhpo::scale_grad_cuda);
}
