// AVX-512 (F/BW/VL/DQ + FMA + F16C) rows kernel; bf16 converts to fp32.
// The target pragma comes after every include so no library code is
// compiled for AVX-512 (this file only runs where cpuid says it may).
#include <immintrin.h>

#include <cstdint>

#include "rows.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
// GCC 12's intrinsic headers trip these with _mm*_undefined_* (false alarms).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif

namespace flora::cpu::kernels {
namespace avx512 {

struct V {
  using F = __m512;
  static constexpr int W = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(F a) { return _mm512_reduce_add_ps(a); }
  static F ld(const float* p) { return _mm512_loadu_ps(p); }
  static F ld_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F ld_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};
constexpr int kNB1 = 8, kNB = 4, kMB = 4;

#include "rows_body.inc"

}  // namespace avx512

void rows_avx512_bf16dot(const RowsTask& t, int64_t i0, int64_t i1);

void rows_avx512(const RowsTask& t, int64_t i0, int64_t i1, bool bf16_dot) {
  switch (t.dt) {
    case Dtype::kF32: avx512::rows_impl<avx512::StepF32>(t, i0, i1); break;
    case Dtype::kBF16:
      if (bf16_dot)
        rows_avx512_bf16dot(t, i0, i1);
      else
        avx512::rows_impl<avx512::StepBF16>(t, i0, i1);
      break;
    case Dtype::kF16: avx512::rows_impl<avx512::StepF16>(t, i0, i1); break;
  }
}

}  // namespace flora::cpu::kernels

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
