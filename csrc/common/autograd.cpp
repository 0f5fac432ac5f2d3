// Autograd for the flora ops, registered for the Autograd key in C++ so a
// call that needs no gradient (no_grad, frozen inputs) goes straight to the
// device kernel without entering Python. The backward formulas are the ones
// in flora/ops.py (_ffl_backward ...; that file keeps them for builds without
// this library): ATen matmuls, so the backward is itself differentiable and
// traceable (torch.compile, opcheck's aot_dispatch). Sizes are read as
// SymInts so dynamic-shape tracing works.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "aten_ops.h"
#include "checks.h"
#include "op_handles.h"

namespace flora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool given(const c10::optional<at::Tensor>& opt) { return opt.has_value() && opt->defined(); }

bool needs_grad(std::initializer_list<const at::Tensor*> ts,
                std::initializer_list<const c10::optional<at::Tensor>*> opts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts)
    if (t->requires_grad()) return true;
  for (const auto* o : opts)
    if (given(*o) && (*o)->requires_grad()) return true;
  return false;
}

at::Tensor maybe(bool need, const std::function<at::Tensor()>& f) {
  return need ? f() : at::Tensor();
}

// An optional operand (z_in, res) has an input edge only when given: the
// edges of the tensor inputs count only those present.
void save_has_opt(AutogradContext* ctx, const c10::optional<at::Tensor>& opt,
                  const char* key = "has_opt") {
  ctx->saved_data[key] = given(opt);
}
bool opt_needs_grad(AutogradContext* ctx, size_t edge, const char* key = "has_opt") {
  return ctx->saved_data[key].toBool() && ctx->needs_input_grad(edge);
}

// Adjoint of the repeat-add: each state chunk collects s * the sum of the
// gradient over the tiles it was added to.
at::Tensor untile(const at::Tensor& gy, at::Tensor gz, double s, const std::vector<int64_t>& repeat,
                  int64_t rc) {
  if (repeat.empty()) return gz;
  gz = gz.clone();
  int64_t off = 0;
  for (size_t g = 0; g < repeat.size(); ++g) {
    const int64_t n = repeat[g];
    at::Tensor tiles = gy.narrow(1, off, n).unflatten(1, {n / rc, rc}).sum(1);
    gz.narrow(1, static_cast<int64_t>(g) * rc, rc).add_(tiles * s);
    off += n;
  }
  return gz;
}

// dx = dy W + dz A (FFL; FFBL's du), the FBL shape over the transposed
// weight views: on CUDA one fbl call (its GEMM kernels take [K, n] weights,
// else cuBLAS as two matmuls); elsewhere the two matmuls. Gradients that are
// not row-major (the broadcast one of out.sum().backward() has strides 0)
// take the matmuls too: fbl rejects such operands.
at::Tensor dy_w_plus_dz_a(const at::Tensor& dy, const at::Tensor& dz, const at::Tensor& W,
                          const at::Tensor& A) {
  if (dy.is_cuda() && row_major(dy) && row_major(dz))
    return fbl_op().call(dy, dz, W.t(), A.t(), 1.0, c10::nullopt, false);
  return dy.mm(W) + dz.mm(A);
}

struct Ffl : torch::autograd::Function<Ffl> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& W,
                            const at::Tensor& A, double s, at::IntArrayRef repeat, int64_t rc,
                            const c10::optional<at::Tensor>& z_in,
                            const c10::optional<at::Tensor>& res) {
    ctx->saved_data["s"] = s;
    ctx->saved_data["repeat"] = repeat.vec();
    ctx->saved_data["rc"] = rc;
    save_has_opt(ctx, z_in, "has_z_in");
    save_has_opt(ctx, res, "has_res");
    ctx->save_for_backward({x, W, A});
    at::AutoDispatchBelowADInplaceOrView below;
    return ffl_op().call(x, W, A, s, repeat, rc, z_in, res);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &W = saved[1], &A = saved[2], &grad = grads[0];
    const double s = ctx->saved_data["s"].toDouble();
    const auto N = W.sym_size(0);
    const at::Tensor gy = grad.narrow_symint(1, 0, N);
    const at::Tensor gz = untile(gy, grad.narrow_symint(1, N, grad.sym_size(1) - N), s,
                                 ctx->saved_data["repeat"].toIntVector(),
                                 ctx->saved_data["rc"].toInt());
    // Tensor inputs in order: x, W, A, then z_in and res where given.
    const size_t res_edge = 3 + ctx->saved_data["has_z_in"].toBool();
    const auto dx = maybe(ctx->needs_input_grad(0), [&] { return dy_w_plus_dz_a(gy, gz, W, A); });
    const auto dW = maybe(ctx->needs_input_grad(1), [&] { return gy.t().mm(x); });
    const auto dA = maybe(ctx->needs_input_grad(2), [&] { return gz.t().mm(x); });
    const auto dz_in = maybe(opt_needs_grad(ctx, 3, "has_z_in"), [&] { return gz; });
    const auto dres = maybe(opt_needs_grad(ctx, res_edge, "has_res"), [&] { return gy; });
    return {dx, dW, dA, at::Tensor(), at::Tensor(), at::Tensor(), dz_in, dres};
  }
};

struct Fbl : torch::autograd::Function<Fbl> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& B, double s,
                            const c10::optional<at::Tensor>& res, bool relu) {
    ctx->saved_data["s"] = s;
    ctx->saved_data["relu"] = relu;
    save_has_opt(ctx, res);
    ctx->save_for_backward({u, z, W, B});
    at::AutoDispatchBelowADInplaceOrView below;
    return fbl_op().call(u, z, W, B, s, res, relu);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &u = saved[0], &z = saved[1], &W = saved[2], &B = saved[3], &gy = grads[0];
    const double s = ctx->saved_data["s"].toDouble();
    const bool relu = ctx->saved_data["relu"].toBool();
    const at::Tensor fz = relu ? at::relu(z) : z;
    // Tensor inputs in order: u, z, W, B, res.
    const auto du = maybe(ctx->needs_input_grad(0), [&] { return gy.mm(W); });
    const auto dz = maybe(ctx->needs_input_grad(1), [&] {
      const at::Tensor d = gy.mm(B) * s;
      return relu ? d * z.gt(0) : d;
    });
    const auto dW = maybe(ctx->needs_input_grad(2), [&] { return gy.t().mm(u); });
    const auto dB = maybe(ctx->needs_input_grad(3), [&] { return gy.t().mm(fz) * s; });
    const auto dres = maybe(opt_needs_grad(ctx, 4), [&] { return gy; });
    return {du, dz, dW, dB, at::Tensor(), dres, at::Tensor()};
  }
};

struct Ffbl : torch::autograd::Function<Ffbl> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& B, const at::Tensor& A,
                            const at::Tensor& C, double s, const c10::optional<at::Tensor>& res,
                            bool relu) {
    ctx->saved_data["s"] = s;
    ctx->saved_data["relu"] = relu;
    save_has_opt(ctx, res);
    ctx->save_for_backward({u, z, W, B, A, C});
    at::AutoDispatchBelowADInplaceOrView below;
    return ffbl_op().call(u, z, W, B, A, C, s, res, relu);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &u = saved[0], &z = saved[1], &W = saved[2], &B = saved[3], &A = saved[4],
                     &C = saved[5], &grad = grads[0];
    const double s = ctx->saved_data["s"].toDouble();
    const bool relu = ctx->saved_data["relu"].toBool();
    const auto N = W.sym_size(0);
    const at::Tensor gy = grad.narrow_symint(1, 0, N);
    const at::Tensor gz2 = grad.narrow_symint(1, N, grad.sym_size(1) - N);
    const at::Tensor fz = relu ? at::relu(z) : z;
    // Tensor inputs in order: u, z, W, B, A, C, res.
    const auto du = maybe(ctx->needs_input_grad(0), [&] { return dy_w_plus_dz_a(gy, gz2, W, A); });
    const auto dz = maybe(ctx->needs_input_grad(1), [&] {
      const at::Tensor d = gy.mm(B) * s + gz2.mm(C);
      return relu ? d * z.gt(0) : d;
    });
    const auto dW = maybe(ctx->needs_input_grad(2), [&] { return gy.t().mm(u); });
    const auto dB = maybe(ctx->needs_input_grad(3), [&] { return gy.t().mm(fz) * s; });
    const auto dA = maybe(ctx->needs_input_grad(4), [&] { return gz2.t().mm(u); });
    const auto dC = maybe(ctx->needs_input_grad(5), [&] { return gz2.t().mm(fz); });
    const auto dres = maybe(opt_needs_grad(ctx, 6), [&] { return gy; });
    return {du, dz, dW, dB, dA, dC, at::Tensor(), dres, at::Tensor()};
  }
};

// The Autograd kernels: nothing to record -> straight to the device kernel.
at::Tensor ffl_autograd(const at::Tensor& x, const at::Tensor& W, const at::Tensor& A, double s,
                        at::IntArrayRef repeat, int64_t rc, const c10::optional<at::Tensor>& z_in,
                        const c10::optional<at::Tensor>& res) {
  if (!needs_grad({&x, &W, &A}, {&z_in, &res})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return ffl_op().call(x, W, A, s, repeat, rc, z_in, res);
  }
  return Ffl::apply(x, W, A, s, repeat, rc, z_in, res);
}

at::Tensor fbl_autograd(const at::Tensor& u, const at::Tensor& z, const at::Tensor& W,
                        const at::Tensor& B, double s, const c10::optional<at::Tensor>& res,
                        bool relu) {
  if (!needs_grad({&u, &z, &W, &B}, {&res})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return fbl_op().call(u, z, W, B, s, res, relu);
  }
  return Fbl::apply(u, z, W, B, s, res, relu);
}

at::Tensor ffbl_autograd(const at::Tensor& u, const at::Tensor& z, const at::Tensor& W,
                         const at::Tensor& B, const at::Tensor& A, const at::Tensor& C, double s,
                         const c10::optional<at::Tensor>& res, bool relu) {
  if (!needs_grad({&u, &z, &W, &B, &A, &C}, {&res})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return ffbl_op().call(u, z, W, B, A, C, s, res, relu);
  }
  return Ffbl::apply(u, z, W, B, A, C, s, res, relu);
}

// The pointwise ops: nothing to record -> straight to the device kernel;
// else the ATen composite they replace, whose ops record their own backward
// (the model itself calls the composite when autograd records).
at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!needs_grad({&x, &weight}, {})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return rms_norm_op().call(x, weight, eps);
  }
  check_rms_norm(x, weight);
  return rms_norm_aten(x, weight, eps);
}

at::Tensor rope_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (!needs_grad({&x, &cos, &sin}, {})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return rope_op().call(x, cos, sin);
  }
  check_rope(x, cos, sin);
  return rope_aten(x, cos, sin);
}

at::Tensor silu_mul_autograd(const at::Tensor& g, const at::Tensor& u) {
  if (!needs_grad({&g, &u}, {})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return silu_mul_op().call(g, u);
  }
  check_silu_mul(g, u);
  return at::silu(g) * u;  // silu_mul_aten writes over silu's output: not where autograd records
}

}  // namespace

TORCH_LIBRARY_IMPL(flora, Autograd, m) {
  m.impl("ffl", &ffl_autograd);
  m.impl("fbl", &fbl_autograd);
  m.impl("ffbl", &ffbl_autograd);
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("rope", &rope_autograd);
  m.impl("silu_mul", &silu_mul_autograd);
}

}  // namespace flora
