// The C++ CPU attention kernels: FlashAttention-2's tiled online softmax in plain C++.
//
// A call is a list of sequences: the batch elements of dense 4-D tensors, or the packed sequences
// that cu_seqlens cut out of batch 0 (varlen). Each (sequence, head, tile) is one work item of
// at::parallel_for. A work item converts the tiles it needs into float scratch buffers (inputs may
// be fp16/bf16 and strided), does all math in float there, and writes only its own output rows: no
// atomics. o, lse, dK and dV do not depend on the number of threads; dQ, summed from per-thread
// buffers, is the same from run to run at a given one.
// - forward, per query tile: running max, running sum and a float accumulator over the key tiles;
// - backward: delta = rowsum(dO * O) first, then one pass per key tile recomputing P from q, k and
//   the forward's lse, accumulating dK and dV, and dQ in per-thread buffers summed in a fixed order.
// Scores are kept in log2 units (softmax_scale * log2(e) is folded into q) so exp is one exp2.
// Causal masks are bottom-right aligned per sequence: query i sees keys j <= i + Nk - Nq. A sliding
// window (left, right) generalizes it: query i sees keys i + Nk - Nq - left <= j <= i + Nk - Nq + right
// (causal is right = 0), and only the key tiles (forward) or query tiles (backward) that a tile's
// window reaches are visited, so a fixed window costs O(N * window).
// Softcap and ALiBi rewrite a tile's scores before the masks; dropout multiplies the probabilities by a
// keep-mask that Philox4x32-10 regenerates from (seed, offset, sequence, head, query, key) in both
// passes, never stored. Without these options the passes run the loops they ran before them.
// Grouped-query heads: query head h reads KV head h / (Hq / Hkv) in place; the backward's work item
// for a KV head's key tile loops over the group's query heads, so dK and dV sum over the group in a
// fixed order. Key padding hides keys of a batch element; key tiles that are all padding are skipped.
#include "attention_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "../checks.h"

// setup.py compiles for the baseline ISA (SSE2 on x86-64), which leaves most of an AVX2 or AVX-512
// core idle. The few functions holding the hot loops are therefore compiled once per x86-64 ISA
// level, and the loader picks the best one the CPU has (GCC function multiversioning, via ifunc).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FA_X86_MULTIVERSIONING
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
// The block shape is the ISA's. The 16 vector registers of AVX2 hold a 6 x 16 block of c (12
// registers), a row of b (2) and a broadcast of a (1); a 4 x 32 block would need 16 + 1, and GCC
// spills accumulators to the stack in the depth loop. AVX-512, with 32 registers, keeps 4 x 32.
__attribute__((target("arch=x86-64-v4"))) void gemm(FA_GEMM_ARGS) {
  gemm_blocks<PlainBlock, kMicroRows, 32>(FA_GEMM_CALL);
}
__attribute__((target("arch=x86-64-v3"))) void gemm(FA_GEMM_ARGS) { gemm_blocks<Float8Block, 6, 16>(FA_GEMM_CALL); }
__attribute__((target("default"))) void gemm(FA_GEMM_ARGS) { gemm_blocks<PlainBlock, kMicroRows, 32>(FA_GEMM_CALL); }
#else
void gemm(FA_GEMM_ARGS) { gemm_blocks<PlainBlock, kMicroRows, 32>(FA_GEMM_CALL); }
#endif

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

// One key tile of the forward's online softmax, for each query row m < rows of the score tile s:
// the row's visible scores become p = 2^(s - new running max), its other columns up to cols 0;
// the running sum and the accumulator row are rescaled to the new max.
FA_MULTIVERSIONED void online_softmax_step(float* s, int64_t lds, int64_t rows, int64_t cols, VisibleColumns visible,
                                           float* row_max, float* row_sum, float* acc, int64_t ldacc,
                                           int64_t acc_cols) {
  visible.hide_padding(s, lds, rows, cols);
  for (int64_t m = 0; m < rows; ++m) {
    float* s_row = s + m * lds;
    const auto [begin, end] = visible.of_row(m, cols);
    float tile_max = -kInf;
#pragma omp simd reduction(max : tile_max)  // a max reduction over floats needs it to vectorize
    for (int64_t n = begin; n < end; ++n) tile_max = s_row[n] > tile_max ? s_row[n] : tile_max;
    const float new_max = std::max(row_max[m], tile_max);
    if (new_max == -kInf) {  // this row has seen no key yet: nothing to add, nothing to rescale
      std::fill(s_row, s_row + cols, 0.0f);
      continue;
    }
    for (int64_t n = begin; n < end; ++n) s_row[n] = clamp_exponent(s_row[n] - new_max);
    float tile_sum = 0.0f;
#pragma omp simd reduction(+ : tile_sum)  // lets GCC reorder the sum (-fopenmp; setup.py passes it)
    for (int64_t n = begin; n < end; ++n) {
      s_row[n] = exp2_poly(s_row[n]);
      tile_sum += s_row[n];
    }
    std::fill(s_row, s_row + begin, 0.0f);
    std::fill(s_row + end, s_row + cols, 0.0f);
    const float correction = exp2_poly(clamp_exponent(row_max[m] - new_max));  // 0 when row_max is still -inf
    row_max[m] = new_max;
    row_sum[m] = row_sum[m] * correction + tile_sum;
    float* acc_row = acc + m * ldacc;
    for (int64_t d = 0; d < acc_cols; ++d) acc_row[d] *= correction;
  }
}

// The backward's P and dS = P * (dP - delta) for a tile in (key row, query column) layout: P over the
// scores s, dS over dp, 0 where the key is hidden. Column m has log2-sum-exp lse2[m] and delta[m].
// With dropout, keep (same layout) holds 1 / (1 - p) or 0 per element: s gets the dropped P that dV
// needs, and dP is the dropped one. With softcap, tanh_tile (same layout) holds the t of modify_scores:
// dS becomes the gradient of the uncapped score, dS * (1 - t^2). Both are null when the option is off.
FA_MULTIVERSIONED void softmax_grad_key_rows(float* s, float* dp, int64_t ld, int64_t rows, int64_t cols,
                                             VisibleColumns visible, const float* lse2, const float* delta,
                                             const float* keep, const float* tanh_tile) {
  for (int64_t n = 0; n < rows; ++n) {
    float* s_row = s + n * ld;
    float* dp_row = dp + n * ld;
    const auto [begin, end] = visible.of_row(n, cols);
    for (int64_t m = begin; m < end; ++m) s_row[m] = clamp_exponent(s_row[m] - lse2[m]);
    if (keep == nullptr) {
      for (int64_t m = begin; m < end; ++m) {
        const float p = exp2_poly(s_row[m]);
        s_row[m] = p;
        dp_row[m] = p * (dp_row[m] - delta[m]);
      }
    } else {
      const float* keep_row = keep + n * ld;
      for (int64_t m = begin; m < end; ++m) {
        const float p = exp2_poly(s_row[m]);
        s_row[m] = p * keep_row[m];
        dp_row[m] = p * (dp_row[m] * keep_row[m] - delta[m]);
      }
    }
    if (tanh_tile != nullptr) {
      const float* tanh_row = tanh_tile + n * ld;
      for (int64_t m = begin; m < end; ++m) dp_row[m] *= 1.0f - tanh_row[m] * tanh_row[m];
    }
    for (auto [first, last] : {std::pair{int64_t{0}, begin}, std::pair{end, cols}}) {
      std::fill(s_row + first, s_row + last, 0.0f);
      std::fill(dp_row + first, dp_row + last, 0.0f);
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

// The dropout keep-mask every backend draws (attention.dropout_mask gives the same bits): Philox4x32-10
// keyed by the seed, counter (j / 4, i, head, offset), word j % 4; the element of query i and key j
// is kept iff the word is >= threshold = floor(p * 2^32).
struct Dropout {
  uint32_t key0, key1, offset, threshold;
  float keep_scale;  // 1 / (1 - p), the value of a kept element of the mask

  Dropout(double p, int64_t seed, int64_t offset_)
      : key0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        key1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        offset(static_cast<uint32_t>(offset_)),
        threshold(static_cast<uint32_t>(std::floor(p * 4294967296.0))),
        keep_scale(static_cast<float>(1.0 / (1.0 - p))) {}
};

// Four uint32 Philox words, one per 64-bit lane (GCC's vector extension): a product of two of them is
// exact, its high half the lane shifted right by 32. GCC does not vectorize the 32 x 32 -> 64-bit
// multiplies of plain loops (GCC 12), which left Philox most of a dropout tile's time.
typedef uint64_t Uint64x4 __attribute__((vector_size(32)));

// The mask of queries query0 .. query0 + queries - 1 and keys key0 .. key0 + keys - 1 (key0 a multiple
// of 4, keys <= kBlock) of one head, head = (sequence * Hq + h) mod 2^32: keep_scale or 0 at
// keep[m * query_stride + n * key_stride] for query m and key n of the tile, so either tile layout.
// Per query, the kBlock / 4 Philox calls of a tile's keys run side by side, four to a vector.
FA_MULTIVERSIONED void dropout_keep_tile(const Dropout& dropout, uint32_t head, int64_t query0, int64_t queries,
                                         int64_t key0, int64_t keys, float* keep, int64_t query_stride,
                                         int64_t key_stride) {
  constexpr int64_t kVectors = kBlock / 16;  // Philox calls per row of a tile: kBlock / 4, 4 keys each
  const uint64_t low_half = 0xffffffffu;
  for (int64_t m = 0; m < queries; ++m) {
    Uint64x4 c[4][kVectors];  // the counters of the row's calls, and at the end their output words
    for (int64_t v = 0; v < kVectors; ++v) {
      const uint64_t group = static_cast<uint32_t>((key0 >> 2) + 4 * v);
      c[0][v] = Uint64x4{group, group + 1, group + 2, group + 3} & low_half;
      c[1][v] = Uint64x4{} + static_cast<uint32_t>(query0 + m);
      c[2][v] = Uint64x4{} + head;
      c[3][v] = Uint64x4{} + dropout.offset;
    }
    uint64_t k0 = dropout.key0, k1 = dropout.key1;
    for (int round = 0; round < 10; ++round) {
      for (int64_t v = 0; v < kVectors; ++v) {
        const Uint64x4 product0 = c[0][v] * 0xD2511F53u;
        const Uint64x4 product1 = c[2][v] * 0xCD9E8D57u;
        const Uint64x4 next0 = (product1 >> 32) ^ c[1][v] ^ k0;
        const Uint64x4 next2 = (product0 >> 32) ^ c[3][v] ^ k1;
        c[1][v] = product1 & low_half;
        c[3][v] = product0 & low_half;
        c[0][v] = next0;
        c[2][v] = next2;
      }
      k0 = (k0 + 0x9E3779B9u) & low_half;
      k1 = (k1 + 0xBB67AE85u) & low_half;
    }
    // Key n takes word n % 4 of call n / 4, lane n / 4 % 4 of vector n / 16.
    for (int64_t n = 0; n < keys; ++n) {
      keep[m * query_stride + n * key_stride] =
          c[n & 3][n >> 4][(n >> 2) & 3] >= dropout.threshold ? dropout.keep_scale : 0.0f;
    }
  }
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
// The tiled passes

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

struct Shape {
  int64_t batch;   // q.size(0): B (dense) or 1 (varlen)
  int64_t q_rows;  // q.size(2): Nq (dense) or total_q (varlen)
  int64_t heads_q, heads_kv, head_dim;
  std::vector<Sequence> sequences;

  int64_t group() const { return heads_q / heads_kv; }  // query heads per KV head
  // Index of query row i of a sequence's head h in the contiguous (B, Hq, q_rows) layout of lse and delta.
  int64_t row_index(const Sequence& seq, int64_t h, int64_t i) const {
    return (seq.batch * heads_q + h) * q_rows + seq.q_offset + i;
  }
};

// The options of the call that change scores and probabilities (the window lives in each Sequence).
struct ScoreOptions {
  float softmax_scale;
  float softcap;              // 0: off
  const float* alibi_slopes;  // contiguous (sequences, Hq), or null
  std::optional<Dropout> dropout;

  // What q is multiplied by as its tile is loaded, so that the product q.k is the score in log2 units,
  // or with softcap the argument of its tanh (modify_scores makes that the score in log2 units).
  float q_multiplier() const { return softcap > 0.0f ? softmax_scale / softcap : softmax_scale * kLog2e; }
  bool modifies_scores() const { return softcap > 0.0f || alibi_slopes != nullptr; }
  // The modifier of a tile of query head h of seq, whose element (r, c) has distance distance0 + r *
  // row_step + c * col_step.
  ScoreModifier modifier(const Sequence& seq, int64_t h, const Shape& shape, int64_t distance0, int64_t row_step,
                         int64_t col_step) const {
    const float slope = alibi_slopes != nullptr ? alibi_slopes[seq.index * shape.heads_q + h] : 0.0f;
    return {softcap * kLog2e, slope * kLog2e, distance0, row_step, col_step};
  }
  // Dropout's head counter: (b * Hq + h) mod 2^32.
  static uint32_t dropout_head(const Sequence& seq, int64_t h, const Shape& shape) {
    return static_cast<uint32_t>(seq.index * shape.heads_q + h);
  }
};

// Work items over units (a sequence and a head) of varying numbers of tiles, numbered unit after
// unit: item -> (unit, tile). Within a unit, tiles are visited 0, last, 1, last - 1, ... so that the
// contiguous item ranges at::parallel_for gives each thread mix cheap and costly causal tiles.
class TiledWork {
 public:
  template <typename TilesOf>
  TiledWork(int64_t units, const TilesOf& tiles_of) : first_item_(units + 1, 0) {
    for (int64_t unit = 0; unit < units; ++unit) first_item_[unit + 1] = first_item_[unit] + tiles_of(unit);
  }

  int64_t items() const { return first_item_.back(); }
  int64_t first_item(int64_t unit) const { return first_item_[unit]; }
  int64_t end_item(int64_t unit) const { return first_item_[unit + 1]; }
  // The unit of an item (units without tiles hold no item).
  int64_t unit_of(int64_t item) const {
    return std::upper_bound(first_item_.begin(), first_item_.end(), item) - first_item_.begin() - 1;
  }
  std::pair<int64_t, int64_t> split(int64_t item) const {
    const int64_t unit = unit_of(item);
    const int64_t tiles = end_item(unit) - first_item(unit), t = item - first_item(unit);
    return {unit, t % 2 == 0 ? t / 2 : tiles - 1 - t / 2};
  }

 private:
  std::vector<int64_t> first_item_;  // per unit, and the item count last
};

// Head-dim-wide scratch tiles are padded to ld_d columns, so gemm over them needs no edge case.
int64_t padded_head_dim(int64_t head_dim) { return round_up(head_dim, kMicroCols); }

template <typename scalar_t>
void forward_pass(const Shape& shape, const ScoreOptions& options, StridedRows<scalar_t> q, StridedRows<scalar_t> k,
                  StridedRows<scalar_t> v, OutputRows<scalar_t> o, float* lse) {
  const int64_t d = shape.head_dim;
  const int64_t ld_d = padded_head_dim(d);
  const int64_t heads = shape.heads_q;
  const TiledWork work(static_cast<int64_t>(shape.sequences.size()) * heads,
                       [&](int64_t unit) { return ceil_div(shape.sequences[unit / heads].n_q, kBlock); });
  at::parallel_for(0, work.items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_tile(kBlock * ld_d), k_tile_t(d * kBlock), v_tile(kBlock * ld_d);
    std::vector<float> scores(kBlock * kBlock), acc(kBlock * ld_d), row_max(kBlock), row_sum(kBlock);
    std::vector<float> keep(options.dropout ? kBlock * kBlock : 0);
    for (int64_t item = begin; item < end; ++item) {
      const auto [unit, tile] = work.split(item);
      const Sequence& seq = shape.sequences[unit / heads];
      const int64_t b = seq.batch, h = unit % heads, h_kv = h / shape.group();
      const int64_t q0 = tile * kBlock;
      const int64_t rows = std::min(kBlock, seq.n_q - q0);
      const int64_t padded_rows = round_up(rows, kMicroRows);
      load_tile(q_tile.data(), ld_d, q.rows(b, h, seq.q_offset + q0), q.stride_n, rows, d, options.q_multiplier());
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(row_max.begin(), row_max.end(), -kInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);

      // Key tiles stay aligned to multiples of kBlock (the key padding tiles), from the one holding the
      // first key of the query tile's window.
      for (int64_t k0 = seq.key_begin(q0) / kBlock * kBlock; k0 < seq.key_end(q0 + rows); k0 += kBlock) {
        if (seq.key_tile_hidden(k0)) continue;
        const int64_t cols = std::min(kBlock, seq.n_k - k0);
        const int64_t key_row = seq.k_offset + k0;
        load_tile_transposed(k_tile_t.data(), kBlock, k.rows(b, h_kv, key_row), k.stride_n, cols, d, 1.0f);
        load_tile(v_tile.data(), ld_d, v.rows(b, h_kv, key_row), v.stride_n, cols, d, 1.0f);
        gemm(false, padded_rows, round_up(cols, kMicroCols), d, q_tile.data(), ld_d, 1, k_tile_t.data(), kBlock,
             scores.data(), kBlock);
        if (options.modifies_scores()) {
          const int64_t distance0 = q0 + seq.diagonal() - k0;  // query rows, key columns
          modify_scores(scores.data(), kBlock, rows, cols, options.modifier(seq, h, shape, distance0, 1, -1), nullptr);
        }
        online_softmax_step(scores.data(), kBlock, rows, cols, seq.keys_seen(q0, k0), row_max.data(), row_sum.data(),
                            acc.data(), ld_d, d);
        // Dropout drops probabilities after the running sum took them: lse and the normalization are
        // those of the undropped softmax.
        if (options.dropout) {
          dropout_keep_tile(*options.dropout, ScoreOptions::dropout_head(seq, h, shape), q0, rows, k0, cols,
                            keep.data(), kBlock, 1);
          for (int64_t m = 0; m < rows; ++m) {
            for (int64_t n = 0; n < cols; ++n) scores[m * kBlock + n] *= keep[m * kBlock + n];
          }
        }
        gemm(true, padded_rows, ld_d, cols, scores.data(), kBlock, 1, v_tile.data(), ld_d, acc.data(), ld_d);
      }

      const int64_t first_row = shape.row_index(seq, h, q0);
      for (int64_t m = 0; m < rows; ++m) {
        const bool sees_a_key = row_sum[m] > 0.0f;
        store_tile(o.rows(b, h, seq.q_offset + q0 + m), o.stride_n, acc.data() + m * ld_d, ld_d, 1, d,
                   sees_a_key ? 1.0f / row_sum[m] : 0.0f);
        lse[first_row + m] = sees_a_key ? row_max[m] * kLn2 + std::log(row_sum[m]) : -kInf;
      }
    }
  });
}

template <typename scalar_t>
struct BackwardInputs {
  StridedRows<scalar_t> dout, q, k, v, o;
  const float* lse;  // contiguous (B, Hq, q_rows)
};

// delta = rowsum(dO * O) and lse2 = lse * log2(e), both contiguous (B, Hq, q_rows). (The -inf lse
// of a row that sees no key is never used: the passes compute P only where a key is visible.)
template <typename scalar_t>
void row_statistics_pass(const Shape& shape, const BackwardInputs<scalar_t>& in, float* delta, float* lse2) {
  const int64_t n_q = shape.q_rows;
  at::parallel_for(0, shape.batch * shape.heads_q * n_q, kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % n_q, b = row / n_q / shape.heads_q, h = row / n_q % shape.heads_q;
      const scalar_t* dout_row = in.dout.rows(b, h, i);
      const scalar_t* o_row = in.o.rows(b, h, i);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < shape.head_dim; ++c) {
        sum += to_float(dout_row[c]) * to_float(o_row[c]);
      }
      delta[row] = sum;
      lse2[row] = in.lse[row] * kLog2e;
    }
  });
}

// Work items [0, items) cut into `chunks` contiguous runs of equal length (the last may be shorter).
struct Chunks {
  int64_t items, per_chunk;

  Chunks(int64_t items, int64_t chunks) : items(items), per_chunk(ceil_div(items, std::max<int64_t>(chunks, 1))) {}
  int64_t count() const { return per_chunk == 0 ? 0 : ceil_div(items, per_chunk); }
  int64_t begin(int64_t chunk) const { return chunk * per_chunk; }
  int64_t end(int64_t chunk) const { return std::min(items, (chunk + 1) * per_chunk); }
  int64_t of_item(int64_t item) const { return item / per_chunk; }
};

// dK, dV and dQ in one pass over the key tiles (five tile products per (key tile, query tile) pair:
// S^T, dP^T, dV += P^T dO, dK += dS^T Q, dQ += dS K). One key tile of one KV head per work item; dK
// and dV are accumulated over the group's query heads in order, and over the query tiles that see
// the key tile, as in the forward. dQ sums over key tiles, which other work items hold: each chunk
// of work items (one per thread) adds into a float dQ buffer of its own, covering the query heads of
// the units (sequence, KV head) its items belong to, and the buffers are summed afterwards in chunk
// order. The chunks are fixed by the item count and the thread count alone, so dQ is bit-for-bit
// the same from run to run at a given thread count (dK, dV: at any thread count).
template <typename scalar_t>
void grad_pass(const Shape& shape, const ScoreOptions& options, const BackwardInputs<scalar_t>& in,
               const float* delta, const float* lse2, OutputRows<scalar_t> dq, OutputRows<scalar_t> dk,
               OutputRows<scalar_t> dv) {
  const float scale = options.softmax_scale;
  const int64_t d = shape.head_dim;
  const int64_t ld_d = padded_head_dim(d);
  const int64_t heads_kv = shape.heads_kv, group = shape.group();
  const int64_t units = static_cast<int64_t>(shape.sequences.size()) * heads_kv;
  auto sequence_of = [&](int64_t unit) -> const Sequence& { return shape.sequences[unit / heads_kv]; };
  const TiledWork work(units, [&](int64_t unit) { return ceil_div(sequence_of(unit).n_k, kBlock); });
  // Rows of one query head in a dQ buffer: whole tiles, since gemm writes up to kMicroRows-padded
  // tile rows. A unit holds `group` query heads; dq_first_row[u] is where unit u starts in a buffer
  // holding every unit (a chunk's buffer holds its units' rows, from its first unit's).
  auto head_rows = [&](const Sequence& seq) { return round_up(seq.n_q, kBlock); };
  std::vector<int64_t> dq_first_row(units + 1, 0);
  for (int64_t unit = 0; unit < units; ++unit) {
    dq_first_row[unit + 1] = dq_first_row[unit] + group * head_rows(sequence_of(unit));
  }
  const Chunks chunks(work.items(), at::get_num_threads());
  std::vector<std::vector<float>> dq_buffers(chunks.count());
  auto first_unit = [&](int64_t chunk) { return work.unit_of(chunks.begin(chunk)); };

  at::parallel_for(0, chunks.count(), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> k_tile(kBlock * ld_d), v_tile(kBlock * ld_d), q_tile(kBlock * ld_d), q_tile_t(d * kBlock);
    std::vector<float> dout_tile(kBlock * ld_d), dout_tile_t(d * kBlock), p_t(kBlock * kBlock), dp_t(kBlock * kBlock);
    std::vector<float> dk_acc(kBlock * ld_d), dv_acc(kBlock * ld_d);
    // The transposed dropout mask and tanh of a tile, for the options that are on.
    std::vector<float> keep_t(options.dropout ? kBlock * kBlock : 0);
    std::vector<float> tanh_t(options.softcap > 0.0f ? kBlock * kBlock : 0);
    // One (key tile, query tile) pair of query head h: adds into dk_acc, dv_acc and the head's dQ rows.
    auto add_query_tile = [&](const Sequence& seq, int64_t h, int64_t k0, int64_t keys, int64_t q0, float* dq_head) {
      const int64_t queries = std::min(kBlock, seq.n_q - q0);
      const int64_t padded_keys = round_up(keys, kMicroRows), padded_queries = round_up(queries, kMicroCols);
      const int64_t first_row = shape.row_index(seq, h, q0);
      const scalar_t* q_rows = in.q.rows(seq.batch, h, seq.q_offset + q0);
      const scalar_t* dout_rows = in.dout.rows(seq.batch, h, seq.q_offset + q0);
      load_tile_transposed(q_tile_t.data(), kBlock, q_rows, in.q.stride_n, queries, d, options.q_multiplier());
      load_tile(q_tile.data(), ld_d, q_rows, in.q.stride_n, queries, d, 1.0f);
      load_tile_transposed(dout_tile_t.data(), kBlock, dout_rows, in.dout.stride_n, queries, d, 1.0f);
      load_tile(dout_tile.data(), ld_d, dout_rows, in.dout.stride_n, queries, d, 1.0f);
      gemm(false, padded_keys, padded_queries, d, k_tile.data(), ld_d, 1, q_tile_t.data(), kBlock, p_t.data(), kBlock);
      gemm(false, padded_keys, padded_queries, d, v_tile.data(), ld_d, 1, dout_tile_t.data(), kBlock, dp_t.data(),
           kBlock);
      if (options.modifies_scores()) {
        const int64_t distance0 = q0 + seq.diagonal() - k0;  // key rows, query columns
        modify_scores(p_t.data(), kBlock, keys, queries, options.modifier(seq, h, shape, distance0, -1, 1),
                      tanh_t.empty() ? nullptr : tanh_t.data());
      }
      if (options.dropout) {
        dropout_keep_tile(*options.dropout, ScoreOptions::dropout_head(seq, h, shape), q0, queries, k0, keys,
                          keep_t.data(), 1, kBlock);
      }
      softmax_grad_key_rows(p_t.data(), dp_t.data(), kBlock, keys, queries, seq.queries_seeing(k0, q0),
                            lse2 + first_row, delta + first_row, keep_t.empty() ? nullptr : keep_t.data(),
                            tanh_t.empty() ? nullptr : tanh_t.data());
      gemm(true, padded_keys, ld_d, queries, p_t.data(), kBlock, 1, dout_tile.data(), ld_d, dv_acc.data(), ld_d);
      gemm(true, padded_keys, ld_d, queries, dp_t.data(), kBlock, 1, q_tile.data(), ld_d, dk_acc.data(), ld_d);
      // dS is dp_t read transposed: row m of dS is column m of dp_t.
      gemm(true, round_up(queries, kMicroRows), ld_d, keys, dp_t.data(), 1, kBlock, k_tile.data(), ld_d,
           dq_head + q0 * ld_d, ld_d);
    };

    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t buffer_first_row = dq_first_row[first_unit(chunk)];
      std::vector<float>& dq_buffer = dq_buffers[chunk];
      dq_buffer.assign((dq_first_row[work.unit_of(chunks.end(chunk) - 1) + 1] - buffer_first_row) * ld_d, 0.0f);
      for (int64_t item = chunks.begin(chunk); item < chunks.end(chunk); ++item) {
        const auto [unit, tile] = work.split(item);
        const Sequence& seq = sequence_of(unit);
        const int64_t b = seq.batch, h_kv = unit % heads_kv;
        const int64_t k0 = tile * kBlock;
        const int64_t keys = std::min(kBlock, seq.n_k - k0);
        const int64_t key_row = seq.k_offset + k0;
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
        // A key tile that is all padding is seen by no query: its dK and dV stay 0.
        if (!seq.key_tile_hidden(k0)) {
          load_tile(k_tile.data(), ld_d, in.k.rows(b, h_kv, key_row), in.k.stride_n, keys, d, 1.0f);
          load_tile(v_tile.data(), ld_d, in.v.rows(b, h_kv, key_row), in.v.stride_n, keys, d, 1.0f);
          for (int64_t g = 0; g < group; ++g) {
            float* dq_head = dq_buffer.data() + (dq_first_row[unit] - buffer_first_row + g * head_rows(seq)) * ld_d;
            const int64_t query_end = seq.query_end(k0 + keys);
            for (int64_t q0 = seq.query_begin(k0) / kBlock * kBlock; q0 < query_end; q0 += kBlock) {
              add_query_tile(seq, h_kv * group + g, k0, keys, q0, dq_head);
            }
          }
        }

        store_tile(dk.rows(b, h_kv, key_row), dk.stride_n, dk_acc.data(), ld_d, keys, d, scale);
        store_tile(dv.rows(b, h_kv, key_row), dv.stride_n, dv_acc.data(), ld_d, keys, d, 1.0f);
      }
    }
  });

  // dQ = the sum of the chunks' buffers that hold the query head, in chunk order; one query tile per
  // item. A unit without key tiles (no keys) holds no item and leaves its dQ zero.
  const int64_t heads_q = shape.heads_q;
  const TiledWork query_work(static_cast<int64_t>(shape.sequences.size()) * heads_q,
                             [&](int64_t unit) { return ceil_div(shape.sequences[unit / heads_q].n_q, kBlock); });
  at::parallel_for(0, query_work.items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(kBlock * ld_d);
    for (int64_t item = begin; item < end; ++item) {
      const auto [query_unit, tile] = query_work.split(item);
      const int64_t sequence = query_unit / heads_q, h = query_unit % heads_q;
      const Sequence& seq = shape.sequences[sequence];
      const int64_t unit = sequence * heads_kv + h / group;
      const int64_t q0 = tile * kBlock;
      const int64_t rows = std::min(kBlock, seq.n_q - q0);
      const int64_t row_in_unit = h % group * head_rows(seq) + q0;
      std::fill(sum.begin(), sum.end(), 0.0f);
      if (work.end_item(unit) > work.first_item(unit)) {
        for (int64_t chunk = chunks.of_item(work.first_item(unit)); chunk <= chunks.of_item(work.end_item(unit) - 1);
             ++chunk) {
          const float* part =
              dq_buffers[chunk].data() + (dq_first_row[unit] - dq_first_row[first_unit(chunk)] + row_in_unit) * ld_d;
          for (int64_t i = 0; i < rows * ld_d; ++i) sum[i] += part[i];
        }
      }
      store_tile(dq.rows(seq.batch, h, seq.q_offset + q0), dq.stride_n, sum.data(), ld_d, rows, d, scale);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Torch glue

// The kernels read each row of head_dim elements in place, whatever the other strides.
at::Tensor with_contiguous_rows(const at::Tensor& t) { return t.size(3) == 1 || t.stride(3) == 1 ? t : t.contiguous(); }

// A key_padding_mask (B, Nk) as the kernels read it: per key a score bias, per key tile its KeyTile.
struct KeyPadding {
  std::vector<float> bias;     // (B, Nk): 0 for a real key, -inf for padding
  std::vector<KeyTile> tiles;  // (B, key tiles)
  int64_t keys, tiles_per_row;
};

KeyPadding read_key_padding(const at::Tensor& mask) {
  const int64_t batch = mask.size(0), keys = mask.size(1), tiles_per_row = ceil_div(keys, kBlock);
  KeyPadding padding{std::vector<float>(batch * keys), std::vector<KeyTile>(batch * tiles_per_row), keys,
                     tiles_per_row};
  const bool* is_real = mask.const_data_ptr<bool>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t tile = 0; tile < tiles_per_row; ++tile) {
      int64_t real = 0;
      const int64_t k0 = tile * kBlock, k_end = std::min(keys, k0 + kBlock);
      for (int64_t j = b * keys + k0; j < b * keys + k_end; ++j) {
        padding.bias[j] = is_real[j] ? 0.0f : -kInf;
        real += is_real[j];
      }
      padding.tiles[b * tiles_per_row + tile] =
          real == k_end - k0 ? KeyTile::kReal : (real == 0 ? KeyTile::kPadding : KeyTile::kMixed);
    }
  }
  return padding;
}

// The per-sequence lengths of cu_seqlens (B + 1,). The shared checks saw its dtype and shape only;
// here, on the CPU, the values are at hand, so a bad one is an error rather than an out-of-bounds read.
std::vector<int64_t> read_cu_seqlens(const char* name, const at::Tensor& cu_seqlens, int64_t total, int64_t max_seqlen,
                                     const char* max_name) {
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  const int64_t entries = cu_seqlens.numel();
  TORCH_CHECK(entries >= 1 && cu[0] == 0, "fused_attention: ", name, " must start at 0");
  TORCH_CHECK(cu[entries - 1] == total, "fused_attention: ", name, " must end at the total number of rows ", total,
              " (got ", cu[entries - 1], ")");
  std::vector<int64_t> offsets(cu, cu + entries);
  for (int64_t b = 0; b + 1 < entries; ++b) {
    TORCH_CHECK(offsets[b + 1] >= offsets[b], "fused_attention: ", name, " must be non-decreasing (entry ", b + 1,
                " is ", offsets[b + 1], " after ", offsets[b], ")");
    TORCH_CHECK(offsets[b + 1] - offsets[b] <= max_seqlen, "fused_attention: ", max_name, " (", max_seqlen,
                ") is shorter than sequence ", b, " of ", name, " (", offsets[b + 1] - offsets[b], " rows)");
  }
  return offsets;
}

// A window bound as Sequence keeps it: -1 where it hides no key of a sequence of n_q queries and n_k
// keys. The left bound hides j < i + n_k - n_q - left, possible only for left < n_k - 1; the right
// bound hides j > i + n_k - n_q + right, possible only for right < n_q - 1.
int64_t effective_bound(int64_t bound, int64_t bound_that_hides_nothing) {
  return bound < 0 || bound >= bound_that_hides_nothing ? -1 : bound;
}

// The call's sequences: q's batch elements, or the sequences cu_seqlens cut out of batch element 0.
// key_padding (dense only) must outlive the shape, whose sequences point into it. causal is the right
// bound 0, whatever window_right says.
Shape make_shape(const at::Tensor& q, const at::Tensor& k, bool causal, int64_t window_left, int64_t window_right,
                 const KeyPadding* key_padding, const std::optional<at::Tensor>& cu_seqlens_q,
                 const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  Shape shape{q.size(0), q.size(2), q.size(1), k.size(1), q.size(3), {}};
  const int64_t right = causal ? 0 : window_right;
  auto add_sequence = [&](int64_t index, int64_t batch, int64_t q_offset, int64_t k_offset, int64_t n_q, int64_t n_k,
                          const float* key_bias, const KeyTile* key_tiles) {
    shape.sequences.push_back({index, batch, q_offset, k_offset, n_q, n_k, effective_bound(window_left, n_k - 1),
                               effective_bound(right, n_q - 1), key_bias, key_tiles});
  };
  if (cu_seqlens_q.has_value()) {
    const auto starts_q = read_cu_seqlens("cu_seqlens_q", *cu_seqlens_q, q.size(2), max_seqlen_q, "max_seqlen_q");
    const auto starts_k = read_cu_seqlens("cu_seqlens_k", *cu_seqlens_k, k.size(2), max_seqlen_k, "max_seqlen_k");
    for (size_t b = 0; b + 1 < starts_q.size(); ++b) {
      add_sequence(static_cast<int64_t>(b), 0, starts_q[b], starts_k[b], starts_q[b + 1] - starts_q[b],
                   starts_k[b + 1] - starts_k[b], nullptr, nullptr);
    }
    return shape;
  }
  for (int64_t b = 0; b < q.size(0); ++b) {
    const float* bias = key_padding ? key_padding->bias.data() + b * key_padding->keys : nullptr;
    const KeyTile* tiles = key_padding ? key_padding->tiles.data() + b * key_padding->tiles_per_row : nullptr;
    add_sequence(b, b, 0, 0, q.size(2), k.size(2), bias, tiles);
  }
  return shape;
}

// The number of sequences: q's batch elements, or those of cu_seqlens_q (whose shape is checked).
int64_t sequence_count(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens_q) {
  return cu_seqlens_q.has_value() ? cu_seqlens_q->numel() - 1 : q.size(0);
}

// The call's ScoreOptions; alibi_slopes must outlive them.
ScoreOptions make_score_options(double softmax_scale, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                double dropout_p, int64_t dropout_seed, int64_t dropout_offset) {
  return {static_cast<float>(softmax_scale), static_cast<float>(softcap),
          alibi_slopes.has_value() ? alibi_slopes->const_data_ptr<float>() : nullptr,
          dropout_p > 0.0 ? std::optional(Dropout(dropout_p, dropout_seed, dropout_offset)) : std::nullopt};
}

// A fresh output for the rows of t (B, H, N, D): contiguous (dense), or the (1, H, N, D) view of a
// contiguous (N, H, D) tensor (varlen), flash-attn's packed layout.
at::Tensor empty_output_like(const at::Tensor& t, bool varlen, at::ScalarType dtype) {
  if (!varlen) return at::empty(t.sizes(), t.options().dtype(dtype));
  return at::empty({t.size(2), t.size(1), t.size(3)}, t.options().dtype(dtype)).transpose(0, 1).unsqueeze(0);
}

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

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal, double softmax_scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    int64_t dropout_seed, int64_t dropout_offset) {
  check_attention_inputs(q_in, k_in, v_in, key_padding_mask, cu_seqlens_q, cu_seqlens_k);
  check_score_options(q_in, sequence_count(q_in, cu_seqlens_q), window_left, window_right, softcap, alibi_slopes,
                      dropout_p, dropout_seed, dropout_offset);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const std::optional<KeyPadding> key_padding =
      key_padding_mask.has_value() ? std::optional(read_key_padding(*key_padding_mask)) : std::nullopt;
  const Shape shape = make_shape(q, k, causal, window_left, window_right, key_padding ? &*key_padding : nullptr,
                                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const ScoreOptions options =
      make_score_options(softmax_scale, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset);
  at::Tensor o = empty_output_like(q, cu_seqlens_q.has_value(), q.scalar_type());
  at::Tensor lse = at::empty({shape.batch, shape.heads_q, shape.q_rows}, q.options().dtype(at::kFloat));
  dispatch_dtype(q.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    forward_pass<scalar_t>(shape, options, strided_rows<scalar_t>(q), strided_rows<scalar_t>(k),
                           strided_rows<scalar_t>(v), output_rows<scalar_t>(o), lse.data_ptr<float>());
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& o_in, const at::Tensor& lse_in, bool causal, double softmax_scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    int64_t dropout_seed, int64_t dropout_offset) {
  check_backward_inputs(dout_in, q_in, k_in, v_in, o_in, lse_in, key_padding_mask, cu_seqlens_q, cu_seqlens_k);
  check_score_options(q_in, sequence_count(q_in, cu_seqlens_q), window_left, window_right, softcap, alibi_slopes,
                      dropout_p, dropout_seed, dropout_offset);
  const at::Tensor dout = with_contiguous_rows(dout_in), q = with_contiguous_rows(q_in);
  const at::Tensor k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in), o = with_contiguous_rows(o_in);
  const at::Tensor lse = lse_in.contiguous();
  const std::optional<KeyPadding> key_padding =
      key_padding_mask.has_value() ? std::optional(read_key_padding(*key_padding_mask)) : std::nullopt;
  const Shape shape = make_shape(q, k, causal, window_left, window_right, key_padding ? &*key_padding : nullptr,
                                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const ScoreOptions options =
      make_score_options(softmax_scale, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset);
  const bool varlen = cu_seqlens_q.has_value();
  at::Tensor dq = empty_output_like(q, varlen, q.scalar_type());
  at::Tensor dk = empty_output_like(k, varlen, k.scalar_type());
  at::Tensor dv = empty_output_like(v, varlen, v.scalar_type());
  std::vector<float> delta(shape.batch * shape.heads_q * shape.q_rows), lse2(delta.size());
  dispatch_dtype(q.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    const BackwardInputs<scalar_t> in{strided_rows<scalar_t>(dout), strided_rows<scalar_t>(q),
                                      strided_rows<scalar_t>(k),    strided_rows<scalar_t>(v),
                                      strided_rows<scalar_t>(o),    lse.const_data_ptr<float>()};
    row_statistics_pass(shape, in, delta.data(), lse2.data());
    grad_pass(shape, options, in, delta.data(), lse2.data(), output_rows<scalar_t>(dq), output_rows<scalar_t>(dk),
              output_rows<scalar_t>(dv));
  });
  return {dq, dk, dv};
}

}  // namespace fused_attention
