// Decode attention on the CPU: one query row per sequence, grouped kv heads,
// keys split into chunks (common/attention_plan.h). Pure C++: raw pointers,
// element strides, fp32 arithmetic.
#pragma once
#include <cstdint>

#include "../../common/attention_plan.h"
#include "types.h"

namespace flora::cpu::kernels {

using DecodeAttentionArgs = ::flora::attn::DecodeAttentionArgsT<Dtype>;

// Work items [i0, i1) of B * nkv * splits, item (b, kv head, split) in
// row-major order: the split's keys for the kv head's G query heads, written
// to out (splits == 1) or to the partials. hd <= kMaxHeadDim, G <= kMaxGroup.
// isa: which body runs (the caller checks the CPU): kGeneric the scalar
// loops (attention_body.inc), kAvx2 / kAvx512 the vector body
// (attention_vec.inc) compiled for AVX2 + FMA + F16C / AVX-512 (an hd not a
// multiple of 16 takes AVX2's), kAvx512Bf16 AVX-512's with bf16 scores by
// VDPBF16PS (avx512_bf16; for bf16 at an hd that is a multiple of 32, else
// AVX-512's).
constexpr int64_t kMaxHeadDim = 256;

// 2^x for x <= 0 in the softmax (exp2_nonpos in each body: x = n + f, f in
// [-1/2, 1/2], 2^n into the exponent bits): 2^f by Cephes' exp2f polynomial
// (relative error ~1e-7), highest power first for Horner's rule. One table
// for the scalar and the vector bodies; each ISA evaluates it with its own
// instructions (code written outside a file's target region would be
// compiled without its ISA). Below kExp2Min (and -inf): 0.
inline constexpr float kExp2Poly[] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                      5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.f};
inline constexpr int kExp2Terms = sizeof(kExp2Poly) / sizeof(kExp2Poly[0]);
inline constexpr float kExp2Min = -126.f;
enum class AttentionIsa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
void decode_attention_part(const DecodeAttentionArgs& a, int64_t i0, int64_t i1, AttentionIsa isa);
void decode_attention_part_avx2(const DecodeAttentionArgs& a, int64_t i0, int64_t i1);
void decode_attention_part_avx512(const DecodeAttentionArgs& a, int64_t i0, int64_t i1);
void decode_attention_part_avx512_bf16(const DecodeAttentionArgs& a, int64_t i0, int64_t i1);

// Rows [r0, r1) of B * nq: the partials of every split into out (splits > 1).
void decode_attention_combine(const DecodeAttentionArgs& a, int64_t r0, int64_t r1);

}  // namespace flora::cpu::kernels
