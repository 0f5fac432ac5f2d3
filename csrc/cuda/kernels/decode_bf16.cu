// Decode kernel instances, bf16 (all M tiles, all row counts).
#include "decode.cuh"
#include "launch.h"

namespace flora::cuda {
cudaError_t decode_bf16(const FusedArgs& a, cudaStream_t stream) {
  return decode::launch<__nv_bfloat16>(a, stream);
}
}  // namespace flora::cuda
