// FlashAttention-2 forward: O = softmax(scale * Q K^T, masked) V and the logsumexp of each row.
//
// One thread block per (64-query tile, query head, batch element); each of its 4 warps owns 16
// query rows. The K and V tiles of the head's key/value head stream through shared memory,
// double-buffered with cp.async, skipping tiles of padding alone and tiles outside the causal
// diagonal or sliding window, while the warps keep their rows' running max, running sum and
// output accumulator in registers (online softmax). With score modifiers (score_modifiers.cuh)
// the scores are soft-capped and biased before the softmax, and dropout zeroes probabilities
// after it (the row sum, hence lse, keeps them).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "dispatch.cuh"
#include "launch.h"
#include "mma.cuh"
#include "params.h"
#include "runtime.cuh"
#include "score_modifiers.cuh"
#include "scores.cuh"
#include "tile_io.cuh"
#include "tiles.h"
#include "warp_gemm.cuh"

namespace fused_attention {
namespace {

// Folds one tile of scores (already in log2 units, hidden ones -inf) into a warp's running
// softmax state for its rows g (half 0) and g + 8 (half 1), and turns the scores into the
// unnormalized probabilities exp2(s - max) for the P V product. row_sum is this lane's partial
// sum; the four lanes of a row add theirs up at the end.
template <int kNTiles, int kDTiles>
__device__ __forceinline__ void online_softmax_step(float (&scores)[kNTiles][4], float (&row_max)[2],
                                                    float (&row_sum)[2], float (&output)[kDTiles][4]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) tile_max = fmaxf(tile_max, fmaxf(scores[n][2 * half], scores[n][2 * half + 1]));
    // The four lanes g*4 .. g*4+3 hold the row's columns between them.
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float new_max = fmaxf(row_max[half], tile_max);
    // A row that has seen no visible key keeps max -inf; measuring from 0 instead keeps every
    // exp2 at exp2(-inf) = 0 rather than exp2(-inf - -inf) = NaN.
    const float reference = new_max == -INFINITY ? 0.f : new_max;
    const float rescale = exp2f(row_max[half] - reference);
    row_max[half] = new_max;
    row_sum[half] *= rescale;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      output[d][2 * half] *= rescale;
      output[d][2 * half + 1] *= rescale;
    }
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float p = exp2f(scores[n][2 * half + j] - reference);
        scores[n][2 * half + j] = p;
        row_sum[half] += p;
      }
    }
  }
}

// With score modifiers, a minimum of 1 block per SM: without it ptxas aims the sm_90 build at
// fewer registers than the modifiers need (128 at head dim 64) and spills; 0 (none given) leaves
// the other variants as they were.
template <typename T, int kHeadDim, bool kPaddedOrPacked, bool kScoreModifiers>
__global__ void __launch_bounds__(ForwardTiles<kHeadDim>::kThreads, kScoreModifiers ? 1 : 0)
    attention_forward_kernel(const __grid_constant__ AttentionParams params, bool chunked) {
  using Tiles = ForwardTiles<kHeadDim>;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kThreads = Tiles::kThreads;

  uint16_t* const smem = dynamic_shared_memory<uint16_t>();
  uint16_t* const q_tile = smem + Tiles::kQOffset;
  uint16_t* const k_tiles = smem + Tiles::kKOffset;
  uint16_t* const v_tiles = smem + Tiles::kVOffset;

  const int m0 = blockIdx.x * kBlockM;
  const int head = blockIdx.y;
  const Sequence sequence = sequence_of<kPaddedOrPacked>(params, blockIdx.z);
  const ScoreMask& mask = sequence.mask;
  const int seqlen_q = mask.seqlen_q;
  const int seqlen_k = mask.seqlen_k;
  // Varlen: the grid covers the longest sequence; the shorter ones' extra tiles have no rows.
  if (m0 >= seqlen_q) return;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_row0 = 16 * warp;  // first row of this warp inside the block
  const int head_dim = params.head_dim;

  // Causal: the block's last query sees keys up to m0 + kBlockM - 1 + seqlen_k - seqlen_q. A
  // window bounds the keys on both sides.
  int key_begin = 0;
  int key_end = params.causal ? max(0, min(seqlen_k, m0 + kBlockM + seqlen_k - seqlen_q)) : seqlen_k;
  if constexpr (kScoreModifiers) {
    key_begin = mask.window_key_begin(m0);
    key_end = mask.window_key_end(m0, kBlockM);
  }
  const int key_tiles = ceil_div(key_end, kBlockN);

  const int kv_head = kv_head_of(params, head);
  const uint16_t* const k_rows = row_pointer(params.k, sequence.batch, kv_head, sequence.k_row0);
  const uint16_t* const v_rows = row_pointer(params.v, sequence.batch, kv_head, sequence.k_row0);
  auto load_kv_stage = [&](int tile, int stage) {
    const int n0 = tile * kBlockN;
    load_tile<kBlockN, kHeadDim, kThreads>(k_tiles + stage * kBlockN * kHeadDim, k_rows + n0 * params.k.row_stride,
                                           params.k.row_stride, seqlen_k - n0, head_dim, chunked);
    load_tile<kBlockN, kHeadDim, kThreads>(v_tiles + stage * kBlockN * kHeadDim, v_rows + n0 * params.v.row_stride,
                                           params.v.row_stride, seqlen_k - n0, head_dim, chunked);
  };

  load_tile<kBlockM, kHeadDim, kThreads>(q_tile, row_pointer(params.q, sequence.batch, head, sequence.q_row0 + m0),
                                         params.q.row_stride, seqlen_q - m0, head_dim, chunked);
  int tile = mask.next_key_tile<kBlockN>(key_begin / kBlockN, key_tiles);
  if (tile < key_tiles) load_kv_stage(tile, 0);
  cp_async_commit();

  const float scale_log2 = params.softmax_scale * kLog2e;
  ScoreModifiers modifiers{};
  if constexpr (kScoreModifiers) modifiers = score_modifiers_of(params, mask, blockIdx.z, head);
  float output[kHeadDim / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  for (int stage = 0; tile < key_tiles; stage ^= 1) {
    const int n0 = tile * kBlockN;
    // Prefetch the next stage while this one is computed; the trailing __syncthreads of the
    // previous iteration guarantees nobody still reads the stage being overwritten.
    const int next_tile = mask.next_key_tile<kBlockN>(tile + 1, key_tiles);
    if (next_tile < key_tiles) load_kv_stage(next_tile, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint16_t* const k_tile = k_tiles + stage * kBlockN * kHeadDim;
    const uint16_t* const v_tile = v_tiles + stage * kBlockN * kHeadDim;

    // The keep-mask before the scores take their registers: Philox needs a dozen of its own.
    uint32_t keep = ~0u;
    if constexpr (kScoreModifiers) {
      if (dropout_enabled(params)) {
        keep = dropout_keep_bits<false, kBlockN / 8>(params, blockIdx.z, head, m0 + warp_row0, n0);
      }
    }
    float scores[kBlockN / 8][4] = {};
    warp_gemm_rows_by_rows<T, kHeadDim, kHeadDim, kBlockN>(scores, q_tile, warp_row0, k_tile, 0);
    if constexpr (kScoreModifiers) {
      const KeyTile keys = mask.key_tile<kBlockN>(n0);
      modify_scores<false>(scores, m0 + warp_row0, n0, modifiers, mask, keys,
                           mask.block_needs_mask<kBlockN, true>(m0, kBlockM, keys));
    } else {
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) scores[n][i] *= scale_log2;
      }
      const KeyTile keys = mask.key_tile<kBlockN>(n0);
      if (mask.block_needs_mask<kBlockN>(m0, kBlockM, keys)) {
        hide_masked_scores<false>(scores, m0 + warp_row0, n0, mask, keys);
      }
    }
    online_softmax_step(scores, row_max, row_sum, output);
    if constexpr (kScoreModifiers) {
      if (dropout_enabled(params)) drop(scores, keep);
    }

    uint32_t probabilities[kBlockN / 16][4];
    accumulator_to_a_fragments<T, kBlockN>(probabilities, scores);
    warp_gemm_registers_by_tile<T, kHeadDim, kBlockN, kHeadDim>(output, probabilities, v_tile, 0, 0);
    __syncthreads();
    tile = next_tile;
  }
  // Completes the Q copy when there was no key tile, before q_tile is reused for the output.
  cp_async_wait<0>();
  __syncthreads();

  float inverse_sum[2];
  float lse[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    // sum >= 1 as soon as the row saw one visible key (its max contributes exp2(0)).
    const bool has_key = sum > 0.f;
    inverse_sum[half] = has_key ? 1.f / sum : 0.f;
    // Dropout's 1 / (1 - p), folded into the normalization (1 without dropout).
    if constexpr (kScoreModifiers) inverse_sum[half] *= params.dropout_scale;
    lse[half] = has_key ? (row_max[half] + log2f(sum)) * kLn2 : -INFINITY;
  }

  store_accumulator<T, kHeadDim, kHeadDim / 8>(q_tile, warp_row0, 0, output, inverse_sum[0], inverse_sum[1]);
  if (lane % 4 == 0) {
    float* const lse_rows = params.lse + row_values_offset(params, sequence, head);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_row0 + lane / 4 + 8 * half;
      if (row < seqlen_q) lse_rows[row] = lse[half];
    }
  }
  __syncthreads();
  store_tile<kBlockM, kHeadDim, kThreads>(row_pointer(params.o, sequence.batch, head, sequence.q_row0 + m0),
                                          params.o.row_stride,
                                          seqlen_q - m0, head_dim, q_tile, chunked);
}

template <typename T, int kHeadDim, bool kPaddedOrPacked, bool kScoreModifiers>
cudaError_t launch_forward(const AttentionParams& params, cudaStream_t stream) {
  using Tiles = ForwardTiles<kHeadDim>;
  const bool chunked = allows_16_byte_chunks(params.q, params.head_dim) &&
                       allows_16_byte_chunks(params.k, params.head_dim) &&
                       allows_16_byte_chunks(params.v, params.head_dim) &&
                       allows_16_byte_chunks(params.o, params.head_dim);
  auto kernel = attention_forward_kernel<T, kHeadDim, kPaddedOrPacked, kScoreModifiers>;
  cudaError_t error = allow_dynamic_shared_memory(kernel, Tiles::kSmemBytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(ceil_div(params.seqlen_q, Tiles::kBlockM), params.heads, params.batch);
  return launch_kernel(kernel, grid, Tiles::kThreads, Tiles::kSmemBytes, stream, params, chunked);
}

}  // namespace

cudaError_t launch_attention_forward(const AttentionParams& given_params, cudaStream_t stream) {
  const AttentionParams params = with_canonical_window(given_params);
  if (params.batch == 0 || params.heads == 0 || params.seqlen_q == 0) return cudaSuccess;
  return dispatch_element_type_and_head_dim(params, [&](auto element, auto head_dim) {
    return dispatch_kernel_variant(params, [&](auto padded_or_packed, auto score_modifiers) {
      return launch_forward<typename decltype(element)::type, decltype(head_dim)::value,
                            decltype(padded_or_packed)::value, decltype(score_modifiers)::value>(params, stream);
    });
  });
}

}  // namespace fused_attention
