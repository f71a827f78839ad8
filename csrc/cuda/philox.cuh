// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11): the
// counter-based generator of the dropout keep-mask. Its words are a pure function of (counter,
// key), so the backward regenerates the forward's mask instead of storing it, and every backend
// draws the same bits (SPEC11: attention/dropout.py's philox4x32 is the reference).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fused_attention {

struct PhiloxWords {
  uint32_t word[4];
};

// Ten rounds of Philox4x32 on counter (c0, c1, c2, c3) with key (k0, k1).
__device__ __forceinline__ PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                     uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMultiplier0 = 0xD2511F53u;
  constexpr uint32_t kMultiplier1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // the key schedule's increments
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(kMultiplier0, c0);
    const uint32_t lo0 = kMultiplier0 * c0;
    const uint32_t hi1 = __umulhi(kMultiplier1, c2);
    const uint32_t lo1 = kMultiplier1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return {{c0, c1, c2, c3}};
}

}  // namespace fused_attention
