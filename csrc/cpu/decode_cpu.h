// The C++ CPU implementation of fused_attention::fwd_kvcache (schema in csrc/ops.cpp, meaning of the
// arguments in checks.h, check_kvcache_inputs): a few query rows per sequence against its KV cache,
// dense or paged, the keys split num_splits ways.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fused_attention {

// o_parts float32 contiguous (num_splits, B, Hq, Nq, D) and lse_parts float32 contiguous
// (num_splits, B, Hq, Nq): part s normalised over the s-th chunk of each sequence's keys.
std::tuple<at::Tensor, at::Tensor> attention_forward_kvcache_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens_k,
    const std::optional<at::Tensor>& block_table, bool causal, double softmax_scale, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits);

}  // namespace fused_attention
