// What the kernels compiled with score modifiers (kScoreModifiers, dispatch.cuh) do to each score
// of a warp's accumulator tile (SPEC11): softcap and ALiBi in the scores' log2 units, the sliding
// window's mask, the dropout keep-mask, and the backward's softcap derivative.
//
// Tiles are 16 x 8*kNTiles accumulators in the C layout of mma.cuh: element [n][i] of lane l is
// row row0 + l/4 + 8*(i/2), column col0 + 8n + 2*(l%4) + i%2. kRowsAreKeys says whether rows are
// queries and columns keys (forward, dQ) or the transpose (dK/dV).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "params.h"
#include "philox.cuh"
#include "scores.cuh"

namespace fused_attention {

// tanh(x) = 1 - 2 / (exp(2x) + 1). Its absolute error stays near fp32 rounding for every x (an
// infinite exp2 gives 1, a zero one -1), which is what a score feeding exp needs; tanhf under
// --use_fast_math may be tanh.approx, good to 2^-11 only relative to tanh, i.e. 0.015 on a
// score capped at 30.
__device__ __forceinline__ float tanh_from_exp2(float x) { return 1.f - 2.f / (exp2f(2.f * kLog2e * x) + 1.f); }

// Steps 1 to 3 of SPEC11 for one head of one batch element or sequence, in log2 units.
struct ScoreModifiers {
  float scale_log2;        // softmax_scale * log2(e): the score without softcap
  float tanh_scale;        // softmax_scale / softcap; 0 without softcap
  float softcap_log2;      // softcap * log2(e)
  float alibi_slope_log2;  // the head's ALiBi slope * log2(e); 0 without ALiBi
  int shift;               // seqlen_k - seqlen_q: query i's diagonal is key i + shift

  // The score of (query, key) from the dot product q.k. softcap_derivative receives
  // d(capped score) / d(scale * q.k) = 1 - tanh^2 (1 without softcap), for the backward.
  __device__ __forceinline__ float score_log2(float dot, int query, int key, float& softcap_derivative) const {
    float score;
    if (tanh_scale != 0.f) {
      const float t = tanh_from_exp2(dot * tanh_scale);
      score = softcap_log2 * t;
      softcap_derivative = 1.f - t * t;
    } else {
      score = dot * scale_log2;
      softcap_derivative = 1.f;
    }
    // The bias is not scaled by softmax_scale (flash-attn's convention).
    return score - alibi_slope_log2 * fabsf(static_cast<float>(query + shift - key));
  }
};

// `sequence_index` is the batch element or packed sequence (blockIdx.z), which indexes the slopes.
__device__ __forceinline__ ScoreModifiers score_modifiers_of(const AttentionParams& params, const ScoreMask& mask,
                                                             int sequence_index, int head) {
  const bool capped = params.softcap > 0.f;
  const float slope =
      params.alibi_slopes == nullptr ? 0.f : params.alibi_slopes[sequence_index * params.heads + head];
  return {params.softmax_scale * kLog2e, capped ? params.softmax_scale / params.softcap : 0.f,
          params.softcap * kLog2e, slope * kLog2e, mask.seqlen_k - mask.seqlen_q};
}

// Whether (query, key) is hidden: outside the window or the sequences, or padding.
__device__ __forceinline__ bool hidden_score(int query, int key, const ScoreMask& mask, const KeyTile& keys) {
  const bool padding = mask.key_is_real != nullptr && !keys.is_real(key);
  return !mask.visible<true>(query, key) || padding;
}

// Scores of a (query, key) tile in log2 units, hidden ones -inf: the forward's input to the
// online softmax.
template <bool kRowsAreKeys, int kNTiles>
__device__ __forceinline__ void modify_scores(float (&scores)[kNTiles][4], int row0, int col0,
                                              const ScoreModifiers& modifiers, const ScoreMask& mask,
                                              const KeyTile& keys, bool needs_mask) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + lane / 4 + 8 * (i / 2);
      const int col = col0 + 8 * n + 2 * (lane % 4) + i % 2;
      const int query = kRowsAreKeys ? col : row;
      const int key = kRowsAreKeys ? row : col;
      float unused_derivative;
      scores[n][i] = needs_mask && hidden_score(query, key, mask, keys)
                         ? -INFINITY
                         : modifiers.score_log2(scores[n][i], query, key, unused_derivative);
    }
  }
}

// Whether the call drops anything (a threshold of 0 keeps every key).
__device__ __forceinline__ bool dropout_enabled(const AttentionParams& params) {
  return params.dropout_keep_threshold != 0;
}

// The dropout keep-mask (SPEC11) on a tile of head `head` of batch element or sequence
// `sequence_index`: key j of query i is kept iff word j & 3 of Philox4x32-10 with counter
// (j >> 2, i, sequence_index * heads + head, offset) and the seed as key is at least the
// threshold; one call gives the words of 4 consecutive keys of a row. Returns bit 4n + i set where
// element [n][i] is kept; row0 and col0 are multiples of 8. Seed, offset and threshold are read
// from the params where they are used, so that they take no registers across the kernels' loops.
template <bool kRowsAreKeys, int kNTiles>
__device__ __forceinline__ uint32_t dropout_keep_bits(const AttentionParams& params, int sequence_index, int head,
                                                      int row0, int col0) {
  static_assert(4 * kNTiles <= 32, "one bit per element of the tile");
  const int lane = threadIdx.x % 32;
  const uint32_t head_counter =
      static_cast<uint32_t>(sequence_index) * static_cast<uint32_t>(params.heads) + static_cast<uint32_t>(head);
  auto words_of = [&](int query, int key) {
    return philox4x32_10(static_cast<uint32_t>(key) >> 2, static_cast<uint32_t>(query), head_counter,
                         params.dropout_offset, static_cast<uint32_t>(params.dropout_seed),
                         static_cast<uint32_t>(params.dropout_seed >> 32));
  };
  const uint32_t threshold = params.dropout_keep_threshold;
  uint32_t bits = 0;
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
    if constexpr (!kRowsAreKeys) {
      // Elements i and i + 1 of a row are keys 2t and 2t + 1 of a group of 4 (t = lane % 4): one
      // call gives both, words 0, 1 (t even) or 2, 3 (t odd).
      const int key = col0 + 8 * n + 2 * (lane % 4);
      const bool odd_pair = lane % 2 != 0;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const PhiloxWords words = words_of(row0 + lane / 4 + 8 * half, key);
        const uint32_t first = odd_pair ? words.word[2] : words.word[0];
        const uint32_t second = odd_pair ? words.word[3] : words.word[1];
        bits |= static_cast<uint32_t>(first >= threshold) << (4 * n + 2 * half);
        bits |= static_cast<uint32_t>(second >= threshold) << (4 * n + 2 * half + 1);
      }
    } else {
      // Every element is another (query, group of keys): one call each, for word key & 3.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = row0 + lane / 4 + 8 * (i / 2);
        const PhiloxWords words = words_of(col0 + 8 * n + 2 * (lane % 4) + i % 2, key);
        const int which = key & 3;
        const uint32_t word = which == 0   ? words.word[0]
                              : which == 1 ? words.word[1]
                              : which == 2 ? words.word[2]
                                           : words.word[3];
        bits |= static_cast<uint32_t>(word >= threshold) << (4 * n + i);
      }
    }
  }
  return bits;
}

// Zeroes the dropped probabilities of a tile (the forward's P before P V; the 1 / (1 - p) is
// applied to the output at the end).
template <int kNTiles>
__device__ __forceinline__ void drop(float (&probabilities)[kNTiles][4], uint32_t keep_bits) {
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (!((keep_bits >> (4 * n + i)) & 1)) probabilities[n][i] = 0.f;
    }
  }
}

// The backward's recomputation on a (query, key) tile, given dots = q.k and dp = dO.v:
//   dots <- P * keep (the dV operand; its 1 / (1 - p) is applied to dV at the end),
//   dp   <- dS_raw = P * (keep * dp / (1 - p) - delta) * softcap_derivative,
// with P = exp2(score - lse), 0 where hidden. lse_log2(n, i) and delta(n, i) give the row values of
// element [n][i]'s query (lse in log2 units, +inf for a query that sees no key).
template <bool kRowsAreKeys, int kNTiles, typename LseLog2, typename Delta>
__device__ __forceinline__ void recompute_gradient_scores(float (&dots)[kNTiles][4], float (&dp)[kNTiles][4],
                                                          int row0, int col0, const ScoreModifiers& modifiers,
                                                          const ScoreMask& mask, const KeyTile& keys,
                                                          bool needs_mask, uint32_t keep_bits,
                                                          float dropout_scale, LseLog2 lse_log2, Delta delta) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + lane / 4 + 8 * (i / 2);
      const int col = col0 + 8 * n + 2 * (lane % 4) + i % 2;
      const int query = kRowsAreKeys ? col : row;
      const int key = kRowsAreKeys ? row : col;
      float softcap_derivative;
      const float score = modifiers.score_log2(dots[n][i], query, key, softcap_derivative);
      const bool hidden = needs_mask && hidden_score(query, key, mask, keys);
      const float p = hidden ? 0.f : exp2f(score - lse_log2(n, i));
      const bool kept = (keep_bits >> (4 * n + i)) & 1;
      dots[n][i] = kept ? p : 0.f;
      dp[n][i] = p * ((kept ? dp[n][i] * dropout_scale : 0.f) - delta(n, i)) * softcap_derivative;
    }
  }
}

}  // namespace fused_attention
