// Score tiles: the units they are kept in and which of their entries exist (sequence bounds,
// causality or a sliding window, key padding), per batch element or packed sequence.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "params.h"

namespace fused_attention {

// Scores are kept in log2 units, scale * q.k * log2(e), so that exp2 gives the softmax terms;
// lse leaves the kernels in natural-log units.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Which keys of one tile of kCols <= 64 keys, from k0, are real: bit i for key k0 + i, set when
// the key exists (is below seqlen_k) and is not padding.
struct KeyTile {
  int k0;
  uint64_t real;

  __device__ __forceinline__ bool is_real(int key) const { return (real >> (key - k0)) & 1; }
  __device__ __forceinline__ bool any_real() const { return real != 0; }
};

// Which (query, key) scores exist: inside both sequences, not hidden by key padding and, when
// causal, on or below the bottom-right aligned diagonal (query i sees key j iff
// j <= i + seqlen_k - seqlen_q). Lengths are the batch element's own (per sequence when varlen).
//
// kWindowed (the kernels with score modifiers): the sliding window of SPEC11 replaces causality,
// query i sees key j iff i + shift - window_left <= j <= i + shift + window_right (shift =
// seqlen_k - seqlen_q, -1 unbounded). The kernels without read only `causal`, so their code is
// what it was before windows existed.
struct ScoreMask {
  int seqlen_q;
  int seqlen_k;
  bool causal;
  const bool* key_is_real;  // this batch element's key padding row; null: every key is real
  int window_left;
  int window_right;

  // Sequence bounds and causality or the window; padding is the KeyTile's part (visible &&
  // tile.is_real).
  template <bool kWindowed = false>
  __device__ __forceinline__ bool visible(int query, int key) const {
    if constexpr (kWindowed) {
      const int diagonal = query + seqlen_k - seqlen_q;
      return query < seqlen_q && key < seqlen_k && (window_right < 0 || key <= diagonal + window_right) &&
             (window_left < 0 || key >= diagonal - window_left);
    }
    return query < seqlen_q && key < seqlen_k && (!causal || key <= query + seqlen_k - seqlen_q);
  }

  // With a window: keys [window_key_begin, window_key_end) hold every key that queries
  // [q0, q0 + rows) can see (SPEC11 step 7). The forward and dQ kernels visit those key tiles only,
  // so a window costs N * window, not N^2.
  __device__ __forceinline__ int window_key_begin(int q0) const {
    return window_left < 0 ? 0 : max(0, q0 + seqlen_k - seqlen_q - window_left);
  }
  __device__ __forceinline__ int window_key_end(int q0, int rows) const {
    return window_right < 0 ? seqlen_k : max(0, min(seqlen_k, q0 + rows + seqlen_k - seqlen_q + window_right));
  }
  // With a window: queries [window_query_begin, window_query_end) hold every query that sees one
  // of keys [k0, k0 + cols), the dK/dV kernel's range.
  __device__ __forceinline__ int window_query_begin(int k0) const {
    return window_right < 0 ? 0 : max(0, k0 - (seqlen_k - seqlen_q) - window_right);
  }
  __device__ __forceinline__ int window_query_end(int k0, int cols) const {
    return window_left < 0 ? seqlen_q : min(seqlen_q, k0 + cols - (seqlen_k - seqlen_q) + window_left);
  }

  // The padding of keys [k0, k0 + kCols), read by a warp vote: every lane of the warp calls it and
  // gets the same answer. Without padding it answers at once (no vote, no load).
  template <int kCols>
  __device__ __forceinline__ KeyTile key_tile(int k0) const {
    static_assert(kCols <= 64, "one bit per key of the tile");
    constexpr uint64_t kAll = kCols == 64 ? ~0ull : (1ull << kCols) - 1;
    if (key_is_real == nullptr) return {k0, kAll};
    const int lane = threadIdx.x % 32;
    uint64_t real = 0;
#pragma unroll
    for (int half = 0; half < (kCols + 31) / 32; ++half) {
      const int key = k0 + 32 * half + lane;
      const uint64_t votes = __ballot_sync(0xffffffffu, key < seqlen_k && key_is_real[key]);
      real |= votes << (32 * half);
    }
    return {k0, real & kAll};
  }

  // Whether the block queries [q0, q0 + rows) x the key tile hides any score, so that blocks
  // strictly inside the visible region skip the per-element test.
  template <int kCols, bool kWindowed = false>
  __device__ __forceinline__ bool block_needs_mask(int q0, int rows, const KeyTile& keys) const {
    constexpr uint64_t kAll = kCols == 64 ? ~0ull : (1ull << kCols) - 1;
    const int k0 = keys.k0;
    const bool outside = keys.real != kAll || q0 + rows > seqlen_q || k0 + kCols > seqlen_k;
    if constexpr (kWindowed) {
      // The last key against the first query's right bound, the first key against the last
      // query's left bound.
      const int shift = seqlen_k - seqlen_q;
      return outside || (window_right >= 0 && k0 + kCols - 1 > q0 + shift + window_right) ||
             (window_left >= 0 && k0 < q0 + rows - 1 + shift - window_left);
    }
    return outside || (causal && k0 + kCols - 1 > q0 + seqlen_k - seqlen_q);
  }

  // The first tile of kCols keys at or after `tile` (below `tiles`) with a real key; `tiles` if
  // none. Tiles of padding alone are skipped: neither loaded nor multiplied. Warp-uniform.
  template <int kCols>
  __device__ __forceinline__ int next_key_tile(int tile, int tiles) const {
    if (key_is_real != nullptr) {
      while (tile < tiles && !key_tile<kCols>(tile * kCols).any_real()) ++tile;
    }
    return tile;
  }
};

// One batch element of a launch: where its rows start in the tensors and which scores it has.
struct Sequence {
  int batch;     // batch index into the tensors: 0 when varlen
  int q_row0;    // first row of the element in q, o, dout, dq, lse and delta
  int k_row0;    // first row of the element in k, v, dk and dv
  ScoreMask mask;
};

// kPaddedOrPacked false: a dense call without key padding, whose lengths stay the params' and
// whose mask has no padding row, so that the compiler drops every padding and varlen step.
template <bool kPaddedOrPacked>
__device__ __forceinline__ Sequence sequence_of(const AttentionParams& params, int batch) {
  if constexpr (kPaddedOrPacked) {
    if (params.cu_seqlens_q != nullptr) {
      const int q_row0 = params.cu_seqlens_q[batch];
      const int k_row0 = params.cu_seqlens_k[batch];
      return {0, q_row0, k_row0,
              {params.cu_seqlens_q[batch + 1] - q_row0, params.cu_seqlens_k[batch + 1] - k_row0, params.causal,
               nullptr, params.window_left, params.window_right}};
    }
    const bool* const padding = params.key_padding_mask == nullptr
                                    ? nullptr
                                    : params.key_padding_mask + batch * params.key_padding_mask_batch_stride;
    return {batch, 0, 0,
            {params.seqlen_q, params.seqlen_k, params.causal, padding, params.window_left, params.window_right}};
  }
  return {batch, 0, 0,
          {params.seqlen_q, params.seqlen_k, params.causal, nullptr, params.window_left, params.window_right}};
}

// Offset of (head, the sequence's first row) in lse and delta.
__device__ __forceinline__ int64_t row_values_offset(const AttentionParams& params, const Sequence& sequence,
                                                     int head) {
  return (static_cast<int64_t>(sequence.batch) * params.heads + head) * params.lse_head_stride + sequence.q_row0;
}

// The key/value head query head `head` reads.
__device__ __forceinline__ int kv_head_of(const AttentionParams& params, int head) {
  return head / params.group;
}

// Sets hidden scores of one warp's 16 x 8*kNTiles accumulator (C layout of mma.cuh) to -inf.
// Accumulator row r and column c stand for query/key row0 + r and col0 + c; kRowsAreKeys says
// which of the two the rows are (the dK/dV kernel works on the transposed scores).
template <bool kRowsAreKeys, int kNTiles>
__device__ __forceinline__ void hide_masked_scores(float (&scores)[kNTiles][4], int row0, int col0,
                                                   const ScoreMask& mask, const KeyTile& keys) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + lane / 4 + 8 * (i / 2);
      const int col = col0 + 8 * n + 2 * (lane % 4) + i % 2;
      const int query = kRowsAreKeys ? col : row;
      const int key = kRowsAreKeys ? row : col;
      // The padding test is compiled out of the kernels without padding (a null key_is_real).
      const bool padding = mask.key_is_real != nullptr && !keys.is_real(key);
      if (!mask.visible(query, key) || padding) scores[n][i] = -INFINITY;
    }
  }
}

}  // namespace fused_attention
