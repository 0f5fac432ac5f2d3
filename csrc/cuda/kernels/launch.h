// Entry points of the kernel TUs (one TU per arch, dtype and tile config;
// see setup.py for the per-TU -gencode). Each returns cudaSuccess, or the
// launch error; a kernel that cannot take the arguments returns
// cudaErrorNotSupported before launching anything (the caller falls back).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../../common/attention_plan.h"
#include "../../common/pointwise_args.h"
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
// RoPE and RoPE with the KV-cache write: common/pointwise_args.h
using RopeArgs = ::flora::RopeArgsT<PointwiseDtype>;
using RopeCacheArgs = ::flora::RopeCacheArgsT<PointwiseDtype>;
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

// Decode attention split over the keys (attention.cu; common/attention_plan.h
// defines the arguments and the split plan): bf16 / fp16, hd 64 or 128, up to
// kMaxGroup query heads per kv head, 16-byte aligned cache rows. splits > 1
// needs a.part_o / a.part_ml. decode_attention_takes: whether it takes a.
using DecodeAttentionArgs = ::flora::attn::DecodeAttentionArgsT<PointwiseDtype>;
bool decode_attention_takes(const DecodeAttentionArgs& a);
cudaError_t decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream);

}  // namespace flora::cuda
