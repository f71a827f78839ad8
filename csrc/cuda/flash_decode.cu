// The decode kernel of fused_attention::fwd_kvcache (flash-decoding): one block per (sequence, KV
// head, tile of kDecodeRows packed query rows, split of the keys).
//
// A block packs the rows of every query head of its KV head, query-major (row r is query r / group of
// head kv_head * group + r % group), so each cached key is read from global memory once for all of
// them. A decoding step has few rows (group x Nq) and is bound by reading the cache, so the products
// run on CUDA cores out of shared memory rather than on tensor cores: row r belongs to warp r % 4;
// for each tile of 32 keys, lane j scores key j against its warp's rows, then every lane accumulates
// its head-dim columns of P V. Split s covers the s-th chunk of ceil(seqlens_k[b] / num_splits) keys
// rounded up to the key tile; a row that sees none of its chunk's keys writes o = 0 and lse = -inf.
// Keys at or past seqlens_k[b] are never loaded: a cache holds anything there.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
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
#include "tiles.h"

namespace fused_attention {
namespace {

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Row `row` of a cache (dense: slab b; paged: through the block table) for sequence b's key `key`.
__device__ __forceinline__ const uint16_t* cache_row(const DecodeParams& params, const StridedTensor& cache, int b,
                                                     int kv_head, int key) {
  int64_t slab = b, row = key;
  if (params.block_table != nullptr) {
    slab = params.block_table[static_cast<int64_t>(b) * params.max_blocks + key / params.block_size];
    row = key % params.block_size;
  }
  return static_cast<const uint16_t*>(cache.data) + slab * cache.batch_stride + kv_head * cache.head_stride +
         row * cache.row_stride;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(DecodeTiles<kHeadDim>::kThreads)
    attention_decode_kernel(const __grid_constant__ DecodeParams params) {
  using Tiles = DecodeTiles<kHeadDim>;
  constexpr int kDecodeWarps = Tiles::kWarps, kDecodeThreads = Tiles::kThreads, kDecodeRows = Tiles::kRows;
  constexpr int kDecodeKeys = Tiles::kKeys, kRowsPerWarp = Tiles::kRowsPerWarp;
  constexpr int kColumnsPerLane = kHeadDim / 32;
  float* const smem = dynamic_shared_memory<float>();
  float* const q_tile = smem + Tiles::kQOffset;
  float* const k_tile = smem + Tiles::kKOffset;
  float* const v_tile = smem + Tiles::kVOffset;
  float* const p_tile = smem + Tiles::kPOffset;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  const int group = params.group, n_q = params.seqlen_q, rows = group * n_q;
  const int kv_heads = params.heads / group;
  const int row_tiles = ceil_div(rows, kDecodeRows);
  const int row0 = blockIdx.x % row_tiles * kDecodeRows;
  const int kv_head = blockIdx.x / row_tiles % kv_heads;
  const int b = blockIdx.x / row_tiles / kv_heads;
  const int split = blockIdx.y;
  const int n_k = params.seqlens_k[b];

  for (int i = threadIdx.x; i < kDecodeRows * kHeadDim; i += kDecodeThreads) {
    const int row = row0 + i / kHeadDim, column = i % kHeadDim;
    float value = 0.f;
    if (row < rows && column < params.head_dim) {
      const int head = kv_head * group + row % group;
      const uint16_t* q_row = static_cast<const uint16_t*>(params.q.data) + b * params.q.batch_stride +
                              head * params.q.head_stride + static_cast<int64_t>(row / group) * params.q.row_stride;
      value = element_to_float<T>(q_row[column]);
    }
    q_tile[i] = value;
  }

  // This split's keys, narrowed to the window of the block's queries.
  const int chunk = ceil_div(ceil_div(n_k, params.num_splits), kDecodeKeys) * kDecodeKeys;
  const int chunk_begin = min(n_k, split * chunk);
  const ScoreMask mask{n_q, n_k, params.causal, nullptr, params.window_left, params.window_right};
  const int first_query = row0 / group, last_query = min(n_q - 1, (row0 + kDecodeRows - 1) / group);
  const int key_begin = max(chunk_begin, mask.window_key_begin(first_query));
  int key_end = min(n_k, chunk_begin + chunk);
  if (params.window_right >= 0) key_end = min(key_end, last_query + n_k - n_q + params.window_right + 1);

  // Per row of this warp: running max (log2 units), sum of exp2(score - max), and the lane's columns of
  // the unnormalized output.
  float row_max[kRowsPerWarp], row_sum[kRowsPerWarp], acc[kRowsPerWarp][kColumnsPerLane];
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    row_max[t] = -INFINITY;
    row_sum[t] = 0.f;
#pragma unroll
    for (int c = 0; c < kColumnsPerLane; ++c) acc[t][c] = 0.f;
  }

  for (int key0 = key_begin; key0 < key_end; key0 += kDecodeKeys) {
    __syncthreads();  // the previous tile is read (and the query rows written)
    for (int i = threadIdx.x; i < kDecodeKeys * kHeadDim; i += kDecodeThreads) {
      const int j = i / kHeadDim, column = i % kHeadDim, key = key0 + j;
      float k_value = 0.f, v_value = 0.f;
      if (key < key_end && column < params.head_dim) {
        k_value = element_to_float<T>(cache_row(params, params.k_cache, b, kv_head, key)[column]);
        v_value = element_to_float<T>(cache_row(params, params.v_cache, b, kv_head, key)[column]);
      }
      k_tile[j * Tiles::kKeyStride + column] = k_value;
      v_tile[j * kHeadDim + column] = v_value;
    }
    __syncthreads();

  #pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
      const int r = warp + kDecodeWarps * t, row = row0 + r, query = row / group, key = key0 + lane;
      float score = -INFINITY;
      if (row < rows && key < key_end && mask.visible<true>(query, key)) {
        const float* q_row = q_tile + r * kHeadDim;
        const float* k_row = k_tile + lane * Tiles::kKeyStride;
        float dot = 0.f;
#pragma unroll 8
        for (int column = 0; column < kHeadDim; ++column) dot += q_row[column] * k_row[column];
        const int head = kv_head * group + row % group;
        const float slope = params.alibi_slopes == nullptr ? 0.f : params.alibi_slopes[b * params.heads + head];
        const bool capped = params.softcap > 0.f;
        const ScoreModifiers modifiers{params.softmax_scale * kLog2e,
                                       capped ? params.softmax_scale / params.softcap : 0.f,
                                       params.softcap * kLog2e, slope * kLog2e, n_k - n_q};
        float unused_derivative;
        score = modifiers.score_log2(dot, query, key, unused_derivative);
      }
      const float new_max = fmaxf(row_max[t], warp_max(score));
      // A row with no visible key yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
      const float shift = new_max == -INFINITY ? 0.f : new_max;
      const float p = exp2f(score - shift);
      const float rescale = exp2f(row_max[t] - shift);
      row_sum[t] = row_sum[t] * rescale + warp_sum(p);
      row_max[t] = new_max;
#pragma unroll
      for (int c = 0; c < kColumnsPerLane; ++c) acc[t][c] *= rescale;
      p_tile[r * kDecodeKeys + lane] = p;
    }
    __syncthreads();
  #pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
      const float* p_row = p_tile + (warp + kDecodeWarps * t) * kDecodeKeys;
      for (int j = 0; j < kDecodeKeys; ++j) {
        const float p = p_row[j];
#pragma unroll
        for (int c = 0; c < kColumnsPerLane; ++c) acc[t][c] += p * v_tile[j * kHeadDim + lane + 32 * c];
      }
    }
  }

#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    const int row = row0 + warp + kDecodeWarps * t;
    if (row >= rows) continue;
    const int head = kv_head * group + row % group;
    const int64_t part_row =
        ((static_cast<int64_t>(split) * params.batch + b) * params.heads + head) * n_q + row / group;
    const bool sees_a_key = row_sum[t] > 0.f;
    const float normalizer = sees_a_key ? 1.f / row_sum[t] : 0.f;
    float* const o_row = params.o_parts + part_row * params.head_dim;
#pragma unroll
    for (int c = 0; c < kColumnsPerLane; ++c) {
      const int column = lane + 32 * c;
      if (column < params.head_dim) o_row[column] = acc[t][c] * normalizer;
    }
    if (lane == 0) params.lse_parts[part_row] = sees_a_key ? (row_max[t] + log2f(row_sum[t])) * kLn2 : -INFINITY;
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream) {
  using Tiles = DecodeTiles<kHeadDim>;
  auto kernel = attention_decode_kernel<T, kHeadDim>;
  cudaError_t error = allow_dynamic_shared_memory(kernel, Tiles::kSmemBytes);
  if (error != cudaSuccess) return error;
  const int kv_heads = params.heads / params.group;
  const dim3 grid(params.batch * kv_heads * ceil_div(params.group * params.seqlen_q, Tiles::kRows), params.num_splits);
  return launch_kernel(kernel, grid, Tiles::kThreads, Tiles::kSmemBytes, stream, params);
}

}  // namespace

cudaError_t launch_attention_decode(const DecodeParams& given_params, cudaStream_t stream) {
  DecodeParams params = given_params;
  if (params.causal) params.window_right = 0;  // causal is the window's right bound 0 (ScoreMask reads both)
  params.causal = params.window_right == 0;
  if (params.batch == 0 || params.heads == 0 || params.seqlen_q == 0) return cudaSuccess;
  return dispatch_element_type_and_head_dim(params.element_type, params.head_dim, [&](auto element, auto head_dim) {
    return launch_decode<typename decltype(element)::type, decltype(head_dim)::value>(params, stream);
  });
}

}  // namespace fused_attention
