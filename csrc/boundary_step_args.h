// boundary_step's argument checks, input layout, output allocation and parameters, shared by
// the CPU registration (boundary_step.cpp) and the CUDA one (cuda/boundary_step_torch.cpp).
// The Python side of the same checks is python/fastunlearn/ops/boundary_step_meta.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "philox.h"

namespace fastunlearn {

// The per-call parameters a backend's kernel reads.
struct BoundaryStepParams {
  float eps, alpha, lamda, gamma;
  float q;                // quantize as a float: values are rounded to multiples of 1 / q
  int noise;              // a philox::Noise code
  int64_t quantize;       // 0 = no rounding
  bool has_noise;         // gamma != 0
  uint64_t seed, offset;
  int64_t numel;
  int64_t C, HW;          // channels (size(1)) and positions per channel (product of the dims after 1)
  bool channels_last;     // memory order (n, h, w, c) instead of (n, c, h, w)
  const float* inv_std;   // (C,) on u's device, or nullptr when no std is given
};

// One checked call: u, u0 and grad in u's layout (contiguous or channels_last), the output
// allocated in it, 1 / std, and the parameters pointing at them.
struct BoundaryStepCall {
  at::Tensor u, u0, grad, out, inv_std;
  BoundaryStepParams p;
};

inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The checks both backends make; `device` is the type of device the backend runs on.
inline void check_boundary_step_args(const at::Tensor& u, const at::Tensor& u0, const at::Tensor& grad,
                                     int64_t noise, int64_t quantize, const std::optional<at::Tensor>& mean,
                                     const std::optional<at::Tensor>& std, at::DeviceType device) {
  TORCH_CHECK(u.device().type() == device, "boundary_step (", c10::DeviceTypeName(device, true), "): u must be a ",
              c10::DeviceTypeName(device), " tensor, got ", u.device());
  TORCH_CHECK(u.dim() >= 2, "boundary_step: u must be (N, C, ...) with at least 2 dims, got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kBFloat16 || u.scalar_type() == at::kHalf,
              "boundary_step: u must be float32, bfloat16 or float16, got ", u.scalar_type());
  for (const auto* t : {&u0, &grad}) {
    const char* name = t == &u0 ? "u0" : "grad";
    TORCH_CHECK(t->device() == u.device(), "boundary_step: ", name, " must be on u's device ", u.device(), ", got ",
                t->device());
    TORCH_CHECK(t->sizes() == u.sizes(), "boundary_step: ", name, " must have u's shape ", u.sizes(), ", got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == u.scalar_type(), "boundary_step: ", name, " must have u's dtype ",
                u.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK(noise >= philox::kNormal && noise <= philox::kUniform,
              "boundary_step: noise code must be 0..3 (normal, laplace, cauchy, uniform), got ", noise);
  TORCH_CHECK(quantize >= 0, "boundary_step: quantize must be >= 0, got ", quantize);
  const int64_t C = u.size(1);
  if (mean.has_value()) {
    TORCH_CHECK(mean->dim() == 1 && mean->numel() == C, "boundary_step: mean must be a (", C, ",) tensor, got ",
                mean->sizes());
  }
  if (std.has_value()) {
    const auto& s = *std;
    TORCH_CHECK(s.dim() == 1 && s.numel() == C, "boundary_step: std must be a (", C, ",) tensor, got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat, "boundary_step: std must be float32, got ", s.scalar_type());
    TORCH_CHECK(s.device() == u.device(), "boundary_step: std must be on u's device ", u.device(), ", got ",
                s.device());
  }
}

// Checks the arguments and prepares the call. mean is only checked: the chain rule through
// (u - mean) / std involves std alone. The caller selects u's device (for CUDA) first.
inline BoundaryStepCall prepare_boundary_step(const at::Tensor& u, const at::Tensor& u0, const at::Tensor& grad,
                                              double eps, double alpha, double lamda, double gamma, int64_t noise,
                                              int64_t quantize, int64_t seed, int64_t offset,
                                              const std::optional<at::Tensor>& mean,
                                              const std::optional<at::Tensor>& std, at::DeviceType device) {
  check_boundary_step_args(u, u0, grad, noise, quantize, mean, std, device);
  BoundaryStepCall call;
  // All three tensors are walked with one memory index, in u's layout (contiguous or
  // channels_last); anything else is copied into that layout first.
  const bool cl = is_channels_last(u);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  call.u = u.contiguous(fmt);
  call.u0 = u0.contiguous(fmt);
  call.grad = grad.contiguous(fmt);
  call.out = at::empty_like(call.u, call.u.options(), fmt);
  if (std.has_value()) call.inv_std = std->reciprocal().contiguous();
  BoundaryStepParams& p = call.p;
  p.eps = static_cast<float>(eps);
  p.alpha = static_cast<float>(alpha);
  p.lamda = static_cast<float>(lamda);
  p.gamma = static_cast<float>(gamma);
  p.q = static_cast<float>(quantize);
  p.noise = static_cast<int>(noise);
  p.quantize = quantize;
  p.has_noise = gamma != 0.0;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.numel = u.numel();
  p.C = u.size(1);
  p.HW = p.numel == 0 ? 0 : p.numel / (u.size(0) * p.C);
  p.channels_last = cl;
  p.inv_std = call.inv_std.defined() ? call.inv_std.data_ptr<float>() : nullptr;
  return call;
}

}  // namespace fastunlearn
