// boundary_step on CPU: one fused pass of the perturbed sign-gradient step (reference.py).
//
// The tensor is walked in memory order in blocks of kBlock elements. Per block, a short
// scalar loop fills the per-element channel scale (1/std) and the logical NCHW counter
// (so channels_last gives the same draws as contiguous), then branch-free loops over
// plain arrays do the Philox draw, the noise transform and the step; those loops
// auto-vectorise. Blocks are spread over threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "boundary_step_args.h"
#include "philox.h"

namespace fastunlearn {
namespace {

constexpr int64_t kBlock = 512;
constexpr int64_t kGrain = 32 * kBlock;  // elements per task: below this, threads cost more than they save

// Block conversions between the storage dtype and float. bf16 goes through raw bits
// (the loops vectorise); fp16 uses the F16C instructions where the build enables them.
inline void load_block(const c10::BFloat16* src, float* __restrict__ dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t k = 0; k < n; ++k) dst[k] = philox::bits_float(static_cast<uint32_t>(s[k]) << 16);
}
inline void store_block(const float* __restrict__ src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t b = philox::float_bits(src[k]);
    // Round to nearest even, as c10::BFloat16 does; NaN stays a quiet NaN.
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    d[k] = static_cast<uint16_t>(src[k] != src[k] ? 0x7FC0u : rounded);
  }
}
inline void load_block(const c10::Half* src, float* __restrict__ dst, int64_t n) {
  int64_t k = 0;
#if defined(__F16C__)
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
#endif
  for (; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}
inline void store_block(const float* __restrict__ src, c10::Half* dst, int64_t n) {
  int64_t k = 0;
#if defined(__F16C__)
  for (; k + 8 <= n; k += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; k < n; ++k) dst[k] = c10::Half(src[k]);
}

using Params = BoundaryStepParams;

#if defined(__AVX2__)
// 8 lanes of the 32x32 -> 64-bit products of a and m: high and low words.
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                      // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

inline __m256 uniform8(__m256i x) {
  const __m256i odd = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(x, 9), 1), _mm256_set1_epi32(1));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(odd), _mm256_set1_ps(5.9604644775390625e-8f));
}
#endif

// Philox words 0 (and 1 when u2 is given) of counters (c0[k], c1[k]) as uniforms. The
// compiler's vectorisation of philox_2of4 widens every lane to 64 bits; hand-written
// AVX2 keeps 8 lanes per register, the faster path (bench/bench_boundary_step.py measures
// the op, bench/RESULTS.md keeps the figures). Same bits either way.
void philox_uniforms(const uint32_t* c0, const uint32_t* c1, int64_t n, uint32_t k0, uint32_t k1, float* u1,
                     float* u2) {
  using namespace philox;
  int64_t k = 0;
#if defined(__AVX2__)
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0)), m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  for (; k + 8 <= n; k += 8) {
    __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + k));
    __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + k));
    __m256i x2 = _mm256_setzero_si256(), x3 = _mm256_setzero_si256();
    uint32_t a = k0, b = k1;
    for (int r = 0; r < kRounds; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(x0, m0, hi0, lo0);
      mulhilo8(x2, m1, hi1, lo1);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(a)));
      x1 = lo1;
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(b)));
      x3 = lo0;
      a += kW0;
      b += kW1;
    }
    _mm256_storeu_ps(u1 + k, uniform8(x0));
    if (u2) _mm256_storeu_ps(u2 + k, uniform8(x1));
  }
#endif
  for (; k < n; ++k) {
    const Out2 o = philox_2of4(c0[k], c1[k], k0, k1);
    u1[k] = uniform_from_bits(o.x0);
    if (u2) u2[k] = uniform_from_bits(o.x1);
  }
}

// Noise for the logical counters ctr[0..n): counter words, Philox uniforms, then one
// transform loop per kind. c0 / c1 are scratch arrays of n words.
void fill_noise(const Params& p, const uint64_t* ctr, int64_t n, float* z, float* u2buf, uint32_t* c0,
                uint32_t* c1) {
  using namespace philox;
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t c = ctr[k] + p.offset;
    c0[k] = static_cast<uint32_t>(c);
    c1[k] = static_cast<uint32_t>(c >> 32);
  }
  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  philox_uniforms(c0, c1, n, k0, k1, z, p.noise == kNormal ? u2buf : nullptr);
  switch (p.noise) {
    case kNormal:
      for (int64_t k = 0; k < n; ++k) z[k] = normal_from(z[k], u2buf[k]);
      break;
    case kLaplace:
      for (int64_t k = 0; k < n; ++k) z[k] = laplace_from(z[k]);
      break;
    case kCauchy:
      for (int64_t k = 0; k < n; ++k) z[k] = cauchy_from(z[k]);
      break;
    default:
      for (int64_t k = 0; k < n; ++k) z[k] = uniform_pm1_from(z[k]);
      break;
  }
}

// Per-element channel scale and logical counter for memory positions [m0, m0 + n).
// Counters are only needed with noise, scales only with std.
void fill_index(const Params& p, int64_t m0, int64_t n, float* scale, uint64_t* ctr) {
  const bool want_ctr = p.has_noise, want_scale = p.inv_std != nullptr;
  if (!p.channels_last) {
    if (want_ctr)
      for (int64_t k = 0; k < n; ++k) ctr[k] = static_cast<uint64_t>(m0 + k);
    if (want_scale) {
      int64_t c = (m0 / p.HW) % p.C, pos = m0 % p.HW;
      for (int64_t k = 0; k < n;) {
        const int64_t run = std::min(n - k, p.HW - pos);
        const float s = p.inv_std[c];
        for (int64_t j = 0; j < run; ++j) scale[k + j] = s;
        k += run;
        pos = 0;
        c = (c + 1 == p.C) ? 0 : c + 1;
      }
    }
    return;
  }
  // channels_last memory position m = (n * HW + hw) * C + c has logical index
  // (n * C + c) * HW + hw.
  int64_t c = m0 % p.C;
  const int64_t pix = m0 / p.C;
  int64_t hw = pix % p.HW;
  int64_t base = (pix / p.HW) * p.C * p.HW;  // logical index of (n, 0, 0)
  for (int64_t k = 0; k < n; ++k) {
    if (want_ctr) ctr[k] = static_cast<uint64_t>(base + c * p.HW + hw);
    if (want_scale) scale[k] = p.inv_std[c];
    if (++c == p.C) {
      c = 0;
      if (++hw == p.HW) {
        hw = 0;
        base += p.C * p.HW;
      }
    }
  }
}

using philox::sel;

// floorf/ceilf that vectorise: GCC keeps the libm-exact builtins scalar unless
// -fno-trapping-math. Exact for every float: beyond 2^23 (and for inf/NaN) x is returned
// as is, and x is converted to int only when it fits.
inline float floor_f(float x) {
  const float ax = sel(x < 0.0f, -x, x);
  const bool small = ax < 8388608.0f;
  const float xs = sel(small, x, 0.0f);
  float t = static_cast<float>(static_cast<int32_t>(xs));  // rounds toward zero
  t = t - sel(t > xs, 1.0f, 0.0f);
  return sel(small, t, x);
}
inline float ceil_f(float x) { return -floor_f(-x); }

template <bool Q>
void step_block(const Params& p, const float* __restrict__ u, const float* __restrict__ u0,
                const float* __restrict__ g, const float* __restrict__ scale, const float* __restrict__ z,
                float* __restrict__ out, int64_t n) {
  const float eps = p.eps, alpha = p.alpha, lam = p.lamda, gamma = p.gamma, q = p.q;
  for (int64_t k = 0; k < n; ++k) {
    const float uf = u[k], u0f = u0[k];
    const float d = g[k] * scale[k] - lam * (uf - u0f) + gamma * z[k];
    // sign(d), with NaN passed through like torch.sign so a broken gradient shows up.
    const float sg = sel(d > 0.0f, 1.0f, sel(d < 0.0f, -1.0f, d));
    float v = uf + alpha * sg;
    float lo = u0f - eps, hi = u0f + eps;
    lo = sel(lo < 0.0f, 0.0f, lo);
    hi = sel(hi > 1.0f, 1.0f, hi);
    if (Q) {
      lo = ceil_f(lo * q - 1e-4f) / q;
      hi = floor_f(hi * q + 1e-4f) / q;
      v = floor_f(v * q + 0.5f) / q;
    }
    // Comparisons written so a NaN v survives, as torch.maximum/minimum propagate it.
    v = sel(v < lo, lo, v);
    v = sel(v > hi, hi, v);
    out[k] = v;
  }
}

inline void step_f32(const Params& p, const float* u, const float* u0, const float* g, const float* scale,
                     const float* z, float* out, int64_t n) {
  if (p.quantize)
    step_block<true>(p, u, u0, g, scale, z, out, n);
  else
    step_block<false>(p, u, u0, g, scale, z, out, n);
}

inline void step(const Params& p, const float* u, const float* u0, const float* g, const float* scale,
                 const float* z, float* out, int64_t n, float* /*stage*/) {
  step_f32(p, u, u0, g, scale, z, out, n);
}

// 16-bit storage: widen the block into float staging arrays, step, narrow.
template <typename T>
void step(const Params& p, const T* u, const T* u0, const T* g, const float* scale, const float* z, T* out,
          int64_t n, float* stage) {
  float* uf = stage;
  float* u0f = stage + kBlock;
  float* gf = stage + 2 * kBlock;
  float* of = stage + 3 * kBlock;
  load_block(u, uf, n);
  load_block(u0, u0f, n);
  load_block(g, gf, n);
  step_f32(p, uf, u0f, gf, scale, z, of, n);
  store_block(of, out, n);
}

template <typename T>
void run(const Params& p, const T* u, const T* u0, const T* g, T* out, int64_t numel) {
  const int64_t nblocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, kGrain / kBlock, [&](int64_t b0, int64_t b1) {
    alignas(64) float scale[kBlock];
    alignas(64) float z[kBlock];
    alignas(64) float tmp[kBlock];
    alignas(64) uint64_t ctr[kBlock];
    alignas(64) float stage[4 * kBlock];
    alignas(64) uint32_t c0[kBlock];
    alignas(64) uint32_t c1[kBlock];
    if (!p.inv_std) std::fill(scale, scale + kBlock, 1.0f);
    if (!p.has_noise) std::fill(z, z + kBlock, 0.0f);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * kBlock;
      const int64_t n = std::min(kBlock, numel - m0);
      fill_index(p, m0, n, scale, ctr);
      if (p.has_noise) fill_noise(p, ctr, n, z, tmp, c0, c1);
      step(p, u + m0, u0 + m0, g + m0, scale, z, out + m0, n, stage);
    }
  });
}

at::Tensor boundary_step_cpu(const at::Tensor& u, const at::Tensor& u0, const at::Tensor& grad, double eps,
                             double alpha, double lamda, double gamma, int64_t noise, int64_t quantize,
                             int64_t seed, int64_t offset, const std::optional<at::Tensor>& mean,
                             const std::optional<at::Tensor>& std) {
  const BoundaryStepCall call =
      prepare_boundary_step(u, u0, grad, eps, alpha, lamda, gamma, noise, quantize, seed, offset, mean, std, at::kCPU);
  const Params& p = call.p;
  const at::Tensor &uc = call.u, &u0c = call.u0, &gc = call.grad, &out = call.out;
  const int64_t numel = p.numel;
  if (numel == 0) return out;

  switch (uc.scalar_type()) {
    case at::kFloat:
      run<float>(p, uc.data_ptr<float>(), u0c.data_ptr<float>(), gc.data_ptr<float>(), out.data_ptr<float>(), numel);
      break;
    case at::kBFloat16:
      run<c10::BFloat16>(p, uc.data_ptr<c10::BFloat16>(), u0c.data_ptr<c10::BFloat16>(),
                         gc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), numel);
      break;
    default:
      run<c10::Half>(p, uc.data_ptr<c10::Half>(), u0c.data_ptr<c10::Half>(), gc.data_ptr<c10::Half>(),
                     out.data_ptr<c10::Half>(), numel);
      break;
  }
  return out;
}

}  // namespace
}  // namespace fastunlearn

TORCH_LIBRARY_IMPL(fastunlearn, CPU, m) { m.impl("boundary_step", &fastunlearn::boundary_step_cpu); }
