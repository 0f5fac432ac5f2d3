// sm_90a CUTLASS 3.x GEMM instance, fp16 (128x128x64, cooperative).
#include "gemm_sm90.cuh"
#include "launch.h"

namespace flora::cuda {
cudaError_t gemm_sm90_fp16(const FusedArgs& a, void* ws, size_t ws_bytes, cudaStream_t stream) {
  return sm90::launch<sm90::Config<cutlass::half_t>>(a, ws, ws_bytes, stream);
}
}  // namespace flora::cuda
