// Filling the pointwise kernels' arguments (pointwise_args.h) from tensors:
// one place for the CPU and the CUDA registrations.
#pragma once
#include <ATen/ATen.h>

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

}  // namespace flora
