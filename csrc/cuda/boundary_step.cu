// boundary_step on CUDA: one fused elementwise pass (see reference.boundary_step).
//
// A grid-stride loop over memory positions with 64-bit offsets. The index arithmetic
// that maps a memory position to its channel and its logical NCHW counter uses 32-bit
// division when the tensor is small enough (64-bit division is emulated and would cost
// more than the Philox rounds). Noise is the shared Philox stream of csrc/philox.h, so
// draws match the CPU and Triton backends and do not depend on the launch shape.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "boundary_step.h"
#include "philox.h"

namespace fastunlearn {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return __ldg(p + i); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_f(const __half* p, int64_t i) { return __half2float(p[i]); }

__device__ __forceinline__ void store_f(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_f(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

struct KernelParams {
  int64_t numel;
  int64_t channels, inner;
  bool channels_last, has_noise, quantize;
  float eps, alpha, lamda, gamma, q;
  int noise;
  uint64_t seed, offset;
  const float* inv_std;
};

// index_t: type of the channel / logical-index arithmetic (uint32_t when numel < 2^31).
template <typename T, typename index_t>
__global__ void __launch_bounds__(kThreads)
    boundary_step_kernel(const T* __restrict__ u, const T* __restrict__ u0, const T* __restrict__ grad,
                         T* __restrict__ out, const KernelParams p) {
  const index_t C = static_cast<index_t>(p.channels), HW = static_cast<index_t>(p.inner);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; m < p.numel; m += stride) {
    const index_t mi = static_cast<index_t>(m);
    index_t c, logical;
    if (p.channels_last) {
      // memory (n, hw, c) -> logical (n, c, hw)
      c = mi % C;
      const index_t pix = mi / C;
      const index_t hw = pix % HW, n = pix / HW;
      logical = (n * C + c) * HW + hw;
    } else {
      c = (mi / HW) % C;
      logical = mi;
    }
    const float uf = load_f(u, m), u0f = load_f(u0, m);
    float g = load_f(grad, m);
    if (p.inv_std != nullptr) g *= __ldg(p.inv_std + c);
    float d = g - p.lamda * (uf - u0f);
    if (p.has_noise)
      d += p.gamma * philox::noise_at(static_cast<uint64_t>(logical) + p.offset, p.seed, p.noise);
    // sign(d); a NaN d passes through, as torch.sign does.
    const float sg = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : d);
    float v = uf + p.alpha * sg;
    float lo = fmaxf(u0f - p.eps, 0.0f), hi = fminf(u0f + p.eps, 1.0f);
    if (p.quantize) {
      // Bounds shrink to the grid points inside the ball (1e-4 grid units of slack for
      // bounds meant to sit on the grid), so rounding never leaves it.
      lo = ceilf(lo * p.q - 1e-4f) / p.q;
      hi = floorf(hi * p.q + 1e-4f) / p.q;
      v = floorf(v * p.q + 0.5f) / p.q;
    }
    // Written so a NaN v survives, as torch.maximum / torch.minimum propagate it.
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    store_f(out, m, v);
  }
}

template <typename T>
cudaError_t launch_typed(const BoundaryStepArgs& a, const KernelParams& kp, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // Enough blocks to fill every SM several times; the grid-stride loop covers the rest.
  const int64_t needed = (a.numel + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * 16;
  const unsigned blocks = static_cast<unsigned>(needed < cap ? needed : cap);
  const T* u = static_cast<const T*>(a.u);
  const T* u0 = static_cast<const T*>(a.u0);
  const T* g = static_cast<const T*>(a.grad);
  T* out = static_cast<T*>(a.out);
  if (a.numel < (int64_t{1} << 31))
    boundary_step_kernel<T, uint32_t><<<blocks, kThreads, 0, stream>>>(u, u0, g, out, kp);
  else
    boundary_step_kernel<T, uint64_t><<<blocks, kThreads, 0, stream>>>(u, u0, g, out, kp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_boundary_step(const BoundaryStepArgs& a, cudaStream_t stream) {
  if (a.numel <= 0) return cudaSuccess;
  if (a.channels <= 0 || a.inner <= 0) return cudaErrorInvalidValue;
  KernelParams kp;
  kp.numel = a.numel;
  kp.channels = a.channels;
  kp.inner = a.inner;
  kp.channels_last = a.channels_last;
  kp.has_noise = a.gamma != 0.0f;
  kp.quantize = a.quantize > 0;
  kp.eps = a.eps;
  kp.alpha = a.alpha;
  kp.lamda = a.lamda;
  kp.gamma = a.gamma;
  kp.q = static_cast<float>(a.quantize);
  kp.noise = a.noise;
  kp.seed = a.seed;
  kp.offset = a.offset;
  kp.inv_std = a.inv_std;
  switch (a.dtype) {
    case StepDtype::kFloat32:
      return launch_typed<float>(a, kp, stream);
    case StepDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(a, kp, stream);
    case StepDtype::kFloat16:
      return launch_typed<__half>(a, kp, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastunlearn
