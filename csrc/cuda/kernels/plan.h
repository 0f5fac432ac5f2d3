// Index logic of the flora CUDA kernels, as __host__ __device__ functions:
// the kernels call them, and tests/cpp/test_cuda_plan.cpp runs the same
// functions on the host (an emulation of each kernel's loops) against a
// plain reference for odd shapes. Keep every tile / predicate / epilogue
// index decision here, not inline in a kernel.
#pragma once
#include <cstdint>

#include "args.h"

#if defined(__CUDACC__)
#define FLORA_HD __host__ __device__ __forceinline__
#else
#define FLORA_HD inline
#endif

namespace flora::cuda::plan {

// ---- decode (M <= 16): one CTA of kDecodeWarps warps per `rows` output
// columns; each warp takes every kDecodeWarps-th k-step of kKStep elements
// (32 lanes x one 16-byte vector), so K is split across the CTA's warps and
// reduced through shared memory.
constexpr int kDecodeWarps = 8;
constexpr int kVec = 8;                 // elements per 16-byte load (2-byte types)
constexpr int kKStep = 32 * kVec;       // elements one warp covers per step
constexpr int64_t kDecodeMaxM = 16;

// Compile-time row-count bucket of the M rows (M <= 16).
FLORA_HD int decode_m_tile(int64_t M) {
  return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16;
}

// Output columns per CTA: as many as still leave >= 4 CTAs per SM, so small
// N gets more CTAs (the split-K across warps then keeps each SM's loads in
// flight) and large N amortises the x loads over more weight rows. M > 8
// stops at 2 rows: 16 x 4 accumulators cost 167 registers (1 CTA per SM).
FLORA_HD int decode_rows_per_cta(int64_t total_rows, int sm_count, int64_t M = 1) {
  const int64_t want = 4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  if (M <= 8 && (total_rows + 3) / 4 >= want) return 4;
  if ((total_rows + 1) / 2 >= want) return 2;
  return 1;
}

FLORA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct BlockTask {
  int prob;      // which problem
  int64_t row0;  // first output column of the problem this CTA computes
};

// CTA b's task when problem 0 has n0 columns (its tiles come first).
FLORA_HD BlockTask decode_block_task(int64_t b, int64_t n0, int rows) {
  const int64_t t0 = ceil_div(n0, rows);
  if (b < t0) return {0, b * rows};
  return {1, (b - t0) * rows};
}

FLORA_HD int64_t decode_grid(int64_t n0, int64_t n1, int nprob, int rows) {
  return ceil_div(n0, rows) + (nprob > 1 ? ceil_div(n1, rows) : 0);
}

// Valid elements of the 8-wide vector starting at k0 in a row of K: 8 means
// one 16-byte load; 1..7 the tail (scalar loads, zero fill); 0 none.
FLORA_HD int vec_valid(int64_t k0, int64_t K) {
  const int64_t v = K - k0;
  return v <= 0 ? 0 : v >= kVec ? kVec : static_cast<int>(v);
}

// Column of Z the repeat-add adds to output column `col` of problem 0, or -1.
// (Fixed trip count: the widths are read with compile-time indices, so a
// kernel keeps them in parameter space.)
FLORA_HD int64_t repeat_src_col(int64_t col, const RepeatAdd& r) {
  int64_t off = 0, src = -1;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int g = 0; g < kMaxRepeat; ++g) {
    const int64_t w = g < r.groups ? r.widths[g] : 0;
    if (src < 0 && col >= off && col < off + w) src = g * r.rc + (col - off) % r.rc;
    off += w;
  }
  return src;
}

// Halving butterfly reduction of V values over a warp's 32 lanes: at stage s
// (xor offset 16 >> s) each lane keeps the upper half of its values when its
// bit is set, else the lower half, and adds its partner's copy. After
// log2(V) (at most 5) stages lane L holds in slot i the warp-wide sum of
// value butterfly_index(L, i, V); slots 0 .. max(V / 32, 1) - 1 are valid.
// (V - 1 shuffles instead of 5 V.)
FLORA_HD int butterfly_stages(int V) {
  int s = 0;
  while (s < 5 && (V >> s) > 1) ++s;
  return s;
}
FLORA_HD int butterfly_index(int lane, int i, int V) {
  const int S = butterfly_stages(V);
  int hi = 0;
  for (int s = 0; s < S; ++s) hi = (hi << 1) | ((lane >> (4 - s)) & 1);
  return hi * (V >> S) + i;
}
// True when lane L's reduced slots are the owners of their values (after
// fewer than 5 halving stages the remaining lanes hold duplicates).
FLORA_HD bool butterfly_owner(int lane, int V) {
  const int S = butterfly_stages(V);
  return (lane & ((1 << (5 - S)) - 1)) == 0;
}

// ---- GEMM (M > 16): a grid of (m tiles) x (problem 0 n tiles + problem 1
// n tiles); K runs over segment 2 (scaled by alpha2) then segment 1 into one
// accumulator.
struct GemmTile {
  int prob;
  int64_t m0, n0;  // tile origin within the problem's output
};
FLORA_HD GemmTile gemm_tile(int64_t bx, int64_t by, int64_t tiles_n0, int tm, int tn) {
  if (by < tiles_n0) return {0, bx * tm, by * tn};
  return {1, bx * tm, (by - tiles_n0) * tn};
}

}  // namespace flora::cuda::plan
