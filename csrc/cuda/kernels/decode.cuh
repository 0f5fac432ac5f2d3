// Decode kernel (M <= 16): memory-bound, so it is written for bytes in
// flight, not FLOPs. Each CTA (8 warps) owns ROWS output columns of one
// problem; its warps split K (k-step w, w + 8, ...), each lane streaming
// 16-byte vectors of the ROWS weight rows and of the M activation rows,
// accumulating in fp32. Lanes reduce with a halving butterfly (V - 1
// shuffles), warps through shared memory, and the epilogue (C add, repeat-
// add, store) runs on one thread per output. The short second K segment
// (the adapter state z, R <= 256 columns) is read with scalar loads, so z
// and B need no alignment; X1 and Y1 need 16-byte rows (plan: dispatch.h).
// The index logic lives in plan.h (host-tested).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "args.h"
#include "plan.h"

namespace flora::cuda::decode {

template <typename T>
struct Conv;
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float2 f2(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  }
  static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 to(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ float2 f2(uint32_t v) {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
  static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half to(float v) { return __float2half_rn(v); }
};

// 8 elements at p[k0 ..], zero beyond K: one 16-byte load when all are in
// range (rows are 16-byte aligned: checked by the dispatcher), else scalars.
// Weights stream once: no L1 allocation (ld.global.nc.L1::no_allocate).
template <typename T, bool kStream>
__device__ __forceinline__ uint4 load8(const T* p, int64_t k0, int64_t K) {
  const int v = plan::vec_valid(k0, K);
  if (v == plan::kVec) {
    const uint4* q = reinterpret_cast<const uint4*>(p + k0);
    if constexpr (kStream) {
      uint4 r;
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                   : "l"(q));
      return r;
    } else {
      return __ldg(q);
    }
  }
  // Tail: compile-time element indices keep r in registers.
  T e[plan::kVec];
#pragma unroll
  for (int j = 0; j < plan::kVec; ++j) e[j] = j < v ? p[k0 + j] : T(0.f);
  uint4 r;
  memcpy(&r, e, sizeof(r));
  return r;
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 t = Conv<T>::f2(w[j]);
    f[2 * j] = t.x;
    f[2 * j + 1] = t.y;
  }
}

// One stage of the halving butterfly per instantiation (compile-time value
// indices keep acc in registers).
template <int V, int S>
__device__ __forceinline__ void butterfly(float* acc, int lane) {
  if constexpr (S < 5) {
    constexpr int off = 16 >> S, cur = V >> S;
    if constexpr (cur > 1) {
      const bool upper = (lane & off) != 0;
#pragma unroll
      for (int i = 0; i < cur / 2; ++i) {
        const float send = upper ? acc[i] : acc[i + cur / 2];
        const float keep = upper ? acc[i + cur / 2] : acc[i];
        acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
      }
    } else {
      acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], off);
    }
    butterfly<V, S + 1>(acc, lane);
  }
}

template <typename T, int MT, int ROWS>
__global__ void __launch_bounds__(plan::kDecodeWarps * 32)
    decode_kernel(const FusedArgs a) {
  constexpr int V = MT * ROWS;  // values per lane: idx = m * ROWS + r
  __shared__ float red[plan::kDecodeWarps][V];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const plan::BlockTask task = plan::decode_block_task(blockIdx.x, a.p[0].n, ROWS);
  // By value: a dynamic index into the kernel parameters would copy them to
  // local memory.
  const Problem P = task.prob == 0 ? a.p[0] : a.p[1];
  const T* X1 = static_cast<const T*>(a.x1);
  const T* Y1 = static_cast<const T*>(P.y1);
  const int64_t M = a.M;

  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;

  // Row pointers, clamped to the last valid row (its loads are discarded) so
  // the loop body has no per-row predicate.
  const T* yrow[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t row = task.row0 + r < P.n ? task.row0 + r : P.n - 1;
    yrow[r] = Y1 + row * P.ldy1;
  }

  // Segment 1: K1 in k-steps of 256; 16-byte vectors.
  // Unrolled by 2 for M <= 4: the next step's weight loads issue before this
  // step's math, doubling the bytes in flight when a warp has several steps
  // (larger M has the x loads' ILP already, and spilled with it on sm_80).
  const int64_t ksteps = plan::ceil_div(a.K1, plan::kKStep);
#pragma unroll(MT <= 4 ? 2 : 1)
  for (int64_t ks = warp; ks < ksteps; ks += plan::kDecodeWarps) {
    const int64_t k0 = ks * plan::kKStep + lane * plan::kVec;
    uint4 wv[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) wv[r] = load8<T, true>(yrow[r], k0, a.K1);
    float wf[ROWS][8];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) unpack8<T>(wv[r], wf[r]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float xf[8];
        unpack8<T>(load8<T, false>(X1 + m * a.ldx1, k0, a.K1), xf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) s = fmaf(xf[j], wf[r][j], s);
          acc[m * ROWS + r] += s;
        }
      }
    }
  }

  // Segment 2: the adapter state (K2 <= a few hundred), scalar loads, lanes
  // along k, warps round-robin over 32-wide chunks.
  if (a.K2 > 0) {
    const T* X2 = static_cast<const T*>(a.x2);
    const T* Y2 = static_cast<const T*>(P.y2);
    const int64_t chunks = plan::ceil_div(a.K2, 32);
    for (int64_t c = warp; c < chunks; c += plan::kDecodeWarps) {
      const int64_t k = c * 32 + lane;
      if (k < a.K2) {
        float wf[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const int64_t row = task.row0 + r < P.n ? task.row0 + r : P.n - 1;
          wf[r] = Conv<T>::f(Y2[row * P.ldy2 + k]);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            float xv = Conv<T>::f(X2[m * a.ldx2 + k]);
            if (a.relu2) xv = fmaxf(xv, 0.f);
            xv *= P.alpha2;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[m * ROWS + r] = fmaf(xv, wf[r], acc[m * ROWS + r]);
          }
        }
      }
    }
  }

  // Lanes: halving butterfly (plan::butterfly_index says who holds what).
  butterfly<V, 0>(acc, lane);
  constexpr int kSlots = (V >> 5) > 0 ? (V >> 5) : 1;
  if (plan::butterfly_owner(lane, V)) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) red[warp][plan::butterfly_index(lane, i, V)] = acc[i];
  }
  __syncthreads();

  // Warps, then the epilogue: one thread per (m, r).
  for (int idx = threadIdx.x; idx < V; idx += blockDim.x) {
    const int m = idx / ROWS, r = idx % ROWS;
    const int64_t col = task.row0 + r;
    if (m >= M || col >= P.n) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < plan::kDecodeWarps; ++w) v += red[w][idx];
    if (P.c) v += Conv<T>::f(static_cast<const T*>(P.c)[m * P.ldc + col]);
    if (task.prob == 0 && a.rep.groups > 0) {
      const int64_t src = plan::repeat_src_col(col, a.rep);
      if (src >= 0) {
        const T* Z = static_cast<const T*>(a.p[1].d);
        v = fmaf(a.rep.s, Conv<T>::f(Z[m * a.p[1].ldd + src]), v);
      }
    }
    static_cast<T*>(P.d)[m * P.ldd + col] = Conv<T>::to(v);
  }
}

template <typename T, int MT>
cudaError_t launch_rows(const FusedArgs& a, int rows, cudaStream_t stream) {
  const int64_t grid = plan::decode_grid(a.p[0].n, a.p[1].n, a.nprob, rows);
  if (grid <= 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 block(plan::kDecodeWarps * 32);
  switch (rows) {
    case 4: decode_kernel<T, MT, 4><<<static_cast<unsigned>(grid), block, 0, stream>>>(a); break;
    case 2: decode_kernel<T, MT, 2><<<static_cast<unsigned>(grid), block, 0, stream>>>(a); break;
    default: decode_kernel<T, MT, 1><<<static_cast<unsigned>(grid), block, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_one(const FusedArgs& a, cudaStream_t stream) {
  const int64_t total = a.p[0].n + (a.nprob > 1 ? a.p[1].n : 0);
  const int rows = plan::decode_rows_per_cta(total, a.sm_count, a.M);
  switch (plan::decode_m_tile(a.M)) {
    case 1: return launch_rows<T, 1>(a, rows, stream);
    case 2: return launch_rows<T, 2>(a, rows, stream);
    case 4: return launch_rows<T, 4>(a, rows, stream);
    case 8: return launch_rows<T, 8>(a, rows, stream);
    default: return launch_rows<T, 16>(a, rows, stream);
  }
}

// The repeat-add reads z (problem 1's output) across CTAs: z goes first in
// its own launch, then y with the repeat-add epilogue (stream order).
template <typename T>
cudaError_t launch(const FusedArgs& a, cudaStream_t stream) {
  if (a.M <= 0) return cudaSuccess;
  if (a.rep.groups == 0 || a.nprob < 2) return launch_one<T>(a, stream);
  if (const cudaError_t e = launch_one<T>(z_only(a), stream); e != cudaSuccess) return e;
  FusedArgs y = a;
  y.nprob = 1;  // p[1] still names z for the epilogue
  return launch_one<T>(y, stream);
}

}  // namespace flora::cuda::decode
