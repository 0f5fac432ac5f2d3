// What runs where: each device registration describes its dispatch so that
// flora.info() can show it (never a silent fallback posing as a fast path).
#pragma once
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
#ifdef FLORA_WITH_CUDA
std::vector<KernelInfo> cuda_kernel_info();
#endif

}  // namespace flora
