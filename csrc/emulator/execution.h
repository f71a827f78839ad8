// Internals shared by the emulator's execution model (execution.cpp) and its warp instructions
// (instructions.cpp).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

namespace emulator {

// A reusable barrier of `count` threads. The last thread to arrive runs `on_complete` (with every
// other thread still waiting) and then releases them. Waiting threads sleep on a futex and leave
// by exception when the launch is aborted.
class Barrier {
 public:
  void reset(int count);
  void arrive_and_wait(const std::function<void()>& on_complete);

 private:
  int count_ = 0;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> generation_{0};
};

enum class WarpOp : int { kNone, kShuffle, kVote, kMma, kLdmatrix };

// A warp's meeting point for collectives: each lane leaves its operands in `in` and finds its
// results in `out` after the barrier.
struct WarpSlots {
  Barrier barrier;
  WarpOp op[32] = {};
  uint32_t in[32][12] = {};
  uint32_t out[32][4] = {};
};

// Ends the launch: records the first fault's message and makes every thread leave.
[[noreturn]] void fault(cudaError_t code, const std::string& message);

// The lane's part of a warp collective: every lane of the warp must reach the same `op`; the last
// to arrive runs `compute` over all lanes' slots.
void warp_collective(WarpOp op, const std::function<void(WarpSlots&)>& compute);
WarpSlots& this_warp();

// Bytes [address, address + bytes) of the block's shared memory, checked against its size and
// `alignment` (a fault otherwise).
unsigned char* shared_bytes_at(uint32_t address, size_t bytes, size_t alignment, const char* what);

// A point where the random delay mode may pause this warp.
void delay_point();

// cp.async bookkeeping of the calling thread, at the end of its block.
void finish_thread_copies();
void discard_thread_copies();

void count_mma();
void count_ldmatrix();
void count_cp_async();

}  // namespace emulator
