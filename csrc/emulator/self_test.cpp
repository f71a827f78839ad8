// Small kernels with known faults, so the tests can check that the emulator reports what the
// hardware (or compute-sanitizer) would: a barrier some thread skips, a shared-memory access out
// of bounds, lanes that diverge at a warp collective, launches outside the hardware's limits,
// poisoned shared memory, and cp.async data that only lands at its wait.
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda/mma.cuh"
#include "../cuda/runtime.cuh"

namespace {

using namespace fused_attention;

__global__ void skips_a_barrier(uint16_t*) {
  if (threadIdx.x != 5) __syncthreads();
}

__global__ void reads_past_shared_memory(uint16_t*) {
  uint32_t r[4];
  // Lane l names row l of a 32-row tile of 16-byte rows: 512 bytes, one more row than allocated.
  ldmatrix_x4(r, shared_address(dynamic_shared_memory<uint16_t>() + 8 * (threadIdx.x % 32 + 1)));
}

__global__ void diverges_at_a_collective(uint16_t*) {
  if (threadIdx.x % 32 < 16) {
    __shfl_xor_sync(0xffffffffu, 1.f, 1);
  } else {
    uint32_t r[4];
    ldmatrix_x4(r, shared_address(dynamic_shared_memory<uint16_t>()));
  }
}

__global__ void does_nothing(uint16_t*) {}

// out[0] = shared memory never written; out[1] = a cp.async destination before its wait;
// out[2] = the same after the wait; source: out[8..15].
__global__ void reads_shared_memory_early(uint16_t* out) {
  uint16_t* const smem = dynamic_shared_memory<uint16_t>();
  if (threadIdx.x == 0) {
    out[0] = smem[64];
    cp_async_16(shared_address(smem), out + 8, 16);
    cp_async_commit();
    out[1] = smem[0];
    cp_async_wait<0>();
    out[2] = smem[0];
  }
}

}  // namespace

extern "C" int fae_self_test(int which, uint16_t* out) {
  emulator::clear_last_error();
  switch (which) {
    case 0:
      return launch_kernel(skips_a_barrier, 1, 64, 0, nullptr, out);
    case 1:
      return launch_kernel(reads_past_shared_memory, 1, 32, 512, nullptr, out);
    case 2:
      return launch_kernel(diverges_at_a_collective, 1, 32, 512, nullptr, out);
    case 3:  // above 48 KiB without cudaFuncSetAttribute
      return launch_kernel(does_nothing, 1, 32, 64 * 1024, nullptr, out);
    case 4:
      return launch_kernel(does_nothing, 1, 2048, 0, nullptr, out);
    case 5:
      return launch_kernel(does_nothing, dim3(1, 70000), 32, 0, nullptr, out);
    case 6:
      return launch_kernel(reads_shared_memory_early, 1, 32, 256, nullptr, out);
    default:
      return -1;
  }
}
