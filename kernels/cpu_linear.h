// The small-M fp32 linear kernel's building blocks, shared by the small_linear op (cpu_linear.cpp)
// and the fused decode step (cpu_step.cpp). See cpu_linear.cpp for what the kernel does.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>
#include <type_traits>

namespace specgate_cpu {

constexpr int kMaxRows = 8;         // token rows per pass over the weights

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vset(float a) { return _mm512_set1_ps(a); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline uint32_t vat_least(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }  // lane i: bit i
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vset(float a) { return _mm256_set1_ps(a); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline uint32_t vat_least(Vec a, Vec b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
#else
using Vec = float;  // no vector unit we know: plain scalar code, still one pass over the weights
constexpr int kLanes = 1;
inline Vec vzero() { return 0.0f; }
inline Vec vload(const float* p) { return *p; }
inline void vstore(float* p, Vec v) { *p = v; }
inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
inline Vec vset(float a) { return a; }
inline Vec vadd(Vec a, Vec b) { return a + b; }
inline Vec vmul(Vec a, Vec b) { return a * b; }
inline Vec vmax(Vec a, Vec b) { return std::max(a, b); }
inline uint32_t vat_least(Vec a, Vec b) { return a >= b; }
#endif

// How far ahead of the weight being read the kernels prefetch: far into L2, which keeps enough lines
// coming from memory, and near into L1 (0: not at all), so the loads meet no L2 latency either.
// What pays depends on the machine, the weights' type and the token rows per pass. On a 2-core Intel
// Xeon, with the L2 prefetch alone (8 KB ahead), 5-row float32 products streamed their weights
// 1.13-1.17x slower than 1-row ones (the more work per line, the fewer loads the core has in flight);
// with both (24 KB, 1 KB), 1.05-1.09x, and 1-row products ran no slower. On a 2-core AMD EPYC (Zen 4)
// the near prefetch made 1-row float32 products 7-10% slower and 1-row int8 and int4 ones 6-8%
// faster. So the distances are set per weight type and row count (rows 1..kMaxRows) by set_prefetch,
// which the engine calls with what it timed fastest on the machine (specgate.dispatch); these are
// the defaults.
struct Prefetch {
  int64_t far = 24576, near = 1024;
};

// The weight types the kernels read, as indices of their settings (set_prefetch, set_block_rows).
enum Weights { kFloat32, kBFloat16, kInt8, kInt4, kWeightKinds };
template <typename W>
constexpr int kind_of = std::is_same_v<W, float> ? kFloat32 : std::is_same_v<W, uint16_t> ? kBFloat16 : std::is_same_v<W, int8_t> ? kInt8 : kInt4;

inline Prefetch& prefetch_plan(int kind, int rows) {
  static Prefetch plans[kWeightKinds][kMaxRows + 1];
  return plans[kind][rows];
}

inline void prefetch_ahead(const void* p, const Prefetch& pf) {
  const char* c = static_cast<const char*>(p);
  __builtin_prefetch(c + pf.far, 0, 1);
  if (pf.near) __builtin_prefetch(c + pf.near, 0, 3);
}

// v, kept in a register: a token row's vector feeds R FMAs, and unless told, gcc folds its load into
// each of them (R loads from L1 where one does), which made the products load-bound at 5-8 token rows.
template <typename V>
inline V in_register(V v) {
#if defined(__AVX512F__) || defined(__AVX2__)
  asm("" : "+v"(v));
#endif
  return v;
}

// Weight rows per block: as many as keep all R * M accumulators within one reduction tree
// (R * M <= kLanes), at most Cap (8 or 4, see block_cap). With AVX-512 and Cap 8 that is 8 rows for
// 1-2 token rows, 5 for 3, 4 for 4, 3 for 5 and 2 for 6-8: the accumulators plus the weight and token
// vectors fit the 32 registers, each token-row load feeds R FMAs, and the horizontal sums of a block
// cost one tree. With AVX2 (16 registers, 8 lanes) the same rule gives 8, 4, 2, 2, then 1 row.
template <int M, int Cap = 8>
constexpr int block_rows() {
  return std::clamp(kLanes / M, 1, Cap);
}

// out[i] = the sum of the lanes of v[i] for i < N <= kLanes (out has room for kLanes floats).
// A transpose-and-add tree: each level adds pairs of vectors after interleaving them, halving the
// vector count and doubling the sums per vector, so N accumulators cost ~3 instructions each where a
// horizontal sum per accumulator costs ~8 plus a long dependency chain. Missing inputs (i >= N) are
// zeros, and levels whose inputs are all zero are skipped at compile time.
template <int N>
[[gnu::always_inline]] inline void hsums(const Vec* v, float* out) {
  static_assert(N >= 1 && N <= kLanes, "one tree reduces at most kLanes accumulators");
#if defined(__AVX512F__)
  const __m512 z = _mm512_setzero_ps();
  auto in = [&](int i) { return i < N ? v[i] : z; };
  __m512 a[8], b[4], c[2];
  // a[i], per 128-bit lane: {v[2i] (2 partial sums), v[2i+1] (2)} interleaved
  for (int i = 0; i < 8; ++i)
    a[i] = 2 * i < N ? _mm512_add_ps(_mm512_unpacklo_ps(in(2 * i), in(2 * i + 1)),
                                     _mm512_unpackhi_ps(in(2 * i), in(2 * i + 1)))
                     : z;
  // b[i], per 128-bit lane: the lane's sums of v[4i .. 4i+3]
  for (int i = 0; i < 4; ++i)
    b[i] = 4 * i < N ? _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                                     _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE))
                     : z;
  // c[i]: 128-bit lanes {v[8i .. 8i+3] half sums, other halves, v[8i+4 .. 8i+7] half sums, other halves}
  for (int i = 0; i < 2; ++i)
    c[i] = 8 * i < N ? _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                                     _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD))
                     : z;
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD)));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 z = _mm256_setzero_ps();
  auto in = [&](int i) { return i < N ? v[i] : z; };
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i)
    a[i] = 2 * i < N ? _mm256_add_ps(_mm256_unpacklo_ps(in(2 * i), in(2 * i + 1)),
                                     _mm256_unpackhi_ps(in(2 * i), in(2 * i + 1)))
                     : z;
  for (int i = 0; i < 2; ++i)
    b[i] = 4 * i < N ? _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                                     _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE))
                     : z;
  // b[i], per 128-bit lane: that lane's sums of v[4i .. 4i+3]; add the two lanes
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31)));
#else
  for (int i = 0; i < N; ++i) out[i] = v[i];
#endif
}

// hsums over any number of accumulators, one tree per kLanes of them (only the scalar build, where
// kLanes is 1, has blocks with more accumulators than lanes).
template <int N, int I = 0>
[[gnu::always_inline]] inline void hsums_all(const Vec* v, float* out) {
  if constexpr (I < N) {
    hsums<std::min(kLanes, N - I)>(v + I, out + I);
    hsums_all<N, I + kLanes>(v, out);
  }
}

// Weights are float32, bfloat16 (its bits, uint16_t) or int8 (with a float scale per output row):
// load_w widens kLanes of them to floats, to_float one.
inline Vec load_w(const float* p) { return vload(p); }
inline float to_float(float w) { return w; }
inline float to_float(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(int8_t w) { return static_cast<float>(w); }
#if defined(__AVX512F__)
inline Vec load_w(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline Vec load_w(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
#elif defined(__AVX2__) && defined(__FMA__)
inline Vec load_w(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline Vec load_w(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
#else
inline Vec load_w(const uint16_t* p) { return to_float(*p); }
inline Vec load_w(const int8_t* p) { return to_float(*p); }
#endif

// 4-bit weights (a draft's copy, kernels/cpu_step.py int4): groups of kGroup inputs, each with a
// float16 (scale, offset), w = scale * code + offset (GGUF's Q4_1 numbers), laid out for streaming:
// rows in blocks of kQ4Rows, a row's inputs in chunks of 64 (groups A and B; a last half chunk is
// padded with a group of scale and offset 0), and a block's chunk is kQ4Bytes contiguous bytes: its
// rows' 32 code bytes, their (sA, sB) pairs, their (oA, oB) pairs. Byte j of a row's codes holds
// position j in its low nibble and position j + 32 in its high one, position p being input
// q4_input(p) of the chunk: each 4 positions (a 32-bit lane of the VNNI kernel's unpacked codes)
// belong to one group, A and B alternating, and positions p and p + 32 to the same one, so a lane's
// scale is one of the pair, broadcast, and a product reads one stream per block. (In Q4_1's own layout, codes and pairs in two
// arrays and a group's halves in a byte, an int4 draft's 1-row products took 1.18x this one's time,
// median of five alternated runs on a 2-core AMD EPYC: README, Measured.) A row of d inputs takes
// q4_chunks(d) * 40 bytes (ldw).
struct q4_t {
  uint8_t bits;
};
constexpr int kGroup = 32, kQ4Rows = 4, kQ4Bytes = kQ4Rows * 40;
constexpr int q4_input(int p) { return 32 * (p / 4 % 2) + 16 * (p / 32) + 4 * (p / 8 % 4) + p % 4; }
inline int64_t q4_chunks(int64_t d) { return (d + 63) / 64; }

// The token rows x (rows, d) in the chunks' position order, zero-padded to whole chunks: (rows, 64 q4_chunks(d)).
inline std::vector<float> q4_positions(const float* x, int64_t rows, int64_t d) {
  const int64_t dp = q4_chunks(d) * 64;
  std::vector<float> out(rows * dp, 0.0f);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t c = 0; c < dp; c += 64)
      for (int p = 0; p < 64; p += 4)  // 4 positions hold 4 consecutive inputs
        if (c + q4_input(p) < d) std::memcpy(&out[m * dp + c + p], x + m * d + c + q4_input(p), 4 * sizeof(float));
  return out;
}

inline float half_at(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, sizeof h);
  return static_cast<float>(h);
}

// Codes of kLanes positions as floats: the low (Shift 0) or high (Shift 4) nibbles of bytes b[0 .. kLanes).
template <int Shift>
inline Vec nibbles(const uint8_t* b) {
#if defined(__AVX512F__)
  const __m128i v = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i*)b), Shift), _mm_set1_epi8(0x0F));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m128i v = _mm_and_si128(_mm_srli_epi16(_mm_loadl_epi64((const __m128i*)b), Shift), _mm_set1_epi8(0x0F));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
#else
  return static_cast<float>((b[0] >> Shift) & 0x0F);
#endif
}

// A vector whose lanes alternate a, b every 4 (a block's positions' groups), for kLanes >= 8.
inline Vec alternating(float a, float b) {
#if defined(__AVX512F__)
  return _mm512_setr_ps(a, a, a, a, b, b, b, b, a, a, a, a, b, b, b, b);
#elif defined(__AVX2__) && defined(__FMA__)
  return _mm256_setr_ps(a, a, a, a, b, b, b, b);
#else
  return a;  // unused: the scalar build picks per position
#endif
}

// Row r of a 4-bit block (chunks chunks at block) times M token rows xp (M, 64 chunks) in position
// order, the codes widened to floats (CPUs without VNNI): y[m * ldy + r] (+ bias[r]).
template <int M>
inline void q4_row_floats(const float* xp, const uint8_t* block, int64_t chunks, int r, const Prefetch& pf, const float* bias,
                          float* y, int64_t ldy) {
  const int64_t dp = chunks * 64;
  Vec acc[M];
  for (int m = 0; m < M; ++m) acc[m] = vzero();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* chunk = block + c * kQ4Bytes;
    if (r == 0)
      for (int i = 0; i < kQ4Bytes; i += 64) prefetch_ahead(chunk + i, pf);
    const uint8_t* codes = chunk + 32 * r;
    const float sa = half_at(chunk + 128 + 4 * r), sb = half_at(chunk + 130 + 4 * r);
    const float oa = half_at(chunk + 144 + 4 * r), ob = half_at(chunk + 146 + 4 * r);
    const Vec sv = alternating(sa, sb), ov = alternating(oa, ob);
    for (int v = 0; v < 64; v += kLanes) {
      const Vec code = v < 32 ? nibbles<0>(codes + v) : nibbles<4>(codes + v - 32);
      const bool b = v / 4 % 2;  // the scalar build's group (kLanes >= 8: every vector alternates alike)
      const Vec w = kLanes >= 8 ? vfma(code, sv, ov) : vfma(code, vset(b ? sb : sa), vset(b ? ob : oa));
      for (int m = 0; m < M; ++m) acc[m] = vfma(w, vload(xp + m * dp + c * 64 + v), acc[m]);
    }
  }
  float sums[(M + kLanes - 1) / kLanes * kLanes];
  hsums_all<M>(acc, sums);
  for (int m = 0; m < M; ++m) y[m * ldy + r] = bias ? sums[m] + bias[r] : sums[m];
}

// R output rows [w, w + R * ldw) for M token rows x (M, d), written to y[m * ldy + r]; each row's
// sum times scale[r] (none: 1), plus bias[r] (none: 0).
template <int M, int R, typename W>
inline void rows_block(const float* x, int64_t d, const W* w, int64_t ldw, const float* scale, const float* bias, float* y,
                       int64_t ldy) {
  constexpr int N = R * M;
  Vec acc[N];  // acc[r * M + m]: weight row r times token row m
  // Inputs k .. k + kLanes; the first step sets acc. (Zeroing acc first made the compiler clear a
  // stack copy of it per block: 5-10% of a block's time at 5-8 token rows and d = 576, ~30% at d = 64,
  // timed hot on the Intel Xeon.)
  const Prefetch pf = prefetch_plan(kind_of<W>, M);
  auto step = [&](int64_t k, auto first) {
    Vec wv[R];
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + r * ldw + k, pf);
      wv[r] = load_w(w + r * ldw + k);
    }
    for (int m = 0; m < M; ++m) {
      const Vec xv = in_register(vload(x + m * d + k));
      for (int r = 0; r < R; ++r) acc[r * M + m] = first ? vmul(wv[r], xv) : vfma(wv[r], xv, acc[r * M + m]);
    }
  };
  int64_t k = 0;
  if (d >= kLanes) {
    step(0, std::true_type{});
    k = kLanes;
  } else {
    for (int i = 0; i < N; ++i) acc[i] = vzero();
  }
  for (; k + kLanes <= d; k += kLanes) step(k, std::false_type{});
  float sums[(N + kLanes - 1) / kLanes * kLanes];
  hsums_all<N>(acc, sums);
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      float s = sums[r * M + m];
      // the d % kLanes leftover; std::fma, so every instantiation rounds it alike (gcc contracted a * b + s
      // to an FMA in some and not in others: with 83 or 1,555 inputs a row's sums differed with the row count)
      for (int64_t kk = k; kk < d; ++kk) s = std::fma(to_float(w[r * ldw + kk]), x[m * d + kk], s);
      if (scale) s *= scale[r];
      y[m * ldy + r] = bias ? s + bias[r] : s;
    }
  }
}

// The most weight rows a block streams at once, per weight type (Weights), 8 or 4: 4 ran 3-10%
// faster for 1-3 float32 token rows on a 2-core Intel Xeon (AVX-512, AMX) than 8, which the rule
// above was written for; the engine times both once per machine (specgate.dispatch) and sets it with
// the set_block_rows op. 4-bit weights come in blocks of kQ4Rows by their layout and ignore it.
inline int& block_cap(int kind) {
  static int caps[kWeightKinds] = {8, 8, 8, 8};
  return caps[kind];
}

// Output rows [n0, n1) for M token rows: block(R, n) for blocks of R = block_rows<M, Cap>() weight
// rows from row n, then for the leftover rows one by one (R = 1); R comes as a std::integral_constant.
template <int M, int Cap, typename Block>
inline void blocks_of(int64_t n0, int64_t n1, Block block) {
  constexpr int R = block_rows<M, Cap>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) block(std::integral_constant<int, R>{}, n);
  for (; n < n1; ++n) block(std::integral_constant<int, 1>{}, n);
}

template <int M, typename Block>
inline void blocks(int kind, int64_t n0, int64_t n1, Block block) {
  if (block_cap(kind) == 4) return blocks_of<M, 4>(n0, n1, block);
  blocks_of<M, 8>(n0, n1, block);
}

// f(M) for a runtime row count M of 1..kMaxRows, M as a std::integral_constant (a template argument).
template <int I = 1, typename F>
inline void with_rows(int M, F f) {
  if constexpr (I < kMaxRows) {
    if (M != I) return with_rows<I + 1>(M, f);
  }
  f(std::integral_constant<int, I>{});
}

// Vector-wide dot product of a and b (n floats).
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc[4] = {vzero(), vzero(), vzero(), vzero()};
  int64_t k = 0;
  for (; k + 4 * kLanes <= n; k += 4 * kLanes)
    for (int j = 0; j < 4; ++j) acc[j] = vfma(vload(a + k + j * kLanes), vload(b + k + j * kLanes), acc[j]);
  for (; k + kLanes <= n; k += kLanes) acc[0] = vfma(vload(a + k), vload(b + k), acc[0]);
  float sums[kLanes];
  hsums_all<4>(acc, sums);
  float s = sums[0] + sums[1] + sums[2] + sums[3];
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 weights on a CPU with VNNI: the token rows are rounded to int8 too, with a scale per 4 inputs
// (max |x| / 127 over them: each 32-bit lane of vpdpbusd sums 4 products, so the scales cost a
// vector multiply per 64 weights whatever their count, and this fine a grid keeps an outlier feature
// from flattening its neighbours), and one vpdpbusd multiplies 64 weights by 64 codes: ~5
// instructions per 64 weights where widening the weights to floats takes ~16 (the int8 draft's
// products were compute-bound on 2 cores). vpdpbusd takes unsigned bytes times signed ones: the
// weights, flipped to w + 128 (XOR 0x80), times the codes, and each lane starts from -128 times its
// codes' sum, so it holds the exact integer dot product of its 4 weights and codes. int8 rows need
// a multiple of 64 inputs (else the float path runs); 4-bit ones are padded to it.
constexpr bool kInt8Activations = true;
constexpr int kActGroup = 4;  // inputs per activation scale: one vpdpbusd lane

struct Int8Rows {
  int64_t d;
  std::vector<int8_t> codes;   // (M, d)
  std::vector<float> scales;   // (M, d / kActGroup)
  std::vector<int32_t> start;  // (M, d / kActGroup): -128 times the group's code sum
  std::vector<float> sums;     // (M, d / kActGroup): the group's code sum

  // Rows of a multiple of 64 inputs (the kernels' own). 16 inputs (4 groups) per vector: each
  // group's largest |x| reaches its 4 lanes in two in-lane swaps; the rounding is nearbyint's. It
  // runs before the threads split a product's rows (a scalar loop here once cost ~7% of a low-precision draft step).
  Int8Rows(const float* x, int64_t rows, int64_t d)
      : d(d), codes(rows * d), scales(rows * d / kActGroup), start(rows * d / kActGroup), sums(rows * d / kActGroup) {
    const __m512 scale_step = _mm512_set1_ps(127.0f);
    const __m512i firsts = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);  // each group's first lane
    for (int64_t i = 0; i < rows * d; i += kLanes) {
      const __m512 v = _mm512_loadu_ps(x + i);
      __m512 top = _mm512_andnot_ps(_mm512_set1_ps(-0.0f), v);
      top = _mm512_max_ps(top, _mm512_permute_ps(top, 0xB1));  // neighbours
      top = _mm512_max_ps(top, _mm512_permute_ps(top, 0x4E));  // pairs
      const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(top, _mm512_setzero_ps(), _CMP_GT_OQ), scale_step, top);
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes.data() + i), _mm512_cvtepi32_epi8(q));
      __m512i sum = _mm512_add_epi32(q, _mm512_shuffle_epi32(q, _MM_PERM_CDAB));
      sum = _mm512_add_epi32(sum, _mm512_shuffle_epi32(sum, _MM_PERM_BADC));
      const __m128i group_sum = _mm512_castsi512_si128(_mm512_permutexvar_epi32(firsts, sum));
      const int64_t g = i / kActGroup;
      _mm_storeu_ps(scales.data() + g, _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, _mm512_div_ps(top, scale_step))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(start.data() + g), _mm_mullo_epi32(group_sum, _mm_set1_epi32(-128)));
      _mm_storeu_ps(sums.data() + g, _mm_cvtepi32_ps(group_sum));
    }
  }
};

template <int M, int R>
inline void rows_block_int8(const Int8Rows& xq, const int8_t* w, int64_t ldw, const float* scale, const float* bias, float* y,
                            int64_t ldy) {
  constexpr int N = R * M;
  const int64_t d = xq.d;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const Prefetch pf = prefetch_plan(kInt8, M);
  Vec acc[N];
  for (int i = 0; i < N; ++i) acc[i] = vzero();
  for (int64_t k = 0; k < d; k += 64) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + r * ldw + k, pf);
      wv[r] = _mm512_xor_si512(_mm512_loadu_si512(w + r * ldw + k), flip);
    }
    for (int m = 0; m < M; ++m) {
      const __m512i xv = in_register(_mm512_loadu_si512(xq.codes.data() + m * d + k));
      const Vec sv = in_register(_mm512_loadu_ps(xq.scales.data() + (m * d + k) / kActGroup));
      const __m512i start = in_register(_mm512_loadu_si512(xq.start.data() + (m * d + k) / kActGroup));
      for (int r = 0; r < R; ++r)
        acc[r * M + m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, wv[r], xv)), sv, acc[r * M + m]);
    }
  }
  float sums[(N + kLanes - 1) / kLanes * kLanes];
  hsums_all<N>(acc, sums);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      const float s = sums[r * M + m] * scale[r];
      y[m * ldy + r] = bias ? s + bias[r] : s;
    }
}

// 4-bit weights on a CPU with VNNI. Two rows of a block are one 64-byte load: byte j of a row holds
// positions j (low nibble) and j + 32 (high), and a 32-bit lane of either half lies in one weight
// group, so vpdpbusd of the low nibbles with the token row's int8 codes at positions 0-31 (held twice,
// one copy per weight row) and then of the high nibbles with those at 32-63 leaves in each lane the
// integer sum over 8 inputs of one group: one conversion and one FMA per 64 weights and row pair. For
// that, the token rows are rounded with one step per lane's 8 inputs (max |x| / 127 over them; int8
// products take 4), and a lane's scale is its group's times its step. The offsets times the groups'
// rounded sums are added per chunk for a block's 4 rows at once. ~9 vector instructions per 128
// weights and token row where a product per 64 weights and row took ~22 (cut because the int4 draft's
// products ran 18 GB/s against 33 for float32 ones on a 2-core AMD EPYC); the draft's acceptance is
// unchanged (results/README.md, "The int4 draft's products"). (One step per 32 inputs, the weights' groups, as
// llama.cpp's Q8_1, needs no step vector but lowered it: alpha 0.911 -> 0.887 on 8 MT-Bench questions.)
struct Q4Rows {
  int64_t chunks;
  std::vector<int8_t> codes;  // (M, chunks, 128): the codes at positions 0-31 twice, then at 32-63 twice
  std::vector<float> steps;   // (M, chunks, 16): lane l's step (l % 8: positions 4 l .. 4 l + 3 and 32 + those), twice
  std::vector<float> sums;    // (M, chunks, 2): groups A and B: the sum of step times code over the group

  // Lane l of the positions' vectors reads inputs 4 k .. 4 k + 3 and 4 k + 16 .. 4 k + 19 of its chunk, k =
  // 8 (l % 2) + l / 2: the same 128-bit quarter of input vectors 0 and 1 (l even) or 2 and 3 (l odd).
  Q4Rows(const float* x, int64_t rows, int64_t d)
      : chunks(q4_chunks(d)), codes(rows * chunks * 128), steps(rows * chunks * 16), sums(rows * chunks * 2) {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t g = m * chunks + c, i0 = c * 64;
        __m512 v[4], top[2];
        for (int i = 0; i < 4; ++i) {  // a padded half chunk reads zeros
          const int64_t n = std::clamp<int64_t>(d - i0 - 16 * i, 0, 16);
          v[i] = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), x + m * d + i0 + 16 * i);
        }
        for (int h = 0; h < 2; ++h) {  // h = l % 2: vectors 2 h, 2 h + 1
          __m512 t = _mm512_max_ps(_mm512_abs_ps(v[2 * h]), _mm512_abs_ps(v[2 * h + 1]));
          t = _mm512_max_ps(t, _mm512_permute_ps(t, 0xB1));  // neighbours
          top[h] = _mm512_max_ps(t, _mm512_permute_ps(t, 0x4E));  // each quarter's maximum, in all its lanes
        }
        __m128i q[4];
        int32_t sum[4][16];
        for (int i = 0; i < 4; ++i) {
          const __m512 t = top[i / 2];
          const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(127.0f), t);
          const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
          q[i] = _mm512_cvtepi32_epi8(qi);
          _mm512_storeu_si512(sum[i], qi);
        }
        int8_t* out = codes.data() + g * 128;  // lane l: dword l / 2 of q[0] (l even) or q[2] (odd); high positions q[1], q[3]
        const __m256i lo = _mm256_set_m128i(_mm_unpackhi_epi32(q[0], q[2]), _mm_unpacklo_epi32(q[0], q[2]));
        const __m256i hi = _mm256_set_m128i(_mm_unpackhi_epi32(q[1], q[3]), _mm_unpacklo_epi32(q[1], q[3]));
        _mm512_storeu_si512(out, _mm512_inserti64x4(_mm512_castsi256_si512(lo), lo, 1));
        _mm512_storeu_si512(out + 64, _mm512_inserti64x4(_mm512_castsi256_si512(hi), hi, 1));
        float tops[2][16];
        _mm512_storeu_ps(tops[0], top[0]);
        _mm512_storeu_ps(tops[1], top[1]);
        for (int l = 0; l < 8; ++l) {
          const int h = l % 2, k = l / 2;  // quarter k of vectors 2 h and 2 h + 1
          const float step = tops[h][4 * k] / 127.0f;
          int32_t codes_sum = 0;
          for (int j = 0; j < 4; ++j) codes_sum += sum[2 * h][4 * k + j] + sum[2 * h + 1][4 * k + j];
          steps[g * 16 + l] = steps[g * 16 + 8 + l] = step;
          sums[g * 2 + h] += step * static_cast<float>(codes_sum);
        }
      }
  }
};

// A 4-bit block (chunks chunks at block) times M token rows: y[m * ldy + r] (+ bias[r]) for its kQ4Rows rows.
template <int M>
inline void q4_block_vnni(const Q4Rows& xq, const uint8_t* block, const Prefetch& pf, const float* bias, float* y, int64_t ldy) {
  const int64_t chunks = xq.chunks;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i pair_lanes[2] = {_mm512_set_epi32(3, 2, 3, 2, 3, 2, 3, 2, 1, 0, 1, 0, 1, 0, 1, 0),  // rows 0, 1: (sA, sB) x 4 each
                                 _mm512_set_epi32(7, 6, 7, 6, 7, 6, 7, 6, 5, 4, 5, 4, 5, 4, 5, 4)};
  Vec acc[2 * M];  // acc[p * M + m]: lanes 0-7 rows 2p, lanes 8-15 row 2p + 1, times token row m
  __m256 offsets[M];  // lanes (2 r, 2 r + 1): row r's offsets (A, B) times the groups' rounded sums
  for (int i = 0; i < 2 * M; ++i) acc[i] = vzero();
  for (int m = 0; m < M; ++m) offsets[m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* chunk = block + c * kQ4Bytes;
    for (int i = 0; i < kQ4Bytes; i += 64) prefetch_ahead(chunk + i, pf);
    const __m256 o = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + 144)));
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + 128)));
    __m512i lo[2], hi[2];
    for (int p = 0; p < 2; ++p) {
      const __m512i b = _mm512_loadu_si512(chunk + 64 * p);
      lo[p] = _mm512_and_si512(b, low);
      hi[p] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
    }
    const __m512 scales = _mm512_castps256_ps512(s);  // rows 0-3: (sA, sB)
    const Vec pair_scales[2] = {_mm512_permutexvar_ps(pair_lanes[0], scales), _mm512_permutexvar_ps(pair_lanes[1], scales)};
    for (int m = 0; m < M; ++m) {
      const int64_t g = m * chunks + c;
      offsets[m] = _mm256_fmadd_ps(o, _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(xq.sums.data() + 2 * g))), offsets[m]);
      const Vec steps = in_register(_mm512_loadu_ps(xq.steps.data() + 16 * g));
      const int8_t* xc = xq.codes.data() + 128 * g;
      const __m512i xlo = in_register(_mm512_loadu_si512(xc)), xhi = in_register(_mm512_loadu_si512(xc + 64));
      for (int p = 0; p < 2; ++p) {
        const __m512i dots = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[p], xlo), hi[p], xhi);
        const Vec lane_scales = _mm512_mul_ps(pair_scales[p], steps);
        acc[p * M + m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), lane_scales, acc[p * M + m]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    float o[8], a[32];
    _mm256_storeu_ps(o, offsets[m]);
    _mm512_storeu_ps(a, acc[m]);
    _mm512_storeu_ps(a + 16, acc[M + m]);
    for (int r = 0; r < kQ4Rows; ++r) {
      float v = o[2 * r] + o[2 * r + 1];
      for (int l = 0; l < 8; ++l) v += a[8 * r + l];
      y[m * ldy + r] = bias ? v + bias[r] : v;
    }
  }
}

#else
constexpr bool kInt8Activations = false;
#endif

// An upper bound of |x - x~| (Euclidean norm), x~ the token row x (d floats) as an int8 product
// sees it: rounded to int8 per kActGroup inputs with step max |x| / 127 over them, so each input
// is off by at most half a step; 0 where the products take float32 rows.
inline float rounding_bound(const float* x, int64_t d) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (d % 64 == 0) {
    double sum = 0.0;  // sum over groups of kActGroup (step / 2)^2 = top^2 / 127^2
    for (int64_t g = 0; g < d; g += kActGroup) {
      float top = 0.0f;
      for (int k = 0; k < kActGroup; ++k) top = std::max(top, std::abs(x[g + k]));
      sum += static_cast<double>(top) * top;
    }
    return static_cast<float>(std::sqrt(sum) / 127.0);
  }
#endif
  return 0.0f;
}

// y (rows, n) = x (rows, d) @ w (4-bit blocks, the layout above)^T + bias: the blocks split over
// torch's threads, each block read once per kMaxRows token rows.
inline void q4_rows(const float* x, int64_t rows, int64_t d, const uint8_t* w, const float* bias, float* y, int64_t n) {
  const int64_t chunks = q4_chunks(d), block_bytes = chunks * kQ4Bytes;
  const int64_t grain = std::max<int64_t>(1, 32768 / (kQ4Rows * 64 * chunks));  // blocks per task (>= ~32K weights)
  for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
    const int M = static_cast<int>(std::min<int64_t>(kMaxRows, rows - m0));
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const Q4Rows xq(x + m0 * d, M, d);
#else
    const std::vector<float> xp = q4_positions(x + m0 * d, M, d);
#endif
    at::parallel_for(0, n / kQ4Rows, grain, [&](int64_t b0, int64_t b1) {
      with_rows(M, [&](auto m) {
        constexpr int MM = decltype(m)::value;
        const Prefetch pf = prefetch_plan(kInt4, MM);
        for (int64_t b = b0; b < b1; ++b) {
          const uint8_t* block = w + b * block_bytes;
          const float* bb = bias ? bias + b * kQ4Rows : nullptr;
          float* yb = y + m0 * n + b * kQ4Rows;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
          q4_block_vnni<MM>(xq, block, pf, bb, yb, n);
#else
          for (int r = 0; r < kQ4Rows; ++r) q4_row_floats<MM>(xp.data(), block, chunks, r, pf, bb, yb, n);
#endif
        }
      });
    });
  }
}

// y (rows, n) = x (rows, d) @ w (n rows of stride ldw)^T * scale + bias: the weight rows split over
// torch's threads, each weight row read once per kMaxRows token rows. 4-bit weights: q4_rows (w at a
// block's start, scale unused).
template <typename W>
inline void linear_rows(const float* x, int64_t rows, int64_t d, const W* w, int64_t ldw, const float* scale,
                        const float* bias, float* y, int64_t n) {
  if constexpr (std::is_same_v<W, q4_t>) {
    return q4_rows(x, rows, d, &w->bits, bias, y, n);
  } else {
    // Enough weight rows per task (>= ~32K weights) that the threads' start-up cost stays small.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
    auto at = [](const float* p, int64_t n) { return p ? p + n : nullptr; };
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if constexpr (std::is_same_v<W, int8_t>) {
      if (d % 64 == 0) {
        for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
          const int M = static_cast<int>(std::min<int64_t>(kMaxRows, rows - m0));
          const Int8Rows xq(x + m0 * d, M, d);
          at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
            with_rows(M, [&](auto m) {
              blocks<decltype(m)::value>(kInt8, n0, n1, [&](auto r, int64_t i) {
                rows_block_int8<decltype(m)::value, decltype(r)::value>(xq, w + i * ldw, ldw, scale + i, at(bias, i), y + m0 * n + i, n);
              });
            });
          });
        }
        return;
      }
    }
#endif
    at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
        with_rows(static_cast<int>(std::min<int64_t>(kMaxRows, rows - m0)), [&](auto m) {
          blocks<decltype(m)::value>(kind_of<W>, n0, n1, [&](auto r, int64_t i) {
            rows_block<decltype(m)::value, decltype(r)::value>(x + m0 * d, d, w + i * ldw, ldw, at(scale, i), at(bias, i), y + m0 * n + i, n);
          });
        });
      }
    });
  }
}

}  // namespace specgate_cpu
