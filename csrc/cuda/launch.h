// Host entry points of the CUDA attention kernels: plain params in, kernels queued on `stream`.
#pragma once

#include <cuda_runtime.h>

#include "params.h"

namespace fused_attention {

// Largest head dim the kernels are instantiated for; smaller ones are padded up to 64, 128 or 256.
constexpr int kCudaMaxHeadDim = 256;

// Fills params.o and params.lse. Returns the first CUDA error (cudaSuccess when there is nothing
// to compute). Expects head_dim in [1, kCudaMaxHeadDim], heads and batch <= 65535.
cudaError_t launch_attention_forward(const AttentionParams& params, cudaStream_t stream);

// Fills params.dq, params.dk and params.dv, using params.delta as workspace.
cudaError_t launch_attention_backward(const AttentionParams& params, cudaStream_t stream);

// Fills params.o_parts and params.lse_parts. Expects num_splits <= 65535 (grid y).
cudaError_t launch_attention_decode(const DecodeParams& params, cudaStream_t stream);

}  // namespace fused_attention
