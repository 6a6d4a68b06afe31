// CUDA registration of fastunlearn::batch_norm_relu and its backward: argument checks,
// output and scratch allocation, the launch on the current stream. Kernels: batch_norm_relu.cu.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "cuda/batch_norm_relu.h"

namespace fastunlearn {
namespace {

struct Checked {
  cuda::BatchNormShape shape;
  int type;
};

Checked check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "batch_norm_relu (CUDA kernel): ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "batch_norm_relu: ", name, " must be (N, C, H, W), got ", x.sizes());
  int type;
  switch (x.scalar_type()) {
    case at::kFloat: type = cuda::kBatchNormFloat32; break;
    case at::kBFloat16: type = cuda::kBatchNormBFloat16; break;
    default: TORCH_CHECK(false, "batch_norm_relu (cuda): ", name, " must be float32 or bfloat16, got ", x.scalar_type());
  }
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || x.is_contiguous(), "batch_norm_relu: ", name,
              " must be contiguous (NCHW) or channels_last, got strides ", x.strides());
  const int64_t m = x.size(0) * x.size(2) * x.size(3);
  TORCH_CHECK(m > 1, "batch_norm_relu: expected more than 1 value per channel when training, got input of shape ",
              x.sizes());
  return {{x.size(0), x.size(1), x.size(2) * x.size(3), cl && !x.is_contiguous()}, type};
}

void check_vector(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "batch_norm_relu: ", name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.numel() == x.size(1), "batch_norm_relu: ", name, " must be a (", x.size(1),
              ",) tensor, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "batch_norm_relu: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "batch_norm_relu: ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, bool relu) {
  const Checked k = check_x(x, "x");
  TORCH_CHECK(eps >= 0.0, "batch_norm_relu: eps must be >= 0, got ", eps);
  check_vector(weight, x, "weight");
  check_vector(bias, x, "bias");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "batch_norm_relu: running_mean and running_var must be given together");
  if (running_mean.has_value()) {
    check_vector(*running_mean, x, "running_mean");
    check_vector(*running_var, x, "running_var");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(1)}, f32), invstd = at::empty({x.size(1)}, f32);
  // The updated running statistics go to copies: the op does not write its inputs.
  at::Tensor rm = running_mean.has_value() ? running_mean->clone() : at::empty({0}, f32);
  at::Tensor rv = running_var.has_value() ? running_var->clone() : at::empty({0}, f32);
  at::Tensor ws = at::empty({cuda::batch_norm_relu_workspace(k.shape)}, f32);
  const cudaError_t err = cuda::launch_batch_norm_relu(
      x.data_ptr(), k.type, k.shape, weight.data_ptr<float>(), bias.data_ptr<float>(),
      running_mean.has_value() ? rm.data_ptr<float>() : nullptr,
      running_var.has_value() ? rv.data_ptr<float>() : nullptr, momentum, eps, relu, y.data_ptr(),
      mean.data_ptr<float>(), invstd.data_ptr<float>(), ws.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "batch_norm_relu: CUDA launch failed: ", cudaGetErrorString(err));
  return {y, mean, invstd, rm, rv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool relu) {
  const Checked k = check_x(x, "x");
  TORCH_CHECK(dy_in.sizes() == x.sizes() && dy_in.scalar_type() == x.scalar_type() && dy_in.device() == x.device(),
              "batch_norm_relu_backward: dy must match x (", x.sizes(), ", ", x.scalar_type(), ", ", x.device(),
              "), got ", dy_in.sizes(), ", ", dy_in.scalar_type(), ", ", dy_in.device());
  check_vector(weight, x, "weight");
  check_vector(bias, x, "bias");
  check_vector(mean, x, "mean");
  check_vector(invstd, x, "invstd");
  const c10::cuda::CUDAGuard guard(x.device());
  // The gradient arrives in whatever layout autograd made it; walk it as x is laid out.
  const at::Tensor dy =
      dy_in.contiguous(k.shape.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty({x.size(1)}, f32), db = at::empty({x.size(1)}, f32);
  at::Tensor ws = at::empty({cuda::batch_norm_relu_workspace(k.shape)}, f32);
  const cudaError_t err = cuda::launch_batch_norm_relu_backward(
      dy.data_ptr(), x.data_ptr(), k.type, k.shape, weight.data_ptr<float>(), bias.data_ptr<float>(),
      mean.data_ptr<float>(), invstd.data_ptr<float>(), relu, dx.data_ptr(), dw.data_ptr<float>(),
      db.data_ptr<float>(), ws.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "batch_norm_relu_backward: CUDA launch failed: ", cudaGetErrorString(err));
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastunlearn, CUDA, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cuda);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cuda);
}

}  // namespace fastunlearn
