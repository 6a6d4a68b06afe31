// The per-channel arithmetic of batch_norm_relu, for host and device code: merging partial
// moments, turning them into the statistics and the forward's affine map, and turning the
// backward's sums into the gradients. csrc/batch_norm_relu.cpp and
// csrc/cuda/batch_norm_relu.cu do the passes over the data; both call these for the rest,
// so the two backends compute the same formulas (reference.batch_norm_relu).
#pragma once

#include <math.h>

#ifndef FU_HD
#if defined(__CUDACC__)
#define FU_HD __host__ __device__ __forceinline__
#else
#define FU_HD inline
#endif
#endif

namespace fastunlearn {
namespace bn {

// Chan et al.'s merge of the moments (count, mean, sum of squared deviations) of part b into
// part a. T is float for per-thread partials on the GPU, double for the per-channel totals.
template <typename T>
FU_HD void merge_moments(T& n_a, T& mean_a, T& m2_a, T n_b, T mean_b, T m2_b) {
  if (n_b == T(0)) return;
  const T n = n_a + n_b;
  const T delta = mean_b - mean_a;
  const T w = n_b / n;
  mean_a += delta * w;
  m2_a += m2_b + delta * delta * n_a * w;
  n_a = n;
}

// y = x * scale + shift: the normalisation and the BatchNorm's affine map in one.
FU_HD void affine(float weight, float bias, float mean, float invstd, float& scale, float& shift) {
  scale = weight * invstd;
  shift = bias - mean * scale;
}

// From a channel's totals over m values (mean mu, squared deviations m2): mean, invstd,
// the running statistics (when running_mean is not null; momentum, unbiased variance) and
// the forward's scale / shift.
FU_HD void finish_moments(double mu, double m2, double m, double eps, double momentum, float weight, float bias,
                          float* running_mean, float* running_var, float& mean, float& invstd, float& scale,
                          float& shift) {
  const double is = 1.0 / sqrt(m2 / m + eps);
  mean = static_cast<float>(mu);
  invstd = static_cast<float>(is);
  if (running_mean != nullptr) {
    *running_mean = static_cast<float>((1.0 - momentum) * *running_mean + momentum * mu);
    *running_var = static_cast<float>((1.0 - momentum) * *running_var + momentum * m2 / (m - 1.0));
  }
  affine(weight, bias, mean, invstd, scale, shift);
}

// From a channel's sums s = sum g and sx = sum g (x - mean) over m values (g the gradient
// at the BatchNorm's output): dweight, dbias, and the input gradient's coefficients
//   dx = g * k1 + (x - mean) * k2 + k3 = w is (g - s / m - (x - mean) is^2 sx / m).
FU_HD void grad_coefficients(double s, double sx, double m, float weight, float invstd, float& dweight, float& dbias,
                             float& k1, float& k2, float& k3) {
  const double is = invstd, a = weight * is;
  dbias = static_cast<float>(s);
  dweight = static_cast<float>(sx * is);
  k1 = static_cast<float>(a);
  k2 = static_cast<float>(-a * is * is * sx / m);
  k3 = static_cast<float>(-a * s / m);
}

}  // namespace bn
}  // namespace fastunlearn
