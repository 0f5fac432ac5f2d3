// The decode kernels of the three blocks, composed from the rows kernel.
// Pure C++: the caller passes raw pointers with leading dimensions and a
// parallel-for (at::parallel_for in the extension, a plain loop in tests).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "rows.h"

namespace flora::cpu::kernels {

// Runs body(begin, end) over chunks of [0, n); chunks may run in parallel.
using ParallelFor =
    std::function<void(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body)>;
// Runs the whole range on the calling thread.
void serial_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

struct Mat {
  const void* p = nullptr;
  int64_t ld = 0;
};

// [y | z] = x [W; A]^T; z += z_in; y += res; y[seg g] += s * tile(z[chunk g]).
// z rows are computed first (R is small), then y with the repeat-add in
// the epilogue from the fp32 z, so y is stored once.
struct FflArgs {
  Dtype dt = Dtype::kF32;
  int64_t M = 0, K = 0, N = 0, R = 0;
  Mat x, W, A, z_in, res;            // z_in.p, res.p may be null
  double s = 1.0;
  std::vector<int64_t> repeat;       // segment widths (empty: no repeat-add)
  int64_t repeat_rank = 0;
  void* out = nullptr;               // [M, N + R]
  int64_t ldo = 0;
};
void ffl_decode(Path p, const FflArgs& a, const ParallelFor& pf);

// y = u W^T + s f(z) B^T (+ res), f = relu or identity.
struct FblArgs {
  Dtype dt = Dtype::kF32;
  int64_t M = 0, K = 0, N = 0, R = 0;
  Mat u, z, W, B, res;               // res.p may be null
  double s = 1.0;
  bool relu = false;
  void* out = nullptr;               // [M, N]
  int64_t ldo = 0;
};
void fbl_decode(Path p, const FblArgs& a, const ParallelFor& pf);

// y = u W^T + s f(z) B^T (+ res), z2 = u A^T + f(z) C^T, into [y | z2].
struct FfblArgs {
  Dtype dt = Dtype::kF32;
  int64_t M = 0, K = 0, N = 0, R = 0, R2 = 0;
  Mat u, z, W, B, A, C, res;
  double s = 1.0;
  bool relu = false;
  void* out = nullptr;               // [M, N + R2]
  int64_t ldo = 0;
};
void ffbl_decode(Path p, const FfblArgs& a, const ParallelFor& pf);

}  // namespace flora::cpu::kernels
