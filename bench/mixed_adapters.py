#!/usr/bin/env python
"""Several adapters in one batch (FusedLlama.stack_adapters) against one adapter
for the whole batch and against the base model, timed interleaved.

    python bench/mixed_adapters.py                          # CPU: small shape, fp32
    python bench/mixed_adapters.py --device cuda --shape 1b --dtype bfloat16

Rows (batch B = number of adapters, every row its own adapter in the mixed
run): ``base``; ``one adapter`` (all rows the same adapter, rank r);
``mixed`` (B adapters stacked, rank B*r, each row routed to its own);
``switching`` (serving the B requests without stacking: one batch of 1 per
adapter, so B times the batch-1 TPOT per generated token of every request).
The floor: bytes a decode step streams (base weights + adapter blocks) over
the base weights' bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile

import torch


def measure(shape, dtype, device, variant, n, rank, prompt, new, repeats):
    from flora import FusedLlama
    from flora.bench.latency import build_flora, build_hf_model, llama_config, randomize_adapter, weight_bytes
    from flora.bench.timing import LatencyProbe, run_interleaved

    cfg = llama_config(shape)
    hf = build_hf_model(cfg, dtype, device, seed=0)
    base, _ = build_flora(hf, "base", rank, None, dtype, device, seed=0)
    one, params = build_flora(hf, variant, rank, None, dtype, device, seed=0)
    names = ["default"] + [f"a{j}" for j in range(1, n)]  # from_pretrained names its adapter "default"
    with tempfile.TemporaryDirectory() as d:  # n different random adapters, loaded as a user would
        for j in reversed(range(n)):  # ... ending with `one` holding the first
            randomize_adapter(one, seed=j)
            one.save_adapter(f"{d}/{names[j]}")
        mixed = FusedLlama.from_pretrained(hf, adapter=f"{d}/default", dtype=dtype, device=device).eval()
        for j in range(1, n):
            mixed.load_adapter(f"{d}/{names[j]}", names[j], activate=False)
    del hf
    mixed.stack_adapters(names)
    with contextlib.ExitStack() as st:
        probes = [st.enter_context(LatencyProbe(m, b, prompt, new, seed=1, adapters=a)) for m, b, a in
                  ((base, n, None), (one, n, None), (mixed, n, names), (one, 1, None))]
        res = run_interleaved(probes, repeats, warmup=1, by_run=device.type == "cpu")
    wb = weight_bytes(cfg, dtype)
    per = params * torch.finfo(dtype).bits // 8
    out = {}
    for label, r, extra in (("base", res[0], 0), ("one adapter", res[1], per), ("mixed", res[2], n * per)):
        out[label] = {"tpot_s": r["tpot_s"], "ttft_s": r["ttft_s"], "floor": 1 + extra / wb,
                      "tpot_ratio": statistics.median(x / y for x, y in zip(r["tpot_runs"], res[0]["tpot_runs"]))}
    out["switching"] = {"tpot_s": n * res[3]["tpot_s"], "ttft_s": n * res[3]["ttft_s"], "floor": None,
                        "tpot_ratio": statistics.median(n * x / y for x, y in zip(res[3]["tpot_runs"],
                                                                                    res[0]["tpot_runs"]))}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, help="tiny, small, 1b, 3b, ... (default: small on cpu, 1b on cuda)")
    ap.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--variants", default="pf-lora,ffba,zflora")
    ap.add_argument("--adapters", type=int, default=4, help="adapters stacked = batch size")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the rows here too")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    shape = a.shape or ("1b" if device.type == "cuda" else "small")
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = {}
    print(f"{shape} {str(dtype)[6:]} {device}: {a.adapters} adapters of rank {a.rank}, batch {a.adapters}, "
          f"prompt {a.prompt}, {a.new} new tokens, medians of {a.repeats}")
    print("| variant | run | TTFT ms | TPOT ms | TPOT / base | bytes floor |")
    print("|---|---|---:|---:|---:|---:|")
    for v in a.variants.split(","):
        rows[v] = measure(shape, dtype, device, v, a.adapters, a.rank, a.prompt, a.new, a.repeats)
        for label, r in rows[v].items():
            floor = "" if r["floor"] is None else f"{r['floor']:.3f}"
            print(f"| {v} | {label} | {r['ttft_s'] * 1e3:.1f} | {r['tpot_s'] * 1e3:.2f} | "
                  f"{r['tpot_ratio']:.3f} | {floor} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": shape, "dtype": str(dtype), "device": str(device), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
