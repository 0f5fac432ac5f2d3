// Argument validation shared by every compiled implementation. The messages
// match flora/ops.py's reference so users see one error whatever runs.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace flora {

// Problem sizes of one call, after validation.
struct FflShape {
  int64_t M, K, N, R;
};
struct FblShape {
  int64_t M, K, N, R;
};
struct FfblShape {
  int64_t M, K, N, R, R2;
};

FflShape check_ffl(const at::Tensor& x, const at::Tensor& W,
                   const at::Tensor& A, at::IntArrayRef repeat,
                   int64_t repeat_rank,
                   const c10::optional<at::Tensor>& z_in,
                   const c10::optional<at::Tensor>& res);

// The pointwise ops (same rules and messages as flora/ops.py).
void check_rms_norm(const at::Tensor& x, const at::Tensor& weight);
void check_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// qk [B, T, nq + nkv, hd], v [B, T, nkv, hd], caches [B, nkv, L, hd], slot [T] int64
void check_rope_cache(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot);
void check_silu_mul(const at::Tensor& g, const at::Tensor& u);
// q [B, nq, hd], k / v [B, nkv, L, hd] (nq a multiple of nkv), mask [B, L]
// additive, one floating dtype, one device; inference only
void check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& mask);
void check_silu_mul_inplace(const at::Tensor& g, const at::Tensor& u);
// rope_cache_attention_'s own: q [B, nq hd], k and v [B, nkv hd] (one query row
// per sequence; hd and nkv the caches'), mask [B, L] with L <= the caches'
// length (the rest: its two ops)
void check_rope_cache_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& k_cache, const at::Tensor& mask);

FblShape check_fbl(const at::Tensor& u, const at::Tensor& z,
                   const at::Tensor& W, const at::Tensor& B,
                   const c10::optional<at::Tensor>& res);

// check_fbl with res required, plus fbl_'s own rules: no autograd recording,
// res overlapping no operand.
FblShape check_fbl_inplace(const at::Tensor& res, const at::Tensor& u, const at::Tensor& z,
                           const at::Tensor& W, const at::Tensor& B);

FfblShape check_ffbl(const at::Tensor& u, const at::Tensor& z,
                     const at::Tensor& W, const at::Tensor& B,
                     const at::Tensor& A, const at::Tensor& C,
                     const c10::optional<at::Tensor>& res);

// True when a 2-D tensor's rows are contiguous (unit stride along its last
// dimension), as the kernels read them.
bool unit_last_stride(const at::Tensor& t);
// ... and each row starts at least a row's length after the previous one
// (views into wider fused buffers are fine; broadcast rows are not).
bool row_major(const at::Tensor& t);

// True when `b` starts right after `a` in the same storage, so [a; b]
// (rows) or [a | b] (columns) is one strided matrix.
bool rows_follow(const at::Tensor& a, const at::Tensor& b);
bool cols_follow(const at::Tensor& a, const at::Tensor& b);

}  // namespace flora
