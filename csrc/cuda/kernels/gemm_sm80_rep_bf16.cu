// sm_80 CUTLASS 2.x GEMM with the repeat-add epilogue (EVT), bf16: the tile
// config of gemm_sm80_bf16.cu.
#include "gemm_sm80.cuh"
#include "launch.h"

namespace flora::cuda {
cudaError_t gemm_sm80_rep_bf16(const FusedArgs& a, cudaStream_t stream) {
  return sm80::launch_repeat<sm80::RepeatConfig<cutlass::bfloat16_t, 128, 128, 32, 64, 64, 4>>(
      a, stream);
}
}  // namespace flora::cuda
