// CUDA registration of fastunlearn::boundary_step: the checked call (boundary_step_args.h) handed
// to the launcher on the current stream; the kernel itself is in boundary_step.cu.
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include "boundary_step.h"
#include "boundary_step_args.h"

namespace fastunlearn {
namespace {

cuda::StepDtype step_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::StepDtype::kFloat32;
    case at::kBFloat16:
      return cuda::StepDtype::kBFloat16;
    case at::kHalf:
      return cuda::StepDtype::kFloat16;
    default:
      TORCH_CHECK(false, "boundary_step: u must be float32, bfloat16 or float16, got ", t);
  }
}

at::Tensor boundary_step_cuda(const at::Tensor& u, const at::Tensor& u0, const at::Tensor& grad, double eps,
                              double alpha, double lamda, double gamma, int64_t noise, int64_t quantize,
                              int64_t seed, int64_t offset, const std::optional<at::Tensor>& mean,
                              const std::optional<at::Tensor>& std) {
  // Checked here as well as in prepare_boundary_step: the guard, which the allocations there
  // need, takes only a CUDA device.
  TORCH_CHECK(u.is_cuda(), "boundary_step (cuda): u must be a CUDA tensor, got ", u.device());
  c10::cuda::CUDAGuard guard(u.device());
  const BoundaryStepCall call =
      prepare_boundary_step(u, u0, grad, eps, alpha, lamda, gamma, noise, quantize, seed, offset, mean, std, at::kCUDA);
  const BoundaryStepParams& p = call.p;
  if (p.numel == 0) return call.out;

  cuda::BoundaryStepArgs a;
  a.u = call.u.data_ptr();
  a.u0 = call.u0.data_ptr();
  a.grad = call.grad.data_ptr();
  a.out = call.out.data_ptr();
  a.inv_std = p.inv_std;
  a.numel = p.numel;
  a.channels = p.C;
  a.inner = p.HW;
  a.channels_last = p.channels_last;
  a.dtype = step_dtype(u.scalar_type());
  a.eps = p.eps;
  a.alpha = p.alpha;
  a.lamda = p.lamda;
  a.gamma = p.gamma;
  a.noise = p.noise;
  a.quantize = p.quantize;
  a.seed = p.seed;
  a.offset = p.offset;
  const cudaError_t err = cuda::launch_boundary_step(a, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "boundary_step (cuda): kernel launch failed: ", cudaGetErrorString(err));
  return call.out;
}

}  // namespace
}  // namespace fastunlearn

TORCH_LIBRARY_IMPL(fastunlearn, CUDA, m) { m.impl("boundary_step", &fastunlearn::boundary_step_cuda); }
