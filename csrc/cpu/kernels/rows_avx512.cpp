// AVX-512 (F/BW/VL/DQ + FMA + F16C) rows kernel; bf16 converts to fp32.
// The target pragma comes after every include so no library code is
// compiled for AVX-512 (this file only runs where cpuid says it may).
#include <immintrin.h>

#include <cstdint>

#include "isa_target.h"
#include "rows.h"

FLORA_ISA_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace flora::cpu::kernels {
namespace avx512 {

#include "vec_avx512.inc"

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

FLORA_ISA_END()
