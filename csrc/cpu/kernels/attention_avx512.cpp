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

#include "attention_v_avx512.inc"
using V = VA;

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
