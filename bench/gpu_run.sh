#!/usr/bin/env bash
# bench/gpu_run.sh: build, test, sanitize and benchmark flora on a GPU machine
# (written for a lent NVIDIA H100/H200: no network, at most 10 minutes a call
# and 15 minutes of device time a session, outputs collected from $OUT).
#
#   bench/gpu_run.sh                      the default: ONE call of ~7 minutes (stages of "quick")
#   bench/gpu_run.sh [STAGE ...]          named stages, in the order below
#   GPU_RUN_DRY=1 bench/gpu_run.sh        print the commands only, run nothing (tested in CI)
#
# "quick" (the default) = build cuda-kernels test-cuda attention latency-1b kernels-short step-profile.
# Each stage runs under its own timeout (CAP below, and never past the call's
# budget), so one hang costs that stage only; its log is in $OUT as it runs,
# its results are written to $OUT as soon as they exist, summary.txt is
# rewritten after every stage, and the summary table prints LAST.
# Times: the seconds column of the first device run (NVIDIA H200, 16 cores,
# 2026-11-28; the machine started in ~35 s), else estimates.
#   build        pip install --no-deps --no-build-isolation -e . with FLORA_CUDA=1,
#                MAX_JOBS=16, TORCH_CUDA_ARCH_LIST for the card (9.0a on Hopper), FLORA_KERNEL_ARCHS=90
#                (the call carries .device, from `python tools/device_pack.py` on the CPU
#                machine: CUTLASS headers unpacked into third_party/cutlass first); then
#                `python -m flora info` and a hard check that flora._C has CUDA kernels
#                and sees the GPU. Fresh machine ~1-2 min when .device brings the kernel
#                objects (rehearsed on 2 CPU cores: _C alone, 2.6 min), ~3-4 min when it
#                compiles them too (2 cores: 12 TUs + _C, 15.7 CPU-min, 8.9 min); ~10 s when
#                already built (a stamp of sources + toolchain in build/gpu_run.stamp).
#                Always runs first.
#   test-cuda    FLORA_REQUIRE_EXTENSION=1 pytest -m cuda (the CUDA subset but the kernel
#                tests, which cuda-kernels runs), -v; a test that kills pytest (segfault) is
#                named in the summary and the rest runs without it (pytest_survive). ~40 s.
#   cuda-kernels FLORA_CUDA_KERNELS=1 pytest -m cuda tests/test_cuda_kernels.py, then
#                compute-sanitizer memcheck over one small case per kernel and epilogue
#                (SANITIZE_IDS: test ids of that file; first failure stops). ~1-2 min.
#                Then racecheck over the same cases. When it passes, the kernel sweeps
#                (kernels, kernels-short, smoke) run with FLORA_CUDA_KERNELS=1, so their
#                op rows time flora's kernels against cuBLAS; the model-level stages
#                (latency, train, mixed, generate, cli) keep the default dispatch, what
#                users get once the passed kernels are listed in kVerified
#                (FLORA_CUDA_ASSUME_VERIFIED=all; GPU_RUN_ASSUME_VERIFIED=0: today's
#                default, cuBLAS) (GPU_RUN_KERNELS=0: kernels never; =1: everywhere, e.g.
#                to time the kernels end to end). The summary says which. On the H200 (2026-11-28)
#                the kernels passed; ~20 s with memcheck alone.
#   generate     bench/generate_smoke.py: greedy tokens eager == CUDA graph (== transformers
#                in fp32) on a random-weight Llama; base, ffba, zflora; then the same in bf16
#                on the real SmolLM2 (its first blocks) when .device carries it. 57 s.
#   attention    bench/attention.py --device cuda: prompt / training attention (1B heads, bf16,
#                packed rows of 4 sequences too,
#                batch 1 and 8, T 512 and 2048, with and without padding, fwd and fwd+bwd) as
#                flora calls SDPA against its former call, which ran SDPA's math kernel; the
#                SDPA kernel each takes and its peak memory. ~20-30 s (estimate).
#   latency-1b   the latency rows of the device issue at the 1B shape:
#                `python -m flora bench latency --model 1b --dtype bf16 --batch 1 8
#                --prompt 512 --mode both --rows $LATENCY_ROWS` (default: the issue's rows,
#                the goals' variants first, as a cap cuts the last ones: base ffba zflora
#                pf-lora lora, then transformers peft peft-merged, which run after flora's
#                anyway; "all": every variant). ~35 s per flora variant (b 1, 8; eager +
#                graphs): ~4 min.
#   kernels-short bench/kernels.py --device cuda on the 1B shapes, r = 32, bf16: eager at
#                M = 1,4,8,16,256, and CUDA graphs at M = 1,4,8 with each flora call also
#                on cuBLAS (--aten-too: where a kernel wins, for measured_faster); rows
#                written as measured. ~40 s at M = 1,16,256 (2026-11-28).
#   step-profile bench/step_profile.py --device cuda: a 1B bf16 decode step of base, ffba,
#                zflora at batch 1 and 8 under torch.profiler: device time per kind of kernel
#                (GEMM, attention, norm, RoPE + cache, SiLU x up, copies, ...), kernels per step,
#                the step replayed as a CUDA graph, and the weight-streaming floor: where the
#                gap to the floor is. ~40 s (estimate); last in quick, so the budget may skip it.
#   op-count     CUDA launches per decoder layer of one eager decode step (bench/op_count.py
#                --device cuda), bf16, batch 1 and 8, on this run's dispatch and on cuBLAS
#                alone: the launch counts the CPU machine predicts (RESULTS, "Adapter GEMMs
#                on the cuBLAS path"). ~20-40 s.
#   cli          `flora demo --device cuda --quick`, a 20-step `flora train --bf16 on` (ffba,
#                r 32, batch 8) on the real SmolLM2 blocks from .device, then `flora generate
#                --compare` with that adapter on 16 of its prompts, and bench/serve.py (flora
#                serve, 1 and 8 clients; a 4-turn chat with its prefix cache on and off;
#                echo's prompts scored together), bench/admit_cost.py (a prefill forward's own
#                cost in tokens, 1B and SmolLM2: serve's grouping constant for CUDA) and a
#                20-step `flora train --pack` in bf16. 69 s before the serve check.
# Longer stages, for calls of their own (a 10-minute call each; mind the 15 minutes):
#   test         pytest -m cuda, then the rest of the suite (-m "not cuda"). 1-3 min.
#   sanitize     compute-sanitizer memcheck over the CUDA subset, racecheck over the
#                op tests' CUDA cases. 3-6 min (SANITIZE_TIMEOUT, default 240 s, per tool).
#   kernels      the full sweep, M = 1..8192, 1B/3B/7B shapes (KERNELS_MODELS), r 16/32/64, fp32 + bf16, then
#                CUDA graphs for M <= 64 in bf16. 2-5 min.
#   latency-3b   the latency rows at the 3B shape. 4-7 min.
#   train        bench/train_step.py: one training step (1B, 8 x 512, r 32, bf16 autocast) of
#                PEFT LoRA, flora lora (also with the full-logits loss), ffba, zflora: tokens/s,
#                peak memory. 91 s.
#   mixed        bench/mixed_adapters.py: 4 adapters stacked in one batch of 4 (each row its
#                own) vs one adapter for all rows vs the base, pf-lora / ffba / zflora, 1B bf16,
#                prompt 512, 64 new tokens, CUDA graphs. ~1-2 min.
#   smoke        kernels --quick and latency --quick on the tiny shape. ~1 min.
#   all          build test sanitize kernels latency-1b latency-3b (~35-40 min: several calls).
# A call runs its stages in order within GPU_RUN_BUDGET seconds (default 480 for the
# default stages, 570 otherwise; under the 600 s limit of one call): a stage that would
# not fit is skipped and named in the summary.
#
# Outputs, under $OUT (default ./gpu-out, git-ignored): <stage>.log for each stage,
# summary.txt, kernels.json (+ kernels-graphs.json) and kernels.md, generate.json,
# latency/<name>.json + .png and RESULTS-latency.md (the markdown the latency benchmark
# would insert into bench/RESULTS.md; this script never writes into the repository's
# results). The device tool returns at most 8 files: when a call leaves more, all of
# them go into gpu-run.tar.gz and only the most useful stay loose.
#
# Knobs (environment): PYTHON (default python3), OUT, GPU_RUN_BUDGET, GPU_RUN_DRY,
# TORCH_CUDA_ARCH_LIST (default: the card's, "9.0a" on Hopper), MAX_JOBS (default 16),
# CAP_<stage> (a stage's timeout in seconds, e.g. CAP_latency_1b=240), TEST_ARGS
# (extra pytest args), TEST_TIMEOUT (per test, needs pytest-timeout; default 120),
# SANITIZE_IDS, CK_SANITIZE_TOOLS (cuda-kernels; default "memcheck racecheck"), GPU_RUN_KERNELS,
# SANITIZE_TOOLS (sanitize; default "memcheck racecheck"), SANITIZE_TIMEOUT,
# KERNELS_MS, KERNELS_MODELS, KERNELS_ARGS, KERNELS_GRAPHS=0 (skip the graphs run), KERNELS_GRAPHS_MS,
# TRAIN_ARGS, LATENCY_MODELS, LATENCY_ROWS (see latency-1b), LATENCY_ARGS (extra latency args, e.g.
# "--compile" for the compiled step: each model compiles in its untimed warm-up, so a stage takes longer).
#
# Needs no network and changes no GPU setting: nvidia-smi is only queried.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-out}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$ROOT"

PY="${PYTHON:-python3}"
DRY="${GPU_RUN_DRY:-0}"
RESERVE=20                         # seconds kept for packing and the summary
STAMP="$ROOT/build/gpu_run.stamp"
export OUT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
export PIP_NO_INDEX=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# ---------------------------------------------------------------------------
# helpers (shared by the orchestrator and the stages)
# ---------------------------------------------------------------------------
say() { printf '== %s\n' "$*"; }

# run CMD...: print it, then run it (print only when GPU_RUN_DRY=1)
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "$DRY" = 1 ] && return 0
  "$@"
}

# key TEXT: the stage's key figure for the summary table
key() { printf '%s\n' "$*" >"$STATE/key.$STAGE"; }

# pytest_line FILE: pytest's last "N passed, M failed ..." line, compacted
pytest_line() {
  grep -E '^=* *([0-9]+ (passed|failed|errors?|skipped|xfailed|xpassed|deselected)|no tests ran)' "$1" 2>/dev/null \
    | tail -n 1 | sed -E 's/=//g; s/, [0-9]+ deselected//; s/ in [0-9.]+s.*//; s/^ +//; s/ +$//' || true
}

# pytest_survive LOG ARGS...: pytest -v ARGS, and when the process dies (a
# segfault: rc >= 128) rerun it without the test that was running, up to 3
# times, so one crash does not hide every later result. Prints, and records
# in $STATE/crashed, the ids that crashed; returns the last run's rc.
pytest_survive() {
  local - log="$1" rc=0 n id deselect=()
  set -o pipefail  # pytest's status through tee (local -: for this function only)
  shift
  : >"$STATE/crashed"
  for n in 1 2 3 4; do
    rc=0
    run "$PY" -m pytest "$@" -v "${deselect[@]}" 2>&1 | tee "$log" || rc=$?
    [ "$DRY" = 1 ] && return 0
    [ "$rc" -ge 128 ] && [ "$n" -lt 4 ] || return "$rc"
    id="$(grep -oE '^tests/[^ ]+::[^ ]+' "$log" | tail -n 1 || true)"
    [ -n "$id" ] || return "$rc"
    echo "== pytest died (rc $rc) in $id: running the rest without it"
    echo "$id" >>"$STATE/crashed"
    deselect+=(--deselect "$id")
  done
  return "$rc"
}

# crash_note: "; crashed: ID ..." when pytest_survive saw a crash
crash_note() {
  [ -s "$STATE/crashed" ] && printf '; CRASHED (rc >= 128): %s' "$(tr '\n' ' ' <"$STATE/crashed" | sed 's/ $//')"
  return 0
}

# sanitize TOOL SECONDS LOG PYTEST_ARGS...: pytest under compute-sanitizer TOOL (its
# output to stderr and LOG); prints a one-line verdict ("ERROR SUMMARY: 0 errors",
# "timed out after 120 s", ...) and returns 0 only when the run was clean
sanitize() {
  local - tool="$1" secs="$2" log="$3" one=0 v
  set -o pipefail
  shift 3
  { run timeout -k 10 "$secs" compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
      "$PY" -m pytest "$@" -q -rfE -p no:cacheprovider 2>&1 | tee "$log"; } >&2 || one=$?
  v="$(grep -E '(ERROR|RACECHECK|SYNCCHECK|INITCHECK) SUMMARY' "$log" 2>/dev/null | tail -n 1 \
    | sed -E 's/^=+ *//; s/ SUMMARY//' || true)"
  case "$one" in
    0) ;;
    99) v="${v:-errors} (sanitizer errors)" ;;
    124|137) v="timed out after $secs s" ;;
    *) v="${v:+$v, }pytest rc $one" ;;
  esac
  echo "${v:-ok}"
  return "$one"
}

# ext_check: flora._C compiled, built with CUDA, CUDA kernels registered, GPU visible
ext_check() {
  if [ "$DRY" = 1 ]; then echo "+ (check: flora._C compiled with CUDA kernels and a visible GPU)"; return 0; fi
  "$PY" - <<'EOF'
import sys

import flora

d = flora.info()
bad = []
if d["extension"] != "compiled":
    bad.append(f"flora._C not loaded: {d['extension']}")
else:
    if not d["cuda_archs"]:
        bad.append("flora._C was built without CUDA (cuda_archs is empty)")
    if not any(k["device"] == "cuda" and not k["impl"].startswith("python reference") for k in d["kernels"]):
        bad.append("flora._C registers no CUDA kernels")
if not d["cuda_available"]:
    bad.append("torch sees no CUDA device")
if bad:
    print("EXTENSION CHECK FAILED: " + "; ".join(bad), file=sys.stderr)
    sys.exit(1)
print(f"extension check ok: flora {d['flora']} from {flora.__file__}, CUDA archs {d['cuda_archs']}")
EOF
}

# the source + toolchain fingerprint a finished build is stamped with
build_fingerprint() {
  {
    "$PY" -c 'import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)'
    nvcc --version 2>/dev/null | tail -n 2
    echo "archs=$TORCH_CUDA_ARCH_LIST"
    find csrc setup.py pyproject.toml -type f | LC_ALL=C sort | xargs sha256sum
  } | sha256sum | cut -d' ' -f1
}

# the card's arch for TORCH_CUDA_ARCH_LIST: "9.0a" on Hopper when torch knows it
pick_archs() {
  "$PY" - <<'EOF'
import inspect

import torch
from torch.utils import cpp_extension

major, minor = torch.cuda.get_device_capability(0)
arch = f"{major}.{minor}"
try:
    known = "'" + arch + "a'" in inspect.getsource(cpp_extension._get_cuda_arch_flags)
except (OSError, TypeError, AttributeError):
    known = False
print(arch + "a" if major == 9 and known else arch)
EOF
}

# ---------------------------------------------------------------------------
# stages (each runs in its own process, under `timeout`, output in $OUT/<stage>.log)
# ---------------------------------------------------------------------------
stage_build() {
  say "machine"
  run nvidia-smi || true
  run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu,persistence_mode,compute_mode --format=csv || true
  run nvcc --version || true
  echo "+ $PY - (python, torch and device versions)"
  [ "$DRY" = 1 ] || "$PY" - <<'EOF' || true
import sys

import torch

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.multi_processor_count} SMs", f"{p.total_memory / 2**30:.0f} GiB")
EOF
  echo "+ $PY -m pip list | grep (the packages flora's build and tests use)"
  [ "$DRY" = 1 ] || "$PY" -m pip list 2>/dev/null \
    | grep -iE '^(torch|triton|transformers|peft|pytest|pytest-timeout|setuptools|ninja|numpy|safetensors|tqdm|matplotlib|expecttest) ' || true
  echo "cpus: $(nproc)"

  say "build"
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    if [ "$DRY" = 1 ]; then TORCH_CUDA_ARCH_LIST="9.0a"; else TORCH_CUDA_ARCH_LIST="$(pick_archs)"; fi
  fi
  # flora's own kernel TUs: only this card's GEMMs (Hopper: 90), CUTLASS headers carried
  # from the CPU machine in .device (unpacked before the first stage; the device has no network).
  case "$TORCH_CUDA_ARCH_LIST" in 9.0*) : "${FLORA_KERNEL_ARCHS:=90}" ;; 8.*) : "${FLORA_KERNEL_ARCHS:=80}" ;; esac
  [ -d "${FLORA_CUTLASS_DIR:-third_party/cutlass}/include/cutlass" ] \
    || echo "WARNING: no CUTLASS headers (run tools/device_pack.py on the CPU machine and carry .device): the CUTLASS GEMMs will not be built"
  export FLORA_CUDA=1 TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-16}" FLORA_KERNEL_ARCHS="${FLORA_KERNEL_ARCHS:-80;90}"
  echo "FLORA_CUDA=$FLORA_CUDA TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FLORA_KERNEL_ARCHS=$FLORA_KERNEL_ARCHS MAX_JOBS=$MAX_JOBS"
  local want="" t0
  t0=$(date +%s)
  [ "$DRY" = 1 ] || want="$(build_fingerprint)"
  if [ "$DRY" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && ext_check >/dev/null 2>&1; then
    echo "already built for these sources and this toolchain ($STAMP): not rebuilding"
    key "cached build, archs $TORCH_CUDA_ARCH_LIST"
  else
    rm -f "$STAMP"
    # Editable: the build puts flora/_C*.so into the source tree that pytest and
    # the benchmarks import from the repository root (as in the README).
    # tools/device_twin.sh rehearses this command and environment on the CPU: keep them alike.
    run "$PY" -m pip install --no-deps --no-build-isolation --no-index -v -e .
    key "built in $(( $(date +%s) - t0 )) s, archs $TORCH_CUDA_ARCH_LIST"
  fi
  say "python -m flora info"
  run "$PY" -m flora info
  ext_check
  if [ "$DRY" != 1 ]; then mkdir -p "$(dirname "$STAMP")"; echo "$want" >"$STAMP"; fi
}

# kernel sweeps: flora's kernels on once cuda-kernels passed (or GPU_RUN_KERNELS=1)
kernels_on() {
  if [ "${GPU_RUN_KERNELS_OK:-0}" = 1 ]; then export FLORA_CUDA_KERNELS=1; fi
  return 0
}

# every stage but build: refuse to run on a missing or CPU-only extension
need_ext() {
  ext_check || { echo "run 'bench/gpu_run.sh build' first (see build.log)" >&2; exit 1; }
}

stage_test() {
  need_ext
  export FLORA_REQUIRE_EXTENSION=1
  local extra=() rc1=0 rc2=0 a b
  if [ "$DRY" = 1 ] || "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    extra+=(--timeout "${TEST_TIMEOUT:-120}")
  fi
  # shellcheck disable=SC2206  # TEST_ARGS is meant to split into words
  extra+=(${TEST_ARGS:-})
  say "pytest: the CUDA subset (-m cuda)"
  run "$PY" -m pytest tests -q -rfEs -m cuda "${extra[@]}" 2>&1 | tee "$STATE/pytest-cuda.txt" || rc1=$?
  say "pytest: the rest of the suite"
  run "$PY" -m pytest tests -q -rfE -m "not cuda" "${extra[@]}" 2>&1 | tee "$STATE/pytest-rest.txt" || rc2=$?
  a="$(pytest_line "$STATE/pytest-cuda.txt")"; b="$(pytest_line "$STATE/pytest-rest.txt")"
  key "cuda: ${a:-rc $rc1}; rest: ${b:-rc $rc2}"
  [ "$rc1" = 0 ] && [ "$rc2" = 0 ]
}

stage_sanitize() {
  need_ext
  export FLORA_REQUIRE_EXTENSION=1
  if [ "$DRY" != 1 ] && ! command -v compute-sanitizer >/dev/null; then
    key "compute-sanitizer not found"; return 1
  fi
  run compute-sanitizer --version || true
  local tool rc=0 one summary keys=() sel
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    case "$tool" in
      racecheck) sel=(tests/test_ops.py -m cuda) ;;   # shared-memory hazards: the ops' kernels
      *) sel=(tests -m cuda) ;;
    esac
    say "compute-sanitizer --tool $tool over pytest ${sel[*]}"
    one=0
    summary="$(sanitize "$tool" "${SANITIZE_TIMEOUT:-240}" "$STATE/san-$tool.txt" "${sel[@]}")" || one=$?
    keys+=("$tool: $summary, $(pytest_line "$STATE/san-$tool.txt")")
    [ "$one" = 0 ] || rc=1
  done
  key "$(IFS=';'; echo "${keys[*]}")"
  return "$rc"
}

# kernels_md: $OUT/kernels.json (+ kernels-graphs.json) -> $OUT/kernels.md and the key figure
kernels_md() {
  local rc=0
  say "kernels.md"
  if [ "$DRY" = 1 ]; then
    echo "+ (summarise $OUT/kernels.json and kernels-graphs.json into $OUT/kernels.md)"
    return "$rc"
  fi
  "$PY" - "$OUT" "$STATE/key.$STAGE" <<'EOF' || rc=$?
import datetime
import json
import os
import statistics
import sys

out, keyfile = sys.argv[1], sys.argv[2]
OPS = ("ffl", "fbl", "ffbl", "dx")
md, keys = [], []
try:
    import torch
    dev = torch.cuda.get_device_name(0)
except Exception:  # noqa: BLE001
    dev = "?"


def section(path, title):
    if not os.path.isfile(path):
        md.append(f"### {title}\n\n(no {os.path.basename(path)}: the run did not finish)\n")
        return None
    res = json.load(open(path))
    rows = [r for r in res["rows"] if "t_us" in r]  # rows that failed carry "error"
    errors = [r for r in res["rows"] if "error" in r]
    if not rows:
        md.append(f"### {title}\n\n(no timed rows; {len(errors)} errors)\n")
        return None
    ms = sorted({r["M"] for r in rows})
    ranks = sorted({r["r"] for r in rows})
    rr = 32 if 32 in ranks else ranks[len(ranks) // 2]
    idx = {(r["model"], r["shape"], r["dtype"], r["r"], r["M"], r["op"]): r for r in rows}
    cases = []
    for r in rows:
        c = (r["model"], r["shape"], r["op"], r["dtype"])
        if r["op"] in OPS and c not in cases:
            cases.append(c)
    info = res.get("info", {})
    md.append(f"### {title}\n")
    md.append(f"- {dev}; torch {info.get('torch')}; flora {info.get('flora')}, CUDA archs {info.get('cuda_archs')}; "
              f"{datetime.date.today()}")
    md.append(f"- copy bandwidth (512 MB dst.copy_(src), read + write): {res['copy_gbs']:.0f} GB/s")
    md.append(f"- each cell at r = {rr}: op/base / op/fused / lora/base (dx: the same against cuBLAS dx on W, "
              f"on [W; A] and unfused); decode cells (M <= 16) add the op's GB/s\n")

    def table(cases, what, cell):
        """One row per (model, proj, op or call, dtype), one cell(op, key, M) per M."""
        md.append(f"| model | proj | {what} | dtype | " + " | ".join(f"M={m}" for m in ms) + " |")
        md.append("|---|---|---|---|" + "---|" * len(ms))
        for model, shape, op, dtype in cases:
            cells = [cell(op, (model, shape, dtype, rr, m), m) for m in ms]
            md.append(f"| {model} | {shape} | {op} | {dtype} | " + " | ".join(cells) + " |")

    def ratios(op, k, m):
        pre = "dx-" if op == "dx" else ""  # dx: its own yardsticks (cuBLAS dx on [W; A], unfused)
        o, f, lo = idx.get(k + (op,)), idx.get(k + (pre + "fused",)), idx.get(k + (pre + "lora",))
        if not o or not f or not lo or o.get("ratio") is None or lo.get("ratio") is None:
            return "-"
        c = f"{o['ratio']:.2f} / {o['t_us'] / f['t_us']:.2f} / {lo['ratio']:.2f}"
        return c + (f" ({o['gbs']:.0f})" if m <= 16 else "")

    def over_aten(call, k, m):
        o, a = idx.get(k + (call,)), idx.get(k + (call + "@aten",))
        return f"{o['t_us'] / a['t_us']:.3g}" if o and a else "-"

    table(cases, "op", ratios)
    # --aten-too: each flora call against the same call on cuBLAS (FLORA_CUDA_KERNELS=0),
    # the evidence for measured_faster in csrc/common/cuda_dispatch.cpp
    twins = [r for r in rows if r["op"].endswith("@aten")]
    if twins:
        calls = []
        for r in twins:
            c = (r["model"], r["shape"], r["op"][:-5], r["dtype"])
            if c not in calls:
                calls.append(c)
        md.append(f"\nflora call / the same call on cuBLAS (FLORA_CUDA_KERNELS=0), r = {rr}; "
                  f"below 1: the kernel wins\n")
        table(calls, "call", over_aten)
    ops = [r for r in rows if r["op"] in OPS and r.get("ratio") is not None]
    ran = sorted({r["dispatch"].split(":")[0] for r in rows if r.get("dispatch")})
    if ran:
        md.append(f"\nflora ops ran on: {', '.join(ran)} (flora._C.cuda_last_dispatch per row)")
    if errors:
        md.append(f"\n{len(errors)} row(s) failed, e.g. {errors[0]['op']} M={errors[0].get('M')}: {errors[0]['error']}")
    if not ops:
        return None
    md.append(f"\nOver all ranks ({', '.join(map(str, ranks))}): op/base median, and cells within 1.05x of base\n")
    md.append("| dtype | " + " | ".join(f"M={m}" for m in ms) + " |")
    md.append("|---|" + "---|" * len(ms))
    for dtype in sorted({r["dtype"] for r in ops}):
        cells = []
        for m in ms:
            v = [r["ratio"] for r in ops if r["dtype"] == dtype and r["M"] == m]
            cells.append(f"{statistics.median(v):.2f} ({sum(x <= 1.05 for x in v)}/{len(v)})" if v else "-")
        md.append(f"| {dtype} | " + " | ".join(cells) + " |")
    md.append("")
    worst = max(ops, key=lambda r: r["ratio"])
    dec = [r["ratio"] for r in ops if r["M"] <= 16]
    return (f"op/base median {statistics.median(r['ratio'] for r in ops):.2f}"
            + (f" (M<=16 {statistics.median(dec):.2f})" if dec else "")
            + f", worst {worst['ratio']:.2f} {worst['model']} {worst['shape']} {worst['op']} {worst['dtype']} "
              f"M={worst['M']} r={worst['r']}")


k = section(os.path.join(out, "kernels.json"), "GPU kernels, eager (CUDA events)")
if k:
    keys.append(k)
if os.path.isfile(os.path.join(out, "kernels-graphs.json")):
    k = section(os.path.join(out, "kernels-graphs.json"), "GPU kernels, CUDA graphs")
    if k:
        keys.append("graphs " + k.split(",")[0].replace("op/base median ", ""))
with open(os.path.join(out, "kernels.md"), "w") as f:
    f.write("\n".join(md) + "\n")
print("\n".join(md))
with open(keyfile, "w") as f:
    f.write("; ".join(keys) + "\n")
EOF
  return "$rc"
}

stage_kernels() {
  need_ext
  kernels_on
  local ms="${KERNELS_MS:-1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192}"
  local rc=0
  say "bench/kernels.py eager, M = $ms"
  # shellcheck disable=SC2086  # KERNELS_ARGS is meant to split into words
  run "$PY" bench/kernels.py --device cuda --ms "$ms" --models "${KERNELS_MODELS:-llama-3.2-1b,llama-3.2-3b,llama-2-7b}" \
    --json "$OUT/kernels.json" ${KERNELS_ARGS:-} || rc=$?
  if [ "${KERNELS_GRAPHS:-1}" != 0 ]; then
    say "bench/kernels.py CUDA graphs, bf16"
    # shellcheck disable=SC2086
    run "$PY" bench/kernels.py --device cuda --graphs --ms "${KERNELS_GRAPHS_MS:-1,2,4,8,16,32,64}" \
      --dtypes bfloat16 --json "$OUT/kernels-graphs.json" ${KERNELS_ARGS:-} || rc=$?
  fi
  kernels_md || rc=$?
  return "$rc"
}

stage_latency() {
  need_ext
  local models name rc=0
  case "$STAGE" in
    latency-1b) models=1b ;;
    latency-3b) models=3b ;;
    *) models="${LATENCY_MODELS:-1b 3b}" ;;
  esac
  name="latency-${models// /-}"
  local rows="--rows ${LATENCY_ROWS:-base ffba zflora pf-lora lora transformers peft peft-merged}"
  [ "${LATENCY_ROWS:-}" = all ] && rows=""
  say "python -m flora bench latency --model $models"
  # shellcheck disable=SC2086  # models and LATENCY_ARGS are meant to split into words
  run "$PY" -m flora bench latency --device cuda --model $models --dtype bf16 --batch 1 8 --prompt 512 \
    --mode both --out-dir "$OUT/latency" --name "$name" --results "$OUT/RESULTS-latency.md" ${rows} ${LATENCY_ARGS:-} \
    || rc=$?
  say "goals"
  if [ "$DRY" = 1 ]; then echo "+ (list the goals of $OUT/latency/$name.json)"; return "$rc"; fi
  "$PY" - "$OUT/latency/$name.json" "$STATE/key.$STAGE" <<'EOF' || rc=$?
import json
import os
import sys

path, keyfile = sys.argv[1], sys.argv[2]
if not os.path.isfile(path):
    open(keyfile, "w").write("no JSON written\n")
    sys.exit(1)
res = json.load(open(path))
goals, rows = res.get("goals", []), res.get("rows", [])
for g in goals:
    print(f"  {'met   ' if g['met'] else 'MISSED'}  {g['goal']}: {g['value']:.3f} {g.get('unit', '')} "
          f"(limit {g['limit']})")
skipped = [r for r in rows if r.get("skipped")]
missed = [g["goal"] for g in goals if not g["met"]]
key = f"goals {len(goals) - len(missed)}/{len(goals)} met; {len(rows)} rows"
key += f", {len(skipped)} skipped" if skipped else ""
key += f"; copy {res.get('copy_gbps', 0):.0f} GB/s"
for m in res.get("models", []):  # GPU memory of loading against the weights (1x: no second copy)
    if m.get("load_peak_bytes"):
        key += f"; {m['model']} load peak {m['load_peak_bytes'] / m['weight_bytes']:.2f}x weights"
open(keyfile, "w").write(key + "\n")
EOF
  return "$rc"
}

stage_smoke() {
  need_ext
  kernels_on
  local rc=0
  run "$PY" bench/kernels.py --device cuda --quick --models 1024-wide --dtypes bfloat16 || rc=$?
  run "$PY" bench/kernels.py --device cuda --quick --graphs --models 1024-wide --dtypes bfloat16 || rc=$?
  run "$PY" bench/latency.py --device cuda --quick --model tiny --out-dir "$STATE/smoke" --name smoke \
    --no-results --no-plot || rc=$?
  key "$([ "$rc" = 0 ] && echo "kernels + latency ran on cuda" || echo "a benchmark failed (see log)")"
  return "$rc"
}

# pytest's -m cuda subset alone (the default call; `test` adds the rest of the suite)
stage_test_cuda() {
  need_ext
  export FLORA_REQUIRE_EXTENSION=1
  local extra=() rc=0
  if [ "$DRY" = 1 ] || "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    extra+=(--timeout "${TEST_TIMEOUT:-120}")
  fi
  # shellcheck disable=SC2206  # TEST_ARGS is meant to split into words
  extra+=(${TEST_ARGS:-})
  say "pytest: the CUDA subset (-m cuda; the kernels' own file runs in cuda-kernels)"
  pytest_survive "$STATE/pytest-cuda.txt" tests -rfEs -m cuda -p no:cacheprovider \
    --ignore=tests/test_cuda_kernels.py "${extra[@]}" || rc=$?
  key "$(pytest_line "$STATE/pytest-cuda.txt" || true)$(crash_note)"
  [ -s "$STATE/crashed" ] && rc=1
  [ "$DRY" = 1 ] && key "dry"
  return "$rc"
}

# the custom CUDA kernels (opt-in dispatch) and memcheck over a small subset of their tests
stage_cuda_kernels() {
  need_ext
  local f=tests/test_cuda_kernels.py rc=0 one=0 san
  export FLORA_REQUIRE_EXTENSION=1 FLORA_CUDA_KERNELS=1
  say "FLORA_CUDA_KERNELS=1 pytest -m cuda $f"
  run "$PY" -m pytest "$f" -q -rfEs -m cuda -p no:cacheprovider 2>&1 | tee "$STATE/ck.txt" || rc=$?
  if [ "$DRY" != 1 ] && ! command -v compute-sanitizer >/dev/null; then
    key "tests: $(pytest_line "$STATE/ck.txt"); compute-sanitizer not found"; return 1
  fi
  # One small case per kernel and epilogue (bf16): under memcheck every launch is slow.
  local ids=()
  # shellcheck disable=SC2206  # SANITIZE_IDS is meant to split into words
  [ -n "${SANITIZE_IDS:-}" ] && ids=(${SANITIZE_IDS}) || ids=(
    "test_ffl_kernel[True-True-32-3-dtype0]" "test_ffl_repeat_add[repeat4-7-3-dtype0]"
    "test_fbl_kernel[False-0.5-True-True-7-3-dtype0]" "test_ffl_kernel[True-True-32-17-dtype0]"
    "test_ffl_repeat_add_with_res[3-dtype0]" "test_pointwise_kernel[rms_norm-dtype0]"
    "test_pointwise_kernel[rms_norm_stream-dtype0]" "test_pointwise_kernel[rope-dtype0]"
    "test_pointwise_kernel[silu_mul-dtype0]" "test_silu_mul_over_u_kernel[dtype0]"
    "test_fbl_inplace_kernel[32-0.5-True-3-dtype0]" "test_rope_cache_kernel[3-dtype0]"
    "test_ffl_repeat_add[repeat1-8-17-dtype0]" "test_fbl_kernel[True-1.0-False-False-32-17-dtype0]"
    "test_fbl_kernel[False-0.5-True-True-32-17-dtype0]" "test_ffbl_kernel[0.5-True-True-8-17-dtype0]"
    "test_backward_dx_kernel[True-8-17-dtype0]" "test_backward_dx_kernel[False-8-17-dtype0]"
    "test_decode_attention_kernel[5-shape0-dtype0]" "test_decode_attention_kernel[1-shape4-dtype0]"
    "test_decode_attention_kernel_masked_chunks[4]")
  # memcheck (out-of-bounds, misaligned) and racecheck (shared-memory hazards): what a
  # kernel must pass before kVerified lists it (csrc/common/cuda_dispatch.cpp).
  local tool keys=() bad=0
  for tool in ${CK_SANITIZE_TOOLS:-memcheck racecheck}; do
    say "compute-sanitizer $tool over ${#ids[@]} cases of $f (first failure stops)"
    one=0
    san="$(sanitize "$tool" "${SANITIZE_TIMEOUT:-120}" "$STATE/ck-$tool.txt" "${ids[@]/#/$f::}" -x)" || one=$?
    keys+=("$tool: $san")
    [ "$one" = 0 ] || bad=1
  done
  key "tests: $(pytest_line "$STATE/ck.txt"); $(IFS=';'; echo "${keys[*]}")"
  [ "$rc" = 0 ] && [ "$bad" = 0 ]
}

stage_generate() {
  need_ext
  local rc=0 keys=() name
  run "$PY" bench/generate_smoke.py --device cuda --json "$OUT/generate.json" || rc=$?
  # the real SmolLM2 (its first blocks, bit-exact) when .device carried it
  [ -z "$DEVICE_GGUF" ] || run "$PY" bench/generate_smoke.py --device cuda --gguf "$DEVICE_GGUF" \
    --json "$OUT/generate-real.json" || rc=$?
  if [ "$DRY" = 1 ]; then key "dry"; return 0; fi
  for name in generate generate-real; do
    [ "$name" = generate ] || [ -n "$DEVICE_GGUF" ] || continue
    keys+=("$("$PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); r = d["results"]
n = sum(x["equal"] for x in r)
what = "real %d layers" % d["layers"] if d.get("mode") == "real" else "random"
print(what + ": " + ("PASS" if d["ok"] else "FAIL") + " %d/%d equal" % (n, len(r)))' \
      "$OUT/$name.json" 2>/dev/null || echo "no $name.json (rc $rc)")")
  done
  key "$(IFS=';'; echo "${keys[*]}")"
  return "$rc"
}

# the CLI on the GPU: `flora demo --quick` and a 20-step `flora train` in bf16
# autocast, on the real SmolLM2 blocks .device carried (skipped without them)
stage_cli() {
  need_ext
  local rc=0 d="$STATE/cli"
  if [ -z "$DEVICE_GGUF" ]; then key "skipped: no .device/smollm2.gguf.xz carried"; return 0; fi
  mkdir -p "$d"
  run env FLORA_SMOLLM2_GGUF="$DEVICE_GGUF" "$PY" -m flora demo --device cuda --quick --no-progress \
    --out "$d/demo" || rc=$?
  run "$PY" -c 'import sys; from flora.synthetic import finetune_data, write_jsonl
write_jsonl(finetune_data("topic", 160, seed=0), sys.argv[1])' "$d/train.jsonl" || rc=$?
  run "$PY" -m flora train --model "$DEVICE_GGUF" --data "$d/train.jsonl" --variant ffba --rank 32 \
    --max-steps 20 --batch-size 8 --seq-len 64 --bf16 on --device cuda --no-progress --out "$d/train" \
    2>&1 | tee "$d/train.txt" || rc=$?
  # the trained adapter on and off, batched left-padded prompts, CUDA-graph decode in bf16
  run "$PY" -m flora generate --model "$DEVICE_GGUF" --adapter "$d/train/adapter" --compare --data "$d/train.jsonl" \
    --limit 16 --max-new-tokens 16 --device cuda --out "$OUT/cli-generate.jsonl" 2>&1 | tee "$d/generate.txt" || rc=$?
  # flora serve on CUDA: the worker thread's decode (CUDA graphs) at batches 1 .. 8
  run "$PY" bench/serve.py --model "$DEVICE_GGUF" --device cuda --clients 1 8 --requests 2 --max-tokens 16 \
    --json "$OUT/cli-serve.json" 2>&1 | tee "$d/serve.txt" || rc=$?
  # its prefix cache on CUDA: a 4-turn chat, the cache on and off
  run "$PY" bench/serve.py --model "$DEVICE_GGUF" --device cuda --conversation 4 --rounds 1 --max-tokens 16 \
    --json "$OUT/cli-prefix.json" 2>&1 | tee "$d/prefix.txt" || rc=$?
  # echo's prompts scored together on CUDA (one forward, a question's choices as a prefix tree)
  run "$PY" bench/serve.py --model "$DEVICE_GGUF" --device cuda --scoring 2 --clients 2 --scoring-prompts 4 \
    --json "$OUT/cli-scoring.json" 2>&1 | tee "$d/scoring.txt" || rc=$?
  # what a prefill forward costs by itself in tokens on this GPU (serve's grouping of joining prompts:
  # generation.ADMIT_FORWARD_TOKENS_BY_DEVICE["cuda"], an estimate until this measures it), 1B and SmolLM2
  run "$PY" bench/admit_cost.py --device cuda --model 1b --json "$OUT/cli-admit-1b.json" || rc=$?
  run env FLORA_SMOLLM2_GGUF="$DEVICE_GGUF" "$PY" bench/admit_cost.py --device cuda \
    --json "$OUT/cli-admit-smollm2.json" || rc=$?
  # packed rows in bf16 on CUDA (flora train --pack: block-diagonal attention), 20 steps
  run "$PY" -m flora train --model "$DEVICE_GGUF" --data "$d/train.jsonl" --variant ffba --rank 32 --pack \
    --max-steps 20 --batch-size 8 --seq-len 256 --bf16 on --device cuda --no-progress --out "$d/train-pack" \
    2>&1 | tee "$d/train-pack.txt" || rc=$?
  [ "$DRY" = 1 ] && { key "dry"; return 0; }
  key "demo $([ -s "$d/demo/latency.png" ] && echo completed || echo FAILED); train: $(tail -n 1 "$d/train.txt" \
    | "$PY" -c 'import json, sys; d = json.loads(sys.stdin.read()); print("%d steps, loss %.3g, %.0f tok/s" % (d["steps"], d["final_train_loss"], d["tokens_per_s"]))' 2>/dev/null || echo FAILED); packed: $(tail -n 1 "$d/train-pack.txt" \
    | "$PY" -c 'import json, sys; d = json.loads(sys.stdin.read()); print("%d steps, %.0f tok/s" % (d["steps"], d["tokens_per_s"]))' 2>/dev/null || echo FAILED); admit forward: $("$PY" -c 'import json, sys
print(", ".join("%s %.0f tokens" % (d["model"], d["forward_tokens"]) for d in map(json.load, map(open, sys.argv[1:]))))' "$OUT/cli-admit-1b.json" "$OUT/cli-admit-smollm2.json" 2>/dev/null || echo FAILED); generate: $(tail -n 1 "$d/generate.txt" \
    | "$PY" -c 'import json, sys; r = json.loads(sys.stdin.read())["runs"]; print(", ".join("%s %s exact, %.0f tok/s" % (k, v["exact_match"], v["tokens_per_s"]) for k, v in r.items()))' 2>/dev/null || echo FAILED); serve: $("$PY" -c 'import json, sys
print(", ".join("%d clients %.0f tok/s" % (r["clients"], r["tokens_per_s"]) for r in json.load(open(sys.argv[1]))["rows"]))' "$OUT/cli-serve.json" 2>/dev/null || echo FAILED); prefix cache: $("$PY" -c 'import json, sys
print(", ".join("turn %d %.2fx" % (r["turn"], r["ratio"]) for r in json.load(open(sys.argv[1]))["rows"]))' "$OUT/cli-prefix.json" 2>/dev/null || echo FAILED); scoring: $("$PY" -c 'import json, sys
print(", ".join("%.1f prompts/s, %.1f a forward" % (r["prompts_per_s"], r["prompts_per_forward"]) for r in json.load(open(sys.argv[1]))["rows"]))' "$OUT/cli-scoring.json" 2>/dev/null || echo FAILED)"
  return "$rc"
}

# one training step, 1B shape, batch 8 x 512, r 32, bf16 autocast: flora lora / ffba / zflora
# against PEFT LoRA on transformers, tokens/s and peak memory
stage_train() {
  need_ext
  local rc=0
  # shellcheck disable=SC2086  # TRAIN_ARGS is meant to split into words
  # lora+full-logits: flora's lora without the chunked loss, the saving measured in the same run
  run "$PY" bench/train_step.py --device cuda --model 1b --batch 8 --seq 512 --rank 32 \
    --rows peft-lora lora lora+full-logits ffba zflora --json "$OUT/train_step.json" ${TRAIN_ARGS:-} || rc=$?
  [ "$DRY" = 1 ] && { key "dry"; return 0; }
  key "$("$PY" -c 'import json, sys; rows = json.load(open(sys.argv[1]))["rows"]
print(", ".join("%s %s" % (r["row"], ("%.0f tok/s %.1f GiB" % (r["tokens_per_s"], r.get("peak_gib") or 0))
                if "tokens_per_s" in r else "error") for r in rows))' "$OUT/train_step.json" 2>/dev/null \
    || echo "no train_step.json (rc $rc)")"
  return "$rc"
}

# several adapters in one batch (stack_adapters) against one adapter and the base, 1B, bf16
stage_mixed() {
  need_ext
  local rc=0
  run "$PY" bench/mixed_adapters.py --device cuda --shape 1b --dtype bfloat16 --prompt 512 --new 64 \
    --json "$OUT/mixed_adapters.json" 2>&1 | tee "$OUT/mixed_adapters.md" || rc=$?
  return "$rc"
}

# a short sweep: the 1B projections, decode and one prefill M, bf16, eager + graphs
stage_kernels_short() {
  need_ext
  kernels_on
  local rc=0
  # shellcheck disable=SC2086  # KERNELS_ARGS is meant to split into words
  run "$PY" bench/kernels.py --device cuda --models llama-3.2-1b --ms "${KERNELS_MS:-1,4,8,16,256}" --ranks 32 \
    --dtypes bfloat16 --min-time 0.05 --json "$OUT/kernels.json" ${KERNELS_ARGS:-} || rc=$?
  # shellcheck disable=SC2086
  # graphs: decode M, each flora call also on cuBLAS (--aten-too): where the kernels win
  run "$PY" bench/kernels.py --device cuda --graphs --models llama-3.2-1b --ms "${KERNELS_GRAPHS_MS:-1,4,8}" \
    --ranks 32 --dtypes bfloat16 --min-time 0.05 --aten-too --json "$OUT/kernels-graphs.json" \
    ${KERNELS_ARGS:-} || rc=$?
  kernels_md || rc=$?
  return "$rc"
}

# prompt / training attention as flora calls SDPA (is_causal, or mask + expanded kv
# heads) against its former call (mask + grouped kv heads: the math kernel), 1B
# heads, bf16, forward and forward + backward (bench/attention.py)
stage_attention() {
  need_ext
  local rc=0 prompt decode
  # shellcheck disable=SC2086  # ATTENTION_ARGS is meant to split into words
  # (--packed 4: flora train --pack's masked rows against causal over the row: which kernel, what cost)
  run "$PY" bench/attention.py --device cuda --shapes 1b --batch 1 8 --seq 512 2048 --packed 4 \
    --json "$OUT/attention.json" --md "$OUT/attention.md" ${ATTENTION_ARGS:-} || rc=$?
  # decode: flora's split-key kernel (forced) against the grouped SDPA call, 1B / 3B heads
  # shellcheck disable=SC2086  # DECODE_ATTENTION_ARGS is meant to split into words
  run "$PY" bench/attention.py --device cuda --decode --shapes 1b 3b --batch 1 8 --context 640 4096 32768 \
    --splits 1 16 --no-padded --json "$OUT/attention-decode.json" --md "$OUT/attention-decode.md" ${DECODE_ATTENTION_ARGS:-} \
    || rc=$?
  if [ "$DRY" = 1 ]; then key "dry"; return 0; fi
  # one loose file for both tables
  [ -f "$OUT/attention-decode.md" ] && { printf '\n\n' >>"$OUT/attention.md"; cat "$OUT/attention-decode.md" >>"$OUT/attention.md"; }
  prompt="$("$PY" -c 'import json, sys
out = []
for r in json.load(open(sys.argv[1]))["rows"]:
    if "x" in r:  # the flora row of a case: its ratio to the former call
        tag = "%dx%d%s%s" % (r["batch"], r["seq"], "p" if r["padded"] else "", "+bwd" if r["backward"] else "")
        out.append("%s %.2f" % (tag, r["x"]))
print("flora / former: " + " ".join(out))' "$OUT/attention.json" 2>/dev/null || echo "no table (rc $rc)")"
  decode="$("$PY" -c 'import json, sys
out = []
for r in json.load(open(sys.argv[1]))["rows"]:
    if r["form"] == "kernel (forced)":  # the kernel against SDPA, best of eager and graph
        out.append("%s/%dx%d %.2f" % (r["shape"], r["batch"], r["context"], r["x"]))
print("decode kernel / sdpa: " + " ".join(out))' "$OUT/attention-decode.json" 2>/dev/null \
    || echo "no decode table (rc $rc)")"
  key "$prompt; $decode"
  return "$rc"
}

# where a 1B decode step's time goes: device time per kind of kernel, graphed step,
# weight-streaming floor (bench/step_profile.py), base ffba zflora, batch 1 and 8
stage_step_profile() {
  need_ext
  local rc=0
  # shellcheck disable=SC2086  # STEP_PROFILE_ARGS is meant to split into words
  run "$PY" bench/step_profile.py --device cuda --model 1b --variants base ffba zflora --batch 1 8 \
    --json "$OUT/step-profile.json" --md "$OUT/step-profile.md" ${STEP_PROFILE_ARGS:-} || rc=$?
  if [ "$DRY" = 1 ]; then key "dry"; return 0; fi
  key "$("$PY" -c 'import json, sys
out = []
for r in json.load(open(sys.argv[1]))["rows"]:
    out.append("%s b%d: graphed %.2f busy %.2f floor %.2f ms" % (r["variant"], r["batch"], r["graphed_ms"],
                                                                r["busy_ms"], r["floor_ms"]))
print("; ".join(out))' "$OUT/step-profile.json" 2>/dev/null || echo "no profile (rc $rc)")"
  return "$rc"
}

# CUDA launches per decoder layer in one eager decode step (bench/op_count.py
# --device cuda), bf16, batch 1 and 8: on the dispatch this run chose (the
# kernels as if verified once cuda-kernels passed), then on cuBLAS alone
# (FLORA_CUDA_KERNELS=0): what the counts on the CPU machine predict.
stage_op_count() {
  need_ext
  local rc=0 b sw
  for b in 1 8; do
    for sw in default cublas; do
      # shellcheck disable=SC2046  # the env prefix is meant to be empty or one word
      run env $([ "$sw" = cublas ] && echo FLORA_CUDA_KERNELS=0) "$PY" bench/op_count.py --device cuda --no-compile \
        --dtype bf16 --batch "$b" --variants ${OP_COUNT_VARIANTS:-base ffba zflora pf-lora lora} \
        --json "$OUT/op-count-b$b-$sw.json" || rc=$?
    done
  done
  if [ "$DRY" = 1 ]; then key "dry"; return 0; fi
  key "$("$PY" -c 'import json, sys
out = []
for p in sys.argv[1:]:
    try:
        rows = {r["variant"]: r["kernels_per_layer"] for r in json.load(open(p))["rows"]}
    except OSError:
        continue
    name = p.rsplit("op-count-", 1)[1][:-5]
    out.append(name + ": " + " ".join(f"{v} {k:g}" for v, k in rows.items()))
print("; ".join(out) or "no counts written")' "$OUT"/op-count-b*.json 2>/dev/null || echo "no counts (rc $rc)")"
  return "$rc"
}

# ---------------------------------------------------------------------------
# orchestrator
# ---------------------------------------------------------------------------
if [ "${1:-}" = __stage ]; then            # internal: one stage, in this process
  STAGE="$2"
  echo "$PPID" >"$STATE/pgid"   # `timeout` (our parent) leads its own process group: what a signal stops
  case "$STAGE" in
    build) stage_build ;;
    test) stage_test ;;
    sanitize) stage_sanitize ;;
    kernels) stage_kernels ;;
    latency|latency-1b|latency-3b) stage_latency ;;
    smoke) stage_smoke ;;
    test-cuda) stage_test_cuda ;;
    cuda-kernels) stage_cuda_kernels ;;
    generate) stage_generate ;;
    kernels-short) stage_kernels_short ;;
    attention) stage_attention ;;
    step-profile) stage_step_profile ;;
    op-count) stage_op_count ;;
    cli) stage_cli ;;
    train) stage_train ;;
    mixed) stage_mixed ;;
    *) echo "unknown stage $STAGE" >&2; exit 2 ;;
  esac
  exit 0
fi

usage() { sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }

STAGES="build cuda-kernels test-cuda generate attention latency-1b kernels-short step-profile op-count cli train mixed test sanitize kernels latency latency-3b smoke"
QUICK=(build cuda-kernels test-cuda attention latency-1b kernels-short step-profile)
# MIN: seconds a stage needs to be worth starting; CAP: its own timeout (CAP_<stage> overrides)
declare -A MIN=([build]=0 [test-cuda]=40 [cuda-kernels]=40 [generate]=30 [latency-1b]=200 [kernels-short]=40 [attention]=20 [step-profile]=30 [op-count]=25 [cli]=60 [train]=90 [mixed]=60
                [test]=90 [sanitize]=150 [kernels]=150 [latency-3b]=200 [latency]=450 [smoke]=45)
declare -A CAP=([build]=400 [test-cuda]=150 [cuda-kernels]=150 [generate]=150 [latency-1b]=260 [kernels-short]=120 [attention]=120 [step-profile]=120 [op-count]=90 [cli]=240 [train]=300 [mixed]=200
                [test]=400 [sanitize]=560 [kernels]=560 [latency-3b]=560 [latency]=560 [smoke]=120)
for st in $STAGES; do
  v="CAP_${st//-/_}"
  [ -z "${!v:-}" ] || CAP[$st]="${!v}"
done
stages=()
default_budget=570
if [ $# -eq 0 ]; then set -- quick; fi
for a in "$@"; do
  case "$a" in
    -h|--help|help) usage; exit 0 ;;
    quick) stages+=("${QUICK[@]}"); [ $# -eq 1 ] && default_budget=480 ;;
    all) stages+=(build test sanitize kernels latency-1b latency-3b) ;;
    *)
      case " $STAGES " in
        *" $a "*) stages+=("$a") ;;
        *) echo "gpu_run.sh: unknown stage '$a' (quick all $STAGES)" >&2; exit 2 ;;
      esac ;;
  esac
done
BUDGET="${GPU_RUN_BUDGET:-$default_budget}"
# build first, always (cheap when already built); drop repeats, keep the order
ordered=(build)
for s in "${stages[@]}"; do
  case " ${ordered[*]} " in *" $s "*) ;; *) ordered+=("$s") ;; esac
done

mkdir -p "$OUT"
STATE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")"
export STATE DRY

# The carried .device folder (tools/device_pack.py on the CPU machine): the
# CUTLASS headers, a real SmolLM2 cut to its first blocks, the gguf wheel.
DEVICE_GGUF=""
if [ -d "$ROOT/.device" ]; then
  say "unpacking .device"
  run "$PY" tools/device_pack.py --unpack --dest-gguf "$STATE/smollm2.gguf" || true
  if [ "$DRY" = 1 ] || [ -f "$STATE/smollm2.gguf" ]; then DEVICE_GGUF="$STATE/smollm2.gguf"; fi
  if compgen -G "$ROOT/.device/whl/*.whl" >/dev/null; then
    run "$PY" -m pip install -q --no-index --no-deps --target "$STATE/site" "$ROOT"/.device/whl/*.whl \
      && export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export DEVICE_GGUF
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
declare -A STATUS=() SECS=() KEY=()
case "${GPU_RUN_KERNELS:-auto}" in
  1) export FLORA_CUDA_KERNELS=1; KERNELS_NOTE="on (GPU_RUN_KERNELS=1)" ;;
  0) KERNELS_NOTE="off (GPU_RUN_KERNELS=0)" ;;
  *) KERNELS_NOTE="off until cuda-kernels passes, then on in the kernel sweeps only" ;;
esac
INTERRUPTED=0

# shellcheck disable=SC2317  # a trap handler
on_signal() {
  INTERRUPTED=1
  if [ -s "$STATE/pgid" ]; then kill -TERM -- "-$(cat "$STATE/pgid")" 2>/dev/null || true; fi
}
trap on_signal TERM INT

summary="$OUT/summary.txt"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
[ "$commit" = '?' ] || git -C "$ROOT" diff --quiet HEAD 2>/dev/null || commit="$commit+changes"
# write_summary: the table of stage, status, seconds and key figure so far (after every stage)
write_summary() {
  {
    echo "gpu_run.sh ${ordered[*]} | ${gpu:-no GPU seen} | commit $commit | $(date -u '+%Y-%m-%d %H:%M UTC') | total $(( $(date +%s) - T0 ))s"
    echo "flora CUDA kernels in the benchmarks: $KERNELS_NOTE"
    printf '%-13s %-8s %7s  %s\n' stage status seconds "key figure"
    for st in "${ordered[@]}"; do
      printf '%-13s %-8s %7s  %s\n' "$st" "${STATUS[$st]:-pending}" "${SECS[$st]:-}" "${KEY[$st]:-}"
    done
  } >"$summary.tmp" && mv "$summary.tmp" "$summary"
}

say "gpu_run.sh ${ordered[*]} (budget ${BUDGET}s, OUT=$OUT$([ "$DRY" = 1 ] && echo ', DRY RUN: nothing is executed'))"
for st in "${ordered[@]}"; do
  if [ "$INTERRUPTED" = 1 ]; then STATUS[$st]=skipped; KEY[$st]="interrupted"; SECS[$st]=0; continue; fi
  if [ "$st" != build ] && [ "${STATUS[build]}" != ok ] && [ "${STATUS[build]}" != dry ]; then
    STATUS[$st]=skipped; KEY[$st]="build failed"; SECS[$st]=0; continue
  fi
  left=$((DEADLINE - $(date +%s) - RESERVE))
  if [ "$left" -lt "${MIN[$st]}" ] || [ "$left" -lt 10 ]; then
    STATUS[$st]=skipped; KEY[$st]="no time: ${left}s left, needs ~${MIN[$st]}s; run it in another call"; SECS[$st]=0
    write_summary
    continue
  fi
  [ "$left" -le "${CAP[$st]}" ] || left="${CAP[$st]}"
  say "stage $st (at most ${left}s) -> $OUT/$st.log"
  rm -f "$STATE/pgid" "$STATE/key.$st"
  s0=$(date +%s)
  set +e
  (set -o pipefail; timeout -k 10 "$left" bash "$SELF" __stage "$st" 2>&1 | tee "$OUT/$st.log") &
  wait $!; rc=$?
  while [ "$INTERRUPTED" = 1 ] && kill -0 $! 2>/dev/null; do wait $!; rc=$?; done
  set -e
  SECS[$st]=$(( $(date +%s) - s0 ))
  KEY[$st]="$(cat "$STATE/key.$st" 2>/dev/null || true)"
  if [ "$INTERRUPTED" = 1 ]; then STATUS[$st]=KILLED
  elif [ "$rc" = 0 ]; then STATUS[$st]=$([ "$DRY" = 1 ] && echo dry || echo ok)
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then STATUS[$st]=TIMEOUT; KEY[$st]="stopped after ${left}s; ${KEY[$st]}"
  else STATUS[$st]=FAIL; KEY[$st]="${KEY[$st]:-exit $rc, see $st.log}"
  fi
  # Tested kernels on for the kernel sweeps after (see cuda-kernels above).
  if [ "$st" = cuda-kernels ] && [ "${GPU_RUN_KERNELS:-auto}" = auto ]; then
    if [ "${STATUS[$st]}" = ok ] || [ "${STATUS[$st]}" = dry ]; then
      export GPU_RUN_KERNELS_OK=1; KERNELS_NOTE="on in the kernel sweeps (cuda-kernels passed); default dispatch elsewhere"
      # the model-level stages then time the dispatch the passed kernels get once
      # listed in kVerified (measured_faster decides where): GPU_RUN_ASSUME_VERIFIED=0 keeps today's
      if [ "${GPU_RUN_ASSUME_VERIFIED:-1}" = 1 ]; then
        export FLORA_CUDA_ASSUME_VERIFIED=all
        KERNELS_NOTE="$KERNELS_NOTE, as if verified (FLORA_CUDA_ASSUME_VERIFIED=all)"
      fi
    else KERNELS_NOTE="off: the benchmarks time the cuBLAS fallback (cuda-kernels ${STATUS[$st]})"; fi
  fi
  write_summary
done

# --- the files the device tool returns: at most 8, 16 MiB each ---
for f in "$OUT"/*.log; do   # cap a runaway log (sanitizer output) at 14 MiB: head + tail
  [ -f "$f" ] || continue
  if [ "$(stat -c %s "$f")" -gt $((14 * 1024 * 1024)) ]; then
    { head -c $((7 * 1024 * 1024)) "$f"; printf '\n\n[... cut by gpu_run.sh ...]\n\n'; tail -c $((7 * 1024 * 1024)) "$f"; } >"$f.cut"
    mv "$f.cut" "$f"
  fi
done
write_summary
nfiles=$(find "$OUT" -type f | wc -l)
if [ "$nfiles" -gt 8 ]; then
  tar -C "$OUT" -czf "$STATE/gpu-run.tar.gz" . && mv "$STATE/gpu-run.tar.gz" "$OUT/gpu-run.tar.gz"
  keep=("$OUT/gpu-run.tar.gz" "$summary" "$OUT/kernels.md" "$OUT/RESULTS-latency.md" "$OUT/generate.json" "$OUT/attention.md" "$OUT/step-profile.md")
  for st in "${ordered[@]}"; do [ "${STATUS[$st]}" = ok ] || keep+=("$OUT/$st.log"); done
  n=0
  declare -A KEEP=()
  for f in "${keep[@]}"; do
    if [ -f "$f" ] && [ "$n" -lt 8 ]; then KEEP[$f]=1; n=$((n + 1)); fi
  done
  while IFS= read -r f; do [ -n "${KEEP[$f]:-}" ] || rm -f "$f"; done < <(find "$OUT" -type f)
  find "$OUT" -mindepth 1 -type d -empty -delete
  loose="$(for f in "${!KEEP[@]}"; do basename "$f"; done | sort | tr '\n' ' ')"
  echo "more than 8 files: every output is in gpu-run.tar.gz (tar -xzf); kept loose: $loose" >>"$summary"
fi
rm -rf "$STATE"

echo
cat "$summary"
fail=0
for st in "${ordered[@]}"; do case "${STATUS[$st]}" in ok|dry) ;; *) fail=1 ;; esac; done
[ "$INTERRUPTED" = 1 ] && exit 143
exit "$fail"
