// CUDA registration of fastunlearn::relabel_check: argument checks, output allocation
// and the launch on the current stream. The kernels are in relabel_check.cu.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>

#include "cuda/relabel_check.h"
#include "relabel_check_args.h"

namespace fastunlearn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relabel_check_cuda(
    const at::Tensor& logits_in, const at::Tensor& y_in, int64_t mode, int64_t topk, bool want_grad) {
  check_relabel_args(logits_in, y_in, mode, topk);
  TORCH_CHECK(logits_in.is_cuda() && y_in.is_cuda(), "relabel_check (CUDA kernel): logits and y must be CUDA "
              "tensors, got ", logits_in.device(), " and ", y_in.device());
  TORCH_CHECK(logits_in.device() == y_in.device(), "relabel_check: logits and y must be on one device, got ",
              logits_in.device(), " and ", y_in.device());
  int logits_type;
  switch (logits_in.scalar_type()) {
    case at::kFloat: logits_type = cuda::kRelabelFloat32; break;
    case at::kBFloat16: logits_type = cuda::kRelabelBFloat16; break;
    case at::kHalf: logits_type = cuda::kRelabelFloat16; break;
    default:
      TORCH_CHECK(false, "relabel_check: logits must be float32, bfloat16 or float16, got ", logits_in.scalar_type());
  }
  const int64_t n = logits_in.size(0), k = logits_in.size(1);
  TORCH_CHECK(k < INT_MAX && n < INT_MAX, "relabel_check: N and classes must be below 2^31, got shape ",
              logits_in.sizes());
  // Label range is checked by the Python wrapper; checking here would need a device sync.
  // The kernel never reads outside the row for a bad label (its margin comes back NaN).

  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  auto [relabel, success, margin, targets, dlogits] = relabel_outputs(logits, mode, want_grad);
  if (n == 0) return {relabel, success, margin, targets, dlogits};

  const cudaError_t err = cuda::launch_relabel_check(
      logits.data_ptr(), logits_type, y.data_ptr<int64_t>(), n, k, static_cast<int>(mode), topk, want_grad,
      relabel.data_ptr<int64_t>(), success.data_ptr<bool>(), margin.data_ptr<float>(),
      targets.numel() ? targets.data_ptr<float>() : nullptr, dlogits.numel() ? dlogits.data_ptr<float>() : nullptr,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "relabel_check: CUDA launch failed: ", cudaGetErrorString(err));
  return {relabel, success, margin, targets, dlogits};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastunlearn, CUDA, m) { m.impl("relabel_check", &relabel_check_cuda); }

}  // namespace fastunlearn
