// relabel_check kernels. A row is handled by one warp (small K, several rows per
// block) or by a whole block (large K). Per row:
//   pass 1: max and its first index, the max over classes != y and its first index, and
//           the online sum of exp(x - running max), all in one read of the row;
//   top-k:  k - 1 further passes, each the best element strictly after the previous
//           pick in (logit desc, index asc) order, so nothing has to be stored;
//   write:  targets / dlogits from a last read of the row.
// Ties break to the lowest index, as torch.argmax does. Softmax is stable (x - max)
// in float32 with the accurate expf: __expf loses digits for large |x - max|.
#include "cuda/relabel_check.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace fastunlearn {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float load_f(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(p[0]); }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(p[0]); }

// (value, index) pairs: larger value wins, equal values go to the lower index. The
// empty pair (-inf, INT_MAX) loses to every real element, -inf ones included, which
// keeps torch.argmax's answer for rows of -inf.
struct Pick {
  float v;
  int i;
};

__device__ __forceinline__ void take_better(Pick& a, float v, int i) {
  if (v > a.v || (v == a.v && i < a.i)) {
    a.v = v;
    a.i = i;
  }
}

__device__ __forceinline__ Pick warp_best(Pick a) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const float v = __shfl_xor_sync(kFull, a.v, off);
    const int i = __shfl_xor_sync(kFull, a.i, off);
    take_better(a, v, i);
  }
  return a;
}

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) s += __shfl_xor_sync(kFull, s, off);
  return s;
}

// Shared scratch of a block-per-row launch; unused with one warp per row.
template <int NW>
struct Scratch {
  float v[NW];
  int i[NW];
};

// Best pair over the row's group (NW warps), returned to every thread of the group.
template <int NW>
__device__ __forceinline__ Pick group_best(Pick a, Scratch<NW>* sh) {
  a = warp_best(a);
  if constexpr (NW > 1) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    __syncthreads();  // the previous reduction has finished reading sh
    if (lane == 0) {
      sh->v[warp] = a.v;
      sh->i[warp] = a.i;
    }
    __syncthreads();
    a = Pick{-INFINITY, INT_MAX};
    // Every warp folds the NW partials itself: no second broadcast round needed.
#pragma unroll
    for (int w = 0; w < NW; ++w) take_better(a, sh->v[w], sh->i[w]);
  }
  return a;
}

template <int NW>
__device__ __forceinline__ float group_sum(float s, Scratch<NW>* sh) {
  s = warp_sum(s);
  if constexpr (NW > 1) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    __syncthreads();
    if (lane == 0) sh->v[warp] = s;
    __syncthreads();
    s = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; ++w) s += sh->v[w];
  }
  return s;
}

// exp(v - m) with exp(-inf - (-inf)) taken as 0 instead of NaN.
__device__ __forceinline__ float exp_shift(float v, float m) { return v == -INFINITY ? 0.0f : expf(v - m); }

// NW warps per row. With NW == 1 a block of ROWS warps handles ROWS rows; otherwise a
// block of NW warps handles one row.
template <typename T, int NW, int ROWS>
__global__ void __launch_bounds__(kWarp * NW * ROWS)
    relabel_check_kernel(const T* __restrict__ logits, const int64_t* __restrict__ y, int64_t n, int k,
                         int mode, int kk, bool want_grad, int64_t* __restrict__ relabel,
                         bool* __restrict__ success, float* __restrict__ margin, float* __restrict__ targets,
                         float* __restrict__ dlogits) {
  static_assert(NW == 1 || ROWS == 1, "a row spans several warps or a block holds several rows, not both");
  __shared__ Scratch<NW> scratch_storage;
  Scratch<NW>* sh = &scratch_storage;
  constexpr int kThreads = kWarp * NW;
  const int t = NW == 1 ? threadIdx.x % kWarp : threadIdx.x;
  const int64_t row = NW == 1 ? static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / kWarp
                              : static_cast<int64_t>(blockIdx.x);
  // A warp-per-row block may run past n; whole warps leave together, so the shuffles
  // of the remaining warps stay complete.
  if (row >= n) return;

  const T* x = logits + row * static_cast<int64_t>(k);
  const int64_t y64 = y[row];
  const bool y_ok = y64 >= 0 && y64 < k;
  const int yr = y_ok ? static_cast<int>(y64) : -1;
  const bool want_probs = mode >= kSoft || want_grad;

  // Pass 1.
  Pick best{-INFINITY, INT_MAX}, other{-INFINITY, INT_MAX};
  float m_run = -INFINITY, s_run = 0.0f;  // this thread's running max and sum exp(x - m_run)
  for (int j = t; j < k; j += kThreads) {
    const float v = load_f(x + j);
    take_better(best, v, j);
    take_better(other, j == yr ? -INFINITY : v, j);
    if (want_probs) {
      if (v > m_run) {
        s_run = (m_run == -INFINITY ? 0.0f : s_run * expf(m_run - v)) + 1.0f;
        m_run = v;
      } else {
        s_run += exp_shift(v, m_run);
      }
    }
  }
  best = group_best<NW>(best, sh);
  other = group_best<NW>(other, sh);
  const float m = best.v;
  if (t == 0) {
    relabel[row] = mode == kNearestIncorrect ? other.i : best.i;
    success[row] = best.i != yr;
    margin[row] = y_ok ? load_f(x + yr) - other.v : NAN;
  }
  if (!want_probs) return;

  const float s = group_sum<NW>(m_run == -INFINITY ? 0.0f : s_run * expf(m_run - m), sh);
  const float inv_s = 1.0f / s;

  // Top-k: membership is "at or before the kk-th pick" in (value desc, index asc).
  Pick last{-INFINITY, INT_MAX};
  float inv_sel = inv_s;
  if (mode == kTopk && kk < k) {
    last = best;
    float sel = 1.0f;  // exp(m - m) of the first pick, the row max
    for (int p = 1; p < kk; ++p) {
      Pick cand{-INFINITY, INT_MAX};
      for (int j = t; j < k; j += kThreads) {
        const float v = load_f(x + j);
        if (v < last.v || (v == last.v && j > last.i)) take_better(cand, v, j);
      }
      last = group_best<NW>(cand, sh);
      sel += exp_shift(last.v, m);
    }
    inv_sel = 1.0f / sel;
  }

  float* trow = mode >= kSoft ? targets + row * static_cast<int64_t>(k) : nullptr;
  float* grow = want_grad ? dlogits + row * static_cast<int64_t>(k) : nullptr;
  float e_other = 0.0f;  // this thread's share of sum_{j != y} exp(x_j - m)
  for (int j = t; j < k; j += kThreads) {
    const float v = load_f(x + j);
    const float e = exp_shift(v, m);
    const float p = e * inv_s;
    if (mode == kSoft) {
      trow[j] = p;
    } else if (mode == kTopk) {
      const bool in = v > last.v || (v == last.v && j <= last.i);
      trow[j] = in ? e * inv_sel : 0.0f;
    }
    if (want_grad && j != yr) {
      grow[j] = p;
      e_other += e;
    }
  }
  if (want_grad) {
    // y's entry is -(sum of the other probabilities), summed directly: p_y - 1 in float
    // keeps no correct digit once p_y is within an ulp of 1.
    const float s_other = group_sum<NW>(e_other, sh);
    if (t == 0 && y_ok) {
      // Below one half, p_y - 1 does not cancel and is the more accurate of the two.
      const float p_y = exp_shift(load_f(x + yr), m) * inv_s;
      grow[yr] = p_y < 0.5f ? p_y - 1.0f : -s_other * inv_s;
    }
  }
}

template <typename T>
cudaError_t launch_typed(const T* logits, const int64_t* y, int64_t n, int k, int mode, int kk, bool want_grad,
                         int64_t* relabel, bool* success, float* margin, float* targets, float* dlogits,
                         cudaStream_t stream) {
  // Small rows: a warp per row keeps lanes busy; large rows: a block per row gives each
  // row enough threads to stream it at bandwidth.
  if (k <= 1024) {
    constexpr int kRows = 8;
    const int64_t blocks = (n + kRows - 1) / kRows;
    relabel_check_kernel<T, 1, kRows><<<static_cast<unsigned>(blocks), kWarp * kRows, 0, stream>>>(
        logits, y, n, k, mode, kk, want_grad, relabel, success, margin, targets, dlogits);
  } else if (k <= 8192) {
    relabel_check_kernel<T, 8, 1><<<static_cast<unsigned>(n), kWarp * 8, 0, stream>>>(
        logits, y, n, k, mode, kk, want_grad, relabel, success, margin, targets, dlogits);
  } else {
    relabel_check_kernel<T, 16, 1><<<static_cast<unsigned>(n), kWarp * 16, 0, stream>>>(
        logits, y, n, k, mode, kk, want_grad, relabel, success, margin, targets, dlogits);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_relabel_check(const void* logits, int logits_type, const int64_t* y, int64_t n, int64_t k,
                                 int mode, int64_t topk, bool want_grad, int64_t* relabel, bool* success,
                                 float* margin, float* targets, float* dlogits, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (k < 1 || k >= INT_MAX || n >= INT_MAX || mode < kArgmax || mode > kTopk || (mode == kTopk && topk < 1) ||
      (mode >= kSoft && targets == nullptr) || (want_grad && dlogits == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int kk = static_cast<int>(topk < k ? topk : k);
  const int ki = static_cast<int>(k);
  switch (logits_type) {
    case kRelabelFloat32:
      return launch_typed(static_cast<const float*>(logits), y, n, ki, mode, kk, want_grad, relabel, success, margin,
                          targets, dlogits, stream);
    case kRelabelBFloat16:
      return launch_typed(static_cast<const __nv_bfloat16*>(logits), y, n, ki, mode, kk, want_grad, relabel,
                          success, margin, targets, dlogits, stream);
    case kRelabelFloat16:
      return launch_typed(static_cast<const __half*>(logits), y, n, ki, mode, kk, want_grad, relabel, success,
                          margin, targets, dlogits, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastunlearn
