// The decode step's pointwise pieces, one launch each where the ATen
// composites take two to four: RMSNorm (weight after the rounded
// normalisation), RoPE (rotate-half with the sign in sin) and SiLU x up, each
// with the composites' roundings (transformers' Llama): every intermediate
// they store in the activation dtype is rounded to it here too, and products
// and sums use the _rn intrinsics so nvcc does not contract them into FMAs.
// Memory-bound and small: plain coalesced loads, fp32 arithmetic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace flora::cuda {
namespace {

template <typename T>
struct Cv;
template <>
struct Cv<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 to(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Cv<__half> {
  static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half to(float v) { return __float2half_rn(v); }
};
template <>
struct Cv<float> {
  static __device__ __forceinline__ float f(float v) { return v; }
  static __device__ __forceinline__ float to(float v) { return v; }
};

// The value a store in T keeps.
template <typename T>
__device__ __forceinline__ float rnd(float v) {
  return Cv<T>::f(Cv<T>::to(v));
}

constexpr int kThreads = 256;

// One CTA per row: sum of squares (fp32, block reduction), then the row; the
// columns past d (zflora's z) are copied through.
template <typename T>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(RmsNormArgs a) {
  const T* x = static_cast<const T*>(a.x) + blockIdx.x * a.ldx;
  const T* w = static_cast<const T*>(a.w);
  T* out = static_cast<T*>(a.out) + blockIdx.x * a.width;
  for (int64_t i = a.d + threadIdx.x; i < a.width; i += kThreads) out[i] = x[i];  // z handed through
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < a.d; i += kThreads) {
    const float v = Cv<T>::f(x[i]);
    ss = __fadd_rn(ss, __fmul_rn(v, v));
  }
  __shared__ float part[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float tot = 0.f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) tot += part[i];
  const float r = 1.f / sqrtf(tot / static_cast<float>(a.d) + a.eps);
  for (int64_t i = threadIdx.x; i < a.d; i += kThreads)
    out[i] = Cv<T>::to(__fmul_rn(rnd<T>(__fmul_rn(Cv<T>::f(x[i]), r)), Cv<T>::f(w[i])));
}

// One thread per output element of [B, T, H, hd] (row-major): x may be a
// strided view (unit last stride), cos / sin [B, T, hd] broadcast over H.
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(RopeArgs a) {
  const int64_t n = a.B * a.T * a.H * a.hd;
  const int64_t half = a.hd / 2;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = e % a.hd, r = e / a.hd, h = r % a.H, bt = r / a.H, t = bt % a.T, b = bt / a.T;
    const int64_t j = i < half ? i + half : i - half;  // roll by hd / 2
    const T* x = static_cast<const T*>(a.x) + b * a.sb + t * a.st + h * a.sh;
    const float c = Cv<T>::f(static_cast<const T*>(a.cos)[bt * a.hd + i]);
    const float s = Cv<T>::f(static_cast<const T*>(a.sin)[bt * a.hd + i]);
    const float p = rnd<T>(__fmul_rn(Cv<T>::f(x[i]), c)), q = rnd<T>(__fmul_rn(Cv<T>::f(x[j]), s));
    static_cast<T*>(a.out)[e] = Cv<T>::to(__fadd_rn(p, q));
  }
}

// One thread per element of [B, T, nq + 2 nkv, hd]: q's heads rotated into
// q, k's rotated into the K cache at slot[t], v's copied into the V cache.
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_cache_kernel(RopeCacheArgs a) {
  const int64_t H = a.nq + 2 * a.nkv, n = a.B * a.T * H * a.hd, half = a.hd / 2;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = e % a.hd, r = e / a.hd, h = r % H, bt = r / H, t = bt % a.T, b = bt / a.T;
    const int64_t s = a.slot[t];
    const bool in_cache = s >= 0 && s < a.L;
    if (h < a.nq + a.nkv) {
      const int64_t j = i < half ? i + half : i - half;  // roll by hd / 2
      const T* x = static_cast<const T*>(a.qk) + b * a.sb + t * a.st + h * a.sh;
      const float c = Cv<T>::f(static_cast<const T*>(a.cos)[bt * a.hd + i]);
      const float sn = Cv<T>::f(static_cast<const T*>(a.sin)[bt * a.hd + i]);
      const float p = rnd<T>(__fmul_rn(Cv<T>::f(x[i]), c)), q = rnd<T>(__fmul_rn(Cv<T>::f(x[j]), sn));
      const T val = Cv<T>::to(__fadd_rn(p, q));
      if (h < a.nq)
        static_cast<T*>(a.q)[(bt * a.nq + h) * a.hd + i] = val;
      else if (in_cache)
        static_cast<T*>(a.kc)[b * a.kc_b + (h - a.nq) * a.kc_h + s * a.kc_l + i] = val;
    } else if (in_cache) {
      const int64_t hv = h - a.nq - a.nkv;
      static_cast<T*>(a.vc)[b * a.vc_b + hv * a.vc_h + s * a.vc_l + i] =
          static_cast<const T*>(a.v)[b * a.vb + t * a.vt + hv * a.vh + i];
    }
  }
}

// One thread per element of [M, n]; g, u, out row-strided. out may be u:
// each element is read, then written, by the same thread.
template <typename T>
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(SiluMulArgs a) {
  const int64_t total = a.M * a.n;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t m = e / a.n, i = e % a.n;
    const float v = Cv<T>::f(static_cast<const T*>(a.g)[m * a.ldg + i]);
    const float s = rnd<T>(__fdiv_rn(v, __fadd_rn(1.f, expf(-v))));
    static_cast<T*>(a.out)[m * a.ldo + i] =
        Cv<T>::to(__fmul_rn(s, Cv<T>::f(static_cast<const T*>(a.u)[m * a.ldu + i])));
  }
}

unsigned blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 8 ? b : 65535 * 8);  // grid-stride beyond
}

template <template <typename> class K, typename Args>
cudaError_t launch(const Args& a, unsigned grid, cudaStream_t stream) {
  if (grid == 0) return cudaSuccess;
  switch (a.dt) {
    case PointwiseDtype::kBF16: K<__nv_bfloat16>::run<<<grid, kThreads, 0, stream>>>(a); break;
    case PointwiseDtype::kF16: K<__half>::run<<<grid, kThreads, 0, stream>>>(a); break;
    default: K<float>::run<<<grid, kThreads, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

template <typename T>
struct RmsNormK {
  static constexpr auto run = rms_norm_kernel<T>;
};
template <typename T>
struct RopeK {
  static constexpr auto run = rope_kernel<T>;
};
template <typename T>
struct RopeCacheK {
  static constexpr auto run = rope_cache_kernel<T>;
};
template <typename T>
struct SiluMulK {
  static constexpr auto run = silu_mul_kernel<T>;
};

}  // namespace

cudaError_t rms_norm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.M > 0x7fffffff) return cudaErrorNotSupported;
  return launch<RmsNormK>(a, static_cast<unsigned>(a.M), stream);
}

cudaError_t rope(const RopeArgs& a, cudaStream_t stream) {
  return launch<RopeK>(a, blocks(a.B * a.T * a.H * a.hd), stream);
}

cudaError_t rope_cache(const RopeCacheArgs& a, cudaStream_t stream) {
  return launch<RopeCacheK>(a, blocks(a.B * a.T * (a.nq + 2 * a.nkv) * a.hd), stream);
}

cudaError_t silu_mul(const SiluMulArgs& a, cudaStream_t stream) {
  return launch<SiluMulK>(a, blocks(a.M * a.n), stream);
}

}  // namespace flora::cuda
