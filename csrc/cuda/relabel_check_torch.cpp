// CUDA registration of fastunlearn::relabel_check: argument checks, output allocation
// and the launch on the current stream. The kernels are in relabel_check.cu.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>

#include "cuda/relabel_check.h"

namespace fastunlearn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relabel_check_cuda(
    const at::Tensor& logits_in, const at::Tensor& y_in, int64_t mode, int64_t topk, bool want_grad) {
  TORCH_CHECK(logits_in.dim() == 2, "relabel_check: logits must be (N, classes), got shape ", logits_in.sizes());
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
  TORCH_CHECK(y_in.dim() == 1 && y_in.size(0) == logits_in.size(0), "relabel_check: y must be (",
              logits_in.size(0), "), got shape ", y_in.sizes());
  TORCH_CHECK(y_in.scalar_type() == at::kLong, "relabel_check: y must be int64, got ", y_in.scalar_type());
  TORCH_CHECK(mode >= 0 && mode <= 3, "relabel_check: mode must be 0..3 (argmax, nearest_incorrect, soft, topk), "
              "got ", mode);
  TORCH_CHECK(mode != 3 || topk >= 1, "relabel_check: topk must be >= 1, got ", topk);
  const int64_t n = logits_in.size(0), k = logits_in.size(1);
  TORCH_CHECK(n == 0 || k >= 1, "relabel_check: logits need at least one class, got shape ", logits_in.sizes());
  TORCH_CHECK(k < INT_MAX && n < INT_MAX, "relabel_check: N and classes must be below 2^31, got shape ",
              logits_in.sizes());
  // Label range is checked by the Python wrapper; checking here would need a device sync.
  // The kernel never reads outside the row for a bad label (its margin comes back NaN).

  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor relabel = at::empty({n}, logits.options().dtype(at::kLong));
  at::Tensor success = at::empty({n}, logits.options().dtype(at::kBool));
  at::Tensor margin = at::empty({n}, f32);
  at::Tensor targets = (mode == 2 || mode == 3) ? at::empty({n, k}, f32) : at::empty({0}, f32);
  at::Tensor dlogits = want_grad ? at::empty({n, k}, f32) : at::empty({0}, f32);
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
