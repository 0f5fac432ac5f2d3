// The flora ops through the dispatcher, from C++ with no Python: each op
// against a double-precision composition of plain ATen calls.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

namespace {

at::Tensor call_ffl(const at::Tensor& x, const at::Tensor& W, const at::Tensor& A,
                    double s, std::vector<int64_t> repeat, int64_t rc,
                    c10::optional<at::Tensor> z_in, c10::optional<at::Tensor> res = c10::nullopt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::ffl", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double, at::IntArrayRef,
                                         int64_t, const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&)>();
  return op.call(x, W, A, s, repeat, rc, z_in, res);
}

at::Tensor call_fbl(const at::Tensor& u, const at::Tensor& z, const at::Tensor& W,
                    const at::Tensor& B, double s, c10::optional<at::Tensor> res,
                    bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::fbl", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, double,
                                         const c10::optional<at::Tensor>&, bool)>();
  return op.call(u, z, W, B, s, res, relu);
}

at::Tensor call_ffbl(const at::Tensor& u, const at::Tensor& z, const at::Tensor& W,
                     const at::Tensor& B, const at::Tensor& A, const at::Tensor& C,
                     double s, c10::optional<at::Tensor> res, bool relu) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("flora::ffbl", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            double, const c10::optional<at::Tensor>&, bool)>();
  return op.call(u, z, W, B, A, C, s, res, relu);
}

at::Tensor d(const at::Tensor& t) { return t.to(at::kDouble); }

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol) {
  ASSERT_EQ(got.sizes(), want.sizes());
  const double err = (d(got) - want).abs().max().item<double>();
  EXPECT_LE(err, tol) << "max abs error " << err;
}

TEST(FloraOps, FflFusedAndSeparateStorage) {
  at::manual_seed(0);
  const int64_t M = 5, K = 37, N = 24, R = 6;
  at::Tensor x = at::randn({M, K + 3}).narrow(1, 1, K);  // row-strided view
  at::Tensor storage = at::randn({N + R, K});
  at::Tensor W = storage.narrow(0, 0, N), A = storage.narrow(0, N, R);
  at::Tensor z_in = at::randn({M, R});
  at::Tensor z = at::mm(d(x), d(A).t()) + d(z_in);
  at::Tensor y = at::mm(d(x), d(W).t());
  y.narrow(1, 0, 12) += 0.5 * z.narrow(1, 0, 3).repeat({1, 4});
  y.narrow(1, 12, 6) += 0.5 * z.narrow(1, 3, 3).repeat({1, 2});
  at::Tensor want = at::cat({y, z}, 1);
  expect_close(call_ffl(x, W, A, 0.5, {12, 6}, 3, z_in), want, 1e-4);
  expect_close(call_ffl(x, W.clone(), A.clone(), 0.5, {12, 6}, 3, z_in), want, 1e-4);
}

TEST(FloraOps, FblVirtualAndFusedConcat) {
  at::manual_seed(1);
  const int64_t M = 3, K = 29, N = 17, R = 7;
  at::Tensor uz = at::randn({M, K + R});
  at::Tensor WB = at::randn({N, K + R});
  at::Tensor u = uz.narrow(1, 0, K), z = uz.narrow(1, K, R);
  at::Tensor W = WB.narrow(1, 0, K), B = WB.narrow(1, K, R);
  at::Tensor res = at::randn({M, N});
  for (bool relu : {false, true}) {
    for (double s : {1.0, 0.25}) {
      at::Tensor fz = relu ? at::relu(d(z)) : d(z);
      at::Tensor want = at::mm(d(u), d(W).t()) + s * at::mm(fz, d(B).t()) + d(res);
      expect_close(call_fbl(u, z, W, B, s, res, relu), want, 1e-4);
    }
  }
}

TEST(FloraOps, FfblOneStorage) {
  at::manual_seed(2);
  const int64_t M = 4, K = 19, N = 11, R = 5;
  at::Tensor st = at::randn({N + R, K + R});
  at::Tensor W = st.narrow(0, 0, N).narrow(1, 0, K), B = st.narrow(0, 0, N).narrow(1, K, R);
  at::Tensor A = st.narrow(0, N, R).narrow(1, 0, K), C = st.narrow(0, N, R).narrow(1, K, R);
  at::Tensor uz = at::randn({M, K + R});
  at::Tensor u = uz.narrow(1, 0, K), z = uz.narrow(1, K, R);
  at::Tensor want = at::cat({at::mm(d(u), d(W).t()) + at::mm(d(z), d(B).t()),
                             at::mm(d(u), d(A).t()) + at::mm(d(z), d(C).t())}, 1);
  expect_close(call_ffbl(u, z, W, B, A, C, 1.0, c10::nullopt, false), want, 1e-4);
}

TEST(FloraOps, EmptyShapesAreValid) {
  at::Tensor x = at::randn({0, 8}), W = at::randn({4, 8}), A = at::randn({0, 8});
  EXPECT_EQ(call_ffl(x, W, A, 1.0, {}, 0, c10::nullopt).sizes(), at::IntArrayRef({0, 4}));
  at::Tensor x1 = at::randn({2, 8});
  expect_close(call_ffl(x1, W, A, 1.0, {}, 0, c10::nullopt), at::mm(d(x1), d(W).t()), 1e-5);
}

TEST(FloraOps, BadCallsThrowValueOrTypeErrors) {
  at::Tensor x = at::randn({2, 8}), W = at::randn({4, 8}), A = at::randn({2, 8});
  EXPECT_THROW(call_ffl(x, at::randn({4, 9}), A, 1.0, {}, 0, c10::nullopt), c10::ValueError);
  EXPECT_THROW(call_ffl(x, W, A.to(at::kDouble), 1.0, {}, 0, c10::nullopt), c10::TypeError);
  EXPECT_THROW(call_ffl(x.view({2, 2, 4}), W, A, 1.0, {}, 0, c10::nullopt), c10::ValueError);
  EXPECT_THROW(call_ffl(x, at::randn({8, 4}).t(), A, 1.0, {}, 0, c10::nullopt), c10::ValueError);
  EXPECT_THROW(call_ffl(x, W, A, 1.0, {3}, 2, c10::nullopt), c10::ValueError);
  at::Tensor z = at::randn({2, 3});
  EXPECT_THROW(call_fbl(x, z, W, at::randn({4, 2}), 1.0, c10::nullopt, false), c10::ValueError);
}

}  // namespace
