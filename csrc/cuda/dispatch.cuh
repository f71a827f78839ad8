// The one place where runtime parameters become template parameters: element type (fp16, bf16),
// padded head dim (64, 128, 256) and whether the call has key padding or packed sequences.
// Causality and grouped-query heads stay runtime values: they only move loop bounds, pick rows
// and decide which blocks are masked, at no measurable cost in registers. Key padding and packed
// sequences put the lengths, row offsets and padding row in registers for the whole kernel
// (30 to 40 more a thread at head dim 64: one block less per SM for the forward and dQ kernels,
// RESOURCES.md), so calls without them run kernels compiled without them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "params.h"

namespace fused_attention {

template <typename T>
struct ElementTag {
  using type = T;
};

// Calls launch(ElementTag<T>{}, std::integral_constant<int, kHeadDim>{}) for the params' element
// type and the smallest instantiated head dim that holds params.head_dim.
template <typename Launch>
cudaError_t dispatch_element_type_and_head_dim(const AttentionParams& params, Launch&& launch) {
  auto with_head_dim = [&](auto element) {
    if (params.head_dim <= 64) return launch(element, std::integral_constant<int, 64>{});
    if (params.head_dim <= 128) return launch(element, std::integral_constant<int, 128>{});
    return launch(element, std::integral_constant<int, 256>{});
  };
  if (params.element_type == ElementType::kFloat16) return with_head_dim(ElementTag<__half>{});
  return with_head_dim(ElementTag<__nv_bfloat16>{});
}

// Calls launch(std::bool_constant<kPaddedOrPacked>{}): true when the params carry a key padding
// mask or cu_seqlens.
template <typename Launch>
cudaError_t dispatch_padded_or_packed(const AttentionParams& params, Launch&& launch) {
  if (params.key_padding_mask != nullptr || params.cu_seqlens_q != nullptr) return launch(std::true_type{});
  return launch(std::false_type{});
}

template <typename Kernel>
cudaError_t allow_dynamic_shared_memory(Kernel kernel, size_t bytes) {
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace fused_attention
