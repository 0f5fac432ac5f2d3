#!/usr/bin/env python
"""flora serve's own host time per row and decode step: the engine's work outside the model.

    python bench/engine_host.py                       # batches 1 8 32 64, every request kind
    python bench/engine_host.py --batches 64 --kinds stream --rounds 5

On a GPU a decode step of a small model takes a millisecond or two, under CUDA
graphs with almost no host work; what the engine does per row and step in
Python (feeding the token, reading the argmax, the detokenizer, stop strings,
streaming events, metrics) then adds to every step. This counts that work on
the host alone: the engine's loop runs in this thread (Engine.run) with one
torch thread, and the thread's CPU time (time.thread_time: a busy neighbour
does not count) less that of the model's calls (Decoder.step / admit and the
cache's allocation, timed the same way) is the engine's. The model is the "tiny" shape (128-wide, 2
layers, vocab 512) with SmolLM2's tokenizer (its real detokenizer costs; ids
below 512 are bytes and short merges), so its own step is short too. Each
request: a 4-token prompt, --new-tokens tokens (ignore_eos: all rows run to
the end), every row submitted at once. Printed: microseconds of engine time
per row and step, medians over --rounds (kinds interleaved in each round).

Kinds: greedy (no stream, no logprobs: the least work), stream (greedy,
streamed deltas), sampled (temperature 0.8, top_p 0.9, streamed), logprobs
(greedy, streamed, logprobs 1), stop (greedy, streamed, two stop strings
that never match).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from flora.bench.latency import base_llama, build_flora, model_config
from flora.bench.report import machine
from flora.generation import Decoder, Sampling
from flora.serve import Engine, Request

KINDS = {
    "greedy": dict(),
    "stream": dict(stream=True),
    "sampled": dict(stream=True, sampling=Sampling(temperature=0.8, top_p=0.9)),
    "logprobs": dict(stream=True, logprobs=1),
    "stop": dict(stream=True, stop=("\u2603\u2603", "zzqzzq")),
}


@contextlib.contextmanager
def model_time(acc: list):
    """Decoder.step / admit's (and its cache's allocation's) thread CPU time added to acc[0] while inside."""
    saved = {n: getattr(Decoder, n) for n in ("__init__", "step", "admit")}

    def timed(f):
        def run(*a, **kw):
            t = time.thread_time()
            try:
                return f(*a, **kw)
            finally:
                acc[0] += time.thread_time() - t
        return run

    for n, f in saved.items():
        setattr(Decoder, n, timed(f))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(Decoder, n, f)


def one(model, tok, batch: int, kind: str, new_tokens: int, seed: int) -> float:
    """Engine microseconds (thread CPU, outside the model) per row and decode step."""
    kw = dict(KINDS[kind])
    sampling = kw.pop("sampling", Sampling())
    g = torch.Generator().manual_seed(seed)
    eng = Engine(model, tok, {"base": None}, max_batch=batch, prefix_cache=0, max_tokens=new_tokens,
                 cache_len=new_tokens + 8)
    reqs = [Request("base", torch.randint(3, 512, (4,), generator=g).tolist(), new_tokens, sampling,
                    seed=seed + i, ignore_eos=True, **kw) for i in range(batch)]
    eng.submit(reqs)
    eng.close()
    acc = [0.0]
    with model_time(acc):
        t = time.thread_time()
        eng.run()
        total = time.thread_time() - t
    for r in reqs:
        evs = []
        while not r.events.empty():
            evs.append(r.events.get())
        assert evs and evs[-1][0] == "done" and evs[-1][4] == new_tokens, evs[-1:]
    return (total - acc[0]) / (eng.row_steps or 1) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from flora.pretrained import load_tokenizer, smollm2_path

    tok = load_tokenizer(smollm2_path())
    cfg, _ = model_config("tiny")
    model, _ = build_flora(base_llama("tiny", cfg, torch.float32, "cpu", seed=0), "base", 8, None,
                           torch.float32, "cpu", seed=0)
    runs = {(b, k): [] for b in a.batches for k in a.kinds}
    for rnd in range(a.rounds + 1):  # round 0 warms up (untimed)
        for key in runs:
            us = one(model, tok, key[0], key[1], a.new_tokens, rnd)
            if rnd:
                runs[key].append(us)
    print(f"# engine host time per row and step, us (thread CPU, outside the model); {machine()}, "
          f"torch {torch.__version__}, {a.new_tokens} tokens a row, medians of {a.rounds}")
    print("| batch | " + " | ".join(a.kinds) + " |")
    print("|---|" + "---|" * len(a.kinds))
    for b in a.batches:
        print(f"| {b} | " + " | ".join(f"{statistics.median(runs[(b, k)]):.1f}" for k in a.kinds) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
