"""`flora demo`: the whole story in one command, offline, on a CPU.

1. the embedded base model: a small Llama pretrained on flora's synthetic
   corpus (flora/synthetic.py), trained on first use and cached
   (``~/.cache/flora`` or ``$FLORA_CACHE``);
2. fine-tunes an ``ffba`` and a ``lora`` adapter on a held-out task the base
   never saw, with a progress bar, and prints exact-match accuracy before/after;
3. generates a few examples with each adapter;
4. times base vs lora vs ffba vs zflora on that model (flora/bench/latency.py)
   and writes the table (markdown + JSON) and the plot to ``--out``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_TASK = "between"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true",
                   help="smaller base model and fewer steps (every stage still runs; for tests)")
    p.add_argument("--task", default=DEFAULT_TASK, help="fine-tuning task: between, shift or topic (default between)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per adapter (default 300, quick 12)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank (default 8)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", default="flora-demo", help="where the latency table, JSON and plot go")
    p.add_argument("--cache-dir", default=None, help="base-model cache (default ~/.cache/flora/synthetic)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default=None,
                   help="where fine-tuning, generation and timing run (default: cuda when available, else cpu; "
                        "the base model is always pretrained on the CPU, so its cache is the same everywhere)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _say(msg: str) -> None:
    print(msg, flush=True)


def _complete(model, tok, prompts, max_new_tokens: int) -> list:
    """Greedy completions of a left-padded batch of prompts (text after the prompt, up to EOS)."""
    import torch

    enc = [tok(p)["input_ids"] for p in prompts]
    T = max(len(e) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(enc), T), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), T), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, T - len(e):] = torch.tensor(e)
        mask[i, T - len(e):] = 1
    out = model.generate(ids, max_new_tokens=max_new_tokens, attention_mask=mask,
                         eos_token_id=tok.eos_token_id, pad_token_id=pad)
    return [tok.decode(row[T:].tolist(), skip_special_tokens=True).strip() for row in out]


def run_demo(args) -> dict:
    import torch

    from . import synthetic as syn
    from .config import AdapterConfig
    from .devices import resolve_device
    from .data import TokenizedDataset, load_tokenizer
    from .evaluate import eval_stats
    from .model import FusedLlama
    from .train import TrainConfig, train

    if args.task not in syn.FINETUNE_TASKS:
        raise ValueError(f"--task: unknown task {args.task!r}; choose from {sorted(syn.FINETUNE_TASKS)}")
    steps = args.steps or (12 if args.quick else 300)
    if steps < 1 or args.rank < 1:
        raise ValueError("--steps and --rank must be >= 1")
    device = resolve_device(args.device)
    t_all = time.perf_counter()
    torch.manual_seed(args.seed)

    # 1. base model (cached)
    base_cfg = syn.QUICK_BASE if args.quick else syn.DEFAULT_BASE  # the learning benchmark's base
    t0 = time.perf_counter()
    _say("== 1. base model: a small Llama pretrained on flora's synthetic corpus")
    base_dir = syn.build_base_model(base_cfg, cache_dir=args.cache_dir, progress=not args.no_progress, log=_say)
    _say(f"   {base_dir} ({time.perf_counter() - t0:.1f} s)")
    tok = load_tokenizer(base_dir)

    # 2. fine-tune ffba and lora on a task the base never saw
    batch = 32
    train_recs = syn.finetune_data(args.task, steps * batch, seed=args.seed, split="train")
    eval_recs = syn.finetune_data(args.task, 48 if args.quick else 200, seed=args.seed, split="eval")
    eval_ds = TokenizedDataset(eval_recs, tok, 64)
    _say(f"\n== 2. fine-tuning on '{args.task}' ({syn.TASK_KIND[args.task]}), e.g. "
         f"{eval_recs[0]['prompt']!r} -> {eval_recs[0]['completion']!r}")
    results, models = {}, {}
    for variant in ("ffba", "lora"):
        cfg = AdapterConfig(variant, rank=args.rank, alpha=2.0 * args.rank)
        model = FusedLlama.from_pretrained(str(base_dir), adapter=cfg, device=device)
        before = eval_stats(model, eval_ds, tok, batch_size=100)
        tc = TrainConfig(lr=args.lr, max_steps=steps, batch_size=batch, seq_len=64,
                         warmup_steps=max(1, steps // 10), seed=args.seed, progress=not args.no_progress,
                         desc=f"{variant:>4} r{args.rank}", eval_batch_size=100)
        res = train(model, tok, train_recs, eval_ds, config=tc)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[variant] = {"trainable": n_train, "before": before, "after": res.final_eval,
                            "seconds": res.seconds}
        models[variant] = model
    _say(f"\n   {'adapter':<8} {'trainable':>9} {'eval loss':>17} {'exact match':>19} {'time':>7}")
    for v, r in results.items():
        _say(f"   {v:<8} {r['trainable']:>9,} {r['before']['loss']:7.3f} -> {r['after']['loss']:6.3f}  "
             f"{r['before']['exact_match']:7.1%} -> {r['after']['exact_match']:6.1%} {r['seconds']:6.1f}s")

    # 3. generation
    _say("\n== 3. greedy generation with each adapter (and with the adapter disabled)")
    ex = list({e["prompt"]: e for e in eval_recs}.values())[:4]  # 4 distinct prompts
    prompts = [e["prompt"] for e in ex]
    max_new = 8
    with models["ffba"].disable_adapter():
        outs = {"base": _complete(models["ffba"], tok, prompts, max_new)}
    for v in ("ffba", "lora"):
        outs[v] = _complete(models[v], tok, prompts, max_new)
    for i, e in enumerate(ex):
        _say(f"   {e['prompt']}")
        _say(f"      expected {e['completion']!r:<14} base {outs['base'][i]!r:<14} "
             f"ffba {outs['ffba'][i]!r:<14} lora {outs['lora'][i]!r}")
    del models

    # 4. latency on this model
    paths = {}
    if not args.no_latency:
        from .bench import latency as bl

        _say("\n== 4. latency on this model: flora base vs lora vs ffba vs zflora "
             "(random non-zero adapters, r = %d)" % args.rank)
        argv = ["--model", str(base_dir), "--rows", "base", "lora", "ffba", "zflora",
                "--rank", str(args.rank), "--batch", "1", "--prompt", "32" if args.quick else "48",
                "--new-tokens", "8" if args.quick else "32", "--repeats", "1" if args.quick else "3",
                "--out-dir", args.out, "--name", "latency", "--no-results", "--device", str(device)]
        largs = bl.build_parser().parse_args(argv)
        result = bl.run(bl.make_plan(largs), log=lambda s: None)
        result["command"] = "flora demo" + (" --quick" if args.quick else "")
        paths = bl.write_outputs(result, largs, log=lambda s: None)
        md = bl.markdown(result)
        (Path(args.out) / "latency.md").write_text(md)
        paths["md"] = Path(args.out) / "latency.md"
        _say(f"\n   table: {paths['md']}\n   plot:  {paths.get('png')}\n   json:  {paths['json']}")
    _say(f"\ndone in {time.perf_counter() - t_all:.0f} s")
    return {"base_dir": str(base_dir), "results": results, "generations": outs, "prompts": prompts,
            "paths": {k: str(v) for k, v in paths.items()}}


def main(argv=None) -> int:
    args = add_arguments(argparse.ArgumentParser(prog="flora demo")).parse_args(argv)
    run_demo(args)
    return 0
