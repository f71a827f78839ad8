// Shared-memory tiles and the block-wide copies between them and global memory.
//
// A tile is kRows x kCols 16-bit elements, row-major, kCols (the padded head dim) a multiple of
// 64. Its rows are split into 16-byte chunks of 8 elements, and chunk c of row r is stored at
// chunk position c ^ (r % 8). ldmatrix reads one chunk from each of 8 consecutive rows; without
// the XOR those 8 chunks would share banks (rows are a multiple of 128 bytes apart), with it they
// cover all 32 banks once.
//
// Elements are moved as raw 16-bit patterns (uint16_t): the copies do not care whether they are
// fp16 or bf16.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "mma.cuh"
#include "params.h"

namespace fused_attention {

template <int kCols>
__device__ __forceinline__ int swizzled_offset(int row, int col) {
  static_assert(kCols % 64 == 0, "the XOR swizzle needs at least 8 chunks per row");
  return row * kCols + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// Element (row, 0) of one (batch, head) slice.
__device__ __forceinline__ uint16_t* row_pointer(const StridedTensor& tensor, int batch, int head, int row) {
  return static_cast<uint16_t*>(tensor.data) + batch * tensor.batch_stride + head * tensor.head_stride +
         static_cast<int64_t>(row) * tensor.row_stride;
}

// Whether a tensor can be moved in whole 16-byte chunks: every row start 16-byte aligned and the
// head dim a whole number of chunks. Otherwise the copies fall back to one element at a time.
inline bool allows_16_byte_chunks(const StridedTensor& tensor, int head_dim) {
  return reinterpret_cast<uintptr_t>(tensor.data) % 16 == 0 && tensor.batch_stride % 8 == 0 &&
         tensor.head_stride % 8 == 0 && tensor.row_stride % 8 == 0 && head_dim % 8 == 0;
}

// Copies rows [0, kRows) of the global matrix at `global` (row stride in elements) into a swizzled
// tile, writing zeros for rows >= valid_rows and columns >= head_dim so that padding contributes
// nothing to any product. With `chunked` the copy is asynchronous (cp.async: complete it with
// cp_async_wait, then __syncthreads); otherwise it is done with plain loads and stores (visible
// after __syncthreads). Called by all kThreads threads of the block.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* global, int64_t row_stride,
                                          int valid_rows, int head_dim, bool chunked) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = i * kThreads + threadIdx.x;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * 8;
    uint16_t* destination = tile + swizzled_offset<kCols>(row, col);
    const bool row_in_range = row < valid_rows;
    if (chunked) {
      const bool in_range = row_in_range && col < head_dim;
      // An out-of-range chunk reads 0 bytes; the tile's first row is a valid address to name.
      const uint16_t* source = in_range ? global + row * row_stride + col : global;
      cp_async_16(shared_address(destination), source, in_range ? 16 : 0);
    } else {
      uint32_t words[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        uint32_t pair = 0;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = col + 2 * w + e;
          if (row_in_range && c < head_dim) pair |= static_cast<uint32_t>(global[row * row_stride + c]) << (16 * e);
        }
        words[w] = pair;
      }
      *reinterpret_cast<uint4*>(destination) = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

// Copies rows [0, valid_rows) and columns [0, head_dim) of a swizzled tile to global memory.
// Called by all kThreads threads of the block after a __syncthreads.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void store_tile(uint16_t* global, int64_t row_stride, int valid_rows, int head_dim,
                                           const uint16_t* tile, bool chunked) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = i * kThreads + threadIdx.x;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * 8;
    if (row >= valid_rows || col >= head_dim) continue;
    const uint16_t* source = tile + swizzled_offset<kCols>(row, col);
    uint16_t* destination = global + row * row_stride + col;
    if (chunked) {
      *reinterpret_cast<uint4*>(destination) = *reinterpret_cast<const uint4*>(source);
    } else {
      const int count = min(8, head_dim - col);
      for (int e = 0; e < count; ++e) destination[e] = source[e];
    }
  }
}

// Writes one warp's fp32 accumulator, 16 rows x 8*kNTiles columns in the C layout of mma.cuh, to
// the tile at (row0, col0) as elements of type T. Rows g and g + 8 of the accumulator are
// multiplied by scale_top and scale_bottom.
template <typename T, int kCols, int kNTiles>
__device__ __forceinline__ void store_accumulator(uint16_t* tile, int row0, int col0,
                                                  const float (&accumulator)[kNTiles][4], float scale_top,
                                                  float scale_bottom) {
  const int lane = threadIdx.x % 32;
  const int top = row0 + lane / 4;
  const int bottom = top + 8;
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
    const int col = col0 + 8 * n + 2 * (lane % 4);
    *reinterpret_cast<uint32_t*>(tile + swizzled_offset<kCols>(top, col)) =
        pack_pair<T>(accumulator[n][0] * scale_top, accumulator[n][1] * scale_top);
    *reinterpret_cast<uint32_t*>(tile + swizzled_offset<kCols>(bottom, col)) =
        pack_pair<T>(accumulator[n][2] * scale_bottom, accumulator[n][3] * scale_bottom);
  }
}

}  // namespace fused_attention
