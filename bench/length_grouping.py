#!/usr/bin/env python
"""Training on data of mixed lengths: plain batches, length-grouped batches, packed rows.

    python bench/length_grouping.py                    # SmolLM2-135M, CPU, 64 examples, one epoch (8 steps) each
    python bench/length_grouping.py --model DIR --device cuda --steps 20 --batch 16

Records are ``{"text"}`` of lengths drawn (seeded) from a log-normal with a
median of ``--median`` words, clipped to the sequence length: the spread of
instruction data. The same records train the same adapter (ffba, r 16)
through flora.train.train in the plain seeded order, with ``group_by_length``
and with ``pack`` (rows of up to ``--seq-len`` tokens, ``--pack-batch`` rows a
step, one epoch of rows: every example once), the settings alternated
``--rounds`` times. Reported per setting: the padded share of the tokens the
steps computed (counted from the batch order, flora.train.epoch_order, over
the steps that ran), and the real (non-padding) tokens per second
(TrainResult.tokens_per_s, the median over rounds).

``--settings`` picks among them; ``packed-mask`` is ``packed`` with the
attention held to the block-diagonal mask (``flora.layers.PACKED_CALL_COST``
infinite: the form before per-sequence attention), to measure the two in one
process, alternated:

    python bench/length_grouping.py --settings packed-mask packed --rounds 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics

import torch

from flora import AdapterConfig, FusedLlama, layers
from flora.data import TokenizedDataset, pack_rows
from flora.pretrained import load_tokenizer, smollm2_path
from flora.train import TrainConfig, epoch_order, train

WORDS = ("the model reads a short note about rivers and cities then answers with care while "
         "numbers follow each other in order and every sentence ends").split()


def make_records(n: int, median: int, seed: int) -> list:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(max(4, int(rng.lognormvariate(0, 0.8) * median))))}
            for _ in range(n)]


def padded_share(ds, cfg, steps: int) -> float:
    """Padding / computed tokens over the first ``steps`` steps (one process, one
    micro-batch); with ``cfg.pack`` a batch's units are packed rows."""
    lengths = [len(it["input_ids"]) for it in ds]
    if cfg.pack:
        lengths = [sum(lengths[i] for i in r) for r in pack_rows(lengths, cfg.seq_len)]
    order = epoch_order(len(lengths), cfg.seed, 0, lengths if cfg.group_by_length else None, cfg.batch_size)
    real = pad = 0
    for s in range(steps):
        b = [lengths[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
        real, pad = real + sum(b), pad + max(b) * len(b) - sum(b)
    return pad / (real + pad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=64, help="examples")
    p.add_argument("--median", type=int, default=40, help="median words per example")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="default: one epoch")
    p.add_argument("--pack-batch", type=int, default=2, help="packed rows a step")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settings", nargs="+", default=["plain", "grouped", "packed"],
                   choices=["plain", "grouped", "packed", "packed-mask"], help="the first is the x column's base")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.steps * args.batch > args.n:
        p.error("--steps x --batch must not exceed --n (one epoch)")
    path = args.model or smollm2_path()
    tok = load_tokenizer(path)
    dev = torch.device(args.device)
    ds = TokenizedDataset(make_records(args.n, args.median, 0), tok, args.seq_len)
    lengths = sorted(len(it["input_ids"]) for it in ds)
    print(f"{len(ds)} examples, tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    n_rows = len(pack_rows([len(it["input_ids"]) for it in ds], args.seq_len))
    settings = {  # name: (label, TrainConfig)
        "plain": ("plain shuffle", TrainConfig(max_steps=args.steps, batch_size=args.batch)),
        "grouped": ("grouped by length", TrainConfig(max_steps=args.steps, batch_size=args.batch,
                                                     group_by_length=True)),
        "packed": (f"packed, {args.pack_batch} rows a step", TrainConfig(
            max_steps=max(1, n_rows // args.pack_batch), batch_size=args.pack_batch, pack=True))}
    settings["packed-mask"] = (settings["packed"][0] + ", mask attention", settings["packed"][1])
    settings = {k: settings[k] for k in args.settings}
    tps = {k: [] for k in settings}
    for _ in range(args.rounds):
        for name, (_, c) in settings.items():
            torch.manual_seed(0)
            model = FusedLlama.from_pretrained(path, adapter=AdapterConfig("ffba", 16), device=dev)
            cfg = dataclasses.replace(c, seq_len=args.seq_len, progress=False, bf16=dev.type == "cuda")
            cost = layers.PACKED_CALL_COST
            layers.PACKED_CALL_COST = float("inf") if name == "packed-mask" else cost
            try:
                tps[name].append(train(model, tok, ds, config=cfg).tokens_per_s)
            finally:
                layers.PACKED_CALL_COST = cost
    out = {"device": str(dev), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "model": str(path), "n": len(ds), "batch": args.batch,
           "steps": args.steps, "pack_batch": args.pack_batch, "packed_rows": n_rows, "rounds": args.rounds,
           "rows": {}}
    first = next(iter(settings))
    print(f"| batches | steps | padded share | real tokens/s (rounds) | median | x {first} |")
    print("|---|---:|---:|---|---:|---:|")
    plain = statistics.median(tps[first])
    for name, (label, c) in settings.items():
        share = padded_share(ds, dataclasses.replace(c, seq_len=args.seq_len), c.max_steps)
        med = statistics.median(tps[name])
        out["rows"][name] = {"padded_share": share, "tokens_per_s": tps[name], "steps": c.max_steps}
        each = ", ".join(f"{t:,.0f}" for t in tps[name])
        print(f"| {label} | {c.max_steps} | {share:.1%} | {each} | {med:,.0f} | {med / plain:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
