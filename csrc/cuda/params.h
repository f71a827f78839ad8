// The one plain struct every CUDA attention kernel receives. It holds no torch type, so the
// kernels compile with nvcc alone; binding.cpp fills it from tensors.
#pragma once

#include <cstdint>

namespace fused_attention {

enum class ElementType { kFloat16, kBFloat16 };

// A (batch, heads, rows, head_dim) tensor whose last dimension is contiguous. Strides are in
// elements; any of them may be zero or arbitrary (views such as qkv.unbind or transposes).
struct StridedTensor {
  void* data;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t row_stride;
};

// Two modes. Dense: q (batch, heads, seqlen_q, D), k and v (batch, kv_heads, seqlen_k, D).
// Varlen (cu_seqlens_q set): every tensor has batch size 1 and holds the sequences one after
// another along its rows; sequence b is query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 and
// key rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1, and `batch` counts sequences.
struct AttentionParams {
  StridedTensor q, k, v;  // read
  StridedTensor o;        // written by the forward, read by the backward
  // Natural-log logsumexp of the scaled scores, float32, contiguous (q's batch, heads, q's rows),
  // lse_head_stride elements per head. -inf marks a query row with no visible key. Written by the
  // forward, read by the backward.
  float* lse;
  int64_t lse_head_stride;  // seqlen_q when dense, the total of query rows when varlen

  // Backward only.
  StridedTensor dout;            // read
  StridedTensor dq, dk, dv;      // written; dk and dv have k's shape
  float* delta;                  // workspace, laid out like lse

  // Dense only, optional: bool (batch, seqlen_k), true where the key is real; a false key is
  // hidden from every query and head of its batch element.
  const bool* key_padding_mask;
  int64_t key_padding_mask_batch_stride;
  // Varlen only: int32 (batch + 1,) row offsets of the sequences in q and in k.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;

  int batch;
  int heads;     // query heads
  // Query heads per key/value head (GQA; 1: none): query head h reads key/value head h / group.
  // Passed rather than derived from the head counts: a second integer division made ptxas spill
  // registers in the dQ kernel.
  int group;
  int seqlen_q;  // varlen: an upper bound on the sequences' query lengths (sizes the grid)
  int seqlen_k;  // varlen: an upper bound on the sequences' key lengths
  int head_dim;  // real head dim; kernels pad it up to 64, 128 or 256
  float softmax_scale;
  // Bottom-right aligned within each sequence: query i sees key j iff j <= i + len_k - len_q.
  bool causal;
  ElementType element_type;

  // Score modifiers (SPEC11). With shift = len_k - len_q of the sequence, query i sees key j iff
  // i + shift - window_left <= j <= i + shift + window_right; -1 leaves that side unbounded, and
  // causal is window_right == 0 (the launchers make the two agree, see dispatch.cuh).
  int window_left;
  int window_right;
  // When > 0: scores become softcap * tanh(score / softcap) (Gemma-2), before ALiBi.
  float softcap;
  // Optional float32 (batch, heads), contiguous: score -= slope[b, h] * |i + shift - j| (BLOOM, MPT).
  const float* alibi_slopes;
  // Dropout of the normalized probabilities. Key j of query i (head h, batch element or sequence b)
  // is kept iff Philox4x32-10 word (philox.cuh) >= dropout_keep_threshold = floor(p * 2^32); kept
  // ones are scaled by dropout_scale = 1 / (1 - p). A threshold of 0 keeps every key (p < 2^-32,
  // whose scale rounds to 1 in fp32): dropout off.
  uint32_t dropout_keep_threshold;
  float dropout_scale;
  uint64_t dropout_seed;
  uint32_t dropout_offset;
};

// Decoding from a KV cache (fused_attention::fwd_kvcache, contract in csrc/checks.h): q against
// each sequence's first seqlens_k[b] cached keys, the keys split num_splits ways.
struct DecodeParams {
  StridedTensor q;  // (batch, heads, seqlen_q, head_dim)
  // Dense: (batch, kv_heads, capacity, head_dim), batch_stride per sequence. Paged: (num_blocks,
  // kv_heads, block_size, head_dim), batch_stride per block; key j of sequence b is row
  // j % block_size of block block_table[b * max_blocks + j / block_size].
  StridedTensor k_cache, v_cache;
  const int* seqlens_k;    // (batch,)
  const int* block_table;  // null: dense
  int max_blocks;
  int block_size;          // paged only
  // float32, contiguous: o_parts (num_splits, batch, heads, seqlen_q, head_dim), lse_parts
  // (num_splits, batch, heads, seqlen_q), natural log; part s covers the s-th chunk of keys.
  float* o_parts;
  float* lse_parts;
  int batch, heads, group, seqlen_q, head_dim, num_splits;
  float softmax_scale;
  bool causal;
  ElementType element_type;
  int window_left, window_right;  // as AttentionParams', positions bottom-right per sequence
  float softcap;
  const float* alibi_slopes;  // (batch, heads) or null
};

}  // namespace fused_attention
