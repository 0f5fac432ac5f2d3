#!/usr/bin/env python
"""`flora generate --data` throughput: records/s and tokens/s over a file of chat
prompts under one long system prompt whose answers vary in length, for one or
more source trees side by side (e.g. a copy of main before a change, and after).

    python bench/generate_data.py                                    # this tree, SmolLM2, CPU, 64 records
    python bench/generate_data.py --tree before=/tmp/main-copy --tree after=. --rounds 2
    python bench/generate_data.py --model DIR --device cuda --batch-size 32 --records 256

The records reuse bench/serve.py's workloads, under its ~600-token system
prompt (``--chat --system``): its questions (short answers), each also as the
long story its long clients ask for (the answer runs to ``--max-new-tokens``),
and, for the rest, three-step arithmetic word problems (bench/real_tasks.py)
whose worked answer is each record's ``completion`` (so the exact match is
reported too); interleaved, so that every batch mixes short and long answers.
Each tree's ``flora generate`` runs in a process of its own (the tree its
working directory and PYTHONPATH: its code and built extension), the trees
taking turns for ``--rounds`` rounds. Reported per tree: the median of the
generation seconds its summary gives (model load and warm-up out), records/s
and tokens/s from it, the ratio to the first tree, and whether its completions
equal the first tree's (greedy: they should).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/: sibling scripts, loaded however this one is

from real_tasks import arith_records  # noqa: E402
from serve import QUESTIONS, SYSTEM  # noqa: E402

LONG = "Write a long, detailed story that begins with this question: {}"  # bench/serve.py's long clients


def records(n: int) -> list:
    """n records: the questions, their long-story forms and arithmetic problems, round robin."""
    kinds = [[{"prompt": q} for q in QUESTIONS], [{"prompt": LONG.format(q)} for q in QUESTIONS]]
    arith = arith_records(0, max(n - 2 * len(QUESTIONS), 0))["eval"]
    kinds = [kinds[0], arith[::2], kinds[1], arith[1::2]]
    out = []
    while len(out) < n and any(kinds):
        for k in kinds:
            if k and len(out) < n:
                out.append(k.pop(0))
    return out


def commit(tree: str) -> str:
    try:
        rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + ("-dirty" if dirty else "")


def run_tree(tree: str, data: str, out: str, args) -> dict:
    """One `flora generate` of ``data`` by the code of ``tree``: its summary's run, the
    process's wall seconds, and the completions it wrote."""
    cmd = [sys.executable, "-m", "flora", "generate", "--model", args.model, "--data", data, "--chat",
           "--system", args.system, "--max-new-tokens", str(args.max_new_tokens),
           "--batch-size", str(args.batch_size), "--device", args.device, "--out", out]
    env = {**os.environ, "PYTHONPATH": tree}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{tree}: flora generate failed ({p.returncode}):\n{p.stderr[-2000:]}")
    summary = json.loads(p.stderr.strip().splitlines()[-1])
    with open(out) as f:
        texts = [json.loads(line)["base"] for line in f]
    return {**summary["runs"]["base"], "wall_s": wall, "texts": texts}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=None, metavar="LABEL=DIR",
                   help="a source tree to run (repeatable; the first is the baseline; default: this one)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--records", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="runs of each tree, taking turns (the median counts)")
    p.add_argument("--system", default=SYSTEM, help="the system prompt (default: bench/serve.py's, ~600 tokens)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.records < 1 or args.rounds < 1:
        p.error("--records and --rounds must be >= 1")
    trees = []
    for spec in args.tree or [f"this={HERE.parent}"]:
        label, sep, path = spec.partition("=")
        if not sep or not label or not os.path.isdir(os.path.join(path, "flora")):
            p.error(f"--tree {spec!r}: expected LABEL=DIR, DIR a source tree (with flora/)")
        trees.append((label, os.path.abspath(path)))
    runs = {label: [] for label, _ in trees}
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "records.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records(args.records))
        for r in range(args.rounds):
            for label, tree in trees if r % 2 == 0 else trees[::-1]:
                got = run_tree(tree, data, os.path.join(d, f"{label}.jsonl"), args)
                runs[label].append(got)
                print(f"round {r + 1}, {label}: {got['seconds']:.1f} s, {got['new_tokens']} tokens", file=sys.stderr,
                      flush=True)
    base = statistics.median(x["seconds"] for x in runs[trees[0][0]])
    rows = []
    for label, tree in trees:
        rs, secs = runs[label], statistics.median(x["seconds"] for x in runs[label])
        new = rs[0]["new_tokens"]
        rows.append({"tree": label, "commit": commit(tree), "seconds": secs, "records_per_s": args.records / secs,
                     "tokens_per_s": new / secs, "new_tokens": new, "speedup": base / secs,
                     "same_completions": sum(a == b for a, b in zip(rs[0]["texts"], runs[trees[0][0]][0]["texts"])),
                     "exact_match": rs[0].get("exact_match"), "seconds_each": [x["seconds"] for x in rs],
                     "cached_prompt_tokens": rs[0].get("cached_prompt_tokens"),
                     "rows_per_step": rs[0].get("rows_per_step")})
    print(f"| tree | commit | seconds | records/s | tokens/s | new tokens | vs {trees[0][0]} | "
          f"same completions | exact match |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tree']} | {r['commit']} | {r['seconds']:.1f} | {r['records_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['new_tokens']} | {r['speedup']:.2f}x | "
              f"{r['same_completions']}/{args.records} | {r['exact_match']} |")
    result = {"model": args.model, "device": args.device, "cpu": platform.processor() or platform.machine(),
              "records": args.records, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "rounds": args.rounds, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
