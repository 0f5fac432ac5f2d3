// Standalone device check of the kernel TUs, no torch: small grids, so it
// runs under compute-sanitizer (memcheck, racecheck) in seconds.
//   cmake -S . -B build -DFLORA_CUDA_KERNEL_TESTS=ON ... && cmake --build build
//   compute-sanitizer --tool memcheck build/flora_kernel_check
// Each case fills bf16 / fp16 operands (strided, in wider buffers), runs the
// kernel the device's arch has, and compares with a host fp64 reference;
// outputs start as NaN so an unwritten element fails. Exit 1 on a mismatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/kernels/launch.h"

namespace fc = flora::cuda;

namespace {

#define CHECK_CUDA(x)                                                               \
  do {                                                                              \
    const cudaError_t e_ = (x);                                                     \
    if (e_ != cudaSuccess) {                                                        \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                 \
    }                                                                               \
  } while (0)

// A host matrix of 2-byte elements (bits) with its fp64 values, and a device copy.
struct Buf {
  int64_t rows, cols, ld;
  std::vector<uint16_t> bits;
  std::vector<double> val;
  void* dev = nullptr;
  Buf(int64_t r, int64_t c, bool bf16, std::mt19937& g, bool nan = false)
      : rows(r), cols(c), ld((c + 7) / 8 * 8 + 8), bits(std::max<int64_t>(r, 1) * ld), val(bits.size()) {
    std::normal_distribution<float> d;
    for (size_t i = 0; i < bits.size(); ++i) {
      const float f = nan ? NAN : d(g);
      if (bf16) {
        const __nv_bfloat16 b = __float2bfloat16_rn(f);
        std::memcpy(&bits[i], &b, 2);
        val[i] = __bfloat162float(b);
      } else {
        const __half h = __float2half_rn(f);
        std::memcpy(&bits[i], &h, 2);
        val[i] = __half2float(h);
      }
    }
    CHECK_CUDA(cudaMalloc(&dev, bits.size() * 2));
    CHECK_CUDA(cudaMemcpy(dev, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
  }
  ~Buf() { cudaFree(dev); }
  double at(int64_t r, int64_t c) const { return val[r * ld + c]; }
  std::vector<double> download(bool bf16) {
    CHECK_CUDA(cudaMemcpy(bits.data(), dev, bits.size() * 2, cudaMemcpyDeviceToHost));
    std::vector<double> out(bits.size());
    for (size_t i = 0; i < bits.size(); ++i) {
      if (bf16) {
        __nv_bfloat16 b;
        std::memcpy(&b, &bits[i], 2);
        out[i] = __bfloat162float(b);
      } else {
        __half h;
        std::memcpy(&h, &bits[i], 2);
        out[i] = __half2float(h);
      }
    }
    return out;
  }
};

int failures = 0;

// Error relative to 1 + |want|; an unwritten (NaN) output is infinitely wrong.
double rel_err(double got, double want) {
  return std::isnan(got) ? INFINITY : std::fabs(got - want) / (1.0 + std::fabs(want));
}

#ifdef FLORA_HAVE_SM90
// Runs an sm_90a entry point with its workspace, synchronously.
template <typename F>
cudaError_t with_workspace(size_t bytes, F&& run) {
  void* ws = nullptr;
  if (bytes) CHECK_CUDA(cudaMalloc(&ws, bytes));
  const cudaError_t e = run(ws, bytes);
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaFree(ws);
  return e;
}
#endif

// FBL-shaped call (two K segments, C, alpha2), plus a second problem.
void run_case(const char* kernel, bool bf16, int64_t M, int64_t N, int64_t K, int64_t R, bool relu,
              int arch) {
  std::mt19937 g(static_cast<unsigned>(M * 7 + N + K + R));
  Buf x(M, K, bf16, g), z(M, R, bf16, g), W(N, K, bf16, g), B(N, R, bf16, g), A(R, K, bf16, g),
      Cm(R, R, bf16, g), res(M, N, bf16, g), y(M, N, bf16, g, true), z2(M, R, bf16, g, true);
  fc::FusedArgs a;
  a.dt = bf16 ? fc::Dtype::kBF16 : fc::Dtype::kF16;
  a.M = M, a.K1 = K, a.K2 = R;
  a.x1 = x.dev, a.ldx1 = x.ld, a.relu2 = relu;
  if (R > 0) a.x2 = z.dev, a.ldx2 = z.ld;
  a.p[0] = {W.dev, W.ld, B.dev, B.ld, 0.5f, res.dev, res.ld, y.dev, y.ld, N};
  a.p[1] = {A.dev, A.ld, Cm.dev, Cm.ld, 1.f, nullptr, 0, z2.dev, z2.ld, R};
  a.nprob = 2;
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&a.sm_count, cudaDevAttrMultiProcessorCount, dev));
  cudaError_t e = cudaErrorNotSupported;
  const std::string k = kernel;
  if (k == "decode") e = bf16 ? fc::decode_bf16(a, 0) : fc::decode_fp16(a, 0);
#ifdef FLORA_HAVE_SM80
  if (k == "sm80") e = bf16 ? fc::gemm_sm80_bf16(a, 0) : fc::gemm_sm80_fp16(a, 0);
#endif
#ifdef FLORA_HAVE_SM90
  if (k == "sm90" || k == "sm90_2k") {  // one K range (R = 0 here), or both into one accumulator
    const auto gemm = k == "sm90" ? (bf16 ? fc::gemm_sm90_bf16 : fc::gemm_sm90_fp16)
                                  : (bf16 ? fc::gemm_sm90_2k_bf16 : fc::gemm_sm90_2k_fp16);
    e = with_workspace(fc::gemm_sm90_workspace(a),
                       [&](void* ws, size_t bytes) { return gemm(a, ws, bytes, 0); });
  }
#endif
  CHECK_CUDA(e);
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto gy = y.download(bf16), gz = z2.download(bf16);
  double worst = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int p = 0; p < 2; ++p) {
      const int64_t n = p == 0 ? N : R;
      for (int64_t j = 0; j < n; ++j) {
        double s = 0, s2 = 0;
        for (int64_t kk = 0; kk < K; ++kk) s += x.at(m, kk) * (p == 0 ? W.at(j, kk) : A.at(j, kk));
        for (int64_t r = 0; r < R; ++r) {
          const double zv = relu ? std::max(0.0, z.at(m, r)) : z.at(m, r);
          s2 += zv * (p == 0 ? B.at(j, r) : Cm.at(j, r));
        }
        s += (p == 0 ? 0.5 : 1.0) * s2 + (p == 0 ? res.at(m, j) : 0.0);
        const double got = p == 0 ? gy[m * y.ld + j] : gz[m * z2.ld + j];
        worst = std::max(worst, rel_err(got, s));
      }
    }
  }
  const double tol = bf16 ? 2e-2 : 4e-3;
  const bool ok = worst <= tol;
  failures += !ok;
  std::printf("%-6s %s M=%-4lld N=%-4lld K=%-5lld R=%-3lld relu=%d sm_%d: max rel err %.3g %s\n", kernel,
              bf16 ? "bf16" : "fp16", (long long)M, (long long)N, (long long)K, (long long)R, relu, arch,
              worst, ok ? "ok" : "FAIL");
}

// FFL with repeat-add (M > 16): z = x A^T + z_in by the plain GEMM, then
// y = x W^T + s * tile(z) by the repeat-add instance (two segments).
void run_repeat(const char* kernel, bool bf16, int64_t M, int64_t N, int64_t K, int64_t R,
                int64_t rc, int64_t w0, int arch) {
  std::mt19937 g(static_cast<unsigned>(M * 5 + N + K + R + rc));
  Buf x(M, K, bf16, g), W(N, K, bf16, g), A(R, K, bf16, g), zin(M, R, bf16, g),
      y(M, N, bf16, g, true), z(M, R, bf16, g, true);
  fc::FusedArgs a;
  a.dt = bf16 ? fc::Dtype::kBF16 : fc::Dtype::kF16;
  a.M = M, a.K1 = K, a.x1 = x.dev, a.ldx1 = x.ld;
  a.p[0] = {W.dev, W.ld, nullptr, 0, 1.f, nullptr, 0, y.dev, y.ld, N};
  a.p[1] = {A.dev, A.ld, nullptr, 0, 1.f, zin.dev, zin.ld, z.dev, z.ld, R};
  a.nprob = 2;
  a.rep.groups = 2, a.rep.rc = rc, a.rep.s = 0.75f, a.rep.widths[0] = w0,
  a.rep.widths[1] = (N - w0) / rc * rc;
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&a.sm_count, cudaDevAttrMultiProcessorCount, dev));
  cudaError_t e = cudaErrorNotSupported;
  const std::string k = kernel;
#ifdef FLORA_HAVE_SM80
  if (k == "sm80") {
    e = bf16 ? fc::gemm_sm80_bf16(fc::z_only(a), 0) : fc::gemm_sm80_fp16(fc::z_only(a), 0);
    if (e == cudaSuccess) e = bf16 ? fc::gemm_sm80_rep_bf16(a, 0) : fc::gemm_sm80_rep_fp16(a, 0);
  }
#endif
#ifdef FLORA_HAVE_SM90
  if (k == "sm90") {
    const size_t bytes = std::max(fc::gemm_sm90_workspace(fc::z_only(a)), fc::gemm_sm90_rep_workspace(a));
    e = with_workspace(bytes, [&](void* ws, size_t n) {
      cudaError_t r = (bf16 ? fc::gemm_sm90_bf16 : fc::gemm_sm90_fp16)(fc::z_only(a), ws, n, 0);
      return r == cudaSuccess ? (bf16 ? fc::gemm_sm90_rep_bf16 : fc::gemm_sm90_rep_fp16)(a, ws, n, 0) : r;
    });
  }
#endif
  CHECK_CUDA(e);
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto gy = y.download(bf16), gz = z.download(bf16);
  double worst = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t r = 0; r < R; ++r) {
      double s = zin.at(m, r);
      for (int64_t kk = 0; kk < K; ++kk) s += x.at(m, kk) * A.at(r, kk);
      worst = std::max(worst, rel_err(gz[m * z.ld + r], s));
    }
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t kk = 0; kk < K; ++kk) s += x.at(m, kk) * W.at(j, kk);
      // The kernel reads z as stored (rounded): so does the reference.
      const int64_t src = j < w0 ? j % rc : j < w0 + a.rep.widths[1] ? rc + (j - w0) % rc : -1;
      if (src >= 0) s += 0.75 * gz[m * z.ld + src];
      worst = std::max(worst, rel_err(gy[m * y.ld + j], s));
    }
  }
  const double tol = bf16 ? 2e-2 : 4e-3;
  const bool ok = worst <= tol;
  failures += !ok;
  std::printf("%-6s %s M=%-4lld N=%-4lld K=%-5lld R=%-3lld repeat rc=%lld: max rel err %.3g %s (sm_%d)\n",
              kernel, bf16 ? "bf16" : "fp16", (long long)M, (long long)N, (long long)K, (long long)R,
              (long long)rc, worst, ok ? "ok" : "FAIL", arch);
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const int arch = prop.major * 10 + prop.minor;
  for (bool bf16 : {true, false}) {
    run_case("decode", bf16, 1, 37, 300, 7, true, arch);
    run_case("decode", bf16, 16, 130, 1032, 32, false, arch);
    if (arch >= 80 && arch < 90) {
      run_case("sm80", bf16, 17, 136, 264, 8, false, arch);
      run_case("sm80", bf16, 200, 264, 520, 32, false, arch);
      run_repeat("sm80", bf16, 17, 136, 264, 16, 8, 64, arch);
      run_repeat("sm80", bf16, 300, 520, 264, 64, 32, 256, arch);
    }
    if (arch == 90) {
      run_case("sm90", bf16, 17, 136, 264, 0, false, arch);
      run_case("sm90", bf16, 300, 264, 520, 0, false, arch);
      run_case("sm90_2k", bf16, 17, 136, 264, 8, false, arch);
      run_case("sm90_2k", bf16, 300, 264, 520, 32, false, arch);
      run_repeat("sm90", bf16, 17, 136, 264, 16, 8, 64, arch);
      run_repeat("sm90", bf16, 300, 520, 264, 64, 32, 256, arch);
    }
  }
  std::printf("%s\n", failures ? "FAILED" : "all ok");
  return failures ? 1 : 0;
}
