// Decode kernel instances, fp16 (all M tiles, all row counts).
#include "decode.cuh"
#include "launch.h"

namespace flora::cuda {
cudaError_t decode_fp16(const FusedArgs& a, cudaStream_t stream) {
  return decode::launch<__half>(a, stream);
}
}  // namespace flora::cuda
