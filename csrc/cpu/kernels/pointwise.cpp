#include "pointwise.h"

#include <cmath>

namespace flora::cpu::kernels {
namespace {

// No contraction of a * b + c * d into fused multiply-adds: each product is
// rounded, as the composites' separate ops round them.
#if defined(__GNUC__) && !defined(__clang__)
#define FLORA_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define FLORA_NO_CONTRACT
#endif

// Element access for one storage dtype (a template parameter, so each loop is
// specialised and vectorisable).
template <Dtype DT>
inline float ld(const void* p, int64_t i) {
  if constexpr (DT == Dtype::kF32) return static_cast<const float*>(p)[i];
  else if constexpr (DT == Dtype::kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}
template <Dtype DT>
inline void st(void* p, int64_t i, float v) {
  if constexpr (DT == Dtype::kF32) static_cast<float*>(p)[i] = v;
  else if constexpr (DT == Dtype::kBF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
}
// The value a store in the activation dtype keeps (fp32: itself).
template <Dtype DT>
inline float rnd(float v) {
  if constexpr (DT == Dtype::kF32) return v;
  else if constexpr (DT == Dtype::kBF16) return bf16_to_f32(f32_to_bf16(v));
  else return f16_to_f32(f32_to_f16(v));
}

template <Dtype DT>
FLORA_NO_CONTRACT void rms_norm_t(int64_t m0, int64_t m1, int64_t d, int64_t width, const void* x,
                                  int64_t ldx, const void* w, float eps, void* out) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t i = d; i < width; ++i) st<DT>(out, m * width + i, ld<DT>(x, m * ldx + i));  // exact
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) {
      const float v = ld<DT>(x, m * ldx + i);
      ss += v * v;
    }
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i)
      st<DT>(out, m * width + i, rnd<DT>(ld<DT>(x, m * ldx + i) * r) * ld<DT>(w, i));
  }
}

// One head row: out[oo ...] = round(x cos) + round(roll(x, hd / 2) sin).
template <Dtype DT>
FLORA_NO_CONTRACT inline void rope_row(const void* x, int64_t xo, const void* cos, const void* sin,
                                       int64_t co, void* out, int64_t oo, int64_t hd) {
  const int64_t half = hd / 2;
  // roll by hd / 2: the first half reads the second, the second the first
  // (two straight loops, so each vectorises)
  for (int64_t part = 0; part < 2; ++part) {
    const int64_t i0 = part * half, j0 = half - i0;
    for (int64_t k = 0; k < half; ++k) {
      const float p = rnd<DT>(ld<DT>(x, xo + i0 + k) * ld<DT>(cos, co + i0 + k));
      const float q = rnd<DT>(ld<DT>(x, xo + j0 + k) * ld<DT>(sin, co + i0 + k));
      st<DT>(out, oo + i0 + k, p + q);
    }
  }
}

template <Dtype DT>
FLORA_NO_CONTRACT void rope_t(const RopeArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t h = r % a.H, bt = r / a.H, t = bt % a.T, b = bt / a.T;
    rope_row<DT>(a.x, b * a.sb + t * a.st + h * a.sh, a.cos, a.sin, bt * a.hd, a.out, r * a.hd, a.hd);
  }
}

// Rows (b, t, h), h over q's heads, k's, then v's: q rotated into out, k
// rotated and v as is into their caches at slot[t].
template <Dtype DT>
FLORA_NO_CONTRACT void rope_cache_t(const RopeCacheArgs& a, int64_t r0, int64_t r1) {
  const int64_t H = a.nq + 2 * a.nkv;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t h = r % H, bt = r / H, t = bt % a.T, b = bt / a.T, s = a.slot[t];
    if (h < a.nq) {
      rope_row<DT>(a.qk, b * a.sb + t * a.st + h * a.sh, a.cos, a.sin, bt * a.hd, a.q,
                   (bt * a.nq + h) * a.hd, a.hd);
    } else if (h < a.nq + a.nkv) {
      rope_row<DT>(a.qk, b * a.sb + t * a.st + h * a.sh, a.cos, a.sin, bt * a.hd, a.kc,
                   b * a.kc_b + (h - a.nq) * a.kc_h + s * a.kc_l, a.hd);
    } else {
      const int64_t hv = h - a.nq - a.nkv, vo = b * a.vb + t * a.vt + hv * a.vh;
      const int64_t oo = b * a.vc_b + hv * a.vc_h + s * a.vc_l;
      for (int64_t i = 0; i < a.hd; ++i) st<DT>(a.vc, oo + i, ld<DT>(a.v, vo + i));  // exact
    }
  }
}

}  // namespace

void rms_norm_rows(Dtype dt, int64_t m0, int64_t m1, int64_t d, int64_t width, const void* x,
                   int64_t ldx, const void* w, float eps, void* out) {
  switch (dt) {
    case Dtype::kF32: return rms_norm_t<Dtype::kF32>(m0, m1, d, width, x, ldx, w, eps, out);
    case Dtype::kBF16: return rms_norm_t<Dtype::kBF16>(m0, m1, d, width, x, ldx, w, eps, out);
    default: return rms_norm_t<Dtype::kF16>(m0, m1, d, width, x, ldx, w, eps, out);
  }
}

void rope_rows(const RopeArgs& a, int64_t r0, int64_t r1) {
  switch (a.dt) {
    case Dtype::kF32: return rope_t<Dtype::kF32>(a, r0, r1);
    case Dtype::kBF16: return rope_t<Dtype::kBF16>(a, r0, r1);
    default: return rope_t<Dtype::kF16>(a, r0, r1);
  }
}

void rope_cache_rows(const RopeCacheArgs& a, int64_t r0, int64_t r1) {
  switch (a.dt) {
    case Dtype::kF32: return rope_cache_t<Dtype::kF32>(a, r0, r1);
    case Dtype::kBF16: return rope_cache_t<Dtype::kBF16>(a, r0, r1);
    default: return rope_cache_t<Dtype::kF16>(a, r0, r1);
  }
}

}  // namespace flora::cpu::kernels
