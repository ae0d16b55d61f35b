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

#include <atomic>
#include <optional>
#include <vector>

#include "cpu_linear.h"

namespace {

using namespace specgate_cpu;

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
  linear_rows(xp, rows, d, wp, weight.stride(0), nullptr, b, y.data_ptr<float>(), n);
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

}  // namespace

// A fragment: other code may define more ops in the specgate namespace.
TORCH_LIBRARY_FRAGMENT(specgate, m) {
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("parallel_threads() -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(specgate, CPU, m) { m.impl("small_linear", &small_linear); }
