// bf16 tiles as AVX512_BF16's vdpbf16ps takes them, and their product (products.h: the bf16 path of the
// CPU kernels, on x86-64 CPUs with AVX512_BF16, where cpu_isa() is kAvx512Bf16).
//
// vdpbf16ps adds to each float lane the products of a pair of bf16 of one operand with a pair of the
// other, so operands are held as 32-bit words along the product's depth k, each the bf16 pair (k,
// k + 1) of a row of a or a column of b, k even (an odd depth ends in the pair (k, 0)). b is held as
// "pairs": word (k / 2, j) at b[k / 2 * ldb + j]. a's word (r, k / 2) is at a[r * a_row_stride + k / 2 *
// a_pair_stride]: a tile of bf16 rows (pair stride 1) and the pairs of its transpose are read in place.
// Only bf16 inputs take this path (their values are exact in bf16); the probabilities P and dS are
// rounded to bf16 for the products that take them, as torch's bf16 CPU kernels and FlashAttention on
// GPUs do; the sums stay float.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>

#include "tiles.h"

#ifdef FA_X86_MULTIVERSIONING
#include <immintrin.h>

namespace fused_attention {
namespace {

using Bf16Bits = uint16_t;

inline Bf16Bits bf16_bits(c10::BFloat16 x) { return x.x; }
// Rounded to nearest even; a NaN stays a NaN (quieted), which the rounding's carry could turn into an
// infinity or a zero.
inline Bf16Bits bf16_bits(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<Bf16Bits>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}
inline uint32_t bf16_pair(Bf16Bits low, Bf16Bits high) { return low | (uint32_t{high} << 16); }

// The bf16 path's functions: packing tiles as much as multiplying them, so compiled for its ISA alone.
#define FA_BF16_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))

// pack_row_pairs of bf16 rows into b = src^T (row_step 1): the words of 16 rows at a time, one gather
// per pair of columns, where the tile's row offsets fit the gather's 32-bit indices.
FA_BF16_TARGET inline bool gather_row_pairs(uint32_t* dst, int64_t pair_step, const c10::BFloat16* src,
                                            int64_t src_row_stride, int64_t rows, int64_t cols) {
  if (src_row_stride > (int64_t{1} << 26)) return false;
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(src_row_stride)));
  for (int64_t j0 = 0; j0 < rows; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, rows - j0);
    const __mmask16 lanes = _cvtu32_mask16(n == 16 ? 0xffffu : (1u << n) - 1);
    const c10::BFloat16* block = src + j0 * src_row_stride;
    for (int64_t k = 0; k + 1 < cols; k += 2) {
      const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, offsets, block + k, 2);
      _mm512_mask_storeu_epi32(dst + k / 2 * pair_step + j0, lanes, words);
    }
    for (int64_t j = 0; j < n && cols % 2 != 0; ++j) {  // an odd last column pairs with a 0
      dst[cols / 2 * pair_step + j0 + j] = bf16_pair(bf16_bits(block[j * src_row_stride + cols - 1]), 0);
    }
  }
  return true;
}

// The pairs along the rows of src (rows x cols): word (j, k / 2) = (src[j][k], src[j][k + 1]) goes to
// dst[j * row_step + k / 2 * pair_step]. As a: a tile of rows (pair_step 1); as b: src^T (row_step 1).
template <typename Src>
FA_BF16_TARGET void pack_row_pairs(uint32_t* dst, int64_t row_step, int64_t pair_step, const Src* src,
                                   int64_t src_row_stride, int64_t rows, int64_t cols) {
  if constexpr (std::is_same_v<Src, c10::BFloat16>) {
    if (row_step == 1 && gather_row_pairs(dst, pair_step, src, src_row_stride, rows, cols)) return;
  }
  for (int64_t j = 0; j < rows; ++j) {
    const Src* row = src + j * src_row_stride;
    uint32_t* out = dst + j * row_step;
    if (pair_step == 1) {  // the words of a row are its bf16 values in order: convert 32 at a time
      for (int64_t k = 0; k < cols; k += 32) {
        const int64_t n = std::min<int64_t>(32, cols - k);
        __m512i values;
        if constexpr (std::is_same_v<Src, float>) {
          const __mmask16 low = _cvtu32_mask16(n >= 16 ? 0xffffu : (1u << n) - 1);
          const __mmask16 high = _cvtu32_mask16(n >= 32 ? 0xffffu : n <= 16 ? 0u : (1u << (n - 16)) - 1);
          values = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(high, row + k + 16),
                                                _mm512_maskz_loadu_ps(low, row + k));
        } else {
          values = _mm512_maskz_loadu_epi16(_cvtu32_mask32(n >= 32 ? 0xffffffffu : (1u << n) - 1), row + k);
        }
        _mm512_mask_storeu_epi32(out + k / 2, _cvtu32_mask16((1u << ceil_div(n, 2)) - 1), values);
      }
      continue;
    }
    for (int64_t k = 0; k + 1 < cols; k += 2) {
      out[k / 2 * pair_step] = bf16_pair(bf16_bits(row[k]), bf16_bits(row[k + 1]));
    }
    if (cols % 2 != 0) out[cols / 2 * pair_step] = bf16_pair(bf16_bits(row[cols - 1]), 0);
  }
}

// The pairs down the columns of src (rows x cols): word (k / 2, j) = (src[k][j], src[k + 1][j]) goes to
// dst[k / 2 * ld + j]. As b: src; as a (a_row_stride 1, a_pair_stride ld): src^T.
template <typename Src>
FA_BF16_TARGET void pack_column_pairs(uint32_t* dst, int64_t ld, const Src* src, int64_t src_row_stride,
                                      int64_t rows, int64_t cols) {
  for (int64_t k = 0; k < rows; k += 2) {
    const Src* row = src + k * src_row_stride;
    uint32_t* out = dst + k / 2 * ld;
    if (k + 1 < rows) {
      const Src* next = row + src_row_stride;
      for (int64_t j = 0; j < cols; ++j) out[j] = bf16_pair(bf16_bits(row[j]), bf16_bits(next[j]));
    } else {
      for (int64_t j = 0; j < cols; ++j) out[j] = bf16_pair(bf16_bits(row[j]), 0);
    }
  }
}

// One R x 32 block of c (2R of the 32 vector registers, 2 for b's words, 1 for a broadcast).
template <int R>
FA_BF16_TARGET [[gnu::always_inline]] inline void bf16_pairs_block(float alpha, bool accumulate, int64_t r0, int64_t c0,
                                                                    int64_t depth_pairs, const uint32_t* a,
                                                                    int64_t a_row_stride, int64_t a_pair_stride,
                                                                    const uint32_t* b, int64_t ldb, float* c,
                                                                    int64_t ldc) {
  __m512 block[R][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* c_row = c + (r0 + r) * ldc + c0;
    block[r][0] = accumulate ? _mm512_loadu_ps(c_row) : _mm512_setzero_ps();
    block[r][1] = accumulate ? _mm512_loadu_ps(c_row + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < depth_pairs; ++k) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + k * ldb + c0);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + k * ldb + c0 + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const uint32_t a_word = a[(r0 + r) * a_row_stride + k * a_pair_stride];
      const __m512bh a_rk = (__m512bh)_mm512_set1_epi32(static_cast<int>(a_word));
      block[r][0] = _mm512_dpbf16_ps(block[r][0], a_rk, b0);
      block[r][1] = _mm512_dpbf16_ps(block[r][1], a_rk, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* c_row = c + (r0 + r) * ldc + c0;
    _mm512_storeu_ps(c_row, alpha == 1.0f ? block[r][0] : _mm512_mul_ps(block[r][0], _mm512_set1_ps(alpha)));
    _mm512_storeu_ps(c_row + 16, alpha == 1.0f ? block[r][1] : _mm512_mul_ps(block[r][1], _mm512_set1_ps(alpha)));
  }
}

// c[rows x cols] = alpha * ((accumulate ? c : 0) + a * b) over depth_pairs words of depth, a and b as
// above; rows a multiple of kMicroRows, cols of kMicroCols, like gemm. Only where cpu_isa() is
// kAvx512Bf16. (alpha: the bf16 path's query multiplier, which its query tile leaves out.)
FA_BF16_TARGET void gemm_bf16_pairs(float alpha, bool accumulate, int64_t rows, int64_t cols, int64_t depth_pairs,
                                    const uint32_t* a, int64_t a_row_stride, int64_t a_pair_stride,
                                    const uint32_t* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int kRows = 8;
  static_assert(kMicroCols == 32 && kRows % kMicroRows == 0);
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    for (int64_t c0 = 0; c0 < cols; c0 += kMicroCols) {
      if (rows - r0 >= kRows) {
        bf16_pairs_block<kRows>(alpha, accumulate, r0, c0, depth_pairs, a, a_row_stride, a_pair_stride, b, ldb, c,
                                ldc);
      } else {  // rows is a multiple of kMicroRows
        bf16_pairs_block<kMicroRows>(alpha, accumulate, r0, c0, depth_pairs, a, a_row_stride, a_pair_stride, b, ldb,
                                     c, ldc);
      }
    }
  }
}

}  // namespace
}  // namespace fused_attention

#endif  // FA_X86_MULTIVERSIONING
