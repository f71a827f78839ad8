// A CPU emulator of the CUDA execution model, for running csrc/cuda's kernels without a GPU.
//
// A launch runs the grid's blocks one after another; each block runs on one OS thread per CUDA
// thread, with its dynamic shared memory poisoned (every byte 0xFF, a NaN in fp16 and bf16) before
// it starts. __syncthreads is a barrier of the block's threads; warp collectives (shuffles, votes,
// mma.sync, ldmatrix) are barriers of the warp's 32 threads at which the last lane to arrive
// computes every lane's result from every lane's operands, lane by lane as the PTX ISA defines
// the fragments (instructions.cpp). cp.async copies are deferred until the cp.async.wait_group
// that completes their group (or done at once in eager mode), so a missing wait shows up as
// poison. A random per-warp delay mode shifts warps against each other to expose missing
// barriers. Launches are checked as the hardware checks them (threads per block, grid limits,
// dynamic shared memory above 48 KiB only after the opt-in attribute, the device's limit), and a
// fault inside a kernel (a shared-memory access out of bounds, warps that diverge at a
// collective, a hang) ends the launch with an error and a message instead of crashing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace emulator {

struct Settings {
  bool eager_copies = false;      // cp.async copies land when issued instead of at their wait
  uint64_t delay_seed = 0;        // 0: no delays; else the seed of the per-warp random delays
  int delay_max_us = 0;           // longest delay, microseconds
  size_t max_shared_bytes = 166912;  // the device's opt-in limit per block (sm_80: 163 KiB)
  double hang_seconds = 60.0;     // no barrier completing for this long is reported as a hang
};

Settings& settings();

// Counters of what the launches since the last reset executed, for tests to assert coverage.
struct Counters {
  uint64_t launches, blocks, syncthreads, mma, ldmatrix, cp_async;
};
Counters counters();
void reset_counters();

// The message of the last failed launch or attribute call ("" if none since clear_last_error).
std::string last_error_message();
void clear_last_error();

// --- used through cuda_runtime.h and the kernels' seam (runtime.cuh, mma.cuh) ---
unsigned char* block_shared_memory();
size_t shared_address(const void* pointer);
void syncthreads();
float shfl_xor(unsigned int member_mask, float value, int lane_mask);
// __ballot_sync: bit l set where lane l's predicate holds.
unsigned int ballot(unsigned int member_mask, bool predicate);
cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attribute, int value);
cudaError_t take_last_error();

// Runs `body` as the kernel `kernel` over the grid, after the launch checks.
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                     const std::function<void()>& body);

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t,
                   Args&&... args) {
  // Kernel arguments are copied at launch, as the hardware does.
  const std::tuple<std::decay_t<Params>...> arguments(std::forward<Args>(args)...);
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes,
                  [&] { std::apply(kernel, arguments); });
}

// --- the warp instructions of mma.cuh ---
enum class Element { kFloat16, kBFloat16 };
void mma_m16n8k16(Element element, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void ldmatrix_x4(uint32_t (&r)[4], uint32_t shared_address, bool transposed);
void cp_async_16(uint32_t shared_address, const void* global_pointer, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

// Fragment layouts as the PTX ISA defines them, the single source the instructions above use.
// mma.m16n8k16 operand 'A' (16 x 16), 'B' (16 x 8, K x N) or 'C' (16 x 8): element `index` of
// lane `lane` (the i of a_i, b_i, c_i) is at (row, col).
void mma_fragment(char operand, int lane, int index, int& row, int& col);
// ldmatrix .m8n8 .b16: element `element` (0 low, 1 high half) of register `reg` of lane `lane`
// is (row, col) of matrix `reg`, plain or .trans.
void ldmatrix_fragment(bool transposed, int lane, int element, int& row, int& col);

}  // namespace emulator
