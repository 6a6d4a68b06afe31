// batch_norm_relu on CUDA (see reference.batch_norm_relu and csrc/batch_norm_relu.cpp).
//
// Forward: partial moments per block of the batch -> per-channel statistics (combined in
// block order, in double) -> one normalise-and-clip pass. Backward: partial sums of g and
// g * (x - mean) per block (g = dy where the ReLU passed) -> per-channel coefficients -> one
// input-gradient pass. Every reduction has a fixed order, so results are deterministic and
// the launches hold no host synchronisation (they can be captured in a CUDA graph).
//
// A block is a run of rows (N*H*W positions of C values) in channels_last, and one image in
// NCHW (a plane of H*W values per channel), as on the CPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "batch_norm_relu.h"
#include "batch_norm_stats.h"

namespace fastunlearn {
namespace cuda {
namespace {

constexpr int kChannelsPerTile = 32;  // channels_last: threadIdx.x over channels
constexpr int kRowLanes = 8;          // channels_last: threadIdx.y over rows
constexpr int kPlaneThreads = 256;    // NCHW: threads over one plane
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxRowBlocks = 512;

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store_f(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// Rows per block in channels_last: at least 32, at most kMaxRowBlocks blocks.
int64_t rows_per_block(const BatchNormShape& s) {
  const int64_t m = s.n * s.hw;
  return std::max<int64_t>(32, (m + kMaxRowBlocks - 1) / kMaxRowBlocks);
}

int64_t blocks_of(const BatchNormShape& s) {
  if (!s.channels_last) return s.n;
  const int64_t r = rows_per_block(s);
  return (s.n * s.hw + r - 1) / r;
}

// ---------------------------------------------------------------- reductions, per block
// Channels_last moments: grid (blocks, ceil(C / 32)), block (32, 8). Each thread runs
// Welford over its rows; the 8 row lanes merge in lane order.
template <typename T>
__global__ void moments_cl(const T* __restrict__ x, int64_t m, int64_t c_total, int64_t rows,
                           float* __restrict__ p_mean, float* __restrict__ p_m2) {
  __shared__ float s_n[kRowLanes][kChannelsPerTile], s_mean[kRowLanes][kChannelsPerTile],
      s_m2[kRowLanes][kChannelsPerTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.x, c = static_cast<int64_t>(blockIdx.y) * kChannelsPerTile + tx;
  const int64_t r0 = b * rows, r1 = min(m, r0 + rows);
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  if (c < c_total) {
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) {
      const float v = load_f(x, r * c_total + c);
      n += 1.0f;
      const float d = v - mean;
      mean += d / n;
      m2 += d * (v - mean);
    }
  }
  s_n[ty][tx] = n;
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  __syncthreads();
  if (ty == 0 && c < c_total) {
    for (int k = 1; k < kRowLanes; ++k) bn::merge_moments(n, mean, m2, s_n[k][tx], s_mean[k][tx], s_m2[k][tx]);
    p_mean[b * c_total + c] = mean;
    p_m2[b * c_total + c] = m2;
  }
}

// Tree merge of per-thread (n, mean, m2) over kPlaneThreads threads, fixed order.
__device__ void merge_block(float& n, float& mean, float& m2) {
  __shared__ float s_n[kPlaneThreads], s_mean[kPlaneThreads], s_m2[kPlaneThreads];
  const int t = threadIdx.x;
  s_n[t] = n;
  s_mean[t] = mean;
  s_m2[t] = m2;
  __syncthreads();
  for (int stride = kPlaneThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) {
      float a_n = s_n[t], a_mean = s_mean[t], a_m2 = s_m2[t];
      bn::merge_moments(a_n, a_mean, a_m2, s_n[t + stride], s_mean[t + stride], s_m2[t + stride]);
      s_n[t] = a_n;
      s_mean[t] = a_mean;
      s_m2[t] = a_m2;
    }
    __syncthreads();
  }
  n = s_n[0];
  mean = s_mean[0];
  m2 = s_m2[0];
}

// NCHW moments: grid (N, C), one plane per block.
template <typename T>
__global__ void moments_nchw(const T* __restrict__ x, int64_t c_total, int64_t hw, float* __restrict__ p_mean,
                             float* __restrict__ p_m2) {
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * c_total + blockIdx.y;
  const T* p = x + plane * hw;
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  for (int64_t i = threadIdx.x; i < hw; i += kPlaneThreads) {
    const float v = load_f(p, i);
    n += 1.0f;
    const float d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
  }
  merge_block(n, mean, m2);
  if (threadIdx.x == 0) {
    p_mean[plane] = mean;
    p_m2[plane] = m2;
  }
}

__device__ __forceinline__ float relu_grad(float g, float xv, float scale, float shift, bool relu) {
  return (!relu || xv * scale + shift > 0.0f) ? g : 0.0f;
}

// Channels_last sums of g and g * (x - mean): grid and block as moments_cl.
template <typename T>
__global__ void grad_sums_cl(const T* __restrict__ dy, const T* __restrict__ x, int64_t m, int64_t c_total,
                             int64_t rows, const float* __restrict__ mean, const float* __restrict__ scale,
                             const float* __restrict__ shift, bool relu, float* __restrict__ p_g,
                             float* __restrict__ p_gx) {
  __shared__ float s_g[kRowLanes][kChannelsPerTile], s_gx[kRowLanes][kChannelsPerTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.x, c = static_cast<int64_t>(blockIdx.y) * kChannelsPerTile + tx;
  const int64_t r0 = b * rows, r1 = min(m, r0 + rows);
  float sg = 0.0f, sgx = 0.0f;
  if (c < c_total) {
    const float mu = mean[c], a = scale[c], s = shift[c];
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) {
      const float xv = load_f(x, r * c_total + c);
      const float g = relu_grad(load_f(dy, r * c_total + c), xv, a, s, relu);
      sg += g;
      sgx += g * (xv - mu);
    }
  }
  s_g[ty][tx] = sg;
  s_gx[ty][tx] = sgx;
  __syncthreads();
  if (ty == 0 && c < c_total) {
    for (int k = 1; k < kRowLanes; ++k) {
      sg += s_g[k][tx];
      sgx += s_gx[k][tx];
    }
    p_g[b * c_total + c] = sg;
    p_gx[b * c_total + c] = sgx;
  }
}

// NCHW sums: grid (N, C), one plane per block, a fixed-order tree over the threads.
template <typename T>
__global__ void grad_sums_nchw(const T* __restrict__ dy, const T* __restrict__ x, int64_t c_total, int64_t hw,
                               const float* __restrict__ mean, const float* __restrict__ scale,
                               const float* __restrict__ shift, bool relu, float* __restrict__ p_g,
                               float* __restrict__ p_gx) {
  __shared__ float s_g[kPlaneThreads], s_gx[kPlaneThreads];
  const int64_t c = blockIdx.y, plane = static_cast<int64_t>(blockIdx.x) * c_total + c;
  const T* px = x + plane * hw;
  const T* pg = dy + plane * hw;
  const float mu = mean[c], a = scale[c], s = shift[c];
  float sg = 0.0f, sgx = 0.0f;
  for (int64_t i = threadIdx.x; i < hw; i += kPlaneThreads) {
    const float xv = load_f(px, i);
    const float g = relu_grad(load_f(pg, i), xv, a, s, relu);
    sg += g;
    sgx += g * (xv - mu);
  }
  const int t = threadIdx.x;
  s_g[t] = sg;
  s_gx[t] = sgx;
  __syncthreads();
  for (int stride = kPlaneThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) {
      s_g[t] += s_g[t + stride];
      s_gx[t] += s_gx[t + stride];
    }
    __syncthreads();
  }
  if (t == 0) {
    p_g[plane] = s_g[0];
    p_gx[plane] = s_gx[0];
  }
}

// ---------------------------------------------------------------- per-channel finalisers
// Merges the blocks' moments in block order (double), writes mean, invstd, the running
// statistics and the forward's scale / shift.
__global__ void finalize_moments(const float* __restrict__ p_mean, const float* __restrict__ p_m2, int64_t blocks,
                                 int64_t c_total, int64_t m, int64_t rows, bool channels_last, const float* weight,
                                 const float* bias, float* running_mean, float* running_var, double momentum,
                                 double eps, float* mean, float* invstd, float* scale, float* shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= c_total) return;
  double n = 0.0, mu = 0.0, m2 = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const double nb = channels_last ? static_cast<double>(min(m, (b + 1) * rows) - b * rows)
                                    : static_cast<double>(m / blocks);
    bn::merge_moments<double>(n, mu, m2, nb, p_mean[b * c_total + c], p_m2[b * c_total + c]);
  }
  bn::finish_moments(mu, m2, static_cast<double>(m), eps, momentum, weight[c], bias[c],
                     running_mean != nullptr ? running_mean + c : nullptr,
                     running_var != nullptr ? running_var + c : nullptr, mean[c], invstd[c], scale[c], shift[c]);
}

// Sums the blocks' gradient partials in block order (double): dweight, dbias and the
// input-gradient coefficients dx = g * k1 + (x - mean) * k2 + k3.
__global__ void finalize_grad(const float* __restrict__ p_g, const float* __restrict__ p_gx, int64_t blocks,
                              int64_t c_total, int64_t m, const float* weight, const float* invstd, float* dweight,
                              float* dbias, float* k1, float* k2, float* k3) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= c_total) return;
  double s = 0.0, sx = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    s += p_g[b * c_total + c];
    sx += p_gx[b * c_total + c];
  }
  bn::grad_coefficients(s, sx, static_cast<double>(m), weight[c], invstd[c], dweight[c], dbias[c], k1[c], k2[c],
                        k3[c]);
}

// Scale / shift for the backward's ReLU mask, from the saved statistics.
__global__ void affine_of(const float* weight, const float* bias, const float* mean, const float* invstd,
                          int64_t c_total, float* scale, float* shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= c_total) return;
  bn::affine(weight[c], bias[c], mean[c], invstd[c], scale[c], shift[c]);
}

// ---------------------------------------------------------------- elementwise passes
template <typename index_t>
__device__ __forceinline__ index_t channel_of(index_t i, index_t c_total, index_t hw, bool channels_last) {
  return channels_last ? i % c_total : (i / hw) % c_total;
}

template <typename T, typename index_t>
__global__ void normalise(const T* __restrict__ x, T* __restrict__ y, index_t numel, index_t c_total, index_t hw,
                          bool channels_last, const float* __restrict__ scale, const float* __restrict__ shift,
                          bool relu) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t c = channel_of(i, c_total, hw, channels_last);
    const float v = load_f(x, i) * scale[c] + shift[c];
    store_f(y, i, relu ? fmaxf(v, 0.0f) : v);
  }
}

template <typename T, typename index_t>
__global__ void input_grad(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, index_t numel,
                           index_t c_total, index_t hw, bool channels_last, const float* __restrict__ mean,
                           const float* __restrict__ scale, const float* __restrict__ shift, bool relu,
                           const float* __restrict__ k1, const float* __restrict__ k2,
                           const float* __restrict__ k3) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t c = channel_of(i, c_total, hw, channels_last);
    const float xv = load_f(x, i);
    const float g = relu_grad(load_f(dy, i), xv, scale[c], shift[c], relu);
    store_f(dx, i, g * k1[c] + (xv - mean[c]) * k2[c] + k3[c]);
  }
}

int elementwise_blocks(int64_t numel) {
  // The SM count per device, asked once: two launches per layer and step would otherwise
  // query the driver each time. (An index past 63 shares a slot: only the grid size depends on it.)
  static int sm_count[64] = {0};
  int device = 0;
  cudaGetDevice(&device);
  int& sms = sm_count[device & 63];
  if (sms == 0) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t want = (numel + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sms) * 8)));
}

// Calls f with a value of the index type the elementwise passes use: 32-bit indices (cheaper
// division by C and H * W) below 2^31 elements, 64-bit above.
template <typename F>
void with_index_type(int64_t numel, F&& f) {
  if (numel < (int64_t{1} << 31)) {
    f(uint32_t{0});
  } else {
    f(int64_t{0});
  }
}

// Channels_last reductions: one block per run of rows and per 32 channels.
dim3 cl_grid(const BatchNormShape& s, int64_t blocks) {
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>((s.c + kChannelsPerTile - 1) / kChannelsPerTile));
}

template <typename T>
cudaError_t forward(const T* x, const BatchNormShape& s, const float* weight, const float* bias, float* running_mean,
                    float* running_var, double momentum, double eps, bool relu, T* y, float* mean, float* invstd,
                    float* ws, cudaStream_t stream) {
  const int64_t blocks = blocks_of(s), m = s.n * s.hw, numel = m * s.c, rows = rows_per_block(s);
  float* p_mean = ws;
  float* p_m2 = ws + blocks * s.c;
  float* scale = p_m2 + blocks * s.c;
  float* shift = scale + s.c;
  if (s.channels_last) {
    const dim3 grid = cl_grid(s, blocks);
    moments_cl<T><<<grid, dim3(kChannelsPerTile, kRowLanes), 0, stream>>>(x, m, s.c, rows, p_mean, p_m2);
  } else {
    moments_nchw<T><<<dim3(static_cast<unsigned>(s.n), static_cast<unsigned>(s.c)), kPlaneThreads, 0, stream>>>(
        x, s.c, s.hw, p_mean, p_m2);
  }
  finalize_moments<<<static_cast<unsigned>((s.c + 127) / 128), 128, 0, stream>>>(
      p_mean, p_m2, blocks, s.c, m, rows, s.channels_last, weight, bias, running_mean, running_var, momentum, eps,
      mean, invstd, scale, shift);
  with_index_type(numel, [&](auto index) {
    using I = decltype(index);
    normalise<T, I><<<elementwise_blocks(numel), kElementwiseThreads, 0, stream>>>(
        x, y, static_cast<I>(numel), static_cast<I>(s.c), static_cast<I>(s.hw), s.channels_last, scale, shift, relu);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const T* dy, const T* x, const BatchNormShape& s, const float* weight, const float* bias,
                     const float* mean, const float* invstd, bool relu, T* dx, float* dweight, float* dbias,
                     float* ws, cudaStream_t stream) {
  const int64_t blocks = blocks_of(s), m = s.n * s.hw, numel = m * s.c, rows = rows_per_block(s);
  float* p_g = ws;
  float* p_gx = ws + blocks * s.c;
  float* scale = p_gx + blocks * s.c;
  float* shift = scale + s.c;
  float* k1 = shift + s.c;
  float* k2 = k1 + s.c;
  float* k3 = k2 + s.c;
  const unsigned cgrid = static_cast<unsigned>((s.c + 127) / 128);
  affine_of<<<cgrid, 128, 0, stream>>>(weight, bias, mean, invstd, s.c, scale, shift);
  if (s.channels_last) {
    const dim3 grid = cl_grid(s, blocks);
    grad_sums_cl<T><<<grid, dim3(kChannelsPerTile, kRowLanes), 0, stream>>>(dy, x, m, s.c, rows, mean, scale, shift,
                                                                            relu, p_g, p_gx);
  } else {
    grad_sums_nchw<T><<<dim3(static_cast<unsigned>(s.n), static_cast<unsigned>(s.c)), kPlaneThreads, 0, stream>>>(
        dy, x, s.c, s.hw, mean, scale, shift, relu, p_g, p_gx);
  }
  finalize_grad<<<cgrid, 128, 0, stream>>>(p_g, p_gx, blocks, s.c, m, weight, invstd, dweight, dbias, k1, k2, k3);
  with_index_type(numel, [&](auto index) {
    using I = decltype(index);
    input_grad<T, I><<<elementwise_blocks(numel), kElementwiseThreads, 0, stream>>>(
        dy, x, dx, static_cast<I>(numel), static_cast<I>(s.c), static_cast<I>(s.hw), s.channels_last, mean, scale,
        shift, relu, k1, k2, k3);
  });
  return cudaGetLastError();
}

}  // namespace

int64_t batch_norm_relu_workspace(const BatchNormShape& s) { return 2 * blocks_of(s) * s.c + 5 * s.c; }

cudaError_t launch_batch_norm_relu(const void* x, int type, const BatchNormShape& s, const float* weight,
                                   const float* bias, float* running_mean, float* running_var, double momentum,
                                   double eps, bool relu, void* y, float* mean, float* invstd, float* workspace,
                                   cudaStream_t stream) {
  // Grid limits: channel tiles (channels_last) or channels (NCHW) on the grid's y axis.
  if (s.n * s.hw < 2 || s.c < 1 || s.c > 65535LL * kChannelsPerTile) return cudaErrorInvalidValue;
  if (!s.channels_last && (s.n > 2147483647LL || s.c > 65535)) return cudaErrorInvalidValue;
  if (type == kBatchNormBFloat16) {
    return forward(static_cast<const __nv_bfloat16*>(x), s, weight, bias, running_mean, running_var, momentum, eps,
                   relu, static_cast<__nv_bfloat16*>(y), mean, invstd, workspace, stream);
  }
  return forward(static_cast<const float*>(x), s, weight, bias, running_mean, running_var, momentum, eps, relu,
                 static_cast<float*>(y), mean, invstd, workspace, stream);
}

cudaError_t launch_batch_norm_relu_backward(const void* dy, const void* x, int type, const BatchNormShape& s,
                                            const float* weight, const float* bias, const float* mean,
                                            const float* invstd, bool relu, void* dx, float* dweight, float* dbias,
                                            float* workspace, cudaStream_t stream) {
  if (s.n * s.hw < 2 || s.c < 1 || s.c > 65535LL * kChannelsPerTile) return cudaErrorInvalidValue;
  if (!s.channels_last && (s.n > 2147483647LL || s.c > 65535)) return cudaErrorInvalidValue;
  if (type == kBatchNormBFloat16) {
    return backward(static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(x), s, weight, bias,
                    mean, invstd, relu, static_cast<__nv_bfloat16*>(dx), dweight, dbias, workspace, stream);
  }
  return backward(static_cast<const float*>(dy), static_cast<const float*>(x), s, weight, bias, mean, invstd, relu,
                  static_cast<float*>(dx), dweight, dbias, workspace, stream);
}

}  // namespace cuda
}  // namespace fastunlearn
