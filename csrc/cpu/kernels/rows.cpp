// Path dispatch for the rows kernel (plain x86-64 code, no target pragma).
#include "rows.h"

namespace flora::cpu::kernels {

const char* path_name(Path p) {
  switch (p) {
    case Path::kAvx512Dot: return "avx512 (bf16 dot)";
    case Path::kAvx512: return "avx512";
    default: return "avx2";
  }
}

bool path_supported(Path p) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  switch (p) {
    case Path::kAvx512Dot: return avx512 && __builtin_cpu_supports("avx512bf16");
    case Path::kAvx512: return avx512;
    default:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
  }
#else
  (void)p;
  return false;
#endif
}

void run_rows(Path p, const RowsTask& t, int64_t i0, int64_t i1) {
  if (i1 <= i0 || t.M <= 0) return;
  switch (p) {
    case Path::kAvx512Dot: rows_avx512(t, i0, i1, true); break;
    case Path::kAvx512: rows_avx512(t, i0, i1, false); break;
    default: rows_avx2(t, i0, i1); break;
  }
}

}  // namespace flora::cpu::kernels
