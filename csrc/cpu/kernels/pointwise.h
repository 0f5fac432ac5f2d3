// The decode step's RMSNorm and RoPE, one pass each, with the roundings of
// the composites they replace (transformers' Llama): every intermediate the
// composite stores in the activation dtype is rounded to it here too. Pure
// C++: raw pointers, element strides, fp32 arithmetic.
#pragma once
#include <cstdint>

#include "../../common/pointwise_args.h"
#include "types.h"

namespace flora::cpu::kernels {

// out[m] = w * round(x[m] * rsqrt(mean(x[m]^2) + eps)) over the first d of
// x's width columns, for rows [m0, m1) of x [M, width] (row stride ldx);
// fp32: (x * r) * w. Columns d ... width - 1 are copied unchanged (zflora's
// stream [h | z]). out is [M, width] contiguous.
void rms_norm_rows(Dtype dt, int64_t m0, int64_t m1, int64_t d, int64_t width, const void* x,
                   int64_t ldx, const void* w, float eps, void* out);

// RoPE over rows [r0, r1) of x viewed as [B, T, H, hd] (RopeArgsT,
// common/pointwise_args.h; B unused); out [B, T, H, hd] contiguous. Row r is
// (b, t, h) in row-major order.
using RopeArgs = ::flora::RopeArgsT<Dtype>;
void rope_rows(const RopeArgs& a, int64_t r0, int64_t r1);

// A decode step's RoPE with the KV-cache write (RopeCacheArgsT), rows r0 ...
// r1 of [B, T, nq + 2 nkv]: q's heads, then k's, then v's.
using RopeCacheArgs = ::flora::RopeCacheArgsT<Dtype>;
void rope_cache_rows(const RopeCacheArgs& a, int64_t r0, int64_t r1);


}  // namespace flora::cpu::kernels
