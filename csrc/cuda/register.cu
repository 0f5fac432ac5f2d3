// CUDA implementations of the flora ops. Until the custom GEMM kernels land
// (see issue "CUDA kernels"), every op is the ATen/cuBLAS baseline on fused
// storage, and flora.info() says so.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../common/aten_ops.h"
#include "../common/kernel_info.h"

namespace flora {
namespace {

at::Tensor ffl_cuda(const at::Tensor& x, const at::Tensor& W,
                    const at::Tensor& A, double s, at::IntArrayRef repeat,
                    int64_t repeat_rank,
                    const c10::optional<at::Tensor>& z_in) {
  const c10::DeviceGuard guard(x.device());
  return ffl_aten(x, W, A, s, repeat, repeat_rank, z_in);
}

at::Tensor fbl_cuda(const at::Tensor& u, const at::Tensor& z,
                    const at::Tensor& W, const at::Tensor& B, double s,
                    const c10::optional<at::Tensor>& res, bool relu) {
  const c10::DeviceGuard guard(u.device());
  return fbl_aten(u, z, W, B, s, res, relu);
}

at::Tensor ffbl_cuda(const at::Tensor& u, const at::Tensor& z,
                     const at::Tensor& W, const at::Tensor& B,
                     const at::Tensor& A, const at::Tensor& C, double s,
                     const c10::optional<at::Tensor>& res, bool relu) {
  const c10::DeviceGuard guard(u.device());
  return ffbl_aten(u, z, W, B, A, C, s, res, relu);
}

}  // namespace

std::vector<KernelInfo> cuda_kernel_info() {
  const std::string base = "cuBLAS (aten) on fused storage";
  return {{"ffl", "cuda", base, "all shapes"},
          {"fbl", "cuda", base, "all shapes"},
          {"ffbl", "cuda", base, "all shapes"}};
}

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("ffl", &ffl_cuda);
  m.impl("fbl", &fbl_cuda);
  m.impl("ffbl", &ffbl_cuda);
}

}  // namespace flora
