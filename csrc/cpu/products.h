// The tile products of the forward and backward passes (attention_cpu.cpp), two ways: float tiles
// through gemm, for every dtype, and bf16 pairs through gemm_bf16_pairs, for bf16 inputs where the CPU
// has AVX512_BF16 (bf16_pairs.h; bf16_products() below). A pass holds one of these per thread and asks it for
// whole products; the softmax math between them is the pass's, in float, either way.
//
// Scores come out in log2 units (or, with softcap, as the argument of its tanh): the float path folds
// the query multiplier into its float query tile, the bf16 path, whose query tile holds the inputs
// unrounded, multiplies the score tile instead.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bf16_pairs.h"
#include "tiles.h"

namespace fused_attention {
namespace {

// Whether bf16 tiles are multiplied as bf16 pairs (gemm_bf16_pairs) rather than as floats (gemm).
inline bool bf16_products() {
#ifdef FA_X86_MULTIVERSIONING
  return cpu_isa() == CpuIsa::kAvx512Bf16;
#else
  return false;
#endif
}

// s = q k^T and acc += p v, for one query tile against key tiles in turn.
template <typename scalar_t>
class FloatForwardProducts {
 public:
  explicit FloatForwardProducts(int64_t d)
      : d_(d), ld_d_(padded_head_dim(d)), q_(kBlock * ld_d_), k_t_(d * kBlock), v_(kBlock * ld_d_) {}

  void load_queries(const scalar_t* q, int64_t stride, int64_t rows, float multiplier) {
    load_tile(q_.data(), ld_d_, q, stride, rows, d_, multiplier);
  }
  void load_keys(const scalar_t* k, int64_t k_stride, const scalar_t* v, int64_t v_stride, int64_t cols) {
    load_tile_transposed(k_t_.data(), kBlock, k, k_stride, cols, d_, 1.0f);
    load_tile(v_.data(), ld_d_, v, v_stride, cols, d_, 1.0f);
  }
  // s (ld kBlock) = the scores of the first `rows` (a multiple of kMicroRows) queries against `cols` keys.
  void scores(float* s, int64_t rows, int64_t cols) {
    gemm(false, rows, round_up(cols, kMicroCols), d_, q_.data(), ld_d_, 1, k_t_.data(), kBlock, s, kBlock);
  }
  // acc (ld padded_head_dim(d)) += p (ld kBlock) v over `cols` keys.
  void add_values(float* acc, const float* p, int64_t rows, int64_t cols) {
    gemm(true, rows, ld_d_, cols, p, kBlock, 1, v_.data(), ld_d_, acc, ld_d_);
  }

 private:
  int64_t d_, ld_d_;
  std::vector<float> q_, k_t_, v_;
};

#ifdef FA_X86_MULTIVERSIONING
class Bf16ForwardProducts {
 public:
  explicit Bf16ForwardProducts(int64_t d)
      : d_(d),
        ld_d_(padded_head_dim(d)),
        d_pairs_(ceil_div(d, 2)),
        q_(kBlock * d_pairs_),
        k_t_(d_pairs_ * kBlock),
        v_(kBlock / 2 * ld_d_),
        p_(kBlock * kBlock / 2) {}

  void load_queries(const c10::BFloat16* q, int64_t stride, int64_t rows, float multiplier) {
    pack_row_pairs(q_.data(), d_pairs_, 1, q, stride, rows, d_);
    multiplier_ = multiplier;
  }
  void load_keys(const c10::BFloat16* k, int64_t k_stride, const c10::BFloat16* v, int64_t v_stride, int64_t cols) {
    pack_row_pairs(k_t_.data(), 1, kBlock, k, k_stride, cols, d_);
    pack_column_pairs(v_.data(), ld_d_, v, v_stride, cols, d_);
  }
  void scores(float* s, int64_t rows, int64_t cols) {
    gemm_bf16_pairs(multiplier_, false, rows, round_up(cols, kMicroCols), d_pairs_, q_.data(), d_pairs_, 1,
                    k_t_.data(), kBlock, s, kBlock);
  }
  void add_values(float* acc, const float* p, int64_t rows, int64_t cols) {
    pack_row_pairs(p_.data(), kBlock / 2, 1, p, kBlock, rows, cols);
    gemm_bf16_pairs(1.0f, true, rows, ld_d_, ceil_div(cols, 2), p_.data(), kBlock / 2, 1, v_.data(), ld_d_, acc, ld_d_);
  }

 private:
  int64_t d_, ld_d_, d_pairs_;
  float multiplier_ = 1.0f;
  // As pairs: the query tile and P as a (rows of d_pairs_ and kBlock / 2 words), K^T and V as b.
  std::vector<uint32_t> q_, k_t_, v_, p_;
};
#endif

// The backward's five products for one (key tile, query tile) pair, in (key row, query column) layout:
// S^T = k q^T and dP^T = v dO^T, then, from P^T and dS^T, dV += P^T dO, dK += dS^T q and dQ += dS k.
template <typename scalar_t>
class FloatBackwardProducts {
 public:
  explicit FloatBackwardProducts(int64_t d)
      : d_(d),
        ld_d_(padded_head_dim(d)),
        k_(kBlock * ld_d_),
        v_(kBlock * ld_d_),
        q_(kBlock * ld_d_),
        q_t_(d * kBlock),
        dout_(kBlock * ld_d_),
        dout_t_(d * kBlock) {}

  void load_keys(const scalar_t* k, int64_t k_stride, const scalar_t* v, int64_t v_stride, int64_t keys) {
    load_tile(k_.data(), ld_d_, k, k_stride, keys, d_, 1.0f);
    load_tile(v_.data(), ld_d_, v, v_stride, keys, d_, 1.0f);
  }
  void load_queries(const scalar_t* q, int64_t q_stride, const scalar_t* dout, int64_t dout_stride, int64_t queries,
                    float multiplier) {
    load_tile_transposed(q_t_.data(), kBlock, q, q_stride, queries, d_, multiplier);
    load_tile(q_.data(), ld_d_, q, q_stride, queries, d_, 1.0f);
    load_tile_transposed(dout_t_.data(), kBlock, dout, dout_stride, queries, d_, 1.0f);
    load_tile(dout_.data(), ld_d_, dout, dout_stride, queries, d_, 1.0f);
  }
  // s_t and dp_t (ld kBlock): the first `keys` rows (a multiple of kMicroRows) by `queries` columns.
  void scores_and_dp(float* s_t, float* dp_t, int64_t keys, int64_t queries) {
    const int64_t padded_queries = round_up(queries, kMicroCols);
    gemm(false, keys, padded_queries, d_, k_.data(), ld_d_, 1, q_t_.data(), kBlock, s_t, kBlock);
    gemm(false, keys, padded_queries, d_, v_.data(), ld_d_, 1, dout_t_.data(), kBlock, dp_t, kBlock);
  }
  // From P^T (p_t) and dS^T (ds_t) over `keys` key rows (padded: a multiple of kMicroRows) and `queries`
  // queries: dV and dK (ld padded_head_dim(d)) for the key tile, and dQ for the query tile.
  void add_grads(const float* p_t, const float* ds_t, int64_t padded_keys, int64_t keys, int64_t queries, float* dv,
                 float* dk, float* dq) {
    gemm(true, padded_keys, ld_d_, queries, p_t, kBlock, 1, dout_.data(), ld_d_, dv, ld_d_);
    gemm(true, padded_keys, ld_d_, queries, ds_t, kBlock, 1, q_.data(), ld_d_, dk, ld_d_);
    // dS is ds_t read transposed: row m of dS is column m of ds_t.
    gemm(true, round_up(queries, kMicroRows), ld_d_, keys, ds_t, 1, kBlock, k_.data(), ld_d_, dq, ld_d_);
  }

 private:
  int64_t d_, ld_d_;
  std::vector<float> k_, v_, q_, q_t_, dout_, dout_t_;
};

#ifdef FA_X86_MULTIVERSIONING
class Bf16BackwardProducts {
 public:
  explicit Bf16BackwardProducts(int64_t d)
      : d_(d),
        ld_d_(padded_head_dim(d)),
        d_pairs_(ceil_div(d, 2)),
        k_(kBlock * d_pairs_),
        k_down_(kBlock / 2 * ld_d_),
        v_(kBlock * d_pairs_),
        q_t_(d_pairs_ * kBlock),
        q_down_(kBlock / 2 * ld_d_),
        dout_t_(d_pairs_ * kBlock),
        dout_down_(kBlock / 2 * ld_d_),
        p_t_(kBlock * kBlock / 2),
        ds_t_(kBlock * kBlock / 2),
        ds_(kBlock * kBlock / 2) {}

  void load_keys(const c10::BFloat16* k, int64_t k_stride, const c10::BFloat16* v, int64_t v_stride, int64_t keys) {
    pack_row_pairs(k_.data(), d_pairs_, 1, k, k_stride, keys, d_);
    pack_column_pairs(k_down_.data(), ld_d_, k, k_stride, keys, d_);
    pack_row_pairs(v_.data(), d_pairs_, 1, v, v_stride, keys, d_);
  }
  void load_queries(const c10::BFloat16* q, int64_t q_stride, const c10::BFloat16* dout, int64_t dout_stride,
                    int64_t queries, float multiplier) {
    pack_row_pairs(q_t_.data(), 1, kBlock, q, q_stride, queries, d_);
    pack_column_pairs(q_down_.data(), ld_d_, q, q_stride, queries, d_);
    pack_row_pairs(dout_t_.data(), 1, kBlock, dout, dout_stride, queries, d_);
    pack_column_pairs(dout_down_.data(), ld_d_, dout, dout_stride, queries, d_);
    multiplier_ = multiplier;
  }
  void scores_and_dp(float* s_t, float* dp_t, int64_t keys, int64_t queries) {
    const int64_t padded_queries = round_up(queries, kMicroCols);
    gemm_bf16_pairs(multiplier_, false, keys, padded_queries, d_pairs_, k_.data(), d_pairs_, 1, q_t_.data(), kBlock,
                    s_t, kBlock);
    gemm_bf16_pairs(1.0f, false, keys, padded_queries, d_pairs_, v_.data(), d_pairs_, 1, dout_t_.data(), kBlock, dp_t,
                    kBlock);
  }
  void add_grads(const float* p_t, const float* ds_t, int64_t padded_keys, int64_t keys, int64_t queries, float* dv,
                 float* dk, float* dq) {
    const int64_t query_pairs = ceil_div(queries, 2);
    pack_row_pairs(p_t_.data(), kBlock / 2, 1, p_t, kBlock, padded_keys, queries);
    pack_row_pairs(ds_t_.data(), kBlock / 2, 1, ds_t, kBlock, padded_keys, queries);
    pack_column_pairs(ds_.data(), kBlock, ds_t, kBlock, keys, queries);
    gemm_bf16_pairs(1.0f, true, padded_keys, ld_d_, query_pairs, p_t_.data(), kBlock / 2, 1, dout_down_.data(), ld_d_,
                    dv, ld_d_);
    gemm_bf16_pairs(1.0f, true, padded_keys, ld_d_, query_pairs, ds_t_.data(), kBlock / 2, 1, q_down_.data(), ld_d_,
                    dk, ld_d_);
    // dS's words (query m, keys k, k + 1) are the column pairs of dS^T: a_row_stride 1, a_pair_stride kBlock.
    gemm_bf16_pairs(1.0f, true, round_up(queries, kMicroRows), ld_d_, ceil_div(keys, 2), ds_.data(), 1, kBlock,
                    k_down_.data(), ld_d_, dq, ld_d_);
  }

 private:
  int64_t d_, ld_d_, d_pairs_;
  float multiplier_ = 1.0f;
  // As pairs along d: K and V as a, q^T and dO^T as b. As pairs down the tile (along keys or queries):
  // K, q and dO as b. P^T and dS^T as a along queries, dS as a along keys.
  std::vector<uint32_t> k_, k_down_, v_, q_t_, q_down_, dout_t_, dout_down_, p_t_, ds_t_, ds_;
};
#endif

}  // namespace
}  // namespace fused_attention
