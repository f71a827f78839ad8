// Thin wrappers over the sm_80 warp-level PTX the kernels are built from: mma.sync m16n8k16
// (fp16/bf16 in, fp32 accumulate), ldmatrix (x4, optionally transposed) and cp.async (16 bytes).
//
// Register layouts these wrappers rely on (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type" and "ldmatrix"). Throughout, for lane l of the warp:
//     g = l / 4   ("groupID")          t = l % 4   ("threadID_in_group")
// A 32-bit register holding two 16-bit elements keeps the lower-indexed element in its low half.
//
// A, 16x16 (row-major, M x K), four registers per lane:
//     a[0] = A[g    ][2t, 2t+1]        a[1] = A[g + 8][2t, 2t+1]
//     a[2] = A[g    ][2t+8, 2t+9]      a[3] = A[g + 8][2t+8, 2t+9]
// B, 16x8 (K x N, "col": each register runs along K), two registers per lane:
//     b[0] = B[2t, 2t+1  ][g]          b[1] = B[2t+8, 2t+9][g]
// C/D, 16x8 fp32, four registers per lane:
//     c[0], c[1] = C[g][2t], C[g][2t+1]     c[2], c[3] = C[g + 8][2t], C[g + 8][2t+1]
//
// ldmatrix.m8n8.x4 loads four 8x8 matrices of 16-bit elements. Lane 8*i + r supplies the shared
// address of row r of matrix i (16 contiguous bytes, 16-byte aligned); afterwards register i of
// lane l holds matrix i's row l/4, elements 2*(l%4) and 2*(l%4)+1. With .trans, register i of
// lane l instead holds column l/4, elements (rows) 2*(l%4) and 2*(l%4)+1.
//
// Consequences used by the kernels (tiles live in shared memory row-major, see tile_io.cuh):
//  * A operand from a row-major M x K tile: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7),
//    (rows 0-7, k 8-15), (rows 8-15, k 8-15) land exactly in a[0..3]. Lane l points at
//    row l % 16, column 8 * (l / 16).
//  * B operand when the smem tile is stored N x K (row n holds B[:, n], e.g. K for S = Q K^T):
//    matrix (n 0-7, k 0-7) gives b[0] and (n 0-7, k 8-15) gives b[1] of the n-block 0-7, and the
//    same for n 8-15, so one x4 feeds two n8 MMAs. Lane l points at row 8 * (l / 16) + l % 8,
//    column 8 * ((l / 8) % 2).
//  * B operand when the smem tile is stored K x N (row k holds B[k, :], e.g. V for O = P V):
//    the same four matrices read with .trans. Lane l points at row 8 * ((l / 8) % 2) + l % 8,
//    column 8 * (l / 16); registers 0, 1 are b[0], b[1] of columns 0-7, registers 2, 3 of 8-15.
//  * An accumulator C of shape 16 x 16 (two n8 tiles c0, c1) is, element for element, the A
//    operand of a following MMA over k = those 16 columns:
//        a[0] = pack(c0[0], c0[1])  a[1] = pack(c0[2], c0[3])
//        a[2] = pack(c1[0], c1[1])  a[3] = pack(c1[2], c1[3])
//    which is how P and dS feed the next product without a trip through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace fused_attention {

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Two fp32 values rounded to the 16-bit element type T, `low` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high);

template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float low, float high) {
  __half2 pair = __floats2half2_rn(low, high);
  return *reinterpret_cast<uint32_t*>(&pair);
}

template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float low, float high) {
  __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<uint32_t*>(&pair);
}

// One 16-bit element of type T, given as its raw bits, widened to fp32.
template <typename T>
__device__ __forceinline__ float element_to_float(uint16_t bits);

template <>
__device__ __forceinline__ float element_to_float<__half>(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

template <>
__device__ __forceinline__ float element_to_float<__nv_bfloat16>(uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}

// The instructions, written twice below: as PTX for nvcc and, with FUSED_ATTENTION_EMULATOR, as
// calls into the CUDA emulator (csrc/emulator), which executes them lane by lane on the CPU.
//   mma_m16n8k16<T>(c, a, b0, b1): c += A(16x16) * B(16x8), fp32 accumulate.
//   ldmatrix_x4(r, address), ldmatrix_x4_trans: four 8x8 matrices of shared memory (layouts above).
//   cp_async_16(address, global, src_bytes): starts copying src_bytes (0..16) bytes from global to
//     shared memory and zero-fills the rest of the 16 destination bytes; with src_bytes == 0 nothing
//     is read. Both addresses 16-byte aligned.
//   cp_async_commit(): closes this thread's group of copies started since the last commit.
//   cp_async_wait<kPending>(): waits until at most kPending of this thread's groups are in flight.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

#ifdef FUSED_ATTENTION_EMULATOR
template <>
inline void mma_m16n8k16<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulator::mma_m16n8k16(emulator::Element::kFloat16, c, a, b0, b1);
}

template <>
inline void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulator::mma_m16n8k16(emulator::Element::kBFloat16, c, a, b0, b1);
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_address) { emulator::ldmatrix_x4(r, smem_address, false); }

inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_address) {
  emulator::ldmatrix_x4(r, smem_address, true);
}

inline void cp_async_16(uint32_t smem_address, const void* global_pointer, int src_bytes) {
  emulator::cp_async_16(smem_address, global_pointer, src_bytes);
}

inline void cp_async_commit() { emulator::cp_async_commit(); }

template <int kPending>
inline void cp_async_wait() {
  emulator::cp_async_wait(kPending);
}
#else
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address));
}

__device__ __forceinline__ void cp_async_16(uint32_t smem_address, const void* global_pointer, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address), "l"(global_pointer),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

#endif  // FUSED_ATTENTION_EMULATOR

}  // namespace fused_attention
