// The C++ CPU implementation of fused_attention::fwd and fused_attention::bwd (schemas in csrc/ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fused_attention {

// o (B, H, Nq, D) in q's dtype and lse float32 (B, H, Nq), both contiguous.
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, bool causal, double softmax_scale);

// dq, dk, dv: contiguous, shaped and typed like q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const at::Tensor& o, const at::Tensor& lse,
                                                                      bool causal, double softmax_scale);

}  // namespace fused_attention
