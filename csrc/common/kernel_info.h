// What runs where: each device registration describes its dispatch so that
// flora.info() can show it (never a silent fallback posing as a fast path).
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

namespace flora {

struct KernelInfo {
  std::string op;      // ffl, fbl, ffbl
  std::string device;  // cpu, cuda
  std::string impl;    // e.g. "avx512 decode kernel", "aten (fused storage)"
  std::string when;    // e.g. "M <= 16, fp32/bf16"
};

std::vector<KernelInfo> cpu_kernel_info();
// The ops made of other flora ops (composite.cpp), on any device.
std::vector<KernelInfo> composite_kernel_info(const std::string& device);

// Whether flora::decode_attention on the CPU runs flora's kernel (else SDPA)
// for unit-stride operands of this dtype, head_dim, query heads per kv head
// and window of `keys` keys, with the CPU ISA set now; an explicit split count
// (auto_splits false) lifts the window cap. The op's own rule, and the one
// the compiled decode step asks before its trace (flora._C, Python ints: a
// traced call would hand it symbolic sizes). csrc/cpu/register.cpp.
bool cpu_decode_attention_takes(c10::ScalarType dtype, int64_t head_dim, int64_t group, int64_t keys,
                                bool auto_splits = true);
// Largest M for which ffl / fbl / fbl_ / ffbl on the CPU run flora's decode
// kernels (else ATen), for this dtype (0: never, fp64) on this machine: the
// machine's rule (AMX or not), or the override. set_cpu_gemv_max_m(m >= 0)
// overrides every dtype (tests, benchmarks; FLORA_CPU_GEMV_MAX_M sets it at
// load); m < 0 restores the rule. csrc/cpu/register.cpp.
int64_t cpu_gemv_max_m(c10::ScalarType dtype);
void set_cpu_gemv_max_m(int64_t m);
#ifdef FLORA_WITH_CUDA
std::vector<KernelInfo> cuda_kernel_info();
#endif

}  // namespace flora
