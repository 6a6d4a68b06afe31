// relabel_check's argument checks and output allocation, shared by the CPU registration
// (relabel_check.cpp) and the CUDA one (cuda/relabel_check_torch.cpp). The Python side of the
// same checks is python/fastunlearn/ops/relabel_check_meta.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "relabel_modes.h"

namespace fastunlearn {

using RelabelOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_relabel_args(const at::Tensor& logits, const at::Tensor& y, int64_t mode, int64_t topk) {
  TORCH_CHECK(logits.dim() == 2, "relabel_check: logits must be (N, classes), got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "relabel_check: logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == logits.size(0), "relabel_check: y must be (", logits.size(0),
              "), got shape ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kLong, "relabel_check: y must be int64, got ", y.scalar_type());
  TORCH_CHECK(mode >= kArgmax && mode <= kTopk,
              "relabel_check: mode must be 0..3 (argmax, nearest_incorrect, soft, topk), got ", mode);
  TORCH_CHECK(mode != kTopk || topk >= 1, "relabel_check: topk must be >= 1, got ", topk);
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) >= 1, "relabel_check: logits need at least one class, got shape ",
              logits.sizes());
}

// relabel, success, margin, targets (soft / top-k modes, else empty), dlogits (want_grad, else empty).
inline RelabelOutputs relabel_outputs(const at::Tensor& logits, int64_t mode, bool want_grad) {
  const int64_t n = logits.size(0), k = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  return {at::empty({n}, logits.options().dtype(at::kLong)), at::empty({n}, logits.options().dtype(at::kBool)),
          at::empty({n}, f32), (mode == kSoft || mode == kTopk) ? at::empty({n, k}, f32) : at::empty({0}, f32),
          want_grad ? at::empty({n, k}, f32) : at::empty({0}, f32)};
}

}  // namespace fastunlearn
