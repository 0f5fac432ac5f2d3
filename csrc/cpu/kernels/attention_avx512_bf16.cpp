// The decode-attention kernel for bf16 where the CPU has AVX512_BF16: the
// AVX-512 vector body (attention_vec.inc) with the scores' q . k products by
// VDPBF16PS (32 bf16 products a step, summed in pairs into the fp32
// accumulators: each product is exact in fp32, so these are fp32 sums of the
// same products as with K widened first, in another order), for half the K
// loads, no widening and half the multiply-adds: 0.85-0.97x the call's time
// where the window is in the cache (bench/RESULTS.md, "Decode attention").
// hd a multiple of 32; else, and for fp32 / fp16, the plain AVX-512 body.
// Separate file so the other AVX-512 code never carries the avx512_bf16
// target. Target pragma after every include.
#include <immintrin.h>

#include <cmath>
#include <type_traits>

#include "attention.h"
#include "isa_target.h"

FLORA_ISA_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

namespace flora::cpu::kernels {
namespace avx512_bf16 {

namespace base {
#include "vec_avx512.inc"
}  // namespace base

#include "attention_v_avx512.inc"

struct V : VA {
  static constexpr bool kBf16Dot = true;
  using P = __m512bh;  // 32 bf16: W pairs
  static P ld_pairs(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  // acc[j] += a[2j] b[2j] + a[2j+1] b[2j+1] (denormal inputs and results flushed to 0)
  static F dot_pairs(F acc, P a, P b) { return _mm512_dpbf16_ps(acc, a, b); }
};

#include "attention_vec.inc"

}  // namespace avx512_bf16

void decode_attention_part_avx512_bf16(const DecodeAttentionArgs& a, int64_t i0, int64_t i1) {
  if (a.dt != Dtype::kBF16 || a.hd % (2 * avx512_bf16::W)) return decode_attention_part_avx512(a, i0, i1);
  avx512_bf16::part_t<Dtype::kBF16>(a, i0, i1);
}

}  // namespace flora::cpu::kernels

FLORA_ISA_END()
