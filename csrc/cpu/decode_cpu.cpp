// The C++ CPU kernel of fused_attention::fwd_kvcache: decoding, a few query rows per sequence against
// a long KV cache, with the tile math of the dense forward (tiles.h).
//
// A work item is (sequence b, KV head, query tile, split s). It packs the rows of every query head of
// its KV head (the group of Hq / Hkv heads, each with its rows of the query tile) as the rows of one
// tile, so each key tile is converted and read once for the whole group and each tile product has
// as many rows as the group holds, where one query head alone would give a single row in decoding.
// Split s covers the s-th chunk of the sequence's keys: ceil(seqlens_k[b] / num_splits) rounded up
// to whole key tiles, so chunks start on tile boundaries; the last chunks may be empty. Each part is
// normalised over its chunk (o, and lse in natural log); attention/merge.py merges them.
// Keys are read in place: a dense cache's rows of slab b, a paged cache's rows through the block
// table, a key tile being loaded in runs of rows that share a block (any block size). Only keys below
// seqlens_k[b] are ever loaded, so whatever lies past them (the tests put NaN there) cannot reach a
// sum; key tiles outside every row's window are not visited.
#include "decode_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../checks.h"
#include "tiles.h"

namespace fused_attention {
namespace {

// Where each sequence's keys (or values) lie. Dense: sequence b's key j is row j of slab b of the
// (B, Hkv, Ncache, D) cache, as one block of Ncache rows. Paged: row j % block_size of block
// block_table[b][j / block_size] of the (num_blocks, Hkv, block_size, D) pool.
template <typename T>
struct CacheRows {
  StridedRows<T> slabs;         // (slab, KV head, row)
  const int32_t* block_table;   // contiguous (B, max_blocks), or null (dense)
  int64_t max_blocks, block_size;

  // Calls load(first, src, count) for the runs of keys [key0, key0 + keys) of sequence b and KV head
  // h that lie in one block: count rows from src, for rows first .. first + count - 1 of the tile.
  template <typename Load>
  void for_each_run(int64_t b, int64_t h, int64_t key0, int64_t keys, const Load& load) const {
    for (int64_t j = key0; j < key0 + keys;) {
      const int64_t row = j % block_size;
      const int64_t count = std::min(key0 + keys - j, block_size - row);
      const int64_t slab = block_table == nullptr ? b : block_table[b * max_blocks + j / block_size];
      load(j - key0, slabs.rows(slab, h, row), count);
      j += count;
    }
  }
};

template <typename T>
CacheRows<T> cache_rows(const at::Tensor& cache, const std::optional<at::Tensor>& block_table) {
  return {strided_rows<T>(cache), block_table ? block_table->const_data_ptr<int32_t>() : nullptr,
          block_table ? block_table->size(1) : 1, cache.size(2)};
}

// Tiles of at most this many packed query rows get their scores by dot_scores instead of gemm.
constexpr int64_t kMaxDotRows = 12;

// s[m][n] = the dot product of q's row m and k's row n, for m < rows (a multiple of 4) and n < keys,
// over depth elements. For a tile of few query rows (decoding: the group's heads, one row each), where
// gemm would spend more on transposing the key tile (one scalar store per element) than on the product:
// here the key rows are read as they are loaded, each once for four query rows.
FA_MULTIVERSIONED void dot_scores(const float* q, int64_t ldq, int64_t rows, const float* k, int64_t ldk,
                                  int64_t keys, int64_t depth, float* s, int64_t lds) {
  for (int64_t m = 0; m < rows; m += 4) {
    const float *q0 = q + m * ldq, *q1 = q0 + ldq, *q2 = q1 + ldq, *q3 = q2 + ldq;
    for (int64_t n = 0; n < keys; ++n) {
      const float* k_row = k + n * ldk;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t c = 0; c < depth; ++c) {
        s0 += q0[c] * k_row[c];
        s1 += q1[c] * k_row[c];
        s2 += q2[c] * k_row[c];
        s3 += q3[c] * k_row[c];
      }
      s[m * lds + n] = s0;
      s[(m + 1) * lds + n] = s1;
      s[(m + 2) * lds + n] = s2;
      s[(m + 3) * lds + n] = s3;
    }
  }
}

struct DecodeShape {
  int64_t batch, heads_q, heads_kv, n_q, head_dim, splits;
  int64_t query_rows;  // rows of a query tile, per query head

  int64_t group() const { return heads_q / heads_kv; }
  int64_t query_tiles() const { return ceil_div(n_q, query_rows); }
  int64_t items() const { return batch * heads_kv * query_tiles() * splits; }
  // Keys of each of a sequence's parts: chunks start on key tiles.
  int64_t chunk(int64_t n_k) const { return round_up(ceil_div(n_k, splits), kBlock); }
  // Where query row i of head h of sequence b goes in the (splits, B, Hq, Nq) rows of the parts.
  int64_t part_row(int64_t s, int64_t b, int64_t h, int64_t i) const { return ((s * batch + b) * heads_q + h) * n_q + i; }
};

// Packed rows per work item: the group's query heads, query_rows each, at most about one tile's rows
// (a wider group gets one row per head).
int64_t query_rows_per_head(int64_t group, int64_t n_q) { return std::max<int64_t>(1, std::min(kBlock / group, n_q)); }

// The options that change scores, as the dense forward applies them (alibi_slopes: contiguous (B, Hq)).
struct DecodeScores {
  float q_multiplier, softcap;
  const float* alibi_slopes;
  int64_t window_left, window_right;  // -1: unbounded; causal is right 0
};

template <typename scalar_t>
void decode_pass(const DecodeShape& shape, const DecodeScores& scores_of, const std::vector<int64_t>& seqlens,
                 StridedRows<scalar_t> q, CacheRows<scalar_t> k, CacheRows<scalar_t> v, float* o_parts,
                 float* lse_parts) {
  const int64_t d = shape.head_dim, ld_d = padded_head_dim(d), group = shape.group();
  const int64_t max_rows = round_up(group * shape.query_rows, kMicroRows);
  const bool modifies_scores = scores_of.softcap > 0.0f || scores_of.alibi_slopes != nullptr;
  at::parallel_for(0, shape.items(), 1, [&](int64_t begin, int64_t end) {
    // k_tile: the key tile as rows (dot_scores) or transposed (gemm), whichever the item's rows take.
    std::vector<float> q_tile(max_rows * ld_d), k_tile(kBlock * ld_d), v_tile(kBlock * ld_d);
    std::vector<float> scores(max_rows * kBlock), acc(max_rows * ld_d), row_max(max_rows), row_sum(max_rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item % shape.splits, query_tile = item / shape.splits % shape.query_tiles();
      const int64_t unit = item / shape.splits / shape.query_tiles();
      const int64_t b = unit / shape.heads_kv, h_kv = unit % shape.heads_kv;
      const int64_t n_k = seqlens[b];
      const Sequence seq{b, b, 0, 0, shape.n_q, n_k, scores_of.window_left, scores_of.window_right, nullptr, nullptr};
      const int64_t i0 = query_tile * shape.query_rows;
      const int64_t rows = std::min(shape.query_rows, shape.n_q - i0);  // per head; head g's start at g * rows
      const int64_t padded_rows = round_up(group * rows, kMicroRows);
      const bool by_dot_products = padded_rows <= kMaxDotRows;
      const int64_t chunk = shape.chunk(n_k);
      // A multiple of kBlock, so the key tiles below stay aligned to it; an empty part's is >= n_k.
      const int64_t chunk_begin = s * chunk, chunk_end = std::min(n_k, chunk_begin + chunk);
      const int64_t keys_begin = std::max(chunk_begin, seq.key_begin(i0));
      const int64_t keys_end = std::min(chunk_end, seq.key_end(i0 + rows));

      for (int64_t g = 0; g < group; ++g) {
        load_tile(q_tile.data() + g * rows * ld_d, ld_d, q.rows(b, h_kv * group + g, i0), q.stride_n, rows, d,
                  scores_of.q_multiplier);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(row_max.begin(), row_max.end(), -kInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);

      for (int64_t k0 = keys_begin / kBlock * kBlock; k0 < keys_end; k0 += kBlock) {
        const int64_t cols = std::min(kBlock, chunk_end - k0);
        k.for_each_run(b, h_kv, k0, cols, [&](int64_t first, const scalar_t* src, int64_t count) {
          if (by_dot_products) {
            load_tile(k_tile.data() + first * ld_d, ld_d, src, k.slabs.stride_n, count, d, 1.0f);
          } else {
            load_tile_transposed(k_tile.data() + first, kBlock, src, k.slabs.stride_n, count, d, 1.0f);
          }
        });
        v.for_each_run(b, h_kv, k0, cols, [&](int64_t first, const scalar_t* src, int64_t count) {
          load_tile(v_tile.data() + first * ld_d, ld_d, src, v.slabs.stride_n, count, d, 1.0f);
        });
        if (by_dot_products) {
          dot_scores(q_tile.data(), ld_d, padded_rows, k_tile.data(), ld_d, cols, d, scores.data(), kBlock);
        } else {
          gemm(false, padded_rows, round_up(cols, kMicroCols), d, q_tile.data(), ld_d, 1, k_tile.data(), kBlock,
               scores.data(), kBlock);
        }
        for (int64_t g = 0; g < group; ++g) {
          float* head_scores = scores.data() + g * rows * kBlock;
          if (modifies_scores) {
            const int64_t h = h_kv * group + g;
            const float slope = scores_of.alibi_slopes != nullptr ? scores_of.alibi_slopes[b * shape.heads_q + h] : 0.0f;
            const ScoreModifier modifier{scores_of.softcap * kLog2e, slope * kLog2e, i0 + seq.diagonal() - k0, 1, -1};
            modify_scores(head_scores, kBlock, rows, cols, modifier, nullptr);
          }
          online_softmax_step(head_scores, kBlock, rows, cols, seq.keys_seen(i0, k0), row_max.data() + g * rows,
                              row_sum.data() + g * rows, acc.data() + g * rows * ld_d, ld_d, d);
        }
        gemm(true, padded_rows, ld_d, cols, scores.data(), kBlock, 1, v_tile.data(), ld_d, acc.data(), ld_d);
      }

      for (int64_t g = 0; g < group; ++g) {
        for (int64_t m = 0; m < rows; ++m) {
          const int64_t packed = g * rows + m, row = shape.part_row(s, b, h_kv * group + g, i0 + m);
          const bool sees_a_key = row_sum[packed] > 0.0f;
          store_tile(o_parts + row * d, d, acc.data() + packed * ld_d, ld_d, 1, d,
                     sees_a_key ? 1.0f / row_sum[packed] : 0.0f);
          lse_parts[row] = sees_a_key ? row_max[packed] * kLn2 + std::log(row_sum[packed]) : -kInf;
        }
      }
    }
  });
}

// seqlens_k as lengths, checked against the cache: the shared checks saw shapes only; here, on the
// CPU, the values are at hand, so a bad one is an error rather than an out-of-bounds read. Paged,
// every block a sequence's keys use must be a block of the pool.
std::vector<int64_t> read_seqlens(const at::Tensor& seqlens_k, const at::Tensor& k_cache,
                                  const std::optional<at::Tensor>& block_table) {
  const int32_t* lengths = seqlens_k.const_data_ptr<int32_t>();
  const int64_t block_size = k_cache.size(2);
  const int64_t capacity = block_table ? block_table->size(1) * block_size : k_cache.size(2);
  std::vector<int64_t> seqlens(lengths, lengths + seqlens_k.numel());
  for (size_t b = 0; b < seqlens.size(); ++b) {
    TORCH_CHECK(seqlens[b] >= 0 && seqlens[b] <= capacity, "fused_attention: seqlens_k[", b, "] = ", seqlens[b],
                " is outside the cache's 0..", capacity, " positions");
    if (!block_table) continue;
    const int32_t* blocks = block_table->const_data_ptr<int32_t>() + b * block_table->size(1);
    for (int64_t block = 0; block * block_size < seqlens[b]; ++block) {
      TORCH_CHECK(blocks[block] >= 0 && blocks[block] < k_cache.size(0), "fused_attention: block_table[", b, ", ",
                  block, "] = ", blocks[block], " is outside the cache's ", k_cache.size(0), " blocks");
    }
  }
  return seqlens;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_kvcache_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens_k,
    const std::optional<at::Tensor>& block_table, bool causal, double softmax_scale, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits) {
  check_kvcache_inputs(q, k_cache, v_cache, seqlens_k, block_table, num_splits);
  check_score_options(q, q.size(0), window_left, window_right, softcap, alibi_slopes, 0.0, 0, 0);
  const std::vector<int64_t> seqlens = read_seqlens(seqlens_k, k_cache, block_table);
  const int64_t group = q.size(1) / k_cache.size(1);
  const DecodeShape shape{q.size(0), q.size(1), k_cache.size(1), q.size(2), q.size(3), num_splits,
                          query_rows_per_head(group, q.size(2))};
  const DecodeScores scores{query_multiplier(static_cast<float>(softmax_scale), static_cast<float>(softcap)),
                            static_cast<float>(softcap),
                            alibi_slopes ? alibi_slopes->const_data_ptr<float>() : nullptr, window_left,
                            causal ? 0 : window_right};
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor o_parts = at::empty({num_splits, shape.batch, shape.heads_q, shape.n_q, shape.head_dim}, f32);
  at::Tensor lse_parts = at::empty({num_splits, shape.batch, shape.heads_q, shape.n_q}, f32);
  dispatch_dtype(q.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    decode_pass<scalar_t>(shape, scores, seqlens, strided_rows<scalar_t>(q), cache_rows<scalar_t>(k_cache, block_table),
                          cache_rows<scalar_t>(v_cache, block_table), o_parts.data_ptr<float>(),
                          lse_parts.data_ptr<float>());
  });
  return {o_parts, lse_parts};
}

}  // namespace fused_attention
