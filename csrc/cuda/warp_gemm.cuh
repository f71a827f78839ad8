// Warp-level products on 16-row strips, built from mma_m16n8k16 and ldmatrix (see mma.cuh for
// the fragment layouts). Operand tiles live in swizzled shared memory (tile_io.cuh); results are
// fp32 accumulators in the C layout: acc[n] is the 16 x 8 block of columns 8n .. 8n + 7.
#pragma once

#include <cstdint>

#include "mma.cuh"
#include "tile_io.cuh"

namespace fused_attention {

// Shared-memory offset of the row segment a lane hands to ldmatrix, for a tile kCols wide.
//
// Every lane addresses (row, 8 * (step + h)): `step` is an even chunk index fixed by the unrolled
// loop, h in {0, 1} depends on the lane only, and row % 8 == lane % 8 because every strip starts
// at a multiple of 8 rows. The swizzled chunk (step + h) ^ (row % 8) therefore equals
// step ^ lane_xor with lane_xor = h ^ (lane % 8) < 8, which splits into the constant step & ~7
// plus (step & 7) ^ lane_xor: four distinct values per lane instead of one per step. Spelling it
// this way keeps the compiler from hoisting one address register per step out of the key loop,
// which spilled at head dim 256.
template <int kCols>
__device__ __forceinline__ int ldmatrix_offset(int row, int step, int lane_xor) {
  return row * kCols + (((step & ~7) + ((step & 7) ^ lane_xor)) << 3);
}

// acc (16 x kN) += A * B^T, where A is rows [a_row0, a_row0 + 16) of tile_a and B is rows
// [b_row0, b_row0 + kN) of tile_b, both over columns [0, kK). Both tiles are kCols wide; a_row0
// and b_row0 are multiples of 8. Used for every "rows times rows" product: Q K^T, dO V^T, K Q^T,
// V dO^T.
template <typename T, int kCols, int kK, int kN>
__device__ __forceinline__ void warp_gemm_rows_by_rows(float (&acc)[kN / 8][4], const uint16_t* tile_a, int a_row0,
                                                       const uint16_t* tile_b, int b_row0) {
  static_assert(kK % 16 == 0 && kN % 16 == 0 && kK <= kCols, "whole 16 x 16 steps inside the tile");
  const int lane = threadIdx.x % 32;
  // Lane addresses per mma.cuh: A at (row0 + l % 16, 8 * (l / 16)), B (stored N x K) at
  // (row0 + 8 * (l / 16) + l % 8, 8 * ((l / 8) % 2)), plus the step's column.
  const int a_row = a_row0 + lane % 16;
  const int a_xor = (lane / 16) ^ (lane % 8);
  const int b_row = b_row0 + 8 * (lane / 16) + lane % 8;
  const int b_xor = ((lane / 8) % 2) ^ (lane % 8);
#pragma unroll
  for (int k0 = 0; k0 < kK; k0 += 16) {
    uint32_t a[4];
    ldmatrix_x4(a, shared_address(tile_a + ldmatrix_offset<kCols>(a_row, k0 / 8, a_xor)));
#pragma unroll
    for (int n = 0; n < kN / 16; ++n) {
      uint32_t b[4];  // b[0], b[1]: columns 16n .. 16n+7; b[2], b[3]: columns 16n+8 .. 16n+15
      ldmatrix_x4(b, shared_address(tile_b + ldmatrix_offset<kCols>(b_row + 16 * n, k0 / 8, b_xor)));
      mma_m16n8k16<T>(acc[2 * n], a, b[0], b[1]);
      mma_m16n8k16<T>(acc[2 * n + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x kN) += A * B, where A (16 x kK) is already in registers as A fragments (a[k] covers
// columns 16k .. 16k + 15) and B is rows [b_row0, b_row0 + kK) x columns [b_col0, b_col0 + kN)
// of tile_b, stored k-major (row = k); b_row0 is a multiple of 8 and b_col0 of 16. Used for P V,
// P^T dO, dS^T Q and dS K.
template <typename T, int kCols, int kK, int kN>
__device__ __forceinline__ void warp_gemm_registers_by_tile(float (&acc)[kN / 8][4], const uint32_t (&a)[kK / 16][4],
                                                            const uint16_t* tile_b, int b_row0, int b_col0) {
  static_assert(kK % 16 == 0 && kN % 16 == 0 && kN <= kCols, "whole 16 x 16 steps inside the tile");
  const int lane = threadIdx.x % 32;
  // Lane addresses per mma.cuh: B (stored K x N, read with .trans) at
  // (row0 + 8 * ((l / 8) % 2) + l % 8, col0 + 8 * (l / 16)), plus the step's row and column.
  const int b_row = b_row0 + 8 * ((lane / 8) % 2) + lane % 8;
  const int b_xor = (lane / 16) ^ (lane % 8);
#pragma unroll
  for (int k = 0; k < kK / 16; ++k) {
#pragma unroll
    for (int n = 0; n < kN / 16; ++n) {
      uint32_t b[4];  // b[0], b[1]: columns 16n .. 16n+7; b[2], b[3]: columns 16n+8 .. 16n+15
      ldmatrix_x4_trans(
          b, shared_address(tile_b + ldmatrix_offset<kCols>(b_row + 16 * k, (b_col0 + 16 * n) / 8, b_xor)));
      mma_m16n8k16<T>(acc[2 * n], a[k], b[0], b[1]);
      mma_m16n8k16<T>(acc[2 * n + 1], a[k], b[2], b[3]);
    }
  }
}

// Rounds a 16 x kN fp32 accumulator to T and regroups it as the A operand of a product over
// k = its kN columns (the identity spelled out at the end of mma.cuh's comment).
template <typename T, int kN>
__device__ __forceinline__ void accumulator_to_a_fragments(uint32_t (&a)[kN / 16][4], const float (&acc)[kN / 8][4]) {
#pragma unroll
  for (int k = 0; k < kN / 16; ++k) {
    a[k][0] = pack_pair<T>(acc[2 * k][0], acc[2 * k][1]);
    a[k][1] = pack_pair<T>(acc[2 * k][2], acc[2 * k][3]);
    a[k][2] = pack_pair<T>(acc[2 * k + 1][0], acc[2 * k + 1][1]);
    a[k][3] = pack_pair<T>(acc[2 * k + 1][2], acc[2 * k + 1][3]);
  }
}

}  // namespace fused_attention
