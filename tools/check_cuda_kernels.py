#!/usr/bin/env python3
"""Compile-time checks of the CUDA kernel TUs, no GPU needed (run by CI).

Reads what `setup.py` left in build/flora_kernels/ (FLORA_CUDA=1 build with
CUTLASS headers): for each TU its object and its `-Xptxas -v` log. Checks

* every csrc/cuda/kernels/*.cu has an object (it compiled for its arch; with
  FLORA_KERNEL_ARCHS set, as setup.py reads it, only that arch's TUs);
* no kernel spills registers (ptxas "spill stores/loads" all 0);
* the SASS has the tensor-core instructions the TU claims: HGMMA (wgmma) in
  the sm_90a GEMMs, HMMA (mma.sync) in the sm_80 GEMMs;

and prints registers, spills, shared memory and compile time per kernel
(`--markdown` for bench/RESULTS.md). Exit 1 on any failure.

cuobjdump: PATH, $CUDA_HOME/bin, third_party/cutlass/bin (tools/fetch_cutlass.sh
unpacks the `nvidia-cuda-cuobjdump` wheel there) or the copy triton ships;
cuobjdump needs nvdisasm, found the same way.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

from setup_rules import ROOT, setup_functions  # tools/ is this script's directory
# TU name pattern -> SASS instruction that must appear (tensor cores claimed)
TENSOR_CORES = {"gemm_sm90_": "HGMMA", "gemm_sm80_": "HMMA"}


def find_tool(name: str) -> str | None:
    cands = [shutil.which(name)]
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base:
            cands.append(os.path.join(base, "bin", name))
    cands.append(os.path.join(ROOT, "third_party", "cutlass", "bin", name))
    try:
        import triton  # noqa: F401  (ships cuobjdump and nvdisasm)

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except Exception:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def short(name: str) -> str:
    """flora::cuda::decode::decode_kernel<__nv_bfloat16, 16, 4>(...) -> decode_kernel<bf16,16,4>"""
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    name = name.replace("cutlass::bfloat16_t", "bf16").replace("cutlass::half_t", "fp16")
    if "decode_kernel" in name:
        m = re.search(r"decode_kernel<([^>]*)>", name)
        return f"decode_kernel<{m.group(1).replace(' ', '')}>" if m else name
    if "sm80::gemm_kernel" in name:
        t = ", weights [K, n]" if "layout::RowMajor>" in name else ""
        return f"sm80::gemm_kernel<Config 128x128x32, 4 stages{t}>"
    if "sm80::gemm_repeat_kernel" in name:
        return "sm80::gemm_repeat_kernel<RepeatConfig 128x128x32, 4 stages, EVT>"
    if "device_kernel" in name and "GemmUniversal" in name:
        extra = ", two K ranges" if "TwoRangeMainloop" in name else ", EVT repeat-add" if "Sm90RepeatZ" in name else ""
        return f"cutlass::device_kernel<GemmUniversal sm90 128x128x64 coop{extra}>"
    return name[:90]


def parse_log(path: str) -> tuple[list[dict], float | None]:
    kernels, cur, secs = [], None, None
    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2)}
            kernels.append(cur)
            continue
        if cur is None:
            m = re.search(r"# compile seconds: ([\d.]+)(?: wall)?(?:, ([\d.]+) cpu)?", line)
            if m:
                secs = float(m.group(2) or m.group(1))
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
        m = re.search(r"# compile seconds: ([\d.]+)(?: wall)?(?:, ([\d.]+) cpu)?", line)
        if m:
            secs = float(m.group(2) or m.group(1))
    return kernels, secs


def sass_count(cuobjdump: str, obj: str, arch: str, instr: str, env: dict) -> int:
    r = subprocess.run([cuobjdump, "--dump-sass", "--gpu-architecture", arch, obj],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {obj}: {r.stderr.strip()}")
    return len(re.findall(rf"\b{instr}\b", r.stdout))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build", "flora_kernels"))
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md table")
    args = ap.parse_args()

    failures = []
    # The TUs setup.py builds (FLORA_KERNEL_ARCHS drops the other arch's GEMMs).
    tus = sorted(os.path.basename(p)[:-3]
                 for p in setup_functions("sources", "kernel_sources").kernel_sources())
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    env = dict(os.environ)
    if nvdisasm:
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    if not cuobjdump or not nvdisasm:
        failures.append("cuobjdump / nvdisasm not found: no SASS check (tools/fetch_cutlass.sh fetches cuobjdump)")

    rows = []
    for tu in tus:
        obj = os.path.join(args.build_dir, tu + ".o")
        log = os.path.join(args.build_dir, tu + ".ptxas.log")
        if not os.path.isfile(obj) or not os.path.isfile(log):
            failures.append(f"{tu}: not compiled (no {obj})")
            continue
        kernels, secs = parse_log(log)
        names = demangle([k["mangled"] for k in kernels])
        if not kernels:
            failures.append(f"{tu}: no kernels in the ptxas log")
        for k in kernels:
            if k.get("spill_st", 0) or k.get("spill_ld", 0):
                failures.append(f"{tu}: {short(names[k['mangled']])} ({k['arch']}) spills "
                                f"{k['spill_st']} B stores / {k['spill_ld']} B loads")
        tc = ""
        for prefix, instr in TENSOR_CORES.items():
            if tu.startswith(prefix) and cuobjdump and nvdisasm:
                arch = kernels[0]["arch"] if kernels else "sm_90a"
                n = sass_count(cuobjdump, obj, arch, instr, env)
                tc = f"{instr} x{n}"
                if n == 0:
                    failures.append(f"{tu}: claims tensor cores but its {arch} SASS has no {instr}")
        seen = set()
        for k in kernels:
            key = (short(names[k["mangled"]]), k["arch"])
            if key in seen:
                continue
            seen.add(key)
            rows.append((tu, secs, key[0], k["arch"], k.get("regs"), k.get("spill_st", 0),
                         k.get("spill_ld", 0), k.get("stack", 0), k.get("smem", 0), tc))

    if args.markdown:
        # One row per TU and arch; the decode TUs' 15 instances collapse into a
        # "MTxROWS:regs" list.
        print("| TU | compile s (cpu) | arch | kernels | registers | spill st/ld B | stack B | SASS |")
        print("|---|---:|---|---|---|---:|---:|---|")
        groups: dict = {}
        for r in rows:
            groups.setdefault((r[0], r[3]), []).append(r)
        for (tu, arch), rs in groups.items():
            secs, tc = rs[0][1], rs[0][9]
            st, ld = sum(r[5] for r in rs), sum(r[6] for r in rs)
            stack = max(r[7] for r in rs)
            if len(rs) == 1:
                kern, regs = f"`{rs[0][2]}`", str(rs[0][4])
            else:
                kern = f"{len(rs)} x `{rs[0][2].split('<')[0]}<T,MT,ROWS>`"
                regs = " ".join(f"{m.group(1)}x{m.group(2)}:{r[4]}" for r in rs
                                if (m := re.search(r",(\d+),(\d+)>", r[2])))
            print(f"| {tu} | {f'{secs:.0f}' if secs else ''} | {arch} | {kern} | {regs} | {st}/{ld} | {stack} | {tc} |")
    else:
        for tu, secs, name, arch, regs, st, ld, stack, smem, tc in rows:
            print(f"{tu:<16} {arch:<7} regs {regs:>3}  spill {st}/{ld}  stack {stack:>3}  "
                  f"smem {smem:>5}  {tc:<10} {name}  ({secs or 0:.0f} s)")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    print(f"{len(tus)} kernel TUs, {len(rows)} kernels: " + ("OK" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
