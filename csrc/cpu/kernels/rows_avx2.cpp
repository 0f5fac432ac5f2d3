// AVX2 + FMA + F16C rows kernel (8 fp32 lanes, 16 ymm registers: smaller
// blocks than AVX-512). Target pragma after every include.
#include <immintrin.h>

#include <cstdint>

#include "isa_target.h"
#include "rows.h"

FLORA_ISA_BEGIN("avx2,fma,f16c")

namespace flora::cpu::kernels {
namespace avx2 {

#include "vec_avx2.inc"
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
