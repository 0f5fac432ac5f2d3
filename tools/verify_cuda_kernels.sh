#!/usr/bin/env bash
# On a GPU machine: verify the custom CUDA kernels (issue "CUDA kernels on a
# device"). No network: the CUTLASS headers travel in .device (tools/device_pack.py,
# run beforehand on a machine with a package registry).
#
#   tools/verify_cuda_kernels.sh            all steps, logs under $OUT (./gpu-out)
#
# Steps (each prints PASS/FAIL; the exit code is the number of failures):
#   1. build flora._C with the kernel TUs for this card only (Hopper: the
#      sm_90a GEMMs + decode; Ampere: the sm_80 ones), then
#      tools/check_cuda_kernels.py (registers, spills, HGMMA / HMMA);
#   2. pytest tests/test_cuda_kernels.py -m cuda (FLORA_CUDA_KERNELS is set
#      per test): fp64 reference, poisoned outputs, strided views, every
#      epilogue, autograd, the misaligned fallback;
#   3. the standalone kernel check (no torch) under compute-sanitizer
#      memcheck and racecheck on small grids.
# A kernel that passes all three goes into kVerified in
# csrc/common/cuda_dispatch.cpp with the device name and date; only then is
# it dispatched by default, and only in the shapes where it beat cuBLAS there
# (measured_faster in the same file; bench/kernels.py measures it).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
fails=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, report
  local name=$1
  shift
  echo "== $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then echo "PASS $name"; else echo "FAIL $name (see $OUT/$name.log)"; tail -n 20 "$OUT/$name.log"; fails=$((fails + 1)); fi
}

# CUTLASS headers: carried in .device (tools/device_pack.py), or fetched beforehand.
[ -f third_party/cutlass/include/cutlass/version.h ] || [ ! -d .device ] || "$PY" tools/device_pack.py --unpack
[ -f third_party/cutlass/include/cutlass/version.h ] || { echo "no third_party/cutlass: carry .device (tools/device_pack.py) or run tools/fetch_cutlass.sh"; exit 1; }
cap=$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(p.major * 10 + p.minor)')
case "$cap" in
  90) export FLORA_KERNEL_ARCHS=90 TORCH_CUDA_ARCH_LIST="9.0a" ;;
  8*) export FLORA_KERNEL_ARCHS=80 TORCH_CUDA_ARCH_LIST="8.0" ;;
  *) echo "sm_$cap: no kernels built for this card"; exit 1 ;;
esac
export FLORA_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" FLORA_REQUIRE_EXTENSION=1

step build "$PY" -m pip install --no-deps --no-build-isolation -e .
step compile-checks "$PY" tools/check_cuda_kernels.py
step pytest "$PY" -m pytest tests/test_cuda_kernels.py -q -rfE -m cuda -p no:cacheprovider
if command -v compute-sanitizer >/dev/null; then
  step kernel-check-build bash -c "cmake -S . -B build/kcheck -G Ninja -DFLORA_CUDA_KERNEL_TESTS=ON \
      -DFLORA_BUILD_TESTS=OFF -DFLORA_BUILD_BENCH=OFF \
      -DCMAKE_PREFIX_PATH=\"\$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')\" \
    && cmake --build build/kcheck --target flora_kernel_check"
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 99 build/kcheck/flora_kernel_check
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 99 build/kcheck/flora_kernel_check
else
  echo "FAIL compute-sanitizer not found"
  fails=$((fails + 1))
fi
echo "== $fails failure(s)"
exit "$fails"
