#include "isa.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <utility>

namespace fused_attention {
namespace {

constexpr std::array<std::pair<CpuIsa, const char*>, 4> kNames{{
    {CpuIsa::kBaseline, "baseline"},
    {CpuIsa::kAvx2, "avx2"},
    {CpuIsa::kAvx512, "avx512"},
    {CpuIsa::kAvx512Bf16, "avx512_bf16"},
}};

CpuIsa parse(const std::string& name, const char* what) {
  for (const auto& [isa, isa_name] : kNames) {
    if (name == isa_name) return isa;
  }
  TORCH_CHECK(false, what, ": unknown instruction set '", name, "' (one of baseline, avx2, avx512, avx512_bf16)");
}

CpuIsa checked(CpuIsa isa, const char* what) {
  TORCH_CHECK(isa <= detected_cpu_isa(), what, ": this CPU has no ", cpu_isa_name(isa), " (it has up to ",
              cpu_isa_name(detected_cpu_isa()), ")");
  return isa;
}

CpuIsa initial_cpu_isa() {
  const char* requested = std::getenv("FUSED_ATTENTION_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return detected_cpu_isa();
  return checked(parse(requested, "FUSED_ATTENTION_CPU_ISA"), "FUSED_ATTENTION_CPU_ISA");
}

std::atomic<CpuIsa>& current() {
  static std::atomic<CpuIsa> isa{initial_cpu_isa()};
  return isa;
}

}  // namespace

CpuIsa detected_cpu_isa() {
#ifdef FA_X86_MULTIVERSIONING
  if (__builtin_cpu_supports("x86-64-v4")) {
    return __builtin_cpu_supports("avx512bf16") ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

CpuIsa cpu_isa() { return current().load(std::memory_order_relaxed); }

void set_cpu_isa(const std::string& name) {
  current().store(checked(parse(name, "cpu_isa"), "cpu_isa"), std::memory_order_relaxed);
}

std::string cpu_isa_name(CpuIsa isa) {
  for (const auto& [level, name] : kNames) {
    if (level == isa) return name;
  }
  return "unknown";
}

}  // namespace fused_attention
