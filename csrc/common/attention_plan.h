// Decode attention (one query row per sequence, grouped kv heads), split over
// the keys as flash-decoding does: the arguments, the split plan and the
// softmax bookkeeping, torch-free and __host__ __device__, so the CPU kernel
// (cpu/kernels/attention.*), the CUDA kernel (cuda/kernels/attention.cu) and
// the host tests (tests/cpp/test_cuda_plan.cpp) share one definition.
//
// Why split: a decode step has B x kv_heads (batch, kv head) pairs, 8 at a 1B
// Llama's batch 1, and a kernel with one CTA per pair streams the whole cache
// through 8 of an H200's 132 SMs. Splitting the keys into chunks gives every
// SM a chunk; each chunk's partial result (its running max, weight sum and
// unnormalised output) is combined afterwards. Chunks whose keys are all
// masked (left padding, slots not yet written) read nothing but the mask.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FLORA_AHD __host__ __device__ __forceinline__
#else
#define FLORA_AHD inline
#endif

namespace flora::attn {

// out[b, h] = softmax_j(q[b, h] . k[b, h / G, j] * scale + mask[b, j]) v[b, h / G, j]
// for G = nq / nkv query heads per kv head. q [B, nq, hd], k / v [B, nkv, L,
// hd] (cache views: any outer strides, unit last stride), mask [B, L]
// additive (0 or -inf in flora's decoder; any value is added), unit last
// stride, in q's dtype; out [B, nq * hd] contiguous. A row with no unmasked
// key comes out 0.
template <typename Dt>
struct DecodeAttentionArgsT {
  Dt dt{};
  int64_t B = 0, nq = 0, nkv = 0, L = 0, hd = 0;
  const void* q = nullptr;
  int64_t qb = 0, qh = 0;
  const void* k = nullptr;
  int64_t kb = 0, kh = 0, kl = 0;
  const void* v = nullptr;
  int64_t vb = 0, vh = 0, vl = 0;
  const void* mask = nullptr;
  int64_t mb = 0;
  float scale = 0.f;
  void* out = nullptr;
  // keys [s * chunk, min(L, (s + 1) * chunk)) go to split s (decode_attention_chunk)
  int64_t splits = 1, chunk = 0;
  // splits > 1: each (b, h, s)'s unnormalised output [B, nq, splits, hd] and
  // its (running max, weight sum) [B, nq, splits, 2], fp32
  float* part_o = nullptr;
  float* part_ml = nullptr;
};

constexpr int64_t kKeyTile = 128;  // keys per tile; a chunk is whole tiles
constexpr int kMaxGroup = 8;       // query heads per kv head the kernels take
constexpr float kLog2e = 1.4426950408889634f;

FLORA_AHD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How L keys split: `splits` chunks of `chunk` keys (whole tiles; the last
// may be short), for a requested count (clamped to [1, tiles]; no split is
// left empty: 7 requested of 5 tiles give 5, 4 of 10 tiles give 4 of 3 tiles).
struct SplitPlan {
  int64_t splits, chunk;
};
FLORA_AHD SplitPlan decode_attention_plan(int64_t L, int64_t requested) {
  const int64_t tiles = cdiv(L, kKeyTile);
  if (tiles <= 1) return {1, kKeyTile};
  const int64_t s = requested < 1 ? 1 : requested > tiles ? tiles : requested;
  const int64_t chunk = cdiv(tiles, s) * kKeyTile;
  return {cdiv(L, chunk), chunk};
}

// Automatic split request: one split where the B * nkv pairs already fill the
// `units` workers (SMs on CUDA, threads on the CPU); else about four chunks
// per worker (the CUDA kernel's CTAs load, reduce and load again in turn: four
// resident per SM overlap those phases), no chunk under one tile.
FLORA_AHD int64_t decode_attention_auto_splits(int64_t B, int64_t nkv, int64_t L, int64_t units) {
  const int64_t pairs = B * nkv, tiles = cdiv(L, kKeyTile);
  if (units < 1 || pairs < 1 || pairs >= units || tiles <= 1) return 1;
  const int64_t want = cdiv(4 * units, pairs);
  return want < tiles ? want : tiles;
}

// Online softmax in the log2 domain (scores carry log2(e)): a weight of score
// s under running max m, and the factor earlier sums take when the max moves
// from m_old to m_new. -inf scores weigh 0; a max still -inf (nothing seen)
// leaves sums of 0, so its factor is 0, never inf - inf.
FLORA_AHD float softmax_weight(float s, float m) { return s == -INFINITY ? 0.f : exp2f(s - m); }
FLORA_AHD float softmax_rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
}

// One output element from its splits' partials: o points at split 0's value
// of this element (splits apart by o_stride floats), ml at split 0's (m, l).
// sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s with M = max m_s; 0 where no
// split saw an unmasked key.
FLORA_AHD float decode_attention_combine(const float* o, int64_t o_stride, const float* ml, int64_t splits) {
  float M = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) M = ml[2 * s] > M ? ml[2 * s] : M;
  if (M == -INFINITY) return 0.f;
  float num = 0.f, den = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    const float w = softmax_rescale(ml[2 * s], M);
    num += w * o[s * o_stride];
    den += w * ml[2 * s + 1];
  }
  return num / den;
}

}  // namespace flora::attn
