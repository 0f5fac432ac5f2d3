// The CPU decode kernels (csrc/cpu/kernels) against naive double-precision
// loops, one test per kernel and path. Pure C++: no torch needed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels/attention.h"
#include "cpu/kernels/decode.h"
#include "cpu/kernels/pointwise.h"
#include "cpu/kernels/rows.h"

namespace k = flora::cpu::kernels;

namespace {

// A row-major matrix stored in `dt`, with leading dimension ld >= cols.
struct Buf {
  k::Dtype dt;
  int64_t rows, cols, ld;
  std::vector<uint8_t> data;
  Buf(k::Dtype d, int64_t r, int64_t c, int64_t pad, std::mt19937& g)
      : dt(d), rows(r), cols(c), ld(c + pad),
        data(static_cast<size_t>((r * (c + pad) + 1) * k::elem_size(d))) {
    std::normal_distribution<float> n(0.f, 1.f);
    for (int64_t i = 0; i < r * ld; ++i) {
      float v = n(g);
      if (std::fabs(v) < 1e-3f) v = 0.5f;
      k::store_f32(dt, data.data(), i, v);  // rounded to dt once
    }
  }
  double at(int64_t i, int64_t j) const { return k::load_f32(dt, data.data(), i * ld + j); }
  k::Mat mat() const { return {data.data(), ld}; }
};

double eps(k::Dtype dt) {
  return dt == k::Dtype::kF32 ? 1.2e-7 : dt == k::Dtype::kBF16 ? 7.9e-3 : 9.8e-4;
}

// fp32 accumulation over n terms, then one rounding to dt, relative to the
// sum of |terms| (the usual dot-product bound, with slack).
void expect_near(double got, double want, double abs_sum, int64_t n, k::Dtype dt,
                 const std::string& where) {
  const double tol = 0.5 * eps(dt) * std::fabs(want) + 2e-7 * (n + 4) * abs_sum + 1e-30;
  EXPECT_LE(std::fabs(got - want), tol) << where << ": got " << got << " want " << want;
}

std::vector<k::Path> paths() {
  std::vector<k::Path> ps;
  for (k::Path p : {k::Path::kAvx512Dot, k::Path::kAvx512, k::Path::kAvx2})
    if (k::path_supported(p)) ps.push_back(p);
  return ps;
}

const k::Dtype kDtypes[] = {k::Dtype::kF32, k::Dtype::kBF16, k::Dtype::kF16};
const char* name(k::Dtype dt) {
  return dt == k::Dtype::kF32 ? "f32" : dt == k::Dtype::kBF16 ? "bf16" : "f16";
}

struct Shape { int64_t M, K, N, R; };
const Shape kShapes[] = {{1, 37, 53, 1}, {3, 53, 37, 7}, {17, 70, 21, 64}, {5, 100, 16, 16}, {2, 0, 9, 3}};

}  // namespace

TEST(CpuKernels, PathsDetected) {
  if (paths().empty()) GTEST_SKIP() << "no AVX2/AVX-512 on this CPU";
  EXPECT_TRUE(k::path_supported(k::Path::kAvx2));
}

TEST(CpuKernels, Ffl) {
  for (k::Path p : paths())
    for (k::Dtype dt : kDtypes)
      for (const Shape& s : kShapes) {
        std::mt19937 g(11);
        Buf x(dt, s.M, s.K, 3, g), W(dt, s.N, s.K, 2, g), A(dt, s.R, s.K, 0, g), zi(dt, s.M, s.R, 4, g);
        const int64_t rc = s.R >= 3 ? s.R / 3 : 1;
        std::vector<int64_t> rep;  // segments of width a multiple of rc, up to 2
        for (int64_t left = s.N, gi = 0; gi < 2 && gi < s.R / rc && left >= rc; ++gi) {
          rep.push_back((left / 2 + rc - 1) / rc * rc <= left ? (left / 2 + rc - 1) / rc * rc : rc);
          left -= rep.back();
        }
        k::FflArgs a;
        a.dt = dt, a.M = s.M, a.K = s.K, a.N = s.N, a.R = s.R;
        a.x = x.mat(), a.W = W.mat(), a.A = A.mat(), a.z_in = zi.mat();
        a.s = 0.75, a.repeat = rep, a.repeat_rank = rc;
        std::vector<uint8_t> out(static_cast<size_t>(s.M * (s.N + s.R) * k::elem_size(dt)));
        a.out = out.data(), a.ldo = s.N + s.R;
        k::ffl_decode(p, a, k::serial_for);
        const std::string where = std::string(k::path_name(p)) + " " + name(dt) + " M=" +
                                  std::to_string(s.M) + " K=" + std::to_string(s.K);
        for (int64_t m = 0; m < s.M; ++m) {
          std::vector<double> z(s.R), zabs(s.R);
          for (int64_t r = 0; r < s.R; ++r) {
            z[r] = zi.at(m, r), zabs[r] = std::fabs(z[r]);
            for (int64_t kk = 0; kk < s.K; ++kk) {
              z[r] += x.at(m, kk) * A.at(r, kk);
              zabs[r] += std::fabs(x.at(m, kk) * A.at(r, kk));
            }
            expect_near(k::load_f32(dt, out.data(), m * a.ldo + s.N + r), z[r], zabs[r], s.K, dt, where);
          }
          for (int64_t n = 0, off = 0, gi = 0; n < s.N; ++n) {
            double y = 0, yabs = 0;
            for (int64_t kk = 0; kk < s.K; ++kk) {
              y += x.at(m, kk) * W.at(n, kk);
              yabs += std::fabs(x.at(m, kk) * W.at(n, kk));
            }
            while (gi < static_cast<int64_t>(rep.size()) && n >= off + rep[gi]) off += rep[gi++];
            if (gi < static_cast<int64_t>(rep.size())) {
              const int64_t c = gi * rc + (n - off) % rc;
              y += 0.75 * z[c], yabs += 0.75 * zabs[c];
            }
            expect_near(k::load_f32(dt, out.data(), m * a.ldo + n), y, yabs, s.K, dt, where);
          }
        }
      }
}

// FBL and FFBL share one check: y = u W^T + s f(z) B^T + res (+ z2).
void check_fbl_like(bool with_z2) {
  for (k::Path p : paths())
    for (k::Dtype dt : kDtypes)
      for (const Shape& s : kShapes)
        for (bool relu : {false, true}) {
          std::mt19937 g(12 + relu);
          const int64_t R2 = s.R + 2;
          Buf u(dt, s.M, s.K, 1, g), z(dt, s.M, s.R, 5, g), W(dt, s.N, s.K, 3, g), B(dt, s.N, s.R, 0, g),
              A(dt, R2, s.K, 2, g), C(dt, R2, s.R, 1, g), res(dt, s.M, s.N, 6, g);
          const double sc = 0.6;
          const int64_t width = s.N + (with_z2 ? R2 : 0);
          std::vector<uint8_t> out(static_cast<size_t>(s.M * width * k::elem_size(dt)));
          if (with_z2) {
            k::FfblArgs a;
            a.dt = dt, a.M = s.M, a.K = s.K, a.N = s.N, a.R = s.R, a.R2 = R2;
            a.u = u.mat(), a.z = z.mat(), a.W = W.mat(), a.B = B.mat(), a.A = A.mat(), a.C = C.mat();
            a.res = res.mat(), a.s = sc, a.relu = relu, a.out = out.data(), a.ldo = width;
            k::ffbl_decode(p, a, k::serial_for);
          } else {
            k::FblArgs a;
            a.dt = dt, a.M = s.M, a.K = s.K, a.N = s.N, a.R = s.R;
            a.u = u.mat(), a.z = z.mat(), a.W = W.mat(), a.B = B.mat(), a.res = res.mat();
            a.s = sc, a.relu = relu, a.out = out.data(), a.ldo = width;
            k::fbl_decode(p, a, k::serial_for);
          }
          const std::string where = std::string(k::path_name(p)) + " " + name(dt) +
                                    " M=" + std::to_string(s.M) + " relu=" + std::to_string(relu);
          auto f = [&](int64_t m, int64_t r) { const double v = z.at(m, r); return relu && v < 0 ? 0.0 : v; };
          for (int64_t m = 0; m < s.M; ++m) {
            for (int64_t n = 0; n < s.N; ++n) {
              double y = res.at(m, n), yabs = std::fabs(y);
              for (int64_t kk = 0; kk < s.K; ++kk)
                y += u.at(m, kk) * W.at(n, kk), yabs += std::fabs(u.at(m, kk) * W.at(n, kk));
              for (int64_t r = 0; r < s.R; ++r)
                y += sc * f(m, r) * B.at(n, r), yabs += std::fabs(sc * f(m, r) * B.at(n, r));
              expect_near(k::load_f32(dt, out.data(), m * width + n), y, yabs, s.K + s.R, dt, where);
            }
            for (int64_t j = 0; with_z2 && j < R2; ++j) {
              double v = 0, vabs = 0;
              for (int64_t kk = 0; kk < s.K; ++kk)
                v += u.at(m, kk) * A.at(j, kk), vabs += std::fabs(u.at(m, kk) * A.at(j, kk));
              for (int64_t r = 0; r < s.R; ++r)
                v += f(m, r) * C.at(j, r), vabs += std::fabs(f(m, r) * C.at(j, r));
              expect_near(k::load_f32(dt, out.data(), m * width + s.N + j), v, vabs, s.K + s.R, dt, where);
            }
          }
        }
}

TEST(CpuKernels, Fbl) { check_fbl_like(false); }
TEST(CpuKernels, Ffbl) { check_fbl_like(true); }

// The rows primitive on a split range (as threads see it): rows [i0, i1)
// only, nothing outside them written.
TEST(CpuKernels, RowsRange) {
  for (k::Path p : paths()) {
    std::mt19937 g(13);
    Buf u(k::Dtype::kF32, 4, 67, 0, g), P(k::Dtype::kF32, 40, 67, 1, g);
    std::vector<float> out(4 * 40, -7.f);
    k::RowsTask t;
    t.M = 4, t.K = 67, t.u = u.data.data(), t.ldu = u.ld, t.P = P.data.data(), t.ldp = P.ld;
    t.out = out.data(), t.ldo = 40;
    k::run_rows(p, t, 5, 31);
    for (int64_t m = 0; m < 4; ++m)
      for (int64_t n = 0; n < 40; ++n) {
        if (n < 5 || n >= 31) {
          EXPECT_EQ(out[m * 40 + n], -7.f);
          continue;
        }
        double y = 0, yabs = 0;
        for (int64_t kk = 0; kk < 67; ++kk) y += u.at(m, kk) * P.at(n, kk), yabs += std::fabs(u.at(m, kk) * P.at(n, kk));
        expect_near(out[m * 40 + n], y, yabs, 67, k::Dtype::kF32, k::path_name(p));
      }
  }
}

TEST(CpuKernels, ScalarConversions) {
  for (float f : {0.f, -0.f, 1.f, -2.5f, 65504.f, 6.1e-5f, 5.96e-8f, 1e-9f, 3.14159f, 70000.f}) {
    const float h = k::f16_to_f32(k::f32_to_f16(f));
    if (std::fabs(f) >= 65520.f)
      EXPECT_TRUE(std::isinf(h));
    else
      EXPECT_LE(std::fabs(h - f), std::max(std::fabs(f) * 4.9e-4f, 3e-8f)) << f;
    EXPECT_LE(std::fabs(k::bf16_to_f32(k::f32_to_bf16(f)) - f), std::fabs(f) * 3.9e-3f) << f;
  }
  EXPECT_EQ(k::f32_to_bf16(1.00390625f), 0x3f80);  // tie to even
  EXPECT_EQ(k::f32_to_f16(1.00048828125f), 0x3c00);
}

// RoPE and RMSNorm (pointwise.h): every intermediate the composites round is
// rounded to the storage dtype, so RoPE is exact against a double loop that
// rounds at the same points; RMSNorm within a few ulps (its sum's order).
TEST(PointwiseKernels, RopeRoundsLikeTheComposite) {
  for (k::Dtype dt : {k::Dtype::kF32, k::Dtype::kBF16, k::Dtype::kF16}) {
    std::mt19937 g(5);
    const int64_t B = 2, T = 3, H = 4, hd = 16, ldh = hd + 6;  // x: a row-strided view
    Buf x(dt, B * T * H, hd, 6, g), c(dt, B * T, hd, 0, g), s(dt, B * T, hd, 0, g);
    std::vector<uint8_t> out(static_cast<size_t>(B * T * H * hd * k::elem_size(dt)));
    k::RopeArgs a;
    a.dt = dt, a.T = T, a.H = H, a.hd = hd, a.x = x.data.data();
    a.sb = T * H * ldh, a.st = H * ldh, a.sh = ldh;
    a.cos = c.data.data(), a.sin = s.data.data(), a.out = out.data();
    k::rope_rows(a, 0, B * T * H);
    auto rnd = [&](double v) {
      float f = static_cast<float>(v);
      std::vector<uint8_t> one(4);
      k::store_f32(dt, one.data(), 0, f);
      return static_cast<double>(k::load_f32(dt, one.data(), 0));
    };
    for (int64_t r = 0; r < B * T * H; ++r)
      for (int64_t i = 0; i < hd; ++i) {
        const int64_t bt = r / H, j = (i + hd / 2) % hd;
        const double want = rnd(rnd(static_cast<float>(x.at(r, i)) * static_cast<float>(c.at(bt, i))) +
                                rnd(static_cast<float>(x.at(r, j)) * static_cast<float>(s.at(bt, i))));
        ASSERT_EQ(k::load_f32(dt, out.data(), r * hd + i), want) << "row " << r << " col " << i;
      }
  }
}

TEST(PointwiseKernels, RopeCacheIsRopeIntoTheCacheSlots) {
  // q rows equal rope_rows' output, k rows the same values at the cache slot,
  // v rows copied there; other slots untouched
  for (k::Dtype dt : {k::Dtype::kF32, k::Dtype::kBF16, k::Dtype::kF16}) {
    std::mt19937 g(7);
    const int64_t B = 2, T = 2, nq = 3, nkv = 1, H = nq + 2 * nkv, hd = 8, L = 5, ldh = hd;
    Buf x(dt, B * T * H, hd, 0, g), c(dt, B * T, hd, 0, g), s(dt, B * T, hd, 0, g);
    const size_t es = k::elem_size(dt);
    std::vector<uint8_t> rot(static_cast<size_t>(B * T * H * hd) * es), q(static_cast<size_t>(B * T * nq * hd) * es);
    std::vector<uint8_t> kc(static_cast<size_t>(B * nkv * L * hd) * es, 0), vc(kc.size(), 0);
    const int64_t slot[T] = {4, 1};
    k::RopeArgs ra;  // every head of [q | k | v] rotated, for reference
    ra.dt = dt, ra.T = T, ra.H = H, ra.hd = hd, ra.x = x.data.data();
    ra.sb = T * H * ldh, ra.st = H * ldh, ra.sh = ldh, ra.cos = c.data.data(), ra.sin = s.data.data();
    ra.out = rot.data();
    k::rope_rows(ra, 0, B * T * H);
    k::RopeCacheArgs a;
    a.dt = dt, a.T = T, a.nq = nq, a.nkv = nkv, a.hd = hd, a.qk = x.data.data();
    a.sb = ra.sb, a.st = ra.st, a.sh = ra.sh;
    a.v = x.data.data() + (nq + nkv) * ldh * es, a.vb = ra.sb, a.vt = ra.st, a.vh = ra.sh;
    a.cos = c.data.data(), a.sin = s.data.data(), a.q = q.data();
    a.kc = kc.data(), a.kc_b = nkv * L * hd, a.kc_h = L * hd, a.kc_l = hd;
    a.vc = vc.data(), a.vc_b = a.kc_b, a.vc_h = a.kc_h, a.vc_l = a.kc_l;
    a.slot = slot;
    k::rope_cache_rows(a, 0, B * T * H);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < hd; ++i) {
          const int64_t row = (b * T + t) * H;
          for (int64_t h = 0; h < nq; ++h)
            ASSERT_EQ(k::load_f32(dt, q.data(), ((b * T + t) * nq + h) * hd + i),
                      k::load_f32(dt, rot.data(), (row + h) * hd + i));
          ASSERT_EQ(k::load_f32(dt, kc.data(), b * a.kc_b + slot[t] * hd + i),
                    k::load_f32(dt, rot.data(), (row + nq) * hd + i));
          ASSERT_EQ(k::load_f32(dt, vc.data(), b * a.vc_b + slot[t] * hd + i), x.at(row + nq + nkv, i));
        }
    for (int64_t b = 0; b < B; ++b)  // slots 0, 2, 3: never written
      for (int64_t l : {0, 2, 3})
        for (int64_t i = 0; i < hd; ++i) ASSERT_EQ(k::load_f32(dt, kc.data(), b * a.kc_b + l * hd + i), 0.0);
  }
}

TEST(PointwiseKernels, RmsNormAgainstDouble) {
  for (k::Dtype dt : {k::Dtype::kF32, k::Dtype::kBF16, k::Dtype::kF16}) {
    std::mt19937 g(6);
    const int64_t M = 3, d = 200, width = 205;  // 5 columns handed through (zflora's z)
    Buf x(dt, M, width, 9, g), w(dt, 1, d, 0, g);
    std::vector<uint8_t> out(static_cast<size_t>(M * width * k::elem_size(dt)));
    k::rms_norm_rows(dt, 0, M, d, width, x.data.data(), x.ld, w.data.data(), 1e-5f, out.data());
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = d; i < width; ++i)
        ASSERT_EQ(k::load_f32(dt, out.data(), m * width + i), x.at(m, i)) << "handed-through col " << i;
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += x.at(m, i) * x.at(m, i);
      const double r = 1.0 / std::sqrt(ss / d + 1e-5);
      for (int64_t i = 0; i < d; ++i) {
        const double want = x.at(m, i) * r * w.at(0, i);
        // two roundings in bf16 / fp16 (normalised value, product), a few ulps in fp32
        const double tol = (dt == k::Dtype::kF32 ? 8 : 2) * eps(dt) * (std::fabs(want) + 1e-6);
        ASSERT_NEAR(k::load_f32(dt, out.data(), m * width + i), want, tol) << "row " << m << " col " << i;
      }
    }
  }
}

// Decode attention: each body (scalar, AVX2, AVX-512, AVX-512 with bf16
// scores by VDPBF16PS as the CPU has them)
// against softmax(q k^T / sqrt(hd) + mask) v in double, at shapes where the
// vector body's register blocks do not divide the work (query heads per kv
// head 1-8, head_dim 8-256, windows off every block size), split 1, 3 and one
// per tile (partials combined as the op does). A masked slot's K and V hold
// NaN: a body that read one would return NaN.
TEST(AttentionKernels, BodiesAgainstDouble) {
  std::vector<std::pair<k::AttentionIsa, const char*>> isas = {{k::AttentionIsa::kGeneric, "scalar"}};
  if (k::path_supported(k::Path::kAvx2)) isas.push_back({k::AttentionIsa::kAvx2, "avx2"});
  if (k::path_supported(k::Path::kAvx512)) isas.push_back({k::AttentionIsa::kAvx512, "avx512"});
  if (k::path_supported(k::Path::kAvx512Dot)) isas.push_back({k::AttentionIsa::kAvx512Bf16, "avx512_bf16"});
  struct S { int64_t B, nq, nkv, hd, L; };
  const S shapes[] = {{1, 1, 1, 8, 3},    {2, 3, 1, 64, 257}, {1, 5, 1, 72, 130}, {2, 4, 2, 96, 150},
                      {2, 7, 1, 128, 77}, {1, 8, 2, 256, 40}, {1, 12, 3, 64, 700}};
  for (auto [isa, isa_name] : isas)
    for (k::Dtype dt : kDtypes)
      for (const S& sh : shapes)
        for (int64_t req : {int64_t{1}, int64_t{3}, int64_t{1000}}) {
          std::mt19937 g(static_cast<unsigned>(sh.L * 7 + sh.hd));
          const int64_t G = sh.nq / sh.nkv, L = sh.L, hd = sh.hd, pad = 3;
          Buf q(dt, sh.B * sh.nq, hd, 0, g);
          Buf kc(dt, sh.B * sh.nkv * (L + pad), hd, 0, g), vc(dt, sh.B * sh.nkv * (L + pad), hd, 0, g);
          std::vector<float> mask(static_cast<size_t>(sh.B * L));
          std::uniform_real_distribution<float> u(0.f, 1.f);
          for (int64_t b = 0; b < sh.B; ++b)
            for (int64_t j = 0; j < L; ++j)
              mask[b * L + j] = u(g) < 0.3f || (b == 0 && j < L / 2) ? -INFINITY : 2.f * u(g) - 1.f;
          std::vector<uint8_t> mbuf(mask.size() * k::elem_size(dt));
          for (size_t i = 0; i < mask.size(); ++i) k::store_f32(dt, mbuf.data(), static_cast<int64_t>(i), mask[i]);
          for (size_t i = 0; i < mask.size(); ++i) mask[i] = static_cast<float>(k::load_f32(dt, mbuf.data(), i));
          for (int64_t b = 0; b < sh.B; ++b)  // NaN in every masked slot's K and V
            for (int64_t h = 0; h < sh.nkv; ++h)
              for (int64_t j = 0; j < L; ++j)
                if (mask[b * L + j] == -INFINITY)
                  for (int64_t d = 0; d < hd; ++d) {
                    const int64_t e = ((b * sh.nkv + h) * (L + pad) + j) * hd + d;
                    k::store_f32(dt, kc.data.data(), e, NAN), k::store_f32(dt, vc.data.data(), e, NAN);
                  }
          k::DecodeAttentionArgs a;
          a.dt = dt, a.B = sh.B, a.nq = sh.nq, a.nkv = sh.nkv, a.L = L, a.hd = hd;
          a.q = q.data.data(), a.qb = sh.nq * hd, a.qh = hd;
          a.k = kc.data.data(), a.kb = sh.nkv * (L + pad) * hd, a.kh = (L + pad) * hd, a.kl = hd;
          a.v = vc.data.data(), a.vb = a.kb, a.vh = a.kh, a.vl = hd;
          a.mask = mbuf.data(), a.mb = L;
          a.scale = 1.f / std::sqrt(static_cast<float>(hd));
          const auto plan = flora::attn::decode_attention_plan(L, req);
          a.splits = plan.splits, a.chunk = plan.chunk;
          std::vector<uint8_t> out(static_cast<size_t>(sh.B * sh.nq * hd * k::elem_size(dt)));
          std::vector<float> po(static_cast<size_t>(sh.B * sh.nq * a.splits * hd)), pml(po.size() / hd * 2);
          a.out = out.data(), a.part_o = po.data(), a.part_ml = pml.data();
          k::decode_attention_part(a, 0, sh.B * sh.nkv * a.splits, isa);
          if (a.splits > 1) k::decode_attention_combine(a, 0, sh.B * sh.nq);
          for (int64_t b = 0; b < sh.B; ++b)
            for (int64_t h = 0; h < sh.nq; ++h) {
              const int64_t hk = h / G;
              std::vector<double> w(static_cast<size_t>(L), 0.0);
              double mx = -INFINITY, sum = 0.0;
              for (int64_t j = 0; j < L; ++j) {
                if (mask[b * L + j] == -INFINITY) continue;
                const int64_t row = (b * sh.nkv + hk) * (L + pad) + j;
                double dot = 0;
                for (int64_t d = 0; d < hd; ++d) dot += q.at(b * sh.nq + h, d) * kc.at(row, d);
                w[j] = dot / std::sqrt(static_cast<double>(hd)) + mask[b * L + j];
                mx = std::max(mx, w[j]);
              }
              for (int64_t j = 0; j < L; ++j)
                w[j] = mask[b * L + j] == -INFINITY ? 0.0 : std::exp(w[j] - mx), sum += w[j];
              for (int64_t d = 0; d < hd; ++d) {
                double want = 0, mag = 0;
                for (int64_t j = 0; j < L; ++j) {
                  if (w[j] == 0.0) continue;
                  const double x = vc.at((b * sh.nkv + hk) * (L + pad) + j, d);
                  want += w[j] * x / sum, mag += w[j] * std::fabs(x) / sum;
                }
                const double got = k::load_f32(dt, out.data(), (b * sh.nq + h) * hd + d);
                // the output's rounding, and fp32 scores of a few ulps each (exp2 of an
                // error of ~1e-6 in the log2 domain) over the weights
                const double tol = 0.5 * eps(dt) * std::fabs(want) + 2e-5 * mag + 1e-6;
                ASSERT_NEAR(got, want, tol) << isa_name << " " << name(dt) << " B" << sh.B << " nq" << sh.nq
                                            << " nkv" << sh.nkv << " hd" << hd << " L" << L << " splits "
                                            << a.splits << " row " << b << " head " << h << " d " << d;
              }
            }
        }
}
