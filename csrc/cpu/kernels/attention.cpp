#include "attention.h"

#include <type_traits>

namespace flora::cpu::kernels {
namespace generic {
#include "attention_body.inc"
}  // namespace generic

template <typename Part>
static void by_dtype(const DecodeAttentionArgs& a, Part f) {
  switch (a.dt) {
    case Dtype::kF32: return f(std::integral_constant<Dtype, Dtype::kF32>{});
    case Dtype::kBF16: return f(std::integral_constant<Dtype, Dtype::kBF16>{});
    default: return f(std::integral_constant<Dtype, Dtype::kF16>{});
  }
}

void decode_attention_part(const DecodeAttentionArgs& a, int64_t i0, int64_t i1, AttentionIsa isa) {
  if (isa == AttentionIsa::kAvx512Bf16) return decode_attention_part_avx512_bf16(a, i0, i1);
  if (isa == AttentionIsa::kAvx512) return decode_attention_part_avx512(a, i0, i1);
  if (isa == AttentionIsa::kAvx2) return decode_attention_part_avx2(a, i0, i1);
  by_dtype(a, [&](auto dt) { generic::part_t<decltype(dt)::value>(a, i0, i1); });
}

void decode_attention_combine(const DecodeAttentionArgs& a, int64_t r0, int64_t r1) {
  by_dtype(a, [&](auto dt) { generic::combine_t<decltype(dt)::value>(a, r0, r1); });
}

}  // namespace flora::cpu::kernels
