// CUDA implementations of the flora ops: the dispatch table
// (csrc/common/cuda_dispatch.h) picks a kernel (csrc/cuda/kernels) or the
// cuBLAS baseline on fused storage. Kernels not yet verified on a device run
// only with FLORA_CUDA_KERNELS=1. Backward runs through the autograd
// formulas in flora/ops.py (cuBLAS matmuls), except dx = dy W + dz A of FFL
// and FFBL, which is an FBL call over transposed weight views (the *_t_ GEMMs).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <mutex>
// A CPU-only torch (CI's CMake compile check) ships no c10/cuda config header.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
#define FLORA_HAVE_C10_CUDA 1
#endif

#ifdef FLORA_WITH_CUTLASS
#include "kernels/launch.h"
#endif

#include "../common/aten_ops.h"
#include "../common/checks.h"
#include "../common/cuda_dispatch.h"
#include "../common/kernel_info.h"
#include "../common/pointwise_glue.h"

namespace flora {
namespace {

// The last CUDA op call's dispatch, process-wide: autograd runs CUDA backward
// nodes on its own device thread, and a test reads it from the caller's.
std::mutex last_mu;
std::string last_dispatch;
void set_last_dispatch(std::string d) {
  const std::lock_guard<std::mutex> lock(last_mu);
  last_dispatch = std::move(d);
}

#ifdef FLORA_WITH_CUTLASS
constexpr bool kCompiled = true;
#else
constexpr bool kCompiled = false;
#endif

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    case at::kFloat: return "fp32";
    default: return "fp64";
  }
}

// Row-major with a 16-byte aligned start and row stride (2-byte elements).
bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (t.size(0) <= 1 || t.stride(0) % 8 == 0) && unit_last_stride(t);
}
// A transposed view of row-major storage (W.t() in backward dx): [K, n] rows.
bool n_major(const at::Tensor& t) { return t.stride(0) == 1 && t.stride(1) != 1; }
bool aligned16(const c10::optional<at::Tensor>& t) { return !t.has_value() || aligned16(*t); }

// Compute capability (major * 10 + minor) and SM count of a device, read
// once (ATen's CUDAContext would pull in cuBLAS / cuSPARSE headers that a
// CPU-only torch, which CI compiles this file against, does not ship).
struct DeviceInfo {
  int arch = 0, sms = 0;
};
DeviceInfo device_info(int device) {
  static DeviceInfo cache[64];
  DeviceInfo& d = cache[device & 63];
  if (d.arch == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
    d.arch = major * 10 + minor;
  }
  return d;
}

// Query fields every op shares; the caller fills the layout flags.
CudaQuery base_query(const char* op, const at::Tensor& first, int64_t M, int64_t N, int64_t K,
                     int64_t R, int64_t R2) {
  CudaQuery q;
  q.op = op;
  q.dtype = dtype_name(first.scalar_type());
  q.arch = device_info(first.get_device()).arch;
  q.M = M, q.N = N, q.K = K, q.R = R, q.R2 = R2;
  return q;
}

#ifdef FLORA_WITH_CUTLASS
namespace fc = flora::cuda;

// Leading dimension of a weight operand as the kernels read it.
int64_t ld_w(const at::Tensor& t, bool t_major) { return t_major ? t.stride(1) : t.stride(0); }

fc::Problem problem(const at::Tensor& y1, const at::Tensor* y2, float alpha2,
                    const c10::optional<at::Tensor>& c, const at::Tensor& d, bool t_major = false) {
  fc::Problem p;
  p.y1 = y1.data_ptr(), p.ldy1 = ld_w(y1, t_major);
  if (y2) p.y2 = y2->data_ptr(), p.ldy2 = ld_w(*y2, t_major);
  p.alpha2 = alpha2;
  if (c.has_value()) p.c = c->data_ptr(), p.ldc = c->stride(0);
  p.d = d.data_ptr(), p.ldd = d.stride(0), p.n = d.size(1);
  return p;
}

fc::FusedArgs args(const at::Tensor& x1, const at::Tensor* x2) {
  fc::FusedArgs a;
  a.dt = x1.scalar_type() == at::kBFloat16 ? fc::Dtype::kBF16 : fc::Dtype::kF16;
  a.M = x1.size(0), a.K1 = x1.size(1);
  a.x1 = x1.data_ptr(), a.ldx1 = x1.stride(0);
  if (x2 && x2->size(1) > 0) a.x2 = x2->data_ptr(), a.ldx2 = x2->stride(0), a.K2 = x2->size(1);
  a.sm_count = device_info(x1.get_device()).sms;
  return a;
}

// Runs the chosen kernel; false if it declined the arguments (-> cuBLAS).
bool run(const std::string& kernel, fc::FusedArgs a, const at::Tensor& like) {
#ifdef FLORA_HAVE_C10_CUDA
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
#else
  TORCH_CHECK(false, "flora: built against a torch without CUDA");
  const cudaStream_t stream = nullptr;
#endif
  const bool bf16 = a.dt == fc::Dtype::kBF16;
  cudaError_t e;
  // The repeat-add GEMMs read z: the plain GEMM writes it first (stream order).
  const bool rep = kernel.find("_rep_") != std::string::npos;
  const bool t_major = kernel.find("_t_") != std::string::npos;
  if (kernel.rfind("decode_", 0) == 0) {
    e = bf16 ? fc::decode_bf16(a, stream) : fc::decode_fp16(a, stream);
  } else if (kernel.rfind("gemm_sm80_", 0) == 0) {
#ifdef FLORA_HAVE_SM80
    const auto gemm = t_major ? (bf16 ? fc::gemm_sm80_t_bf16 : fc::gemm_sm80_t_fp16)
                              : (bf16 ? fc::gemm_sm80_bf16 : fc::gemm_sm80_fp16);
    e = gemm(rep ? fc::z_only(a) : a, stream);
    if (rep && e == cudaSuccess) e = (bf16 ? fc::gemm_sm80_rep_bf16 : fc::gemm_sm80_rep_fp16)(a, stream);
#else
    e = cudaErrorNotSupported;
#endif
  } else {
#ifdef FLORA_HAVE_SM90
    const fc::FusedArgs first = rep ? fc::z_only(a) : a;
    size_t ws_bytes = fc::gemm_sm90_workspace(first);
    if (rep) ws_bytes = std::max(ws_bytes, fc::gemm_sm90_rep_workspace(a));
    at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, like.options().dtype(at::kByte));
    const bool two = kernel.find("_2k_") != std::string::npos;
    const auto gemm = t_major && two ? (bf16 ? fc::gemm_sm90_2k_t_bf16 : fc::gemm_sm90_2k_t_fp16)
                      : t_major      ? (bf16 ? fc::gemm_sm90_t_bf16 : fc::gemm_sm90_t_fp16)
                      : two          ? (bf16 ? fc::gemm_sm90_2k_bf16 : fc::gemm_sm90_2k_fp16)
                                     : (bf16 ? fc::gemm_sm90_bf16 : fc::gemm_sm90_fp16);
    e = gemm(first, ws.data_ptr(), ws_bytes, stream);
    if (rep && e == cudaSuccess)
      e = (bf16 ? fc::gemm_sm90_rep_bf16 : fc::gemm_sm90_rep_fp16)(a, ws.data_ptr(), ws_bytes, stream);
#else
    e = cudaErrorNotSupported;
#endif
  }
  if (e == cudaErrorNotSupported) {
    set_last_dispatch("cublas: " + kernel + " declined the arguments");
    return false;
  }
  TORCH_CHECK(e == cudaSuccess, "flora: CUDA kernel ", kernel, " failed: ", cudaGetErrorString(e));
  return true;
}

bool is_decode(const std::string& k) { return k.rfind("decode_", 0) == 0; }

// An FBL over u and f(z) (relu2: the decode kernel applies f itself) into d,
// res in the epilogue (d may be res: the decode kernel reads, then writes).
fc::FusedArgs fbl_args(const FblShape& sh, const at::Tensor& u, const at::Tensor& fz,
                       const at::Tensor& W, const at::Tensor& B, double s,
                       const c10::optional<at::Tensor>& res, const at::Tensor& d, bool wt, bool relu2) {
  fc::FusedArgs a = args(u, sh.R > 0 ? &fz : nullptr);
  a.relu2 = relu2;
  a.p[0] = problem(W, sh.R > 0 ? &B : nullptr, static_cast<float>(s), res, d, wt);
  return a;
}
// The sm_90 instances that take [u | z] x [W | B] as one K range.
bool one_k_range_kernel(const std::string& k) {
  return k.rfind("gemm_sm90_", 0) == 0 && k.find("_2k_") == std::string::npos;
}
#endif

CudaChoice choose(const CudaQuery& q) {
  CudaChoice c = choose_cuda(q, kCompiled, cuda_kernels_env());
  if (c.kernel != "cublas" && !cuda_kernel_built(c.kernel))
    c = {"cublas", c.planned, c.planned + " not compiled in this build (FLORA_KERNEL_ARCHS)"};
  set_last_dispatch(c.kernel == "cublas" ? "cublas: " + c.reason : c.kernel);
  return c;
}

at::Tensor ffl_cuda(const at::Tensor& x, const at::Tensor& W, const at::Tensor& A, double s,
                    at::IntArrayRef repeat, int64_t repeat_rank,
                    const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& res) {
  const c10::DeviceGuard guard(x.device());
  const auto sh = check_ffl(x, W, A, repeat, repeat_rank, z_in, res);
  CudaQuery q = base_query("ffl", x, sh.M, sh.N, sh.K, sh.R, 0);
  q.vec_aligned = aligned16(x) && aligned16(W) && (sh.R == 0 || aligned16(A));
  q.all_aligned = q.vec_aligned && aligned16(z_in) && aligned16(res) && sh.K % 8 == 0 &&
                  sh.N % 8 == 0 && sh.R % 8 == 0;
  q.repeat_groups = static_cast<int>(repeat.size());
  q.ffl_res = res.has_value();
  const CudaChoice c = choose(q);
#ifdef FLORA_WITH_CUTLASS
  if (c.kernel != "cublas") {
    at::Tensor out = at::empty({sh.M, sh.N + sh.R}, x.options());
    fc::FusedArgs a = args(x, nullptr);
    // res rides in y's epilogue (the repeat-add GEMMs decline it: cuBLAS then)
    a.p[0] = problem(W, nullptr, 1.f, res, out.narrow(1, 0, sh.N));
    a.p[1] = problem(A, nullptr, 1.f, z_in, out.narrow(1, sh.N, sh.R));
    a.nprob = sh.R > 0 ? 2 : 1;
    a.rep.groups = q.repeat_groups, a.rep.rc = repeat_rank, a.rep.s = static_cast<float>(s);
    for (size_t g = 0; g < repeat.size(); ++g) a.rep.widths[g] = repeat[g];
    if (run(c.kernel, a, x)) return out;
  }
#endif
  return ffl_aten_checked(sh, x, W, A, s, repeat, repeat_rank, z_in, res);
}

CudaQuery fbl_query(const FblShape& sh, const at::Tensor& u, const at::Tensor& z,
                    const at::Tensor& W, const at::Tensor& B, double s,
                    const c10::optional<at::Tensor>& res, bool relu) {
  CudaQuery q = base_query("fbl", u, sh.M, sh.N, sh.K, sh.R, 0);
  // Weights as transposed views (backward dx = dy W + dz A): [K, n] rows.
  const bool wt = n_major(W) && (sh.R == 0 || n_major(B));
  const auto wal = [&](const at::Tensor& t) {
    return wt ? aligned16(t.t()) : aligned16(t);
  };
  q.weights_t = wt;
  q.vec_aligned = aligned16(u) && wal(W);
  q.all_aligned = q.vec_aligned && aligned16(res) && sh.K % 8 == 0 && sh.N % 8 == 0 &&
                  (sh.R == 0 || (aligned16(z) && wal(B) && sh.R % 8 == 0));
  q.relu = relu;
  q.one_k_range = s == 1.0 && !relu && cols_follow(u, z) && cols_follow(W, B);
  return q;
}

at::Tensor fbl_cuda(const at::Tensor& u, const at::Tensor& z, const at::Tensor& W,
                    const at::Tensor& B, double s, const c10::optional<at::Tensor>& res,
                    bool relu) {
  const c10::DeviceGuard guard(u.device());
  const auto sh = check_fbl(u, z, W, B, res);
  const CudaQuery q = fbl_query(sh, u, z, W, B, s, res, relu);
  const bool wt = q.weights_t;
  const CudaChoice c = choose(q);
#ifdef FLORA_WITH_CUTLASS
  if (c.kernel != "cublas") {
    at::Tensor y = at::empty({sh.M, sh.N}, u.options());
    // GEMMs take relu(z) staged (M x R); the decode kernel applies it itself.
    const at::Tensor fz = relu && !is_decode(c.kernel) ? at::relu(z) : z;
    if (one_k_range_kernel(c.kernel) && sh.R > 0) {  // one K range: [u | z] x [W | B]
      const at::Tensor uz = u.as_strided({sh.M, sh.K + sh.R}, {u.stride(0), 1});
      const at::Tensor WB = W.as_strided({sh.N, sh.K + sh.R}, {W.stride(0), W.stride(1)});
      fc::FusedArgs a = args(uz, nullptr);
      a.p[0] = problem(WB, nullptr, 1.f, res, y, wt);
      if (run(c.kernel, a, u)) return y;
    } else {
      if (run(c.kernel, fbl_args(sh, u, fz, W, B, s, res, y, wt, relu && is_decode(c.kernel)), u)) return y;
    }
  }
#endif
  return fbl_aten_checked(sh, u, z, W, B, s, res, relu);
}

// fbl_: the decode kernel writes y over res (its epilogue reads each element
// of C, then writes it, in one thread); the GEMM kernels' epilogues are not
// checked for C == D, so those calls take cuBLAS's beta = 1 GEMMs onto res.
void fbl_inplace_cuda(const at::Tensor& res, const at::Tensor& u, const at::Tensor& z,
                      const at::Tensor& W, const at::Tensor& B, double s, bool relu) {
  const c10::DeviceGuard guard(u.device());
  const auto sh = check_fbl_inplace(res, u, z, W, B);
  const CudaQuery q = fbl_query(sh, u, z, W, B, s, res, relu);
  const CudaChoice c = choose(q);
#ifdef FLORA_WITH_CUTLASS
  if (is_decode(c.kernel) && unit_last_stride(res)) {
    if (run(c.kernel, fbl_args(sh, u, z, W, B, s, res, res, q.weights_t, relu), u)) return;
  } else if (c.kernel != "cublas") {
    set_last_dispatch("cublas: fbl_ in place (" + c.kernel + " writes a fresh output)");
  }
#endif
  fbl_inplace_aten_checked(sh, res, u, z, W, B, s, relu);
}

at::Tensor ffbl_cuda(const at::Tensor& u, const at::Tensor& z, const at::Tensor& W,
                     const at::Tensor& B, const at::Tensor& A, const at::Tensor& C, double s,
                     const c10::optional<at::Tensor>& res, bool relu) {
  const c10::DeviceGuard guard(u.device());
  const auto sh = check_ffbl(u, z, W, B, A, C, res);
  CudaQuery q = base_query("ffbl", u, sh.M, sh.N, sh.K, sh.R, sh.R2);
  q.vec_aligned = aligned16(u) && aligned16(W) && (sh.R2 == 0 || aligned16(A));
  q.all_aligned = q.vec_aligned && aligned16(res) && sh.K % 8 == 0 && sh.N % 8 == 0 &&
                  sh.R2 % 8 == 0 &&
                  (sh.R == 0 || (aligned16(z) && aligned16(B) && aligned16(C) && sh.R % 8 == 0));
  q.relu = relu;
  q.one_k_range =
      s == 1.0 && !relu && cols_follow(u, z) && cols_follow(W, B) && cols_follow(A, C);
  const CudaChoice c = choose(q);
#ifdef FLORA_WITH_CUTLASS
  if (c.kernel != "cublas") {
    at::Tensor out = at::empty({sh.M, sh.N + sh.R2}, u.options());
    const at::Tensor y = out.narrow(1, 0, sh.N), z2 = out.narrow(1, sh.N, sh.R2);
    const at::Tensor fz = relu && !is_decode(c.kernel) ? at::relu(z) : z;
    fc::FusedArgs a;
    if (one_k_range_kernel(c.kernel) && sh.R > 0) {
      const auto wide = [&](const at::Tensor& t) {
        return t.as_strided({t.size(0), sh.K + sh.R}, {t.stride(0), 1});
      };
      a = args(wide(u), nullptr);
      a.p[0] = problem(wide(W), nullptr, 1.f, res, y);
      a.p[1] = problem(wide(A), nullptr, 1.f, c10::nullopt, z2);
    } else {
      a = args(u, sh.R > 0 ? &fz : nullptr);
      a.relu2 = relu && is_decode(c.kernel);
      a.p[0] = problem(W, sh.R > 0 ? &B : nullptr, static_cast<float>(s), res, y);
      a.p[1] = problem(A, sh.R > 0 ? &C : nullptr, 1.f, c10::nullopt, z2);
    }
    a.nprob = sh.R2 > 0 ? 2 : 1;
    if (run(c.kernel, a, u)) return out;
  }
#endif
  return ffbl_aten_checked(sh, u, z, W, B, A, C, s, res, relu);
}

// The pointwise ops: flora's one-launch kernel (pointwise.cu) when it runs
// (pointwise_kernels_run), else ATen's composite; each call records which.
bool pointwise_kernel_on(const at::Tensor& x) {
  const auto t = x.scalar_type();
  const bool dtype_ok = t == at::kBFloat16 || t == at::kHalf || t == at::kFloat;
  const auto sw = cuda_kernels_env();
  const bool on = dtype_ok && cuda_kernel_built("pointwise") && pointwise_kernels_run(sw, kCompiled);
  set_last_dispatch(on ? "pointwise"
                       : std::string("cublas: aten composite (") +
                             (!dtype_ok ? "fp64" : !kCompiled || !cuda_kernel_built("pointwise")
                                                       ? "pointwise not compiled in this build"
                                                   : sw == KernelSwitch::kOff ? "FLORA_CUDA_KERNELS=0"
                                                                              : "pointwise not verified on a device") +
                             ")");
  return on;
}

#ifdef FLORA_WITH_CUTLASS
fc::PointwiseDtype pw_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? fc::PointwiseDtype::kBF16
         : t.scalar_type() == at::kHalf   ? fc::PointwiseDtype::kF16
                                          : fc::PointwiseDtype::kF32;
}
cudaStream_t current_stream() {
#ifdef FLORA_HAVE_C10_CUDA
  return c10::cuda::getCurrentCUDAStream();
#else
  TORCH_CHECK(false, "flora: built against a torch without CUDA");
  return nullptr;
#endif
}
void check_launch(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "flora: CUDA kernel ", what, " failed: ", cudaGetErrorString(e));
}
#endif

// A pointwise op's call: its kernel into a fresh output of x's shape when it
// runs and takes the layout (launch(out) fills the arguments and launches),
// else ATen's composite.
template <typename Launch, typename Aten>
at::Tensor one_launch(const at::Tensor& x, bool layout_ok, const char* what, Launch launch, Aten aten) {
  const c10::DeviceGuard guard(x.device());
  const bool on = pointwise_kernel_on(x);
  if (on && !layout_ok) set_last_dispatch("cublas: aten composite (an operand layout the kernel does not take)");
  if (on && layout_ok) {
#ifdef FLORA_WITH_CUTLASS
    at::Tensor out = at::empty(x.sizes(), x.options());
    check_launch(launch(out), what);
    return out;
#endif
  }
  return aten();
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rms_norm(x, w);
  return one_launch(x, x.stride(1) == 1 && w.is_contiguous(), "rms_norm", [&](at::Tensor& out) {
#ifdef FLORA_WITH_CUTLASS
    fc::RmsNormArgs a;
    a.dt = pw_dtype(x), a.M = x.size(0), a.d = w.size(0), a.width = x.size(1);
    a.x = x.data_ptr(), a.ldx = x.stride(0);
    a.w = w.data_ptr(), a.eps = static_cast<float>(eps), a.out = out.data_ptr();
    return fc::rms_norm(a, current_stream());
#else
    return cudaErrorNotSupported;
#endif
  }, [&] { return rms_norm_aten(x, w, eps); });
}

at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s) {
  check_rope(x, c, s);
  const bool layout_ok = x.stride(3) == 1 && c.is_contiguous() && s.is_contiguous();
  return one_launch(x, layout_ok, "rope", [&](at::Tensor& out) {
#ifdef FLORA_WITH_CUTLASS
    fc::RopeArgs a;
    a.dt = pw_dtype(x);
    fill_rope(a, x, c, s, out);
    return fc::rope(a, current_stream());
#else
    return cudaErrorNotSupported;
#endif
  }, [&] { return rope_aten(x, c, s); });
}

at::Tensor rope_cache_cuda(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& c,
                           const at::Tensor& s, const at::Tensor& kc, const at::Tensor& vc,
                           const at::Tensor& slot) {
  check_rope_cache(qk, v, c, s, kc, vc, slot);
  const c10::DeviceGuard guard(qk.device());
  const bool unit = qk.stride(3) == 1 && v.stride(3) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1;
  if (pointwise_kernel_on(qk)) {
    if (!unit || !c.is_contiguous() || !s.is_contiguous() || !slot.is_contiguous()) {
      set_last_dispatch("cublas: aten composite (an operand layout the kernel does not take)");
    } else {
#ifdef FLORA_WITH_CUTLASS
      const int64_t nkv = kc.size(1), nq = qk.size(2) - nkv;
      at::Tensor q = at::empty({qk.size(0), qk.size(1), nq, qk.size(3)}, qk.options());
      fc::RopeCacheArgs a;
      a.dt = pw_dtype(qk);
      fill_rope_cache(a, qk, v, c, s, kc, vc, slot, q);
      check_launch(fc::rope_cache(a, current_stream()), "rope_cache_");
      return q;
#endif
    }
  }
  return rope_cache_aten(qk, v, c, s, kc, vc, slot);
}

at::Tensor silu_mul_cuda(const at::Tensor& g, const at::Tensor& u) {
  check_silu_mul(g, u);
  return one_launch(g, g.stride(1) == 1 && u.stride(1) == 1, "silu_mul", [&](at::Tensor& out) {
#ifdef FLORA_WITH_CUTLASS
    fc::SiluMulArgs a;
    a.dt = pw_dtype(g), a.M = g.size(0), a.n = g.size(1), a.g = g.data_ptr(), a.ldg = g.stride(0);
    a.u = u.data_ptr(), a.ldu = u.stride(0), a.out = out.data_ptr(), a.ldo = g.size(1);
    return fc::silu_mul(a, current_stream());
#else
    return cudaErrorNotSupported;
#endif
  }, [&] { return silu_mul_aten(g, u); });
}

void silu_mul_inplace_cuda(const at::Tensor& g, const at::Tensor& u) {
  check_silu_mul_inplace(g, u);
  const c10::DeviceGuard guard(g.device());
  if (pointwise_kernel_on(g)) {
    if (g.stride(1) != 1 || u.stride(1) != 1) {
      set_last_dispatch("cublas: aten composite (an operand layout the kernel does not take)");
    } else {
#ifdef FLORA_WITH_CUTLASS
      fc::SiluMulArgs a;  // each element is read, then written, by one thread
      a.dt = pw_dtype(g), a.M = g.size(0), a.n = g.size(1), a.g = g.data_ptr(), a.ldg = g.stride(0);
      a.u = u.data_ptr(), a.ldu = u.stride(0), a.out = u.data_ptr(), a.ldo = u.stride(0);
      check_launch(fc::silu_mul(a, current_stream()), "silu_mul_");
      return;
#endif
    }
  }
  silu_mul_inplace_aten(g, u);
}

// Decode attention: flora's split kernel (attention.cu) when it runs and takes
// the call, else SDPA over the grouped query heads; each call records which.
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& mask, int64_t splits) {
  check_decode_attention(q, k, v, mask);
  const c10::DeviceGuard guard(q.device());
  const auto sw = cuda_kernels_env();
  const bool built = cuda_kernel_built("decode_attention");
  const char* why = !kCompiled || !built ? "not compiled in this build"
                    : sw == KernelSwitch::kOff ? "FLORA_CUDA_KERNELS=0"
                                               : "not verified on a device";
  if (built && whole_op_kernel_runs("decode_attention", sw, kCompiled)) {
    why = "an empty window or batch";
    if (k.size(2) > 0 && q.size(0) > 0 && q.size(1) > 0) {
#ifdef FLORA_WITH_CUTLASS
      fc::DecodeAttentionArgs a;
      a.dt = pw_dtype(q);
      fill_decode_attention(a, q, k, v, mask);
      if (decode_attention_unit(q, k, v, mask) && fc::decode_attention_takes(a)) {
        at::Tensor out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options()), part_o, part_ml;
        a.out = out.data_ptr();
        const int64_t req =
            splits > 0 ? splits
                       : attn::decode_attention_auto_splits(a.B, a.nkv, a.L, device_info(q.get_device()).sms);
        fill_decode_attention_plan(a, req, part_o, part_ml, q.options());
        check_launch(fc::decode_attention(a, current_stream()), "decode_attention");
        set_last_dispatch("decode_attention");
        return out;
      }
#endif
      why = "the kernel takes bf16 / fp16, head_dim 64 or 128, up to 8 query heads per kv head, "
            "16-byte aligned cache rows";
    }
  }
  set_last_dispatch(std::string("cublas: aten sdpa (decode_attention ") + why + ")");
  return decode_attention_aten(q, k, v, mask);
}

}  // namespace

std::string cuda_last_dispatch() {
  const std::lock_guard<std::mutex> lock(last_mu);
  return last_dispatch;
}

std::vector<KernelInfo> cuda_kernel_info() {
  // One line per op; flora.info() lists each kernel's state (cuda kernels:).
  int verified = 0;
  for (const auto& k : cuda_kernels()) verified += !cuda_kernel_verified(k.name).empty();
  const std::string state =
      !kCompiled ? "not compiled in this build"
      : verified ? std::to_string(verified) + " verified on a device, run by default only where they beat "
                   "cuBLAS there (" + measured_faster_shapes() + "); FLORA_CUDA_KERNELS=1 runs every kernel"
      : cuda_kernels_env() == KernelSwitch::kAll ? "not verified on a device; ON (FLORA_CUDA_KERNELS=1)"
                           : "not verified on a device; off (FLORA_CUDA_KERNELS=1 runs them)";
  std::vector<KernelInfo> rows;
  for (const char* op : {"ffl", "fbl", "ffbl"}) {
    rows.push_back({op, "cuda", "decode kernel (M <= 16), CUTLASS sm_80 / sm_90a GEMMs (M > 16)", state});
    rows.push_back({op, "cuda", "cuBLAS (aten) on fused storage",
                     "every call no kernel takes (flora._C.cuda_dispatch says why)"});
  }
  rows.push_back({"fbl_", "cuda", "decode kernel over res (M <= 16)", state});
  rows.push_back({"fbl_", "cuda", "cuBLAS (aten) beta = 1 GEMMs onto res", "every other call"});
  // a kernel that runs for every call it takes once verified (pointwise, decode_attention)
  const auto whole_op = [](const std::string& name, const std::string& verified_scope) -> std::string {
    if (!kCompiled) return "not compiled in this build";
    if (!cuda_kernel_verified(name).empty()) return "verified on " + cuda_kernel_verified(name) + ": " + verified_scope;
    return cuda_kernels_env() == KernelSwitch::kAll ? "not verified on a device; ON (FLORA_CUDA_KERNELS=1)"
                                                    : "not verified on a device; off (FLORA_CUDA_KERNELS=1 runs it)";
  };
  const std::string pw = whole_op("pointwise", "every bf16 / fp16 / fp32 call");
  for (const char* op : {"rms_norm", "rope", "rope_cache_", "silu_mul", "silu_mul_"}) {
    rows.push_back({op, "cuda", "pointwise kernel (one launch)", pw});
    rows.push_back({op, "cuda", "aten composite", "every call the kernel does not take"});
  }
  const std::string da = whole_op("decode_attention", "every call it takes");
  rows.push_back({"decode_attention", "cuda", "split-key kernel (bf16 / fp16, hd 64 / 128, <= 8 q heads per kv head)", da});
  rows.push_back({"decode_attention", "cuda", "SDPA over grouped query heads (memory-efficient)",
                  "every call the kernel does not take"});
  return rows;
}

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("ffl", &ffl_cuda);
  m.impl("fbl", &fbl_cuda);
  m.impl("fbl_", &fbl_inplace_cuda);
  m.impl("ffbl", &ffbl_cuda);
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rope", &rope_cuda);
  m.impl("rope_cache_", &rope_cache_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
  m.impl("silu_mul_", &silu_mul_inplace_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace flora
