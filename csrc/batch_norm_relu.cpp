// batch_norm_relu on CPU: a training-mode BatchNorm2d, optionally followed by a ReLU, as
// one forward (statistics pass + normalise-and-clip pass) and one backward (reduction pass
// + input-gradient pass).
//
// Semantics are those of reference.batch_norm_relu (python/fastunlearn/reference.py):
// biased batch variance for normalising, unbiased for the running variance, the ReLU's
// gradient taken where the normalised output is > 0.
//
// Why it exists: in a CPU train step, PyTorch's BatchNorm (and the ReLU and its backward as
// separate passes) can cost more than the convolutions at few channels, most of all in
// channels_last, the layout oneDNN's convolutions want (bench/bench_batch_norm_relu.py
// measures it; see bench/RESULTS.md).
//
// Determinism: the rows are cut into fixed blocks whose partial sums are combined in block
// order in double, so the results do not depend on the number of threads.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "batch_norm_stats.h"

namespace fastunlearn {
namespace {

// Rows (channels_last) per block: a block of 64 rows x C channels is 24 KB at C = 96 in
// bf16, so its second pass reads from L1/L2.
constexpr int64_t kRowsPerBlock = 64;

inline float load(float v) { return v; }
inline float load(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline void store(float f, float* out) { *out = f; }
// Round to nearest even, NaN kept a (quiet) NaN; written without branches so loops vectorise.
inline void store(float f, c10::BFloat16* out) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  const uint32_t bits = (f != f) ? 0x7FC00000u : rounded;
  out->x = static_cast<uint16_t>(bits >> 16);
}

struct Layout {
  bool channels_last;
  int64_t n, c, hw;
  // channels_last: a block is walked in tiles of `tile` values (whole rows, at least ~128
  // values), with the per-channel vectors repeated to that length, so the inner loops stay
  // long at few channels (24 channels is a vector and a half per row).
  int64_t tile;
  int64_t blocks() const { return channels_last ? (n * hw + kRowsPerBlock - 1) / kRowsPerBlock : n; }
  int64_t block_begin(int64_t b) const { return b * kRowsPerBlock * c; }
  int64_t block_end(int64_t b) const { return std::min(n * hw, (b + 1) * kRowsPerBlock) * c; }
  // Values per channel in block b.
  int64_t block_count(int64_t b) const { return channels_last ? (block_end(b) - block_begin(b)) / c : hw; }
};

int64_t tile_of(int64_t C) {
  int64_t rows = 1;
  while (rows * C < 128 && rows < kRowsPerBlock) rows *= 2;  // divides kRowsPerBlock
  return rows * C;
}

// v (C values) repeated to fill out (tile values).
void repeat_into(const float* v, int64_t C, int64_t tile, float* out) {
  for (int64_t r = 0; r < tile; r += C) std::copy(v, v + C, out + r);
}

// out[c] = sum over the tile's rows of acc[row * C + c].
void fold_rows(const float* acc, int64_t C, int64_t tile, float* out) {
  std::copy(acc, acc + C, out);
  for (int64_t r = C; r < tile; r += C) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] += acc[r + c];
  }
}

// Per block and channel: mean and sum of squared deviations (two passes over the block,
// which is in cache for the second).
template <typename scalar_t>
void block_moments(const scalar_t* x, const Layout& L, int64_t b, float* mean, float* m2) {
  const int64_t C = L.c;
  if (L.channels_last) {
    const int64_t e0 = L.block_begin(b), e1 = L.block_end(b), T = L.tile;
    std::vector<float> acc(T, 0.0f), mu_t(T);
    for (int64_t off = e0; off < e1; off += T) {
      const int64_t len = std::min(T, e1 - off);
      const scalar_t* p = x + off;
      float* a = acc.data();
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) a[j] += load(p[j]);
    }
    const float inv = 1.0f / static_cast<float>(L.block_count(b));
    fold_rows(acc.data(), C, T, mean);
    for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
    repeat_into(mean, C, T, mu_t.data());
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t off = e0; off < e1; off += T) {
      const int64_t len = std::min(T, e1 - off);
      const scalar_t* p = x + off;
      float* a = acc.data();
      const float* mu = mu_t.data();
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float d = load(p[j]) - mu[j];
        a[j] += d * d;
      }
    }
    fold_rows(acc.data(), C, T, m2);
  } else {
    // Block b is image b: one plane of hw values per channel.
    const float inv = 1.0f / static_cast<float>(L.hw);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* p = x + (b * C + c) * L.hw;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < L.hw; ++i) s += load(p[i]);
      const float mu = s * inv;
      float q = 0.0f;
#pragma omp simd reduction(+ : q)
      for (int64_t i = 0; i < L.hw; ++i) {
        const float d = load(p[i]) - mu;
        q += d * d;
      }
      mean[c] = mu;
      m2[c] = q;
    }
  }
}

// y = max(x * scale + shift, 0) (or without the max), per channel.
template <typename scalar_t>
void block_normalise(const scalar_t* x, scalar_t* y, const Layout& L, int64_t b, const float* scale,
                     const float* shift, bool relu) {
  const int64_t C = L.c;
  const float lo = relu ? 0.0f : -INFINITY;
  if (L.channels_last) {  // scale and shift come repeated to L.tile values
    const int64_t e0 = L.block_begin(b), e1 = L.block_end(b), T = L.tile;
    for (int64_t off = e0; off < e1; off += T) {
      const int64_t len = std::min(T, e1 - off);
      const scalar_t* p = x + off;
      scalar_t* q = y + off;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) store(std::max(load(p[j]) * scale[j] + shift[j], lo), q + j);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* p = x + (b * C + c) * L.hw;
      scalar_t* q = y + (b * C + c) * L.hw;
      const float a = scale[c], s = shift[c];
#pragma omp simd
      for (int64_t i = 0; i < L.hw; ++i) store(std::max(load(p[i]) * a + s, lo), q + i);
    }
  }
}

// Per block and channel: sum of g and of g * (x - mean), g the gradient at the BatchNorm's
// output (dy, zeroed where the ReLU clipped).
template <typename scalar_t>
void block_grad_sums(const scalar_t* dy, const scalar_t* x, const Layout& L, int64_t b, const float* mean,
                     const float* scale, const float* shift, bool relu, float* sg, float* sgx) {
  const int64_t C = L.c;
  if (L.channels_last) {  // mean, scale and shift come repeated to L.tile values
    const int64_t e0 = L.block_begin(b), e1 = L.block_end(b), T = L.tile;
    std::vector<float> a1(T, 0.0f), a2(T, 0.0f);
    for (int64_t off = e0; off < e1; off += T) {
      const int64_t len = std::min(T, e1 - off);
      const scalar_t* p = x + off;
      const scalar_t* q = dy + off;
      float* s1 = a1.data();
      float* s2 = a2.data();
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float xv = load(p[j]);
        const float g0 = load(q[j]);
        const float g = (!relu || xv * scale[j] + shift[j] > 0.0f) ? g0 : 0.0f;
        s1[j] += g;
        s2[j] += g * (xv - mean[j]);
      }
    }
    fold_rows(a1.data(), C, T, sg);
    fold_rows(a2.data(), C, T, sgx);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* p = x + (b * C + c) * L.hw;
      const scalar_t* q = dy + (b * C + c) * L.hw;
      const float a = scale[c], s = shift[c], mu = mean[c];
      float s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t i = 0; i < L.hw; ++i) {
        const float xv = load(p[i]);
        const float g0 = load(q[i]);
        const float g = (!relu || xv * a + s > 0.0f) ? g0 : 0.0f;
        s1 += g;
        s2 += g * (xv - mu);
      }
      sg[c] = s1;
      sgx[c] = s2;
    }
  }
}

// dx = g * k1 + (x - mean) * k2 + k3 per channel (the BatchNorm input gradient, expanded;
// x - mean rather than x * k2 - mean * k2, which cancels when |mean| dwarfs the spread).
template <typename scalar_t>
void block_input_grad(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Layout& L, int64_t b,
                      const float* mean, const float* scale, const float* shift, bool relu, const float* k1,
                      const float* k2, const float* k3) {
  const int64_t C = L.c;
  if (L.channels_last) {  // every per-channel vector comes repeated to L.tile values
    const int64_t e0 = L.block_begin(b), e1 = L.block_end(b), T = L.tile;
    for (int64_t off = e0; off < e1; off += T) {
      const int64_t len = std::min(T, e1 - off);
      const scalar_t* p = x + off;
      const scalar_t* q = dy + off;
      scalar_t* out = dx + off;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float xv = load(p[j]);
        const float g0 = load(q[j]);
        const float g = (!relu || xv * scale[j] + shift[j] > 0.0f) ? g0 : 0.0f;
        store(g * k1[j] + (xv - mean[j]) * k2[j] + k3[j], out + j);
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* p = x + (b * C + c) * L.hw;
      const scalar_t* q = dy + (b * C + c) * L.hw;
      scalar_t* out = dx + (b * C + c) * L.hw;
      const float a = scale[c], s = shift[c], mu = mean[c], c1 = k1[c], c2 = k2[c], c3 = k3[c];
#pragma omp simd
      for (int64_t i = 0; i < L.hw; ++i) {
        const float xv = load(p[i]);
        const float g0 = load(q[i]);
        const float g = (!relu || xv * a + s > 0.0f) ? g0 : 0.0f;
        store(g * c1 + (xv - mu) * c2 + c3, out + i);
      }
    }
  }
}

// Runs f with a value of the element type (float or BFloat16: check_input allows no other).
template <typename F>
void dispatch_float_bf16(at::ScalarType t, F&& f) {
  if (t == at::kBFloat16) {
    f(c10::BFloat16());
  } else {
    f(0.0f);
  }
}

// A per-channel vector as the block walkers take it: repeated to L.tile values for
// channels_last, as is for NCHW.
std::vector<float> walked(const float* v, const Layout& L) {
  std::vector<float> out(L.channels_last ? L.tile : L.c);
  if (L.channels_last) {
    repeat_into(v, L.c, L.tile, out.data());
  } else {
    std::copy(v, v + L.c, out.begin());
  }
  return out;
}

Layout layout_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "batch_norm_relu: ", name, " must be (N, C, H, W), got ", x.sizes());
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || x.is_contiguous(), "batch_norm_relu: ", name,
              " must be contiguous (NCHW) or channels_last, got strides ", x.strides());
  // When both hold (C == 1 or H * W == 1) the two walks read the same bytes.
  const bool channels_last = cl && !x.is_contiguous();
  return Layout{channels_last, x.size(0), x.size(1), x.size(2) * x.size(3), channels_last ? tile_of(x.size(1)) : 1};
}

void check_channel_vector(const at::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "batch_norm_relu (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.numel() == C, "batch_norm_relu: ", name, " must be a (", C, ",) tensor, got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "batch_norm_relu: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "batch_norm_relu: ", name, " must be contiguous");
}

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "batch_norm_relu (cpu): ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "batch_norm_relu (cpu): ", name, " must be float32 or bfloat16, got ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, bool relu) {
  check_input(x, "x");
  const Layout L = layout_of(x, "x");
  const int64_t C = L.c, M = L.n * L.hw;
  TORCH_CHECK(M > 1, "batch_norm_relu: expected more than 1 value per channel when training, got input of shape ",
              x.sizes());
  TORCH_CHECK(eps >= 0.0, "batch_norm_relu: eps must be >= 0, got ", eps);
  check_channel_vector(weight, C, "weight");
  check_channel_vector(bias, C, "bias");
  if (running_mean.has_value()) check_channel_vector(*running_mean, C, "running_mean");
  if (running_var.has_value()) check_channel_vector(*running_var, C, "running_var");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "batch_norm_relu: running_mean and running_var must be given together");

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);  // keeps x's layout
  at::Tensor mean_t = at::empty({C}, f32), invstd_t = at::empty({C}, f32);
  // The updated running statistics go to copies: the op does not write its inputs.
  at::Tensor rm_t = running_mean.has_value() ? running_mean->clone() : at::empty({0}, f32);
  at::Tensor rv_t = running_var.has_value() ? running_var->clone() : at::empty({0}, f32);
  const int64_t nb = L.blocks();
  std::vector<float> pm(nb * C), pq(nb * C);
  std::vector<float> scale(C), shift(C);
  float* mean = mean_t.data_ptr<float>();
  float* invstd = invstd_t.data_ptr<float>();

  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) block_moments<scalar_t>(xp, L, b, &pm[b * C], &pq[b * C]);
    });
    // Blocks merged in order, in double.
    const float* w = weight.data_ptr<float>();
    const float* bias_p = bias.data_ptr<float>();
    float* rm = running_mean.has_value() ? rm_t.data_ptr<float>() : nullptr;
    float* rv = running_var.has_value() ? rv_t.data_ptr<float>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      double n = 0.0, mu = 0.0, m2 = 0.0;
      for (int64_t b = 0; b < nb; ++b)
        bn::merge_moments<double>(n, mu, m2, static_cast<double>(L.block_count(b)), pm[b * C + c], pq[b * C + c]);
      bn::finish_moments(mu, m2, static_cast<double>(M), eps, momentum, w[c], bias_p[c], rm ? rm + c : nullptr,
                         rv ? rv + c : nullptr, mean[c], invstd[c], scale[c], shift[c]);
    }
    const std::vector<float> scale_w = walked(scale.data(), L), shift_w = walked(shift.data(), L);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        block_normalise<scalar_t>(xp, yp, L, b, scale_w.data(), shift_w.data(), relu);
    });
  });
  return {y, mean_t, invstd_t, rm_t, rv_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean_t, const at::Tensor& invstd_t, bool relu) {
  check_input(x, "x");
  const Layout L = layout_of(x, "x");
  const int64_t C = L.c, M = L.n * L.hw;
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "batch_norm_relu_backward: dy must have x's shape ", x.sizes(), ", got ",
              dy_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == x.scalar_type(), "batch_norm_relu_backward: dy must have x's dtype ",
              x.scalar_type(), ", got ", dy_in.scalar_type());
  check_channel_vector(weight, C, "weight");
  check_channel_vector(bias, C, "bias");
  check_channel_vector(mean_t, C, "mean");
  check_channel_vector(invstd_t, C, "invstd");
  // The gradient arrives in whatever layout autograd made it; walk it as x is laid out.
  const at::Tensor dy =
      dy_in.contiguous(L.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_t = at::empty({C}, f32), db_t = at::empty({C}, f32);
  const int64_t nb = L.blocks();
  std::vector<float> ps(nb * C), psx(nb * C);
  std::vector<float> scale(C), shift(C), k1(C), k2(C), k3(C);
  const float* mean = mean_t.data_ptr<float>();
  const float* invstd = invstd_t.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* bias_p = bias.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) bn::affine(w[c], bias_p[c], mean[c], invstd[c], scale[c], shift[c]);
  const std::vector<float> scale_w = walked(scale.data(), L), shift_w = walked(shift.data(), L),
                           mean_w = walked(mean, L);

  dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        block_grad_sums<scalar_t>(gp, xp, L, b, mean_w.data(), scale_w.data(), shift_w.data(), relu, &ps[b * C],
                                  &psx[b * C]);
    });
    float* dw = dw_t.data_ptr<float>();
    float* db = db_t.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0, sx = 0.0;
      for (int64_t b = 0; b < nb; ++b) {
        s += ps[b * C + c];
        sx += psx[b * C + c];
      }
      bn::grad_coefficients(s, sx, static_cast<double>(M), w[c], invstd[c], dw[c], db[c], k1[c], k2[c], k3[c]);
    }
    const std::vector<float> k1_w = walked(k1.data(), L), k2_w = walked(k2.data(), L), k3_w = walked(k3.data(), L);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        block_input_grad<scalar_t>(gp, xp, dxp, L, b, mean_w.data(), scale_w.data(), shift_w.data(), relu,
                                   k1_w.data(), k2_w.data(), k3_w.data());
    });
  });
  return {dx, dw_t, db_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastunlearn, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cpu);
}

}  // namespace fastunlearn
