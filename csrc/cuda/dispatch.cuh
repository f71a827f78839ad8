// The one place where runtime parameters become template parameters: element type (fp16, bf16),
// padded head dim (64, 128, 256), whether the call has key padding or packed sequences, and
// whether it has score modifiers (a sliding window other than causal, softcap, ALiBi, dropout).
// Causality and grouped-query heads stay runtime values: they only move loop bounds, pick rows
// and decide which blocks are masked, at no measurable cost in registers. Key padding and packed
// sequences put the lengths, row offsets and padding row in registers for the whole kernel
// (30 to 40 more a thread at head dim 64: one block less per SM for the forward and dQ kernels,
// RESOURCES.md), so calls without them run kernels compiled without them. The score modifiers
// add per-score work and state in the same way; inside their kernels each modifier is a runtime
// branch, uniform over the launch. Three variants per kernel: plain, padded or packed, and
// modified (which handles padding and packing too).
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

// Calls launch(ElementTag<T>{}, std::integral_constant<int, kHeadDim>{}) for the element type and
// the smallest instantiated head dim that holds head_dim.
template <typename Launch>
cudaError_t dispatch_element_type_and_head_dim(ElementType element_type, int head_dim, Launch&& launch) {
  auto with_head_dim = [&](auto element) {
    if (head_dim <= 64) return launch(element, std::integral_constant<int, 64>{});
    if (head_dim <= 128) return launch(element, std::integral_constant<int, 128>{});
    return launch(element, std::integral_constant<int, 256>{});
  };
  if (element_type == ElementType::kFloat16) return with_head_dim(ElementTag<__half>{});
  return with_head_dim(ElementTag<__nv_bfloat16>{});
}

template <typename Launch>
cudaError_t dispatch_element_type_and_head_dim(const AttentionParams& params, Launch&& launch) {
  return dispatch_element_type_and_head_dim(params.element_type, params.head_dim, launch);
}

// The params as the kernels read them. Causal is the right bound 0 (SPEC11 passes both; a call
// giving causal with another right bound gets their intersection, which is 0). A bound that no
// query can reach becomes -1: query i (>= 0) sees every key on its right when window_right >=
// seqlen_q - 1 (i + seqlen_k - seqlen_q + right >= seqlen_k - 1) and every key on its left when
// window_left >= seqlen_k - 1 (i <= seqlen_q - 1). So a window as long as the sequences runs the
// plain kernels, and the kernels' window arithmetic stays within a few sequence lengths of 0.
// seqlen_q and seqlen_k bound every sequence's lengths when varlen, so this holds there too.
inline AttentionParams with_canonical_window(AttentionParams params) {
  if (params.causal) params.window_right = 0;
  if (params.window_right >= params.seqlen_q - 1) params.window_right = -1;
  if (params.window_left >= params.seqlen_k - 1) params.window_left = -1;
  params.causal = params.window_right == 0;
  return params;
}

// Whether the (canonical) params need the kernels compiled with score modifiers.
inline bool has_score_modifiers(const AttentionParams& params) {
  return params.window_left >= 0 || params.window_right > 0 || params.softcap > 0.f ||
         params.alibi_slopes != nullptr || params.dropout_keep_threshold != 0;
}

// Calls launch(std::bool_constant<kPaddedOrPacked>{}, std::bool_constant<kScoreModifiers>{}):
// modified when the params have score modifiers, else padded or packed when they carry a key
// padding mask or cu_seqlens, else plain. The modified variant is compiled with kPaddedOrPacked.
template <typename Launch>
cudaError_t dispatch_kernel_variant(const AttentionParams& params, Launch&& launch) {
  if (has_score_modifiers(params)) return launch(std::true_type{}, std::true_type{});
  if (params.key_padding_mask != nullptr || params.cu_seqlens_q != nullptr) {
    return launch(std::true_type{}, std::false_type{});
  }
  return launch(std::false_type{}, std::false_type{});
}

template <typename Kernel>
cudaError_t allow_dynamic_shared_memory(Kernel kernel, size_t bytes) {
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace fused_attention
