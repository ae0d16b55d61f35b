// The whole decoder stack of one small pass on the CPU, in one call: 1-16 new token rows (a batch of
// B sequences times T new tokens each, left padding allowed), fp32 activations.
//
// A decode step of a 135M model runs ~60 small operations per layer from Python; at ~1 us each
// that is 4-6 ms of a 15-25 ms step, and a larger share of a draft step that skips half the
// weights. This class runs the same layer math (specgate/layers.py is the reference it is tested
// against) as plain loops over the hidden vectors, with the linear products of cpu_linear.h:
//
//   per layer: RMSNorm -> [gate: skip?] -> q/k/v, per-head norms, RoPE, K/V into the cache,
//   attention over the cache, output projection, post-norm, residual add; then the same for the
//   MLP (gate/up, activation, down).
//
// A draft step (one token) brings a plan per branch: the scalar gate's weights, its bias and its
// calibrated threshold. The branch is skipped when sigmoid(w . x + b) <= threshold (a negative
// threshold never skips, and the gate is then not computed); a skipped branch adds its stand-in
// (c + (x A) B) to the residual stream, and a skipped attention branch still writes the token's
// K/V: projected from x, or copied from the layer below (kv_fill "copy_below").
//
// The weight matrices may be a bfloat16, int8 or 4-bit copy (a low-precision draft, kernels/cpu_step.py):
// the products widen them to float32 as they stream in, and everything else stays float32.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_linear.h"

namespace {

using namespace specgate_cpu;

const float* ptr(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// y = x / rms(x) * w over n floats (y may be x).
void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  const float r = 1.0f / std::sqrt(dot(x, x, n) / n + eps);
  for (int64_t k = 0; k < n; ++k) y[k] = x[k] * r * w[k];
}

// RoPE in place on one head (hd floats), with the rotate-half convention of Hugging Face.
void rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float a = x[j], b = x[j + half];
    x[j] = a * cos[j] - b * sin[j];
    x[j + half] = b * cos[j + half] + a * sin[j + half];
  }
}

// e^x of kLanes floats (Cephes' expf: 2^n e^r with |r| <= ln 2 / 2, a degree-6 polynomial for e^r;
// within 2 ulp), so softmax and the activation do not call the scalar exp ~10^5 times a step.
#if defined(__AVX512F__)
inline Vec vexp(Vec x) {
  x = _mm512_max_ps(_mm512_min_ps(x, vset(88.3762626647949f)), vset(-87.3365447504f));
  const Vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  Vec r = _mm512_fnmadd_ps(n, vset(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, vset(-2.12194440e-4f), r);
  Vec p = vset(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, vset(c));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, vset(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
inline Vec vexp(Vec x) {
  x = _mm256_max_ps(_mm256_min_ps(x, vset(88.3762626647949f)), vset(-87.3365447504f));
  const Vec n = _mm256_round_ps(_mm256_mul_ps(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  Vec r = _mm256_fnmadd_ps(n, vset(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, vset(-2.12194440e-4f), r);
  Vec p = vset(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, vset(c));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, vset(1.0f)));
  // 2^n: n + 127 into the exponent bits (n is in [-127, 128] after the clamp above)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#else
inline Vec vexp(Vec x) { return std::exp(x); }
#endif

// y[i] = e^(x[i] - shift) for n floats (y may be x); returns their sum.
float exp_sum(float* y, const float* x, int64_t n, float shift) {
  Vec sum = vzero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec e = vexp(vadd(vload(x + i), vset(-shift)));
    vstore(y + i, e);
    sum = vadd(sum, e);
  }
  float lanes[kLanes];
  hsums<1>(&sum, lanes);
  float total = lanes[0];
  for (; i < n; ++i) total += y[i] = std::exp(x[i] - shift);
  return total;
}

// x[i] *= s for n floats; returns their largest.
float scale_max(float* x, int64_t n, float s) {
  Vec top = vset(-INFINITY);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec v = vmul(vload(x + i), vset(s));
    vstore(x + i, v);
    top = vmax(top, v);
  }
  float lanes[kLanes];
  vstore(lanes, top);
  float m = *std::max_element(lanes, lanes + kLanes);
  for (; i < n; ++i) m = std::max(m, x[i] *= s);
  return m;
}

// a[f] = act(gate[f]) * up[f] for n features: SiLU (act 0) or GELU with the tanh approximation (1),
// through e^x: silu(g) = g / (1 + e^-g), tanh(z) = 1 - 2 / (e^2z + 1).
void gated_activation(const float* gate, const float* up, float* a, int64_t n, int64_t act) {
  constexpr float c = 0.7978845608028654f;  // sqrt(2 / pi)
  int64_t f = 0;
  float e[kLanes];
  for (; f + kLanes <= n; f += kLanes) {
    float z[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      const float g = gate[f + j];
      z[j] = act == 0 ? -g : 2.0f * c * (g + 0.044715f * g * g * g);
    }
    exp_sum(e, z, kLanes, 0.0f);
    for (int j = 0; j < kLanes; ++j) {
      const float g = gate[f + j];
      const float y = act == 0 ? g / (1.0f + e[j]) : 0.5f * g * (2.0f - 2.0f / (e[j] + 1.0f));
      a[f + j] = y * up[f + j];
    }
  }
  for (; f < n; ++f) {
    const float g = gate[f];
    const float y = act == 0 ? g / (1.0f + std::exp(-g)) : 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
    a[f] = y * up[f];
  }
}

// A weight matrix (n, d): float32, bfloat16, int8 with a float32 scale per row, or 4-bit blocks
// (uint8, cpu_linear.h; row0 of apply then a multiple of kQ4Rows).
struct Mat {
  at::Tensor w, scale;
  int64_t d;  // inputs

  // y (rows, n) = x (rows, d) @ w[row0 : row0 + n]^T (+ bias[0 : n]).
  void apply(const float* x, int64_t rows, int64_t row0, int64_t n, const float* bias, float* y) const {
    const int64_t ldw = w.size(1);
    switch (w.scalar_type()) {
      case at::kFloat:
        return linear_rows(x, rows, d, w.data_ptr<float>() + row0 * ldw, ldw, nullptr, bias, y, n);
      case at::kBFloat16:
        return linear_rows(x, rows, d, reinterpret_cast<const uint16_t*>(w.data_ptr()) + row0 * ldw, ldw, nullptr, bias, y, n);
      case at::kByte:
        return linear_rows(x, rows, d, reinterpret_cast<const q4_t*>(w.data_ptr()) + row0 * ldw, ldw, nullptr, bias, y, n);
      default:
        return linear_rows(x, rows, d, w.data_ptr<int8_t>() + row0 * ldw, ldw, scale.data_ptr<float>() + row0, bias, y, n);
    }
  }
};

struct Layer {
  at::Tensor attn_norm, qkv_b, o_b, mlp_norm, q_norm, k_norm, post_attn, post_mlp;
  Mat qkv, o, gate_up, down;
  int64_t window, rope;
};

constexpr int kTensorsPerLayer = 16;
constexpr int64_t kMaxTokens = 16;  // token rows: two passes over the weights of kMaxRows rows
constexpr int64_t kKeyBlock = 128;  // cache slots per attention work item (see CpuStep::attend)

// out (n floats) = scale * sum over u < U of w[u] * rows[u * n .. u * n + n): four vectors of out at
// a time, two rows at a time, so eight FMA chains run side by side.
void weighted_rows(const float* w, const float* rows, int64_t U, int64_t n, float scale, float* out) {
  constexpr int64_t kBlock = 4 * kLanes;
  int64_t e = 0;
  for (; e + kBlock <= n; e += kBlock) {
    Vec a[4] = {vzero(), vzero(), vzero(), vzero()}, b[4] = {vzero(), vzero(), vzero(), vzero()};
    int64_t u = 0;
    for (; u + 2 <= U; u += 2) {
      const Vec w0 = vset(w[u]), w1 = vset(w[u + 1]);
      for (int i = 0; i < 4; ++i) {
        a[i] = vfma(w0, vload(rows + u * n + e + i * kLanes), a[i]);
        b[i] = vfma(w1, vload(rows + (u + 1) * n + e + i * kLanes), b[i]);
      }
    }
    if (u < U)
      for (int i = 0; i < 4; ++i) a[i] = vfma(vset(w[u]), vload(rows + u * n + e + i * kLanes), a[i]);
    for (int i = 0; i < 4; ++i) vstore(out + e + i * kLanes, vmul(vadd(a[i], b[i]), vset(scale)));
  }
  for (; e < n; ++e) {
    float sum = 0.0f;
    for (int64_t u = 0; u < U; ++u) sum += w[u] * rows[u * n + e];
    out[e] = scale * sum;
  }
}

// Where the R = B T rows of a pass sit: row r is token t = r % T of sequence b = r / T, at cache
// slot pos[b] + t of that sequence, whose first pad[b] slots are left padding.
struct Rows {
  int64_t T;
  const std::vector<int64_t>& pos;
  const std::vector<int64_t>& pad;

  int64_t seq(int64_t r) const { return r / T; }
  int64_t slot(int64_t r) const { return pos[r / T] + r % T; }
  int64_t position(int64_t r) const { return std::max<int64_t>(0, slot(r) - pad[r / T]); }  // RoPE position
};

struct CpuStep : torch::CustomClassHolder {
  std::vector<Layer> layers;
  int64_t d, n_heads, n_kv, hd, act;
  double eps, scaling;

  // tensors, 16 per layer (an empty tensor for an absent one): attn_norm, qkv_w, qkv_b, o_w, o_b,
  // mlp_norm, gate_up_w, down_w, q_norm, k_norm, post_attn_norm, post_mlp_norm, then the int8
  // matrices' row scales: qkv, o, gate_up, down. Matrices are float32, bfloat16, int8 or 4-bit blocks, the rest
  // float32. ints: n_heads,
  // n_kv_heads, head_dim, activation (0 SiLU, 1 GELU-tanh), then per layer its sliding window (0:
  // none) and its RoPE table's index; floats: RMSNorm eps, attention scaling.
  CpuStep(std::vector<at::Tensor> tensors, std::vector<int64_t> ints, std::vector<double> floats) {
    TORCH_CHECK(ints.size() >= 4 && floats.size() == 2, "CpuStep: bad configuration");
    n_heads = ints[0], n_kv = ints[1], hd = ints[2], act = ints[3];
    eps = floats[0], scaling = floats[1];
    const int64_t L = static_cast<int64_t>(tensors.size()) / kTensorsPerLayer;
    TORCH_CHECK(static_cast<int64_t>(tensors.size()) == L * kTensorsPerLayer && ints.size() == 4 + 2 * L,
                "CpuStep: ", kTensorsPerLayer, " tensors and 2 ints per layer");
    auto vec = [](const at::Tensor& t) {
      TORCH_CHECK(t.numel() == 0 || (t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu()),
                  "CpuStep: norms, biases and scales must be contiguous float32 CPU tensors");
      return t;
    };
    // a matrix of `inputs` inputs (4-bit blocks do not say how many: they round it up to whole chunks)
    auto mat = [](const at::Tensor& w, const at::Tensor& scale, int64_t inputs) {
      const auto type = w.scalar_type();
      TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() &&
                      (type == at::kFloat || type == at::kBFloat16 || type == at::kChar || type == at::kByte),
                  "CpuStep: weight matrices must be contiguous float32, bfloat16, int8 or 4-bit (uint8) CPU tensors");
      TORCH_CHECK(type == at::kByte ? inputs % kGroup == 0 && w.size(0) % kQ4Rows == 0 && w.size(1) == q4_chunks(inputs) * 40
                                    : w.size(1) == inputs,
                  "CpuStep: a weight matrix of ", w.size(1), " columns for ", inputs, " inputs");
      TORCH_CHECK(type == at::kChar ? scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.size(0)
                                    : scale.numel() == 0,
                  "CpuStep: an int8 matrix needs a float32 scale per row, the others none");
      return Mat{w, scale, inputs};
    };
    const int64_t hidden = tensors.at(0).numel(), q_dim = n_heads * hd;
    for (int64_t i = 0; i < L; ++i) {
      const auto* t = &tensors[i * kTensorsPerLayer];
      layers.push_back({vec(t[0]), vec(t[2]), vec(t[4]), vec(t[5]), vec(t[8]), vec(t[9]), vec(t[10]), vec(t[11]),
                        mat(t[1], t[12], hidden), mat(t[3], t[13], q_dim), mat(t[6], t[14], hidden),
                        mat(t[7], t[15], t[6].size(0) / 2), ints[4 + i], ints[4 + L + i]});
      TORCH_CHECK(t[1].scalar_type() != at::kByte || q_dim % kQ4Rows == 0,
                  "CpuStep: 4-bit q/k/v need a multiple of ", kQ4Rows, " query rows (K/V alone start there)");
    }
    d = layers.at(0).attn_norm.numel();
  }

  // Runs the R = B T rows of h (R, d) through every layer, in place, writing their K/V at cache
  // slots pos[b] .. pos[b] + T - 1 of k[i][b], v[i][b] (k[i]: (B, n_kv, max_len, hd)); pad[b]: the
  // left padding of sequence b. cos, sin: per RoPE table, (positions, hd), indexed by position.
  // plan: empty, or (2 L, d + 2) rows [gate weights, gate bias, threshold] per branch 2 i + b, for
  // a single-token draft step of one sequence; standins: empty, or [c (2 L, d)] or [c, A (2 L, d, r),
  // B (2 L, r, d)], added where the draft skips a branch; adapters: the same, added where it runs one.
  // Returns the branches skipped, (2 L,) uint8 (empty without a plan).
  at::Tensor run(at::Tensor h, std::vector<at::Tensor> k, std::vector<at::Tensor> v, std::vector<int64_t> pos,
                 std::vector<int64_t> pad, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin, at::Tensor plan,
                 std::vector<at::Tensor> standins, std::vector<at::Tensor> adapters, bool copy_below) {
    const int64_t L = layers.size(), R = h.size(0), B = pos.size();
    TORCH_CHECK(h.dim() == 2 && h.size(1) == d && h.is_contiguous() && h.scalar_type() == at::kFloat,
                "CpuStep.run: h must be contiguous float32 (rows, d)");
    TORCH_CHECK(R >= 1 && R <= kMaxTokens && B >= 1 && R % B == 0 && pad.size() == pos.size(),
                "CpuStep.run: 1 to ", kMaxTokens, " rows, T per sequence");
    const Rows rows{R / B, pos, pad};
    TORCH_CHECK(static_cast<int64_t>(k.size()) == L && static_cast<int64_t>(v.size()) == L && k[0].size(0) == B,
                "CpuStep.run: a cache per layer, a cache row per sequence");
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(pos[b] + rows.T <= k[0].size(2) && pos[b] + rows.T <= cos[0].size(0), "CpuStep.run: the cache has no room");
    const bool draft = plan.numel() > 0;
    TORCH_CHECK(!draft || (R == 1 && plan.size(0) == 2 * L && plan.size(1) == d + 2), "CpuStep.run: bad plan");
    const int64_t T = R;  // the loops below run over all rows
    const int64_t q_dim = n_heads * hd, kv_dim = n_kv * hd, ff = layers[0].down.d;
    std::vector<float> x(T * d), qkv(T * (q_dim + 2 * kv_dim)), o(T * q_dim), y(T * d), gu(T * 2 * ff), a(T * ff);
    at::Tensor skipped = at::zeros({draft ? 2 * L : 0}, at::kByte);
    float* hp = h.data_ptr<float>();
    uint8_t* skip = skipped.data_ptr<uint8_t>();

    for (int64_t i = 0; i < L; ++i) {
      const Layer& lw = layers[i];
      const float* c = cos[lw.rope].data_ptr<float>();
      const float* s = sin[lw.rope].data_ptr<float>();
      // -- attention --
      for (int64_t t = 0; t < T; ++t) rms_norm(hp + t * d, ptr(lw.attn_norm), x.data() + t * d, d, eps);
      if (draft && skips(plan, 2 * i, x.data())) {
        skip[2 * i] = 1;
        if (copy_below && i > 0) {
          copy_kv(k[i - 1], k[i], pos[0]), copy_kv(v[i - 1], v[i], pos[0]);
        } else {
          const float* bias = ptr(lw.qkv_b);
          lw.qkv.apply(x.data(), 1, q_dim, 2 * kv_dim, bias ? bias + q_dim : nullptr, qkv.data());
          keys_values(lw, qkv.data(), 2 * kv_dim, rows, 1, c, s, k[i], v[i]);
        }
        add_map(standins, 2 * i, x.data(), hp);
      } else {
        const int64_t n = q_dim + 2 * kv_dim;
        lw.qkv.apply(x.data(), T, 0, n, ptr(lw.qkv_b), qkv.data());
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < n_heads; ++j) {
            float* q = qkv.data() + t * n + j * hd;
            if (lw.q_norm.numel()) rms_norm(q, ptr(lw.q_norm), q, hd, eps);
            rope(q, c + rows.position(t) * hd, s + rows.position(t) * hd, hd);
          }
        keys_values(lw, qkv.data() + q_dim, n, rows, T, c, s, k[i], v[i]);
        attend(qkv.data(), n, rows, T, k[i], v[i], lw.window, o.data());
        lw.o.apply(o.data(), T, 0, d, ptr(lw.o_b), y.data());
        add_output(lw.post_attn, T, y.data(), hp);
        if (draft) add_map(adapters, 2 * i, x.data(), hp);
      }
      // -- MLP --
      for (int64_t t = 0; t < T; ++t) rms_norm(hp + t * d, ptr(lw.mlp_norm), x.data() + t * d, d, eps);
      if (draft && skips(plan, 2 * i + 1, x.data())) {
        skip[2 * i + 1] = 1;
        add_map(standins, 2 * i + 1, x.data(), hp);
        continue;
      }
      lw.gate_up.apply(x.data(), T, 0, 2 * ff, nullptr, gu.data());
      for (int64_t t = 0; t < T; ++t)
        gated_activation(gu.data() + t * 2 * ff, gu.data() + t * 2 * ff + ff, a.data() + t * ff, ff, act);
      lw.down.apply(a.data(), T, 0, d, nullptr, y.data());
      add_output(lw.post_mlp, T, y.data(), hp);
      if (draft) add_map(adapters, 2 * i + 1, x.data(), hp);
    }
    return skipped;
  }

 private:
  // Whether the draft skips branch kb for the normed input x (one token).
  bool skips(const at::Tensor& plan, int64_t kb, const float* x) const {
    const float* row = plan.data_ptr<float>() + kb * (d + 2);
    const float threshold = row[d + 1];
    if (threshold < 0) return false;
    const float g = 1.0f / (1.0f + std::exp(-(dot(row, x, d) + row[d])));
    return g <= threshold;
  }

  // h += c + x A B, branch kb's stand-in or adapter (maps: [c] or [c, A, B]), at the normed input x (one token).
  void add_map(const std::vector<at::Tensor>& maps, int64_t kb, const float* x, float* h) const {
    if (maps.empty()) return;
    const float* c = maps[0].data_ptr<float>() + kb * d;
    for (int64_t j = 0; j < d; ++j) h[j] += c[j];
    if (maps.size() < 3) return;
    const int64_t r = maps[1].size(2);
    const float* A = maps[1].data_ptr<float>() + kb * d * r;  // (d, r)
    const float* B = maps[2].data_ptr<float>() + kb * r * d;  // (r, d)
    std::vector<float> z(r, 0.0f);
    for (int64_t j = 0; j < d; ++j)
      for (int64_t q = 0; q < r; ++q) z[q] += x[j] * A[j * r + q];
    for (int64_t q = 0; q < r; ++q)
      for (int64_t j = 0; j < d; ++j) h[j] += z[q] * B[q * d + j];
  }

  // h += post_norm(y) for T rows.
  void add_output(const at::Tensor& post_norm, int64_t T, float* y, float* h) const {
    for (int64_t t = 0; t < T; ++t) {
      if (post_norm.numel()) rms_norm(y + t * d, ptr(post_norm), y + t * d, d, eps);
      for (int64_t j = 0; j < d; ++j) h[t * d + j] += y[t * d + j];
    }
  }

  // Projected keys and values (R rows of stride ld: k heads, then v heads) -> k-norm and RoPE of
  // the keys -> each row's cache slot.
  void keys_values(const Layer& lw, float* kv, int64_t ld, const Rows& rows, int64_t R, const float* c, const float* s,
                   at::Tensor& kc, at::Tensor& vc) const {
    const int64_t max_len = kc.size(2);
    for (int64_t r = 0; r < R; ++r) {
      float* kp = kc.data_ptr<float>() + rows.seq(r) * n_kv * max_len * hd;
      float* vp = vc.data_ptr<float>() + rows.seq(r) * n_kv * max_len * hd;
      for (int64_t j = 0; j < n_kv; ++j) {
        float* key = kv + r * ld + j * hd;
        const float* value = kv + r * ld + (n_kv + j) * hd;
        if (lw.k_norm.numel()) rms_norm(key, ptr(lw.k_norm), key, hd, eps);
        rope(key, c + rows.position(r) * hd, s + rows.position(r) * hd, hd);
        std::copy(key, key + hd, kp + (j * max_len + rows.slot(r)) * hd);
        std::copy(value, value + hd, vp + (j * max_len + rows.slot(r)) * hd);
      }
    }
  }

  // The cache entries of slot pos of sequence 0, one layer's buffer to the next's (the K/V fill
  // "copy_below" of a single-sequence draft step).
  void copy_kv(const at::Tensor& below, at::Tensor& here, int64_t pos) const {
    const int64_t max_len = here.size(2);
    for (int64_t j = 0; j < n_kv; ++j) {
      const float* src = below.data_ptr<float>() + (j * max_len + pos) * hd;
      std::copy(src, src + hd, here.data_ptr<float>() + (j * max_len + pos) * hd);
    }
  }

  // Softmax attention of R queries (rows of stride ld, heads first), each over its sequence's cache
  // slots pad .. its own (the last `window` of them for a sliding window; a padding query sees only
  // itself) -> o (R, q_dim). The threads take (sequence, K/V head, block of kKeyBlock cache slots)
  // items, so each key and value row is read once per pass, however many queries read it (split by
  // queries instead, a verify pass of 8 tokens read each three times, a decode step twice). In an
  // item, the queries of the head go in chunks of up to kMaxRows: the scores are a small-M product
  // with the keys as weight rows, the output the weighted sum of the value rows. Each item leaves per
  // query the maximum of its scores, the sum of their exponentials and its unnormalised output; the
  // blocks are merged after, as flash attention does. The blocks sit at fixed slots, so a query's
  // arithmetic does not depend on the other queries of its pass: a token's logits are the same bits
  // in a decode step and in a verify pass (tested), and greedy speculation gives plain decoding's tokens.
  void attend(const float* q, int64_t ld, const Rows& rows, int64_t R, const at::Tensor& kc, const at::Tensor& vc,
              int64_t window, float* o) const {
    const int64_t max_len = kc.size(2), group = n_heads / n_kv, B = R / rows.T, G = rows.T * group;
    // query g of sequence s: token row s * T + g / group, head kvh * group + g % group; its keys first .. last
    auto row = [&](int64_t s, int64_t g) { return s * rows.T + g / group; };
    std::vector<int64_t> first(B * G), last(B * G), lo(B, max_len), hi(B, 0);
    for (int64_t s = 0; s < B; ++s)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = s * G + g, pad = rows.pad[s];
        last[i] = rows.slot(row(s, g));
        first[i] = last[i] < pad ? last[i] : std::max<int64_t>(pad, window > 0 ? last[i] - window + 1 : 0);
        lo[s] = std::min(lo[s], first[i]), hi[s] = std::max(hi[s], last[i]);
      }
    int64_t parts = 1;  // blocks per sequence, the most any sequence's keys span
    for (int64_t s = 0; s < B; ++s) parts = std::max(parts, hi[s] / kKeyBlock - lo[s] / kKeyBlock + 1);
    const int64_t items = B * n_kv * parts;
    std::vector<float> top(items * G), sum(items * G), out(items * G * hd);  // per item and query
    at::parallel_for(0, items, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> qs(kMaxRows * hd), scores;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b / (n_kv * parts), kvh = b / parts % n_kv, block = lo[s] / kKeyBlock + b % parts;
        const int64_t a0 = std::max(lo[s], block * kKeyBlock), a1 = std::min(hi[s] + 1, (block + 1) * kKeyBlock);  // its keys
        const float* keys = kc.data_ptr<float>() + (s * n_kv + kvh) * max_len * hd;
        const float* values = vc.data_ptr<float>() + (s * n_kv + kvh) * max_len * hd;
        for (int64_t g0 = 0; g0 < G; g0 += kMaxRows) {
          const int64_t n = std::min<int64_t>(kMaxRows, G - g0);
          int64_t f[kMaxRows], l[kMaxRows], c0 = a1, c1 = a0 - 1;  // each query's keys here; all of theirs
          for (int64_t g = 0; g < n; ++g) {
            const int64_t i = s * G + g0 + g;
            f[g] = std::max(first[i], a0), l[g] = std::min(last[i], a1 - 1);
            if (f[g] <= l[g]) c0 = std::min(c0, f[g]), c1 = std::max(c1, l[g]);
            const float* qg = q + row(s, g0 + g) * ld + (kvh * group + (g0 + g) % group) * hd;
            std::copy(qg, qg + hd, qs.data() + g * hd);
          }
          float* t = top.data() + b * G + g0;
          float* z = sum.data() + b * G + g0;
          float* y = out.data() + (b * G + g0) * hd;
          auto none = [&](int64_t g) { t[g] = -INFINITY, z[g] = 0.0f, std::fill(y + g * hd, y + (g + 1) * hd, 0.0f); };
          if (c0 > c1) {  // none of these queries reads this block's keys
            for (int64_t g = 0; g < n; ++g) none(g);
            continue;
          }
          const int64_t U = c1 - c0 + 1;
          scores.resize(n * U);
          with_rows(static_cast<int>(n), [&](auto m) {
            blocks<decltype(m)::value>(kFloat32, 0, U, [&](auto r, int64_t u) {
              rows_block<decltype(m)::value, decltype(r)::value>(qs.data(), hd, keys + (c0 + u) * hd, hd, nullptr, nullptr,
                                                                 scores.data() + u, U);
            });
          });
          for (int64_t g = 0; g < n; ++g) {  // softmax terms over the query's own keys; the others weigh 0
            if (f[g] > l[g]) {
              none(g);
              continue;
            }
            float* w = scores.data() + g * U;
            const int64_t e0 = f[g] - c0, e1 = l[g] - c0 + 1;
            t[g] = scale_max(w + e0, e1 - e0, static_cast<float>(scaling));
            z[g] = exp_sum(w + e0, w + e0, e1 - e0, t[g]);
            std::fill(w, w + e0, 0.0f), std::fill(w + e1, w + U, 0.0f);
            weighted_rows(w, values + c0 * hd, U, hd, 1.0f, y + g * hd);
          }
        }
      }
    });
    for (int64_t s = 0; s < B; ++s)  // merge the blocks: every query reads its own key, so one block at least has terms
      for (int64_t kvh = 0; kvh < n_kv; ++kvh)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t b = (s * n_kv + kvh) * parts;
          float most = -INFINITY, total = 0.0f;
          for (int64_t p = 0; p < parts; ++p) most = std::max(most, top[(b + p) * G + g]);
          float* dst = o + row(s, g) * n_heads * hd + (kvh * group + g % group) * hd;
          std::fill(dst, dst + hd, 0.0f);
          for (int64_t p = 0; p < parts; ++p) {
            const int64_t i = (b + p) * G + g;
            if (sum[i] == 0.0f) continue;  // no keys of this query in the block
            const float weight = std::exp(top[i] - most);
            total += weight * sum[i];
            int64_t e = 0;
            for (; e + kLanes <= hd; e += kLanes) vstore(dst + e, vfma(vset(weight), vload(out.data() + i * hd + e), vload(dst + e)));
            for (; e < hd; ++e) dst[e] += weight * out[i * hd + e];
          }
          int64_t e = 0;
          for (; e + kLanes <= hd; e += kLanes) vstore(dst + e, vmul(vload(dst + e), vset(1.0f / total)));
          for (; e < hd; ++e) dst[e] *= 1.0f / total;
        }
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(specgate, m) {
  m.class_<CpuStep>("CpuStep")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("run", &CpuStep::run);
}
