// The CUDA dispatch table: which kernel serves a call (shape, dtype, arch,
// operand layout), or cuBLAS and why. Plain C++ compiled in every build, so
// CPU-only CI tests it (tests/cpp/test_cuda_plan.cpp, tests/test_cuda_kernels.py
// through flora._C.cuda_dispatch) and `flora info` shows it.
//
// Gate: a kernel runs only once it is listed as verified on a device
// (kVerified in cuda_dispatch.cpp, filled by the device run) and only in the
// shapes where it beat cuBLAS there (measured_faster), or when
// FLORA_CUDA_KERNELS=1 asks for it (tests on a device).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace flora {

struct CudaQuery {
  std::string op;     // ffl | fbl | ffbl
  std::string dtype;  // bf16 | fp16 | fp32 | fp64
  int arch = 0;       // compute capability, major * 10 + minor
  int64_t M = 0, N = 0, K = 0, R = 0, R2 = 0;
  // x / u and the weight rows of W (and A) start 16-byte aligned with a row
  // stride that is a multiple of 8 elements (the decode kernel's vectors).
  bool vec_aligned = true;
  // Every operand and output 16-byte aligned with such strides, K and R
  // multiples of 8 (cp.async / TMA; padding R to 8 in the fused storage
  // makes a layout qualify).
  bool all_aligned = true;
  // FBL / FFBL: [u | z], [W | B] (and [A | C]) are each one contiguous
  // K range, s == 1 and no relu: one mainloop over K + R (the sm_90 kernel).
  bool one_k_range = true;
  bool relu = false;
  int repeat_groups = 0;  // repeat-add segments (FFL)
  bool ffl_res = false;   // FFL with res on y (the repeat-add GEMMs take none)
  // FBL with its weights stored [K, n] (transposed views, row stride a
  // multiple of 8): backward dx = dy W + dz A through the same GEMMs.
  bool weights_t = false;
};

struct CudaChoice {
  std::string kernel;   // kernel that runs, or "cublas"
  std::string planned;  // kernel the shape maps to ("" when none)
  std::string reason;   // why cuBLAS runs ("" when a kernel does)
};

struct CudaKernelEntry {
  std::string name;   // e.g. decode_bf16
  std::string arch;   // sm_80, sm_90a, ...
  std::string what;   // one line
};

// Every kernel a CUDA build compiles.
const std::vector<CudaKernelEntry>& cuda_kernels();
// "device, date" where `name` passed the device tests, or "". The device run
// may set FLORA_CUDA_ASSUME_VERIFIED ("all" or names) to time the dispatch a
// kernel that just passed there would get.
std::string cuda_kernel_verified(const std::string& name);
// Whether this build compiled kernel `name` (FLORA_KERNEL_ARCHS may leave an
// arch's GEMMs out).
bool cuda_kernel_built(const std::string& name);
// The shapes measured_faster admits, in words (`flora info`).
const char* measured_faster_shapes();
// FLORA_CUDA_KERNELS: unset -> kDefault, 1 -> kAll, 0 -> kOff (read on each
// call: tests toggle it).
enum class KernelSwitch { kDefault, kAll, kOff };
KernelSwitch cuda_kernels_env();
// The pointwise ops (rms_norm, rope, silu_mul) on CUDA: flora's kernel
// (pointwise.cu) when compiled and verified (or kAll), else ATen's composite.
bool pointwise_kernels_run(KernelSwitch sw, bool compiled, bool assume_verified = false);
// The same rule for another kernel that runs for every call it takes once
// verified (decode_attention: one launch or two, where SDPA's
// memory-efficient kernel runs one CTA per (sequence, kv head)).
bool whole_op_kernel_runs(const std::string& name, KernelSwitch sw, bool compiled, bool assume_verified = false);
// compiled: this build has the CUDA kernels. kAll: run every planned kernel,
// verified or not, wherever it applies; kOff: cuBLAS for every call (the
// user's way out, and the sweeps' cuBLAS rows); kDefault: a verified kernel
// runs only in the shapes where it beat cuBLAS on a device.
// assume_verified: treat every kernel as verified (tests of that rule).
CudaChoice choose_cuda(const CudaQuery& q, bool compiled, KernelSwitch sw,
                       bool assume_verified = false);
#ifdef FLORA_WITH_CUDA
// "kernel" or "cublas: reason" of the process's last CUDA op call, from any
// thread (tests check that the kernel they mean to test is the one that ran,
// also in a backward that autograd runs on its device thread).
std::string cuda_last_dispatch();
#endif

}  // namespace flora
