// The C++ CPU implementation of fused_attention::fwd and fused_attention::bwd (schemas in csrc/ops.cpp,
// meaning of the arguments in checks.h: dense with optional GQA and key_padding_mask, or varlen; the
// score options below).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fused_attention {

// The score options (window_left .. dropout_offset) as the Python layer passes them: window
// bounds >= -1 (-1: unbounded; causal also bounds the right at 0), softcap >= 0 (0: off),
// alibi_slopes a contiguous float32 (sequences, Hq) or none, dropout_p in [0, 1) (0: off).

// Dense: o contiguous (B, Hq, Nq, D) in q's dtype and lse float32 contiguous (B, Hq, Nq).
// Varlen: o the (1, Hq, total_q, D) view of a contiguous (total_q, Hq, D) tensor, lse (1, Hq, total_q).
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double softmax_scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    int64_t dropout_seed, int64_t dropout_offset);

// dq, dk, dv typed like q, k, v. Dense: contiguous, shaped like q, k, v. Varlen: dq laid out like o,
// dk and dv the (1, Hkv, total_k, D) views of contiguous (total_k, Hkv, D) tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, bool causal, double softmax_scale, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t dropout_seed, int64_t dropout_offset);

}  // namespace fused_attention
