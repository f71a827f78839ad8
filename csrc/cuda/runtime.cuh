// Where the kernels meet the CUDA runtime: their dynamic shared memory and their launch.
//
// These two functions and the instruction wrappers of mma.cuh are the whole seam of the CUDA
// emulator (csrc/emulator): built with FUSED_ATTENTION_EMULATOR, the same kernel sources compile
// as host C++ and run one OS thread per CUDA thread, with the emulator's launch checks.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace fused_attention {

// The block's dynamic shared memory (its size is the launch's `shared_bytes`), 128-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#ifdef FUSED_ATTENTION_EMULATOR
  return reinterpret_cast<T*>(emulator::block_shared_memory());
#else
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  return reinterpret_cast<T*>(shared_bytes);
#endif
}

// Queues kernel<<<grid, block, shared_bytes, stream>>>(args...) and returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                          cudaStream_t stream, Args&&... args) {
#ifdef FUSED_ATTENTION_EMULATOR
  return emulator::launch(kernel, grid, block, shared_bytes, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace fused_attention
