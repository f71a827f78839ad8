// The warp instructions of csrc/cuda/mma.cuh, lane by lane as the PTX ISA defines them:
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32  ("Matrix Fragments for
//     mma.m16n8k16 with floating point type"),
//   ldmatrix.sync.aligned.m8n8.x4{,.trans}.shared.b16  ("ldmatrix"),
//   cp.async.cg.shared.global [dst], [src], 16, src_size; cp.async.commit_group;
//   cp.async.wait_group N  ("cp.async", "cp.async.wait_group").
// The fragment maps below are written from the ISA's tables; tests/test_cuda_emulator.py checks
// them against CuTe's MMA and copy traits, an independent description of the same layouts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <deque>
#include <vector>

#include "execution.h"

namespace emulator {

void mma_fragment(char operand, int lane, int index, int& row, int& col) {
  const int group = lane / 4, thread_in_group = lane % 4;
  switch (operand) {
    case 'A':  // a0..a7, two per register: rows g (i = 0, 1, 4, 5) or g + 8; cols 2t + (i & 1), + 8 for i >= 4
      row = group + ((index < 2 || (index >= 4 && index < 6)) ? 0 : 8);
      col = thread_in_group * 2 + (index & 1) + (index >= 4 ? 8 : 0);
      return;
    case 'B':  // b0..b3 of the K x N operand: rows (k) 2t + (i & 1), + 8 for i >= 2; col (n) g
      row = thread_in_group * 2 + (index & 1) + (index >= 2 ? 8 : 0);
      col = group;
      return;
    default:  // 'C' (and D): c0..c3, rows g (i < 2) or g + 8, cols 2t + (i & 1)
      row = group + (index < 2 ? 0 : 8);
      col = thread_in_group * 2 + (index & 1);
      return;
  }
}

void ldmatrix_fragment(bool transposed, int lane, int element, int& row, int& col) {
  // Each lane receives the 32 bits of row lane / 4, elements 2 (lane % 4) and 2 (lane % 4) + 1;
  // .trans delivers the same positions of the transposed matrix.
  const int r = lane / 4, c = 2 * (lane % 4) + element;
  row = transposed ? c : r;
  col = transposed ? r : c;
}

namespace {

float to_float(Element element, uint16_t bits) {
  return element == Element::kFloat16 ? __half2float(__ushort_as_half(bits))
                                      : __bfloat162float(__ushort_as_bfloat16(bits));
}

uint16_t half_of(uint32_t word, int which) { return static_cast<uint16_t>(which == 0 ? word : word >> 16); }

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

void mma_m16n8k16(Element element, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  WarpSlots& warp = this_warp();
  const int lane = threadIdx.x % 32;
  uint32_t* in = warp.in[lane];
  for (int i = 0; i < 4; ++i) in[i] = a[i];
  in[4] = b0;
  in[5] = b1;
  for (int i = 0; i < 4; ++i) in[6 + i] = float_bits(c[i]);
  in[10] = static_cast<uint32_t>(element);
  warp_collective(WarpOp::kMma, [](WarpSlots& w) {
    const Element type = static_cast<Element>(w.in[0][10]);
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      if (static_cast<Element>(w.in[l][10]) != type) fault(cudaErrorLaunchFailure, "mma.sync: lanes disagree on the type");
      int row, col;
      for (int i = 0; i < 8; ++i) {  // a_i is half i % 2 of register i / 2
        mma_fragment('A', l, i, row, col);
        A[row][col] = to_float(type, half_of(w.in[l][i / 2], i % 2));
      }
      for (int i = 0; i < 4; ++i) {
        mma_fragment('B', l, i, row, col);
        B[row][col] = to_float(type, half_of(w.in[l][4 + i / 2], i % 2));
      }
      for (int i = 0; i < 4; ++i) {
        mma_fragment('C', l, i, row, col);
        C[row][col] = bits_float(w.in[l][6 + i]);
      }
    }
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) {
        int row, col;
        mma_fragment('C', l, i, row, col);
        // Products of 16-bit inputs are exact in fp32; they are summed in fp32, then added to C.
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        w.out[l][i] = float_bits(C[row][col] + sum);
      }
    }
    count_mma();
  });
  for (int i = 0; i < 4; ++i) c[i] = bits_float(warp.out[lane][i]);
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t address, bool transposed) {
  WarpSlots& warp = this_warp();
  const int lane = threadIdx.x % 32;
  warp.in[lane][0] = address;
  warp.in[lane][1] = transposed;
  warp_collective(WarpOp::kLdmatrix, [](WarpSlots& w) {
    const bool trans = w.in[0][1] != 0;
    uint16_t matrices[4][8][8];
    for (int m = 0; m < 4; ++m) {
      for (int row = 0; row < 8; ++row) {  // lane 8 m + row names row `row` of matrix m: 16 aligned bytes
        const unsigned char* source = shared_bytes_at(w.in[8 * m + row][0], 16, 16, "ldmatrix");
        std::memcpy(matrices[m][row], source, 16);
      }
    }
    for (int l = 0; l < 32; ++l) {
      if ((w.in[l][1] != 0) != trans) fault(cudaErrorLaunchFailure, "ldmatrix: lanes disagree on .trans");
      for (int m = 0; m < 4; ++m) {
        uint32_t word = 0;
        for (int e = 0; e < 2; ++e) {
          int row, col;
          ldmatrix_fragment(trans, l, e, row, col);
          word |= static_cast<uint32_t>(matrices[m][row][col]) << (16 * e);
        }
        w.out[l][m] = word;
      }
    }
    count_ldmatrix();
  });
  for (int m = 0; m < 4; ++m) r[m] = warp.out[lane][m];
}

namespace {

struct Copy {
  uint32_t destination;
  const void* source;
  int source_bytes;
};

// This thread's cp.async copies: those issued since the last commit, then the committed groups,
// oldest first.
thread_local std::vector<Copy> t_open;
thread_local std::deque<std::vector<Copy>> t_committed;

void perform(const Copy& copy) {
  unsigned char* destination = shared_bytes_at(copy.destination, 16, 16, "cp.async");
  std::memcpy(destination, copy.source, copy.source_bytes);
  std::memset(destination + copy.source_bytes, 0, 16 - copy.source_bytes);
}

}  // namespace

void cp_async_16(uint32_t address, const void* global_pointer, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) fault(cudaErrorIllegalAddress, "cp.async: src-size outside 0..16");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(global_pointer) % 16 != 0) {
    fault(cudaErrorIllegalAddress, "cp.async: global address not 16-byte aligned");
  }
  shared_bytes_at(address, 16, 16, "cp.async");  // checked when issued, as the hardware would fault
  count_cp_async();
  const Copy copy{address, global_pointer, src_bytes};
  if (settings().eager_copies) {
    perform(copy);
  } else {
    t_open.push_back(copy);
  }
}

void cp_async_commit() {
  t_committed.push_back(std::move(t_open));
  t_open.clear();
}

void cp_async_wait(int pending) {
  delay_point();  // the copies may land late: other warps must not read them before a barrier
  while (static_cast<int>(t_committed.size()) > pending) {
    for (const Copy& copy : t_committed.front()) perform(copy);
    t_committed.pop_front();
  }
}

void finish_thread_copies() {
  // Copies never waited for still land (the hardware completes them), after the block's code.
  for (const auto& group : t_committed)
    for (const Copy& copy : group) perform(copy);
  for (const Copy& copy : t_open) perform(copy);
  discard_thread_copies();
}

void discard_thread_copies() {
  t_open.clear();
  t_committed.clear();
}

}  // namespace emulator
