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

struct AttentionParams {
  StridedTensor q, k, v;  // read
  StridedTensor o;        // written by the forward, read by the backward
  // Natural-log logsumexp of the scaled scores, float32, contiguous (batch, heads, seqlen_q).
  // -inf marks a query row with no visible key. Written by the forward, read by the backward.
  float* lse;

  // Backward only.
  StridedTensor dout;            // read
  StridedTensor dq, dk, dv;      // written
  float* delta;                  // workspace, float32 contiguous (batch, heads, seqlen_q)

  int batch;
  int heads;
  int seqlen_q;
  int seqlen_k;
  int head_dim;  // real head dim; kernels pad it up to 64, 128 or 256
  float softmax_scale;
  // Bottom-right aligned: query i sees key j iff j <= i + seqlen_k - seqlen_q.
  bool causal;
  ElementType element_type;
};

}  // namespace fused_attention
