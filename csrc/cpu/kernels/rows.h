// The one CPU decode primitive: a GEMV-style pass over a range of rows of a
// virtual weight matrix [P | Q] (P: rows x K, Q: rows x R; separate
// pointers, so W and an adapter block need not be adjacent) against M
// activation rows, with the epilogues applied before the single store.
//
//   out[m, i] = sum_k u[m, k] P[i, k] + sum_r v[m, r] Q[i, r]
//               (+ add[m, i]) (+ tile_s * tile[m, tile_col[i]])
//
// Every matrix is row-major with its own leading dimension. Pure C++.
#pragma once
#include <cstdint>

#include "types.h"

namespace flora::cpu::kernels {

struct RowsTask {
  Dtype dt = Dtype::kF32;
  int64_t M = 0, K = 0, R = 0;
  const void* u = nullptr;        // [M, K] activations (dtype dt)
  int64_t ldu = 0;
  const void* P = nullptr;        // [rows, K] weights (W or A)
  int64_t ldp = 0;
  const void* Q = nullptr;        // [rows, R] extra weight columns (B or C)
  int64_t ldq = 0;
  const float* v = nullptr;       // [M, R] extra inputs in fp32 (s f(z) or f(z))
  int64_t ldv = 0;
  const void* add = nullptr;      // optional [M, rows] addend (res, z_in)
  int64_t ld_add = 0;
  const float* tile = nullptr;    // optional repeat-add source (fp32 z)
  int64_t ldt = 0;
  const int32_t* tile_col = nullptr;  // per row: column of `tile`, or -1
  float tile_s = 0.f;
  void* out = nullptr;            // [M, rows] output (dtype dt)
  int64_t ldo = 0;
  float* out32 = nullptr;         // optional fp32 copy of out (before rounding)
  int64_t ldo32 = 0;
};

// Which vector code runs. kAvx512Dot uses VDPBF16PS for bf16 (needs
// avx512_bf16); for fp32 / fp16 it is the same code as kAvx512.
enum class Path : int { kAvx512Dot = 0, kAvx512 = 1, kAvx2 = 2 };
const char* path_name(Path p);

// Rows [i0, i1) of the task (pointers are for row 0). Callers split the
// rows across threads; each call is single-threaded.
void rows_avx512(const RowsTask& t, int64_t i0, int64_t i1, bool bf16_dot);
void rows_avx2(const RowsTask& t, int64_t i0, int64_t i1);
void run_rows(Path p, const RowsTask& t, int64_t i0, int64_t i1);

// CPU support for a path (checked with cpuid, no torch needed).
bool path_supported(Path p);

}  // namespace flora::cpu::kernels
