// relabel_check on CPU: one pass family per row, rows spread over threads.
//
// Semantics are those of reference.relabel_check (python/fastunlearn/reference.py):
// argmax and the best class other than y break ties to the lowest index (like
// torch.argmax), softmax is computed stably in float32, and top-k selection orders by
// (logit descending, index ascending), i.e. a stable descending sort of the logits.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "relabel_check_args.h"

namespace fastunlearn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kSumChunk = 256;

// exp(x) for x <= 0 (the only range softmax needs once the row max is subtracted).
// Cephes-style: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r and
// 2^n built in the exponent bits; within 1 ulp of expf. Written without calls or float
// compares so that the loops calling it vectorise: libm's expf does not, and under
// GCC's default -ftrapping-math neither does a loop with a float clamp.
static inline float exp_nonpos(float x) {
  // Clamp at -88 on the bit pattern: for floats <= 0 the unsigned order follows the
  // magnitude, so this also maps -inf to -88. At n = -127 the scale below is exactly 0,
  // which flushes results under about 1e-38 (expf gives denormals there) and -inf to 0.
  uint32_t ux;
  std::memcpy(&ux, &x, sizeof(ux));
  ux = std::min(ux, 0xC2B00000u);  // -88.0f
  float xc;
  std::memcpy(&xc, &ux, sizeof(xc));
  // Round to nearest by the 1.5 * 2^23 trick: nearbyint would block vectorisation.
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;  // ln2 split in two so n * ln2 is exact enough
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Max over x[lo, hi); -inf for an empty range.
static inline float range_max(const float* x, int64_t lo, int64_t hi) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = lo; j < hi; ++j) m = std::max(m, x[j]);
  return m;
}

// Lowest index j with x[j] == v, treating x[skip] as -inf. Returns k when none.
static inline int64_t first_equal(const float* x, int64_t k, float v, int64_t skip) {
  for (int64_t j = 0; j < k; ++j) {
    const float xj = j == skip ? kNegInf : x[j];
    if (xj == v) return j;
  }
  return k;
}

struct RowTopK {
  float value;  // logit of the k-th selected element
  int64_t index;
};

// The k-th element (0 < kk < k) of the row in (logit desc, index asc) order, with a
// small sorted buffer: a block whose max does not beat the current k-th value cannot
// change the selection (later indices lose ties), so most blocks cost one vector max.
// Large k would make the insertions quadratic; there a selection finds the k-th value in
// O(K) and a scan finds which of its ties comes k-th.
static RowTopK kth_largest(const float* x, int64_t k, int64_t kk, std::vector<float>& bv,
                           std::vector<int64_t>& bi) {
  if (kk > 32) {
    bv.assign(x, x + k);
    std::nth_element(bv.begin(), bv.begin() + (kk - 1), bv.end(), std::greater<float>());
    const float kv = bv[kk - 1];
    int64_t above = 0;
#pragma omp simd reduction(+ : above)
    for (int64_t j = 0; j < k; ++j) above += x[j] > kv;
    int64_t need = kk - above;  // >= 1: the ties at kv taken, lowest index first
    for (int64_t j = 0; j < k; ++j) {
      if (x[j] == kv && --need == 0) return {kv, j};
    }
    return {kv, k - 1};  // unreachable for NaN-free rows
  }
  bv.assign(kk, kNegInf);
  bi.assign(kk, -1);
  int64_t filled = 0;
  constexpr int64_t kBlock = 64;
  for (int64_t lo = 0; lo < k; lo += kBlock) {
    const int64_t hi = std::min(k, lo + kBlock);
    if (filled == kk && range_max(x, lo, hi) <= bv[kk - 1]) continue;
    for (int64_t j = lo; j < hi; ++j) {
      const float v = x[j];
      if (filled == kk && !(v > bv[kk - 1])) continue;
      // Insert after every entry with a value >= v: earlier indices win ties.
      int64_t pos = filled < kk ? filled : kk - 1;
      while (pos > 0 && v > bv[pos - 1]) {
        bv[pos] = bv[pos - 1];
        bi[pos] = bi[pos - 1];
        --pos;
      }
      bv[pos] = v;
      bi[pos] = j;
      if (filled < kk) ++filled;
    }
  }
  return {bv[kk - 1], bi[kk - 1]};
}

template <typename scalar_t>
void relabel_rows(const scalar_t* logits, const int64_t* y, int64_t begin, int64_t end, int64_t k,
                  int64_t mode, int64_t topk, bool want_grad, int64_t* relabel, bool* success,
                  float* margin, float* targets, float* dlogits) {
  const bool want_soft = mode == kSoft, want_topk = mode == kTopk;
  const bool want_probs = want_soft || want_topk || want_grad;
  const int64_t kk = std::min<int64_t>(topk, k);
  std::vector<float> row_buf;
  std::vector<float> top_v;
  std::vector<int64_t> top_i;
  if (!std::is_same<scalar_t, float>::value) row_buf.resize(k);

  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* src = logits + r * k;
    const float* x;
    if constexpr (std::is_same<scalar_t, float>::value) {
      x = src;
    } else {
      float* dst = row_buf.data();
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<float>(src[j]);
      x = dst;
    }
    const int64_t yr = y[r];

    const float m = range_max(x, 0, k);
    const int64_t top = first_equal(x, k, m, -1);
    // Max over the classes other than y, and its first index (y itself counts as -inf,
    // so an all -inf row or K == 1 gives the same index torch.argmax gives).
    const float m2 = std::max(range_max(x, 0, yr), range_max(x, yr + 1, k));
    const int64_t best_other = (top != yr && m2 == m) ? top : first_equal(x, k, m2, yr);

    relabel[r] = mode == kNearestIncorrect ? best_other : top;
    success[r] = top != yr;
    margin[r] = x[yr] - m2;
    if (!want_probs) continue;

    // e_j = exp(x_j - max) goes straight into an output row; scaling happens in place.
    float* e = want_grad ? dlogits + r * k : targets + r * k;
    // Short float partial sums folded into a double keep the error of the sum flat in K
    // (one float accumulator over 32000 terms loses about 3 digits).
    double s = 0.0;
    for (int64_t lo = 0; lo < k; lo += kSumChunk) {
      const int64_t hi = std::min(k, lo + kSumChunk);
      float part = 0.0f;
#pragma omp simd reduction(+ : part)
      for (int64_t j = lo; j < hi; ++j) {
        const float ej = exp_nonpos(x[j] - m);
        e[j] = ej;
        part += ej;
      }
      s += part;
    }
    const float inv_s = static_cast<float>(1.0 / s);

    if (want_topk) {
      float* t = targets + r * k;
      if (kk >= k) {
        // Every class is selected: the renormalised top-k target is the softmax.
        if (t != e) {
#pragma omp simd
          for (int64_t j = 0; j < k; ++j) t[j] = e[j] * inv_s;
        } else {
#pragma omp simd
          for (int64_t j = 0; j < k; ++j) t[j] *= inv_s;
        }
      } else {
        const RowTopK kth = kth_largest(x, k, kk, top_v, top_i);
        const float kv = kth.value;  // plain locals: loads through kth block vectorising
        const int64_t ki = kth.index;
        // Member of the top k: at or before the k-th element in (value desc, index asc).
        // Up to ki the members are x >= kv, after it x > kv: one compare per loop keeps
        // the loops vectorised.
        double sel = 0.0;
        for (int64_t lo = 0; lo < k; lo += kSumChunk) {
          const int64_t hi = std::min(k, lo + kSumChunk);
          const int64_t mid = std::max(lo, std::min(hi, ki + 1));
          float part = 0.0f;
#pragma omp simd reduction(+ : part)
          for (int64_t j = lo; j < mid; ++j) part += x[j] >= kv ? e[j] : 0.0f;
#pragma omp simd reduction(+ : part)
          for (int64_t j = mid; j < hi; ++j) part += x[j] > kv ? e[j] : 0.0f;
          sel += part;
        }
        const float inv_sel = static_cast<float>(1.0 / sel);
        // Split at ki as above. (GCC 13 keeps these two loops scalar: the compare becomes a
        // branch under -ftrapping-math. One pass per row, and top-k is not the hot mode.)
        const int64_t split = ki + 1;
#pragma omp simd
        for (int64_t j = 0; j < split; ++j) {
          const float v = e[j] * inv_sel;
          t[j] = v * static_cast<float>(x[j] >= kv);
        }
#pragma omp simd
        for (int64_t j = split; j < k; ++j) {
          const float v = e[j] * inv_sel;
          t[j] = v * static_cast<float>(x[j] > kv);
        }
      }
    } else if (want_soft && want_grad) {
      float* t = targets + r * k;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) t[j] = e[j] * inv_s;
    } else if (want_soft) {
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) e[j] *= inv_s;
    }
    if (want_grad) {
      float* g = dlogits + r * k;
      // y's entry is -(sum of the other probabilities), summed directly: p_y - 1 in float
      // keeps no correct digit once p_y is within an ulp of 1, and the sign pattern of the
      // input gradient of a confident sample comes from exactly those digits.
      double s_other = 0.0;
      for (int64_t lo = 0; lo < k; lo += kSumChunk) {
        const int64_t hi = std::min(k, lo + kSumChunk);
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t j = lo; j < hi; ++j) part += j == yr ? 0.0f : g[j];
        s_other += part;
      }
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) g[j] *= inv_s;
      g[yr] = static_cast<float>(-s_other / s);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relabel_check_cpu(
    const at::Tensor& logits_in, const at::Tensor& y_in, int64_t mode, int64_t topk, bool want_grad) {
  check_relabel_args(logits_in, y_in, mode, topk);
  TORCH_CHECK(logits_in.device().is_cpu() && y_in.device().is_cpu(),
              "relabel_check (CPU kernel): logits and y must be CPU tensors");
  const int64_t n = logits_in.size(0), k = logits_in.size(1);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(yp[r] >= 0 && yp[r] < k, "relabel_check: labels must lie in [0, ", k, "), got ", yp[r],
                " at row ", r);
  }

  auto [relabel, success, margin, targets, dlogits] = relabel_outputs(logits, mode, want_grad);
  if (n == 0) return {relabel, success, margin, targets, dlogits};

  int64_t* rp = relabel.data_ptr<int64_t>();
  bool* sp = success.data_ptr<bool>();
  float* mp = margin.data_ptr<float>();
  float* tp = targets.numel() ? targets.data_ptr<float>() : nullptr;
  float* gp = dlogits.numel() ? dlogits.data_ptr<float>() : nullptr;
  // About 16K logits per task so threads are not woken for tiny batches.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "relabel_check_cpu", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      relabel_rows<scalar_t>(lp, yp, begin, end, k, mode, topk, want_grad, rp, sp, mp, tp, gp);
    });
  });
  return {relabel, success, margin, targets, dlogits};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastunlearn, CPU, m) { m.impl("relabel_check", &relabel_check_cpu); }

}  // namespace fastunlearn
