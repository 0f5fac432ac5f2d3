#!/usr/bin/env python
"""Host memory of FusedLlama.from_pretrained beyond its source, over the weight bytes.

    python bench/load_memory.py                       # 1B shape, bf16 and fp32 targets, from a bf16 model
    python bench/load_memory.py --shape 3b --dtypes bfloat16

The source is a transformers model with random weights in bf16, its tensors
cloned into anonymous memory (so file pages cannot hide or inflate the
figure). Each load runs in a fresh process; the figure is the peak resident
set during the load minus the resident set before it, over the bytes the
loaded model keeps (1.00x: the fused storage alone, no second copy of the
weights). The GPU figure (``torch.cuda.max_memory_allocated``) comes from
``flora bench latency --device cuda``, which loads the same way.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

import torch


def one(shape: str, dtype: str) -> None:
    from flora import FusedLlama
    from flora.bench.latency import build_hf_model, llama_config
    from flora.bench.memory import peak_bytes, reset_peak

    hf = build_hf_model(llama_config(shape), torch.bfloat16, "cpu", seed=0)
    before = reset_peak("cpu")
    m = FusedLlama.from_pretrained(hf, dtype=getattr(torch, dtype))
    peak = peak_bytes("cpu")
    kept = sum(t.numel() * t.element_size() for t in
               {t.untyped_storage().data_ptr(): t for t in list(m.buffers()) + list(m.parameters())}.values())
    print(f"| {shape} | bf16 -> {dtype} | {kept / 2**30:.2f} | {(peak - before) / 2**30:.2f} | "
          f"{(peak - before) / kept:.2f}x |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args(argv)
    if a.one:
        return one(*a.one)
    print("| shape | load | kept GiB | peak beyond the source GiB | peak / kept |\n|---|---|---:|---:|---:|")
    for dt in a.dtypes:
        subprocess.run([sys.executable, __file__, "--one", a.shape, dt], check=True)


if __name__ == "__main__":
    main()
