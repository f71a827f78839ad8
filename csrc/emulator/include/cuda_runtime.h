// The emulator's stand-in for CUDA's cuda_runtime.h: what csrc/cuda's kernels and launchers use of
// the CUDA language and runtime, mapped onto host C++ and the emulator (../emulator.h). With this
// directory first on the include path, the unchanged kernel sources compile with a host compiler.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

// Function and variable qualifiers: every function is plain host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 4,
  cudaErrorLaunchOutOfResources = 7,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

using cudaStream_t = struct CUstream_st*;

// Built-in variables: set per emulated thread.
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// Device functions of CUDA's math library and integer min/max.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// The high 32 bits of the 64-bit product (the mul.hi.u32 of Philox, csrc/cuda/philox.cuh).
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}

#include "../emulator.h"

inline void __syncthreads() { emulator::syncthreads(); }

inline float __shfl_xor_sync(unsigned int member_mask, float value, int lane_mask) {
  return emulator::shfl_xor(member_mask, value, lane_mask);
}

inline unsigned int __ballot_sync(unsigned int member_mask, int predicate) {
  return emulator::ballot(member_mask, predicate != 0);
}

inline size_t __cvta_generic_to_shared(const void* pointer) { return emulator::shared_address(pointer); }

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  return emulator::set_function_attribute(reinterpret_cast<const void*>(kernel), attribute, value);
}

inline cudaError_t cudaGetLastError() { return emulator::take_last_error(); }
