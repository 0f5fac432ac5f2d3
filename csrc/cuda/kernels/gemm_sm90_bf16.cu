// sm_90a CUTLASS 3.x GEMM instance, bf16 (128x128x64, cooperative).
#include "gemm_sm90.cuh"
#include "launch.h"

namespace flora::cuda {
using Sm90Bf16 = sm90::Config<cutlass::bfloat16_t>;
cudaError_t gemm_sm90_bf16(const FusedArgs& a, void* ws, size_t ws_bytes, cudaStream_t stream) {
  return sm90::launch<Sm90Bf16>(a, ws, ws_bytes, stream);
}
// Workspace of either dtype's instance: the tile scheduler's, same for both.
size_t gemm_sm90_workspace(const FusedArgs& a) { return sm90::workspace<Sm90Bf16>(a); }
}  // namespace flora::cuda
