// The emulator's stand-in for CUDA's cuda_fp16.h: the half type and the conversions the kernels use,
// rounding to nearest even as the hardware does (through the compiler's IEEE binary16, _Float16).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

struct __half2 {
  __half x, y;  // x in the low 16 bits, as on the GPU
};

inline float __half2float(__half h) {
  _Float16 value;
  std::memcpy(&value, &h.bits, sizeof value);
  return static_cast<float>(value);
}

inline __half __float2half_rn(float f) {
  const _Float16 value = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &value, sizeof value);
  return h;
}

inline __half2 __floats2half2_rn(float low, float high) { return {__float2half_rn(low), __float2half_rn(high)}; }

inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
