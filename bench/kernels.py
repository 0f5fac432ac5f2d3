"""Kernel benchmark of the flora ops against torch.matmul, in one process.

    python bench/kernels.py --device cpu [--quick] [--json bench/out/cpu.json]

For Llama-3.2-1B projection shapes (d=2048, d_ff=8192) and a 1024-wide
model, M = 1 ... 512, rank r = 16/32/64, fp32 and bf16, it times (median of
many repeats after warm-up):

  base    torch.matmul(x, W.T) on W alone (contiguous)        <- the goal's yardstick
  fused   torch.matmul on the fused storage ([W; A] or [u|z] @ [W | B].T)
  lora    the unfused LoRA sequence x W^T + s (x A^T) B^T
  ffl / fbl / ffbl   the flora op (whatever it dispatches to; see
          `python -m flora info`), operands as views of the fused storage

and prints time, GB/s (weights + activations moved / time), GFLOP/s and the
ratio to base. A large tensor copy (read + write bytes) gives the machine's
memory bandwidth; decode rows show their GB/s as % of it.

--gemv-max-m N sets FLORA_CPU_GEMV_MAX_M before flora loads, so the decode
kernel also runs at larger M (to choose the dispatch threshold).
--isa avx512|avx2|aten picks the CPU path (flora._C.set_cpu_isa).
--device cuda times with CUDA events (optionally CUDA graphs, --graphs);
written for the CUDA kernels, untested on this CPU-only machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MODELS = {  # name: (d, d_q, d_kv, d_ff)
    "llama-3.2-1b": (2048, 2048, 512, 8192),
    "1024-wide": (1024, 1024, 256, 4096),
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
    """Median wall time of fn() after warm-up; CUDA: events (and graphs)."""

    def __init__(self, device, min_time, graphs=False):
        self.device, self.min_time, self.graphs = device, min_time, graphs

    def __call__(self, fn, min_reps=5, max_reps=200):
        import torch

        if self.device == "cuda":
            return self._cuda(fn, min_reps, max_reps)
        for _ in range(2):
            fn()
        times, start = [], time.perf_counter()
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < self.min_time):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def _cuda(self, fn, min_reps, max_reps):  # untested here (no GPU)
        import torch

        run = fn
        if self.graphs:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(min_reps, 20)):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)


def copy_bandwidth(torch, device, timer, mb=512):
    n = mb * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), min_reps=5, max_reps=20)
    return 2 * n * 4 / t / 1e9


def bench_case(torch, flora, timer, device, dtype, name, op, N, K, M, r, s=1.0, aten_too=False):
    """Times base / fused / lora / flora op for one shape; returns rows."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *sh: (torch.randn(*sh, generator=g) * 0.02).to(device=device, dtype=dtype)
    es = torch.tensor([], dtype=dtype).element_size()
    W0 = mk(N, K)  # the base model's weight, alone
    x = mk(M, K)
    A, B = mk(r, K), mk(N, r)
    rows = []

    def add(what, fn, weights, flops):
        if aten_too and what in ("ffl", "fbl", "ffbl"):  # same op on the ATen path
            C, isa = flora._ext.C, flora._ext.C.cpu_isa()
            C.set_cpu_isa("aten")
            try:
                add(what + "@aten", fn, weights, flops)
            finally:
                C.set_cpu_isa(isa)
        t = timer(fn)
        act = (M * K + M * N) * es
        rows.append(dict(shape=name, op=what, dtype=str(dtype).replace("torch.", ""), M=M, r=r, N=N, K=K,
                         t_us=t * 1e6, gbs=(weights * es + act) / t / 1e9, gflops=flops / t / 1e9))

    base_flops = 2 * M * N * K
    add("base", lambda: torch.matmul(x, W0.T), N * K, base_flops)
    if op == "ffl":
        WA = torch.cat([W0, A])  # fused storage [W; A]
        W, Af = WA[:N], WA[N:]
        add("fused", lambda: torch.matmul(x, WA.T), (N + r) * K, 2 * M * (N + r) * K)
        add("lora", lambda: torch.matmul(x, W0.T) + s * torch.matmul(torch.matmul(x, A.T), B.T),
            N * K + r * K + N * r, base_flops + 2 * M * r * (K + N))
        add("ffl", lambda: flora.ops.ffl(x, W, Af, s), (N + r) * K, 2 * M * (N + r) * K)
        return rows
    # fbl / ffbl: the folded layout the modules use at inference: s is
    # pre-multiplied into B and [W, sB; A, C] is one storage, so each op is
    # one matmul over [u | z] (s = 1 at the call).
    A2, C2 = mk(r, K), mk(r, r)
    st = torch.cat([torch.cat([W0, s * B], 1), torch.cat([A2, C2], 1)])
    WB = st[:N]
    W, Bf, Af, Cf = st[:N, :K], st[:N, K:], st[N:, :K], st[N:, K:]
    uz = torch.cat([x, mk(M, r)], 1)
    u, z = uz[:, :K], uz[:, K:]
    add("fused", lambda: torch.matmul(uz, WB.T), N * (K + r), 2 * M * N * (K + r))
    add("lora", lambda: torch.matmul(x, W0.T) + s * torch.matmul(torch.matmul(x, A.T), B.T),
        N * K + r * K + N * r, base_flops + 2 * M * r * (K + N))
    add("fbl", lambda: flora.ops.fbl(u, z, W, Bf), N * (K + r), 2 * M * N * (K + r))
    add("ffbl", lambda: flora.ops.ffbl(u, z, W, Bf, Af, Cf), (N + r) * (K + r),
        2 * M * (N + r) * (K + r))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="M in 1,16,64,256; r=16; 0.1 s per timing")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ms", default=None, help="comma list of M (default 1..512)")
    p.add_argument("--ranks", default="16,32,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--shapes", default=None, help="comma list of qkv,o,gate/up,down")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of repeats per timing")
    p.add_argument("--isa", default=None, help="CPU path: avx512, avx2 or aten")
    p.add_argument("--gemv-max-m", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--aten-too", action="store_true", help="also time each op on the ATen path")
    p.add_argument("--graphs", action="store_true", help="CUDA graphs (cuda only)")
    p.add_argument("--json", default=None, help="write all rows here")
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
    timer = Timer(a.device, min_time, a.graphs)

    print(flora.format_info())
    print(f"torch threads: {torch.get_num_threads()}")
    bw = copy_bandwidth(torch, a.device, timer)
    print(f"copy bandwidth (512 MB dst.copy_(src), read+write): {bw:.1f} GB/s\n")

    hdr = f"{'model':<13}{'shape':<8}{'dtype':<9}{'M':>4}{'r':>4} {'op':<10}{'us':>10}{'GB/s':>8}{'GFLOP/s':>9}{'x base':>8}{'%copy':>7}"
    print(hdr)
    all_rows = []
    for model in a.models.split(","):
        for name, op, N, K in projections(*MODELS[model]):
            if a.shapes and name not in a.shapes.split(","):
                continue
            for dname in a.dtypes.split(","):
                dtype = getattr(torch, dname)
                for r in ranks:
                    for M in ms:
                        rows = bench_case(torch, flora, timer, a.device, dtype, name, op, N, K, M, r,
                                          aten_too=a.aten_too and a.device == "cpu")
                        base = rows[0]["t_us"]
                        for row in rows:
                            row.update(model=model, ratio=row["t_us"] / base, copy_pct=100 * row["gbs"] / bw)
                            pct = f"{row['copy_pct']:6.0f}%" if M <= DECODE_M else ""
                            print(f"{model:<13}{name:<8}{dname:<9}{M:>4}{r:>4} {row['op']:<10}{row['t_us']:>10.1f}"
                                  f"{row['gbs']:>8.1f}{row['gflops']:>9.1f}{row['ratio']:>8.3f}{pct:>7}", flush=True)
                        all_rows += rows
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(copy_gbs=bw, info=flora.info(), threads=torch.get_num_threads(),
                           rows=all_rows), f, indent=1)


if __name__ == "__main__":
    main()
