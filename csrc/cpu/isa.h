// Which x86-64 instructions the CPU kernels' tile products use (tiles.h: gemm; bf16_pairs.h: gemm_bf16_pairs).
//
// Chosen once, at the first call, from what the CPU has, capped by the environment variable
// FUSED_ATTENTION_CPU_ISA (baseline, avx2, avx512 or avx512_bf16), so that every path can be tested on
// the best machine; torch.ops.fused_attention.cpu_isa() reads and sets it, between calls (a call reads
// it more than once). The softmax loops of tiles.h follow the CPU alone (GCC target_clones).
#pragma once

#include <cstdint>
#include <string>

// Where GCC compiles functions for several x86-64 levels (target attributes, target_clones, and
// __builtin_cpu_supports("x86-64-v4"): GCC 12); elsewhere every kernel is the baseline one.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FA_X86_MULTIVERSIONING
#endif

namespace fused_attention {

// In order: each level has the instructions of the ones before it.
enum class CpuIsa : int8_t {
  kBaseline,    // x86-64 SSE2, or any other architecture
  kAvx2,        // x86-64-v3: AVX2 and FMA
  kAvx512,      // x86-64-v4: AVX-512 F, BW, DQ, VL
  kAvx512Bf16,  // and AVX512_BF16: bf16 tiles multiplied by vdpbf16ps
};

// The best level this CPU has that this build can use.
CpuIsa detected_cpu_isa();
// The level in use.
CpuIsa cpu_isa();
// Uses `name`'s level from now on; an unknown name, or a level the CPU lacks, raises (c10::Error).
void set_cpu_isa(const std::string& name);
std::string cpu_isa_name(CpuIsa isa);

}  // namespace fused_attention
