// The decode step's RMSNorm and RoPE, one pass each, with the roundings of
// the composites they replace (transformers' Llama): every intermediate the
// composite stores in the activation dtype is rounded to it here too. Pure
// C++: raw pointers, element strides, fp32 arithmetic.
#pragma once
#include <cstdint>

#include "types.h"

namespace flora::cpu::kernels {

// out[m] = w * round(x[m] * rsqrt(mean(x[m]^2) + eps)) over the first d of
// x's width columns, for rows [m0, m1) of x [M, width] (row stride ldx);
// fp32: (x * r) * w. Columns d ... width - 1 are copied unchanged (zflora's
// stream [h | z]). out is [M, width] contiguous.
void rms_norm_rows(Dtype dt, int64_t m0, int64_t m1, int64_t d, int64_t width, const void* x,
                   int64_t ldx, const void* w, float eps, void* out);

// out = round(round(x cos) + round(roll(x, hd / 2) sin)) over rows [r0, r1)
// of x viewed as [B, T, H, hd] (strides sb, st, sh; unit last stride);
// cos, sin [B, T, hd] contiguous (broadcast over H); out [B, T, H, hd]
// contiguous. Row r is (b, t, h) in row-major order.
struct RopeArgs {
  Dtype dt = Dtype::kF32;
  int64_t T = 0, H = 0, hd = 0;
  const void* x = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;
};
void rope_rows(const RopeArgs& a, int64_t r0, int64_t r1);

// A decode step's RoPE with the KV-cache write: qk [B, T, nq + nkv, hd]
// (strides sb, st, sh; unit last stride), v [B, T, nkv, hd] (vb, vt, vh),
// cos, sin as rope's. q rotated into q [B, T, nq, hd] contiguous; k rotated
// into kc[b, h, slot[t], :] and v copied into vc[b, h, slot[t], :] (cache
// strides *_b, *_h, *_l, unit last). Rows r0 ... r1 of [B, T, nq + 2 nkv].
struct RopeCacheArgs {
  Dtype dt = Dtype::kF32;
  int64_t T = 0, nq = 0, nkv = 0, hd = 0;
  const void* qk = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  const void* v = nullptr;
  int64_t vb = 0, vt = 0, vh = 0;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* q = nullptr;
  void* kc = nullptr;
  int64_t kc_b = 0, kc_h = 0, kc_l = 0;
  void* vc = nullptr;
  int64_t vc_b = 0, vc_h = 0, vc_l = 0;
  const int64_t* slot = nullptr;
};
void rope_cache_rows(const RopeCacheArgs& a, int64_t r0, int64_t r1);


}  // namespace flora::cpu::kernels
