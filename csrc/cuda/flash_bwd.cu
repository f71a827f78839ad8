// FlashAttention-2 backward, in three deterministic kernels (no atomics):
//   1. delta = rowsum(dO * O), one fp32 per query row;
//   2. per key tile of a key/value head: dV = P^T dO and dK = scale * dS^T Q, looping over the
//      query tiles of every query head of the head's group (GQA), so that the group's sum is
//      taken in one fixed order;
//   3. per query tile: dQ = scale * dS K, looping over key tiles;
// where P = exp(scale * Q K^T - lse) is recomputed from the forward's logsumexp and
// dS = P * (dO V^T - delta). Kernels 2 and 3 both recompute P and dO V^T: that costs two extra
// products but keeps every output written by exactly one block. Both visit only the tiles the
// causal diagonal or sliding window can make visible. With score modifiers (score_modifiers.cuh)
// they recompute the modified scores and the dropout keep-mask, and fold dropout's 1 / (1 - p)
// and softcap's derivative into dS (and the former into dV).
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

constexpr int kDeltaWarps = 4;
constexpr int kDeltaRowsPerBlock = 64;

// The forward's lse in the log2 units of the scores. A row with no visible key has lse -inf;
// +inf makes every exp2(score - lse) of that row 0, so its gradients are 0 instead of NaN.
__device__ __forceinline__ float lse_in_log2_units(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// delta[row] = sum_d dO[row, d] * O[row, d] in fp32; one warp per row at a time.
template <typename T>
__global__ void __launch_bounds__(32 * kDeltaWarps)
    attention_backward_delta_kernel(const __grid_constant__ AttentionParams params) {
  const int head = blockIdx.y;
  // One copy for every call: at ~40 registers the padding and varlen steps cost this kernel nothing.
  const Sequence sequence = sequence_of<true>(params, blockIdx.z);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float* const delta = params.delta + row_values_offset(params, sequence, head);
  const int row_begin = blockIdx.x * kDeltaRowsPerBlock;
  const int row_end = min(sequence.mask.seqlen_q, row_begin + kDeltaRowsPerBlock);
  for (int row = row_begin + warp; row < row_end; row += kDeltaWarps) {
    const uint16_t* const dout = row_pointer(params.dout, sequence.batch, head, sequence.q_row0 + row);
    const uint16_t* const out = row_pointer(params.o, sequence.batch, head, sequence.q_row0 + row);
    float sum = 0.f;
    for (int d = lane; d < params.head_dim; d += 32) sum += element_to_float<T>(dout[d]) * element_to_float<T>(out[d]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) delta[row] = sum;
  }
}

template <typename T, int kHeadDim, bool kPaddedOrPacked, bool kScoreModifiers>
__global__ void __launch_bounds__(KeyTileTiles<kHeadDim>::kThreads)
    attention_backward_dk_dv_kernel(const __grid_constant__ AttentionParams params, bool chunked) {
  using Tiles = KeyTileTiles<kHeadDim>;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kThreads = Tiles::kThreads;
  constexpr int kSliceCols = Tiles::kSliceCols;

  uint16_t* const smem = dynamic_shared_memory<uint16_t>();
  uint16_t* const k_tile = smem + Tiles::kKOffset;
  uint16_t* const v_tile = smem + Tiles::kVOffset;
  uint16_t* const q_tiles = smem + Tiles::kQOffset;
  uint16_t* const do_tiles = smem + Tiles::kDoOffset;
  float* const row_values = reinterpret_cast<float*>(smem + Tiles::kTileElements);
  float* const lse_stages = row_values + Tiles::kLseOffset;
  float* const delta_stages = row_values + Tiles::kDeltaOffset;

  const int n0 = blockIdx.x * kBlockN;
  const int kv_head = blockIdx.y;
  const Sequence sequence = sequence_of<kPaddedOrPacked>(params, blockIdx.z);
  const ScoreMask& mask = sequence.mask;
  const int seqlen_q = mask.seqlen_q;
  const int seqlen_k = mask.seqlen_k;
  // Varlen: the grid covers the longest sequence; the shorter ones' extra tiles have no rows.
  if (n0 >= seqlen_k) return;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int strip_row0 = 16 * (warp % Tiles::kKeyStrips);  // this warp's keys inside the block
  const int slice_col0 = kSliceCols * (warp / Tiles::kKeyStrips);
  const int head_dim = params.head_dim;
  const int group = params.group;

  // Causal: key n0 is seen by queries i >= n0 - (seqlen_k - seqlen_q); start at that i's tile. A
  // window bounds the queries on both sides.
  int query_begin = params.causal ? max(0, n0 - (seqlen_k - seqlen_q)) / kBlockM * kBlockM : 0;
  int query_end = seqlen_q;
  if constexpr (kScoreModifiers) {
    query_begin = mask.window_query_begin(n0) / kBlockM * kBlockM;
    query_end = mask.window_query_end(n0, kBlockN);
  }
  const int query_tiles = query_begin < query_end ? ceil_div(query_end - query_begin, kBlockM) : 0;
  // The block walks the query tiles of each query head of its group in turn (steps), summing
  // their contributions to dK and dV in order. A block of padding keys alone has nothing to sum.
  const KeyTile keys = mask.key_tile<kBlockN>(n0);
  const int steps = keys.any_real() ? group * query_tiles : 0;

  auto load_query_stage = [&](int step, int stage) {
    const int head = kv_head * group + step / query_tiles;
    const int m0 = query_begin + step % query_tiles * kBlockM;
    load_tile<kBlockM, kHeadDim, kThreads>(q_tiles + stage * kBlockM * kHeadDim,
                                           row_pointer(params.q, sequence.batch, head, sequence.q_row0 + m0),
                                           params.q.row_stride, seqlen_q - m0, head_dim, chunked);
    load_tile<kBlockM, kHeadDim, kThreads>(do_tiles + stage * kBlockM * kHeadDim,
                                           row_pointer(params.dout, sequence.batch, head, sequence.q_row0 + m0),
                                           params.dout.row_stride, seqlen_q - m0, head_dim, chunked);
    // Queries past the end get lse +inf (so P = 0) and delta 0.
    const int thread = threadIdx.x;
    if (thread < kBlockM) {
      const int row = m0 + thread;
      const int64_t offset = row_values_offset(params, sequence, head) + row;
      lse_stages[stage * kBlockM + thread] = row < seqlen_q ? lse_in_log2_units(params.lse[offset]) : INFINITY;
      delta_stages[stage * kBlockM + thread] = row < seqlen_q ? params.delta[offset] : 0.f;
    }
  };

  load_tile<kBlockN, kHeadDim, kThreads>(k_tile, row_pointer(params.k, sequence.batch, kv_head, sequence.k_row0 + n0),
                                         params.k.row_stride, seqlen_k - n0, head_dim, chunked);
  load_tile<kBlockN, kHeadDim, kThreads>(v_tile, row_pointer(params.v, sequence.batch, kv_head, sequence.k_row0 + n0),
                                         params.v.row_stride, seqlen_k - n0, head_dim, chunked);
  if (steps > 0) load_query_stage(0, 0);
  cp_async_commit();

  const float scale_log2 = params.softmax_scale * kLog2e;
  float dk[kSliceCols / 8][4] = {};
  float dv[kSliceCols / 8][4] = {};

  for (int step = 0; step < steps; ++step) {
    const int stage = step % 2;
    const int m0 = query_begin + step % query_tiles * kBlockM;
    if (step + 1 < steps) load_query_stage(step + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint16_t* const q_tile = q_tiles + stage * kBlockM * kHeadDim;
    const uint16_t* const do_tile = do_tiles + stage * kBlockM * kHeadDim;
    const float* const lse_log2 = lse_stages + stage * kBlockM;
    const float* const delta_tile = delta_stages + stage * kBlockM;

    // With score modifiers: the step's query head, and its keep-mask before the scores take their
    // registers (Philox needs a dozen of its own).
    int head = 0;
    uint32_t keep = ~0u;
    if constexpr (kScoreModifiers) {
      head = kv_head * group + step / query_tiles;
      if (dropout_enabled(params)) {
        keep = dropout_keep_bits<true, kBlockM / 8>(params, blockIdx.z, head, n0 + strip_row0, m0);
      }
    }
    // Transposed scores S^T: this strip's 16 keys x kBlockM queries. Column c is query m0 + c, so
    // lse and delta vary along the columns here.
    float scores[kBlockM / 8][4] = {};
    warp_gemm_rows_by_rows<T, kHeadDim, kHeadDim, kBlockM>(scores, k_tile, strip_row0, q_tile, 0);
    if constexpr (kScoreModifiers) {
      // dP^T first, so that one pass over the elements makes both P^T (dropped) and dS^T, with
      // softcap's derivative at hand; then dV += P^T dO and dK += dS^T Q.
      float ds[kBlockM / 8][4] = {};
      warp_gemm_rows_by_rows<T, kHeadDim, kHeadDim, kBlockM>(ds, v_tile, strip_row0, do_tile, 0);
      const int column = 2 * (lane % 4);
      recompute_gradient_scores<true>(
          scores, ds, n0 + strip_row0, m0, score_modifiers_of(params, mask, blockIdx.z, head), mask, keys,
          mask.block_needs_mask<kBlockN, true>(m0, kBlockM, keys), keep, params.dropout_scale,
          [&](int n, int i) { return lse_log2[8 * n + column + i % 2]; },
          [&](int n, int i) { return delta_tile[8 * n + column + i % 2]; });
      uint32_t p_fragments[kBlockM / 16][4];
      accumulator_to_a_fragments<T, kBlockM>(p_fragments, scores);
      uint32_t ds_fragments[kBlockM / 16][4];
      accumulator_to_a_fragments<T, kBlockM>(ds_fragments, ds);
      warp_gemm_registers_by_tile<T, kHeadDim, kBlockM, kSliceCols>(dv, p_fragments, do_tile, 0, slice_col0);
      warp_gemm_registers_by_tile<T, kHeadDim, kBlockM, kSliceCols>(dk, ds_fragments, q_tile, 0, slice_col0);
    } else {
#pragma unroll
      for (int n = 0; n < kBlockM / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) scores[n][i] = scores[n][i] * scale_log2 - lse_log2[8 * n + 2 * (lane % 4) + i % 2];
      }
      if (mask.block_needs_mask<kBlockN>(m0, kBlockM, keys)) {
        hide_masked_scores<true>(scores, n0 + strip_row0, m0, mask, keys);
      }
      // P^T = exp2(scores), kept in `scores`; dV += P^T dO.
#pragma unroll
      for (int n = 0; n < kBlockM / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) scores[n][i] = exp2f(scores[n][i]);
      }
      uint32_t p_fragments[kBlockM / 16][4];
      accumulator_to_a_fragments<T, kBlockM>(p_fragments, scores);
      warp_gemm_registers_by_tile<T, kHeadDim, kBlockM, kSliceCols>(dv, p_fragments, do_tile, 0, slice_col0);

      // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta) in place; dK += dS^T Q.
      float ds[kBlockM / 8][4] = {};
      warp_gemm_rows_by_rows<T, kHeadDim, kHeadDim, kBlockM>(ds, v_tile, strip_row0, do_tile, 0);
#pragma unroll
      for (int n = 0; n < kBlockM / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) ds[n][i] = scores[n][i] * (ds[n][i] - delta_tile[8 * n + 2 * (lane % 4) + i % 2]);
      }
      uint32_t ds_fragments[kBlockM / 16][4];
      accumulator_to_a_fragments<T, kBlockM>(ds_fragments, ds);
      warp_gemm_registers_by_tile<T, kHeadDim, kBlockM, kSliceCols>(dk, ds_fragments, q_tile, 0, slice_col0);
    }
    __syncthreads();
  }
  // Completes the first stage's copies when there was no step, before K and V are reused.
  cp_async_wait<0>();
  __syncthreads();

  store_accumulator<T, kHeadDim, kSliceCols / 8>(k_tile, strip_row0, slice_col0, dk, params.softmax_scale,
                                                 params.softmax_scale);
  // dV = P^T dO with dropout's 1 / (1 - p) (1 without dropout).
  const float dv_scale = kScoreModifiers ? params.dropout_scale : 1.f;
  store_accumulator<T, kHeadDim, kSliceCols / 8>(v_tile, strip_row0, slice_col0, dv, dv_scale, dv_scale);
  __syncthreads();
  store_tile<kBlockN, kHeadDim, kThreads>(row_pointer(params.dk, sequence.batch, kv_head, sequence.k_row0 + n0),
                                          params.dk.row_stride, seqlen_k - n0, head_dim, k_tile, chunked);
  store_tile<kBlockN, kHeadDim, kThreads>(row_pointer(params.dv, sequence.batch, kv_head, sequence.k_row0 + n0),
                                          params.dv.row_stride, seqlen_k - n0, head_dim, v_tile, chunked);
}

// With score modifiers, a minimum of 1 block per SM: without it ptxas aims the sm_90 build at
// fewer registers than the modifiers need (128 at head dim 64) and spills; 0 (none given) leaves
// the other variants as they were.
template <typename T, int kHeadDim, bool kPaddedOrPacked, bool kScoreModifiers>
__global__ void __launch_bounds__(QueryTileTiles<kHeadDim>::kThreads, kScoreModifiers ? 1 : 0)
    attention_backward_dq_kernel(const __grid_constant__ AttentionParams params, bool chunked) {
  using Tiles = QueryTileTiles<kHeadDim>;
  constexpr int kBlockM = Tiles::kBlockM;
  constexpr int kBlockN = Tiles::kBlockN;
  constexpr int kThreads = Tiles::kThreads;

  uint16_t* const smem = dynamic_shared_memory<uint16_t>();
  uint16_t* const q_tile = smem + Tiles::kQOffset;
  uint16_t* const do_tile = smem + Tiles::kDoOffset;
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
  const int warp_row0 = 16 * warp;
  const int head_dim = params.head_dim;

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
  load_tile<kBlockM, kHeadDim, kThreads>(do_tile, row_pointer(params.dout, sequence.batch, head, sequence.q_row0 + m0),
                                         params.dout.row_stride, seqlen_q - m0, head_dim, chunked);
  int tile = mask.next_key_tile<kBlockN>(key_begin / kBlockN, key_tiles);
  if (tile < key_tiles) load_kv_stage(tile, 0);
  cp_async_commit();

  // This lane's rows g (half 0) and g + 8 (half 1): their lse and delta stay in registers.
  float lse_log2[2];
  float row_delta[2];
  {
    const float* const lse = params.lse + row_values_offset(params, sequence, head);
    const float* const delta = params.delta + row_values_offset(params, sequence, head);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_row0 + lane / 4 + 8 * half;
      lse_log2[half] = row < seqlen_q ? lse_in_log2_units(lse[row]) : INFINITY;
      row_delta[half] = row < seqlen_q ? delta[row] : 0.f;
    }
  }

  const float scale_log2 = params.softmax_scale * kLog2e;
  ScoreModifiers modifiers{};
  if constexpr (kScoreModifiers) modifiers = score_modifiers_of(params, mask, blockIdx.z, head);
  float dq[kHeadDim / 8][4] = {};

  for (int stage = 0; tile < key_tiles; stage ^= 1) {
    const int n0 = tile * kBlockN;
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
    float dp[kBlockN / 8][4] = {};
    warp_gemm_rows_by_rows<T, kHeadDim, kHeadDim, kBlockN>(dp, do_tile, warp_row0, v_tile, 0);

    if constexpr (kScoreModifiers) {
      // dS (with dropout and softcap's derivative), kept in `dp`.
      const KeyTile keys = mask.key_tile<kBlockN>(n0);
      recompute_gradient_scores<false>(scores, dp, m0 + warp_row0, n0, modifiers, mask, keys,
                                       mask.block_needs_mask<kBlockN, true>(m0, kBlockM, keys), keep,
                                       params.dropout_scale, [&](int, int i) { return lse_log2[i / 2]; },
                                       [&](int, int i) { return row_delta[i / 2]; });
    } else {
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) scores[n][i] = scores[n][i] * scale_log2 - lse_log2[i / 2];
      }
      const KeyTile keys = mask.key_tile<kBlockN>(n0);
      if (mask.block_needs_mask<kBlockN>(m0, kBlockM, keys)) {
        hide_masked_scores<false>(scores, m0 + warp_row0, n0, mask, keys);
      }
      // dS = P * (dP - delta), kept in `dp`.
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) dp[n][i] = exp2f(scores[n][i]) * (dp[n][i] - row_delta[i / 2]);
      }
    }

    uint32_t ds_fragments[kBlockN / 16][4];
    accumulator_to_a_fragments<T, kBlockN>(ds_fragments, dp);
    warp_gemm_registers_by_tile<T, kHeadDim, kBlockN, kHeadDim>(dq, ds_fragments, k_tile, 0, 0);
    __syncthreads();
    tile = next_tile;
  }
  // Completes the Q and dO copies when there was no key tile, before q_tile is reused.
  cp_async_wait<0>();
  __syncthreads();

  store_accumulator<T, kHeadDim, kHeadDim / 8>(q_tile, warp_row0, 0, dq, params.softmax_scale,
                                               params.softmax_scale);
  __syncthreads();
  store_tile<kBlockM, kHeadDim, kThreads>(row_pointer(params.dq, sequence.batch, head, sequence.q_row0 + m0),
                                          params.dq.row_stride, seqlen_q - m0, head_dim, q_tile, chunked);
}

template <typename T, int kHeadDim, bool kPaddedOrPacked, bool kScoreModifiers>
cudaError_t launch_backward(const AttentionParams& params, cudaStream_t stream) {
  const int head_dim = params.head_dim;
  const bool chunked = allows_16_byte_chunks(params.q, head_dim) && allows_16_byte_chunks(params.k, head_dim) &&
                       allows_16_byte_chunks(params.v, head_dim) && allows_16_byte_chunks(params.dout, head_dim) &&
                       allows_16_byte_chunks(params.dq, head_dim) && allows_16_byte_chunks(params.dk, head_dim) &&
                       allows_16_byte_chunks(params.dv, head_dim);

  // With no query rows there is no delta and no dQ, but dK and dV still need their zeros.
  if (params.seqlen_q > 0) {
    const dim3 grid(ceil_div(params.seqlen_q, kDeltaRowsPerBlock), params.heads, params.batch);
    const cudaError_t error =
        launch_kernel(attention_backward_delta_kernel<T>, grid, 32 * kDeltaWarps, 0, stream, params);
    if (error != cudaSuccess) return error;
  }
  if (params.seqlen_k > 0) {
    using Tiles = KeyTileTiles<kHeadDim>;
    auto kernel = attention_backward_dk_dv_kernel<T, kHeadDim, kPaddedOrPacked, kScoreModifiers>;
    cudaError_t error = allow_dynamic_shared_memory(kernel, Tiles::kSmemBytes);
    if (error != cudaSuccess) return error;
    const dim3 grid(ceil_div(params.seqlen_k, Tiles::kBlockN), params.heads / params.group, params.batch);
    error = launch_kernel(kernel, grid, Tiles::kThreads, Tiles::kSmemBytes, stream, params, chunked);
    if (error != cudaSuccess) return error;
  }
  if (params.seqlen_q > 0) {
    using Tiles = QueryTileTiles<kHeadDim>;
    auto kernel = attention_backward_dq_kernel<T, kHeadDim, kPaddedOrPacked, kScoreModifiers>;
    cudaError_t error = allow_dynamic_shared_memory(kernel, Tiles::kSmemBytes);
    if (error != cudaSuccess) return error;
    const dim3 grid(ceil_div(params.seqlen_q, Tiles::kBlockM), params.heads, params.batch);
    error = launch_kernel(kernel, grid, Tiles::kThreads, Tiles::kSmemBytes, stream, params, chunked);
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_attention_backward(const AttentionParams& given_params, cudaStream_t stream) {
  const AttentionParams params = with_canonical_window(given_params);
  if (params.batch == 0 || params.heads == 0 || (params.seqlen_q == 0 && params.seqlen_k == 0)) return cudaSuccess;
  return dispatch_element_type_and_head_dim(params, [&](auto element, auto head_dim) {
    return dispatch_kernel_variant(params, [&](auto padded_or_packed, auto score_modifiers) {
      return launch_backward<typename decltype(element)::type, decltype(head_dim)::value,
                             decltype(padded_or_packed)::value, decltype(score_modifiers)::value>(params, stream);
    });
  });
}

}  // namespace fused_attention
