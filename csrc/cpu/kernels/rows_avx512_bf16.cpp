// AVX-512 rows kernel for bf16 with VDPBF16PS (avx512_bf16): 32 bf16
// products per instruction into fp32 accumulators. Separate file so the
// other AVX-512 code never carries the avx512_bf16 target.
#include <immintrin.h>

#include <cstdint>

#include "isa_target.h"
#include "rows.h"

FLORA_ISA_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

namespace flora::cpu::kernels {
namespace avx512_bf16 {

#include "vec_avx512.inc"

#include "rows_body.inc"

// bf16 pairs: acc[j] += a[2j] b[2j] + a[2j+1] b[2j+1], 32 elements a step.
struct StepBF16Dot {
  using E = uint16_t;
  using X = __m512bh;
  static constexpr int S = 32;
  static X ld(const E* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static V::F ldf(const E* p) { return V::ld_bf16(p); }
  static V::F mad(V::F acc, X a, X b) { return _mm512_dpbf16_ps(acc, a, b); }
  static float cvt(E e) { return bf16_to_f32(e); }
};

}  // namespace avx512_bf16

void rows_avx512_bf16dot(const RowsTask& t, int64_t i0, int64_t i1) {
  avx512_bf16::rows_impl<avx512_bf16::StepBF16Dot>(t, i0, i1);
}

}  // namespace flora::cpu::kernels

FLORA_ISA_END()
