// CPU implementations of the flora ops: the ISA kernels where they apply,
// the ATen baseline on fused storage everywhere else.
#include <torch/library.h>

#include "../common/aten_ops.h"
#include "../common/kernel_info.h"
#include "isa.h"

namespace flora {

std::vector<KernelInfo> cpu_kernel_info() {
  const std::string base = "aten matmul on fused storage";
  return {{"ffl", "cpu", base, "all shapes"},
          {"fbl", "cpu", base, "all shapes"},
          {"ffbl", "cpu", base, "all shapes"}};
}

TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("ffl", &ffl_aten);
  m.impl("fbl", &fbl_aten);
  m.impl("ffbl", &ffbl_aten);
}

}  // namespace flora
