// The tile machinery shared by the C++ CPU kernels (attention_cpu.cpp: fwd and bwd; decode_cpu.cpp:
// fwd_kvcache): inputs are converted tile by tile into float scratch buffers and multiplied by gemm
// (or, bf16 on AVX512_BF16, packed as bf16 pairs for gemm_bf16_pairs: bf16_pairs.h, products.h), and the online
// softmax, softcap and ALiBi run on the float score tiles.
//
// Everything here has internal linkage (an unnamed namespace): each kernel file compiles its own
// copy, so the hot loops inline into its passes and its multiversioned functions resolve within it,
// exactly as when they lived in attention_cpu.cpp alone.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "isa.h"

// setup.py compiles for the baseline ISA (SSE2 on x86-64), which leaves most of an AVX2 or AVX-512
// core idle. The few functions holding the hot loops are therefore compiled once per x86-64 ISA
// level: the loader picks the best one the CPU has (GCC function multiversioning, via ifunc), but for
// the tile products, whose level is cpu_isa() (isa.h), so that each can be forced and tested.
#ifdef FA_X86_MULTIVERSIONING
#include <immintrin.h>
#define FA_MULTIVERSIONED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_MULTIVERSIONED
#endif

namespace fused_attention {
namespace {

constexpr int64_t kBlock = 64;  // query rows of a query tile, keys of a key tile
// gemm takes rows in multiples of kMicroRows and columns in multiples of kMicroCols, so scratch tiles
// are padded to those (see gemm_blocks). Scratch tiles are sized so that gemm can run over them: their
// padding rows and columns hold leftovers of earlier tiles (zeros at first), which only ever flow
// into padding rows or columns of a product, never into a stored result.
constexpr int64_t kMicroRows = 4;
constexpr int64_t kMicroCols = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---------------------------------------------------------------------------------------------
// Float math on scratch tiles (the hot loops)

// Clamps an exponent to [-127, 127], where exp2_poly is valid; 2^-127 is below every probability
// that matters, and masked scores arrive as -inf. Loops apply it in a loop of its own, apart from
// the exp2_poly loop: under the default -ftrapping-math, GCC vectorizes no loop in which a float
// compare is followed by more float arithmetic.
inline float clamp_exponent(float x) {
  x = x < -127.0f ? -127.0f : x;
  return x > 127.0f ? 127.0f : x;
}

// 2^x for x in [-127, 127] without a libm call or a compare, so that loops over it vectorize:
// x = n + f with n an integer and |f| <= 1/2; 2^n comes from the exponent bits, 2^f from its
// Taylor polynomial of degree 7 (relative error < 1e-8, below float rounding). 2^-127 gives 0.
inline float exp2_poly(float x) {
  const int32_t n = static_cast<int32_t>(x + 127.5f) - 127;  // round(x): the cast truncates a value >= 0
  const float f = x - static_cast<float>(n);
  float p = 1.5252733804059840e-5f;  // ln(2)^k / k!, k = 7 down to 0
  p = p * f + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const uint32_t exponent_bits = static_cast<uint32_t>(n + 127) << 23;  // n = -127 gives +0.0f
  return p * std::bit_cast<float>(exponent_bits);
}

// One R x C block of c = (accumulate ? c : 0) + a * b, starting at row r0 and column c0, held in
// registers while the depth loop runs. Inlined into each ISA's gemm below, so compiled for that ISA.
#define FA_BLOCK_ARGS                                                                                           \
  bool accumulate, int64_t r0, int64_t c0, int64_t depth, const float *a, int64_t a_row_stride,               \
      int64_t a_depth_stride, const float *b, int64_t ldb, float *c, int64_t ldc

// Plain loops, which the compiler vectorizes over the block's columns.
struct PlainBlock {
  template <int R, int C>
  [[gnu::always_inline]] static inline void run(FA_BLOCK_ARGS) {
    float block[R][C];
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < C; ++j) block[r][j] = accumulate ? c[(r0 + r) * ldc + c0 + j] : 0.0f;
    }
    for (int64_t k = 0; k < depth; ++k) {
      const float* b_row = b + k * ldb + c0;
      for (int64_t r = 0; r < R; ++r) {
        const float a_rk = a[(r0 + r) * a_row_stride + k * a_depth_stride];
        for (int64_t j = 0; j < C; ++j) block[r][j] += a_rk * b_row[j];
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < C; ++j) c[(r0 + r) * ldc + c0 + j] = block[r][j];
    }
  }
};

// The same written with 8-float vectors (GCC's vector extension): each depth step loads b's row once
// into registers and broadcasts each a element once. Left to vectorize the plain loops of a 6 x 16
// block, GCC splits rows into 8 + 4 + 2 + 1 + 1 lanes and keeps them on the stack.
typedef float Float8 __attribute__((vector_size(32)));

struct Float8Block {
  template <int R, int C>
  [[gnu::always_inline]] static inline void run(FA_BLOCK_ARGS) {
    constexpr int V = C / 8;
    Float8 block[R][V];
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        block[r][v] = Float8{};
        if (accumulate) std::memcpy(&block[r][v], c + (r0 + r) * ldc + c0 + 8 * v, sizeof(Float8));
      }
    }
    for (int64_t k = 0; k < depth; ++k) {
      Float8 b_row[V];
      for (int v = 0; v < V; ++v) std::memcpy(&b_row[v], b + k * ldb + c0 + 8 * v, sizeof(Float8));
      for (int r = 0; r < R; ++r) {
        const float x = a[(r0 + r) * a_row_stride + k * a_depth_stride];
        const Float8 a_rk = {x, x, x, x, x, x, x, x};  // one vbroadcastss (x + Float8{} would add first)
        for (int v = 0; v < V; ++v) block[r][v] += a_rk * b_row[v];
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) std::memcpy(c + (r0 + r) * ldc + c0 + 8 * v, &block[r][v], sizeof(Float8));
    }
  }
};

// c over R x C blocks. C divides kMicroCols; R is kMicroRows, or 6, whose last 2 or 4 rows (rows
// being a multiple of kMicroRows = 4) are done by a smaller block.
template <typename Block, int R, int C>
[[gnu::always_inline]] inline void gemm_blocks(bool accumulate, int64_t rows, int64_t cols, int64_t depth,
                                               const float* a, int64_t a_row_stride, int64_t a_depth_stride,
                                               const float* b, int64_t ldb, float* c, int64_t ldc) {
  static_assert(kMicroCols % C == 0 && (R == kMicroRows || R == 6));
  for (int64_t r0 = 0; r0 < rows;) {
    const int64_t block_rows = std::min<int64_t>(R, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += C) {
      if (block_rows == R) {
        Block::template run<R, C>(accumulate, r0, c0, depth, a, a_row_stride, a_depth_stride, b, ldb, c, ldc);
      } else if (block_rows == 4) {
        Block::template run<4, C>(accumulate, r0, c0, depth, a, a_row_stride, a_depth_stride, b, ldb, c, ldc);
      } else {
        Block::template run<2, C>(accumulate, r0, c0, depth, a, a_row_stride, a_depth_stride, b, ldb, c, ldc);
      }
    }
    r0 += block_rows;
  }
}

// c[rows x cols] = (accumulate ? c : 0) + a[rows x depth] * b[depth x cols]. b and c are row-major
// with leading dimensions ldb, ldc; a's element (r, k) is a[r * a_row_stride + k * a_depth_stride],
// so a transposed tile is read in place (only ever one scalar of a is broadcast at a time, so its
// layout costs nothing). rows must be a multiple of kMicroRows, cols of kMicroCols.
#define FA_GEMM_ARGS                                                                                       \
  bool accumulate, int64_t rows, int64_t cols, int64_t depth, const float *a, int64_t a_row_stride,       \
      int64_t a_depth_stride, const float *b, int64_t ldb, float *c, int64_t ldc
#define FA_GEMM_CALL accumulate, rows, cols, depth, a, a_row_stride, a_depth_stride, b, ldb, c, ldc
#ifdef FA_X86_MULTIVERSIONING
// One R x 32 block of gemm with AVX-512 intrinsics (2R of the 32 vector registers, 2 for b's row, 1 for
// a broadcast): GCC keeps neither the plain loops of an 8 x 32 block nor their vector-extension form
// in registers.
template <int R>
__attribute__((target("arch=x86-64-v4"))) [[gnu::always_inline]] inline void avx512_block(FA_BLOCK_ARGS) {
  __m512 block[R][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const float* c_row = c + (r0 + r) * ldc + c0;
    block[r][0] = accumulate ? _mm512_loadu_ps(c_row) : _mm512_setzero_ps();
    block[r][1] = accumulate ? _mm512_loadu_ps(c_row + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * ldb + c0), b1 = _mm512_loadu_ps(b + k * ldb + c0 + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a_rk = _mm512_set1_ps(a[(r0 + r) * a_row_stride + k * a_depth_stride]);
      block[r][0] = _mm512_fmadd_ps(a_rk, b0, block[r][0]);
      block[r][1] = _mm512_fmadd_ps(a_rk, b1, block[r][1]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* c_row = c + (r0 + r) * ldc + c0;
    _mm512_storeu_ps(c_row, block[r][0]);
    _mm512_storeu_ps(c_row + 16, block[r][1]);
  }
}

// The block shape is the ISA's. The 16 vector registers of AVX2 hold a 6 x 16 block of c (12
// registers), a row of b (2) and a broadcast of a (1); a 4 x 32 block would need 16 + 1, and GCC
// spills accumulators to the stack in the depth loop. AVX-512's 32 registers hold an 8 x 32 block
// (16), b's row (2) and a broadcast.
__attribute__((target("arch=x86-64-v4"))) void gemm_avx512(FA_GEMM_ARGS) {
  static_assert(kMicroCols == 32);
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    for (int64_t c0 = 0; c0 < cols; c0 += kMicroCols) {
      if (rows - r0 >= 8) {
        avx512_block<8>(accumulate, r0, c0, depth, a, a_row_stride, a_depth_stride, b, ldb, c, ldc);
      } else {  // rows is a multiple of kMicroRows = 4
        avx512_block<kMicroRows>(accumulate, r0, c0, depth, a, a_row_stride, a_depth_stride, b, ldb, c, ldc);
      }
    }
  }
}
__attribute__((target("arch=x86-64-v3"))) void gemm_avx2(FA_GEMM_ARGS) {
  gemm_blocks<Float8Block, 6, 16>(FA_GEMM_CALL);
}
#endif
void gemm_baseline(FA_GEMM_ARGS) { gemm_blocks<PlainBlock, kMicroRows, 32>(FA_GEMM_CALL); }

void gemm(FA_GEMM_ARGS) {
#ifdef FA_X86_MULTIVERSIONING
  switch (cpu_isa()) {
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512: return gemm_avx512(FA_GEMM_CALL);
    case CpuIsa::kAvx2: return gemm_avx2(FA_GEMM_CALL);
    case CpuIsa::kBaseline: break;
  }
#endif
  gemm_baseline(FA_GEMM_CALL);
}

// Which keys of a tile a query sees. The window (causal being one), as a run of columns [begin, end)
// per row of a score tile, varying by at most one column per row: begin(r) = clamp(begin0 + r *
// begin_step, 0, cols) and likewise end(r) (a row with begin >= end sees nothing). Windows are
// bottom-right aligned, so moving down a row moves each bounded side one column right, in either
// layout.
// Key padding, in a tile that holds both real and padding keys: per key of the tile, 0 for a real
// key and -inf for padding, as column_bias in (query, key) layout (added to the tile's scores) or as
// row_bias in (key, query) layout (a padding key's row sees nothing). Both are null otherwise, so a
// call without padding runs the loops it ran before padding existed, plus one test per tile or row.
struct VisibleColumns {
  int64_t begin0, begin_step, end0, end_step;
  const float* column_bias = nullptr;
  const float* row_bias = nullptr;

  std::pair<int64_t, int64_t> of_row(int64_t r, int64_t cols) const {
    if (row_bias != nullptr && row_bias[r] != 0.0f) return {0, 0};
    return {std::clamp(begin0 + r * begin_step, int64_t{0}, cols), std::clamp(end0 + r * end_step, int64_t{0}, cols)};
  }

  // Sends the scores of padding keys to -inf in the first `cols` columns of a (query, key) score tile.
  void hide_padding(float* s, int64_t lds, int64_t rows, int64_t cols) const {
    if (column_bias == nullptr) return;
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t n = 0; n < cols; ++n) s[m * lds + n] += column_bias[n];
    }
  }
};

// The max and the sum of a row of a tile. An omp simd reduction, GCC's vectorization of these loops,
// ends each row by storing its vector to the stack and combining the lanes one by one (benchmarks/
// NOTES.md, 2026-12-06: 30% of the softmax's time). Where GCC >= 12 builds the x86-64 clones, 16 lanes
// at a time in a vector of GCC's vector extension (one register with AVX-512, two with AVX2), halved by
// shuffles at the end.
#ifdef FA_X86_MULTIVERSIONING
typedef float Floatx16 __attribute__((vector_size(64)));
typedef float Floatx4 __attribute__((vector_size(16)));

// Inlined into each clone of the caller, so no vector crosses a call: GCC's warning that a 64-byte
// vector argument's ABI differs without AVX-512 concerns out-of-line calls only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

[[gnu::always_inline]] inline Floatx16 load16(const float* x) {
  Floatx16 v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

[[gnu::always_inline]] inline float lanes_max(Floatx16 v) {
  const Float8 low8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const Float8 high8 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Float8 m8 = high8 > low8 ? high8 : low8;
  const Floatx4 low4 = __builtin_shufflevector(m8, m8, 0, 1, 2, 3);
  const Floatx4 high4 = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const Floatx4 m4 = high4 > low4 ? high4 : low4;
  const float m01 = m4[1] > m4[0] ? m4[1] : m4[0], m23 = m4[3] > m4[2] ? m4[3] : m4[2];
  return m23 > m01 ? m23 : m01;
}

[[gnu::always_inline]] inline float lanes_sum(Floatx16 v) {
  const Float8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Floatx4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
#endif

// max(x[0], ..., x[n - 1]); -inf for n = 0.
[[gnu::always_inline]] inline float max_of(const float* x, int64_t n) {
  float result = -kInf;
#ifdef FA_X86_MULTIVERSIONING
  int64_t i = 0;
  if (n >= 16) {
    Floatx16 m = load16(x);
    for (i = 16; i + 16 <= n; i += 16) {
      const Floatx16 v = load16(x + i);
      m = v > m ? v : m;
    }
    result = lanes_max(m);
  }
  for (; i < n; ++i) result = x[i] > result ? x[i] : result;
#else
#pragma omp simd reduction(max : result)  // a max reduction over floats needs it to vectorize
  for (int64_t i = 0; i < n; ++i) result = x[i] > result ? x[i] : result;
#endif
  return result;
}

// x[0] + ... + x[n - 1].
[[gnu::always_inline]] inline float sum_of(const float* x, int64_t n) {
  float result = 0.0f;
#ifdef FA_X86_MULTIVERSIONING
  int64_t i = 0;
  if (n >= 16) {
    Floatx16 sum = load16(x);
    for (i = 16; i + 16 <= n; i += 16) sum += load16(x + i);
    result = lanes_sum(sum);
  }
  for (; i < n; ++i) result += x[i];
#else
#pragma omp simd reduction(+ : result)  // lets GCC reorder the sum (-fopenmp; setup.py passes it)
  for (int64_t i = 0; i < n; ++i) result += x[i];
#endif
  return result;
}
#ifdef FA_X86_MULTIVERSIONING
#pragma GCC diagnostic pop
#endif

// One key tile of the forward's online softmax, for each query row m < rows of the score tile s:
// the row's visible scores become p = 2^(s - new running max), its other columns up to cols 0;
// the running sum and the accumulator row are rescaled to the new max.
FA_MULTIVERSIONED void online_softmax_step(float* s, int64_t lds, int64_t rows, int64_t cols, VisibleColumns visible,
                                           float* running_max, float* running_sum, float* acc, int64_t ldacc,
                                           int64_t acc_cols) {
  visible.hide_padding(s, lds, rows, cols);
  for (int64_t m = 0; m < rows; ++m) {
    float* s_row = s + m * lds;
    const auto [begin, end] = visible.of_row(m, cols);
    const float new_max = std::max(running_max[m], max_of(s_row + begin, end - begin));
    if (new_max == -kInf) {  // this row has seen no key yet: nothing to add, nothing to rescale
      std::fill(s_row, s_row + cols, 0.0f);
      continue;
    }
    for (int64_t n = begin; n < end; ++n) s_row[n] = clamp_exponent(s_row[n] - new_max);
    for (int64_t n = begin; n < end; ++n) s_row[n] = exp2_poly(s_row[n]);
    const float tile_sum = sum_of(s_row + begin, end - begin);
    std::fill(s_row, s_row + begin, 0.0f);
    std::fill(s_row + end, s_row + cols, 0.0f);
    const float correction = exp2_poly(clamp_exponent(running_max[m] - new_max));  // 0 while the max is -inf
    running_max[m] = new_max;
    running_sum[m] = running_sum[m] * correction + tile_sum;
    if (correction != 1.0f) {  // the max moved (after the first tiles, in few rows)
      float* acc_row = acc + m * ldacc;
      for (int64_t d = 0; d < acc_cols; ++d) acc_row[d] *= correction;
    }
  }
}

// Softcap and ALiBi on a tile of raw scores, in log2 units. The signed distance i + shift - j of
// element (r, c) is distance0 + r * row_step + c * col_step, which covers both tile layouts.
struct ScoreModifier {
  float softcap_log2;  // softcap * log2(e): the tile holds softmax_scale * q.k / softcap; 0: no softcap
  float slope_log2;    // the ALiBi slope * log2(e); 0: no ALiBi
  int64_t distance0, row_step, col_step;
};

// tanh(x) for each x of a row of at most kBlock values, into t, without a libm call (which would be
// most of a softcapped tile's time) and vectorizable: the odd Taylor polynomial of degree 17 for |x|
// < 1/2 (truncation below 1e-8 relative), (1 - e) / (1 + e) with e = exp(-2|x|) >= e^-1 above, where
// 1 - e does not cancel; under 4 ulp everywhere. The branch is chosen by an integer compare of the
// bits of |x|, and the exponent clamped in a loop of its own, for the vectorizer's sake (see
// clamp_exponent).
inline void tanh_row(const float* x, float* t, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) t[c] = clamp_exponent(-2.0f * kLog2e * std::fabs(x[c]));
  for (int64_t c = 0; c < cols; ++c) {
    const float e = exp2_poly(t[c]);
    const float saturating = std::copysign((1.0f - e) / (1.0f + e), x[c]);
    const float x2 = x[c] * x[c];
    float p = 5.9002744094558599e-4f;  // the Taylor coefficients of tanh, x^17 down to x^1
    p = p * x2 - 1.4558343870513183e-3f;
    p = p * x2 + 3.5921280365724810e-3f;
    p = p * x2 - 8.8632355299021966e-3f;
    p = p * x2 + 2.1869488536155203e-2f;
    p = p * x2 - 5.3968253968253968e-2f;
    p = p * x2 + 1.3333333333333333e-1f;
    p = p * x2 - 3.3333333333333333e-1f;
    p = p * x2 + 1.0f;
    const bool small = (std::bit_cast<uint32_t>(x[c]) & 0x7fffffffu) < std::bit_cast<uint32_t>(0.5f);
    t[c] = small ? x[c] * p : saturating;
  }
}

// s = softcap_log2 * t with t = tanh(s) (t also goes to tanh_tile where that is not null, for the
// backward), and s -= slope_log2 * |distance|, over the first rows x cols (cols <= kBlock) of the tile.
FA_MULTIVERSIONED void modify_scores(float* s, int64_t lds, int64_t rows, int64_t cols, const ScoreModifier& mod,
                                     float* tanh_tile) {
  float t[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    float* s_row = s + r * lds;
    if (mod.softcap_log2 != 0.0f) {
      tanh_row(s_row, t, cols);
      for (int64_t c = 0; c < cols; ++c) s_row[c] = mod.softcap_log2 * t[c];
      if (tanh_tile != nullptr) std::copy(t, t + cols, tanh_tile + r * lds);
    }
    if (mod.slope_log2 != 0.0f) {
      // Distances are integers well below 2^24, exact in float.
      const float distance = static_cast<float>(mod.distance0 + r * mod.row_step);
      const float step = static_cast<float>(mod.col_step);
      for (int64_t c = 0; c < cols; ++c) s_row[c] -= mod.slope_log2 * std::fabs(distance + step * c);
    }
  }
}

// What q is multiplied by as its tile is loaded, so that the product q.k is the score in log2 units,
// or with softcap the argument of its tanh (modify_scores makes that the score in log2 units).
inline float query_multiplier(float softmax_scale, float softcap) {
  return softcap > 0.0f ? softmax_scale / softcap : softmax_scale * kLog2e;
}

// ---------------------------------------------------------------------------------------------
// Moving tiles between the tensors and the scratch buffers

// A (B, H, N, D) tensor read in place: row n of head (b, h) starts at rows(b, h, n), elements
// along D are contiguous.
template <typename T>
struct StridedRows {
  const T* data;
  int64_t stride_b, stride_h, stride_n;

  const T* rows(int64_t b, int64_t h, int64_t n) const { return data + b * stride_b + h * stride_h + n * stride_n; }
};

template <typename T>
StridedRows<T> strided_rows(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The same for an output: dense outputs are contiguous, varlen ones (total, H, D) seen as (1, H, total, D).
template <typename T>
struct OutputRows {
  T* data;
  int64_t stride_b, stride_h, stride_n;

  T* rows(int64_t b, int64_t h, int64_t n) const { return data + b * stride_b + h * stride_h + n * stride_n; }
};

template <typename T>
OutputRows<T> output_rows(at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The float value of an input element. c10's own fp16 conversion branches, which keeps GCC from
// vectorizing the tile loads; this one is branch-free, and exact for every fp16 value: normals and
// subnormals by rescaling the exponent from fp16's bias to float's, inf and NaN by filling it.
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) {
  const uint32_t magnitude = static_cast<uint32_t>(x.x & 0x7fff) << 13;
  const float rescaled = std::bit_cast<float>(magnitude) * 0x1p112f;
  const uint32_t inf_or_nan = magnitude >= (0x7c00u << 13) ? 0x7f800000u : 0u;
  const uint32_t sign = static_cast<uint32_t>(x.x & 0x8000) << 16;
  return std::bit_cast<float>(std::bit_cast<uint32_t>(rescaled) | inf_or_nan | sign);
}

// dst[r][c] = multiplier * src[r][c] for r < rows, c < cols, into a float tile of leading dimension ld.
template <typename scalar_t>
void load_tile(float* dst, int64_t ld, const scalar_t* src, int64_t src_row_stride, int64_t rows, int64_t cols,
               float multiplier) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src_row = src + r * src_row_stride;
    for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = multiplier * to_float(src_row[c]);
  }
}

// The transpose: dst[c][r] = multiplier * src[r][c].
template <typename scalar_t>
void load_tile_transposed(float* dst, int64_t ld, const scalar_t* src, int64_t src_row_stride, int64_t rows,
                          int64_t cols, float multiplier) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src_row = src + r * src_row_stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = multiplier * to_float(src_row[c]);
  }
}

// dst[r][c] = multiplier * src[r][c] into rows of cols contiguous elements, dst_row_stride apart.
template <typename scalar_t>
void store_tile(scalar_t* dst, int64_t dst_row_stride, const float* src, int64_t ld, int64_t rows, int64_t cols,
                float multiplier) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      dst[r * dst_row_stride + c] = static_cast<scalar_t>(multiplier * src[r * ld + c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The geometry of a problem

// What a key tile of a batch element holds, for key padding.
enum class KeyTile : uint8_t { kReal, kMixed, kPadding };

// One attention problem of the call: query rows q_offset .. q_offset + n_q - 1 and key rows
// k_offset .. k_offset + n_k - 1 of batch element `batch` of the 4-D tensors. Dense: batch element
// b whole. Varlen: one packed sequence of batch element 0.
struct Sequence {
  int64_t index;  // b: the batch element (dense) or the sequence's place in cu_seqlens (varlen)
  int64_t batch, q_offset, k_offset, n_q, n_k;
  // The window: query i sees keys i + diagonal() - window_left <= j <= i + diagonal() + window_right,
  // -1 leaving that side unbounded (causal: right 0). make_shape sends a bound that hides nothing in
  // this sequence to -1, so such windows and plain calls run the same loops.
  int64_t window_left, window_right;
  // Key padding: per key, 0 for a real key and -inf for padding; per key tile, its KeyTile. Null
  // without a key_padding_mask.
  const float* key_bias;
  const KeyTile* key_tiles;

  int64_t diagonal() const { return n_k - n_q; }  // query i's window is centred on key i + diagonal()

  // The keys [key_begin(query0), key_end(query_end)) hold every key that some query of [query0,
  // query_end) sees, and the queries [query_begin(key0), query_end(key_end)) every query that sees
  // some key of [key0, key_end).
  int64_t key_begin(int64_t query0) const {
    return window_left < 0 ? 0 : std::clamp(query0 + diagonal() - window_left, int64_t{0}, n_k);
  }
  int64_t key_end(int64_t query_end) const {
    return window_right < 0 ? n_k : std::clamp(query_end + diagonal() + window_right, int64_t{0}, n_k);
  }
  int64_t query_begin(int64_t key0) const {
    return window_right < 0 ? 0 : std::clamp(key0 - diagonal() - window_right, int64_t{0}, n_q);
  }
  int64_t query_end(int64_t key_end) const {
    return window_left < 0 ? n_q : std::clamp(key_end - diagonal() + window_left, int64_t{0}, n_q);
  }
  // Whether every key of the tile starting at key0 is padding: no query sees it, so it is skipped.
  bool key_tile_hidden(int64_t key0) const {
    return key_tiles != nullptr && key_tiles[key0 / kBlock] == KeyTile::kPadding;
  }

  // The keys of the tile starting at key0 that each query of the tile starting at query0 sees,
  // in (query, key) layout, and in (key, query) layout.
  VisibleColumns keys_seen(int64_t query0, int64_t key0) const {
    VisibleColumns visible{0, 0, kBlock, 0};
    if (window_left >= 0) visible.begin0 = query0 + diagonal() - window_left - key0, visible.begin_step = 1;
    if (window_right >= 0) visible.end0 = query0 + diagonal() + window_right + 1 - key0, visible.end_step = 1;
    visible.column_bias = padding_of_tile(key0);
    return visible;
  }
  VisibleColumns queries_seeing(int64_t key0, int64_t query0) const {
    VisibleColumns visible{0, 0, kBlock, 0};
    if (window_right >= 0) visible.begin0 = key0 - diagonal() - window_right - query0, visible.begin_step = 1;
    if (window_left >= 0) visible.end0 = key0 - diagonal() + window_left + 1 - query0, visible.end_step = 1;
    visible.row_bias = padding_of_tile(key0);
    return visible;
  }

 private:
  const float* padding_of_tile(int64_t key0) const {
    return key_tiles != nullptr && key_tiles[key0 / kBlock] == KeyTile::kMixed ? key_bias + key0 : nullptr;
  }
};

// Head-dim-wide scratch tiles are padded to ld_d columns, so gemm over them needs no edge case.
int64_t padded_head_dim(int64_t head_dim) { return round_up(head_dim, kMicroCols); }

// Calls body with a value of the C++ element type of dtype (one of the three checks.h admits).
template <typename Body>
void dispatch_dtype(at::ScalarType dtype, const Body& body) {
  switch (dtype) {
    case at::kFloat: return body(float{});
    case at::kHalf: return body(c10::Half{});
    case at::kBFloat16: return body(c10::BFloat16{});
    default: TORCH_CHECK(false, "fused_attention: unsupported dtype ", dtype);
  }
}

}  // namespace
}  // namespace fused_attention
