// The emulator's stand-in for CUDA's cuda_bf16.h: the bfloat16 type and the conversions the kernels
// use. bfloat16 is the top half of a float; narrowing rounds to nearest even and keeps NaN a NaN.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

struct __nv_bfloat162 {
  __nv_bfloat16 x, y;  // x in the low 16 bits, as on the GPU
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t word = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t word;
  std::memcpy(&word, &f, sizeof word);
  if ((word & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((word >> 16) | 0x40u)};  // quiet NaN
  const uint32_t lsb = (word >> 16) & 1u;
  return {static_cast<uint16_t>((word + 0x7fffu + lsb) >> 16)};
}

inline __nv_bfloat162 __floats2bfloat162_rn(float low, float high) {
  return {__float2bfloat16_rn(low), __float2bfloat16_rn(high)};
}

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return {bits}; }
