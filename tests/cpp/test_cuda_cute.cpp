// CuTe layouts on the host: the tiling and predication the CUTLASS GEMMs
// see for flora's operands, for odd shapes (M = 1, 3, 17, 1000; N and K off
// the tile; R = 1, 7, 32, 256). Built when CMake finds the CUTLASS headers
// (FLORA_CUTLASS_DIR or third_party/cutlass) and the CUDA headers; else the
// tests skip.
#include <gtest/gtest.h>

#if FLORA_HAVE_CUTE
#include <cute/tensor.hpp>

#include <vector>

#include "cuda/kernels/plan.h"

using namespace cute;
namespace plan = flora::cuda::plan;

namespace {
constexpr int64_t kMs[] = {1, 3, 17, 1000};
constexpr int64_t kRs[] = {1, 7, 32, 256};
}  // namespace

// The sm_90 kernel reads [u | z] as ONE (M, K + R) operand of row stride ld
// (register.cpp: as_strided over u when z follows u). Its CuTe layout must put
// column K + r of row m exactly on z(m, r), and TMA needs 16-byte strides.
TEST(CudaCute, OneKRangeViewAddressesZ) {
  for (int64_t M : kMs)
    for (int64_t R : kRs) {
      const int64_t K = 1000, ld = (K + R + 7) / 8 * 8 + 8;  // a fused [u | z] buffer
      auto uz = make_layout(make_shape(M, K + R), make_stride(ld, Int<1>{}));
      auto z = make_layout(make_shape(M, R), make_stride(ld, Int<1>{}));
      const int64_t z_off = K;  // z = u + K elements
      for (int64_t m = 0; m < M; m += (M > 8 ? 7 : 1))
        for (int64_t r = 0; r < R; ++r) ASSERT_EQ(uz(m, K + r), z_off + z(m, r));
      EXPECT_EQ(ld * 2 % 16, 0);  // bf16 rows: TMA-legal stride
    }
}

// CTA tiles over (M, N) with the residue predicate CUTLASS uses
// (elem_less(coord, shape)): every output element exactly once, for both
// problems of a call laid out as plan::gemm_tile lays out grid.y.
TEST(CudaCute, GemmTilesPredicateEveryOutputOnce) {
  auto tile = make_shape(Int<128>{}, Int<128>{});
  for (int64_t M : kMs)
    for (int64_t n0 : {1, 130, 520})
      for (int64_t R : kRs) {
        const int64_t n[2] = {n0, R};
        std::vector<int> hits[2] = {std::vector<int>(M * n0), std::vector<int>(M * R)};
        const int64_t t0 = plan::ceil_div(n0, 128), t1 = plan::ceil_div(R, 128);
        for (int64_t bx = 0; bx < plan::ceil_div(M, 128); ++bx)
          for (int64_t by = 0; by < t0 + t1; ++by) {
            const auto t = plan::gemm_tile(bx, by, t0, 128, 128);
            auto shape = make_shape(M, n[t.prob]);
            auto cta = local_tile(make_identity_tensor(shape), tile,
                                  make_coord(t.m0 / 128, t.n0 / 128));
            for (int i = 0; i < size<0>(cta); ++i)
              for (int j = 0; j < size<1>(cta); ++j) {
                auto c = cta(i, j);
                if (elem_less(c, shape)) ++hits[t.prob][get<0>(c) * n[t.prob] + get<1>(c)];
              }
          }
        for (int p = 0; p < 2; ++p)
          for (int h : hits[p]) ASSERT_EQ(h, 1) << "M=" << M << " n0=" << n0 << " R=" << R;
      }
}

// K tiles (64 wide on sm_90, 32 on sm_80) over K + R: the residue tile is
// predicated, every k exactly once; the sm_80 kernel's two segments (R
// first, then K) together cover K + R the same way.
TEST(CudaCute, KTilesCoverBothSegments) {
  for (int64_t K : {8, 1000, 4104})
    for (int64_t R : kRs) {
      for (int tk : {32, 64}) {
        std::vector<int> hits(K + R, 0);
        auto cover = [&](int64_t base, int64_t extent) {
          auto ks = make_identity_tensor(make_shape(extent));
          for (int64_t kt = 0; kt < plan::ceil_div(extent, tk); ++kt) {
            auto t = local_tile(ks, make_shape(tk), make_coord(kt));
            for (int i = 0; i < tk; ++i)
              if (elem_less(t(i), make_shape(extent))) ++hits[base + get<0>(t(i))];
          }
        };
        cover(K, R);  // segment 2 (the adapter state) first
        cover(0, K);
        for (int h : hits) ASSERT_EQ(h, 1);
      }
    }
}

#else
TEST(CudaCute, SkippedWithoutCutlassHeaders) { GTEST_SKIP() << "no CUTLASS / CUDA headers"; }
#endif
