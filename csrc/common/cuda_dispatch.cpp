#include "cuda_dispatch.h"

#include <cstdlib>

namespace flora {
namespace {

// Kernels verified on a device: {name, "device, date"}. The device run adds a
// row only after the kernel passed tests/test_cuda_kernels.py and
// compute-sanitizer memcheck and racecheck there. Empty: on an H200
// (2026-11-28) the sm_90a and decode kernels passed their tests and memcheck;
// racecheck is still to run. A verified kernel runs by default only where it
// beat cuBLAS (measured_faster below).
struct Verified {
  const char* name;
  const char* where;
};
constexpr Verified kVerified[] = {{"", ""}};

constexpr int64_t kDecodeMaxM = 16;   // csrc/cuda/kernels/plan.h
constexpr int kMaxRepeat = 8;         // csrc/cuda/kernels/args.h

CudaChoice cublas(std::string planned, std::string reason) {
  return {"cublas", std::move(planned), std::move(reason)};
}

std::string sm(int arch) { return "sm_" + std::to_string(arch); }

// Where a kernel beat cuBLAS on the fused storage on a device: default
// dispatch (a verified kernel, FLORA_CUDA_KERNELS unset) uses it only there;
// FLORA_CUDA_KERNELS=1 runs every planned kernel (the tests, the sweeps).
// Measured: NVIDIA H200, 2026-11-28 (bench/RESULTS.md, "GPU: first device
// run"): the decode kernel's FBL / FFBL at M = 1, 0.96-1.00x the base GEMM
// under CUDA graphs, where cuBLAS takes the adapter product as a second GEMM
// unless the layout is one K range. Not FFL (one GEMM on the fused storage
// either way: cuBLAS 1.00-1.05x, the kernel 1.07-1.12x), not M = 16 (3.2-4.7x;
// M = 2..8 unmeasured), not the GEMMs (1.1-4.4x at M = 256).
bool measured_faster(const CudaQuery& q, const std::string& kernel) {
  if (kernel.rfind("decode_", 0) == 0) return q.op != "ffl" && q.M == 1;
  return false;
}

}  // namespace

const char* measured_faster_shapes() { return "decode kernel for FBL / FFBL at M = 1"; }

const std::vector<CudaKernelEntry>& cuda_kernels() {
  static const std::vector<CudaKernelEntry> k = {
      {"decode_bf16", "sm_80, sm_90a", "decode M <= 16: 16-byte weight streaming, split-K over warps"},
      {"decode_fp16", "sm_80, sm_90a", "decode M <= 16: 16-byte weight streaming, split-K over warps"},
      {"gemm_sm80_bf16", "sm_80", "CUTLASS 2.x mma.sync multistage, two K segments, C epilogue"},
      {"gemm_sm80_fp16", "sm_80", "CUTLASS 2.x mma.sync multistage, two K segments, C epilogue"},
      {"gemm_sm90_bf16", "sm_90a", "CUTLASS 3.x TMA warp-specialized wgmma, EVT C epilogue"},
      {"gemm_sm90_fp16", "sm_90a", "CUTLASS 3.x TMA warp-specialized wgmma, EVT C epilogue"},
      {"gemm_sm90_2k_bf16", "sm_90a", "CUTLASS 3.x TMA wgmma, two K ranges into one accumulator"},
      {"gemm_sm90_2k_fp16", "sm_90a", "CUTLASS 3.x TMA wgmma, two K ranges into one accumulator"},
      {"gemm_sm80_rep_bf16", "sm_80", "CUTLASS 2.x mma.sync, EVT repeat-add epilogue (FFL y)"},
      {"gemm_sm80_rep_fp16", "sm_80", "CUTLASS 2.x mma.sync, EVT repeat-add epilogue (FFL y)"},
      {"gemm_sm90_rep_bf16", "sm_90a", "CUTLASS 3.x TMA wgmma, EVT repeat-add epilogue (FFL y)"},
      {"gemm_sm90_rep_fp16", "sm_90a", "CUTLASS 3.x TMA wgmma, EVT repeat-add epilogue (FFL y)"},
      {"gemm_sm80_t_bf16", "sm_80", "CUTLASS 2.x mma.sync, weights [K, n] (backward dx)"},
      {"gemm_sm80_t_fp16", "sm_80", "CUTLASS 2.x mma.sync, weights [K, n] (backward dx)"},
      {"gemm_sm90_t_bf16", "sm_90a", "CUTLASS 3.x TMA wgmma, n-major weights (backward dx)"},
      {"gemm_sm90_t_fp16", "sm_90a", "CUTLASS 3.x TMA wgmma, n-major weights (backward dx)"},
      {"gemm_sm90_2k_t_bf16", "sm_90a", "CUTLASS 3.x TMA wgmma, n-major weights, two K ranges"},
      {"gemm_sm90_2k_t_fp16", "sm_90a", "CUTLASS 3.x TMA wgmma, n-major weights, two K ranges"},
      {"pointwise", "sm_80, sm_90a", "RMSNorm, RoPE, SiLU x up: one launch each (bf16 / fp16 / fp32)"},
      {"decode_attention", "sm_80, sm_90a",
       "decode attention split over the keys, grouped kv heads, hd 64 / 128 (bf16 / fp16)"},
  };
  return k;
}

std::string cuda_kernel_verified(const std::string& name) {
  for (const auto& v : kVerified)
    if (!name.empty() && name == v.name) return v.where;
  // A device run that has just passed a kernel's tests and sanitizers times
  // the dispatch it would get once listed: "all" or a list of names.
  const char* e = std::getenv("FLORA_CUDA_ASSUME_VERIFIED");
  if (e && !name.empty()) {
    const std::string v = e;
    if (v == "all") return "this run (FLORA_CUDA_ASSUME_VERIFIED)";
    size_t i = 0;
    while (i < v.size()) {
      const size_t j = v.find_first_of(", ", i);
      if (v.substr(i, j == std::string::npos ? std::string::npos : j - i) == name)
        return "this run (FLORA_CUDA_ASSUME_VERIFIED)";
      if (j == std::string::npos) break;
      i = j + 1;
    }
  }
  return "";
}

bool cuda_kernel_built(const std::string& name) {
  bool sm80 = false, sm90 = false, any = false;
#ifdef FLORA_WITH_CUTLASS
  any = true;
#endif
#ifdef FLORA_HAVE_SM80
  sm80 = true;
#endif
#ifdef FLORA_HAVE_SM90
  sm90 = true;
#endif
  if (name.rfind("gemm_sm80_", 0) == 0) return any && sm80;
  if (name.rfind("gemm_sm90_", 0) == 0) return any && sm90;
  return any && (name.rfind("decode_", 0) == 0 || name == "pointwise");  // decode_attention too
}

bool whole_op_kernel_runs(const std::string& name, KernelSwitch sw, bool compiled, bool assume_verified) {
  if (!compiled || sw == KernelSwitch::kOff) return false;
  return sw == KernelSwitch::kAll || assume_verified || !cuda_kernel_verified(name).empty();
}

bool pointwise_kernels_run(KernelSwitch sw, bool compiled, bool assume_verified) {
  // One launch where the composite takes two to four: no shape where it loses
  // is known, so a verified kernel runs for every call.
  return whole_op_kernel_runs("pointwise", sw, compiled, assume_verified);
}

KernelSwitch cuda_kernels_env() {
  const char* e = std::getenv("FLORA_CUDA_KERNELS");
  const std::string v = e ? e : "";
  return v == "1" ? KernelSwitch::kAll : v == "0" ? KernelSwitch::kOff : KernelSwitch::kDefault;
}

CudaChoice choose_cuda(const CudaQuery& q, bool compiled, KernelSwitch sw, bool assume_verified) {
  if (q.dtype != "bf16" && q.dtype != "fp16")
    return cublas("", q.dtype + ": cuBLAS (the kernels are bf16 / fp16)");
  if (q.M <= 0 || q.N + (q.op == "fbl" ? 0 : q.op == "ffl" ? q.R : q.R2) <= 0)
    return cublas("", "empty output");
  if (q.arch < 80) return cublas("", sm(q.arch) + ": the kernels need sm_80 or newer");

  std::string planned, companion;  // companion: a kernel the call also runs
  if (q.weights_t && (q.op != "fbl" || q.M <= kDecodeMaxM))
    return cublas("", "weights stored [K, n] (backward dx): GEMM kernels only, FBL at M > 16");
  if (q.M <= kDecodeMaxM) {
    planned = "decode_" + q.dtype;
    if (q.arch >= 100) return cublas(planned, sm(q.arch) + ": decode kernel built for sm_80 / sm_90 only");
    if (!q.vec_aligned)
      return cublas(planned,
                    "x and the weight rows must be 16-byte aligned (row stride a multiple of 8)");
  } else {
    std::string gemm;
    if (q.arch == 90) {
      gemm = "gemm_sm90_";
    } else if (q.arch >= 80 && q.arch < 90) {
      gemm = "gemm_sm80_";
    } else {
      return cublas("", sm(q.arch) + ": no GEMM kernel built for this arch");
    }
    // FFL with repeat-add: z through the plain GEMM, then y through the
    // repeat-add instance (its epilogue reads z).
    const bool rep = q.op == "ffl" && q.repeat_groups > 0;
    // sm_90 FBL / FFBL: one K range when [u | z], [W | sB] are contiguous
    // with s = 1 and no relu, else the two-range instance.
    const bool two = q.arch == 90 && q.op != "ffl" && q.R > 0 && !q.one_k_range;
    planned = gemm + (rep ? "rep_" : two ? "2k_" : "") + (q.weights_t ? "t_" : "") + q.dtype;
    if (rep) companion = gemm + q.dtype;
    if (rep && q.ffl_res)
      return cublas(planned, "FFL repeat-add with res: the repeat-add GEMMs add no residual");
    if (q.K <= 0) return cublas(planned, "K = 0: nothing to multiply");
    if (!q.all_aligned)
      return cublas(planned,
                    "operands must be 16-byte aligned with K and R multiples of 8 "
                    "(use an adapter rank that makes R a multiple of 8)");
  }
  if (q.repeat_groups > kMaxRepeat)
    return cublas(planned, "more than " + std::to_string(kMaxRepeat) + " repeat-add segments");
  if (!compiled) return cublas(planned, planned + " not compiled in this build");
  if (sw == KernelSwitch::kOff) return cublas(planned, "FLORA_CUDA_KERNELS=0: flora's kernels off");
  if (sw == KernelSwitch::kAll) return {planned, planned, ""};
  for (const std::string& k : {planned, companion})
    if (!k.empty() && !assume_verified && cuda_kernel_verified(k).empty())
      return cublas(planned,
                    k + " compiled, not verified on a device (FLORA_CUDA_KERNELS=1 runs it)");
  if (!measured_faster(q, planned))
    return cublas(planned, planned + " verified, but cuBLAS was as fast or faster at this shape "
                                     "(bench/RESULTS.md; FLORA_CUDA_KERNELS=1 runs it)");
  return {planned, planned, ""};
}

}  // namespace flora
