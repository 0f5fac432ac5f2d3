#!/usr/bin/env python
"""Where a decode step's time goes: device time per kind of kernel, against the weight-streaming floor.

    python bench/step_profile.py --device cuda                       # 1B, bf16, batch 1 and 8, base ffba zflora
    python bench/step_profile.py --device cpu --model tiny --dtype fp32 --batch 1

One FusedLlama (random weights, rank-32 adapters folded as generate() runs
them) is prefilled with a 512-token prompt; after warm-up steps, ``--steps``
eager decode steps run under torch.profiler. Each kernel's device time is
summed into a kind by its name (GEMM, attention, norm, RoPE + cache, SiLU x
up, copy / fill, reduce / sample, other elementwise) and divided by the
steps. Beside them:

* ``busy``: the kernels' device time per step (what a step costs with no launch gaps);
* ``graphed``: the same step replayed as a CUDA graph (the TPOT of
  flora.bench.timing.measure_latency, CUDA events, median of 3 runs): busy plus
  what the gaps between kernels still cost inside a graph;
* ``floor``: the base weight bytes a step streams over the copy bandwidth
  measured in the same run (flora.bench.latency.copy_bandwidth);
* ``kernels``: launches per step.

On the CPU the kinds sum the ATen and flora ops' own CPU time instead (a
rough guide; there is no graph row).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from flora.bench.latency import (SHAPES, base_llama, build_flora, copy_bandwidth, model_config,
                                 weight_bytes)
from flora.bench.report import add_device_dtype, device_dtype, publish, title
from flora.bench.timing import measure_latency
from flora.generation import Decoder, inference_mode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: a sibling script, loaded however this one is
from op_count import NON_KERNEL  # noqa: E402

# first match wins; names of cuBLAS / cuBLASLt (Hopper: nvjet), CUTLASS, flora's and ATen's kernels
KINDS = [
    ("attention", r"fmha|flash|attention|attn|softmax"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|splitKreduce|decode_kernel|aten::mm|aten::addmm|aten::bmm|"
             r"flora::ffl|flora::fbl|flora::ffbl|\bmm\b|matmul"),
    ("norm", r"rms_norm|rmsnorm|norm"),
    ("rope+cache", r"rope|index_copy|indexCopy|index_put"),
    ("silu*up", r"silu"),
    ("copy/fill", r"copy|memcpy|memset|fill|Memcpy|Memset|cat"),
    ("reduce/sample", r"reduce|argmax|max|sum|mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|add|mul|pow|rsqrt"),
]


def kind_of(name: str) -> str:
    for k, pat in KINDS:
        if re.search(pat, name, re.IGNORECASE):
            return k
    return "other"


def profile_steps(dec: Decoder, tok: torch.Tensor, steps: int, cuda: bool) -> tuple[dict, int]:
    """({kind: seconds per step}, kernels per step) of ``steps`` eager decode steps."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            tok = dec.step(tok).argmax(-1)
        if cuda:
            torch.cuda.synchronize()
    from torch.autograd import DeviceType

    per, n = defaultdict(float), 0
    for e in prof.events():
        if cuda and e.device_type == DeviceType.CUDA:
            per[kind_of(e.name)] += e.device_time_total / 1e6
            n += 1
        elif not cuda and e.cpu_parent is None and e.name.startswith(("aten::", "flora::")) \
                and e.name not in NON_KERNEL:
            per[kind_of(e.name)] += e.cpu_time_total / 1e6
            n += 1
    return {k: v / steps for k, v in per.items()}, n // steps


def run(shape: str, variants, batches, dtype, device, prompt: int, steps: int, rank: int, log=print) -> list:
    cfg, label = model_config(shape)
    cuda = device.type == "cuda"
    bw = copy_bandwidth(device) if cuda else float("nan")
    floor = weight_bytes(cfg, dtype) / bw if cuda else float("nan")
    hf = base_llama(shape, cfg, dtype, device, seed=0)
    rows = []
    for v in variants:
        m, _ = build_flora(hf, v, rank, None, dtype, device, seed=0)
        for B in batches:
            with inference_mode(m):
                dec = Decoder(m, B, prompt + 2 * steps + 8, use_cuda_graph=False)
                ids = torch.randint(3, cfg.vocab_size, (B, prompt), device=device)
                tok = dec.prefill(ids, torch.ones_like(ids, dtype=torch.bool)).argmax(-1)
                for _ in range(3):
                    tok = dec.step(tok).argmax(-1)
                kinds, launches = profile_steps(dec, tok, steps, cuda)
            graphed = (measure_latency(m, B, prompt, steps + 1, use_cuda_graph=True, repeats=3)["tpot_s"]
                       if cuda else float("nan"))
            row = dict(shape=shape, label=label, variant=v, batch=B, dtype=str(dtype).replace("torch.", ""),
                       kinds_ms={k: s * 1e3 for k, s in sorted(kinds.items(), key=lambda kv: -kv[1])},
                       busy_ms=sum(kinds.values()) * 1e3, graphed_ms=graphed * 1e3, floor_ms=floor * 1e3,
                       kernels=launches, copy_gbs=bw / 1e9)
            rows.append(row)
            log(json.dumps(row))
        del m
        if cuda:
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list, command: str, device: torch.device) -> str:
    kinds = [k for k, _ in KINDS] + ["other"]
    head = ("| variant | batch | floor ms | graphed ms | busy ms | kernels | "
            + " | ".join(kinds) + " |")
    out = [title(device, command),
           f"({rows[0]['label']}, {rows[0]['dtype']}; kinds: device ms per step"
           + (f"; copy bandwidth {rows[0]['copy_gbs']:.0f} GB/s read + write)" if device.type == "cuda" else ")"),
           "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r['kinds_ms'].get(k, 0.0):.3f}" for k in kinds]
        out.append(f"| {r['variant']} | {r['batch']} | {r['floor_ms']:.3f} | {r['graphed_ms']:.3f} | "
                   f"{r['busy_ms']:.3f} | {r['kernels']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_dtype(p)
    p.add_argument("--model", default="1b", help=f"a shape ({', '.join(SHAPES)}) or a checkpoint directory")
    p.add_argument("--variants", nargs="+", default=["base", "ffba", "zflora"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None, help="write the markdown table here too")
    a = p.parse_args(argv)
    device, dtype = device_dtype(a, "bench/step_profile.py")
    rows = run(a.model, a.variants, a.batch, dtype, device, a.prompt, a.steps, a.rank,
               log=lambda s: print(s, file=sys.stderr, flush=True))
    cmd = "python bench/step_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    publish(markdown(rows, cmd.strip(), device), {"command": cmd.strip(), "rows": rows}, a.md, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
