// The one place where runtime parameters become template parameters: element type (fp16, bf16)
// and padded head dim (64, 128, 256). Causality stays a runtime flag: it only moves loop bounds
// and decides which blocks are masked, so a template copy would double compile time for nothing.
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

template <typename Kernel>
cudaError_t allow_dynamic_shared_memory(Kernel kernel, size_t bytes) {
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace fused_attention
