// The torch side of the CUDA kernels: checks the tensors, fills AttentionParams (DecodeParams), allocates
// the outputs and queues the kernels on the current stream. Registers the CUDA implementations of
// fused_attention::fwd, ::bwd and ::fwd_kvcache, whose schemas csrc/ops.cpp defines, and two
// queries that need no GPU, which attention/backends.py asks before choosing the cuda backend:
// cuda_targets() and cuda_shared_memory_bytes(head_dim, backward).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "../checks.h"
#include "dispatch.cuh"
#include "launch.h"
#include "params.h"
#include "tiles.h"

namespace fused_attention {
namespace {

constexpr int64_t kMaxGridDim = 65535;  // batch and heads index grid dimensions y and z

// The kernels read each row as one run of head_dim elements.
bool has_contiguous_rows(const at::Tensor& t) { return t.size(3) == 1 || t.stride(3) == 1; }

void check_contiguous_rows(const char* name, const at::Tensor& t) {
  TORCH_CHECK(has_contiguous_rows(t), "cuda backend: ", name, " must have a contiguous last dim, got strides ",
              t.strides());
}

StridedTensor strided(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// Which calls are varlen: both cu_seqlens given (checks.h has checked they come together).
bool is_varlen(const std::optional<at::Tensor>& cu_seqlens_q) { return cu_seqlens_q.has_value(); }

// Batch elements, or sequences when varlen: what the grid and alibi_slopes count.
int64_t batch_size(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens_q) {
  return is_varlen(cu_seqlens_q) ? cu_seqlens_q->numel() - 1 : q.size(0);
}

// What the CUDA kernels need beyond the shared checks of checks.h.
void check_cuda_requirements(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& cu_seqlens_q, int64_t max_seqlen_q,
                             int64_t max_seqlen_k) {
  TORCH_CHECK(q.is_cuda(), "cuda backend: q must be a CUDA tensor, got one on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "cuda backend: q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) <= kCudaMaxHeadDim, "cuda backend: head_dim must be at most ", kCudaMaxHeadDim, ", got ",
              q.size(3));
  const int64_t batch = batch_size(q, cu_seqlens_q);
  TORCH_CHECK(batch <= kMaxGridDim && q.size(1) <= kMaxGridDim,
              "cuda backend: batch (sequences) and heads must be at most ", kMaxGridDim, ", got ", batch,
              " and q of shape ", q.sizes());
  TORCH_CHECK(q.size(2) <= std::numeric_limits<int>::max() && k.size(2) <= std::numeric_limits<int>::max(),
              "cuda backend: sequence lengths must fit in int32, got q ", q.sizes(), " and k ", k.sizes());
  if (is_varlen(cu_seqlens_q)) {
    for (const auto& [name, length] : {std::pair<const char*, int64_t>{"max_seqlen_q", max_seqlen_q},
                                       {"max_seqlen_k", max_seqlen_k}}) {
      TORCH_CHECK(length >= 0 && length <= std::numeric_limits<int>::max(), "cuda backend: ", name,
                  " must be in 0..", std::numeric_limits<int>::max(), ", got ", length);
    }
  }
  check_contiguous_rows("q", q);
  check_contiguous_rows("k", k);
  check_contiguous_rows("v", v);
}

// The score modifiers of SPEC11 as the kernels take them (params.h); check_score_options has
// checked their values, types and shapes.
void set_score_options(AttentionParams& params, int64_t window_left, int64_t window_right, double softcap,
                       const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t dropout_seed,
                       int64_t dropout_offset) {
  // Bounds beyond int32 reach past any sequence: int32's largest is as unbounded as they are.
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  params.window_left = static_cast<int>(std::min(window_left, kIntMax));
  params.window_right = static_cast<int>(std::min(window_right, kIntMax));
  params.softcap = static_cast<float>(softcap);
  params.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  // floor(p * 2^32) in double, below 2^32 for p < 1 (SPEC11); p == 0 gives 0, dropout off.
  params.dropout_keep_threshold = static_cast<uint32_t>(std::floor(dropout_p * 4294967296.0));
  params.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  params.dropout_seed = static_cast<uint64_t>(dropout_seed);
  params.dropout_offset = static_cast<uint32_t>(dropout_offset);
}

// The parts of the params every call shares; outputs and backward-only fields are set by the caller.
AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                            double softmax_scale, const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& cu_seqlens_q,
                            const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k) {
  AttentionParams params{};
  params.q = strided(q);
  params.k = strided(k);
  params.v = strided(v);
  params.lse_head_stride = q.size(2);
  params.heads = static_cast<int>(q.size(1));
  params.group = static_cast<int>(q.size(1) / k.size(1));
  params.head_dim = static_cast<int>(q.size(3));
  params.softmax_scale = static_cast<float>(softmax_scale);
  params.causal = causal;
  params.element_type = q.scalar_type() == at::kHalf ? ElementType::kFloat16 : ElementType::kBFloat16;
  if (is_varlen(cu_seqlens_q)) {
    params.batch = static_cast<int>(cu_seqlens_q->numel() - 1);
    params.seqlen_q = static_cast<int>(max_seqlen_q);
    params.seqlen_k = static_cast<int>(max_seqlen_k);
    params.cu_seqlens_q = cu_seqlens_q->data_ptr<int>();
    params.cu_seqlens_k = cu_seqlens_k->data_ptr<int>();
  } else {
    // max_seqlen_q/k only size varlen grids; dense calls pass 0.
    params.batch = static_cast<int>(q.size(0));
    params.seqlen_q = static_cast<int>(q.size(2));
    params.seqlen_k = static_cast<int>(k.size(2));
    if (key_padding_mask.has_value()) {
      params.key_padding_mask = key_padding_mask->data_ptr<bool>();
      params.key_padding_mask_batch_stride = key_padding_mask->stride(0);
    }
  }
  return params;
}

// An output laid out for `like` (q, k or v): dense, a contiguous tensor of its shape; varlen, the
// (1, H, total, D) view of a contiguous (total, H, D) tensor, flash-attn's packed layout.
at::Tensor empty_rows_like(const at::Tensor& like, bool varlen) {
  if (!varlen) return at::empty(like.sizes(), like.options());
  return at::empty({like.size(2), like.size(1), like.size(3)}, like.options()).transpose(0, 1).unsqueeze(0);
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double softmax_scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    int64_t dropout_seed, int64_t dropout_offset) {
  check_attention_inputs(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k);
  check_score_options(q, batch_size(q, cu_seqlens_q), window_left, window_right, softcap, alibi_slopes, dropout_p,
                      dropout_seed, dropout_offset);
  check_cuda_requirements(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor o = empty_rows_like(q, is_varlen(cu_seqlens_q));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));

  AttentionParams params = make_params(q, k, v, causal, softmax_scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                       max_seqlen_q, max_seqlen_k);
  set_score_options(params, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed,
                    dropout_offset);
  params.o = strided(o);
  params.lse = lse.data_ptr<float>();
  C10_CUDA_CHECK(launch_attention_forward(params, at::cuda::getCurrentCUDAStream()));
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, bool causal, double softmax_scale, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t dropout_seed, int64_t dropout_offset) {
  check_backward_inputs(dout, q, k, v, o, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k);
  check_score_options(q, batch_size(q, cu_seqlens_q), window_left, window_right, softcap, alibi_slopes, dropout_p,
                      dropout_seed, dropout_offset);
  check_cuda_requirements(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard device_guard(q.device());
  // A gradient may arrive with any strides (the expanded gradient of o.sum(), say): copy only then.
  const at::Tensor dout_rows = has_contiguous_rows(dout) ? dout : dout.contiguous();
  const at::Tensor o_rows = has_contiguous_rows(o) ? o : o.contiguous();
  const at::Tensor lse_contiguous = lse.contiguous();

  const bool varlen = is_varlen(cu_seqlens_q);
  at::Tensor dq = empty_rows_like(q, varlen);
  at::Tensor dk = empty_rows_like(k, varlen);
  at::Tensor dv = empty_rows_like(v, varlen);
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));

  AttentionParams params = make_params(q, k, v, causal, softmax_scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                       max_seqlen_q, max_seqlen_k);
  set_score_options(params, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed,
                    dropout_offset);
  params.o = strided(o_rows);
  params.lse = lse_contiguous.data_ptr<float>();
  params.dout = strided(dout_rows);
  params.dq = strided(dq);
  params.dk = strided(dk);
  params.dv = strided(dv);
  params.delta = delta.data_ptr<float>();
  C10_CUDA_CHECK(launch_attention_backward(params, at::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

// fwd_kvcache (contract in checks.h): the parts of the split-KV decode, merged by the Python layer.
std::tuple<at::Tensor, at::Tensor> decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                               const std::optional<at::Tensor>& block_table, bool causal,
                                               double softmax_scale, int64_t window_left, int64_t window_right,
                                               double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                               int64_t num_splits) {
  check_kvcache_inputs(q, k_cache, v_cache, seqlens_k, block_table, num_splits);
  check_score_options(q, q.size(0), window_left, window_right, softcap, alibi_slopes, 0.0, 0, 0);
  TORCH_CHECK(q.is_cuda(), "cuda backend: q must be a CUDA tensor, got one on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "cuda backend: q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) <= kCudaMaxHeadDim, "cuda backend: head_dim must be at most ", kCudaMaxHeadDim, ", got ",
              q.size(3));
  TORCH_CHECK(num_splits <= kMaxGridDim, "cuda backend: num_splits must be at most ", kMaxGridDim, " (grid y), got ",
              num_splits);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  const int64_t row_tiles = (q.size(1) / k_cache.size(1) * q.size(2) + 15) / 16;
  TORCH_CHECK(q.size(0) * k_cache.size(1) * row_tiles <= kIntMax && k_cache.size(2) <= kIntMax &&
                  (block_table ? block_table->size(1) * k_cache.size(2) : 0) <= kIntMax,
              "cuda backend: the decode grid and cache lengths must fit in int32, got q ", q.sizes(), " and k_cache ",
              k_cache.sizes());
  const c10::cuda::CUDAGuard device_guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor o_parts = at::empty({num_splits, q.size(0), q.size(1), q.size(2), q.size(3)}, f32);
  at::Tensor lse_parts = at::empty({num_splits, q.size(0), q.size(1), q.size(2)}, f32);

  DecodeParams params{};
  params.q = strided(q);
  params.k_cache = strided(k_cache);
  params.v_cache = strided(v_cache);
  params.seqlens_k = seqlens_k.data_ptr<int>();
  if (block_table.has_value()) {
    params.block_table = block_table->data_ptr<int>();
    params.max_blocks = static_cast<int>(block_table->size(1));
    params.block_size = static_cast<int>(k_cache.size(2));
  }
  params.o_parts = o_parts.data_ptr<float>();
  params.lse_parts = lse_parts.data_ptr<float>();
  params.batch = static_cast<int>(q.size(0));
  params.heads = static_cast<int>(q.size(1));
  params.group = static_cast<int>(q.size(1) / k_cache.size(1));
  params.seqlen_q = static_cast<int>(q.size(2));
  params.head_dim = static_cast<int>(q.size(3));
  params.num_splits = static_cast<int>(num_splits);
  params.softmax_scale = static_cast<float>(softmax_scale);
  params.causal = causal;
  params.element_type = q.scalar_type() == at::kHalf ? ElementType::kFloat16 : ElementType::kBFloat16;
  params.window_left = static_cast<int>(std::min(window_left, kIntMax));
  params.window_right = static_cast<int>(std::min(window_right, kIntMax));
  params.softcap = static_cast<float>(softcap);
  params.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(launch_attention_decode(params, at::cuda::getCurrentCUDAStream()));
  return {o_parts, lse_parts};
}

// What nvcc compiled the kernels for, e.g. "sm_80,sm_90,compute_90" (compute_XY: PTX): setup.py
// passes the targets it derived from TORCH_CUDA_ARCH_LIST.
#ifndef FUSED_ATTENTION_CUDA_TARGETS
#error "FUSED_ATTENTION_CUDA_TARGETS (the nvcc targets, e.g. sm_80,sm_90) is not defined: build with setup.py"
#endif
#define FUSED_ATTENTION_STRINGIFY(...) #__VA_ARGS__
#define FUSED_ATTENTION_EXPAND_AND_STRINGIFY(...) FUSED_ATTENTION_STRINGIFY(__VA_ARGS__)
std::string cuda_targets() { return FUSED_ATTENTION_EXPAND_AND_STRINGIFY(FUSED_ATTENTION_CUDA_TARGETS); }

// Dynamic shared memory per block of the largest kernel a forward / backward launches at the padded
// head dim kHeadDim, from the kernels' own tile structs.
template <int kHeadDim>
int64_t shared_memory_bytes(bool backward) {
  return static_cast<int64_t>(backward ? std::max(KeyTileTiles<kHeadDim>::kSmemBytes,
                                                  QueryTileTiles<kHeadDim>::kSmemBytes)
                                       : ForwardTiles<kHeadDim>::kSmemBytes);
}

int64_t cuda_shared_memory_bytes(int64_t head_dim, bool backward) {
  TORCH_CHECK(head_dim >= 1 && head_dim <= kCudaMaxHeadDim, "cuda_shared_memory_bytes: head_dim must be in 1..",
              kCudaMaxHeadDim, ", got ", head_dim);
  AttentionParams params{};
  params.head_dim = static_cast<int>(head_dim);
  int64_t bytes = 0;
  dispatch_element_type_and_head_dim(params, [&](auto, auto padded_head_dim) {  // the launches' padding
    bytes = shared_memory_bytes<decltype(padded_head_dim)::value>(backward);
    return cudaSuccess;
  });
  return bytes;
}

}  // namespace
}  // namespace fused_attention

TORCH_LIBRARY_FRAGMENT(fused_attention, m) {
  m.def("cuda_targets() -> str", &fused_attention::cuda_targets);
  m.def("cuda_shared_memory_bytes(int head_dim, bool backward) -> int", &fused_attention::cuda_shared_memory_bytes);
}

TORCH_LIBRARY_IMPL(fused_attention, CUDA, m) {
  m.impl("fwd", &fused_attention::forward_cuda);
  m.impl("bwd", &fused_attention::backward_cuda);
  m.impl("fwd_kvcache", &fused_attention::decode_cuda);
}
