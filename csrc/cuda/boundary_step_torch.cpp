// CUDA registration of fastunlearn::boundary_step: argument checks, layout, output
// allocation and the stream; the kernel itself is in boundary_step.cu.
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include "boundary_step.h"

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

bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor boundary_step_cuda(const at::Tensor& u, const at::Tensor& u0, const at::Tensor& grad, double eps,
                              double alpha, double lamda, double gamma, int64_t noise, int64_t quantize,
                              int64_t seed, int64_t offset, const std::optional<at::Tensor>& mean,
                              const std::optional<at::Tensor>& std) {
  TORCH_CHECK(u.is_cuda(), "boundary_step (cuda): u must be a CUDA tensor, got ", u.device());
  TORCH_CHECK(u.dim() >= 2, "boundary_step: u must be (N, C, ...) with at least 2 dims, got ", u.sizes());
  const cuda::StepDtype dtype = step_dtype(u.scalar_type());
  for (const auto* t : {&u0, &grad}) {
    const char* name = t == &u0 ? "u0" : "grad";
    TORCH_CHECK(t->device() == u.device(), "boundary_step: ", name, " must be on u's device ", u.device(),
                ", got ", t->device());
    TORCH_CHECK(t->sizes() == u.sizes(), "boundary_step: ", name, " must have u's shape ", u.sizes(), ", got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == u.scalar_type(), "boundary_step: ", name, " must have u's dtype ",
                u.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK(noise >= 0 && noise <= 3, "boundary_step: noise code must be 0..3, got ", noise);
  TORCH_CHECK(quantize >= 0, "boundary_step: quantize must be >= 0, got ", quantize);
  const int64_t C = u.size(1);
  if (mean.has_value()) {
    TORCH_CHECK(mean->dim() == 1 && mean->numel() == C, "boundary_step: mean must be a (", C, ",) tensor, got ",
                mean->sizes());
  }
  c10::cuda::CUDAGuard guard(u.device());
  at::Tensor inv_std;
  if (std.has_value()) {
    const auto& s = *std;
    TORCH_CHECK(s.dim() == 1 && s.numel() == C, "boundary_step: std must be a (", C, ",) tensor, got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat, "boundary_step: std must be float32, got ", s.scalar_type());
    TORCH_CHECK(s.device() == u.device(), "boundary_step: std must be on u's device ", u.device(), ", got ",
                s.device());
    inv_std = s.reciprocal().contiguous();
  }
  // One memory index walks all three tensors, in u's layout.
  const bool cl = is_channels_last(u);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor uc = u.contiguous(fmt), u0c = u0.contiguous(fmt), gc = grad.contiguous(fmt);
  at::Tensor out = at::empty_like(uc, uc.options(), fmt);
  const int64_t numel = u.numel();
  if (numel == 0) return out;

  cuda::BoundaryStepArgs a;
  a.u = uc.data_ptr();
  a.u0 = u0c.data_ptr();
  a.grad = gc.data_ptr();
  a.out = out.data_ptr();
  a.inv_std = inv_std.defined() ? inv_std.data_ptr<float>() : nullptr;
  a.numel = numel;
  a.channels = C;
  a.inner = numel / (u.size(0) * C);
  a.channels_last = cl;
  a.dtype = dtype;
  a.eps = static_cast<float>(eps);
  a.alpha = static_cast<float>(alpha);
  a.lamda = static_cast<float>(lamda);
  a.gamma = static_cast<float>(gamma);
  a.noise = static_cast<int>(noise);
  a.quantize = quantize;
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  const cudaError_t err = cuda::launch_boundary_step(a, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "boundary_step (cuda): kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace fastunlearn

TORCH_LIBRARY_IMPL(fastunlearn, CUDA, m) { m.impl("boundary_step", &fastunlearn::boundary_step_cuda); }
