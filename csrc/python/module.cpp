// flora._C: importing it registers the ops; these functions only describe
// the build and steer the CPU ISA (the ops themselves go through torch.ops).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../common/kernel_info.h"
#include "../cpu/isa.h"

#ifndef FLORA_CUDA_ARCHS
#define FLORA_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "flora compiled ops";
  m.def("cpu_isa", [] { return flora::cpu::isa_name(flora::cpu::active_isa()); },
        "ISA the CPU kernels use now");
  m.def("detected_cpu_isa",
        [] { return flora::cpu::isa_name(flora::cpu::detected_isa()); });
  m.def("has_avx512_bf16", &flora::cpu::has_avx512_bf16);
  m.def("set_cpu_isa", &flora::cpu::set_isa, py::arg("name"),
        "Use avx512, avx2 or aten for the CPU ops (for tests and benchmarks)");
  m.def("cuda_archs", [] { return std::string(FLORA_CUDA_ARCHS); });
  m.def("kernel_info", [] {
    std::vector<std::tuple<std::string, std::string, std::string, std::string>> rows;
    auto add = [&](const std::vector<flora::KernelInfo>& infos) {
      for (const auto& k : infos) rows.emplace_back(k.op, k.device, k.impl, k.when);
    };
    add(flora::cpu_kernel_info());
#ifdef FLORA_WITH_CUDA
    add(flora::cuda_kernel_info());
#endif
    return rows;
  });
}
