// sm_90a CUTLASS 3.x GEMM with the repeat-add EVT epilogue, fp16 (the tile
// config of gemm_sm90_fp16.cu).
#include "gemm_sm90.cuh"
#include "launch.h"

namespace flora::cuda {
cudaError_t gemm_sm90_rep_fp16(const FusedArgs& a, void* ws, size_t ws_bytes, cudaStream_t stream) {
  return sm90::launch<sm90::Config<cutlass::half_t, true>>(a, ws, ws_bytes, stream);
}
}  // namespace flora::cuda
