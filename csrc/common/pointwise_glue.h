// Filling the pointwise and decode-attention kernels' arguments
// (pointwise_args.h, attention_plan.h) from tensors: one place for the CPU and
// the CUDA registrations.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "attention_plan.h"
#include "pointwise_args.h"

namespace flora {

template <typename Args>
void fill_rope(Args& a, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
               const at::Tensor& out) {
  a.B = x.size(0), a.T = x.size(1), a.H = x.size(2), a.hd = x.size(3);
  a.x = x.data_ptr(), a.sb = x.stride(0), a.st = x.stride(1), a.sh = x.stride(2);
  a.cos = cos.data_ptr(), a.sin = sin.data_ptr(), a.out = out.data_ptr();
}

template <typename Args>
void fill_rope_cache(Args& a, const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& kc, const at::Tensor& vc,
                     const at::Tensor& slot, const at::Tensor& q) {
  a.B = qk.size(0), a.T = qk.size(1), a.nkv = kc.size(1), a.nq = qk.size(2) - a.nkv;
  a.hd = qk.size(3), a.L = kc.size(2);
  a.qk = qk.data_ptr(), a.sb = qk.stride(0), a.st = qk.stride(1), a.sh = qk.stride(2);
  a.v = v.data_ptr(), a.vb = v.stride(0), a.vt = v.stride(1), a.vh = v.stride(2);
  a.cos = cos.data_ptr(), a.sin = sin.data_ptr(), a.q = q.data_ptr();
  a.kc = kc.data_ptr(), a.kc_b = kc.stride(0), a.kc_h = kc.stride(1), a.kc_l = kc.stride(2);
  a.vc = vc.data_ptr(), a.vc_b = vc.stride(0), a.vc_h = vc.stride(1), a.vc_l = vc.stride(2);
  a.slot = slot.data_ptr<int64_t>();
}

// Everything but the output (a.out: the caller's, once the kernel takes the
// call), the split plan and its workspace (fill_decode_attention_plan).
template <typename Args>
void fill_decode_attention(Args& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& mask) {
  a.B = q.size(0), a.nq = q.size(1), a.hd = q.size(2), a.nkv = k.size(1), a.L = k.size(2);
  a.q = q.data_ptr(), a.qb = q.stride(0), a.qh = q.stride(1);
  a.k = k.data_ptr(), a.kb = k.stride(0), a.kh = k.stride(1), a.kl = k.stride(2);
  a.v = v.data_ptr(), a.vb = v.stride(0), a.vh = v.stride(1), a.vl = v.stride(2);
  a.mask = mask.data_ptr(), a.mb = mask.stride(0);
  a.scale = 1.f / std::sqrt(static_cast<float>(a.hd));
}

// The split plan for `requested` splits (attention_plan.h), and its fp32
// partials on q's device where there is more than one split.
template <typename Args>
void fill_decode_attention_plan(Args& a, int64_t requested, at::Tensor& part_o, at::Tensor& part_ml,
                                const at::TensorOptions& device) {
  const attn::SplitPlan p = attn::decode_attention_plan(a.L, requested);
  a.splits = p.splits, a.chunk = p.chunk;
  if (a.splits > 1) {
    part_o = at::empty({a.B * a.nq * a.splits * a.hd}, device.dtype(at::kFloat));
    part_ml = at::empty({a.B * a.nq * a.splits * 2}, device.dtype(at::kFloat));
    a.part_o = part_o.data_ptr<float>(), a.part_ml = part_ml.data_ptr<float>();
  }
}

// Whether q, k, v and the mask have the unit last stride every kernel reads.
inline bool decode_attention_unit(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& mask) {
  return q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(1) == 1;
}

}  // namespace flora
