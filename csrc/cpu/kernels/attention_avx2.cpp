// The decode-attention kernel compiled for AVX2 + FMA + F16C (8 fp32 lanes,
// 16 ymm registers): the vector body (attention_vec.inc) where hd is a
// multiple of 8. The dispatch in register.cpp calls it where the CPU has
// them. Target pragma after every include.
#include <immintrin.h>

#include <cmath>
#include <type_traits>

#include "attention.h"
#include "isa_target.h"

FLORA_ISA_BEGIN("avx2,fma,f16c")

namespace flora::cpu::kernels {
namespace avx2 {

namespace base {
#include "vec_avx2.inc"
}  // namespace base

// the shared traits, and what the attention body needs besides
struct V : base::V {
  // 16 ymm registers: 8 accumulators, the loaded vectors beside them
  static constexpr int kScoreAcc = 8, kPvAcc = 8;
  static constexpr bool kBf16Dot = false;  // bf16 scores widened to fp32 (attention_vec.inc)
  static F set1(float x) { return _mm256_set1_ps(x); }
  static void st(float* p, F a) { _mm256_storeu_ps(p, a); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static float hmax(F a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[i] = the lane sum of acc[i], i < N <= 8: three hadd levels and one
  // 128-bit swap for all eight (9 instructions, not 8 horizontal sums).
  template <int N>
  static void reduce(const F* acc, float* out) {
    F a[8];
    for (int i = 0; i < 8; ++i) a[i] = i < N ? acc[i] : zero();
    const F h0 = _mm256_hadd_ps(a[0], a[1]), h1 = _mm256_hadd_ps(a[2], a[3]);
    const F h2 = _mm256_hadd_ps(a[4], a[5]), h3 = _mm256_hadd_ps(a[6], a[7]);
    const F g0 = _mm256_hadd_ps(h0, h1), g1 = _mm256_hadd_ps(h2, h3);  // [acc 0-3 | 0-3], [4-7 | 4-7]
    st(out, _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31)));
  }
  // exp2_nonpos's steps (attention_vec.inc)
  static F round(F x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F pow2i(F n) {  // 2^n for an integral n in [-126, 0]
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static F zero_below(F lo, F x, F v) { return _mm256_and_ps(v, _mm256_cmp_ps(x, lo, _CMP_NLT_UQ)); }  // NaN x: v
};

#include "attention_vec.inc"

}  // namespace avx2

void decode_attention_part_avx2(const DecodeAttentionArgs& a, int64_t i0, int64_t i1) {
  switch (a.dt) {
    case Dtype::kF32: return avx2::part_t<Dtype::kF32>(a, i0, i1);
    case Dtype::kBF16: return avx2::part_t<Dtype::kBF16>(a, i0, i1);
    default: return avx2::part_t<Dtype::kF16>(a, i0, i1);
  }
}

}  // namespace flora::cpu::kernels

FLORA_ISA_END()
