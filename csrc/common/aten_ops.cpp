#include "aten_ops.h"

#include <ATen/ATen.h>

#include "checks.h"

namespace flora {
namespace {

// [a; b] or [a | b] as one matrix, given that b follows a in memory (also
// for transposed views: backward dx passes W^T, A^T).
at::Tensor stack_rows(const at::Tensor& a, const at::Tensor& b) {
  return a.as_strided({a.size(0) + b.size(0), a.size(1)}, {a.stride(0), a.stride(1)});
}
at::Tensor stack_cols(const at::Tensor& a, const at::Tensor& b) {
  return a.as_strided({a.size(0), a.size(1) + b.size(1)}, {a.stride(0), a.stride(1)});
}

// y (a view) = u W^T + res, written in place.
void linear_into(at::Tensor y, const at::Tensor& u, const at::Tensor& W,
                 const c10::optional<at::Tensor>& res) {
  if (res.has_value())
    at::addmm_out(y, *res, u, W.t());
  else
    at::mm_out(y, u, W.t());
}

}  // namespace

void ffl_epilogue_aten(at::Tensor& out, int64_t N, double s,
                       at::IntArrayRef repeat, int64_t repeat_rank,
                       const c10::optional<at::Tensor>& z_in,
                       const c10::optional<at::Tensor>& res) {
  const int64_t M = out.size(0), R = out.size(1) - N;
  at::Tensor z = out.narrow(1, N, R);
  if (z_in.has_value()) z.add_(*z_in);
  if (res.has_value()) out.narrow(1, 0, N).add_(*res);
  int64_t off = 0;
  for (size_t g = 0; g < repeat.size(); ++g) {
    const int64_t n = repeat[g], rc = repeat_rank;
    // y[:, seg] viewed as [M, n / rc, rc] takes z's chunk broadcast over tiles.
    out.narrow(1, off, n)
        .view({M, n / rc, rc})
        .add_(z.narrow(1, static_cast<int64_t>(g) * rc, rc).unsqueeze(1), s);
    off += n;
  }
}

at::Tensor ffl_aten(const at::Tensor& x, const at::Tensor& W,
                    const at::Tensor& A, double s, at::IntArrayRef repeat,
                    int64_t repeat_rank,
                    const c10::optional<at::Tensor>& z_in,
                    const c10::optional<at::Tensor>& res) {
  return ffl_aten_checked(check_ffl(x, W, A, repeat, repeat_rank, z_in, res), x, W, A, s,
                          repeat, repeat_rank, z_in, res);
}

at::Tensor ffl_aten_checked(const FflShape& sh, const at::Tensor& x, const at::Tensor& W,
                            const at::Tensor& A, double s, at::IntArrayRef repeat,
                            int64_t repeat_rank, const c10::optional<at::Tensor>& z_in,
                            const c10::optional<at::Tensor>& res) {
  at::Tensor out = at::empty({sh.M, sh.N + sh.R}, x.options());
  const bool stacked = sh.R == 0 || rows_follow(W, A);
  // zflora's writer, [h | z] + u [W; A]^T: one addmm when the residual and
  // the carry are one stream (the model keeps them adjacent)
  if (stacked && res.has_value() && z_in.has_value() && repeat.empty() && cols_follow(*res, *z_in)) {
    at::addmm_out(out, stack_cols(*res, *z_in), x, stack_rows(W, A).t());
    return out;
  }
  if (stacked) {
    at::mm_out(out, x, stack_rows(W, A).t());
  } else {
    at::Tensor y = out.narrow(1, 0, sh.N), z = out.narrow(1, sh.N, sh.R);
    at::mm_out(y, x, W.t());
    at::mm_out(z, x, A.t());
  }
  ffl_epilogue_aten(out, sh.N, s, repeat, repeat_rank, z_in, res);
  return out;
}

at::Tensor fbl_aten(const at::Tensor& u, const at::Tensor& z,
                    const at::Tensor& W, const at::Tensor& B, double s,
                    const c10::optional<at::Tensor>& res, bool relu) {
  return fbl_aten_checked(check_fbl(u, z, W, B, res), u, z, W, B, s, res, relu);
}

at::Tensor fbl_aten_checked(const FblShape& sh, const at::Tensor& u, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& B, double s,
                            const c10::optional<at::Tensor>& res, bool relu) {
  at::Tensor y = at::empty({sh.M, sh.N}, u.options());
  const at::Tensor fz = relu && sh.R > 0 ? at::relu(z) : z;
  // No u part (lora's B product, fbl(empty, z, empty, B, s, res=y)): one addmm,
  // not a copy of res (a K = 0 product) and then an addmm (beta 0: y unread).
  if (sh.K == 0 && sh.R > 0) {
    at::addmm_out(y, res.has_value() ? *res : y, fz, B.t(), res.has_value() ? 1.0 : 0.0, s);
    return y;
  }
  // One GEMM over [u | z] and the pre-scaled [W | sB] storage.
  if (s == 1.0 && !relu && cols_follow(u, z) && cols_follow(W, B)) {
    linear_into(y, stack_cols(u, z), stack_cols(W, B), res);
    return y;
  }
  linear_into(y, u, W, res);
  if (sh.R > 0) y.addmm_(fz, B.t(), 1.0, s);
  return y;
}

void fbl_inplace_aten_checked(const FblShape& sh, const at::Tensor& res, const at::Tensor& u,
                              const at::Tensor& z, const at::Tensor& W, const at::Tensor& B,
                              double s, bool relu) {
  // beta = 1 GEMMs onto res itself: no copy of it first
  at::Tensor y = res;
  if (sh.K > 0 && s == 1.0 && !relu && cols_follow(u, z) && cols_follow(W, B)) {
    y.addmm_(stack_cols(u, z), stack_cols(W, B).t());
    return;
  }
  if (sh.K > 0) y.addmm_(u, W.t());
  if (sh.R > 0) y.addmm_(relu ? at::relu(z) : z, B.t(), 1.0, s);
}

at::Tensor ffbl_aten(const at::Tensor& u, const at::Tensor& z,
                     const at::Tensor& W, const at::Tensor& B,
                     const at::Tensor& A, const at::Tensor& C, double s,
                     const c10::optional<at::Tensor>& res, bool relu) {
  return ffbl_aten_checked(check_ffbl(u, z, W, B, A, C, res), u, z, W, B, A, C, s, res, relu);
}

at::Tensor ffbl_aten_checked(const FfblShape& sh, const at::Tensor& u, const at::Tensor& z,
                             const at::Tensor& W, const at::Tensor& B, const at::Tensor& A,
                             const at::Tensor& C, double s,
                             const c10::optional<at::Tensor>& res, bool relu) {
  at::Tensor out = at::empty({sh.M, sh.N + sh.R2}, u.options());
  at::Tensor y = out.narrow(1, 0, sh.N), z2 = out.narrow(1, sh.N, sh.R2);
  // One GEMM over [u | z] and the storage [W, sB; A, C].
  if (s == 1.0 && !relu && cols_follow(u, z) && cols_follow(W, B) &&
      cols_follow(A, C) && rows_follow(W, A)) {
    at::mm_out(out, stack_cols(u, z), stack_rows(stack_cols(W, B), stack_cols(A, C)).t());
    if (res.has_value()) y.add_(*res);
    return out;
  }
  const at::Tensor fz = relu ? at::relu(z) : z;
  linear_into(y, u, W, res);
  at::mm_out(z2, u, A.t());
  if (sh.R > 0) {
    y.addmm_(fz, B.t(), 1.0, s);
    z2.addmm_(fz, C.t());
  }
  return out;
}

at::Tensor rms_norm_aten(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t d = weight.size(0);
  if (d < x.size(1))  // zflora's stream [h | z]: z handed through
    return at::cat({rms_norm_aten(x.narrow(1, 0, d), weight, eps), x.narrow(1, d, x.size(1) - d)}, 1);
  if (x.scalar_type() == at::kFloat) return at::rms_norm(x, {d}, weight, eps);
  return weight * at::rms_norm(x, {d}, c10::nullopt, eps);
}

at::Tensor rope_aten(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return x * cos + x.roll({x.size(3) / 2}, {-1}) * sin;
}

at::Tensor rope_cache_aten(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& slot) {
  const at::Tensor rot = rope_aten(qk, cos, sin);
  const int64_t nkv = k_cache.size(1), nq = qk.size(2) - nkv;
  k_cache.index_copy_(2, slot, rot.narrow(2, nq, nkv).transpose(1, 2));
  v_cache.index_copy_(2, slot, v.transpose(1, 2));
  return rot.narrow(2, 0, nq);
}

// silu's output is fresh: the product overwrites it (same roundings, one buffer)
at::Tensor silu_mul_aten(const at::Tensor& g, const at::Tensor& u) { return at::silu(g).mul_(u); }
void silu_mul_inplace_aten(const at::Tensor& g, const at::Tensor& u) { u.mul_(at::silu(g)); }

at::Tensor decode_attention_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& mask) {
  const int64_t B = q.size(0), nq = q.size(1), hd = q.size(2), nkv = k.size(1), L = k.size(2);
  if (L == 0) return at::zeros({B, nq * hd}, q.options());
  const at::Tensor qg = q.reshape({B, nkv, nq / nkv, hd});
  return at::scaled_dot_product_attention(qg, k, v, mask.view({B, 1, 1, L})).reshape({B, nq * hd});
}

}  // namespace flora
