"""How much of a scoring request's time goes to copying the prefix cache's keys.

lm-eval-harness's loglikelihood requests (echo, logprobs, max_tokens 0: a context and
several continuations) on the real SmolLM2 through flora's Engine with the prefix cache
on. Two ways they arrive:

* ``split``: lm-eval's batch_size 1, each continuation its own request, one after the
  other: every continuation after a question's first finds the context kept and
  computes only its own tokens (and the context's last partial block);
* ``batched``: a question's continuations in one request (packed: the context
  computed once in the row), the questions sharing a few-shot prefix that a later
  question finds kept.

Reported per context length: the requests' wall time, the scoring forwards' time
(Engine._score_forward), and within it the time of _ScoreKV's prefix copies: its
``__init__`` (joining the prefix cache's blocks, once a forward) and ``update``
(each layer's keys and values, the prefix copied before the new tokens'), timed by wrapping them
(perf_counter; the forward runs on the engine's one worker thread).

    python bench/score_prefix.py --contexts 500 1000 1500 --questions 6
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from flora import serve as S
from flora.model import FusedLlama
from flora.pretrained import load_tokenizer, smollm2_path

WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or "
         "has had first new one their after who two have its but they been other all not also when there "
         "during time into more city school years only over most river world war state team season may "
         "such where later film than under three while these some would about through north between "
         "house year being she before since south then each up united second both known them many "
         "series found made part became well early used including people can out will him no called "
         "near built west").split()


def text_ids(tok, rng, n: int) -> list:
    """n token ids of random words (no two contexts alike)."""
    ids = []
    while len(ids) < n:
        ids += tok(" " + " ".join(rng.choice(WORDS) for _ in range(64)), add_special_tokens=False).input_ids
    return ids[:n]


class Timer:
    """Wraps methods of a class, summing their wall time by name."""

    def __init__(self):
        self.t, self.calls, self.undo = {}, {}, []

    def wrap(self, cls, name: str, key: str) -> None:
        f = getattr(cls, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1

        setattr(cls, name, timed)
        self.undo.append((cls, name, f))

    def reset(self) -> None:
        self.t, self.calls = {}, {}

    def restore(self) -> None:
        for cls, name, f in reversed(self.undo):
            setattr(cls, name, f)


def score(eng, prompts: list) -> None:
    reqs = eng.submit(eng.parse({"model": "base", "prompt": prompts, "echo": True, "logprobs": 1,
                                 "max_tokens": 0, "temperature": 0}, False))
    done = 0
    while done < len(reqs):
        ev = reqs[0].events.get(timeout=600)
        assert ev[0] != "error", ev
        done += ev[0] == "done"


def questions(tok, rng, ctx: int, n: int, k: int, shared: int) -> list:
    """n questions: (context ids, k continuations' ids of 5-30 tokens); their contexts share
    the first ``shared`` tokens (a few-shot prefix), the rest each its own."""
    head = text_ids(tok, rng, shared)
    out = []
    for _ in range(n):
        c = head + text_ids(tok, rng, ctx - shared)
        out.append((c, [text_ids(tok, rng, rng.randint(5, 30)) for _ in range(k)]))
    return out


def run(eng, timer, qs: list, mode: str) -> dict:
    eng.prefix.clear()
    timer.reset()
    t0 = time.perf_counter()
    for c, conts in qs:
        if mode == "split":
            for x in conts:
                score(eng, [c + x])
        else:
            score(eng, [c + x for x in conts])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, **{k + "_s": v for k, v in timer.t.items()},
            "forwards": timer.calls.get("forward", 0), "hits": eng.prefix.hits}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[500, 1000, 1500])
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--choices", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--shared", type=float, default=0.8, help="batched: the few-shot prefix's share of a context")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    path = smollm2_path()
    model, tok = FusedLlama.from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path)
    eng = S.Engine(model, tok, {"base": None}, max_batch=8, prefix_cache=1 << 15).start()
    timer = Timer()
    timer.wrap(S.Engine, "_score_forward", "forward")
    timer.wrap(S._ScoreKV, "__init__", "join")
    timer.wrap(S._ScoreKV, "update", "layers")
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| mode | context | choices | requests | wall s | forward s | join (init) | per-layer copy | copy share of forward |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        rng = random.Random(args.seed)
        score(eng, [text_ids(tok, rng, 200)])  # warm-up
        for ctx in args.contexts:
            for k in args.choices:
                for mode in ("split", "batched"):
                    qs = questions(tok, rng, ctx, args.questions, k,
                                   int(ctx * args.shared) if mode == "batched" else 0)
                    runs = [run(eng, timer, qs, mode) for _ in range(args.rounds)]
                    r = min(runs, key=lambda r: r["wall_s"])
                    share = (r.get("join_s", 0) + r.get("layers_s", 0)) / r["forward_s"]
                    n = len(qs) * (k if mode == "split" else 1)
                    rows.append({"mode": mode, "context": ctx, "choices": k, "requests": n, **r, "share": share})
                    print(f"| {mode} | {ctx} | {k} | {n} | {r['wall_s']:.2f} | {r['forward_s']:.2f} | "
                          f"{r.get('join_s', 0) * 1e3:.0f} ms | {r.get('layers_s', 0) * 1e3:.0f} ms | "
                          f"{100 * share:.1f}% |", flush=True)
    finally:
        timer.restore()
        eng.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
