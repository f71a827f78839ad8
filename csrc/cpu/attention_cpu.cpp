// The C++ CPU attention kernels: FlashAttention-2's tiled online softmax in plain C++.
//
// A call is a list of sequences: the batch elements of dense 4-D tensors, or the packed sequences
// that cu_seqlens cut out of batch 0 (varlen). Each (sequence, head, tile) is one work item of
// at::parallel_for. A work item converts the tiles it needs into scratch buffers (inputs may be
// fp16/bf16 and strided) and multiplies them there (products.h: as floats, or bf16 inputs as bf16
// pairs where the CPU has AVX512_BF16, summed in float); the softmax math is float. It writes only
// its own output rows: no atomics. o, lse, dK and dV do not depend on the number of threads; dQ, summed from per-thread
// buffers, is the same from run to run at a given one.
// - forward, per query tile: running max, running sum and a float accumulator over the key tiles;
// - backward: delta = rowsum(dO * O) first, then one pass per key tile recomputing P from q, k and
//   the forward's lse, accumulating dK and dV, and dQ in per-thread buffers summed in a fixed order.
// Scores are kept in log2 units (softmax_scale * log2(e) is folded into q) so exp is one exp2.
// Causal masks are bottom-right aligned per sequence: query i sees keys j <= i + Nk - Nq. A sliding
// window (left, right) generalizes it: query i sees keys i + Nk - Nq - left <= j <= i + Nk - Nq + right
// (causal is right = 0), and only the key tiles (forward) or query tiles (backward) that a tile's
// window reaches are visited, so a fixed window costs O(N * window).
// Softcap and ALiBi rewrite a tile's scores before the masks; dropout multiplies the probabilities by a
// keep-mask that Philox4x32-10 regenerates from (seed, offset, sequence, head, query, key) in both
// passes, never stored. Without these options the passes run the loops they ran before them.
// Grouped-query heads: query head h reads KV head h / (Hq / Hkv) in place; the backward's work item
// for a KV head's key tile loops over the group's query heads, so dK and dV sum over the group in a
// fixed order. Key padding hides keys of a batch element; key tiles that are all padding are skipped.
// The tile math these passes share with the KV-cache decode (decode_cpu.cpp) is in tiles.h.
#include "attention_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "products.h"
#include "tiles.h"

namespace fused_attention {
namespace {

// The backward's P and dS = P * (dP - delta) for a tile in (key row, query column) layout: P over the
// scores s, dS over dp, 0 where the key is hidden. Column m has log2-sum-exp lse2[m] and delta[m].
// With dropout, keep (same layout) holds 1 / (1 - p) or 0 per element: s gets the dropped P that dV
// needs, and dP is the dropped one. With softcap, tanh_tile (same layout) holds the t of modify_scores:
// dS becomes the gradient of the uncapped score, dS * (1 - t^2). Both are null when the option is off.
FA_MULTIVERSIONED void softmax_grad_key_rows(float* s, float* dp, int64_t ld, int64_t rows, int64_t cols,
                                             VisibleColumns visible, const float* lse2, const float* delta,
                                             const float* keep, const float* tanh_tile) {
  for (int64_t n = 0; n < rows; ++n) {
    float* s_row = s + n * ld;
    float* dp_row = dp + n * ld;
    const auto [begin, end] = visible.of_row(n, cols);
    for (int64_t m = begin; m < end; ++m) s_row[m] = clamp_exponent(s_row[m] - lse2[m]);
    if (keep == nullptr) {
      for (int64_t m = begin; m < end; ++m) {
        const float p = exp2_poly(s_row[m]);
        s_row[m] = p;
        dp_row[m] = p * (dp_row[m] - delta[m]);
      }
    } else {
      const float* keep_row = keep + n * ld;
      for (int64_t m = begin; m < end; ++m) {
        const float p = exp2_poly(s_row[m]);
        s_row[m] = p * keep_row[m];
        dp_row[m] = p * (dp_row[m] * keep_row[m] - delta[m]);
      }
    }
    if (tanh_tile != nullptr) {
      const float* tanh_row = tanh_tile + n * ld;
      for (int64_t m = begin; m < end; ++m) dp_row[m] *= 1.0f - tanh_row[m] * tanh_row[m];
    }
    for (auto [first, last] : {std::pair{int64_t{0}, begin}, std::pair{end, cols}}) {
      std::fill(s_row + first, s_row + last, 0.0f);
      std::fill(dp_row + first, dp_row + last, 0.0f);
    }
  }
}

// The dropout keep-mask every backend draws (attention.dropout_mask gives the same bits): Philox4x32-10
// keyed by the seed, counter (j / 4, i, head, offset), word j % 4; the element of query i and key j
// is kept iff the word is >= threshold = floor(p * 2^32).
struct Dropout {
  uint32_t key0, key1, offset, threshold;
  float keep_scale;  // 1 / (1 - p), the value of a kept element of the mask

  Dropout(double p, int64_t seed, int64_t offset_)
      : key0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        key1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        offset(static_cast<uint32_t>(offset_)),
        threshold(static_cast<uint32_t>(std::floor(p * 4294967296.0))),
        keep_scale(static_cast<float>(1.0 / (1.0 - p))) {}
};

// Four uint32 Philox words, one per 64-bit lane (GCC's vector extension): a product of two of them is
// exact, its high half the lane shifted right by 32. GCC does not vectorize the 32 x 32 -> 64-bit
// multiplies of plain loops (GCC 12), which left Philox most of a dropout tile's time.
typedef uint64_t Uint64x4 __attribute__((vector_size(32)));

// The mask of queries query0 .. query0 + queries - 1 and keys key0 .. key0 + keys - 1 (key0 a multiple
// of 4, keys <= kBlock) of one head, head = (sequence * Hq + h) mod 2^32: keep_scale or 0 at
// keep[m * query_stride + n * key_stride] for query m and key n of the tile, so either tile layout.
// Per query, the kBlock / 4 Philox calls of a tile's keys run side by side, four to a vector.
FA_MULTIVERSIONED void dropout_keep_tile(const Dropout& dropout, uint32_t head, int64_t query0, int64_t queries,
                                         int64_t key0, int64_t keys, float* keep, int64_t query_stride,
                                         int64_t key_stride) {
  constexpr int64_t kVectors = kBlock / 16;  // Philox calls per row of a tile: kBlock / 4, 4 keys each
  const uint64_t low_half = 0xffffffffu;
  for (int64_t m = 0; m < queries; ++m) {
    Uint64x4 c[4][kVectors];  // the counters of the row's calls, and at the end their output words
    for (int64_t v = 0; v < kVectors; ++v) {
      const uint64_t group = static_cast<uint32_t>((key0 >> 2) + 4 * v);
      c[0][v] = Uint64x4{group, group + 1, group + 2, group + 3} & low_half;
      c[1][v] = Uint64x4{} + static_cast<uint32_t>(query0 + m);
      c[2][v] = Uint64x4{} + head;
      c[3][v] = Uint64x4{} + dropout.offset;
    }
    uint64_t k0 = dropout.key0, k1 = dropout.key1;
    for (int round = 0; round < 10; ++round) {
      for (int64_t v = 0; v < kVectors; ++v) {
        const Uint64x4 product0 = c[0][v] * 0xD2511F53u;
        const Uint64x4 product1 = c[2][v] * 0xCD9E8D57u;
        const Uint64x4 next0 = (product1 >> 32) ^ c[1][v] ^ k0;
        const Uint64x4 next2 = (product0 >> 32) ^ c[3][v] ^ k1;
        c[1][v] = product1 & low_half;
        c[3][v] = product0 & low_half;
        c[0][v] = next0;
        c[2][v] = next2;
      }
      k0 = (k0 + 0x9E3779B9u) & low_half;
      k1 = (k1 + 0xBB67AE85u) & low_half;
    }
    // Key n takes word n % 4 of call n / 4, lane n / 4 % 4 of vector n / 16.
    for (int64_t n = 0; n < keys; ++n) {
      keep[m * query_stride + n * key_stride] =
          c[n & 3][n >> 4][(n >> 2) & 3] >= dropout.threshold ? dropout.keep_scale : 0.0f;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The tiled passes

// The call's sequences and head counts.
struct Shape {
  int64_t batch;   // q.size(0): B (dense) or 1 (varlen)
  int64_t q_rows;  // q.size(2): Nq (dense) or total_q (varlen)
  int64_t heads_q, heads_kv, head_dim;
  std::vector<Sequence> sequences;

  int64_t group() const { return heads_q / heads_kv; }  // query heads per KV head
  // Index of query row i of a sequence's head h in the contiguous (B, Hq, q_rows) layout of lse and delta.
  int64_t row_index(const Sequence& seq, int64_t h, int64_t i) const {
    return (seq.batch * heads_q + h) * q_rows + seq.q_offset + i;
  }
};

// The options of the call that change scores and probabilities (the window lives in each Sequence).
struct ScoreOptions {
  float softmax_scale;
  float softcap;              // 0: off
  const float* alibi_slopes;  // contiguous (sequences, Hq), or null
  std::optional<Dropout> dropout;

  float q_multiplier() const { return query_multiplier(softmax_scale, softcap); }
  bool modifies_scores() const { return softcap > 0.0f || alibi_slopes != nullptr; }
  // The modifier of a tile of query head h of seq, whose element (r, c) has distance distance0 + r *
  // row_step + c * col_step.
  ScoreModifier modifier(const Sequence& seq, int64_t h, const Shape& shape, int64_t distance0, int64_t row_step,
                         int64_t col_step) const {
    const float slope = alibi_slopes != nullptr ? alibi_slopes[seq.index * shape.heads_q + h] : 0.0f;
    return {softcap * kLog2e, slope * kLog2e, distance0, row_step, col_step};
  }
  // Dropout's head counter: (b * Hq + h) mod 2^32.
  static uint32_t dropout_head(const Sequence& seq, int64_t h, const Shape& shape) {
    return static_cast<uint32_t>(seq.index * shape.heads_q + h);
  }
};

// Work items over units (a sequence and a head) of varying numbers of tiles, numbered unit after
// unit: item -> (unit, tile). Within a unit, tiles are visited 0, last, 1, last - 1, ... so that the
// contiguous item ranges at::parallel_for gives each thread mix cheap and costly causal tiles.
class TiledWork {
 public:
  template <typename TilesOf>
  TiledWork(int64_t units, const TilesOf& tiles_of) : first_item_(units + 1, 0) {
    for (int64_t unit = 0; unit < units; ++unit) first_item_[unit + 1] = first_item_[unit] + tiles_of(unit);
  }

  int64_t items() const { return first_item_.back(); }
  int64_t first_item(int64_t unit) const { return first_item_[unit]; }
  int64_t end_item(int64_t unit) const { return first_item_[unit + 1]; }
  // The unit of an item (units without tiles hold no item).
  int64_t unit_of(int64_t item) const {
    return std::upper_bound(first_item_.begin(), first_item_.end(), item) - first_item_.begin() - 1;
  }
  std::pair<int64_t, int64_t> split(int64_t item) const {
    const int64_t unit = unit_of(item);
    const int64_t tiles = end_item(unit) - first_item(unit), t = item - first_item(unit);
    return {unit, t % 2 == 0 ? t / 2 : tiles - 1 - t / 2};
  }

 private:
  std::vector<int64_t> first_item_;  // per unit, and the item count last
};

template <typename Products, typename scalar_t>
void forward_pass(const Shape& shape, const ScoreOptions& options, StridedRows<scalar_t> q, StridedRows<scalar_t> k,
                  StridedRows<scalar_t> v, OutputRows<scalar_t> o, float* lse) {
  const int64_t d = shape.head_dim;
  const int64_t ld_d = padded_head_dim(d);
  const int64_t heads = shape.heads_q;
  const TiledWork work(static_cast<int64_t>(shape.sequences.size()) * heads,
                       [&](int64_t unit) { return ceil_div(shape.sequences[unit / heads].n_q, kBlock); });
  at::parallel_for(0, work.items(), 1, [&](int64_t begin, int64_t end) {
    Products products(d);
    std::vector<float> scores(kBlock * kBlock), acc(kBlock * ld_d), row_max(kBlock), row_sum(kBlock);
    std::vector<float> keep(options.dropout ? kBlock * kBlock : 0);
    for (int64_t item = begin; item < end; ++item) {
      const auto [unit, tile] = work.split(item);
      const Sequence& seq = shape.sequences[unit / heads];
      const int64_t b = seq.batch, h = unit % heads, h_kv = h / shape.group();
      const int64_t q0 = tile * kBlock;
      const int64_t rows = std::min(kBlock, seq.n_q - q0);
      const int64_t padded_rows = round_up(rows, kMicroRows);
      products.load_queries(q.rows(b, h, seq.q_offset + q0), q.stride_n, rows, options.q_multiplier());
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(row_max.begin(), row_max.end(), -kInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);

      // Key tiles stay aligned to multiples of kBlock (the key padding tiles), from the one holding the
      // first key of the query tile's window.
      for (int64_t k0 = seq.key_begin(q0) / kBlock * kBlock; k0 < seq.key_end(q0 + rows); k0 += kBlock) {
        if (seq.key_tile_hidden(k0)) continue;
        const int64_t cols = std::min(kBlock, seq.n_k - k0);
        const int64_t key_row = seq.k_offset + k0;
        products.load_keys(k.rows(b, h_kv, key_row), k.stride_n, v.rows(b, h_kv, key_row), v.stride_n, cols);
        products.scores(scores.data(), padded_rows, cols);
        if (options.modifies_scores()) {
          const int64_t distance0 = q0 + seq.diagonal() - k0;  // query rows, key columns
          modify_scores(scores.data(), kBlock, rows, cols, options.modifier(seq, h, shape, distance0, 1, -1), nullptr);
        }
        online_softmax_step(scores.data(), kBlock, rows, cols, seq.keys_seen(q0, k0), row_max.data(), row_sum.data(),
                            acc.data(), ld_d, d);
        // Dropout drops probabilities after the running sum took them: lse and the normalization are
        // those of the undropped softmax.
        if (options.dropout) {
          dropout_keep_tile(*options.dropout, ScoreOptions::dropout_head(seq, h, shape), q0, rows, k0, cols,
                            keep.data(), kBlock, 1);
          for (int64_t m = 0; m < rows; ++m) {
            for (int64_t n = 0; n < cols; ++n) scores[m * kBlock + n] *= keep[m * kBlock + n];
          }
        }
        products.add_values(acc.data(), scores.data(), padded_rows, cols);
      }

      const int64_t first_row = shape.row_index(seq, h, q0);
      for (int64_t m = 0; m < rows; ++m) {
        const bool sees_a_key = row_sum[m] > 0.0f;
        store_tile(o.rows(b, h, seq.q_offset + q0 + m), o.stride_n, acc.data() + m * ld_d, ld_d, 1, d,
                   sees_a_key ? 1.0f / row_sum[m] : 0.0f);
        lse[first_row + m] = sees_a_key ? row_max[m] * kLn2 + std::log(row_sum[m]) : -kInf;
      }
    }
  });
}

template <typename scalar_t>
struct BackwardInputs {
  StridedRows<scalar_t> dout, q, k, v, o;
  const float* lse;  // contiguous (B, Hq, q_rows)
};

// delta = rowsum(dO * O) and lse2 = lse * log2(e), both contiguous (B, Hq, q_rows). (The -inf lse
// of a row that sees no key is never used: the passes compute P only where a key is visible.)
template <typename scalar_t>
void row_statistics_pass(const Shape& shape, const BackwardInputs<scalar_t>& in, float* delta, float* lse2) {
  const int64_t n_q = shape.q_rows;
  at::parallel_for(0, shape.batch * shape.heads_q * n_q, kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % n_q, b = row / n_q / shape.heads_q, h = row / n_q % shape.heads_q;
      const scalar_t* dout_row = in.dout.rows(b, h, i);
      const scalar_t* o_row = in.o.rows(b, h, i);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < shape.head_dim; ++c) {
        sum += to_float(dout_row[c]) * to_float(o_row[c]);
      }
      delta[row] = sum;
      lse2[row] = in.lse[row] * kLog2e;
    }
  });
}

// Work items [0, items) cut into `chunks` contiguous runs of equal length (the last may be shorter).
struct Chunks {
  int64_t items, per_chunk;

  Chunks(int64_t items, int64_t chunks) : items(items), per_chunk(ceil_div(items, std::max<int64_t>(chunks, 1))) {}
  int64_t count() const { return per_chunk == 0 ? 0 : ceil_div(items, per_chunk); }
  int64_t begin(int64_t chunk) const { return chunk * per_chunk; }
  int64_t end(int64_t chunk) const { return std::min(items, (chunk + 1) * per_chunk); }
  int64_t of_item(int64_t item) const { return item / per_chunk; }
};

// dK, dV and dQ in one pass over the key tiles (five tile products per (key tile, query tile) pair:
// S^T, dP^T, dV += P^T dO, dK += dS^T Q, dQ += dS K). One key tile of one KV head per work item; dK
// and dV are accumulated over the group's query heads in order, and over the query tiles that see
// the key tile, as in the forward. dQ sums over key tiles, which other work items hold: each chunk
// of work items (one per thread) adds into a float dQ buffer of its own, covering the query heads of
// the units (sequence, KV head) its items belong to, and the buffers are summed afterwards in chunk
// order. The chunks are fixed by the item count and the thread count alone, so dQ is bit-for-bit
// the same from run to run at a given thread count (dK, dV: at any thread count).
template <typename Products, typename scalar_t>
void grad_pass(const Shape& shape, const ScoreOptions& options, const BackwardInputs<scalar_t>& in,
               const float* delta, const float* lse2, OutputRows<scalar_t> dq, OutputRows<scalar_t> dk,
               OutputRows<scalar_t> dv) {
  const float scale = options.softmax_scale;
  const int64_t d = shape.head_dim;
  const int64_t ld_d = padded_head_dim(d);
  const int64_t heads_kv = shape.heads_kv, group = shape.group();
  const int64_t units = static_cast<int64_t>(shape.sequences.size()) * heads_kv;
  auto sequence_of = [&](int64_t unit) -> const Sequence& { return shape.sequences[unit / heads_kv]; };
  const TiledWork work(units, [&](int64_t unit) { return ceil_div(sequence_of(unit).n_k, kBlock); });
  // Rows of one query head in a dQ buffer: whole tiles, since gemm writes up to kMicroRows-padded
  // tile rows. A unit holds `group` query heads; dq_first_row[u] is where unit u starts in a buffer
  // holding every unit (a chunk's buffer holds its units' rows, from its first unit's).
  auto head_rows = [&](const Sequence& seq) { return round_up(seq.n_q, kBlock); };
  std::vector<int64_t> dq_first_row(units + 1, 0);
  for (int64_t unit = 0; unit < units; ++unit) {
    dq_first_row[unit + 1] = dq_first_row[unit] + group * head_rows(sequence_of(unit));
  }
  const Chunks chunks(work.items(), at::get_num_threads());
  std::vector<std::vector<float>> dq_buffers(chunks.count());
  auto first_unit = [&](int64_t chunk) { return work.unit_of(chunks.begin(chunk)); };

  at::parallel_for(0, chunks.count(), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    Products products(d);
    std::vector<float> p_t(kBlock * kBlock), dp_t(kBlock * kBlock);
    std::vector<float> dk_acc(kBlock * ld_d), dv_acc(kBlock * ld_d);
    // The transposed dropout mask and tanh of a tile, for the options that are on.
    std::vector<float> keep_t(options.dropout ? kBlock * kBlock : 0);
    std::vector<float> tanh_t(options.softcap > 0.0f ? kBlock * kBlock : 0);
    // One (key tile, query tile) pair of query head h: adds into dk_acc, dv_acc and the head's dQ rows.
    auto add_query_tile = [&](const Sequence& seq, int64_t h, int64_t k0, int64_t keys, int64_t q0, float* dq_head) {
      const int64_t queries = std::min(kBlock, seq.n_q - q0);
      const int64_t padded_keys = round_up(keys, kMicroRows);
      const int64_t first_row = shape.row_index(seq, h, q0);
      const scalar_t* q_rows = in.q.rows(seq.batch, h, seq.q_offset + q0);
      const scalar_t* dout_rows = in.dout.rows(seq.batch, h, seq.q_offset + q0);
      products.load_queries(q_rows, in.q.stride_n, dout_rows, in.dout.stride_n, queries, options.q_multiplier());
      products.scores_and_dp(p_t.data(), dp_t.data(), padded_keys, queries);
      if (options.modifies_scores()) {
        const int64_t distance0 = q0 + seq.diagonal() - k0;  // key rows, query columns
        modify_scores(p_t.data(), kBlock, keys, queries, options.modifier(seq, h, shape, distance0, -1, 1),
                      tanh_t.empty() ? nullptr : tanh_t.data());
      }
      if (options.dropout) {
        dropout_keep_tile(*options.dropout, ScoreOptions::dropout_head(seq, h, shape), q0, queries, k0, keys,
                          keep_t.data(), 1, kBlock);
      }
      softmax_grad_key_rows(p_t.data(), dp_t.data(), kBlock, keys, queries, seq.queries_seeing(k0, q0),
                            lse2 + first_row, delta + first_row, keep_t.empty() ? nullptr : keep_t.data(),
                            tanh_t.empty() ? nullptr : tanh_t.data());
      products.add_grads(p_t.data(), dp_t.data(), padded_keys, keys, queries, dv_acc.data(), dk_acc.data(),
                         dq_head + q0 * ld_d);
    };

    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t buffer_first_row = dq_first_row[first_unit(chunk)];
      std::vector<float>& dq_buffer = dq_buffers[chunk];
      dq_buffer.assign((dq_first_row[work.unit_of(chunks.end(chunk) - 1) + 1] - buffer_first_row) * ld_d, 0.0f);
      for (int64_t item = chunks.begin(chunk); item < chunks.end(chunk); ++item) {
        const auto [unit, tile] = work.split(item);
        const Sequence& seq = sequence_of(unit);
        const int64_t b = seq.batch, h_kv = unit % heads_kv;
        const int64_t k0 = tile * kBlock;
        const int64_t keys = std::min(kBlock, seq.n_k - k0);
        const int64_t key_row = seq.k_offset + k0;
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
        // A key tile that is all padding is seen by no query: its dK and dV stay 0.
        if (!seq.key_tile_hidden(k0)) {
          products.load_keys(in.k.rows(b, h_kv, key_row), in.k.stride_n, in.v.rows(b, h_kv, key_row), in.v.stride_n,
                             keys);
          for (int64_t g = 0; g < group; ++g) {
            float* dq_head = dq_buffer.data() + (dq_first_row[unit] - buffer_first_row + g * head_rows(seq)) * ld_d;
            const int64_t query_end = seq.query_end(k0 + keys);
            for (int64_t q0 = seq.query_begin(k0) / kBlock * kBlock; q0 < query_end; q0 += kBlock) {
              add_query_tile(seq, h_kv * group + g, k0, keys, q0, dq_head);
            }
          }
        }

        store_tile(dk.rows(b, h_kv, key_row), dk.stride_n, dk_acc.data(), ld_d, keys, d, scale);
        store_tile(dv.rows(b, h_kv, key_row), dv.stride_n, dv_acc.data(), ld_d, keys, d, 1.0f);
      }
    }
  });

  // dQ = the sum of the chunks' buffers that hold the query head, in chunk order; one query tile per
  // item. A unit without key tiles (no keys) holds no item and leaves its dQ zero.
  const int64_t heads_q = shape.heads_q;
  const TiledWork query_work(static_cast<int64_t>(shape.sequences.size()) * heads_q,
                             [&](int64_t unit) { return ceil_div(shape.sequences[unit / heads_q].n_q, kBlock); });
  at::parallel_for(0, query_work.items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(kBlock * ld_d);
    for (int64_t item = begin; item < end; ++item) {
      const auto [query_unit, tile] = query_work.split(item);
      const int64_t sequence = query_unit / heads_q, h = query_unit % heads_q;
      const Sequence& seq = shape.sequences[sequence];
      const int64_t unit = sequence * heads_kv + h / group;
      const int64_t q0 = tile * kBlock;
      const int64_t rows = std::min(kBlock, seq.n_q - q0);
      const int64_t row_in_unit = h % group * head_rows(seq) + q0;
      std::fill(sum.begin(), sum.end(), 0.0f);
      if (work.end_item(unit) > work.first_item(unit)) {
        for (int64_t chunk = chunks.of_item(work.first_item(unit)); chunk <= chunks.of_item(work.end_item(unit) - 1);
             ++chunk) {
          const float* part =
              dq_buffers[chunk].data() + (dq_first_row[unit] - dq_first_row[first_unit(chunk)] + row_in_unit) * ld_d;
          for (int64_t i = 0; i < rows * ld_d; ++i) sum[i] += part[i];
        }
      }
      store_tile(dq.rows(seq.batch, h, seq.q_offset + q0), dq.stride_n, sum.data(), ld_d, rows, d, scale);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Torch glue

// The kernels read each row of head_dim elements in place, whatever the other strides.
at::Tensor with_contiguous_rows(const at::Tensor& t) { return t.size(3) == 1 || t.stride(3) == 1 ? t : t.contiguous(); }

// A key_padding_mask (B, Nk) as the kernels read it: per key a score bias, per key tile its KeyTile.
struct KeyPadding {
  std::vector<float> bias;     // (B, Nk): 0 for a real key, -inf for padding
  std::vector<KeyTile> tiles;  // (B, key tiles)
  int64_t keys, tiles_per_row;
};

KeyPadding read_key_padding(const at::Tensor& mask) {
  const int64_t batch = mask.size(0), keys = mask.size(1), tiles_per_row = ceil_div(keys, kBlock);
  KeyPadding padding{std::vector<float>(batch * keys), std::vector<KeyTile>(batch * tiles_per_row), keys,
                     tiles_per_row};
  const bool* is_real = mask.const_data_ptr<bool>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t tile = 0; tile < tiles_per_row; ++tile) {
      int64_t real = 0;
      const int64_t k0 = tile * kBlock, k_end = std::min(keys, k0 + kBlock);
      for (int64_t j = b * keys + k0; j < b * keys + k_end; ++j) {
        padding.bias[j] = is_real[j] ? 0.0f : -kInf;
        real += is_real[j];
      }
      padding.tiles[b * tiles_per_row + tile] =
          real == k_end - k0 ? KeyTile::kReal : (real == 0 ? KeyTile::kPadding : KeyTile::kMixed);
    }
  }
  return padding;
}

// The per-sequence lengths of cu_seqlens (B + 1,). The shared checks saw its dtype and shape only;
// here, on the CPU, the values are at hand, so a bad one is an error rather than an out-of-bounds read.
std::vector<int64_t> read_cu_seqlens(const char* name, const at::Tensor& cu_seqlens, int64_t total, int64_t max_seqlen,
                                     const char* max_name) {
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  const int64_t entries = cu_seqlens.numel();
  TORCH_CHECK(entries >= 1 && cu[0] == 0, "fused_attention: ", name, " must start at 0");
  TORCH_CHECK(cu[entries - 1] == total, "fused_attention: ", name, " must end at the total number of rows ", total,
              " (got ", cu[entries - 1], ")");
  std::vector<int64_t> offsets(cu, cu + entries);
  for (int64_t b = 0; b + 1 < entries; ++b) {
    TORCH_CHECK(offsets[b + 1] >= offsets[b], "fused_attention: ", name, " must be non-decreasing (entry ", b + 1,
                " is ", offsets[b + 1], " after ", offsets[b], ")");
    TORCH_CHECK(offsets[b + 1] - offsets[b] <= max_seqlen, "fused_attention: ", max_name, " (", max_seqlen,
                ") is shorter than sequence ", b, " of ", name, " (", offsets[b + 1] - offsets[b], " rows)");
  }
  return offsets;
}

// A window bound as Sequence keeps it: -1 where it hides no key of a sequence of n_q queries and n_k
// keys. The left bound hides j < i + n_k - n_q - left, possible only for left < n_k - 1; the right
// bound hides j > i + n_k - n_q + right, possible only for right < n_q - 1.
int64_t effective_bound(int64_t bound, int64_t bound_that_hides_nothing) {
  return bound < 0 || bound >= bound_that_hides_nothing ? -1 : bound;
}

// The call's sequences: q's batch elements, or the sequences cu_seqlens cut out of batch element 0.
// key_padding (dense only) must outlive the shape, whose sequences point into it. causal is the right
// bound 0, whatever window_right says.
Shape make_shape(const at::Tensor& q, const at::Tensor& k, bool causal, int64_t window_left, int64_t window_right,
                 const KeyPadding* key_padding, const std::optional<at::Tensor>& cu_seqlens_q,
                 const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  Shape shape{q.size(0), q.size(2), q.size(1), k.size(1), q.size(3), {}};
  const int64_t right = causal ? 0 : window_right;
  auto add_sequence = [&](int64_t index, int64_t batch, int64_t q_offset, int64_t k_offset, int64_t n_q, int64_t n_k,
                          const float* key_bias, const KeyTile* key_tiles) {
    shape.sequences.push_back({index, batch, q_offset, k_offset, n_q, n_k, effective_bound(window_left, n_k - 1),
                               effective_bound(right, n_q - 1), key_bias, key_tiles});
  };
  if (cu_seqlens_q.has_value()) {
    const auto starts_q = read_cu_seqlens("cu_seqlens_q", *cu_seqlens_q, q.size(2), max_seqlen_q, "max_seqlen_q");
    const auto starts_k = read_cu_seqlens("cu_seqlens_k", *cu_seqlens_k, k.size(2), max_seqlen_k, "max_seqlen_k");
    for (size_t b = 0; b + 1 < starts_q.size(); ++b) {
      add_sequence(static_cast<int64_t>(b), 0, starts_q[b], starts_k[b], starts_q[b + 1] - starts_q[b],
                   starts_k[b + 1] - starts_k[b], nullptr, nullptr);
    }
    return shape;
  }
  for (int64_t b = 0; b < q.size(0); ++b) {
    const float* bias = key_padding ? key_padding->bias.data() + b * key_padding->keys : nullptr;
    const KeyTile* tiles = key_padding ? key_padding->tiles.data() + b * key_padding->tiles_per_row : nullptr;
    add_sequence(b, b, 0, 0, q.size(2), k.size(2), bias, tiles);
  }
  return shape;
}

// The number of sequences: q's batch elements, or those of cu_seqlens_q (whose shape is checked).
int64_t sequence_count(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens_q) {
  return cu_seqlens_q.has_value() ? cu_seqlens_q->numel() - 1 : q.size(0);
}

// The call's ScoreOptions; alibi_slopes must outlive them.
ScoreOptions make_score_options(double softmax_scale, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                double dropout_p, int64_t dropout_seed, int64_t dropout_offset) {
  return {static_cast<float>(softmax_scale), static_cast<float>(softcap),
          alibi_slopes.has_value() ? alibi_slopes->const_data_ptr<float>() : nullptr,
          dropout_p > 0.0 ? std::optional(Dropout(dropout_p, dropout_seed, dropout_offset)) : std::nullopt};
}

// A fresh output for the rows of t (B, H, N, D): contiguous (dense), or the (1, H, N, D) view of a
// contiguous (N, H, D) tensor (varlen), flash-attn's packed layout.
at::Tensor empty_output_like(const at::Tensor& t, bool varlen, at::ScalarType dtype) {
  if (!varlen) return at::empty(t.sizes(), t.options().dtype(dtype));
  return at::empty({t.size(2), t.size(1), t.size(3)}, t.options().dtype(dtype)).transpose(0, 1).unsqueeze(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal, double softmax_scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    int64_t dropout_seed, int64_t dropout_offset) {
  check_attention_inputs(q_in, k_in, v_in, key_padding_mask, cu_seqlens_q, cu_seqlens_k);
  check_score_options(q_in, sequence_count(q_in, cu_seqlens_q), window_left, window_right, softcap, alibi_slopes,
                      dropout_p, dropout_seed, dropout_offset);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const std::optional<KeyPadding> key_padding =
      key_padding_mask.has_value() ? std::optional(read_key_padding(*key_padding_mask)) : std::nullopt;
  const Shape shape = make_shape(q, k, causal, window_left, window_right, key_padding ? &*key_padding : nullptr,
                                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const ScoreOptions options =
      make_score_options(softmax_scale, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset);
  at::Tensor o = empty_output_like(q, cu_seqlens_q.has_value(), q.scalar_type());
  at::Tensor lse = at::empty({shape.batch, shape.heads_q, shape.q_rows}, q.options().dtype(at::kFloat));
#ifdef FA_X86_MULTIVERSIONING
  if (q.scalar_type() == at::kBFloat16 && bf16_products()) {
    using scalar_t = c10::BFloat16;
    forward_pass<Bf16ForwardProducts>(shape, options, strided_rows<scalar_t>(q), strided_rows<scalar_t>(k),
                                      strided_rows<scalar_t>(v), output_rows<scalar_t>(o), lse.data_ptr<float>());
    return {o, lse};
  }
#endif
  dispatch_dtype(q.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    forward_pass<FloatForwardProducts<scalar_t>>(shape, options, strided_rows<scalar_t>(q), strided_rows<scalar_t>(k),
                                                 strided_rows<scalar_t>(v), output_rows<scalar_t>(o),
                                                 lse.data_ptr<float>());
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& o_in, const at::Tensor& lse_in, bool causal, double softmax_scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    int64_t dropout_seed, int64_t dropout_offset) {
  check_backward_inputs(dout_in, q_in, k_in, v_in, o_in, lse_in, key_padding_mask, cu_seqlens_q, cu_seqlens_k);
  check_score_options(q_in, sequence_count(q_in, cu_seqlens_q), window_left, window_right, softcap, alibi_slopes,
                      dropout_p, dropout_seed, dropout_offset);
  const at::Tensor dout = with_contiguous_rows(dout_in), q = with_contiguous_rows(q_in);
  const at::Tensor k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in), o = with_contiguous_rows(o_in);
  const at::Tensor lse = lse_in.contiguous();
  const std::optional<KeyPadding> key_padding =
      key_padding_mask.has_value() ? std::optional(read_key_padding(*key_padding_mask)) : std::nullopt;
  const Shape shape = make_shape(q, k, causal, window_left, window_right, key_padding ? &*key_padding : nullptr,
                                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const ScoreOptions options =
      make_score_options(softmax_scale, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset);
  const bool varlen = cu_seqlens_q.has_value();
  at::Tensor dq = empty_output_like(q, varlen, q.scalar_type());
  at::Tensor dk = empty_output_like(k, varlen, k.scalar_type());
  at::Tensor dv = empty_output_like(v, varlen, v.scalar_type());
  std::vector<float> delta(shape.batch * shape.heads_q * shape.q_rows), lse2(delta.size());
  dispatch_dtype(q.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    const BackwardInputs<scalar_t> in{strided_rows<scalar_t>(dout), strided_rows<scalar_t>(q),
                                      strided_rows<scalar_t>(k),    strided_rows<scalar_t>(v),
                                      strided_rows<scalar_t>(o),    lse.const_data_ptr<float>()};
    row_statistics_pass(shape, in, delta.data(), lse2.data());
#ifdef FA_X86_MULTIVERSIONING
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_products()) {
        grad_pass<Bf16BackwardProducts>(shape, options, in, delta.data(), lse2.data(), output_rows<scalar_t>(dq),
                                        output_rows<scalar_t>(dk), output_rows<scalar_t>(dv));
        return;
      }
    }
#endif
    grad_pass<FloatBackwardProducts<scalar_t>>(shape, options, in, delta.data(), lse2.data(), output_rows<scalar_t>(dq),
                                               output_rows<scalar_t>(dk), output_rows<scalar_t>(dv));
  });
  return {dq, dk, dv};
}

}  // namespace fused_attention
