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

// How kThreads threads split a kRows x kCols tile into 16-byte chunks: thread t always takes
// chunk column t % kChunksPerRow, starting at row t / kChunksPerRow, and moves down
// kRowsPerPass rows per pass.
template <int kRows, int kCols, int kThreads>
struct TilePass {
  static constexpr int kChunksPerRow = kCols / 8;
  static_assert(kThreads % kChunksPerRow == 0, "every thread keeps one chunk column");
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kRows % kRowsPerPass == 0, "every thread copies the same number of chunks");
  static constexpr int kPasses = kRows / kRowsPerPass;
  __device__ static int column() { return static_cast<int>(threadIdx.x % kChunksPerRow) * 8; }
  __device__ static int first_row() { return static_cast<int>(threadIdx.x / kChunksPerRow); }
};

// Copies rows [0, kRows) of the global matrix at `global` (row stride in elements) into a swizzled
// tile, writing zeros for rows >= valid_rows and columns >= head_dim so that padding contributes
// nothing to any product. With `chunked` the copy is asynchronous (cp.async: complete it with
// cp_async_wait, then __syncthreads); otherwise it is done with plain loads and stores (visible
// after __syncthreads). Called by all kThreads threads of the block.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* global, int64_t row_stride,
                                          int valid_rows, int head_dim, bool chunked) {
  using Pass = TilePass<kRows, kCols, kThreads>;
  const int col = Pass::column();
  const bool col_in_range = col < head_dim;
  // One pointer stepped by whole passes: a per-pass 64-bit offset would be one more pair of
  // registers held across the callers' loops.
  const uint16_t* source = global + Pass::first_row() * row_stride + col;
#pragma unroll
  for (int pass = 0; pass < Pass::kPasses; ++pass, source += Pass::kRowsPerPass * row_stride) {
    const int row = Pass::first_row() + pass * Pass::kRowsPerPass;
    uint16_t* destination = tile + swizzled_offset<kCols>(row, col);
    const bool in_range = row < valid_rows && col_in_range;
    if (chunked) {
      // An out-of-range chunk reads 0 bytes; the tile's first row is a valid address to name.
      cp_async_16(shared_address(destination), in_range ? source : global, in_range ? 16 : 0);
    } else {
      uint32_t words[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        uint32_t pair = 0;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (in_range && col + 2 * w + e < head_dim) pair |= static_cast<uint32_t>(source[2 * w + e]) << (16 * e);
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
  using Pass = TilePass<kRows, kCols, kThreads>;
  const int col = Pass::column();
  if (col >= head_dim) return;
  uint16_t* destination = global + Pass::first_row() * row_stride + col;
#pragma unroll
  for (int pass = 0; pass < Pass::kPasses; ++pass, destination += Pass::kRowsPerPass * row_stride) {
    const int row = Pass::first_row() + pass * Pass::kRowsPerPass;
    if (row >= valid_rows) return;
    const uint16_t* source = tile + swizzled_offset<kCols>(row, col);
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
