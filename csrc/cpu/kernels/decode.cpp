// Composition of the decode kernels (plain x86-64 code: the vector work is
// in the rows_* files).
#include "decode.h"

namespace flora::cpu::kernels {
namespace {

void* offset(void* p, Dtype dt, int64_t elems) {
  return static_cast<char*>(p) + elems * elem_size(dt);
}

// Rows per chunk: enough work (~64K multiply-adds) to pay for a thread
// hand-off, in multiples of 16 rows so blocks stay whole.
int64_t grain(int64_t M, int64_t K) {
  const int64_t g = 65536 / (M * (K + 1) + 1);
  return g < 16 ? 16 : (g + 15) / 16 * 16;
}

// v[m, r] = scale * f(z[m, r]) in fp32.
std::vector<float> state_input(Dtype dt, const Mat& z, int64_t M, int64_t R, float scale,
                               bool relu) {
  std::vector<float> v(static_cast<size_t>(M * R));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < R; ++r) {
      float e = load_f32(dt, z.p, m * z.ld + r);
      if (relu && e < 0.f) e = 0.f;  // relu(nan) stays nan, as in torch
      v[m * R + r] = scale * e;
    }
  return v;
}

}  // namespace

void serial_for(int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& body) {
  if (n > 0) body(0, n);
}

void ffl_decode(Path p, const FflArgs& a, const ParallelFor& pf) {
  if (a.M == 0) return;
  RowsTask tz;  // z rows: x A^T (+ z_in)
  tz.dt = a.dt, tz.M = a.M, tz.K = a.K;
  tz.u = a.x.p, tz.ldu = a.x.ld, tz.P = a.A.p, tz.ldp = a.A.ld;
  tz.add = a.z_in.p, tz.ld_add = a.z_in.ld;
  tz.out = offset(a.out, a.dt, a.N), tz.ldo = a.ldo;
  RowsTask ty;  // y rows: x W^T (+ res) (+ s tile(z))
  ty.dt = a.dt, ty.M = a.M, ty.K = a.K;
  ty.u = a.x.p, ty.ldu = a.x.ld, ty.P = a.W.p, ty.ldp = a.W.ld;
  ty.add = a.res.p, ty.ld_add = a.res.ld;
  ty.out = a.out, ty.ldo = a.ldo;
  const int64_t N = a.N;
  if (a.repeat.empty()) {
    // No y row needs z: one parallel pass over the rows of [W; A].
    pf(N + a.R, grain(a.M, a.K), [&](int64_t b, int64_t e) {
      if (b < N) run_rows(p, ty, b, e < N ? e : N);
      if (e > N) run_rows(p, tz, (b > N ? b : N) - N, e - N);
    });
    return;
  }
  // The repeat-add needs z (kept in fp32) before y: z rows first.
  std::vector<float> z32(static_cast<size_t>(a.M * a.R));
  tz.out32 = z32.data(), tz.ldo32 = a.R;
  pf(a.R, grain(a.M, a.K), [&](int64_t b, int64_t e) { run_rows(p, tz, b, e); });
  std::vector<int32_t> col(static_cast<size_t>(N), -1);  // y column -> z column, or -1
  int64_t off = 0;
  for (size_t g = 0; g < a.repeat.size(); ++g) {
    for (int64_t j = 0; j < a.repeat[g]; ++j)
      col[off + j] = static_cast<int32_t>(g * a.repeat_rank + j % a.repeat_rank);
    off += a.repeat[g];
  }
  ty.tile = z32.data(), ty.ldt = a.R, ty.tile_col = col.data();
  ty.tile_s = static_cast<float>(a.s);
  pf(N, grain(a.M, a.K), [&](int64_t b, int64_t e) { run_rows(p, ty, b, e); });
}

void fbl_decode(Path p, const FblArgs& a, const ParallelFor& pf) {
  if (a.M == 0) return;
  const std::vector<float> v =
      state_input(a.dt, a.z, a.M, a.R, static_cast<float>(a.s), a.relu);
  RowsTask t;
  t.dt = a.dt, t.M = a.M, t.K = a.K, t.R = a.R;
  t.u = a.u.p, t.ldu = a.u.ld, t.P = a.W.p, t.ldp = a.W.ld;
  t.Q = a.B.p, t.ldq = a.B.ld, t.v = v.data(), t.ldv = a.R;
  t.add = a.res.p, t.ld_add = a.res.ld;
  t.out = a.out, t.ldo = a.ldo;
  pf(a.N, grain(a.M, a.K + a.R), [&](int64_t b, int64_t e) { run_rows(p, t, b, e); });
}

void ffbl_decode(Path p, const FfblArgs& a, const ParallelFor& pf) {
  if (a.M == 0) return;
  const std::vector<float> v1 =
      state_input(a.dt, a.z, a.M, a.R, static_cast<float>(a.s), a.relu);
  const std::vector<float> v2 = state_input(a.dt, a.z, a.M, a.R, 1.f, a.relu);
  RowsTask ty;  // rows [0, N): [W | B] against [u | s f(z)], + res
  ty.dt = a.dt, ty.M = a.M, ty.K = a.K, ty.R = a.R;
  ty.u = a.u.p, ty.ldu = a.u.ld, ty.P = a.W.p, ty.ldp = a.W.ld;
  ty.Q = a.B.p, ty.ldq = a.B.ld, ty.v = v1.data(), ty.ldv = a.R;
  ty.add = a.res.p, ty.ld_add = a.res.ld;
  ty.out = a.out, ty.ldo = a.ldo;
  RowsTask tz = ty;  // rows [N, N + R2): [A | C] against [u | f(z)]
  tz.P = a.A.p, tz.ldp = a.A.ld, tz.Q = a.C.p, tz.ldq = a.C.ld, tz.v = v2.data();
  tz.add = nullptr, tz.out = offset(a.out, a.dt, a.N);
  const int64_t N = a.N;
  pf(N + a.R2, grain(a.M, a.K + a.R), [&](int64_t b, int64_t e) {
    if (b < N) run_rows(p, ty, b, e < N ? e : N);
    if (e > N) run_rows(p, tz, (b > N ? b : N) - N, e - N);
  });
}

}  // namespace flora::cpu::kernels
