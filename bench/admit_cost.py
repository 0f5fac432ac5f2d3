#!/usr/bin/env python
"""What a prefill forward costs by itself, in tokens: the constant behind `flora serve`'s grouping.

    python bench/admit_cost.py                                   # SmolLM2-135M, this machine's device
    python bench/admit_cost.py --device cuda --model 1b --dtype bf16

`flora serve` prefills requests joining in one step in groups of like length
(flora.generation.admit_groups): a group costs a forward's fixed work plus its
rows' tokens, so a short prompt beside a long one runs apart when the padding
it would compute costs more than a forward. That fixed work, in tokens, is
``admit_forward_tokens(device)``. This measures it as the engine runs it:
``Decoder.admit`` of one row (batch 8 cache, CUDA graphs for the decode steps
on CUDA, as the engine builds it) at prompt lengths 1 .. 512, ``--repeats`` each
(CUDA: synchronized around each), then fits time = a + b * tokens to every timing
with the engine's own fit (flora.forward_cost.robust_line: least squares past
trimmed outliers) and prints a / b: the tokens a forward costs by itself. `flora
serve` learns the same from its own prefills as they run (ForwardCostFit):
``--engine N`` (a checkpoint) also serves N requests one at a time (prompts of
``--lengths`` in turn, one token each) on an Engine first (its loop in the main
thread, as `flora serve` runs it) and reports the
constant it learned after each admit (``--check R``: within R times the
measurement, or exit 1).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from flora.bench.latency import SHAPES, base_llama, build_flora, model_config
from flora.bench.report import add_device_dtype, device_dtype, publish, title
from flora.forward_cost import robust_line
from flora.generation import Decoder, admit_forward_tokens, inference_mode


def load(model: str, dtype, device):
    if model in SHAPES:
        cfg, label = model_config(model)
        m, _ = build_flora(base_llama(model, cfg, dtype, device, seed=0), "base", 32, None, dtype, device, seed=0)
        return m, label
    from flora import FusedLlama
    from flora.pretrained import smollm2_path

    path = model or smollm2_path()
    return FusedLlama.from_pretrained(path, dtype=dtype).to(device), str(path).rsplit("/", 1)[-1]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def admit_times(m, lengths: list, repeats: int, batch: int = 8) -> dict:
    """{prompt length: [seconds of one row's Decoder.admit, each repeat]}."""
    dev = m.device
    out = {}
    with inference_mode(m):
        dec = Decoder(m, batch, max(lengths) + 8, use_cuda_graph=dev.type == "cuda")
        g = torch.Generator().manual_seed(0)
        for n in lengths:
            prompt = torch.randint(3, m.arch.vocab_size, (n,), generator=g).tolist()
            times = []
            for k in range(repeats + 2):  # two untimed warm-ups
                dec.restart(n)
                sync(dev)
                t0 = time.perf_counter()
                dec.admit([0], [prompt], 0)
                sync(dev)
                if k >= 2:
                    times.append(time.perf_counter() - t0)
            out[n] = times
    return out


def engine_round(eng, vocab: int, lengths: list, g) -> list:
    """One request a length, served one at a time (each prefilled by one Decoder.admit; none
    chunked: the engine's prefill_chunk is 0): the engine's constant after each."""
    from flora.generation import Sampling
    from flora.serve import Request

    out = []
    for n in lengths:
        r, = eng.submit([Request("base", torch.randint(3, vocab, (n,), generator=g).tolist(), 1, Sampling())])
        while r.events.get(timeout=600)[0] not in ("done", "error"):
            pass
        while eng.busy:  # drained: the worker idle (the model the measurement's alone; the fit read here)
            time.sleep(0.005)
        out.append((eng.admit_forward_tokens(), eng.admit_cost_source()))
    return out


def fit(times: dict) -> tuple:
    """(a, b, timings kept): time = a + b * tokens over every timing (flora.forward_cost.robust_line,
    the fit `flora serve` learns its constant with)."""
    xs = [n for n, ts in times.items() for _ in ts]
    a, b, kept = robust_line(xs, [t for ts in times.values() for t in ts])
    return a, b, sum(kept)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_dtype(p)
    p.add_argument("--model", default=None,
                   help=f"a shape ({', '.join(SHAPES)}: random weights), a checkpoint (default: SmolLM2-135M)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 8, 64, 256, 512])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--engine", type=int, default=0, metavar="N",
                   help="also serve N one-request admits on an Engine (a checkpoint) and report what it learns")
    p.add_argument("--check", type=float, default=None, metavar="R",
                   help="with --engine: fail (exit 1) unless its last constant is within R times the measurement")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None, help="write the markdown table here too")
    a = p.parse_args(argv)
    device, dtype = device_dtype(a, "bench/admit_cost.py")
    if len(set(a.lengths)) < 2 or min(a.lengths) < 1:
        sys.exit("bench/admit_cost.py: --lengths needs two or more distinct lengths >= 1")
    if a.engine < 0 or (a.engine and a.model in SHAPES):
        sys.exit("bench/admit_cost.py: --engine needs N >= 0 and a checkpoint (its tokenizer), not a shape")
    m, label = load(a.model, dtype, device)
    lengths = sorted(set(a.lengths))
    if not a.engine:
        times = admit_times(m, lengths, a.repeats)
        learned = []
    else:
        from flora.data import load_tokenizer
        from flora.pretrained import smollm2_path
        from flora.serve import Engine

        # prefill_chunk 0: a prompt longer than the chunk would prefill in chunks, never one admit
        eng = Engine(m, load_tokenizer(a.model or smollm2_path()), {"base": None}, max_batch=8, prefix_cache=0,
                     prefill_chunk=0, cache_len=max(lengths) + 8)
        g, learned = torch.Generator().manual_seed(0), []

        def feed() -> None:
            try:
                while len(learned) < a.engine:
                    learned.extend(engine_round(eng, m.arch.vocab_size, lengths[:a.engine - len(learned)], g))
            finally:
                eng.close()

        # the engine's loop in this thread, as `flora serve` runs it (a thread's OpenMP pool runs its GEMMs
        # slower on a 2-core CPU); the requests from another. Then the measurement, not in turns: a
        # pool spinning after its forwards takes a core from the other's
        threading.Thread(target=feed, daemon=True).start()
        eng.run()
        times = admit_times(m, lengths, a.repeats)
    fa, fb, kept = fit(times)
    measured = fa / fb
    cmd = ("python bench/admit_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    lines = [title(device, cmd), f"({label}, {str(dtype).replace('torch.', '')}, one row of a batch-8 cache)", "",
             "| prompt tokens | admit ms (median) | fit ms |", "|---|---|---|"]
    lines += [f"| {n} | {statistics.median(ts) * 1e3:.2f} | {(fa + fb * n) * 1e3:.2f} |" for n, ts in times.items()]
    lines += ["", f"fixed {fa * 1e3:.2f} ms + {fb * 1e6:.1f} us a token ({kept} of {sum(map(len, times.values()))} "
                  f"timings kept): a forward costs {measured:.0f} tokens (flora serve learns it from its prefills; "
                  f"admit_forward_tokens({device.type!r}) = {admit_forward_tokens(device)} until then)"]
    ratio = None
    if learned:
        first = next((i + 1 for i, (_, src) in enumerate(learned) if src == "learned"), None)
        ratio = max(learned[-1][0] / measured, measured / learned[-1][0]) if measured > 0 else float("inf")
        lines += ["", f"engine, {len(learned)} admits of {', '.join(map(str, lengths))} tokens in turn: "
                      + (f"learned from admit {first} on; after each: {' '.join(str(v) for v, _ in learned)} "
                         f"({ratio:.2f}x off the measurement at the end)"
                         if first else f"still the default ({learned[-1][0]}) after {len(learned)}")]
    publish("\n".join(lines), {"command": cmd, "model": label, "dtype": str(dtype), "times_s": times,
                               "fixed_s": fa, "per_token_s": fb, "kept": kept, "forward_tokens": measured,
                               "engine": [v for v, _ in learned],
                               "engine_sources": [src for _, src in learned]}, a.md, a.json)
    if a.check is not None and learned and not (learned[-1][1] == "learned" and ratio <= a.check):
        print(f"bench/admit_cost.py: check failed: the engine's {learned[-1][0]} ({learned[-1][1]}) is not within "
              f"{a.check}x of the measured {measured:.0f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
