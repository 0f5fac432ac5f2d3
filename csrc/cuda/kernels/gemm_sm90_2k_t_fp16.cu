// sm_90a CUTLASS 3.x GEMM, fp16, two K ranges into one accumulator with weights
// stored [K, n] (n-major B): backward dx = dy W + dz A when [dy | dz] or
// [W; A] are not one contiguous range (FFL with repeat-add: dz is dy's
// adjoint added to the z gradient); tile config of gemm_sm90_fp16.cu.
#include "gemm_sm90.cuh"
#include "launch.h"

namespace flora::cuda {
cudaError_t gemm_sm90_2k_t_fp16(const FusedArgs& a, void* ws, size_t ws_bytes, cudaStream_t stream) {
  return sm90::launch<sm90::Config<cutlass::half_t, false, cutlass::layout::RowMajor, true>>(
      a, ws, ws_bytes, stream);
}
}  // namespace flora::cuda
