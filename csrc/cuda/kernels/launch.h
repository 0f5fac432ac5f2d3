// Entry points of the kernel TUs (one TU per arch, dtype and tile config;
// see setup.py for the per-TU -gencode). Each returns cudaSuccess, or the
// launch error; a kernel that cannot take the arguments returns
// cudaErrorNotSupported before launching anything (the caller falls back).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "args.h"

namespace flora::cuda {

// Decode (M <= 16), sm_80 and sm_90.
cudaError_t decode_bf16(const FusedArgs& a, cudaStream_t stream);
cudaError_t decode_fp16(const FusedArgs& a, cudaStream_t stream);

// CUTLASS 2.x (mma.sync, cp.async multistage), sm_80: both K segments, both
// problems, C add; no repeat-add, no relu (staged by the caller).
cudaError_t gemm_sm80_bf16(const FusedArgs& a, cudaStream_t stream);
cudaError_t gemm_sm80_fp16(const FusedArgs& a, cudaStream_t stream);
// y = x W^T + s * tile(z) (FFL's repeat-add, p[0] only, one K segment, no C),
// reading z from a.p[1].d: the caller writes z first (gemm_sm80_* on p[1]).
cudaError_t gemm_sm80_rep_bf16(const FusedArgs& a, cudaStream_t stream);
cudaError_t gemm_sm80_rep_fp16(const FusedArgs& a, cudaStream_t stream);

// CUTLASS 3.x (TMA, warp-specialized wgmma), sm_90a: one K segment (the
// caller passes [u | z] and [W | sB] as one contiguous range), C add through
// the epilogue visitor tree; one launch per problem. gemm_sm90_2k_* take both
// K segments (K2 > 0, alpha2, relu(z) staged by the caller) into one
// accumulator; their workspace is gemm_sm90_workspace's.
cudaError_t gemm_sm90_bf16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);
cudaError_t gemm_sm90_fp16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);
size_t gemm_sm90_workspace(const FusedArgs& a);
cudaError_t gemm_sm90_2k_bf16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);
cudaError_t gemm_sm90_2k_fp16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);
// y = x W^T + s * tile(z) (FFL's repeat-add, p[0] only, one K segment, no C),
// reading z from a.p[1].d: the caller writes z first (gemm_sm90_* on p[1]).
cudaError_t gemm_sm90_rep_bf16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);
cudaError_t gemm_sm90_rep_fp16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);
size_t gemm_sm90_rep_workspace(const FusedArgs& a);

// The same GEMMs with every weight operand Y stored [K, n] (row stride ldy):
// transposed views, as in backward dx = dy W + dz A (Y1 = W^T, Y2 = A^T).
// The sm_90a workspace is gemm_sm90_workspace's (same tile scheduler).
cudaError_t gemm_sm80_t_bf16(const FusedArgs& a, cudaStream_t stream);
cudaError_t gemm_sm80_t_fp16(const FusedArgs& a, cudaStream_t stream);
cudaError_t gemm_sm90_t_bf16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);
cudaError_t gemm_sm90_t_fp16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);
// Both K segments with [K, n] weights (dy, dz or W, A not one range).
cudaError_t gemm_sm90_2k_t_bf16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream);
cudaError_t gemm_sm90_2k_t_fp16(const FusedArgs& a, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream);

// The decode step's pointwise pieces (pointwise.cu), one launch each, with
// the roundings of the ATen composites they replace (flora/ops.py).
enum class PointwiseDtype : int { kBF16 = 0, kF16 = 1, kF32 = 2 };
// out [M, width] = [w * round(x * rsqrt(mean(x^2) + eps)) over x's first d
// columns | x's other columns unchanged]; x rows strided (ldx), out contiguous.
struct RmsNormArgs {
  PointwiseDtype dt = PointwiseDtype::kBF16;
  int64_t M = 0, d = 0, width = 0;  // x, out [M, width]: columns d ... width - 1 copied
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;
  float eps = 0.f;
  void* out = nullptr;
};
// out [B, T, H, hd] = round(x cos) + round(roll(x, hd / 2) sin); x strided
// (sb, st, sh; unit last stride), cos / sin [B, T, hd] contiguous.
struct RopeArgs {
  PointwiseDtype dt = PointwiseDtype::kBF16;
  int64_t B = 0, T = 0, H = 0, hd = 0;
  const void* x = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;
};
// A decode step's RoPE with the KV-cache write: qk [B, T, nq + nkv, hd] and
// v [B, T, nkv, hd] strided (unit last stride), cos / sin [B, T, hd]
// contiguous, slot [T] (int64, device). q rotated into q [B, T, nq, hd]
// contiguous; k rotated into kc[b, h, slot[t], :], v into vc[b, h, slot[t], :]
// (caches [B, nkv, L, hd], unit last stride); a slot outside [0, L) writes
// nothing.
struct RopeCacheArgs {
  PointwiseDtype dt = PointwiseDtype::kBF16;
  int64_t B = 0, T = 0, nq = 0, nkv = 0, hd = 0, L = 0;
  const void* qk = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  const void* v = nullptr;
  int64_t vb = 0, vt = 0, vh = 0;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* q = nullptr;
  void* kc = nullptr;
  int64_t kc_b = 0, kc_h = 0, kc_l = 0;
  void* vc = nullptr;
  int64_t vc_b = 0, vc_h = 0, vc_l = 0;
  const int64_t* slot = nullptr;
};
// out [M, n] = round(silu(g)) * u; g, u, out rows strided (out may be u).
struct SiluMulArgs {
  PointwiseDtype dt = PointwiseDtype::kBF16;
  int64_t M = 0, n = 0;
  const void* g = nullptr;
  int64_t ldg = 0;
  const void* u = nullptr;
  int64_t ldu = 0;
  void* out = nullptr;  // may be u itself (flora::silu_mul_)
  int64_t ldo = 0;
};
cudaError_t rms_norm(const RmsNormArgs& a, cudaStream_t stream);
cudaError_t rope(const RopeArgs& a, cudaStream_t stream);
cudaError_t rope_cache(const RopeCacheArgs& a, cudaStream_t stream);
cudaError_t silu_mul(const SiluMulArgs& a, cudaStream_t stream);

}  // namespace flora::cuda
