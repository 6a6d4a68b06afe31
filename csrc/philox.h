// Philox 4x32-10 and the noise transforms of reference.py, for host and device code.
//
// The stream is the one reference.philox_noise defines: element i (logical NCHW
// position) of a call uses the 64-bit counter offset + i in words (c0, c1), zeros in
// (c2, c3), and the 64-bit seed as the key (k0 = low word). Output words 0 and 1 give the
// two uniforms u1, u2 = (2 * (x >> 9) + 1) * 2^-24, exact in float32 and inside (0, 1).
//
// The transforms use small branch-free polynomial kernels instead of libm:
//  * range reduction is exact because the arguments are uniforms on a 2^-24 grid, so
//    cos(2 pi u2) and tan(pi (u1 - 1/2)) get their sign and their poles right (a float32
//    2*pi*u2 alone carries ~1e-7 of argument error, enough to misplace values near zero);
//  * the same code runs on CPU (where the loops auto-vectorise; libm calls would not) and
//    on the GPU (no slow-path argument reduction).
// Accuracy is a few float32 ulps against the float64 reference.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FU_HD __host__ __device__ __forceinline__
#else
#define FU_HD inline
#endif

namespace fastunlearn {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

// Noise codes, as in the op schema.
enum Noise : int { kNormal = 0, kLaplace = 1, kCauchy = 2, kUniform = 3 };

struct Out2 {
  uint32_t x0, x1;
};

FU_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Words 0 and 1 of Philox4x32-10 for counter (c0, c1, 0, 0) and key (k0, k1). The last
// round's words 2 and 3 are not needed, so that round skips them.
FU_HD Out2 philox_2of4(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t hi0 = mulhi32(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi32(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return {c0, c1};
}

// Counter words for 64-bit counter value ctr.
FU_HD Out2 philox_at(uint64_t ctr, uint64_t seed) {
  return philox_2of4(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32),
                     static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FU_HD float uniform_from_bits(uint32_t x) {
  // (2 * (x >> 9) + 1) < 2^24, so the int -> float conversion is exact.
  return static_cast<float>(static_cast<int32_t>(((x >> 9) << 1) | 1u)) * 5.9604644775390625e-8f;
}

// ---------------------------------------------------------------- float kernels
FU_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_int(f));
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FU_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(static_cast<int>(u));
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// c ? a : b. On the host it is a bit blend: both values are then always computed, which
// keeps the compiler from sinking a float operation into a branch that it may not
// if-convert (float ops may raise exceptions), so the loops stay vectorisable.
FU_HD float sel(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_float((float_bits(a) & m) | (float_bits(b) & ~m));
#endif
}

// Natural log of a positive, normal, finite x (all our arguments are in [2^-24, 2]).
// Cephes logf: mantissa reduced to [sqrt(1/2), sqrt(2)), degree-9 polynomial.
FU_HD float log_pos(float x) {
  const uint32_t b = float_bits(x);
  int e = static_cast<int>(b >> 23) - 126;                 // x = m * 2^e, m in [0.5, 1)
  float m = bits_float((b & 0x007FFFFFu) | 0x3F000000u);
  const bool small = m < 0.70710678118654752440f;
  e = small ? e - 1 : e;
  m = (m + sel(small, m, 0.0f)) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

// sqrt of a positive normal float. On the host it is a Newton iteration instead of
// sqrtf, whose errno path would stop the loops from vectorising.
FU_HD float sqrt_pos(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  // 1/sqrt(x): bit-level first guess (~3.5% off), three Newton steps (~1e-11 off).
  float y = bits_float(0x5F3759DFu - (float_bits(x) >> 1));
  const float hx = 0.5f * x;
  y = y * (1.5f - hx * y * y);
  y = y * (1.5f - hx * y * y);
  y = y * (1.5f - hx * y * y);
  // x * y is within a couple of ulps of sqrt(x); one Heron correction rounds it in.
  const float s = x * y;
  return s + 0.5f * y * (x - s * s);
#endif
}

// sin(pi t), cos(pi t) for |t| <= 1/4 (Cephes sinf/cosf polynomials on |x| <= pi/4).
FU_HD float sinpi_small(float t) {
  const float x = t * 3.14159265358979323846f;
  const float z = x * x;
  float p = -1.9515295891e-4f;
  p = p * z + 8.3321608736e-3f;
  p = p * z - 1.6666654611e-1f;
  return x + x * z * p;
}

FU_HD float cospi_small(float t) {
  const float x = t * 3.14159265358979323846f;
  const float z = x * x;
  float p = 2.443315711809948e-5f;
  p = p * z - 1.388731625493765e-3f;
  p = p * z + 4.166664568298827e-2f;
  return 1.0f - 0.5f * z + z * z * p;
}

// ---------------------------------------------------------------- noise transforms
// Box-Muller: sqrt(-2 log u1) * cos(2 pi u2).
FU_HD float normal_from(float u1, float u2) {
  const float r = sqrt_pos(-2.0f * log_pos(u1));
  // cos(2 pi u2) = cos(2 pi a), a = |u2 - round(u2)| in [0, 1/2], every step exact.
  const float flip = 1.0f - u2;
  const float a = sel(u2 > 0.5f, flip, u2);
  // a in [0, 1/8]: cos(2 pi a); (1/8, 3/8]: -sin(2 pi (a - 1/4)); (3/8, 1/2]: -cos(2 pi (1/2 - a)).
  const bool lo = a <= 0.125f, hi = a > 0.375f;
  const float t_mid = a - 0.25f, t_hi = 0.5f - a;
  const float t = sel(lo, a, sel(hi, t_hi, t_mid));  // |t| <= 1/8, exact
  const float c = cospi_small(2.0f * t);
  const float s = sinpi_small(2.0f * t);
  const float nc = -c, ns = -s;
  const float cw = sel(lo, c, sel(hi, nc, ns));
  return r * cw;
}

// -sign(v) * log1p(-2|v|), v = u1 - 1/2. 1 - 2|v| = 2 min(u1, 1 - u1) is exact, so a
// plain log of it equals log1p(-2|v|) without the cancellation log1p exists to avoid.
FU_HD float laplace_from(float u1) {
  const float flip = 1.0f - u1;
  const float w = 2.0f * sel(u1 < 0.5f, u1, flip);
  const float l = log_pos(w);
  const float nl = -l;
  return sel(u1 < 0.5f, l, nl);  // u1 is never exactly 1/2
}

// tan(pi (u1 - 1/2)). With a = |u1 - 1/2| (exact): a <= 1/4 gives sin/cos of pi a,
// a > 1/4 gives cos/sin of pi (1/2 - a), whose argument is exact, so values near the
// poles keep their full accuracy.
FU_HD float cauchy_from(float u1) {
  const float v = u1 - 0.5f;
  const float nv = -v;
  const float a = sel(v < 0.0f, nv, v);
  const bool near = a <= 0.25f;
  const float far_t = 0.5f - a;
  const float t = sel(near, a, far_t);
  const float s = sinpi_small(t), c = cospi_small(t);
  const float m = sel(near, s, c) / sel(near, c, s);
  const float nm = -m;
  return sel(v < 0.0f, nm, m);
}

FU_HD float uniform_pm1_from(float u1) { return 2.0f * u1 - 1.0f; }

// Noise value z for 64-bit counter ctr, kind in Noise.
FU_HD float noise_at(uint64_t ctr, uint64_t seed, int kind) {
  const Out2 o = philox_at(ctr, seed);
  const float u1 = uniform_from_bits(o.x0);
  switch (kind) {
    case kNormal:
      return normal_from(u1, uniform_from_bits(o.x1));
    case kLaplace:
      return laplace_from(u1);
    case kCauchy:
      return cauchy_from(u1);
    default:
      return uniform_pm1_from(u1);
  }
}

}  // namespace philox
}  // namespace fastunlearn
