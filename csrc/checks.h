// Input checks shared by every C++ binding of fused_attention::fwd / ::bwd (CPU and CUDA).
// The Python layer validates first; these are the second line of defence for direct op calls,
// and each message names the offending argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
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

// q (B, H, Nq, D), k and v (B, H, Nk, D): one device, one dtype among fp16/bf16/fp32, 1 <= D <= 256.
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_defined_rank4("q", q);
  check_defined_rank4("k", k);
  check_defined_rank4("v", v);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "fused_attention: q must be float16, bfloat16 or float32 (got ", dtype, ")");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    check_same_device(name, t, q);
    check_same_dtype(name, t, q);
    TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == q.size(1), "fused_attention: ", name,
                " must have the same (batch, heads) as q (got ", t.sizes().slice(0, 2), " vs ",
                q.sizes().slice(0, 2), ")");
    TORCH_CHECK(t.size(3) == q.size(3), "fused_attention: ", name, " must have the same head_dim as q (got ",
                t.size(3), " vs ", q.size(3), ")");
  }
  TORCH_CHECK(v.size(2) == k.size(2), "fused_attention: v must have as many keys (dim 2) as k (got ", v.size(2),
              " vs ", k.size(2), ")");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "fused_attention: q head_dim must be in 1..", kMaxHeadDim,
              " (got ", q.size(3), ")");
}

// The forward's inputs, plus dout and o shaped like q and lse float32 (B, H, Nq).
inline void check_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse) {
  check_attention_inputs(q, k, v);
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

}  // namespace fused_attention
