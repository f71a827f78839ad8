// The emulator's C entry points, loaded by tests/cuda_emulator.py with ctypes. They run the
// unchanged launchers of csrc/cuda (launch_attention_forward / _backward) on host memory, and the
// kernels' Philox generator on its own.
#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "../cuda/launch.h"
#include "../cuda/params.h"
#include "../cuda/philox.cuh"
#include "execution.h"

using fused_attention::AttentionParams;
using fused_attention::DecodeParams;

namespace {
thread_local std::string t_message;  // what fae_last_error returns
}

extern "C" {

// sizeof and field offsets of AttentionParams, so the caller can check its mirror of the struct.
int fae_params_layout(long long* offsets, int count) {
  const long long all[] = {
      static_cast<long long>(sizeof(AttentionParams)), offsetof(AttentionParams, q),
      offsetof(AttentionParams, o),       offsetof(AttentionParams, lse),
      offsetof(AttentionParams, lse_head_stride), offsetof(AttentionParams, dout),
      offsetof(AttentionParams, delta),   offsetof(AttentionParams, key_padding_mask),
      offsetof(AttentionParams, cu_seqlens_q), offsetof(AttentionParams, batch),
      offsetof(AttentionParams, group), offsetof(AttentionParams, softmax_scale),
      offsetof(AttentionParams, causal),  offsetof(AttentionParams, element_type),
      offsetof(AttentionParams, window_left), offsetof(AttentionParams, softcap),
      offsetof(AttentionParams, alibi_slopes), offsetof(AttentionParams, dropout_keep_threshold),
      offsetof(AttentionParams, dropout_scale), offsetof(AttentionParams, dropout_seed),
      offsetof(AttentionParams, dropout_offset),
  };
  const int n = static_cast<int>(sizeof all / sizeof all[0]);
  for (int i = 0; i < n && i < count; ++i) offsets[i] = all[i];
  return n;
}

// sizeof and field offsets of DecodeParams, as fae_params_layout gives AttentionParams'.
int fae_decode_params_layout(long long* offsets, int count) {
  const long long all[] = {
      static_cast<long long>(sizeof(DecodeParams)), offsetof(DecodeParams, k_cache),
      offsetof(DecodeParams, seqlens_k),  offsetof(DecodeParams, max_blocks),
      offsetof(DecodeParams, o_parts),    offsetof(DecodeParams, batch),
      offsetof(DecodeParams, softmax_scale), offsetof(DecodeParams, causal),
      offsetof(DecodeParams, element_type), offsetof(DecodeParams, window_left),
      offsetof(DecodeParams, softcap),    offsetof(DecodeParams, alibi_slopes),
  };
  const int n = static_cast<int>(sizeof all / sizeof all[0]);
  for (int i = 0; i < n && i < count; ++i) offsets[i] = all[i];
  return n;
}

// eager_copies: cp.async lands when issued; delay_seed (0: off) and delay_max_us: random per-warp
// delays; max_shared_bytes: the emulated device's opt-in shared memory per block (sm_80: 166912,
// sm_86/sm_89: 101376, sm_90: 232448); hang_seconds: how long without progress is a hang.
void fae_configure(int eager_copies, unsigned long long delay_seed, int delay_max_us, long long max_shared_bytes,
                   double hang_seconds) {
  emulator::Settings& s = emulator::settings();
  s.eager_copies = eager_copies != 0;
  s.delay_seed = delay_seed;
  s.delay_max_us = delay_max_us;
  s.max_shared_bytes = static_cast<size_t>(max_shared_bytes);
  s.hang_seconds = hang_seconds;
}

// Both return the cudaError_t of the launches (0 on success); fae_last_error says why.
int fae_forward(const AttentionParams* params) {
  emulator::clear_last_error();
  return fused_attention::launch_attention_forward(*params, nullptr);
}

int fae_backward(const AttentionParams* params) {
  emulator::clear_last_error();
  return fused_attention::launch_attention_backward(*params, nullptr);
}

int fae_decode(const DecodeParams* params) {
  emulator::clear_last_error();
  return fused_attention::launch_attention_decode(*params, nullptr);
}

const char* fae_last_error() {
  t_message = emulator::last_error_message();
  return t_message.c_str();
}

// launches, blocks, syncthreads, mma, ldmatrix, cp_async since the last reset.
void fae_counters(unsigned long long* out) {
  const emulator::Counters c = emulator::counters();
  const unsigned long long values[] = {c.launches, c.blocks, c.syncthreads, c.mma, c.ldmatrix, c.cp_async};
  for (int i = 0; i < 6; ++i) out[i] = values[i];
}

void fae_reset_counters() { emulator::reset_counters(); }

// The four words of csrc/cuda/philox.cuh's Philox4x32-10 for counter[4] and key[2].
void fae_philox(const unsigned int* counter, const unsigned int* key, unsigned int* words) {
  const fused_attention::PhiloxWords out =
      fused_attention::philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
  for (int i = 0; i < 4; ++i) words[i] = out.word[i];
}

void fae_mma_fragment(char operand, int lane, int index, int* row, int* col) {
  emulator::mma_fragment(operand, lane, index, *row, *col);
}

void fae_ldmatrix_fragment(int transposed, int lane, int element, int* row, int* col) {
  emulator::ldmatrix_fragment(transposed != 0, lane, element, *row, *col);
}

}  // extern "C"
