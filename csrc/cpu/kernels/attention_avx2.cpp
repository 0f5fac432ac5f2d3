// The decode-attention kernel body compiled for AVX2 + FMA + F16C (the
// dispatch in register.cpp calls it where the CPU has them). Target pragma
// after every include.
#include <type_traits>

#include "attention.h"
#include "isa_target.h"

FLORA_ISA_BEGIN("avx2,fma,f16c")

namespace flora::cpu::kernels {
namespace avx2 {
#include "attention_body.inc"
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
