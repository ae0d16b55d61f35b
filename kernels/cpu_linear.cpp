// Small-M fp32 linear for CPU decoding: y = x @ W^T + b for a handful of token rows.
//
// A decode step or a short verify pass multiplies 1-8 token rows by every weight matrix of the
// model, so the time is the time to stream the weights from memory. This kernel reads each weight
// row once for all token rows (the token rows stay in L1), keeps one accumulator per (weight row,
// token row) in vector registers, prefetches the weight stream ahead and splits the output rows
// over torch's threads. It is compiled on the user's machine with -march=native, so the vector
// width below is the widest the build machine has.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <optional>
#include <vector>

namespace {

constexpr int kMaxRows = 8;         // token rows per pass over the weights
constexpr int64_t kPrefetch = 2048;  // floats ahead of the current weight element (8 KB), into L2

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
constexpr int kRegs = 32;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kRegs = 16;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
using Vec = float;  // no vector unit we know: plain scalar code, still one pass over the weights
constexpr int kLanes = 1;
constexpr int kRegs = 16;
inline Vec vzero() { return 0.0f; }
inline Vec vload(const float* p) { return *p; }
inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
inline float vsum(Vec v) { return v; }
#endif

// Weight rows per block: two reuse each token-row load while the accumulators (R * M) stay in
// registers; on an AMD EPYC (Zen 4) 2 rows with an 8 KB prefetch into L2 beat 1 and 4 rows and
// shorter prefetches for cold weights (the choice among backends is measured anyway).
template <int M>
constexpr int block_rows() {
  return std::max(1, std::min(2, (kRegs - 6) / M));
}

// R output rows [w, w + R * ldw) for M token rows x (M, d), written to y[m * ldy + r].
template <int M, int R>
void rows_block(const float* x, int64_t d, const float* w, int64_t ldw, const float* bias, float* y, int64_t ldy) {
  Vec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = vzero();
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    Vec wv[R];
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(w + r * ldw + k + kPrefetch, 0, 2);
      wv[r] = vload(w + r * ldw + k);
    }
    for (int m = 0; m < M; ++m) {
      const Vec xv = vload(x + m * d + k);
      for (int r = 0; r < R; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      float s = vsum(acc[r][m]);
      for (int64_t kk = k; kk < d; ++kk) s += w[r * ldw + kk] * x[m * d + kk];
      y[m * ldy + r] = bias ? s + bias[r] : s;
    }
  }
}

// Output rows [n0, n1) for M token rows: blocks of R weight rows, then the leftover rows one by one.
template <int M>
void rows_range(const float* x, int64_t d, const float* w, int64_t ldw, const float* bias, float* y, int64_t ldy,
                int64_t n0, int64_t n1) {
  constexpr int R = block_rows<M>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) rows_block<M, R>(x, d, w + n * ldw, ldw, bias ? bias + n : nullptr, y + n, ldy);
  for (; n < n1; ++n) rows_block<M, 1>(x, d, w + n * ldw, ldw, bias ? bias + n : nullptr, y + n, ldy);
}

void rows_range_any(int M, const float* x, int64_t d, const float* w, int64_t ldw, const float* bias, float* y,
                    int64_t ldy, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return rows_range<1>(x, d, w, ldw, bias, y, ldy, n0, n1);
    case 2: return rows_range<2>(x, d, w, ldw, bias, y, ldy, n0, n1);
    case 3: return rows_range<3>(x, d, w, ldw, bias, y, ldy, n0, n1);
    case 4: return rows_range<4>(x, d, w, ldw, bias, y, ldy, n0, n1);
    case 5: return rows_range<5>(x, d, w, ldw, bias, y, ldy, n0, n1);
    case 6: return rows_range<6>(x, d, w, ldw, bias, y, ldy, n0, n1);
    case 7: return rows_range<7>(x, d, w, ldw, bias, y, ldy, n0, n1);
    default: return rows_range<8>(x, d, w, ldw, bias, y, ldy, n0, n1);
  }
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "small_linear: float32 only");
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1, "small_linear: weight must be 2-D with contiguous rows");
  const int64_t n = weight.size(0), d = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d, "small_linear: x's last dim ", x.size(-1), " != weight's ", d);
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n, "small_linear: bias must be float32 (n,)");
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<float>();
  }
  const at::Tensor x2 = x.reshape({-1, d}).contiguous();
  const int64_t rows = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor y = at::empty({rows, n}, x.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldw = weight.stride(0);
  // Enough weight rows per task (>= ~32K floats) that the threads' start-up cost stays small.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
    // More than kMaxRows token rows: one pass over these weight rows per chunk of kMaxRows.
    for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
      const int M = static_cast<int>(std::min<int64_t>(kMaxRows, rows - m0));
      rows_range_any(M, xp + m0 * d, d, wp, ldw, b, yp + m0 * n, n, n0, n1);
    }
  });
  return y.view(out_shape);
}

}  // namespace

// A fragment: other code may define more ops in the specgate namespace.
TORCH_LIBRARY_FRAGMENT(specgate, m) {
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(specgate, CPU, m) { m.impl("small_linear", &small_linear); }
