// batch_norm_relu on CUDA: plain launchers over raw pointers, free of torch headers.
// Semantics: reference.batch_norm_relu (training-mode BatchNorm2d, then max(., 0) when relu).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastunlearn {
namespace cuda {

enum BatchNormType : int { kBatchNormFloat32 = 0, kBatchNormBFloat16 = 1 };

// The shape and memory layout of x (N, C, H, W): channels_last (rows of C values) or NCHW.
struct BatchNormShape {
  int64_t n, c, hw;
  bool channels_last;
};

// Float32 scratch the launchers need, in elements: partials for a reduction over the batch.
int64_t batch_norm_relu_workspace(const BatchNormShape& s);

// Forward: y = max((x - mean) * invstd * weight + bias, 0) (no max unless relu), mean and
// invstd = 1 / sqrt(biased var + eps) per channel written to mean / invstd; running_mean /
// running_var (may be null) updated with momentum and the unbiased variance. workspace:
// batch_norm_relu_workspace(s) floats. Asynchronous on stream; returns the launch error.
cudaError_t launch_batch_norm_relu(const void* x, int type, const BatchNormShape& s, const float* weight,
                                   const float* bias, float* running_mean, float* running_var, double momentum,
                                   double eps, bool relu, void* y, float* mean, float* invstd, float* workspace,
                                   cudaStream_t stream);

// Backward of the same: dx (x's type and layout), dweight, dbias (float32, C).
cudaError_t launch_batch_norm_relu_backward(const void* dy, const void* x, int type, const BatchNormShape& s,
                                            const float* weight, const float* bias, const float* mean,
                                            const float* invstd, bool relu, void* dx, float* dweight, float* dbias,
                                            float* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastunlearn
