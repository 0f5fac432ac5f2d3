// sm_90a CUTLASS 3.x GEMM with the repeat-add EVT epilogue, bf16 (the tile
// config of gemm_sm90_bf16.cu).
#include "gemm_sm90.cuh"
#include "launch.h"

namespace flora::cuda {
using Sm90RepBf16 = sm90::Config<cutlass::bfloat16_t, true>;
cudaError_t gemm_sm90_rep_bf16(const FusedArgs& a, void* ws, size_t ws_bytes, cudaStream_t stream) {
  return sm90::launch<Sm90RepBf16>(a, ws, ws_bytes, stream);
}
// Workspace of either dtype's instance: the tile scheduler's, same for both.
size_t gemm_sm90_rep_workspace(const FusedArgs& a) { return sm90::workspace<Sm90RepBf16>(a); }
}  // namespace flora::cuda
