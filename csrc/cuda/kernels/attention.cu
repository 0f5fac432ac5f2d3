// Decode attention split over the keys (flash-decoding): one CTA per (key
// chunk, kv head, sequence) computes the chunk for all the kv head's query
// heads, so each key and value row is read once per step, not once per query
// head; a second launch combines the chunks (common/attention_plan.h).
// Per 128-key tile: each thread scores one key against the group's queries
// (q in shared memory, scaled into the log2 domain), one warp per query head
// moves the running max and turns scores into weights, then the threads
// stream the value rows as 16-byte vectors (hd / 8 threads a row) into
// per-thread fp32 accumulators. Masked keys (left padding, unwritten slots)
// are never loaded.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace flora::cuda {
namespace {

using attn::kKeyTile;
using attn::kLog2e;
using attn::kMaxGroup;

constexpr int kThreads = 128;  // one key per thread in the score pass
constexpr int kWarps = kThreads / 32;
constexpr int kBatch = 4;  // value rows per thread whose loads are in flight together
static_assert(kThreads == kKeyTile, "the score pass gives each thread one key of a tile");

// bf16 / fp16 element conversions, overloaded on the type (one Vec8 for both)
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ __forceinline__ float2 to_f2(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float to_f(__nv_bfloat16 h) { return __bfloat162float(h); }
__device__ __forceinline__ float to_f(__half h) { return __half2float(h); }
__device__ __forceinline__ void from_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_f(__half* p, float v) { *p = __float2half_rn(v); }
template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};
template <>
struct Pair<__half> {
  using type = __half2;
};

// 8 elements of one 16-byte vector as floats; one element; a store.
template <typename T>
struct Vec8 {
  static __device__ __forceinline__ uint4 raw(const void* p) { return __ldg(static_cast<const uint4*>(p)); }
  static __device__ __forceinline__ void unpack(const uint4& u, float* f) {
    const auto* h = reinterpret_cast<const typename Pair<T>::type*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = to_f2(h[i]);
      f[2 * i] = t.x, f[2 * i + 1] = t.y;
    }
  }
  static __device__ __forceinline__ float one(const void* p, int64_t i) { return to_f(static_cast<const T*>(p)[i]); }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) { from_f(static_cast<T*>(p) + i, v); }
};

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads, 3) decode_attention_kernel(DecodeAttentionArgs a) {
  constexpr int kVecs = HD / 8;                // 16-byte vectors per row
  constexpr int kRowsPar = kThreads / kVecs;   // value rows in flight per pass
  using V = Vec8<T>;
  const int64_t sp = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int G = static_cast<int>(a.nq / a.nkv);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t j0 = sp * a.chunk, j1 = j0 + a.chunk < a.L ? j0 + a.chunk : a.L;

  __shared__ __align__(16) float q_s[kMaxGroup][HD];
  __shared__ float p_s[kMaxGroup][kKeyTile];  // scores, then weights
  __shared__ bool valid_s[kKeyTile];
  __shared__ float m_s[kMaxGroup], l_s[kMaxGroup], r_s[kMaxGroup];
  __shared__ __align__(16) float red[kWarps][kMaxGroup * HD];

  const float qscale = a.scale * kLog2e;
  for (int e = tid; e < G * HD; e += kThreads) {
    const int i = e / HD, d = e % HD;
    q_s[i][d] = V::one(a.q, b * a.qb + (hk * G + i) * a.qh + d) * qscale;
  }
  if (tid < kMaxGroup) m_s[tid] = -INFINITY, l_s[tid] = 0.f;

  const int c = tid % kVecs, r = tid / kVecs;  // value pass: vector c of rows r, r + kRowsPar, ...
  float acc[kMaxGroup][8];
#pragma unroll
  for (int i = 0; i < kMaxGroup; ++i)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;

  const char* kbase = static_cast<const char*>(a.k) + (b * a.kb + hk * a.kh) * static_cast<int64_t>(sizeof(T));
  const char* vbase = static_cast<const char*>(a.v) + (b * a.vb + hk * a.vh) * static_cast<int64_t>(sizeof(T));
  __syncthreads();

  for (int64_t t0 = j0; t0 < j1; t0 += kKeyTile) {
    // scores: thread tid takes key t0 + tid
    {
      const int64_t j = t0 + tid;
      const float mk = j < j1 ? V::one(a.mask, b * a.mb + j) : -INFINITY;
      const bool valid = mk != -INFINITY;
      float sc[kMaxGroup];
#pragma unroll
      for (int i = 0; i < kMaxGroup; ++i) sc[i] = 0.f;
      if (valid) {
        // the row's kVecs loads all in flight before the arithmetic (one thread, one row)
        const char* krow = kbase + j * a.kl * static_cast<int64_t>(sizeof(T));
        uint4 kr[kVecs];
#pragma unroll
        for (int vv = 0; vv < kVecs; ++vv) kr[vv] = V::raw(krow + vv * 16);
#pragma unroll
        for (int vv = 0; vv < kVecs; ++vv) {
          float kf[8];
          V::unpack(kr[vv], kf);
#pragma unroll
          for (int i = 0; i < kMaxGroup; ++i) {
            if (i < G) {
              const float4 qa = *reinterpret_cast<const float4*>(&q_s[i][vv * 8]);
              const float4 qb = *reinterpret_cast<const float4*>(&q_s[i][vv * 8 + 4]);
              sc[i] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] +
                       qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kMaxGroup; ++i)
        if (i < G) p_s[i][tid] = valid ? sc[i] + mk * kLog2e : -INFINITY;
      valid_s[tid] = valid;
    }
    __syncthreads();
    // running max and weights: warp w takes query heads w, w + kWarps
    for (int i = warp; i < G; i += kWarps) {
      float mx = -INFINITY;
      for (int j = lane; j < kKeyTile; j += 32) mx = fmaxf(mx, p_s[i][j]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float mold = m_s[i], mnew = fmaxf(mold, mx);
      float sum = 0.f;
      for (int j = lane; j < kKeyTile; j += 32) {
        const float w = attn::softmax_weight(p_s[i][j], mnew);
        p_s[i][j] = w;
        sum += w;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      __syncwarp();
      if (lane == 0) {
        const float rs = attn::softmax_rescale(mold, mnew);
        r_s[i] = rs, l_s[i] = l_s[i] * rs + sum, m_s[i] = mnew;
      }
    }
    __syncthreads();
    // values: rescale the running sums, add this tile's weighted rows
#pragma unroll
    for (int i = 0; i < kMaxGroup; ++i) {
      if (i < G) {
        const float rs = r_s[i];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] *= rs;
      }
    }
    // kBatch rows' loads in flight before their FMAs; a masked or past-the-end row loads
    // nothing (zeros) and its weight is 0 (p_s), so it adds nothing
    const char* vtile = vbase + t0 * a.vl * static_cast<int64_t>(sizeof(T)) + c * 16;
#pragma unroll
    for (int r0 = 0; r0 < kKeyTile / kRowsPar; r0 += kBatch) {
      uint4 vr[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int jj = r + (r0 + u) * kRowsPar;
        vr[u] = valid_s[jj] ? V::raw(vtile + jj * a.vl * static_cast<int64_t>(sizeof(T))) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int jj = r + (r0 + u) * kRowsPar;
        float vf[8];
        V::unpack(vr[u], vf);
#pragma unroll
        for (int i = 0; i < kMaxGroup; ++i) {
          if (i < G) {
            const float w = p_s[i][jj];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[i][e] += w * vf[e];
          }
        }
      }
    }
    __syncthreads();  // p_s, valid_s, r_s are the next tile's
  }

  // the row groups' sums: lanes of one vector column within a warp, then warps
#pragma unroll
  for (int i = 0; i < kMaxGroup; ++i)
    if (i < G)  // G is the same in every lane
#pragma unroll
      for (int e = 0; e < 8; ++e)
#pragma unroll
        for (int off = kVecs; off < 32; off <<= 1) acc[i][e] += __shfl_xor_sync(0xffffffffu, acc[i][e], off);
  if (lane < kVecs) {
#pragma unroll
    for (int i = 0; i < kMaxGroup; ++i)
      if (i < G)
#pragma unroll
        for (int e = 0; e < 8; ++e) red[warp][i * HD + c * 8 + e] = acc[i][e];
  }
  __syncthreads();
  for (int e = tid; e < G * HD; e += kThreads) {
    const int i = e / HD, d = e % HD;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += red[w][e];
    const int64_t h = hk * G + i;
    if (a.splits == 1) {
      V::store(a.out, (b * a.nq + h) * HD + d, l_s[i] > 0.f ? o / l_s[i] : 0.f);
    } else {
      const int64_t p = (b * a.nq + h) * a.splits + sp;
      a.part_o[p * HD + d] = o;
      if (d == 0) a.part_ml[2 * p] = m_s[i], a.part_ml[2 * p + 1] = l_s[i];
    }
  }
}

// One CTA per (sequence, query head), one thread per output element.
template <typename T>
__global__ void decode_attention_combine_kernel(DecodeAttentionArgs a) {
  const int64_t row = blockIdx.x, d = threadIdx.x;  // blockDim.x == hd
  const float o = attn::decode_attention_combine(a.part_o + row * a.splits * a.hd + d, a.hd,
                                                 a.part_ml + 2 * row * a.splits, a.splits);
  Vec8<T>::store(a.out, row * a.hd + d, o);
}

template <typename T>
cudaError_t run(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.nkv), static_cast<unsigned>(a.B));
  if (a.hd == 64) decode_attention_kernel<T, 64><<<grid, kThreads, 0, stream>>>(a);
  else decode_attention_kernel<T, 128><<<grid, kThreads, 0, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || a.splits == 1) return e;
  decode_attention_combine_kernel<T><<<static_cast<unsigned>(a.B * a.nq), static_cast<unsigned>(a.hd), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool decode_attention_takes(const DecodeAttentionArgs& a) {
  const int64_t G = a.nkv > 0 ? a.nq / a.nkv : 0;
  // 16-byte rows: every stride a multiple of 8 elements (a size-1 dimension's never steps)
  const auto v8 = [](int64_t stride, int64_t size) { return size <= 1 || stride % 8 == 0; };
  return (a.dt == PointwiseDtype::kBF16 || a.dt == PointwiseDtype::kF16) && (a.hd == 64 || a.hd == 128) &&
         G >= 1 && G <= kMaxGroup && G * a.nkv == a.nq && a.nkv <= 65535 && a.B <= 65535 &&
         a.B * a.nq <= 0x7fffffff && v8(a.kl, a.L) && v8(a.vl, a.L) && v8(a.kb, a.B) && v8(a.vb, a.B) &&
         v8(a.kh, a.nkv) && v8(a.vh, a.nkv) &&
         reinterpret_cast<uintptr_t>(a.k) % 16 == 0 && reinterpret_cast<uintptr_t>(a.v) % 16 == 0;
}

cudaError_t decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  if (!decode_attention_takes(a)) return cudaErrorNotSupported;
  if (a.B == 0 || a.nq == 0 || a.L == 0) return cudaSuccess;
  return a.dt == PointwiseDtype::kBF16 ? run<__nv_bfloat16>(a, stream) : run<__half>(a, stream);
}

}  // namespace flora::cuda
