// The pointwise kernels' arguments, one definition for the CPU kernels
// (cpu/kernels/pointwise.h) and the CUDA ones (cuda/kernels/launch.h), each
// instantiated with its own dtype enum. Torch-free; register.cpp fills them
// (pointwise_glue.h).
#pragma once
#include <cstdint>

namespace flora {

// out [B, T, H, hd] = round(x cos) + round(roll(x, hd / 2) sin); x strided
// (sb, st, sh; unit last stride), cos / sin [B, T, hd] contiguous.
template <typename Dt>
struct RopeArgsT {
  Dt dt{};
  int64_t B = 0, T = 0, H = 0, hd = 0;
  const void* x = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;
};

// A decode step's RoPE with the KV-cache write: qk [B, T, nq + nkv, hd] and
// v [B, T, nkv, hd] strided (unit last stride), cos / sin as RoPE's, slot [T]
// int64. q rotated into q [B, T, nq, hd] contiguous; k rotated into
// kc[b, h, slot[t], :], v into vc[b, h, slot[t], :] (caches [B, nkv, L, hd],
// unit last stride); a slot outside [0, L) writes nothing.
template <typename Dt>
struct RopeCacheArgsT {
  Dt dt{};
  int64_t B = 0, T = 0, nq = 0, nkv = 0, hd = 0, L = 0;
  const void* qk = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  const void* v = nullptr;
  int64_t vb = 0, vt = 0, vh = 0;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* q = nullptr;
  void* kc = nullptr;
  int64_t kc_b = 0, kc_h = 0, kc_l = 0;
  void* vc = nullptr;
  int64_t vc_b = 0, vc_h = 0, vc_l = 0;
  const int64_t* slot = nullptr;
};

}  // namespace flora
