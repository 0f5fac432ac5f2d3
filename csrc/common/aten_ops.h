// The vendor-library baseline: each block as ATen calls on fused storage.
// When the operands already sit side by side in one buffer ([W; A] rows,
// [W | B] and [u | z] columns) the block is ONE matmul over that storage;
// otherwise it is a matmul plus an accumulating matmul. Device-generic: the
// CPU and CUDA registrations both use it where no custom kernel applies.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "checks.h"

namespace flora {

// Each *_aten validates its arguments; the *_aten_checked forms take the
// shape a caller already validated (device kernels fall back to them).
at::Tensor ffl_aten_checked(const FflShape& sh, const at::Tensor& x, const at::Tensor& W,
                            const at::Tensor& A, double s, at::IntArrayRef repeat,
                            int64_t repeat_rank, const c10::optional<at::Tensor>& z_in,
                            const c10::optional<at::Tensor>& res);
at::Tensor fbl_aten_checked(const FblShape& sh, const at::Tensor& u, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& B, double s,
                            const c10::optional<at::Tensor>& res, bool relu);
// res += u W^T + s f(z) B^T in place (flora::fbl_)
void fbl_inplace_aten_checked(const FblShape& sh, const at::Tensor& res, const at::Tensor& u,
                              const at::Tensor& z, const at::Tensor& W, const at::Tensor& B,
                              double s, bool relu);
at::Tensor ffbl_aten_checked(const FfblShape& sh, const at::Tensor& u, const at::Tensor& z,
                             const at::Tensor& W, const at::Tensor& B, const at::Tensor& A,
                             const at::Tensor& C, double s,
                             const c10::optional<at::Tensor>& res, bool relu);

at::Tensor ffl_aten(const at::Tensor& x, const at::Tensor& W,
                    const at::Tensor& A, double s, at::IntArrayRef repeat,
                    int64_t repeat_rank, const c10::optional<at::Tensor>& z_in,
                    const c10::optional<at::Tensor>& res);

at::Tensor fbl_aten(const at::Tensor& u, const at::Tensor& z,
                    const at::Tensor& W, const at::Tensor& B, double s,
                    const c10::optional<at::Tensor>& res, bool relu);

at::Tensor ffbl_aten(const at::Tensor& u, const at::Tensor& z,
                     const at::Tensor& W, const at::Tensor& B,
                     const at::Tensor& A, const at::Tensor& C, double s,
                     const c10::optional<at::Tensor>& res, bool relu);

// The pointwise ops as the ATen composites they replace (flora/ops.py's
// references, transformers' roundings); inputs already checked.
at::Tensor rms_norm_aten(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rope_aten(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor rope_cache_aten(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& slot);
at::Tensor silu_mul_aten(const at::Tensor& g, const at::Tensor& u);
void silu_mul_inplace_aten(const at::Tensor& g, const at::Tensor& u);
// Decode attention as SDPA over the query heads grouped per kv head ([B, nkv,
// G, hd]: plain masked attention, no kv expansion); [B, nq * hd]. A row with
// no unmasked key is NaN here (SDPA's softmax of -inf), 0 from the kernels.
at::Tensor decode_attention_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& mask);

// FFL epilogue on a computed [y | z] buffer: z += z_in, y += res, then the
// repeat-add.
void ffl_epilogue_aten(at::Tensor& out, int64_t N, double s,
                       at::IntArrayRef repeat, int64_t repeat_rank,
                       const c10::optional<at::Tensor>& z_in,
                       const c10::optional<at::Tensor>& res);

}  // namespace flora
