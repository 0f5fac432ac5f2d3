// The one argument block every flora CUDA kernel takes (decode, sm80 GEMM,
// sm90 GEMM). Plain C++: no torch, no CUDA types, so the kernel TUs build
// without torch and the host tests (tests/cpp) include it with g++.
//
// A call computes, for one shared left operand [X1 | f(X2)] (M rows):
//   problem p:  D_p = X1 Y1_p^T + alpha2_p * f(X2) Y2_p^T (+ C_p)
// with f = relu or identity, every matrix row-major with its own row stride
// (any operand may be a view into a wider buffer). On top of problem 0 the
// repeat-add: D_0[:, seg g] += s * Z[:, g*rc + (j % rc)], Z = problem 1's D.
//   FFL : p0 = (x, W) -> y,  p1 = (x, A) + z_in -> z, repeat-add on y
//   FBL : p0 = (u, W; z, B, alpha2 = s) + res -> y
//   FFBL: p0 = FBL's y,      p1 = (u, A; z, C, alpha2 = 1) -> z'
// The grad of FFL w.r.t. x (dy W + dz A) is the FBL shape with W, A taken
// column-major ([K, n] rows): the *_t_ GEMM instances.
#pragma once
#include <cstdint>

namespace flora::cuda {

enum class Dtype : int { kBF16 = 0, kF16 = 1 };

constexpr int kMaxRepeat = 8;  // repeat-add segments one call takes

struct Problem {
  const void* y1 = nullptr;  // [n, K1]
  int64_t ldy1 = 0;
  const void* y2 = nullptr;  // [n, K2] (K2 > 0 only)
  int64_t ldy2 = 0;
  float alpha2 = 1.f;
  const void* c = nullptr;  // [M, n] added in the epilogue, or null
  int64_t ldc = 0;
  void* d = nullptr;  // [M, n] output
  int64_t ldd = 0;
  int64_t n = 0;
};

struct RepeatAdd {
  int groups = 0;  // 0: none
  int64_t rc = 0;
  float s = 0.f;
  int64_t widths[kMaxRepeat] = {};
};

struct FusedArgs {
  Dtype dt = Dtype::kBF16;
  int64_t M = 0, K1 = 0, K2 = 0;
  const void* x1 = nullptr;  // [M, K1]
  int64_t ldx1 = 0;
  const void* x2 = nullptr;  // [M, K2]
  int64_t ldx2 = 0;
  bool relu2 = false;  // f = relu on X2 (decode kernel only; GEMMs get relu(z) staged)
  Problem p[2];
  int nprob = 1;
  RepeatAdd rep;  // applied to p[0], reads p[1].d
  int sm_count = 0;  // multiprocessors of the device (grid sizing)
};

// Problem 1 alone as a call's problem 0, no repeat-add: writes the z a
// repeat-add reads, launched before y (stream order).
inline FusedArgs z_only(const FusedArgs& a) {
  FusedArgs z = a;
  z.p[0] = a.p[1];
  z.nprob = 1;
  z.rep.groups = 0;
  return z;
}

}  // namespace flora::cuda
