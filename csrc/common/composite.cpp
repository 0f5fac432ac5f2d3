// Ops made of other flora ops: one dispatch (one crossing from Python) for a
// sequence the eager decode step runs, where each op call from Python costs
// ~2 us of host time (bench/RESULTS.md, "Eager decode step: host time").
// Device-generic (CompositeExplicitAutograd): each inner op dispatches to its
// own device's kernel, so there is no per-device code here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "kernel_info.h"
#include "op_handles.h"

namespace flora {
namespace {

// q [B, nq hd] and k [B, nkv hd] (the fused q/k/v output's column blocks) as
// rope_cache_ takes them, q|k [B, 1, nq + nkv, hd]: one view where k's columns
// follow q's (the decode step's case), else copied side by side.
at::Tensor qk_heads(const at::Tensor& q, const at::Tensor& k, int64_t hd) {
  const int64_t B = q.size(0), heads = (q.size(1) + k.size(1)) / hd;
  const bool adjacent = q.stride(1) == 1 && k.stride(1) == 1 && k.stride(0) == q.stride(0) &&
                        static_cast<const char*>(k.data_ptr()) ==
                            static_cast<const char*>(q.data_ptr()) + q.size(1) * q.element_size();
  if (adjacent) return q.as_strided({B, 1, heads, hd}, {q.stride(0), q.stride(0), hd, 1});
  return at::cat({q, k}, 1).view({B, 1, heads, hd});
}

// rope_cache_ (q|k rotated, k and v written at slot), then decode_attention of
// the rotated q over the caches' first L slots, L the mask's width.
at::Tensor rope_cache_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& slot, const at::Tensor& mask) {
  check_rope_cache_attention(q, k, v, k_cache, mask);
  const int64_t B = q.size(0), nkv = k_cache.size(1), hd = k_cache.size(3), L = mask.size(1);
  const at::Tensor qk = qk_heads(q, k, hd), vh = v.reshape({B, 1, nkv, hd});
  const at::Tensor qr = rope_cache_op().call(qk, vh, cos, sin, k_cache, v_cache, slot);  // [B, 1, nq, hd]
  return decode_attention_op().call(qr.select(1, 0), k_cache.narrow(2, 0, L), v_cache.narrow(2, 0, L), mask, 0);
}

}  // namespace

std::vector<KernelInfo> composite_kernel_info(const std::string& device) {
  return {{"rope_cache_attention_", device, "rope_cache_, then decode_attention over the window (one call)",
           "eager inference (each op as listed)"}};
}

TORCH_LIBRARY_IMPL(flora, CompositeExplicitAutograd, m) {
  m.impl("rope_cache_attention_", &rope_cache_attention);
}

}  // namespace flora
