// sm_80 CUTLASS 2.x GEMM instance, fp16: 128x128x32 tile, 2x2 warps of
// 64x64, 4 stages (64 KiB shared memory).
#include "gemm_sm80.cuh"
#include "launch.h"

namespace flora::cuda {
cudaError_t gemm_sm80_fp16(const FusedArgs& a, cudaStream_t stream) {
  return sm80::launch<sm80::Config<cutlass::half_t, 128, 128, 32, 64, 64, 4>>(a, stream);
}
}  // namespace flora::cuda
