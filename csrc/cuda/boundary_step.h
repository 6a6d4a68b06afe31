// Launcher of the CUDA boundary_step kernel. Plain types only, so the torch glue
// (boundary_step_torch.cpp) and the kernel (boundary_step.cu) compile independently.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace fastunlearn {
namespace cuda {

// Storage dtype of u, u0, grad and out (all four share it).
enum class StepDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct BoundaryStepArgs {
  const void* u;
  const void* u0;
  const void* grad;
  void* out;
  const float* inv_std;  // (C,) device pointer, or nullptr when no std is given
  int64_t numel;
  int64_t channels;      // C = size(1)
  int64_t inner;         // elements per (n, c): product of the dims after 1
  bool channels_last;    // memory order (n, h, w, c) instead of (n, c, h, w)
  StepDtype dtype;
  float eps, alpha, lamda, gamma;
  int noise;             // 0 normal, 1 laplace, 2 cauchy, 3 uniform(-1, 1)
  int64_t quantize;      // 0 = off
  uint64_t seed, offset;
};

// Enqueues the kernel on stream; returns the launch error (cudaSuccess when fine).
cudaError_t launch_boundary_step(const BoundaryStepArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastunlearn
