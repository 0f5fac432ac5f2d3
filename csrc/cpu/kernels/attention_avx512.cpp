// The decode-attention kernel compiled for AVX-512 (F/BW/VL/DQ + FMA + F16C;
// 16 fp32 lanes, 32 zmm registers): the vector body (attention_vec.inc)
// where hd is a multiple of 16 (else the AVX2 body). The dispatch in
// register.cpp calls it where the CPU has them. Target pragma after every
// include.
#include <immintrin.h>

#include <cmath>
#include <type_traits>

#include "attention.h"
#include "isa_target.h"

FLORA_ISA_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace flora::cpu::kernels {
namespace avx512 {

namespace base {
#include "vec_avx512.inc"
}  // namespace base

// the shared traits, and what the attention body needs besides
struct V : base::V {
  // 32 zmm registers: 16 accumulators, the loaded vectors beside them
  static constexpr int kScoreAcc = 16, kPvAcc = 16;
  static F set1(float x) { return _mm512_set1_ps(x); }
  static void st(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static float hmax(F a) { return _mm512_reduce_max_ps(a); }
  // out[i] = the lane sum of acc[i], i < N <= 16: four levels of a
  // shuffle-and-add transposition (halves, quarters, pairs, lanes) for all
  // sixteen, then one permutation into order.
  template <int N>
  static void reduce(const F* acc, float* out) {
    F a[16];
    for (int i = 0; i < 16; ++i) a[i] = i < N ? acc[i] : zero();
    F b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i)  // [acc 2i folded to 8 lanes | acc 2i+1]
      b[i] = add(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                 _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  // quarter q: acc 4i + q, 4 partials
      c[i] = add(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                 _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)  // quarter q: acc 8i + q (2 partials), acc 8i + 4 + q (2)
      d[i] = add(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44), _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
    // lane 4q + k: acc 4k + q
    const F e = add(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    st(out, _mm512_permutexvar_ps(idx, e));
  }
  // exp2_nonpos's steps (attention_vec.inc; see the AVX2 traits)
  static F round(F x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F pow2i(F n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static F zero_below(F lo, F x, F v) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), v); }
};

#include "attention_vec.inc"

}  // namespace avx512

void decode_attention_part_avx512(const DecodeAttentionArgs& a, int64_t i0, int64_t i1) {
  if (a.hd % avx512::W) return decode_attention_part_avx2(a, i0, i1);
  switch (a.dt) {
    case Dtype::kF32: return avx512::part_t<Dtype::kF32>(a, i0, i1);
    case Dtype::kBF16: return avx512::part_t<Dtype::kBF16>(a, i0, i1);
    default: return avx512::part_t<Dtype::kF16>(a, i0, i1);
  }
}

}  // namespace flora::cpu::kernels

FLORA_ISA_END()
