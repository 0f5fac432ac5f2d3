// sm_80 CUTLASS 2.x GEMM, bf16, weights stored [K, n] (transposed views:
// backward dx = dy W + dz A, the FBL shape); tile config of gemm_sm80_bf16.cu.
#include "gemm_sm80.cuh"
#include "launch.h"

namespace flora::cuda {
cudaError_t gemm_sm80_t_bf16(const FusedArgs& a, cudaStream_t stream) {
  return sm80::launch<
      sm80::Config<cutlass::bfloat16_t, 128, 128, 32, 64, 64, 4, cutlass::layout::RowMajor>>(a, stream);
}
}  // namespace flora::cuda
