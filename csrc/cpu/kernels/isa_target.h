// The per-ISA target pragmas of the rows_<isa>.cpp files, in one place.
// Use after every include, so no library code is compiled for the ISA:
//   FLORA_ISA_BEGIN("avx2,fma,f16c")  ...kernel code...  FLORA_ISA_END()
#pragma once

#define FLORA_PRAGMA(x) _Pragma(#x)

#if defined(__clang__)
#define FLORA_ISA_BEGIN(isa) FLORA_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define FLORA_ISA_END() FLORA_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
// GCC 12's intrinsic headers trip -W(maybe-)uninitialized with _mm*_undefined_* (false alarms).
#define FLORA_ISA_BEGIN(isa)                                  \
  FLORA_PRAGMA(GCC diagnostic ignored "-Wuninitialized")      \
  FLORA_PRAGMA(GCC diagnostic ignored "-Wmaybe-uninitialized") \
  FLORA_PRAGMA(GCC push_options)                              \
  FLORA_PRAGMA(GCC target(isa))
#define FLORA_ISA_END() FLORA_PRAGMA(GCC pop_options)
#else
#define FLORA_ISA_BEGIN(isa)
#define FLORA_ISA_END()
#endif
