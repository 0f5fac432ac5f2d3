#!/usr/bin/env python
"""A decode step's projection GEMMs, flora's CPU decode kernel against ATen, with the weights
streaming from memory as in a model.

    python bench/decode_gemms.py --dtype bfloat16 --ms 1,4,8,12,16,24

SmolLM2-135M's four projection ops per layer (qkv and gate/up ffl, o and down fbl; rank-32
adapters folded into the storage as the modules call them) over 30 layers of distinct random
weights ("streamed": 108-216 MB, beyond the last-level cache, as a model step reads them) and
over one layer's weights 30 times ("resident": what bench/kernels.py times). Each pass runs
on the decode kernel (flora._C.set_cpu_gemv_max_m past every M here) and on the ATen path (the
aten ISA), alternating for 14 rounds in one process; the table gives each one's median pass
(the first two rounds left out) and kernel / ATen. 2 torch threads.
"""
from __future__ import annotations

import argparse
import statistics
import time

LAYERS, D, D_FF, QKV, R = 30, 576, 1536, 960, 32


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ms", default="1,4,8,12,16,24")
    p.add_argument("--rounds", type=int, default=14)
    p.add_argument("--layers", type=int, default=LAYERS)
    a = p.parse_args(argv)
    import torch

    import flora

    C = flora._ext.C
    if C is None or C.cpu_isa() == "aten":
        raise SystemExit("needs the compiled extension and a CPU with the decode kernels")
    isa, dt, threads = C.cpu_isa(), getattr(torch, a.dtype), torch.get_num_threads()
    torch.set_num_threads(2)
    C.set_cpu_gemv_max_m(1 << 30)  # the kernel at every M; ATen by the aten ISA
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(dt)

    def layer():
        WA1, WA2, WB3, WB4 = mk(QKV + R, D), mk(2 * D_FF + R, D), mk(D, D + R), mk(D, D_FF + R)
        return ((WA1[:QKV], WA1[QKV:]), (WB3[:, :D], WB3[:, D:]), (WA2[:2 * D_FF], WA2[2 * D_FF:]),
                (WB4[:, :D_FF], WB4[:, D_FF:]))

    distinct = [layer() for _ in range(a.layers)]
    cases = {"streamed": distinct, "resident": [distinct[0]] * a.layers}

    def step(layers, x, u1, z, u2):
        for (W1, A1), (W3, B3), (W2, A2), (W4, B4) in layers:
            flora.ops.ffl(x, W1, A1, 1.0), flora.ops.fbl(u1, z, W3, B3)
            flora.ops.ffl(x, W2, A2, 1.0), flora.ops.fbl(u2, z, W4, B4)

    print(f"{a.dtype}, 2 threads, {a.layers} layers of SmolLM2-135M's projections, ms per pass (cpu isa {isa})\n")
    print("| M | streamed: kernel | ATen | x ATen | resident: kernel | ATen | x ATen |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for M in (int(v) for v in a.ms.split(",")):
            x, u1, z, u2 = mk(M, D), mk(M, D), mk(M, R), mk(M, D_FF)
            cells = []
            with torch.inference_mode():
                for layers in cases.values():
                    ts = {"kernel": [], "aten": []}
                    for rnd in range(a.rounds):
                        for mode in (("kernel", "aten") if rnd % 2 == 0 else ("aten", "kernel")):
                            C.set_cpu_isa(isa if mode == "kernel" else "aten")
                            step(layers, x, u1, z, u2)  # warm: the pass before the timed one
                            t0 = time.perf_counter()
                            step(layers, x, u1, z, u2)
                            ts[mode].append(time.perf_counter() - t0)
                    k, at = (statistics.median(ts[m][2:]) * 1e3 for m in ("kernel", "aten"))
                    cells += [f"{k:.2f}", f"{at:.2f}", f"{k / at:.2f}"]
            print(f"| {M} | " + " | ".join(cells) + " |", flush=True)
    finally:
        C.set_cpu_isa(isa)
        C.set_cpu_gemv_max_m(-1)
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
