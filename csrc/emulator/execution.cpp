// The emulator's execution model: blocks, threads, barriers, warp collectives, launch checks.
#include <cuda_runtime.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "execution.h"

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emulator {
namespace {

constexpr size_t kDefaultSharedBytes = 48 * 1024;  // more needs the opt-in attribute
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridY = 65535, kMaxGridZ = 65535;
constexpr unsigned kMaxBlockZ = 64;

Settings g_settings;
std::mutex g_launch_mutex;  // one launch at a time: blocks share g_shared
std::mutex g_error_mutex;
std::string g_last_message;
cudaError_t g_sticky_error = cudaSuccess;  // returned once by cudaGetLastError
std::map<const void*, int> g_max_dynamic_shared;  // cudaFuncAttributeMaxDynamicSharedMemorySize

struct AtomicCounters {
  std::atomic<uint64_t> launches{0}, blocks{0}, syncthreads{0}, mma{0}, ldmatrix{0}, cp_async{0};
} g_counters;

// State of the running launch.
alignas(128) unsigned char g_shared[256 * 1024];
size_t g_shared_bytes = 0;
std::atomic<bool> g_aborted{false};
std::atomic<uint64_t> g_progress{0};  // barriers completed; the hang detector watches it
std::string g_fault;                  // first fault of the launch (under g_error_mutex)
cudaError_t g_fault_code = cudaSuccess;

struct KernelFault : std::exception {};

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
  const timespec timeout{0, 50 * 1000 * 1000};  // wake up now and then to notice an abort
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, &timeout, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

}  // namespace

void Barrier::reset(int count) {
  count_ = count;
  arrived_.store(0);
}

void Barrier::arrive_and_wait(const std::function<void()>& on_complete) {
  const uint32_t generation = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
    if (on_complete) on_complete();
    arrived_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    g_progress.fetch_add(1, std::memory_order_relaxed);
    futex_wake_all(&generation_);
    return;
  }
  // The threads outnumber the cores many times over: give the core away a few times (the last
  // arrivals are usually runnable) before sleeping, which costs a futex wake-up later.
  for (int spin = 0; spin < 4 && generation_.load(std::memory_order_acquire) == generation; ++spin) sched_yield();
  while (generation_.load(std::memory_order_acquire) == generation) {
    if (g_aborted.load(std::memory_order_relaxed)) throw KernelFault();
    futex_wait(&generation_, generation);
  }
}

namespace {
void record_fault(cudaError_t code, const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(g_error_mutex);
    if (g_fault.empty()) {
      g_fault = message;
      g_fault_code = code;
    }
  }
  g_aborted.store(true);
}
}  // namespace

[[noreturn]] void fault(cudaError_t code, const std::string& message) {
  std::string where = "block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                      std::to_string(blockIdx.z) + " thread " + std::to_string(threadIdx.x) + ": ";
  record_fault(code, where + message);
  throw KernelFault();
}

namespace {

// Per-block state shared by its threads.
struct Block {
  int threads = 0;
  Barrier barrier;
  std::vector<std::unique_ptr<WarpSlots>> warps;
};
Block g_block;

uint64_t mix(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

thread_local uint64_t t_delay_counter = 0;

// With delays on, sleeps at random for up to delay_max_us. The draw depends on the warp, not the
// lane, so a warp's lanes move together and whole warps shift against each other.
void maybe_delay() {
  if (g_settings.delay_seed == 0 || g_settings.delay_max_us <= 0) return;
  const uint64_t block = blockIdx.x + 65536ull * (blockIdx.y + 65536ull * blockIdx.z);
  const uint64_t draw = mix(g_settings.delay_seed ^ mix(block * 64 + threadIdx.x / 32) ^ mix(++t_delay_counter));
  if (draw % 3 != 0) return;
  std::this_thread::sleep_for(std::chrono::microseconds((draw >> 8) % (g_settings.delay_max_us + 1)));
}

void set_error_message(const std::string& message) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  g_last_message = message;
}

cudaError_t launch_error(cudaError_t code, const std::string& message) {
  set_error_message(message);
  std::lock_guard<std::mutex> lock(g_error_mutex);
  g_sticky_error = code;
  return code;
}

std::string describe(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

}  // namespace

Settings& settings() { return g_settings; }

Counters counters() {
  return {g_counters.launches.load(), g_counters.blocks.load(), g_counters.syncthreads.load(),
          g_counters.mma.load(),      g_counters.ldmatrix.load(), g_counters.cp_async.load()};
}

void reset_counters() {
  for (auto* c : {&g_counters.launches, &g_counters.blocks, &g_counters.syncthreads, &g_counters.mma,
                  &g_counters.ldmatrix, &g_counters.cp_async})
    c->store(0);
}

void count_mma() { g_counters.mma.fetch_add(1, std::memory_order_relaxed); }
void count_ldmatrix() { g_counters.ldmatrix.fetch_add(1, std::memory_order_relaxed); }
void count_cp_async() { g_counters.cp_async.fetch_add(1, std::memory_order_relaxed); }

std::string last_error_message() {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  return g_last_message;
}

void clear_last_error() {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  g_last_message.clear();
  g_sticky_error = cudaSuccess;
}

unsigned char* block_shared_memory() { return g_shared; }

unsigned char* shared_bytes_at(uint32_t address, size_t bytes, size_t alignment, const char* what) {
  if (address % alignment != 0 || address + bytes > g_shared_bytes) {
    fault(cudaErrorIllegalAddress, std::string(what) + ": shared address " + std::to_string(address) + " (" +
                                       std::to_string(bytes) + " bytes, alignment " + std::to_string(alignment) +
                                       ") outside the block's " + std::to_string(g_shared_bytes) +
                                       " bytes of dynamic shared memory or misaligned");
  }
  return g_shared + address;
}

size_t shared_address(const void* pointer) {
  const auto* p = static_cast<const unsigned char*>(pointer);
  if (p < g_shared || p > g_shared + g_shared_bytes) {
    fault(cudaErrorIllegalAddress, "__cvta_generic_to_shared: the pointer is not in the block's shared memory");
  }
  return static_cast<size_t>(p - g_shared);
}

void syncthreads() {
  maybe_delay();
  g_block.barrier.arrive_and_wait([] { g_counters.syncthreads.fetch_add(1, std::memory_order_relaxed); });
  maybe_delay();
}

WarpSlots& this_warp() { return *g_block.warps[threadIdx.x / 32]; }

void warp_collective(WarpOp op, const std::function<void(WarpSlots&)>& compute) {
  WarpSlots& warp = this_warp();
  const int lane = threadIdx.x % 32;
  warp.op[lane] = op;
  warp.barrier.arrive_and_wait([&] {
    for (int l = 0; l < 32; ++l) {
      if (warp.op[l] != op) {
        fault(cudaErrorLaunchFailure, "warp " + std::to_string(threadIdx.x / 32) +
                                          ": lanes reached different warp collectives (lane " + std::to_string(l) +
                                          " is at another one): divergent code around a *_sync instruction");
      }
    }
    compute(warp);
  });
}

float shfl_xor(unsigned int member_mask, float value, int lane_mask) {
  if (member_mask != 0xffffffffu) fault(cudaErrorLaunchFailure, "__shfl_xor_sync: only full-warp masks are emulated");
  WarpSlots& warp = this_warp();
  const int lane = threadIdx.x % 32;
  std::memcpy(&warp.in[lane][0], &value, sizeof value);
  warp.in[lane][1] = static_cast<uint32_t>(lane_mask);
  warp_collective(WarpOp::kShuffle, [](WarpSlots& w) {
    for (int l = 0; l < 32; ++l) {
      const uint32_t source = (l ^ w.in[l][1]) & 31;
      w.out[l][0] = w.in[source][0];
    }
  });
  float result;
  std::memcpy(&result, &warp.out[lane][0], sizeof result);
  return result;
}

unsigned int ballot(unsigned int member_mask, bool predicate) {
  if (member_mask != 0xffffffffu) fault(cudaErrorLaunchFailure, "warp vote: only full-warp masks are emulated");
  WarpSlots& warp = this_warp();
  const int lane = threadIdx.x % 32;
  warp.in[lane][0] = predicate ? 1u : 0u;
  warp_collective(WarpOp::kVote, [](WarpSlots& w) {
    uint32_t bits = 0;
    for (int l = 0; l < 32; ++l) bits |= w.in[l][0] << l;
    for (int l = 0; l < 32; ++l) w.out[l][0] = bits;
  });
  return warp.out[lane][0];
}

cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    return launch_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute not emulated");
  }
  if (value < 0 || static_cast<size_t>(value) > g_settings.max_shared_bytes) {
    return launch_error(cudaErrorInvalidValue,
                        "cudaFuncSetAttribute: " + std::to_string(value) +
                            " bytes of dynamic shared memory exceed the device's opt-in limit of " +
                            std::to_string(g_settings.max_shared_bytes));
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_max_dynamic_shared[kernel] = value;
  return cudaSuccess;
}

cudaError_t take_last_error() {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  const cudaError_t error = g_sticky_error;
  g_sticky_error = cudaSuccess;
  return error;
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                     const std::function<void()>& body) {
  std::lock_guard<std::mutex> launch_lock(g_launch_mutex);
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > kMaxBlockZ) {
    return launch_error(cudaErrorInvalidConfiguration, "launch: block " + describe(block) + " has " +
                                                           std::to_string(threads) + " threads (1 to 1024 allowed)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > INT_MAX || grid.y > kMaxGridY || grid.z > kMaxGridZ) {
    return launch_error(cudaErrorInvalidConfiguration,
                        "launch: grid " + describe(grid) + " outside the limits (x < 2^31, y and z <= 65535)");
  }
  if (block.y != 1 || block.z != 1 || threads % 32 != 0) {
    return launch_error(cudaErrorInvalidConfiguration,
                        "launch: the emulator runs 1-D blocks of whole warps, got " + describe(block));
  }
  const auto opt_in = g_max_dynamic_shared.find(kernel);
  const size_t allowed = opt_in == g_max_dynamic_shared.end() ? kDefaultSharedBytes
                                                              : std::max<size_t>(kDefaultSharedBytes, opt_in->second);
  if (shared_bytes > allowed) {
    return launch_error(cudaErrorInvalidValue,
                        "launch: " + std::to_string(shared_bytes) + " bytes of dynamic shared memory, but the kernel " +
                            "allows " + std::to_string(allowed) +
                            " (above 48 KiB needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize))");
  }
  if (shared_bytes > sizeof g_shared) {
    return launch_error(cudaErrorInvalidValue, "launch: the emulator holds at most 256 KiB of shared memory");
  }

  g_counters.launches.fetch_add(1);
  g_shared_bytes = shared_bytes;
  g_aborted.store(false);
  g_fault.clear();
  g_fault_code = cudaSuccess;
  g_block.threads = static_cast<int>(threads);
  g_block.barrier.reset(g_block.threads);
  g_block.warps.clear();
  for (uint64_t w = 0; w < threads / 32; ++w) {
    g_block.warps.push_back(std::make_unique<WarpSlots>());
    g_block.warps.back()->barrier.reset(32);
  }

  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  auto thread_main = [&](unsigned thread) {
    threadIdx = dim3(thread);
    blockDim = block;
    gridDim = grid;
    t_delay_counter = 0;
    try {
      for (uint64_t b = 0; b < blocks; ++b) {
        blockIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (uint64_t{grid.x} * grid.y));
        // Thread 0 poisons shared memory while the others wait: a read of anything the block
        // has not written gives NaN.
        g_block.barrier.arrive_and_wait([&] {
          std::memset(g_shared, 0xff, shared_bytes);
          g_counters.blocks.fetch_add(1, std::memory_order_relaxed);
        });
        body();
        finish_thread_copies();
        g_block.barrier.arrive_and_wait(nullptr);  // every thread done before the next block's poison
      }
    } catch (const KernelFault&) {
      g_aborted.store(true);
      discard_thread_copies();
    }
  };

  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) workers.emplace_back(thread_main, t);

  // Hang detector: a barrier some thread never reaches would otherwise block forever.
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    uint64_t last = g_progress.load();
    auto since = std::chrono::steady_clock::now();
    while (!done.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      const uint64_t now_progress = g_progress.load();
      if (now_progress != last) {
        last = now_progress;
        since = std::chrono::steady_clock::now();
      } else if (std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count() >
                 g_settings.hang_seconds) {
        record_fault(cudaErrorLaunchFailure, "hang: no barrier completed for " +
                                                 std::to_string(g_settings.hang_seconds) +
                                                 " s (a __syncthreads or warp collective some thread never reaches)");
        return;
      }
    }
  });
  for (auto& worker : workers) worker.join();
  done.store(true);
  watchdog.join();

  if (g_aborted.load()) {
    std::lock_guard<std::mutex> lock(g_error_mutex);
    g_last_message = "kernel fault: " + g_fault;
    return g_fault_code == cudaSuccess ? cudaErrorLaunchFailure : g_fault_code;
  }
  return cudaSuccess;
}

void delay_point() { maybe_delay(); }

}  // namespace emulator
