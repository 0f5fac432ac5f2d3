// AVX2 + FMA + F16C rows kernel (8 fp32 lanes, 16 ymm registers: smaller
// blocks than AVX-512). Target pragma after every include.
#include <immintrin.h>

#include <cstdint>

#include "isa_target.h"
#include "rows.h"

FLORA_ISA_BEGIN("avx2,fma,f16c")

namespace flora::cpu::kernels {
namespace avx2 {

struct V {
  using F = __m256;
  static constexpr int W = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static F ld(const float* p) { return _mm256_loadu_ps(p); }
  static F ld_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F ld_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
constexpr int kNB1 = 8, kNB1h = 8, kNB = 4, kMB = 2;  // 16 ymm registers: no room for more rows

#include "rows_body.inc"

}  // namespace avx2

void rows_avx2(const RowsTask& t, int64_t i0, int64_t i1) {
  switch (t.dt) {
    case Dtype::kF32: avx2::rows_impl<avx2::StepF32>(t, i0, i1); break;
    case Dtype::kBF16: avx2::rows_impl<avx2::StepBF16>(t, i0, i1); break;
    case Dtype::kF16: avx2::rows_impl<avx2::StepF16>(t, i0, i1); break;
  }
}

}  // namespace flora::cpu::kernels

FLORA_ISA_END()
