// CPU implementations of the flora ops: the decode kernels (csrc/cpu/kernels)
// for small M, the ATen baseline on fused storage everywhere else.
// Backward: csrc/common/autograd.cpp (ATen matmuls, device-generic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "../common/aten_ops.h"
#include "../common/checks.h"
#include "../common/kernel_info.h"
#include "../common/pointwise_glue.h"
#include "isa.h"
#include "kernels/attention.h"
#include "kernels/decode.h"
#include "kernels/pointwise.h"

namespace flora {
namespace {
namespace k = cpu::kernels;

// Largest M the decode kernels take, per dtype, on this machine; above it
// ATen's GEMM on the fused storage wins. Measured against ATen on the same
// data in one process (bench/kernels.py --aten-too; bench/decode_gemms.py,
// the weights streaming from memory as in a model):
// - with AMX (an Intel Xeon, bench/RESULTS.md "CPU kernels", 2026-11-23):
//   oneDNN's AMX bf16 GEMM wins from M = 8: fp32 16, bf16 4, fp16 8;
// - without it (an AMD Zen 5, AVX-512 + avx512_bf16, bench/RESULTS.md "CPU
//   decode kernels' M cutoff without AMX", 2026-11-29): bf16 16 (a layer's
//   GEMMs in 0.6-0.75x ATen's time with the weights streaming; at M = 24 a
//   tie, then oneDNN's avx512_bf16 GEMM gains with M where the kernel's
//   4 x 4 register block does not); fp32 128 and fp16 512, the largest M
//   measured (MKL's sgemm and ATen's fp16 GEMM stay behind there: 0.6-0.85x
//   and 0.2-0.4x of their time). MKL's sgemm takes its fast paths on Intel
//   CPUs only, so an Intel CPU without AMX keeps the fp32 16 measured against
//   it on the Xeon (that was MKL's AVX-512 sgemm, not AMX); its bf16 and fp16
//   GEMMs are oneDNN's / ATen's as on the Zen 5: bf16 16, fp16 512.
// - without AMX and without avx512_bf16 (an Intel Xeon, AVX-512 only,
//   bench/RESULTS.md "... without AMX or avx512_bf16", 2026-11-29): oneDNN's
//   bf16 GEMM has no bf16 dot product to run there, as ATen's fp16 has none:
//   the kernel streamed in 0.35-0.57x its time at every M measured, 1 .. 512,
//   so bf16 512 as fp16; fp32 16 confirmed against MKL (0.85x at 16, a tie at
//   24, 1.07x at 32).
// FLORA_CPU_GEMV_MAX_M, or set_cpu_gemv_max_m(), overrides all three (for
// tests and benchmarks).
struct MaxM {
  int64_t f32, bf16, f16;
  const char* basis;  // which machine the rule took them for (flora info)
};

MaxM machine_max_m() {
  static const MaxM v = [] {
    if (cpu::has_amx_bf16()) return MaxM{16, 4, 8, "cutoffs for a CPU with AMX"};
    const bool intel = cpu::is_intel();  // MKL's sgemm: fast paths on Intel CPUs only
    if (!cpu::has_avx512_bf16())         // no bf16 dot product for oneDNN either
      return intel ? MaxM{16, 512, 512, "cutoffs for an Intel CPU without AMX or avx512_bf16"}
                   : MaxM{128, 512, 512, "cutoffs for a CPU without AMX or avx512_bf16"};
    return intel ? MaxM{16, 16, 512, "cutoffs for an Intel CPU without AMX"}
                 : MaxM{128, 16, 512, "cutoffs for a CPU without AMX"};
  }();
  return v;
}

std::atomic<int64_t>& max_m_override() {  // < 0: the machine's rule
  static std::atomic<int64_t> v{[] {
    const char* env = std::getenv("FLORA_CPU_GEMV_MAX_M");
    return env && *env ? static_cast<int64_t>(std::atoll(env)) : int64_t{-1};
  }()};
  return v;
}

int64_t gemv_max_m(k::Dtype dt) {
  if (const int64_t o = max_m_override().load(std::memory_order_relaxed); o >= 0) return o;
  const MaxM m = machine_max_m();
  switch (dt) {
    case k::Dtype::kF32: return m.f32;
    case k::Dtype::kBF16: return m.bf16;
    default: return m.f16;
  }
}

std::optional<k::Path> active_path() {
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512Bf16: return k::Path::kAvx512Dot;
    case cpu::Isa::kAvx512: return k::Path::kAvx512;
    case cpu::Isa::kAvx2: return k::Path::kAvx2;
    default: return std::nullopt;
  }
}

// The decode path for this call, or nothing (-> ATen).
std::optional<k::Path> decode_path(const at::Tensor& first, int64_t M, k::Dtype* dt) {
  switch (first.scalar_type()) {
    case at::kFloat: *dt = k::Dtype::kF32; break;
    case at::kBFloat16: *dt = k::Dtype::kBF16; break;
    case at::kHalf: *dt = k::Dtype::kF16; break;
    default: return std::nullopt;  // fp64: ATen
  }
  if (M < 1 || M > gemv_max_m(*dt)) return std::nullopt;
  return active_path();
}

k::Mat mat(const at::Tensor& t) { return {t.data_ptr(), t.stride(0)}; }
k::Mat mat(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? mat(*t) : k::Mat{};
}

void parallel_rows(int64_t n, int64_t grain,
                   const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(0, n, grain, body);
}

at::Tensor ffl_cpu(const at::Tensor& x, const at::Tensor& W, const at::Tensor& A,
                   double s, at::IntArrayRef repeat, int64_t repeat_rank,
                   const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& res) {
  const auto sh = check_ffl(x, W, A, repeat, repeat_rank, z_in, res);
  k::Dtype dt{};  // set by decode_path when it returns a path
  const auto path = decode_path(x, sh.M, &dt);
  if (!path) return ffl_aten_checked(sh, x, W, A, s, repeat, repeat_rank, z_in, res);
  at::Tensor out = at::empty({sh.M, sh.N + sh.R}, x.options());
  k::FflArgs a;
  a.dt = dt, a.M = sh.M, a.K = sh.K, a.N = sh.N, a.R = sh.R;
  a.x = mat(x), a.W = mat(W), a.A = mat(A), a.z_in = mat(z_in), a.res = mat(res);
  a.s = s, a.repeat = repeat.vec(), a.repeat_rank = repeat_rank;
  a.out = out.data_ptr(), a.ldo = sh.N + sh.R;
  k::ffl_decode(*path, a, parallel_rows);
  return out;
}

// The decode path of an FBL call (the kernels read weight rows; transposed
// views, backward dx, go to ATen), or nothing.
std::optional<k::Path> fbl_path(const FblShape& sh, const at::Tensor& u, const at::Tensor& W,
                                const at::Tensor& B, k::Dtype* dt) {
  const auto path = decode_path(u, sh.M, dt);
  return path && unit_last_stride(W) && unit_last_stride(B) ? path : std::nullopt;
}

void fbl_decode_into(k::Path path, k::Dtype dt, const FblShape& sh, const at::Tensor& u,
                     const at::Tensor& z, const at::Tensor& W, const at::Tensor& B, double s,
                     const c10::optional<at::Tensor>& res, bool relu, void* out, int64_t ldo) {
  k::FblArgs a;
  a.dt = dt, a.M = sh.M, a.K = sh.K, a.N = sh.N, a.R = sh.R;
  a.u = mat(u), a.z = mat(z), a.W = mat(W), a.B = mat(B), a.res = mat(res);
  a.s = s, a.relu = relu, a.out = out, a.ldo = ldo;
  k::fbl_decode(path, a, parallel_rows);
}

at::Tensor fbl_cpu(const at::Tensor& u, const at::Tensor& z, const at::Tensor& W,
                   const at::Tensor& B, double s, const c10::optional<at::Tensor>& res,
                   bool relu) {
  const auto sh = check_fbl(u, z, W, B, res);
  k::Dtype dt{};  // set by fbl_path when it returns a path
  const auto path = fbl_path(sh, u, W, B, &dt);
  if (!path) return fbl_aten_checked(sh, u, z, W, B, s, res, relu);
  at::Tensor out = at::empty({sh.M, sh.N}, u.options());
  fbl_decode_into(*path, dt, sh, u, z, W, B, s, res, relu, out.data_ptr(), sh.N);
  return out;
}

// fbl_: the decode kernel writes y over res (each element read, then written,
// by one thread), else ATen's beta = 1 GEMMs onto res.
void fbl_inplace_cpu(const at::Tensor& res, const at::Tensor& u, const at::Tensor& z,
                     const at::Tensor& W, const at::Tensor& B, double s, bool relu) {
  const auto sh = check_fbl_inplace(res, u, z, W, B);
  k::Dtype dt{};  // set by fbl_path when it returns a path
  const auto path = fbl_path(sh, u, W, B, &dt);
  if (!path || !unit_last_stride(res)) return fbl_inplace_aten_checked(sh, res, u, z, W, B, s, relu);
  fbl_decode_into(*path, dt, sh, u, z, W, B, s, res, relu, res.data_ptr(), res.stride(0));
}

at::Tensor ffbl_cpu(const at::Tensor& u, const at::Tensor& z, const at::Tensor& W,
                    const at::Tensor& B, const at::Tensor& A, const at::Tensor& C,
                    double s, const c10::optional<at::Tensor>& res, bool relu) {
  const auto sh = check_ffbl(u, z, W, B, A, C, res);
  k::Dtype dt{};  // set by decode_path when it returns a path
  const auto path = decode_path(u, sh.M, &dt);
  if (!path) return ffbl_aten_checked(sh, u, z, W, B, A, C, s, res, relu);
  at::Tensor out = at::empty({sh.M, sh.N + sh.R2}, u.options());
  k::FfblArgs a;
  a.dt = dt, a.M = sh.M, a.K = sh.K, a.N = sh.N, a.R = sh.R, a.R2 = sh.R2;
  a.u = mat(u), a.z = mat(z), a.W = mat(W), a.B = mat(B), a.A = mat(A), a.C = mat(C);
  a.res = mat(res), a.s = s, a.relu = relu;
  a.out = out.data_ptr(), a.ldo = sh.N + sh.R2;
  k::ffbl_decode(*path, a, parallel_rows);
  return out;
}

// The pointwise kernels' dtype, or nothing (fp64, or a layout they do not
// take: ATen's composite).
std::optional<k::Dtype> pointwise_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return k::Dtype::kF32;
    case at::kBFloat16: return k::Dtype::kBF16;
    case at::kHalf: return k::Dtype::kF16;
    default: return std::nullopt;
  }
}

int64_t pointwise_grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

// The one-pass kernels are scalar loops: they beat ATen's composites (one
// vectorised kernel per step) only where the call is dispatch-bound, a decode
// step's few thousand elements; bench/RESULTS.md, "Pointwise ops".
constexpr int64_t kPointwiseMaxElems = 4096;

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight);
  const auto dt = pointwise_dtype(x.scalar_type());
  // (the elements normalised: columns handed through are a copy)
  if (!dt || x.stride(1) != 1 || !weight.is_contiguous() || x.size(0) * weight.numel() > kPointwiseMaxElems)
    return rms_norm_aten(x, weight, eps);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t M = x.size(0), d = weight.size(0), width = x.size(1);
  const void *px = x.data_ptr(), *pw = weight.data_ptr();
  void* po = out.data_ptr();
  at::parallel_for(0, M, pointwise_grain(width), [&](int64_t b, int64_t e) {
    k::rms_norm_rows(*dt, b, e, d, width, px, x.stride(0), pw, static_cast<float>(eps), po);
  });
  return out;
}

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rope(x, cos, sin);
  const auto dt = pointwise_dtype(x.scalar_type());
  if (!dt || x.stride(3) != 1 || !cos.is_contiguous() || !sin.is_contiguous() || x.numel() > kPointwiseMaxElems)
    return rope_aten(x, cos, sin);
  at::Tensor out = at::empty(x.sizes(), x.options());
  k::RopeArgs a;
  a.dt = *dt;
  fill_rope(a, x, cos, sin, out);
  const int64_t rows = a.B * a.T * a.H;
  at::parallel_for(0, rows, pointwise_grain(a.hd), [&](int64_t b, int64_t e) { k::rope_rows(a, b, e); });
  return out;
}

at::Tensor rope_cache_cpu(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                          const at::Tensor& sin, const at::Tensor& kc, const at::Tensor& vc,
                          const at::Tensor& slot) {
  check_rope_cache(qk, v, cos, sin, kc, vc, slot);
  const auto dt = pointwise_dtype(qk.scalar_type());
  const bool unit = qk.stride(3) == 1 && v.stride(3) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1;
  if (!dt || !unit || !cos.is_contiguous() || !sin.is_contiguous() || !slot.is_contiguous() ||
      qk.numel() > kPointwiseMaxElems)
    return rope_cache_aten(qk, v, cos, sin, kc, vc, slot);
  const int64_t nkv = kc.size(1), nq = qk.size(2) - nkv;
  at::Tensor q = at::empty({qk.size(0), qk.size(1), nq, qk.size(3)}, qk.options());
  k::RopeCacheArgs a;
  a.dt = *dt;
  fill_rope_cache(a, qk, v, cos, sin, kc, vc, slot, q);
  const int64_t rows = a.B * a.T * (nq + 2 * nkv);
  at::parallel_for(0, rows, pointwise_grain(a.hd), [&](int64_t b, int64_t e) { k::rope_cache_rows(a, b, e); });
  return q;
}

// SiLU x up stays ATen's two vectorised passes (silu, then the product in
// place): a scalar exp loses to them at every size measured.
at::Tensor silu_mul_cpu(const at::Tensor& g, const at::Tensor& u) {
  check_silu_mul(g, u);
  return silu_mul_aten(g, u);
}
void silu_mul_inplace_cpu(const at::Tensor& g, const at::Tensor& u) {
  check_silu_mul_inplace(g, u);
  silu_mul_inplace_aten(g, u);
}

// Decode attention: the split kernel (kernels/attention.*) at any window
// where the CPU has AVX2 (the vector body: each kv head's query heads scored
// against a block of keys at once; 0.2-0.6x SDPA's time from 64 to 4096
// keys, bench/RESULTS.md, "Decode attention"); SDPA over the grouped query
// heads for what it does not take and under the scalar body (FLORA_CPU_ISA=
// aten, or a CPU without AVX2: one key at a time, 0.7-2.1x SDPA's time at
// 64-256 keys, a loss for all but SmolLM2's heads at 64). An explicit split
// count runs either body at any window (tests, benchmarks).
// FLORA_CPU_ATTENTION_MAX_KEYS caps the window the kernel takes by default,
// for both bodies (read once; for benchmarks).
int64_t cpu_attention_max_keys(bool vector_body) {
  static const int64_t env = [] {
    const char* e = std::getenv("FLORA_CPU_ATTENTION_MAX_KEYS");
    return e && *e ? static_cast<int64_t>(std::atoll(e)) : int64_t{-1};
  }();
  if (env >= 0) return env;
  return vector_body ? std::numeric_limits<int64_t>::max() : 0;
}

k::AttentionIsa attention_isa() {
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512Bf16: return k::AttentionIsa::kAvx512Bf16;  // bf16 scores by VDPBF16PS
    case cpu::Isa::kAvx512: return k::AttentionIsa::kAvx512;
    case cpu::Isa::kAvx2: return k::AttentionIsa::kAvx2;
    default: return k::AttentionIsa::kGeneric;
  }
}

const char* attention_isa_name(k::AttentionIsa isa) {
  switch (isa) {
    case k::AttentionIsa::kAvx512Bf16: return "avx512, bf16 scores by avx512_bf16";
    case k::AttentionIsa::kAvx512: return "avx512";
    case k::AttentionIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// Keys the busiest thread runs under at::parallel_for's static partition
// (contiguous ranges of ceil(items / threads) items) of the pairs x the
// plan's splits (pair-major: items [0, i) hold i / S whole windows and
// i % S chunks), plus a per-item cost (q, the output or its partials) of
// kItemKeys keys.
int64_t attention_makespan(int64_t pairs, int64_t L, attn::SplitPlan p, int64_t threads) {
  constexpr int64_t kItemKeys = 16;
  const int64_t items = pairs * p.splits, per = attn::cdiv(items, threads);
  const auto before = [&](int64_t i) { return i / p.splits * L + i % p.splits * p.chunk + i * kItemKeys; };
  int64_t worst = 0;
  for (int64_t t0 = 0; t0 < items; t0 += per) {
    const int64_t keys = before(t0 + per < items ? t0 + per : items) - before(t0);
    worst = keys > worst ? keys : worst;
  }
  return worst;
}

// The CPU's split count: one where the (batch, kv head) pairs divide among
// the threads; else the count of at most 16 whose busiest thread runs the
// fewest keys, a split costing the time of `combine` keys more (the
// partials and the combine: ~2.5 us on this 2-core VM, ~250 keys of a
// SmolLM2 kv head (3 query heads x 64); fewer of a kv head with more query
// heads or a wider head_dim). SmolLM2's 3 kv heads on 2 threads: one split
// up to 512 keys, then 2 (3 chunks a thread, not 2 windows and 1); one kv
// head of 8 query heads x 128 on 2 threads: 2 splits from 256 keys.
int64_t cpu_attention_splits(int64_t B, int64_t nkv, int64_t G, int64_t hd, int64_t L, int64_t threads) {
  const int64_t pairs = B * nkv, tiles = attn::cdiv(L, attn::kKeyTile);
  if (threads <= 1 || tiles <= 1 || pairs % threads == 0) return 1;
  const int64_t combine = 65536 / std::max<int64_t>(G * hd, 256);
  int64_t best = 1, best_keys = attention_makespan(pairs, L, attn::decode_attention_plan(L, 1), threads);
  for (int64_t s = 2, last = 1; s <= 16 && s <= tiles; ++s) {
    const attn::SplitPlan p = attn::decode_attention_plan(L, s);
    if (p.splits == last) continue;  // the same plan as a smaller request
    last = p.splits;
    const int64_t keys = attention_makespan(pairs, L, p, threads) + combine;
    if (keys < best_keys) best = s, best_keys = keys;
  }
  return best;
}

}  // namespace

int64_t cpu_gemv_max_m(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return gemv_max_m(k::Dtype::kF32);
    case at::kBFloat16: return gemv_max_m(k::Dtype::kBF16);
    case at::kHalf: return gemv_max_m(k::Dtype::kF16);
    default: return 0;  // fp64: always ATen
  }
}

void set_cpu_gemv_max_m(int64_t m) { max_m_override().store(m < 0 ? -1 : m); }

// The kernel's dtypes, head_dims and groups; the window cap (each body's
// default, FLORA_CPU_ATTENTION_MAX_KEYS) only at the automatic split count.
bool cpu_decode_attention_takes(at::ScalarType dtype, int64_t head_dim, int64_t group, int64_t keys,
                                bool auto_splits) {
  return pointwise_dtype(dtype) && head_dim % 8 == 0 && head_dim <= k::kMaxHeadDim && group <= attn::kMaxGroup &&
         (!auto_splits || keys <= cpu_attention_max_keys(attention_isa() != k::AttentionIsa::kGeneric));
}

namespace {

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& mask, int64_t splits) {
  check_decode_attention(q, k, v, mask);
  const int64_t hd = q.size(2), G = q.size(1) / k.size(1);
  if (!decode_attention_unit(q, k, v, mask) ||
      !cpu_decode_attention_takes(q.scalar_type(), hd, G, k.size(2), splits <= 0))
    return decode_attention_aten(q, k, v, mask);
  const k::AttentionIsa isa = attention_isa();
  at::Tensor out = at::empty({q.size(0), q.size(1) * hd}, q.options()), part_o, part_ml;
  k::DecodeAttentionArgs a;
  a.dt = *pointwise_dtype(q.scalar_type());
  fill_decode_attention(a, q, k, v, mask);
  a.out = out.data_ptr();
  if (a.B == 0 || a.nq == 0) return out;
  const int64_t req = splits > 0 ? splits : cpu_attention_splits(a.B, a.nkv, G, hd, a.L, at::get_num_threads());
  fill_decode_attention_plan(a, req, part_o, part_ml, q.options());
  at::parallel_for(0, a.B * a.nkv * a.splits, 1,
                   [&](int64_t b, int64_t e) { k::decode_attention_part(a, b, e, isa); });
  if (a.splits > 1)
    at::parallel_for(0, a.B * a.nq, 1, [&](int64_t b, int64_t e) { k::decode_attention_combine(a, b, e); });
  return out;
}

}  // namespace

std::vector<KernelInfo> cpu_kernel_info() {
  const std::string base = "aten matmul on fused storage";
  const std::string back = "backward: C++ autograd, aten matmuls (csrc/common/autograd.cpp)";
  const auto path = active_path();
  const auto m = [](k::Dtype dt) { return std::to_string(gemv_max_m(dt)); };
  const std::string f32 = m(k::Dtype::kF32), bf16 = m(k::Dtype::kBF16), f16 = m(k::Dtype::kF16);
  const std::string basis = max_m_override().load() >= 0 ? "M cutoff overridden" : machine_max_m().basis;
  std::vector<KernelInfo> rows;
  for (const char* op : {"ffl", "fbl", "fbl_", "ffbl"}) {
    const bool inplace = std::string(op) == "fbl_";
    if (path) {
      rows.push_back({op, "cpu", std::string(k::path_name(*path)) + " gemv decode kernel",
                      "fp32 M <= " + f32 + ", bf16 M <= " + bf16 + ", fp16 M <= " + f16 +
                          " (fp32 accumulate; " + basis + ")"});
      rows.push_back({op, "cpu", base, "larger M, fp64"});
    } else {
      rows.push_back({op, "cpu", base, "all shapes (cpu isa: aten)"});
    }
    if (!inplace) rows.push_back({op, "cpu", back, "training"});
  }
  for (const char* op : {"rms_norm", "rope", "rope_cache_"})
    rows.push_back({op, "cpu", "one-pass kernel (transformers' roundings)",
                    "fp32 / bf16 / fp16 up to 4096 elements (decode), eager inference; else the aten composite"});
  rows.push_back({"silu_mul", "cpu", "aten silu, then the product in place", "all calls"});
  rows.push_back({"silu_mul_", "cpu", "aten silu, then the product over u", "all calls"});
  const bool vec = attention_isa() != k::AttentionIsa::kGeneric;
  const int64_t cap = cpu_attention_max_keys(vec);
  rows.push_back({"decode_attention", "cpu",
                  std::string("split-key decode attention kernel (grouped kv heads, ") +
                      attention_isa_name(attention_isa()) + ")",
                  "fp32 / bf16 / fp16, " +
                      (cap == std::numeric_limits<int64_t>::max() ? std::string("any window")
                       : cap > 0 ? "windows up to " + std::to_string(cap) + " keys (any with explicit splits)"
                                 : std::string("explicit split counts only (cpu isa: aten)")) +
                      ", head_dim a multiple of 8 up to 256, up to 8 query heads per kv head"});
  rows.push_back({"decode_attention", "cpu", "SDPA over grouped query heads", "every call the kernel does not take"});
  return rows;
}

TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("ffl", &ffl_cpu);
  m.impl("fbl", &fbl_cpu);
  m.impl("fbl_", &fbl_inplace_cpu);
  m.impl("ffbl", &ffbl_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rope", &rope_cpu);
  m.impl("rope_cache_", &rope_cache_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("silu_mul_", &silu_mul_inplace_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace flora
