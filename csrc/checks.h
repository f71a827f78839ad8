// Input checks shared by every C++ binding of fused_attention::fwd / ::bwd (CPU and CUDA).
// The Python layer validates first; these are the second line of defence for direct op calls,
// and each message names the offending argument. They check types, shapes and devices only: the
// values of cu_seqlens live on q's device, where reading them could cost a device-to-host sync.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

namespace fused_attention {

constexpr int64_t kMaxHeadDim = 256;

inline void check_defined_rank4(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "fused_attention: ", name, " must be a defined tensor");
  TORCH_CHECK(t.dim() == 4, "fused_attention: ", name,
              " must have rank 4 (batch, heads, seq_len, head_dim), got shape ", t.sizes());
}

inline void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "fused_attention: ", name, " must be on the same device as q (got ",
              t.device(), " vs ", q.device(), ")");
}

inline void check_same_dtype(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "fused_attention: ", name, " must have the same dtype as q (got ",
              t.scalar_type(), " vs ", q.scalar_type(), ")");
}

// key_padding_mask: bool, contiguous (B, Nk) on q's device.
inline void check_key_padding_mask(const at::Tensor& mask, const at::Tensor& q, const at::Tensor& k) {
  check_same_device("key_padding_mask", mask, q);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "fused_attention: key_padding_mask must be bool (got ",
              mask.scalar_type(), ")");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == q.size(0) && mask.size(1) == k.size(2),
              "fused_attention: key_padding_mask must have shape (batch, seq_len_k) (", q.size(0), ", ", k.size(2),
              ") (got ", mask.sizes(), ")");
  TORCH_CHECK(mask.is_contiguous(), "fused_attention: key_padding_mask must be contiguous");
}

// cu_seqlens_q / cu_seqlens_k: int32, contiguous, 1-D on q's device.
inline void check_cu_seqlens(const char* name, const at::Tensor& cu_seqlens, const at::Tensor& q) {
  check_same_device(name, cu_seqlens, q);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "fused_attention: ", name, " must be int32 (got ",
              cu_seqlens.scalar_type(), ")");
  TORCH_CHECK(cu_seqlens.dim() == 1, "fused_attention: ", name, " must be 1-D (batch + 1,) (got shape ",
              cu_seqlens.sizes(), ")");
  TORCH_CHECK(cu_seqlens.is_contiguous(), "fused_attention: ", name, " must be contiguous");
}

// Dense: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) with Hq a multiple of Hkv, and an optional
// key_padding_mask. Varlen (both cu_seqlens given): the same with B = 1, no key_padding_mask.
// One device, one dtype among fp16/bf16/fp32, 1 <= D <= 256.
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& key_padding_mask,
                                   const std::optional<at::Tensor>& cu_seqlens_q,
                                   const std::optional<at::Tensor>& cu_seqlens_k) {
  check_defined_rank4("q", q);
  check_defined_rank4("k", k);
  check_defined_rank4("v", v);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "fused_attention: q must be float16, bfloat16 or float32 (got ", dtype, ")");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    check_same_device(name, t, q);
    check_same_dtype(name, t, q);
    TORCH_CHECK(t.size(0) == q.size(0), "fused_attention: ", name, " must have the same batch size as q (got ",
                t.size(0), " vs ", q.size(0), ")");
    TORCH_CHECK(t.size(3) == q.size(3), "fused_attention: ", name, " must have the same head_dim as q (got ",
                t.size(3), " vs ", q.size(3), ")");
  }
  TORCH_CHECK(v.size(1) == k.size(1), "fused_attention: v must have as many heads (dim 1) as k (got ", v.size(1),
              " vs ", k.size(1), ")");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
              "fused_attention: q heads must be a multiple of k heads (dim 1; got ", q.size(1), " vs ", k.size(1),
              ")");
  TORCH_CHECK(v.size(2) == k.size(2), "fused_attention: v must have as many keys (dim 2) as k (got ", v.size(2),
              " vs ", k.size(2), ")");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "fused_attention: q head_dim must be in 1..", kMaxHeadDim,
              " (got ", q.size(3), ")");
  if (key_padding_mask.has_value()) check_key_padding_mask(*key_padding_mask, q, k);
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "fused_attention: cu_seqlens_q and cu_seqlens_k must be given together (got only ",
              cu_seqlens_q.has_value() ? "cu_seqlens_q" : "cu_seqlens_k", ")");
  if (cu_seqlens_q.has_value()) {
    check_cu_seqlens("cu_seqlens_q", *cu_seqlens_q, q);
    check_cu_seqlens("cu_seqlens_k", *cu_seqlens_k, q);
    TORCH_CHECK(cu_seqlens_k->numel() == cu_seqlens_q->numel(),
                "fused_attention: cu_seqlens_k must have as many entries as cu_seqlens_q (got ",
                cu_seqlens_k->numel(), " vs ", cu_seqlens_q->numel(), ")");
    TORCH_CHECK(q.size(0) == 1, "fused_attention: q must have batch size 1 with cu_seqlens (packed sequences; got ",
                q.size(0), ")");
    TORCH_CHECK(!key_padding_mask.has_value(),
                "fused_attention: key_padding_mask cannot be combined with cu_seqlens_q / cu_seqlens_k");
  }
}

// The score modifiers (meaning in attention/api.py's flash_attention): window bounds >= -1, softcap
// finite and >= 0, alibi_slopes float32 contiguous (batch, Hq) on q's device with batch the batch
// elements or, varlen, the sequences; 0 <= dropout_p < 1, dropout_seed >= 0, 0 <= dropout_offset < 2^32.
inline void check_score_options(const at::Tensor& q, int64_t batch, int64_t window_left, int64_t window_right,
                                double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                int64_t dropout_seed, int64_t dropout_offset) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fused_attention: window_left and window_right must be >= -1 "
              "(-1: unbounded; got ", window_left, ", ", window_right, ")");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "fused_attention: softcap must be finite and >= 0 (got ",
              softcap, ")");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "fused_attention: dropout_p must be in [0, 1) (got ", dropout_p, ")");
  TORCH_CHECK(dropout_seed >= 0, "fused_attention: dropout_seed must be >= 0 (got ", dropout_seed, ")");
  TORCH_CHECK(dropout_offset >= 0 && dropout_offset < (int64_t{1} << 32),
              "fused_attention: dropout_offset must be in [0, 2^32) (got ", dropout_offset, ")");
  if (!alibi_slopes.has_value()) return;
  const at::Tensor& slopes = *alibi_slopes;
  check_same_device("alibi_slopes", slopes, q);
  TORCH_CHECK(slopes.scalar_type() == at::kFloat, "fused_attention: alibi_slopes must be float32 (got ",
              slopes.scalar_type(), ")");
  TORCH_CHECK(slopes.dim() == 2 && slopes.size(0) == batch && slopes.size(1) == q.size(1),
              "fused_attention: alibi_slopes must have shape (batch, heads) (", batch, ", ", q.size(1), ") (got ",
              slopes.sizes(), ")");
  TORCH_CHECK(slopes.is_contiguous(), "fused_attention: alibi_slopes must be contiguous");
}

// The forward's inputs, plus dout and o shaped like q and lse float32 (B, Hq, Nq).
inline void check_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                                  const std::optional<at::Tensor>& key_padding_mask,
                                  const std::optional<at::Tensor>& cu_seqlens_q,
                                  const std::optional<at::Tensor>& cu_seqlens_k) {
  check_attention_inputs(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"o", o}}) {
    check_defined_rank4(name, t);
    check_same_device(name, t, q);
    check_same_dtype(name, t, q);
    TORCH_CHECK(t.sizes() == q.sizes(), "fused_attention: ", name, " must have the same shape as q (got ", t.sizes(),
                " vs ", q.sizes(), ")");
  }
  TORCH_CHECK(lse.defined(), "fused_attention: lse must be a defined tensor");
  check_same_device("lse", lse, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "fused_attention: lse must be float32 (got ", lse.scalar_type(), ")");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3), "fused_attention: lse must have shape (batch, heads, seq_len_q) ",
              q.sizes().slice(0, 3), " (got ", lse.sizes(), ")");
}

// fwd_kvcache: q (B, Hq, Nq, D) with a contiguous last dim; the cache dense, k_cache and v_cache
// (B, Hkv, Ncache, D), or paged, (num_blocks, Hkv, block_size, D) with block_table int32 contiguous
// (B, max_blocks): key j of sequence b is row j % block_size of block block_table[b][j / block_size].
// Caches have a contiguous last dim and are read in place. seqlens_k int32 contiguous (B,): sequence b
// attends to its first seqlens_k[b] keys (bottom-right: shift = seqlens_k[b] - Nq). num_splits >= 1.
// The values (lengths within the cache, block ids within num_blocks) are the Python layer's to check:
// they live on q's device. The score options are check_score_options' (no dropout).
// Returns o_parts float32 contiguous (num_splits, B, Hq, Nq, D) and lse_parts float32 contiguous
// (num_splits, B, Hq, Nq): part s attends to the s-th of num_splits contiguous chunks of each
// sequence's keys (chunks of ceil(seqlens_k[b] / num_splits) keys, or a kernel's tile multiple of it),
// normalised over them; a part that sees no key has o 0 and lse -inf. Every element is written.
inline void check_kvcache_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seqlens_k, const std::optional<at::Tensor>& block_table,
                                 int64_t num_splits) {
  check_defined_rank4("q", q);
  check_defined_rank4("k_cache", k_cache);
  check_defined_rank4("v_cache", v_cache);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "fused_attention: q must be float16, bfloat16 or float32 (got ", dtype, ")");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k_cache", k_cache},
                                {"v_cache", v_cache}}) {
    check_same_device(name, t, q);
    check_same_dtype(name, t, q);
    TORCH_CHECK(t.size(3) == q.size(3), "fused_attention: ", name, " must have the same head_dim as q (got ",
                t.size(3), " vs ", q.size(3), ")");
    TORCH_CHECK(t.stride(3) == 1, "fused_attention: ", name, " must have a contiguous last dim");
  }
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "fused_attention: v_cache must have the shape of k_cache (got ",
              v_cache.sizes(), " vs ", k_cache.sizes(), ")");
  TORCH_CHECK(k_cache.size(1) >= 1 && q.size(1) % k_cache.size(1) == 0,
              "fused_attention: q heads must be a multiple of k_cache heads (dim 1; got ", q.size(1), " vs ",
              k_cache.size(1), ")");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "fused_attention: q head_dim must be in 1..", kMaxHeadDim,
              " (got ", q.size(3), ")");
  check_same_device("seqlens_k", seqlens_k, q);
  TORCH_CHECK(seqlens_k.scalar_type() == at::kInt && seqlens_k.dim() == 1 && seqlens_k.size(0) == q.size(0) &&
                  seqlens_k.is_contiguous(),
              "fused_attention: seqlens_k must be a contiguous int32 (batch,) tensor (got ", seqlens_k.scalar_type(),
              " ", seqlens_k.sizes(), ")");
  if (block_table.has_value()) {
    check_same_device("block_table", *block_table, q);
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2 &&
                    block_table->size(0) == q.size(0) && block_table->is_contiguous(),
                "fused_attention: block_table must be a contiguous int32 (batch, max_blocks) tensor (got ",
                block_table->scalar_type(), " ", block_table->sizes(), ")");
  } else {
    TORCH_CHECK(k_cache.size(0) == q.size(0), "fused_attention: k_cache must have the batch size of q without a "
                "block_table (got ", k_cache.size(0), " vs ", q.size(0), ")");
  }
  TORCH_CHECK(num_splits >= 1, "fused_attention: num_splits must be >= 1 (got ", num_splits, ")");
}

}  // namespace fused_attention
