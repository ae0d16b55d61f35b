// Small-M fp32 linear for CPU decoding: y = x @ W^T + b for a handful of token rows.
//
// A decode step or a short verify pass multiplies 1-8 token rows by every weight matrix of the
// model, so the time is the time to stream the weights from memory. This kernel reads each weight
// row once for all token rows (the token rows stay in L1), keeps one accumulator per (weight row,
// token row) in vector registers, sums the accumulators of a block of rows with one
// transpose-and-add tree, prefetches the weight stream ahead and splits the output rows over
// torch's threads. It is compiled on the user's machine with -march=native, so the vector
// width below is the widest the build machine has.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu_linear.h"

namespace {

using namespace specgate_cpu;

// y = x @ weight^T (* scale per output row) (+ bias). weight: float32, bfloat16, int8 with a float32
// scale per row, or 4-bit blocks (uint8, cpu_linear.h) (a low-precision draft's copy, kernels/cpu_step.py).
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_linear: CPU tensors only");
  const auto type = weight.scalar_type();
  TORCH_CHECK(x.scalar_type() == at::kFloat &&
                  (type == at::kFloat || type == at::kBFloat16 || type == at::kChar || type == at::kByte),
              "small_linear: float32 x, and float32, bfloat16, int8 or 4-bit (uint8) weights");
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1, "small_linear: weight must be 2-D with contiguous rows");
  const bool q4 = type == at::kByte;  // 4-bit blocks (cpu_linear.h), whose width the inputs' count rounds up
  TORCH_CHECK(x.dim() >= 1, "small_linear: x must have a last dim of inputs");
  const int64_t n = weight.size(0), d = q4 ? x.size(-1) : weight.size(1);
  TORCH_CHECK(x.size(-1) == d, "small_linear: x's last dim ", x.size(-1), " != weight's ", d);
  TORCH_CHECK(!q4 || (d % kGroup == 0 && n % kQ4Rows == 0 && weight.size(1) == q4_chunks(d) * 40 && weight.is_contiguous()),
              "small_linear: 4-bit weights (kernels/cpu_step.py int4) for ", d, " inputs are a contiguous (n, ", q4_chunks(d) * 40,
              ") uint8 matrix with n a multiple of ", kQ4Rows, ", and the inputs a multiple of ", kGroup);
  auto floats = [](const std::optional<at::Tensor>& t, int64_t size, const char* name, at::Tensor& keep) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == size, "small_linear: ", name, " must be ", size, " float32");
    keep = t->contiguous();
    return keep.data_ptr<float>();
  };
  at::Tensor bias_c, scale_c;
  const float* b = floats(bias, n, "bias", bias_c);
  const float* s = floats(scale, n, "scale", scale_c);
  TORCH_CHECK((type == at::kChar) == (s != nullptr),
              "small_linear: int8 weights need a scale per row, others none (4-bit ones hold theirs)");
  const at::Tensor x2 = x.reshape({-1, d}).contiguous();
  const int64_t rows = x2.size(0), ldw = weight.stride(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor y = at::empty({rows, n}, x.options());
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (type == at::kFloat)
    linear_rows(xp, rows, d, weight.data_ptr<float>(), ldw, s, b, yp, n);
  else if (type == at::kBFloat16)
    linear_rows(xp, rows, d, reinterpret_cast<const uint16_t*>(weight.data_ptr()), ldw, s, b, yp, n);
  else if (q4)
    linear_rows(xp, rows, d, reinterpret_cast<const q4_t*>(weight.data_ptr()), ldw, s, b, yp, n);
  else
    linear_rows(xp, rows, d, weight.data_ptr<int8_t>(), ldw, s, b, yp, n);
  return y.view(out_shape);
}

// Logits x (rows, d) @ weight (V, d)^T that are exact wherever they could be among a row's `rank`
// largest (1: its maximum), from about a quarter of the bytes: the int8 copy (q, scale) gives every
// logit y_r to within b_r = err[r] |x| + norm[r] |x - x~| (err: |w_r - w~_r| plus float rounding,
// norm: |w~_r|, with w~ the dequantized row and x~ the rounded token row, kernels/screened_head.py),
// so only the rows with y_r + b_r >= L, L the rank-th largest y_s - b_s, can be among them; those
// are recomputed from the float32 weights. A token row with more than max_exact such rows takes
// every logit from float32.
at::Tensor screened_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& q, const at::Tensor& scale,
                           const at::Tensor& err, const at::Tensor& norm, int64_t max_exact, int64_t rank) {
  const int64_t V = weight.size(0), d = weight.size(1);
  auto vec = [V](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == V && t.device().is_cpu();
  };
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(-1) == d,
              "screened_linear: x must be float32 (..., d) on the CPU");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.device().is_cpu() &&
                  q.scalar_type() == at::kChar && q.is_contiguous() && q.sizes() == weight.sizes(),
              "screened_linear: a contiguous float32 weight (V, d) and its int8 copy of the same shape");
  TORCH_CHECK(vec(scale) && vec(err) && vec(norm), "screened_linear: scale, err and norm must be V contiguous float32");
  TORCH_CHECK(rank >= 1, "screened_linear: rank must be 1 or more");
  const at::Tensor x2 = x.reshape({-1, d}).contiguous();
  const int64_t rows = x2.size(0);
  at::Tensor y = at::empty({rows, V}, x.options());
  const float *xp = x2.data_ptr<float>(), *w = weight.data_ptr<float>(), *e = err.data_ptr<float>(), *nq = norm.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  linear_rows(xp, rows, d, q.data_ptr<int8_t>(), d, scale.data_ptr<float>(), nullptr, yp, V);
  // Two passes over the logits for all token rows at once (a pass per row cost a verify pass's 5 rows
  // ~0.3 ms): each row's level L, then its candidates, per chunk of the vocabulary.
  std::vector<float> nx(rows), nd(rows), low(rows, -INFINITY);
  for (int64_t m = 0; m < rows; ++m) {
    nx[m] = std::sqrt(dot(xp + m * d, xp + m * d, d));
    nd[m] = rounding_bound(xp + m * d, d);
  }
  const int64_t chunk = 8192, chunks = (V + chunk - 1) / chunk;
  std::vector<std::vector<float>> tops(chunks * rows);  // [c * rows + m]: row m's `rank` largest y_s - b_s in chunk c
  std::vector<std::vector<int64_t>> found(chunks * rows);  // [c * rows + m]: row m's candidates in chunk c
  // f(c, m, r0, r1, bounds) for chunk c = vocabulary rows [r0, r1) and token row m, both threads
  // taking whole chunks; bounds(r): b_r .. b_{r + kLanes} for row m.
  auto over_chunks = [&](auto f) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t m = 0; m < rows; ++m) {
          const Vec a = vset(nx[m]), b = vset(nd[m]);
          f(c, m, c * chunk, std::min(V, (c + 1) * chunk), [&](int64_t r) { return vfma(vload(e + r), a, vmul(vload(nq + r), b)); });
        }
    });
  };
  auto bound = [&](int64_t m, int64_t r) { return e[r] * nx[m] + nq[r] * nd[m]; };  // the leftover rows'
  over_chunks([&](int64_t c, int64_t m, int64_t r0, int64_t r1, auto bounds) {
    const float* ym = yp + m * V;
    std::vector<float>& top = tops[c * rows + m];  // a min-heap of at most rank values
    float least = -INFINITY;  // what a value must reach to enter it
    auto offer = [&](float v) {
      if (static_cast<int64_t>(top.size()) < rank) {
        top.push_back(v);
        std::push_heap(top.begin(), top.end(), std::greater<float>());
      } else if (v > top.front()) {
        std::pop_heap(top.begin(), top.end(), std::greater<float>());
        top.back() = v;
        std::push_heap(top.begin(), top.end(), std::greater<float>());
      }
      if (static_cast<int64_t>(top.size()) == rank) least = top.front();
    };
    int64_t r = r0;
    float lanes[kLanes];
    if (rank == 1) {  // the maximum (greedy): no branch per vector
      Vec best = vset(-INFINITY);
      for (; r + kLanes <= r1; r += kLanes) best = vmax(best, vfma(bounds(r), vset(-1.0f), vload(ym + r)));
      vstore(lanes, best);
      for (float v : lanes) offer(v);
    }
    for (; r + kLanes <= r1; r += kLanes) {
      const Vec lo = vfma(bounds(r), vset(-1.0f), vload(ym + r));
      uint32_t hits = vat_least(lo, vset(least));
      if (!hits) continue;
      vstore(lanes, lo);
      for (; hits; hits &= hits - 1) offer(lanes[__builtin_ctz(hits)]);
    }
    for (; r < r1; ++r) offer(ym[r] - bound(m, r));
  });
  for (int64_t m = 0; m < rows; ++m) {  // the rank-th largest over all chunks (-inf: fewer than rank rows)
    std::vector<float> all;
    for (int64_t c = 0; c < chunks; ++c) all.insert(all.end(), tops[c * rows + m].begin(), tops[c * rows + m].end());
    if (static_cast<int64_t>(all.size()) >= rank) {
      std::nth_element(all.begin(), all.begin() + (rank - 1), all.end(), std::greater<float>());
      low[m] = all[rank - 1];
    }
  }
  over_chunks([&](int64_t c, int64_t m, int64_t r0, int64_t r1, auto bounds) {
    const float* ym = yp + m * V;
    std::vector<int64_t>& out = found[c * rows + m];
    int64_t r = r0;
    for (; r + kLanes <= r1; r += kLanes)
      for (uint32_t hits = vat_least(vadd(vload(ym + r), bounds(r)), vset(low[m])); hits; hits &= hits - 1)
        out.push_back(r + __builtin_ctz(hits));
    for (; r < r1; ++r)
      if (ym[r] + bound(m, r) >= low[m]) out.push_back(r);
  });
  std::vector<int64_t> dense;  // token rows with too many candidates: every logit from float32
  std::vector<std::pair<int64_t, int64_t>> exact;  // (token row, vocabulary row) recomputed in float32
  for (int64_t m = 0; m < rows; ++m) {
    int64_t n = 0;
    for (int64_t c = 0; c < chunks; ++c) n += found[c * rows + m].size();
    if (n > max_exact) {
      dense.push_back(m);
      continue;
    }
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t r : found[c * rows + m]) exact.emplace_back(m, r);
  }
  at::parallel_for(0, static_cast<int64_t>(exact.size()), 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const auto [m, r] = exact[i];
      yp[m * V + r] = dot(xp + m * d, w + r * d, d);
    }
  });
  if (!dense.empty()) {  // one float32 pass over the head for all of them
    const int64_t k = dense.size();
    std::vector<float> xs(k * d), ys(k * V);
    for (int64_t j = 0; j < k; ++j) std::copy(xp + dense[j] * d, xp + (dense[j] + 1) * d, xs.data() + j * d);
    linear_rows(xs.data(), k, d, w, d, nullptr, nullptr, ys.data(), V);
    for (int64_t j = 0; j < k; ++j) std::copy(ys.data() + j * V, ys.data() + (j + 1) * V, yp + dense[j] * V);
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = V;
  return y.view(out_shape);
}

// How many threads at::parallel_for really runs here: 1 when the extension was built without
// OpenMP, whatever torch.get_num_threads() says (the tests check it).
int64_t parallel_threads() {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    const int64_t t = at::get_thread_num() + 1;
    for (int64_t seen = most.load(); t > seen && !most.compare_exchange_weak(seen, t);) {
    }
  });
  return most.load();
}

bool int8_activations() { return kInt8Activations; }

// The index (Weights) of a weight type's settings: "float32", "bfloat16", "int8" or "int4".
int weight_kind(const std::string& weights) {
  const char* names[kWeightKinds] = {"float32", "bfloat16", "int8", "int4"};
  for (int i = 0; i < kWeightKinds; ++i)
    if (weights == names[i]) return i;
  TORCH_CHECK(false, "weights must be float32, bfloat16, int8 or int4, got ", weights);
  return kFloat32;  // not reached
}

// Sets block_cap (8 or 4) for every product over `weights` after it; returns the previous value.
int64_t set_block_rows(int64_t cap, const std::string& weights) {
  TORCH_CHECK(cap == 8 || cap == 4, "set_block_rows: 8 or 4, got ", cap);
  int& current = block_cap(weight_kind(weights));
  const int64_t previous = current;
  current = static_cast<int>(cap);
  return previous;
}

// Sets how far ahead products over `weights` and `rows` token rows prefetch them (bytes; near 0:
// no L1 prefetch, see Prefetch); returns the previous (far, near).
std::vector<int64_t> set_prefetch(int64_t rows, int64_t far, int64_t near, const std::string& weights) {
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "set_prefetch: rows must be 1..", kMaxRows, ", got ", rows);
  TORCH_CHECK(far > 0 && near >= 0, "set_prefetch: far > 0 and near >= 0 bytes, got ", far, " and ", near);
  Prefetch& pf = prefetch_plan(weight_kind(weights), static_cast<int>(rows));
  std::vector<int64_t> previous{pf.far, pf.near};
  pf = Prefetch{far, near};
  return previous;
}

}  // namespace

// A fragment: other code may define more ops in the specgate namespace.
TORCH_LIBRARY_FRAGMENT(specgate, m) {
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? scale=None) -> Tensor");
  m.def("parallel_threads() -> int", &parallel_threads);
  m.def("int8_activations() -> bool", &int8_activations);  // whether int8 products round the token rows to int8 (VNNI)
  m.def("set_block_rows(int cap, str weights=\"float32\") -> int", &set_block_rows);  // 8 or 4 weight rows per block at most; returns the previous
  m.def("set_prefetch(int rows, int far, int near, str weights=\"float32\") -> int[]", &set_prefetch);  // per token-row count; returns the previous
  m.def("screened_linear(Tensor x, Tensor weight, Tensor q, Tensor scale, Tensor err, Tensor norm, int max_exact, int rank=1) -> Tensor");
}

TORCH_LIBRARY_IMPL(specgate, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("screened_linear", &screened_linear);
}
