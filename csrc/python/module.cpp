// flora._C: importing it registers the ops; these functions only describe
// the build and steer the CPU ISA (the ops themselves go through torch.ops).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // torch.dtype <-> at::ScalarType

#include <set>
#include <sstream>
#include <string>

#include "../common/cuda_dispatch.h"
#include "../common/kernel_info.h"
#include "../cpu/isa.h"

namespace py = pybind11;

// What this build's CUDA side targets, from the kernel table itself (one
// source of truth): the union of the archs of the kernels compiled in, or
// "cuBLAS only" for a CUDA build without flora's kernels; "" without CUDA.
static std::string cuda_archs() {
#ifdef FLORA_WITH_CUDA
  std::set<std::string> archs;  // "sm_80, sm_90a" -> sm_80, sm_90a
  for (const auto& k : flora::cuda_kernels()) {
    if (!flora::cuda_kernel_built(k.name)) continue;
    std::istringstream in(k.arch);
    for (std::string a; std::getline(in >> std::ws, a, ',');) archs.insert(a);
  }
  std::string out;
  for (const auto& a : archs) out += (out.empty() ? "" : ", ") + a;
  return out.empty() ? std::string("cuBLAS only (no flora kernels)") : out;
#else
  return "";
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "flora compiled ops";
  m.def("cpu_isa", [] { return flora::cpu::isa_name(flora::cpu::active_isa()); },
        "ISA the CPU kernels use now");
  m.def("detected_cpu_isa",
        [] { return flora::cpu::isa_name(flora::cpu::detected_isa()); });
  m.def("has_avx512_bf16", &flora::cpu::has_avx512_bf16);
  m.def("set_cpu_isa", &flora::cpu::set_isa, py::arg("name"),
        "Use avx512, avx2 or aten for the CPU ops (for tests and benchmarks)");
  m.def("has_amx_bf16", &flora::cpu::has_amx_bf16,
        "whether the CPU has AMX bf16 tiles the OS enables (ATen's bf16 GEMMs use them)");
  m.def("cpu_is_intel", &flora::cpu::is_intel,
        "whether the CPU is an Intel one (MKL's fp32 GEMM runs its fast paths there)");
  m.def("cpu_gemv_max_m", &flora::cpu_gemv_max_m, py::arg("dtype"),
        "largest M that ffl / fbl / fbl_ / ffbl on the CPU run on flora's decode kernels (else ATen)");
  m.def("set_cpu_gemv_max_m", &flora::set_cpu_gemv_max_m, py::arg("m"),
        "override that M for every dtype (tests, benchmarks); m < 0 restores this machine's rule");
  m.def(
      "cpu_decode_attention_takes",
      [](at::ScalarType dtype, int64_t head_dim, int64_t group, int64_t keys) {
        return flora::cpu_decode_attention_takes(dtype, head_dim, group, keys);
      },
      py::arg("dtype"), py::arg("head_dim"), py::arg("group"), py::arg("keys"),
      "whether flora::decode_attention on the CPU runs flora's kernel (else SDPA) for this dtype, "
      "head_dim, query heads per kv head and window, with the ISA set now");
  m.def("cuda_archs", &cuda_archs,
        "the archs of the CUDA kernels compiled in (\"\" without CUDA)");
  // The CUDA dispatch table as plain code: testable without a device.
  m.def(
      "cuda_dispatch",
      [](const std::string& op, const std::string& dtype, int arch, int64_t M, int64_t N,
         int64_t K, int64_t R, int64_t R2, bool vec_aligned, bool all_aligned, bool one_k_range,
         bool relu, int repeat_groups, bool weights_t, bool ffl_res, py::object compiled,
         py::object kernels, bool assume_verified) {
        flora::CudaQuery q;
        q.op = op, q.dtype = dtype, q.arch = arch, q.M = M, q.N = N, q.K = K, q.R = R, q.R2 = R2;
        q.vec_aligned = vec_aligned, q.all_aligned = all_aligned, q.one_k_range = one_k_range;
        q.relu = relu, q.repeat_groups = repeat_groups, q.weights_t = weights_t, q.ffl_res = ffl_res;
#ifdef FLORA_WITH_CUTLASS
        const bool built = true;
#else
        const bool built = false;
#endif
        using flora::KernelSwitch;
        KernelSwitch sw = flora::cuda_kernels_env();
        if (!kernels.is_none()) {
          const auto k = kernels.cast<std::string>();
          if (k != "default" && k != "all" && k != "off")
            throw py::value_error("kernels: 'default', 'all', 'off' or None (FLORA_CUDA_KERNELS), got " + k);
          sw = k == "all" ? KernelSwitch::kAll : k == "off" ? KernelSwitch::kOff : KernelSwitch::kDefault;
        }
        const auto c = flora::choose_cuda(q, compiled.is_none() ? built : compiled.cast<bool>(), sw,
                                          assume_verified);
        return py::make_tuple(c.kernel, c.planned, c.reason);
      },
      py::arg("op"), py::arg("dtype"), py::arg("arch"), py::arg("M"), py::arg("N"), py::arg("K"),
      py::arg("R") = 0, py::arg("R2") = 0, py::arg("vec_aligned") = true,
      py::arg("all_aligned") = true, py::arg("one_k_range") = true, py::arg("relu") = false,
      py::arg("repeat_groups") = 0, py::arg("weights_t") = false, py::arg("ffl_res") = false,
      py::arg("compiled") = py::none(),
      py::arg("kernels") = py::none(), py::arg("assume_verified") = false,
      "(kernel, planned, reason): what a CUDA call of this shape runs and why");
  m.def("cuda_kernels", [] {
    std::vector<std::tuple<std::string, std::string, std::string, std::string, bool>> rows;
    for (const auto& k : flora::cuda_kernels())
      rows.emplace_back(k.name, k.arch, k.what, flora::cuda_kernel_verified(k.name),
                        flora::cuda_kernel_built(k.name));
    return rows;
  });
#ifdef FLORA_WITH_CUDA
  m.def("cuda_last_dispatch", &flora::cuda_last_dispatch,
        "kernel (or 'cublas: reason') of this thread's last CUDA op call");
#endif
  m.def("cuda_kernels_compiled", [] {
#ifdef FLORA_WITH_CUTLASS
    return true;
#else
    return false;
#endif
  });
  m.def("kernel_info", [] {
    std::vector<std::tuple<std::string, std::string, std::string, std::string>> rows;
    auto add = [&](const std::vector<flora::KernelInfo>& infos) {
      for (const auto& k : infos) rows.emplace_back(k.op, k.device, k.impl, k.when);
    };
    add(flora::cpu_kernel_info());
    add(flora::composite_kernel_info("cpu"));
#ifdef FLORA_WITH_CUDA
    add(flora::cuda_kernel_info());
    add(flora::composite_kernel_info("cuda"));
#endif
    return rows;
  });
}
