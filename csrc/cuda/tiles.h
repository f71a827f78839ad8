// Tile shapes and shared-memory footprints of the CUDA attention kernels, one struct per kernel,
// templated on the padded head dim (64, 128, 256). Plain C++ with no CUDA header, so that the
// launches, the binding and tests/test_cuda_compile.py all read the same kSmemBytes.
//
// What each choice costs in registers and spills is measured by ptxas for every instantiation and
// kept in csrc/cuda/RESOURCES.md, which tests/test_cuda_compile.py checks (no spills, table up
// to date). The register file is 64K 32-bit registers per SM, at most 255 per thread.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fused_attention {

// Dynamic shared memory a block may opt in to on every GPU our binaries run on: sm_80 allows
// 163 KB and sm_90 227 KB, but sm_86 and sm_89 (RTX 30/40, A10, L4, L40), which run the sm_80
// binary, allow 99 KB, and so does sm_120. One tile configuration that fits 99 KB serves them all.
constexpr size_t kMaxSharedBytesPerBlock = 99 * 1024;

// Forward: 4 warps of 16 query rows; K and V stream through shared memory in two stages.
template <int kHeadDim>
struct ForwardTiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // queries per block
  // Keys per pipeline stage. At head dim 256 the output accumulator takes 128 registers a thread
  // and Q 32 KB of shared memory; two stages of 32 keys fill the rest of 99 KB, and leave room
  // in registers for the 32-key scores.
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  // Shared memory in 16-bit elements: Q once, K and V in two stages each.
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kQOffset + kBlockM * kHeadDim;
  static constexpr int kVOffset = kKOffset + 2 * kBlockN * kHeadDim;
  static constexpr int kSmemElements = kVOffset + 2 * kBlockN * kHeadDim;
  static constexpr size_t kSmemBytes = kSmemElements * sizeof(uint16_t);
  static_assert(kSmemBytes <= kMaxSharedBytesPerBlock, "tiles must fit 99 KB of shared memory");
};

// Backward, dK/dV per key tile: warps are laid out as kKeyStrips strips of 16 keys times kSplitD
// slices of the head dim. The warps of one strip all recompute that strip's scores (full head
// dim) and each accumulates dK and dV for its own slice of columns, which keeps those two
// accumulators at 128 registers a thread at head dim 256.
template <int kHeadDim>
struct KeyTileTiles {
  static constexpr int kKeyStrips = 4;
  static constexpr int kSplitD = kHeadDim > 128 ? 2 : 1;
  static constexpr int kWarps = kKeyStrips * kSplitD;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kKeyStrips;        // keys per block
  static constexpr int kSliceCols = kHeadDim / kSplitD;  // dK/dV columns per warp
  // Queries per pipeline stage. From head dim 128 on, dK and dV take 128 registers a thread; 32
  // query columns of S^T and dP^T fit beside them. At 256, K and V take 64 KB, and two stages of
  // 16 queries are what fits the other 35 KB.
  static constexpr int kBlockM = kHeadDim <= 64 ? 64 : kHeadDim <= 128 ? 32 : 16;
  // Shared memory: 16-bit tiles (K and V once, Q and dO in two stages), then fp32 per-query
  // values (lse in log2 units and delta, two stages each).
  static constexpr int kKOffset = 0;
  static constexpr int kVOffset = kKOffset + kBlockN * kHeadDim;
  static constexpr int kQOffset = kVOffset + kBlockN * kHeadDim;
  static constexpr int kDoOffset = kQOffset + 2 * kBlockM * kHeadDim;
  static constexpr int kTileElements = kDoOffset + 2 * kBlockM * kHeadDim;
  static constexpr int kLseOffset = 0;  // in floats, after the tiles
  static constexpr int kDeltaOffset = kLseOffset + 2 * kBlockM;
  static constexpr int kRowValues = kDeltaOffset + 2 * kBlockM;
  static constexpr size_t kSmemBytes = kTileElements * sizeof(uint16_t) + kRowValues * sizeof(float);
  static_assert(kSmemBytes <= kMaxSharedBytesPerBlock, "tiles must fit 99 KB of shared memory");
};

// Backward, dQ per query tile: 4 warps of 16 query rows, as in the forward.
template <int kHeadDim>
struct QueryTileTiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // queries per block
  // Keys per pipeline stage. Q and dO take 64 KB at head dim 256, leaving room for two stages of
  // 16 keys only (the dQ accumulator takes 128 registers there); at 128, 64-key stages fit both
  // 99 KB and the register file.
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 16;
  // Shared memory in 16-bit elements: Q and dO once, K and V in two stages each.
  static constexpr int kQOffset = 0;
  static constexpr int kDoOffset = kQOffset + kBlockM * kHeadDim;
  static constexpr int kKOffset = kDoOffset + kBlockM * kHeadDim;
  static constexpr int kVOffset = kKOffset + 2 * kBlockN * kHeadDim;
  static constexpr int kSmemElements = kVOffset + 2 * kBlockN * kHeadDim;
  static constexpr size_t kSmemBytes = kSmemElements * sizeof(uint16_t);
  static_assert(kSmemBytes <= kMaxSharedBytesPerBlock, "tiles must fit 99 KB of shared memory");
};

// Decode (flash_decode.cu): 4 warps, kRows packed query rows per block (row r on warp r % 4) and
// tiles of kKeys keys, one per lane. Shared memory in floats: the query rows, the key tile (rows
// kHeadDim + 1 apart, so that 32 lanes reading 32 key rows at one column hit 32 banks), the value
// tile and the probabilities.
template <int kHeadDim>
struct DecodeTiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16;
  static constexpr int kRowsPerWarp = kRows / kWarps;
  static constexpr int kKeys = 32;
  static constexpr int kKeyStride = kHeadDim + 1;
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kQOffset + kRows * kHeadDim;
  static constexpr int kVOffset = kKOffset + kKeys * kKeyStride;
  static constexpr int kPOffset = kVOffset + kKeys * kHeadDim;
  static constexpr size_t kSmemBytes = (kPOffset + kRows * kKeys) * sizeof(float);
  static_assert(kSmemBytes <= kMaxSharedBytesPerBlock, "tiles must fit 99 KB of shared memory");
};

}  // namespace fused_attention
