#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace flora::cpu {
namespace {

Isa parse(const std::string& name) {
  if (name == "avx512_bf16") return Isa::kAvx512Bf16;
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "aten" || name == "reference") return Isa::kAten;
  TORCH_CHECK_VALUE(false, "flora: unknown CPU ISA '", name,
                    "'; expected avx512_bf16, avx512, avx2 or aten");
}

Isa initial_isa() {
  Isa isa = detected_isa();
  if (const char* env = std::getenv("FLORA_CPU_ISA"); env && *env) {
    const Isa want = parse(env);
    TORCH_CHECK_VALUE(want <= isa, "flora: FLORA_CPU_ISA=", env,
                      " but this CPU supports at most ", isa_name(isa));
    isa = want;
  }
  return isa;
}

std::atomic<Isa>& active() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

}  // namespace

Isa detected_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::kAvx2;
#endif
  return Isa::kAten;
}

bool has_avx512_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool has_amx_bf16() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // EDX: AMX-BF16, AMX-TILE
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE: xgetbv
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((lo >> 17) & 3u) == 3u;  // XCR0: XTILECFG and XTILEDATA state
#else
  return false;
#endif
}

bool is_intel() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  return b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;  // "Genu" "ineI" "ntel"
#else
  return false;
#endif
}

Isa active_isa() { return active().load(std::memory_order_relaxed); }

void set_isa(const std::string& name) {
  const Isa want = parse(name);
  TORCH_CHECK_VALUE(want <= detected_isa(), "flora: cannot use ", name,
                    ": this CPU supports at most ", isa_name(detected_isa()));
  active().store(want);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "aten";
  }
}

}  // namespace flora::cpu
