// Element types and scalar conversions for the CPU kernels. Pure C++ (no
// torch): the kernels build into the extension and a standalone library.
#pragma once
#include <cstdint>
#include <cstring>

namespace flora::cpu::kernels {

// Storage dtype of every operand of one call (accumulation is always fp32).
enum class Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int64_t elem_size(Dtype dt) { return dt == Dtype::kF32 ? 4 : 2; }

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch does; NaN stays a (quiet) NaN. No branch
// (a select), so loops over it vectorise.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    u = sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, with overflow to inf and subnormals, like torch.
inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;    // nan
  if (u >= 0x477ff000u) return sign | 0x7c00u;   // rounds to >= 65520: inf
  if (u < 0x38800000u) {                         // below fp16's min normal
    if (u < 0x33000000u) return sign;            // < half the min subnormal
    const uint32_t e = u >> 23, man = (u & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;              // 14 + (113 - e) - 1
    uint32_t h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  uint32_t h = ((u >> 13) - (112u << 10));
  const uint32_t rem = u & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

inline float load_f32(Dtype dt, const void* p, int64_t i) {
  switch (dt) {
    case Dtype::kF32: return static_cast<const float*>(p)[i];
    case Dtype::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

inline void store_f32(Dtype dt, void* p, int64_t i, float v) {
  switch (dt) {
    case Dtype::kF32: static_cast<float*>(p)[i] = v; break;
    case Dtype::kBF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}

}  // namespace flora::cpu::kernels
