#!/usr/bin/env bash
# tools/device_twin.sh: rehearse, on the CPU machine, what bench/gpu_run.sh does before it
# touches the GPU: the device image's Python and package versions, the .device folder it
# carries, its build command, then the whole test suite. Device time is rare (15 minutes a
# session, when lent at all); code that breaks only under the device's torch or transformers
# should fail here, for free, not in the one call.
#
#   python tools/device_pack.py          # first: .device (CUTLASS, kernel objects, gguf wheel)
#   tools/device_twin.sh [DIR]           # DIR default /tmp/flora-twin (venv + clean clone of HEAD)
#
# Downloads about 4 GB on the first run (torch 2.11's CUDA 13.0 wheels, as on the device);
# then builds _C against it with the carried kernel objects (about 2 min on 2 cores) and runs
# the suite (about 8 min). It tests HEAD: commit first. Like the device, the venv has no gguf
# (the carried wheel provides it) and no expecttest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-/tmp/flora-twin}"
# The device image's versions (the device tool's KINDS.md, read there in 2026-11).
PY_VER=3.12
PINS=(torch==2.11.0 numpy==2.5.2 transformers==5.17.0 safetensors==0.8.0 tokenizers==0.23.2
      huggingface_hub==1.33.0 accelerate==1.15.0 "peft>=0.13" pytest pytest-timeout matplotlib
      ninja setuptools wheel tqdm)
[ -d "$ROOT/.device" ] || { echo "no .device: run python tools/device_pack.py first" >&2; exit 1; }
PYBIN="${TWIN_PYTHON:-}"
for c in "python$PY_VER" "$(pyenv root 2>/dev/null)"/versions/"$PY_VER".*/bin/python"$PY_VER"; do
  [ -n "$PYBIN" ] || ! "$c" --version >/dev/null 2>&1 || PYBIN="$c"
done
[ -n "$PYBIN" ] || { echo "python$PY_VER not found (the device runs Python $PY_VER; TWIN_PYTHON=path names one)" >&2; exit 1; }
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"   # the device's nvcc is 13.0
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc in CUDA_HOME=$CUDA_HOME" >&2; exit 1; }

if [ ! -x "$DIR/venv/bin/python" ]; then
  "$PYBIN" -m venv "$DIR/venv"
  "$DIR/venv/bin/pip" install -q "${PINS[@]}"
fi
PY="$DIR/venv/bin/python"
rm -rf "$DIR/src" "$DIR/state" && mkdir -p "$DIR/state"
git clone -q "$ROOT" "$DIR/src"
cp -r "$ROOT/.device" "$DIR/src/.device"
cd "$DIR/src"

# as bench/gpu_run.sh: unpack, the carried wheels on PYTHONPATH, the Hopper build
"$PY" tools/device_pack.py --unpack --dest-gguf "$DIR/state/smollm2.gguf"
"$PY" -m pip install -q --no-index --no-deps --target "$DIR/state/site" .device/whl/*.whl
export PYTHONPATH="$DIR/state/site" CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" PIP_NO_INDEX=1
export FLORA_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a FLORA_KERNEL_ARCHS=90 MAX_JOBS="${MAX_JOBS:-2}"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
time "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
"$PY" -m flora info | head -n 4
GPU_RUN_DRY=1 OUT="$DIR/state/gpu-out" bash bench/gpu_run.sh >"$DIR/state/gpu_run-dry.log"
FLORA_REQUIRE_EXTENSION=1 FLORA_REQUIRE_REAL_MODEL=1 HF_HUB_OFFLINE=1 \
  "$PY" -m pytest tests -q -p no:cacheprovider -rfE
