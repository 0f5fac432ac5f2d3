// Run-time choice of the CPU instruction set. The build compiles every path
// (per-function target attributes), so one binary runs on any x86-64 CPU.
#pragma once
#include <string>

namespace flora::cpu {

enum class Isa { kAten = 0, kAvx2 = 1, kAvx512 = 2 };

// Best ISA this CPU supports (AVX2 needs FMA; AVX-512 needs F, BW, VL, DQ).
Isa detected_isa();
// Whether the CPU has avx512_bf16 (VDPBF16PS dot products).
bool has_avx512_bf16();
// ISA the kernels use now: detected, capped by FLORA_CPU_ISA (read once at
// load: avx512 | avx2 | aten) or by set_isa().
Isa active_isa();
// Sets the active ISA; throws (ValueError) for an unknown name or an ISA this
// CPU lacks.
void set_isa(const std::string& name);
const char* isa_name(Isa isa);

}  // namespace flora::cpu
