// Host tests of the CUDA kernels' index logic (csrc/cuda/kernels/plan.h) and
// of the CUDA dispatch table (csrc/common/cuda_dispatch.h), without a GPU.
// The decode test emulates the kernel's loops lane by lane with the same plan
// functions (k-steps per warp, 16-byte vector predicates, the halving
// butterfly with its shuffles, the cross-warp sum, the epilogue's C add and
// repeat-add) and compares with a plain reference for odd shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "common/cuda_dispatch.h"
#include "cuda/kernels/plan.h"

namespace fc = flora::cuda;
namespace plan = flora::cuda::plan;

namespace {

struct Mat {
  int64_t rows = 0, cols = 0, ld = 0;
  std::vector<float> v;
  Mat() = default;
  Mat(int64_t r, int64_t c, int64_t pad, std::mt19937& g) : rows(r), cols(c), ld(c + pad) {
    std::uniform_int_distribution<int> d(-4, 4);  // small integers: sums are exact
    v.resize(static_cast<size_t>(std::max<int64_t>(r, 1) * ld));
    for (auto& x : v) x = static_cast<float>(d(g));
  }
  float at(int64_t r, int64_t c) const { return v[r * ld + c]; }
};

struct Case {
  int64_t M, n0, n1, K1, K2;
  bool relu;
  float alpha2;
  bool c0, c1;
  fc::RepeatAdd rep;
};

// What one call must produce: problem p's [M, n_p] output.
std::vector<std::vector<float>> reference(const Case& c, const Mat& X1, const Mat& X2,
                                          const Mat (&Y1)[2], const Mat (&Y2)[2],
                                          const Mat (&C)[2]) {
  std::vector<std::vector<float>> out(2);
  const int64_t n[2] = {c.n0, c.n1};
  for (int p = 1; p >= 0; --p) {  // z before y: the repeat-add reads z
    out[p].assign(static_cast<size_t>(c.M * n[p]), 0.f);
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t j = 0; j < n[p]; ++j) {
        double s = 0, s2 = 0;
        for (int64_t k = 0; k < c.K1; ++k) s += double(X1.at(m, k)) * Y1[p].at(j, k);
        for (int64_t k = 0; k < c.K2; ++k) {
          const double x = c.relu ? std::max(0.f, X2.at(m, k)) : X2.at(m, k);
          s2 += x * Y2[p].at(j, k);
        }
        s += c.alpha2 * s2;
        if ((p == 0 && c.c0) || (p == 1 && c.c1)) s += C[p].at(m, j);
        if (p == 0 && c.rep.groups > 0) {
          int64_t off = 0;
          for (int g = 0; g < c.rep.groups; ++g) {
            if (j >= off && j < off + c.rep.widths[g])
              s += c.rep.s * out[1][m * c.n1 + g * c.rep.rc + (j - off) % c.rep.rc];
            off += c.rep.widths[g];
          }
        }
        out[p][m * n[p] + j] = static_cast<float>(s);
      }
  }
  return out;
}

// The decode kernel, emulated: same plan functions, same loop structure.
template <int MT, int ROWS>
std::vector<std::vector<float>> emulate_decode(const Case& c, const Mat& X1, const Mat& X2,
                                               const Mat (&Y1)[2], const Mat (&Y2)[2],
                                               const Mat (&C)[2]) {
  constexpr int V = MT * ROWS, W = plan::kDecodeWarps;
  std::vector<std::vector<float>> out(2);
  const int64_t n[2] = {c.n0, c.n1};
  out[0].assign(static_cast<size_t>(c.M * c.n0), NAN);  // poisoned
  out[1].assign(static_cast<size_t>(c.M * c.n1), NAN);
  auto launch = [&](int nprob, int first_prob, bool rep) {
    const int64_t na = n[first_prob], nb = nprob > 1 ? n[1] : 0;
    const int64_t grid = plan::decode_grid(na, nb, nprob, ROWS);
    for (int64_t b = 0; b < grid; ++b) {
      plan::BlockTask t = plan::decode_block_task(b, na, ROWS);
      const int p = t.prob == 0 ? first_prob : 1;
      float red[W][V];
      for (int w = 0; w < W; ++w) {
        float acc[32][V] = {};
        for (int lane = 0; lane < 32; ++lane) {
          const auto row = [&](int r) { return std::min(t.row0 + r, n[p] - 1); };
          const int64_t ksteps = plan::ceil_div(c.K1, plan::kKStep);
          for (int64_t ks = w; ks < ksteps; ks += W) {
            const int64_t k0 = ks * plan::kKStep + lane * plan::kVec;
            const int valid = plan::vec_valid(k0, c.K1);
            for (int m = 0; m < MT; ++m) {
              if (m >= c.M) continue;
              for (int r = 0; r < ROWS; ++r) {
                float s = 0;
                for (int j = 0; j < valid; ++j) s += X1.at(m, k0 + j) * Y1[p].at(row(r), k0 + j);
                acc[lane][m * ROWS + r] += s;
              }
            }
          }
          for (int64_t ch = w; ch < plan::ceil_div(c.K2, 32); ch += W) {
            const int64_t k = ch * 32 + lane;
            if (k >= c.K2) continue;
            for (int m = 0; m < MT && m < c.M; ++m) {
              float xv = X2.at(m, k);
              if (c.relu) xv = std::max(xv, 0.f);
              xv *= c.alpha2;
              for (int r = 0; r < ROWS; ++r) acc[lane][m * ROWS + r] += xv * Y2[p].at(row(r), k);
            }
          }
        }
        // The butterfly, with shuffles as reads of the partner lane's registers.
        for (int s = 0; s < 5; ++s) {
          const int off = 16 >> s, cur = V >> s;
          float next[32][V];
          for (int lane = 0; lane < 32; ++lane) {
            for (int i = 0; i < V; ++i) next[lane][i] = acc[lane][i];
            const int partner = lane ^ off;
            if (cur > 1) {
              const bool up = (lane & off) != 0, pup = (partner & off) != 0;
              for (int i = 0; i < cur / 2; ++i) {
                const float keep = up ? acc[lane][i + cur / 2] : acc[lane][i];
                const float recv = pup ? acc[partner][i] : acc[partner][i + cur / 2];
                next[lane][i] = keep + recv;
              }
            } else {
              next[lane][0] = acc[lane][0] + acc[partner][0];
            }
          }
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < V; ++i) acc[lane][i] = next[lane][i];
        }
        for (int i = 0; i < V; ++i) red[w][i] = NAN;
        const int slots = std::max(V >> 5, 1);
        for (int lane = 0; lane < 32; ++lane)
          if (plan::butterfly_owner(lane, V))
            for (int i = 0; i < slots; ++i) {
              const int idx = plan::butterfly_index(lane, i, V);
              EXPECT_TRUE(std::isnan(red[w][idx]) || red[w][idx] == acc[lane][i]);
              red[w][idx] = acc[lane][i];
            }
      }
      for (int idx = 0; idx < V; ++idx) {
        const int m = idx / ROWS, r = idx % ROWS;
        const int64_t col = t.row0 + r;
        if (m >= c.M || col >= n[p]) continue;
        float v = 0;
        for (int w = 0; w < W; ++w) v += red[w][idx];
        if ((p == 0 && c.c0) || (p == 1 && c.c1)) v += C[p].at(m, col);
        if (p == 0 && rep) {
          const int64_t src = plan::repeat_src_col(col, c.rep);
          if (src >= 0) v += c.rep.s * out[1][m * c.n1 + src];
        }
        out[p][m * n[p] + col] = v;
      }
    }
  };
  if (c.rep.groups > 0) {  // decode::launch: z first, then y with the repeat-add
    launch(1, 1, false);
    launch(1, 0, true);
  } else {
    launch(c.n1 > 0 ? 2 : 1, 0, false);
  }
  return out;
}

template <int MT, int ROWS>
void check_decode(const Case& c) {
  std::mt19937 g(static_cast<unsigned>(c.M * 131 + c.n0 * 7 + c.K1 * 3 + c.K2));
  const Mat X1(c.M, c.K1, 8, g), X2(c.M, c.K2, 3, g);
  const Mat Y1[2] = {Mat(c.n0, c.K1, 8, g), Mat(c.n1, c.K1, 16, g)};
  const Mat Y2[2] = {Mat(c.n0, c.K2, 1, g), Mat(c.n1, c.K2, 5, g)};
  const Mat C[2] = {Mat(c.M, c.n0, 2, g), Mat(c.M, c.n1, 0, g)};
  const auto want = reference(c, X1, X2, Y1, Y2, C);
  const auto got = emulate_decode<MT, ROWS>(c, X1, X2, Y1, Y2, C);
  for (int p = 0; p < 2; ++p)
    for (size_t i = 0; i < want[p].size(); ++i)
      ASSERT_EQ(got[p][i], want[p][i]) << "problem " << p << " element " << i << " M=" << c.M
                                       << " n0=" << c.n0 << " K1=" << c.K1 << " K2=" << c.K2
                                       << " MT=" << MT << " ROWS=" << ROWS;
}

template <int MT>
void check_decode_rows(const Case& c) {
  check_decode<MT, 1>(c);
  check_decode<MT, 2>(c);
  check_decode<MT, 4>(c);
}

void check_decode_all(const Case& c) {
  switch (plan::decode_m_tile(c.M)) {
    case 1: return check_decode_rows<1>(c);
    case 2: return check_decode_rows<2>(c);
    case 4: return check_decode_rows<4>(c);
    case 8: return check_decode_rows<8>(c);
    default: return check_decode_rows<16>(c);
  }
}

}  // namespace

TEST(CudaPlan, MTileCoversM) {
  for (int64_t M = 1; M <= plan::kDecodeMaxM; ++M) {
    const int t = plan::decode_m_tile(M);
    EXPECT_GE(t, M);
    EXPECT_LT(t / 2, M);
  }
}

TEST(CudaPlan, VecValid) {
  EXPECT_EQ(plan::vec_valid(0, 8), 8);
  EXPECT_EQ(plan::vec_valid(0, 7), 7);
  EXPECT_EQ(plan::vec_valid(8, 9), 1);
  EXPECT_EQ(plan::vec_valid(16, 9), 0);
}

TEST(CudaPlan, ButterflyOwnsEveryValueOnce) {
  for (int V : {1, 2, 4, 8, 16, 32, 64}) {
    std::multiset<int> seen;
    for (int lane = 0; lane < 32; ++lane)
      if (plan::butterfly_owner(lane, V))
        for (int i = 0; i < std::max(V >> 5, 1); ++i) seen.insert(plan::butterfly_index(lane, i, V));
    ASSERT_EQ(static_cast<int>(seen.size()), V) << V;
    for (int i = 0; i < V; ++i) EXPECT_EQ(seen.count(i), 1u) << "V=" << V << " i=" << i;
  }
}

TEST(CudaPlan, RepeatSourceColumn) {
  fc::RepeatAdd r;
  r.groups = 2, r.rc = 4, r.widths[0] = 8, r.widths[1] = 12;
  EXPECT_EQ(plan::repeat_src_col(0, r), 0);
  EXPECT_EQ(plan::repeat_src_col(5, r), 1);
  EXPECT_EQ(plan::repeat_src_col(8, r), 4);
  EXPECT_EQ(plan::repeat_src_col(19, r), 7);
  EXPECT_EQ(plan::repeat_src_col(20, r), -1);
}

TEST(CudaPlan, DecodeBlocksCoverBothProblems) {
  for (int rows : {1, 2, 4})
    for (int64_t n0 : {1, 5, 37})
      for (int64_t n1 : {0, 1, 7, 32}) {
        std::set<std::pair<int, int64_t>> cols;
        const int nprob = n1 > 0 ? 2 : 1;
        for (int64_t b = 0; b < plan::decode_grid(n0, n1, nprob, rows); ++b) {
          const auto t = plan::decode_block_task(b, n0, rows);
          for (int r = 0; r < rows; ++r)
            if (t.row0 + r < (t.prob == 0 ? n0 : n1)) EXPECT_TRUE(cols.insert({t.prob, t.row0 + r}).second);
        }
        EXPECT_EQ(static_cast<int64_t>(cols.size()), n0 + n1);
      }
}

TEST(CudaPlan, DecodeRowsPerCtaFillsTheGpu) {
  EXPECT_EQ(plan::decode_rows_per_cta(16384, 132), 4);
  EXPECT_EQ(plan::decode_rows_per_cta(2048 + 32, 132), 2);
  EXPECT_EQ(plan::decode_rows_per_cta(512, 132), 1);
  EXPECT_EQ(plan::decode_rows_per_cta(16384, 132, 16), 2);
}

// Odd shapes: M = 1, 3, 16; N, K off every tile; R = 1, 7, 32, 256.
TEST(CudaPlan, DecodeEmulationMatchesReference) {
  for (int64_t M : {1, 3, 16})
    for (int64_t K1 : {1, 7, 300, 2056})
      for (int64_t R : {0, 1, 7, 32, 256}) {
        Case c{M, 37, 0, K1, R, false, 0.5f, true, false, {}};
        check_decode_all(c);  // FBL: y = u W^T + s z B^T + res
      }
}

TEST(CudaPlan, DecodeEmulationEpilogues) {
  // FFL: y and z as two problems, z_in on z, repeat-add (2 segments) on y.
  Case ffl{3, 40, 8, 517, 0, false, 1.f, false, true, {}};
  ffl.rep.groups = 2, ffl.rep.rc = 4, ffl.rep.s = 0.25f, ffl.rep.widths[0] = 16,
  ffl.rep.widths[1] = 20;
  check_decode_all(ffl);
  // FFBL with relu: y (res) and z' from [u | relu(z)].
  Case ffbl{5, 33, 7, 260, 7, true, 2.f, true, false, {}};
  check_decode_all(ffbl);
  Case one{1, 1, 1, 8, 1, true, 1.f, false, false, {}};
  check_decode_all(one);
}

TEST(CudaPlan, GemmTilesCoverEveryOutputOnce) {
  const int tm = 128, tn = 128;
  for (int64_t M : {17, 1000})
    for (int64_t n0 : {1, 130, 2048})
      for (int64_t n1 : {0, 7, 256}) {
        const int64_t t0 = plan::ceil_div(n0, tn), t1 = plan::ceil_div(n1, tn);
        int64_t covered[2] = {0, 0};
        for (int64_t bx = 0; bx < plan::ceil_div(M, tm); ++bx)
          for (int64_t by = 0; by < t0 + t1; ++by) {
            const auto t = plan::gemm_tile(bx, by, t0, tm, tn);
            const int64_t n = t.prob == 0 ? n0 : n1;
            ASSERT_LT(t.n0, n);
            covered[t.prob] += std::min<int64_t>(tm, M - t.m0) * std::min<int64_t>(tn, n - t.n0);
          }
        EXPECT_EQ(covered[0], M * n0);
        EXPECT_EQ(covered[1], M * n1);
      }
}

// The GEMM path with repeat-add, emulated: z (problem 1, its C = z_in) by the
// plain GEMM's tiles, then y's tiles (problem 0 alone) whose epilogue adds
// s * Z[m, repeat_src_col(n)] to each in-range element, for odd shapes.
TEST(CudaPlan, GemmRepeatAddEmulationMatchesReference) {
  const int tm = 128, tn = 128;
  for (int64_t M : {17, 1000})
    for (int64_t n0 : {136, 520})
      for (int64_t rc : {1, 7, 32}) {
        Case c{M, n0, 2 * rc + 8, 40, 0, false, 1.f, false, true, {}};
        c.rep.groups = 2, c.rep.rc = rc, c.rep.s = 0.5f;
        c.rep.widths[0] = (n0 / 3) / rc * rc;
        c.rep.widths[1] = (n0 - c.rep.widths[0]) / rc * rc;
        std::mt19937 g(static_cast<unsigned>(M + n0 + rc));
        const Mat X1(c.M, c.K1, 8, g), X2(c.M, 0, 0, g);
        const Mat Y1[2] = {Mat(c.n0, c.K1, 8, g), Mat(c.n1, c.K1, 0, g)};
        const Mat Y2[2] = {Mat(c.n0, 0, 0, g), Mat(c.n1, 0, 0, g)};
        const Mat C[2] = {Mat(c.M, c.n0, 0, g), Mat(c.M, c.n1, 4, g)};
        const auto want = reference(c, X1, X2, Y1, Y2, C);
        const int64_t n[2] = {c.n0, c.n1};
        std::vector<std::vector<float>> got = {std::vector<float>(M * n0, NAN),
                                               std::vector<float>(M * c.n1, NAN)};
        for (int p : {1, 0}) {  // launch order: z, then y
          const int64_t tiles = plan::ceil_div(n[p], tn);
          for (int64_t bx = 0; bx < plan::ceil_div(M, tm); ++bx)
            for (int64_t by = 0; by < tiles; ++by) {
              const auto t = plan::gemm_tile(bx, by, tiles, tm, tn);  // one problem per launch
              ASSERT_EQ(t.prob, 0);
              for (int64_t i = 0; i < tm; ++i)
                for (int64_t j = 0; j < tn; ++j) {
                  const int64_t m = t.m0 + i, col = t.n0 + j;
                  if (m >= M || col >= n[p]) continue;  // the epilogue's predicate
                  float acc = 0;
                  for (int64_t k = 0; k < c.K1; ++k) acc += X1.at(m, k) * Y1[p].at(col, k);
                  if (p == 1) acc += C[1].at(m, col);
                  if (p == 0) {
                    const int64_t src = plan::repeat_src_col(col, c.rep);
                    if (src >= 0) acc += c.rep.s * got[1][m * c.n1 + src];
                  }
                  got[p][m * n[p] + col] = acc;
                }
            }
        }
        for (int p = 0; p < 2; ++p)
          for (size_t i = 0; i < want[p].size(); ++i)
            ASSERT_EQ(got[p][i], want[p][i]) << "p=" << p << " i=" << i << " M=" << M << " rc=" << rc;
      }
}

// ---- the dispatch table ---------------------------------------------------
namespace {
flora::CudaQuery q(const char* op, const char* dt, int arch, int64_t M) {
  flora::CudaQuery x;
  x.op = op, x.dtype = dt, x.arch = arch, x.M = M, x.N = 2048, x.K = 2048, x.R = 32, x.R2 = 32;
  return x;
}
}  // namespace

TEST(CudaDispatch, Table) {
  using flora::choose_cuda;
  EXPECT_EQ(choose_cuda(q("ffl", "bf16", 90, 1), true, flora::KernelSwitch::kAll).kernel, "decode_bf16");
  EXPECT_EQ(choose_cuda(q("fbl", "fp16", 80, 16), true, flora::KernelSwitch::kAll).kernel, "decode_fp16");
  EXPECT_EQ(choose_cuda(q("fbl", "bf16", 90, 17), true, flora::KernelSwitch::kAll).kernel, "gemm_sm90_bf16");
  EXPECT_EQ(choose_cuda(q("ffbl", "bf16", 86, 1000), true, flora::KernelSwitch::kAll).kernel, "gemm_sm80_bf16");
  EXPECT_EQ(choose_cuda(q("ffl", "fp32", 90, 1), true, flora::KernelSwitch::kAll).kernel, "cublas");
  EXPECT_EQ(choose_cuda(q("ffl", "bf16", 75, 1), true, flora::KernelSwitch::kAll).kernel, "cublas");
  EXPECT_EQ(choose_cuda(q("ffl", "bf16", 100, 512), true, flora::KernelSwitch::kAll).kernel, "cublas");
}

TEST(CudaDispatch, FallbacksSayWhy) {
  using flora::choose_cuda;
  auto a = q("fbl", "bf16", 90, 512);
  a.one_k_range = false;  // s != 1, relu or split operands: the two-range instance
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "gemm_sm90_2k_bf16");
  a.op = "ffbl";
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "gemm_sm90_2k_bf16");
  a.op = "ffl";  // FFL has no second K range
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "gemm_sm90_bf16");
  a = q("fbl", "bf16", 80, 512);
  a.one_k_range = false;
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "gemm_sm80_bf16");
  a.all_aligned = false;
  auto c = choose_cuda(a, true, flora::KernelSwitch::kAll);
  EXPECT_EQ(c.kernel, "cublas");
  EXPECT_NE(c.reason.find("makes R a multiple of 8"), std::string::npos);
  a = q("ffl", "bf16", 90, 4);
  a.vec_aligned = false;
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "cublas");
  a = q("ffl", "bf16", 90, 600);
  a.repeat_groups = 9;
  EXPECT_NE(choose_cuda(a, true, flora::KernelSwitch::kAll).reason.find("more than 8 repeat-add"), std::string::npos);
}

TEST(CudaDispatch, RepeatAddGemms) {
  using flora::choose_cuda;
  auto a = q("ffl", "bf16", 90, 600);
  a.repeat_groups = 3;
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "gemm_sm90_rep_bf16");
  a.arch = 86, a.dtype = "fp16";
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "gemm_sm80_rep_fp16");
  a.all_aligned = false;  // z comes from the plain GEMM: same alignment
  EXPECT_NE(choose_cuda(a, true, flora::KernelSwitch::kAll).reason.find("R a multiple of 8"), std::string::npos);
  // Decode keeps its own repeat-add epilogue, also with res on y.
  a = q("ffl", "bf16", 90, 16);
  a.repeat_groups = 2;
  a.ffl_res = true;
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "decode_bf16");
  // The repeat-add GEMMs add no residual: cuBLAS.
  a.M = 600;
  const auto nores = choose_cuda(a, true, flora::KernelSwitch::kAll);
  EXPECT_EQ(nores.kernel, "cublas");
  EXPECT_NE(nores.reason.find("add no residual"), std::string::npos);
  // Off until verified: the reason names the repeat-add kernel.
  a = q("ffl", "bf16", 80, 512);
  a.repeat_groups = 1;
  const auto off = choose_cuda(a, true, flora::KernelSwitch::kDefault);
  EXPECT_EQ(off.kernel, "cublas");
  EXPECT_EQ(off.planned, "gemm_sm80_rep_bf16");
  EXPECT_NE(off.reason.find("gemm_sm80_rep_bf16 compiled, not verified"), std::string::npos);
}

TEST(CudaDispatch, TransposedWeightsForBackwardDx) {
  using flora::choose_cuda;
  auto a = q("fbl", "bf16", 90, 512);
  a.weights_t = true;
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "gemm_sm90_t_bf16");
  a.one_k_range = false;  // dz cloned by the repeat-add adjoint: not beside dy
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "gemm_sm90_2k_t_bf16");
  a.arch = 80;
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "gemm_sm80_t_bf16");
  a.M = 16;  // no decode kernel for [K, n] weights
  EXPECT_NE(choose_cuda(a, true, flora::KernelSwitch::kAll).reason.find("GEMM kernels only"), std::string::npos);
  a = q("ffl", "bf16", 90, 512);
  a.weights_t = true;
  EXPECT_EQ(choose_cuda(a, true, flora::KernelSwitch::kAll).kernel, "cublas");
}

TEST(CudaDispatch, AssumeVerifiedForTheDeviceRun) {
  EXPECT_EQ(flora::cuda_kernel_verified("pointwise"), "");
  setenv("FLORA_CUDA_ASSUME_VERIFIED", "decode_bf16,pointwise", 1);
  EXPECT_NE(flora::cuda_kernel_verified("pointwise"), "");
  EXPECT_NE(flora::cuda_kernel_verified("decode_bf16"), "");
  EXPECT_EQ(flora::cuda_kernel_verified("decode_fp16"), "");
  EXPECT_EQ(flora::cuda_kernel_verified("point"), "");
  setenv("FLORA_CUDA_ASSUME_VERIFIED", "all", 1);
  EXPECT_NE(flora::cuda_kernel_verified("gemm_sm90_bf16"), "");
  EXPECT_EQ(flora::cuda_kernel_verified(""), "");
  unsetenv("FLORA_CUDA_ASSUME_VERIFIED");
  EXPECT_EQ(flora::cuda_kernel_verified("pointwise"), "");
}

TEST(CudaDispatch, PointwiseKernelsFollowTheSwitch) {
  using flora::KernelSwitch;
  using flora::pointwise_kernels_run;
  EXPECT_FALSE(pointwise_kernels_run(KernelSwitch::kDefault, true));  // not verified yet
  EXPECT_TRUE(pointwise_kernels_run(KernelSwitch::kAll, true));
  EXPECT_TRUE(pointwise_kernels_run(KernelSwitch::kDefault, true, /*assume_verified=*/true));
  EXPECT_FALSE(pointwise_kernels_run(KernelSwitch::kOff, true, true));
  EXPECT_FALSE(pointwise_kernels_run(KernelSwitch::kAll, false));  // not compiled
}

TEST(CudaDispatch, UnverifiedKernelsAreOffUnlessAskedFor) {
  using flora::KernelSwitch;
  const auto off = flora::choose_cuda(q("ffl", "bf16", 90, 1), true, KernelSwitch::kDefault);
  EXPECT_EQ(off.kernel, "cublas");
  EXPECT_EQ(off.planned, "decode_bf16");
  EXPECT_NE(off.reason.find("not verified on a device"), std::string::npos);
  const auto cpu = flora::choose_cuda(q("ffl", "bf16", 90, 1), false, KernelSwitch::kAll);
  EXPECT_EQ(cpu.kernel, "cublas");
  EXPECT_NE(cpu.reason.find("not compiled"), std::string::npos);
  // FLORA_CUDA_KERNELS=0: cuBLAS even for a kernel taken as verified and faster.
  auto fbl1 = q("fbl", "bf16", 90, 1);
  EXPECT_EQ(flora::choose_cuda(fbl1, true, KernelSwitch::kDefault, true).kernel, "decode_bf16");
  const auto killed = flora::choose_cuda(fbl1, true, KernelSwitch::kOff, true);
  EXPECT_EQ(killed.kernel, "cublas");
  EXPECT_EQ(killed.planned, "decode_bf16");
  EXPECT_NE(killed.reason.find("FLORA_CUDA_KERNELS=0"), std::string::npos);
  for (const auto& k : flora::cuda_kernels()) {
    EXPECT_EQ(flora::cuda_kernel_verified(k.name), "");
#ifndef FLORA_WITH_CUTLASS
    EXPECT_FALSE(flora::cuda_kernel_built(k.name)) << k.name;  // CPU / CMake build
#endif
  }
}

// ---- decode attention (common/attention_plan.h): the split plan covers every
// key once with whole-tile chunks and no empty split; the combine of any
// split of the keys equals one softmax over all of them.
#include "common/attention_plan.h"

namespace attn = flora::attn;

TEST(DecodeAttentionPlan, SplitsCoverEveryKeyOnce) {
  for (int64_t L : {0, 1, 5, 127, 128, 129, 640, 1000, 4096, 32768 + 3}) {
    for (int64_t req : {-1, 0, 1, 2, 3, 5, 7, 64, 1000}) {
      const attn::SplitPlan p = attn::decode_attention_plan(L, req);
      ASSERT_GE(p.splits, 1);
      ASSERT_EQ(p.chunk % attn::kKeyTile, 0);
      ASSERT_LE(p.splits, std::max<int64_t>(1, req));
      // the last split starts before L (none empty) and the splits reach L
      if (L > 0) {
        ASSERT_LT((p.splits - 1) * p.chunk, L) << L << " " << req;
        ASSERT_GE(p.splits * p.chunk, L);
      }
    }
  }
  EXPECT_EQ(attn::decode_attention_plan(640, 7).splits, 5);   // 5 tiles: one each
  EXPECT_EQ(attn::decode_attention_plan(1280, 4).splits, 4);  // 10 tiles: 3, 3, 3, 1
  EXPECT_EQ(attn::decode_attention_plan(1280, 4).chunk, 3 * attn::kKeyTile);
}

TEST(DecodeAttentionPlan, AutoSplitsFillTheSms) {
  // 1B at batch 1: 8 pairs on 132 SMs -> 66 requested, as many as tiles allow
  EXPECT_EQ(attn::decode_attention_auto_splits(1, 8, 640, 132), 5);
  EXPECT_EQ(attn::decode_attention_auto_splits(1, 8, 8192, 132), 64);  // 64 tiles: one each
  EXPECT_EQ(attn::decode_attention_auto_splits(1, 8, 32768, 132), 66);
  EXPECT_EQ(attn::decode_attention_plan(32768, 66).splits, 64);  // 256 tiles: 4 each
  EXPECT_EQ(attn::decode_attention_plan(8192, 33).splits, 32);   // 64 tiles: 2 each
  // enough pairs already, or one tile: no split
  EXPECT_EQ(attn::decode_attention_auto_splits(32, 8, 8192, 132), 1);
  EXPECT_EQ(attn::decode_attention_auto_splits(1, 8, 100, 132), 1);
  EXPECT_EQ(attn::decode_attention_auto_splits(1, 3, 4096, 2), 1);  // the CPU: 3 pairs, 2 threads
}

TEST(DecodeAttentionPlan, CombineOfSplitsIsOneSoftmax) {
  std::mt19937 g(3);
  std::normal_distribution<float> n(0.f, 3.f);
  for (int trial = 0; trial < 50; ++trial) {
    const int L = 1 + trial * 7, splits = 1 + trial % 6;
    std::vector<float> s(L), v(L);
    for (int j = 0; j < L; ++j) s[j] = (j % 5 == 3) ? -INFINITY : n(g), v[j] = n(g);
    // one pass (double)
    double mx = -INFINITY, num = 0, den = 0;
    for (int j = 0; j < L; ++j) mx = std::max<double>(mx, s[j]);
    for (int j = 0; j < L; ++j)
      if (s[j] != -INFINITY) num += std::exp2(s[j] - mx) * v[j], den += std::exp2(s[j] - mx);
    const double want = den > 0 ? num / den : 0.0;
    // splits, each an online softmax over its keys in tiles of 4
    const int chunk = (L + splits - 1) / splits;
    std::vector<float> o(splits, 0.f), ml(2 * splits, 0.f);
    for (int sp = 0; sp < splits; ++sp) {
      float m = -INFINITY, l = 0.f, acc = 0.f;
      for (int t0 = sp * chunk; t0 < std::min(L, (sp + 1) * chunk); t0 += 4) {
        float tm = -INFINITY;
        const int t1 = std::min({L, (sp + 1) * chunk, t0 + 4});
        for (int j = t0; j < t1; ++j) tm = std::max(tm, s[j]);
        const float mn = std::max(m, tm), r = attn::softmax_rescale(m, mn);
        l *= r, acc *= r;
        for (int j = t0; j < t1; ++j) {
          const float w = attn::softmax_weight(s[j], mn);
          l += w, acc += w * v[j];
        }
        m = mn;
      }
      o[sp] = acc, ml[2 * sp] = m, ml[2 * sp + 1] = l;
    }
    const float got = attn::decode_attention_combine(o.data(), 1, ml.data(), splits);
    EXPECT_NEAR(got, want, 1e-4 * (1 + std::abs(want))) << "L " << L << " splits " << splits;
  }
  // nothing unmasked anywhere: 0, not NaN
  std::vector<float> o = {0.f, 0.f}, ml = {-INFINITY, 0.f, -INFINITY, 0.f};
  EXPECT_EQ(attn::decode_attention_combine(o.data(), 1, ml.data(), 2), 0.f);
}
