"""Kernel benchmark of the flora ops against torch.matmul, in one process.

    python bench/kernels.py --device cpu [--quick] [--json bench/out/cpu.json]
    python bench/kernels.py --device cpu --pointwise --ms 1,4,16,64 --dtypes float32,bfloat16

For Llama-3.2-1B projection shapes (d=2048, d_ff=8192) and a 1024-wide
model, M = 1 ... 512, rank r = 16/32/64, fp32 and bf16, it times (median of
many repeats after warm-up):

  base    torch.matmul(x, W.T) on W alone (contiguous)        <- the goal's yardstick
  fused   torch.matmul on the fused storage ([W; A] or [u|z] @ [W | B].T)
  lora    the unfused LoRA sequence x W^T + s (x A^T) B^T
  ffl / fbl / ffbl   the flora op (whatever it dispatches to; see
          `python -m flora info`), operands as views of the fused storage
  dx-base / dx-fused / dx-lora / dx   (FFL shapes) the input gradient
          dy W + dz A: cuBLAS on W alone, on [W; A], unfused, and the flora
          op (fbl over the transposed views); dx rows' ratio is to dx-base
  base+res / fbl+res / ffl+z_in+res   (o and down, decode M) the output
          projections as the model calls them, with the residual (torch.addmm;
          ffba's fbl; a zflora writer's ffl, carry and residual in its epilogue)

and prints time, GB/s (weights + activations moved / time), GFLOP/s and the
ratio to base. A large tensor copy (read + write bytes) gives the machine's
memory bandwidth; decode rows show their GB/s as % of it.

--gemv-max-m N sets FLORA_CPU_GEMV_MAX_M before flora loads, so the decode
kernel also runs at larger M (to choose the dispatch threshold; with
--aten-too --no-dx, the kernel against ATen on the same operands, e.g. at
--models smollm2-135m,llama-3.2-1b). The weights stay cache-resident from call
to call on the CPU; bench/decode_gemms.py streams them as a model step does.
--isa avx512_bf16|avx512|avx2|aten picks the CPU path (flora._C.set_cpu_isa).
--device cuda times with CUDA events (optionally CUDA graphs, --graphs):
each event pair brackets --calls calls (one captured graph of them with
--graphs), and the weights rotate through a pool of copies whose total size
is at least twice the L2 cache, so decode figures are HBM figures, not L2
hits. --aten-too also times each flora call on its ATen path (op@aten): the
aten ISA on the CPU, cuBLAS on CUDA (FLORA_CUDA_KERNELS=0), so a kernel and
the path it replaces are compared in one process.

--json PATH is rewritten atomically (temp file + rename) after every row, so
an interrupted run keeps every row measured so far; a row that fails (an
error, out of memory) records the error and the sweep goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import statistics
import sys
import time

MODELS = {  # name: (d, d_q, d_kv, d_ff)
    "llama-3.2-1b": (2048, 2048, 512, 8192),
    "llama-3.2-3b": (3072, 3072, 1024, 8192),
    "llama-2-7b": (4096, 4096, 4096, 11008),
    "1024-wide": (1024, 1024, 256, 4096),
    "smollm2-135m": (576, 576, 192, 1536),
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
DECODE_M = 16  # rows up to here count as decode


def projections(d, d_q, d_kv, d_ff):
    """(name, op, N, K): qkv and gate/up are FFLs, o and down FBL/FFBLs."""
    return [
        ("qkv", "ffl", d_q + 2 * d_kv, d),
        ("o", "fbl", d, d_q),
        ("gate/up", "ffl", 2 * d_ff, d),
        ("down", "fbl", d, d_ff),
    ]


class Timer:
    """Median time of one call after warm-up. ``fns`` is a list of the same
    call on different copies of the operands (weight rotation); the CPU
    times fns[0], CUDA cycles through them."""

    def __init__(self, device, min_time, graphs=False, calls=32):
        self.device, self.min_time, self.graphs, self.calls = device, min_time, graphs, calls

    def __call__(self, fns, min_reps=5, max_reps=200):
        if self.device == "cuda":
            return self._cuda(fns, min_reps)
        fn = fns[0]
        for _ in range(2):
            fn()
        times, start = [], time.perf_counter()
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < self.min_time):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def _cuda(self, fns, min_reps):
        import torch

        seq = [fns[i % len(fns)] for i in range(self.calls)]

        def many():  # one event pair around all of them: launch gaps amortised
            for f in seq:
                f()

        run = many
        if self.graphs:
            st = torch.cuda.Stream()
            st.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(st):
                for _ in range(2):
                    many()
            torch.cuda.current_stream().wait_stream(st)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                many()
            run = g.replay
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        times, start = [], time.perf_counter()
        while len(times) < max(min_reps, 10) or (time.perf_counter() - start < self.min_time and len(times) < 100):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / self.calls)
        return statistics.median(times)


def pool_size(torch, device, weight_bytes, cap=64):
    """Copies of the weights to rotate through: on CUDA enough that they
    span twice the L2 cache (each call then streams its weights from HBM);
    on the CPU one (its figures predate rotation and the large shapes
    exceed the last-level cache anyway)."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    return max(1, min(cap, math.ceil(2 * l2 / max(weight_bytes, 1))))


def _operands(torch, mk, op, N, K, r, s):
    """One copy of a case's weights (and the fused views the ops take)."""
    o = dict(W0=mk(N, K), A=mk(r, K), B=mk(N, r))  # the base weight alone, the LoRA pair
    if op == "ffl":
        WA = torch.cat([o["W0"], o["A"]])  # fused storage [W; A]
        o.update(WA=WA, W=WA[:N], Af=WA[N:])
        return o
    # fbl / ffbl: the folded layout the modules use at inference: s is
    # pre-multiplied into B and [W, sB; A, C] is one storage, so each op is
    # one matmul over [u | z] (s = 1 at the call).
    A2, C2 = mk(r, K), mk(r, r)
    st = torch.cat([torch.cat([o["W0"], s * o["B"]], 1), torch.cat([A2, C2], 1)])
    o.update(WB=st[:N], W=st[:N, :K], Bf=st[:N, K:], Af=st[N:, :K], Cf=st[N:, K:])
    return o


def bench_case(torch, flora, timer, device, dtype, name, op, N, K, M, r, s=1.0, aten_too=False, dx=True):
    """Times base / fused / lora / flora op for one shape; returns rows (a
    row whose timing failed carries ``error`` instead of figures)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *sh: (torch.randn(*sh, generator=g) * 0.02).to(device=device, dtype=dtype)
    es = torch.tensor([], dtype=dtype).element_size()
    copies = pool_size(torch, device, (N + r) * (K + r) * es)
    pool = [_operands(torch, mk, op, N, K, r, s) for _ in range(copies)]
    x = mk(M, K)
    uz = torch.cat([x, mk(M, r)], 1)
    u, z = uz[:, :K], uz[:, K:]
    rows = []

    def add(what, fn, weights, flops):
        if aten_too and "@" not in what and what.split("+")[0] in ("ffl", "fbl", "ffbl"):  # on ATen too
            with aten_path(flora, device):
                add(what + "@aten", fn, weights, flops)
        row = dict(shape=name, op=what, dtype=str(dtype).replace("torch.", ""), M=M, r=r, N=N, K=K,
                   copies=copies)
        try:
            t = timer([functools.partial(fn, o) for o in pool])
        except Exception as e:  # noqa: BLE001 - recorded in the row, the sweep goes on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
            return
        act = (M * K + M * N) * es
        row.update(t_us=t * 1e6, gbs=(weights * es + act) / t / 1e9, gflops=flops / t / 1e9)
        C = flora._ext.C
        if what in ("ffl", "fbl", "ffbl") and device == "cuda" and hasattr(C, "cuda_last_dispatch"):
            row["dispatch"] = C.cuda_last_dispatch()  # the kernel timed, or "cublas: why"
        rows.append(row)

    base_flops = 2 * M * N * K
    lora = lambda o: torch.matmul(x, o["W0"].T) + s * torch.matmul(torch.matmul(x, o["A"].T), o["B"].T)
    lora_w, lora_f = N * K + r * K + N * r, base_flops + 2 * M * r * (K + N)
    add("base", lambda o: torch.matmul(x, o["W0"].T), N * K, base_flops)
    if op == "ffl":
        add("fused", lambda o: torch.matmul(x, o["WA"].T), (N + r) * K, 2 * M * (N + r) * K)
        add("lora", lora, lora_w, lora_f)
        add("ffl", lambda o: flora.ops.ffl(x, o["W"], o["Af"], s), (N + r) * K, 2 * M * (N + r) * K)
        if not dx:
            return rows
        # Backward dx = dy W + dz A, dy | dz one buffer (FFL's output gradient):
        # cuBLAS on W alone, on the fused storage, unfused, and the flora op
        # (fbl over the transposed views, as the autograd formula calls it).
        g = mk(M, N + r)
        dy, dz = g[:, :N], g[:, N:]
        dx_w, dx_f = (N + r) * K, 2 * M * (N + r) * K
        add("dx-base", lambda o: torch.matmul(dy, o["W0"]), N * K, 2 * M * N * K)
        add("dx-fused", lambda o: torch.matmul(g, o["WA"]), dx_w, dx_f)
        add("dx-lora", lambda o: torch.matmul(dy, o["W0"]) + torch.matmul(dz, o["A"]), dx_w, dx_f)
        add("dx", lambda o: flora.ops.fbl(dy, dz, o["W"].t(), o["Af"].t()), dx_w, dx_f)
        return rows
    add("fused", lambda o: torch.matmul(uz, o["WB"].T), N * (K + r), 2 * M * N * (K + r))
    add("lora", lora, lora_w, lora_f)
    add("fbl", lambda o: flora.ops.fbl(u, z, o["W"], o["Bf"]), N * (K + r), 2 * M * N * (K + r))
    add("ffbl", lambda o: flora.ops.ffbl(u, z, o["W"], o["Bf"], o["Af"], o["Cf"]), (N + r) * (K + r),
        2 * M * (N + r) * (K + r))
    if M <= DECODE_M:
        # The output projections as the model calls them, residual included:
        # base (cuBLAS addmm), fbl + res (ffba's o / down), ffl + z_in + res (a
        # zflora writer: carry and residual in the epilogue); with --aten-too
        # each flora call also on the cuBLAS path: where a kernel's epilogue pays.
        h, zc = mk(M, N), mk(M, r)
        add("base+res", lambda o: torch.addmm(h, x, o["W0"].T), N * K, base_flops)
        add("fbl+res", lambda o: flora.ops.fbl(u, z, o["W"], o["Bf"], res=h), N * (K + r),
            2 * M * N * (K + r))
        add("ffl+z_in+res", lambda o: flora.ops.ffl(u, o["W"], o["Af"], z_in=zc, res=h), (N + r) * K,
            2 * M * (N + r) * K)
    return rows


@contextlib.contextmanager
def aten_path(flora, device):
    """flora's ATen path: on the CPU the aten ISA, on CUDA cuBLAS (FLORA_CUDA_KERNELS=0)."""
    if device == "cpu":
        C, isa = flora._ext.C, flora._ext.C.cpu_isa()
        C.set_cpu_isa("aten")
        try:
            yield
        finally:
            C.set_cpu_isa(isa)
        return
    from flora.bench.timing import cuda_kernels

    with cuda_kernels("0"):
        yield


def bench_pointwise(torch, flora, timer, device, dtype, model, M):
    """The decode step's pointwise ops (flora.ops.rms_norm / rope / silu_mul:
    torch.ops.flora.*) against the composites they replace, on the same
    operands at the model's shapes (head_dim 64 for the 1024-wide shape):
    rows "<op>" and "<op>@composite"; the op's ratio is to its composite."""
    d, d_q, d_kv, d_ff = MODELS[model]
    hd = 128 if d_q >= 3072 else 64
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *sh: torch.randn(*sh, generator=g).to(device=device, dtype=dtype)
    es = torch.tensor([], dtype=dtype).element_size()
    qkv = mk(M, d_q + 2 * d_kv)
    qk = qkv[:, :d_q + d_kv].view(1, M, (d_q + d_kv) // hd, hd)  # q|k of the fused output
    gu = mk(M, 2 * d_ff)
    cases = {"rms_norm": ((mk(M, d), mk(d), 1e-5), 2 * M * d + d),
             "rope": ((qk, mk(1, M, 1, hd), mk(1, M, 1, hd)), 2 * qk.numel() + 2 * M * hd),
             "silu_mul": ((gu[:, :d_ff], gu[:, d_ff:]), 3 * M * d_ff)}
    composite = {"rms_norm": flora.ops._rms_norm, "rope": flora.ops._rope, "silu_mul": flora.ops._silu_mul}
    rows = []
    for op, (args, elems) in cases.items():
        ts = {}
        for what, fn in ((op + "@composite", composite[op]), (op, getattr(torch.ops.flora, op))):
            row = dict(shape=op, op=what, dtype=str(dtype).replace("torch.", ""), M=M, r=0, N=0, K=d)
            try:
                with torch.inference_mode():
                    t = timer([functools.partial(fn, *args)])
            except Exception as e:  # noqa: BLE001 - recorded in the row, the sweep goes on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                rows.append(row)
                continue
            ts[what] = t
            row.update(t_us=t * 1e6, gbs=elems * es / t / 1e9, gflops=0.0)
            rows.append(row)
        for row in rows[-2:]:
            if "t_us" in row and op + "@composite" in ts:
                row["ratio"] = row["t_us"] / (ts[op + "@composite"] * 1e6)
    return rows


class RowSink:
    """The --json document, rewritten atomically after every row."""

    def __init__(self, path, header):
        self.path, self.doc = path, dict(header, rows=[])
        self.flush()

    def add(self, row):
        self.doc["rows"].append(row)
        self.flush()

    def flush(self):
        if not self.path:
            return
        from flora.fileio import atomic_write_json

        atomic_write_json(self.path, self.doc)


def print_row(model, name, dname, M, r, row):
    if "error" in row:
        print(f"{model:<13}{name:<8}{dname:<9}{M:>4}{r:>4} {row['op']:<10} ERROR {row['error']}", flush=True)
        return
    pct = f"{row['copy_pct']:6.0f}%" if M <= DECODE_M else ""
    ratio = f"{row['ratio']:>8.3f}" if row.get("ratio") is not None else f"{'-':>8}"
    print(f"{model:<13}{name:<8}{dname:<9}{M:>4}{r:>4} {row['op']:<10}{row['t_us']:>10.1f}"
          f"{row['gbs']:>8.1f}{row['gflops']:>9.1f}{ratio}{pct:>7}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="M in 1,16,64,256; r=16; 0.1 s per timing")
    p.add_argument("--models", default="llama-3.2-1b,1024-wide", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--ms", default=None, help="comma list of M (default 1..512)")
    p.add_argument("--ranks", default="16,32,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--shapes", default=None, help="comma list of qkv,o,gate/up,down")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of repeats per timing")
    p.add_argument("--isa", default=None, help="CPU path: avx512_bf16, avx512, avx2 or aten")
    p.add_argument("--gemv-max-m", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--pointwise", action="store_true",
                   help="time the pointwise ops (rms_norm, rope, silu_mul) against their composites instead")
    p.add_argument("--aten-too", action="store_true",
                   help="also time each flora call on the ATen path (cuda: cuBLAS, FLORA_CUDA_KERNELS=0)")
    p.add_argument("--no-dx", action="store_true", help="skip the input-gradient (dx) rows")
    p.add_argument("--graphs", action="store_true", help="CUDA graphs (cuda only)")
    p.add_argument("--calls", type=int, default=32,
                   help="cuda: calls per event pair (or per captured graph)")
    p.add_argument("--json", default=None, help="rows so far, rewritten after each row")
    a = p.parse_args(argv)
    if a.gemv_max_m is not None:
        os.environ["FLORA_CPU_GEMV_MAX_M"] = str(a.gemv_max_m)

    import torch
    import flora

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.isa:
        flora._ext.C.set_cpu_isa(a.isa)
    ms = [1, 16, 64, 256] if a.quick else MS
    if a.ms:
        ms = [int(v) for v in a.ms.split(",")]
    ranks = [16] if a.quick else [int(v) for v in a.ranks.split(",")]
    min_time = 0.1 if a.quick else a.min_time
    timer = Timer(a.device, min_time, a.graphs, a.calls)

    print(flora.format_info())
    print(f"torch threads: {torch.get_num_threads()}")
    # Always eager, also with --graphs: a copy captured in a graph becomes a memcpy
    # node, which ran at 2.8 TB/s on an H200 against 4.2 TB/s eagerly.
    from flora.bench.latency import copy_bandwidth

    bw = copy_bandwidth(torch.device(a.device), 512 * 2**20) / 1e9
    print(f"copy bandwidth (512 MB dst.copy_(src), read+write): {bw:.1f} GB/s\n")
    sink = RowSink(a.json, dict(copy_gbs=bw, info=flora.info(), threads=torch.get_num_threads(),
                                device=a.device, graphs=a.graphs, calls_per_timing=a.calls))

    hdr = f"{'model':<13}{'shape':<8}{'dtype':<9}{'M':>4}{'r':>4} {'op':<10}{'us':>10}{'GB/s':>8}{'GFLOP/s':>9}{'x base':>8}{'%copy':>7}"
    print(hdr)
    if a.pointwise:  # x base: the op over its composite
        for model in a.models.split(","):
            for dname in a.dtypes.split(","):
                for M in ms:
                    for row in bench_pointwise(torch, flora, timer, a.device, getattr(torch, dname), model, M):
                        row["model"] = model
                        if "t_us" in row:
                            row["copy_pct"] = 100 * row["gbs"] / bw
                        print_row(model, row["shape"][:7], dname, M, 0, row)
                        sink.add(row)
        return
    for model in a.models.split(","):
        for name, op, N, K in projections(*MODELS[model]):
            if a.shapes and name not in a.shapes.split(","):
                continue
            for dname in a.dtypes.split(","):
                dtype = getattr(torch, dname)
                for r in ranks:
                    for M in ms:
                        key = dict(model=model, shape=name, dtype=dname, M=M, r=r, N=N, K=K)
                        try:
                            rows = bench_case(torch, flora, timer, a.device, dtype, name, op, N, K, M, r,
                                              aten_too=a.aten_too, dx=not a.no_dx)
                        except Exception as e:  # noqa: BLE001 - e.g. out of memory building operands
                            rows = [dict(key, op="(case)", error=f"{type(e).__name__}: {e}".splitlines()[0])]
                            if a.device == "cuda":
                                torch.cuda.empty_cache()
                        # the yardstick: base (forward rows), dx-base (the dx rows)
                        bases = {r["op"]: r.get("t_us") for r in rows if r["op"] in ("base", "dx-base")}
                        for row in rows:
                            row["model"] = model
                            if "t_us" in row:
                                base = bases.get("dx-base" if row["op"].startswith("dx") else "base")
                                row.update(ratio=row["t_us"] / base if base else None,
                                           copy_pct=100 * row["gbs"] / bw)
                            print_row(model, name, dname, M, r, row)
                            sink.add(row)


if __name__ == "__main__":
    main()
