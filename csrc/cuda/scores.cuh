// Score tiles: the units they are kept in and which of their entries exist.
#pragma once

#include <cmath>

namespace fused_attention {

// Scores are kept in log2 units, scale * q.k * log2(e), so that exp2 gives the softmax terms;
// lse leaves the kernels in natural-log units.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Which (query, key) scores exist: inside both sequences and, when causal, on or below the
// bottom-right aligned diagonal (query i sees key j iff j <= i + seqlen_k - seqlen_q).

struct ScoreMask {
  int seqlen_q;
  int seqlen_k;
  bool causal;

  __device__ __forceinline__ bool visible(int query, int key) const {
    return query < seqlen_q && key < seqlen_k && (!causal || key <= query + seqlen_k - seqlen_q);
  }

  // Whether any score of the block queries [q0, q0 + rows) x keys [k0, k0 + cols) is hidden,
  // so that blocks strictly inside the visible region skip the per-element test.
  __device__ __forceinline__ bool block_needs_mask(int q0, int rows, int k0, int cols) const {
    return q0 + rows > seqlen_q || k0 + cols > seqlen_k || (causal && k0 + cols - 1 > q0 + seqlen_k - seqlen_q);
  }
};

// Sets hidden scores of one warp's 16 x 8*kNTiles accumulator (C layout of mma.cuh) to -inf.
// Accumulator row r and column c stand for query/key row0 + r and col0 + c; kRowsAreKeys says
// which of the two the rows are (the dK/dV kernel works on the transposed scores).
template <bool kRowsAreKeys, int kNTiles>
__device__ __forceinline__ void hide_masked_scores(float (&scores)[kNTiles][4], int row0, int col0,
                                                   const ScoreMask& mask) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + lane / 4 + 8 * (i / 2);
      const int col = col0 + 8 * n + 2 * (lane % 4) + i % 2;
      const bool shown = kRowsAreKeys ? mask.visible(col, row) : mask.visible(row, col);
      if (!shown) scores[n][i] = -INFINITY;
    }
  }
}

}  // namespace fused_attention
