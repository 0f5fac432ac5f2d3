// Run-time choice of the CPU instruction set. The build compiles every path
// (per-function target attributes), so one binary runs on any x86-64 CPU.
#pragma once
#include <string>

namespace flora::cpu {

// Levels, each a cap on the one below it: avx512_bf16 is AVX-512 with VDPBF16PS
// dot products for bf16; avx512 the same kernels without them (the plain
// AVX-512 bf16 bodies, which a CPU without avx512_bf16 runs).
enum class Isa { kAten = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// Best ISA this CPU supports (AVX2 needs FMA; AVX-512 needs F, BW, VL, DQ;
// avx512_bf16 that and the avx512bf16 flag).
Isa detected_isa();
// Whether the CPU has avx512_bf16 (VDPBF16PS dot products).
bool has_avx512_bf16();
// Whether the CPU has AMX tiles with bf16 (cpuid AMX-TILE and AMX-BF16) and the
// OS enables their state (XCR0): oneDNN's (ATen's) bf16 GEMMs then run on them.
bool has_amx_bf16();
// Whether the CPU is an Intel one (cpuid vendor GenuineIntel): MKL's sgemm,
// ATen's fp32 GEMM, runs its fast paths only there.
bool is_intel();
// ISA the kernels use now: detected, capped by FLORA_CPU_ISA (read once, at
// the first call of this or set_isa: avx512_bf16 | avx512 | avx2 | aten) or
// by set_isa().
Isa active_isa();
// Sets the active ISA; throws (ValueError) for an unknown name or an ISA this
// CPU lacks.
void set_isa(const std::string& name);
const char* isa_name(Isa isa);

}  // namespace flora::cpu
