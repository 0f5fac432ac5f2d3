"""Proof that every adapter variant learns (issue 7).

1. Builds (or reuses from the cache) a small Llama pretrained on flora's
   synthetic corpus (flora/synthetic.py): no download.
2. Fine-tunes every variant on held-out tasks of a different kind
   (`topic`: 3-way classification; `between`: generation, evaluated on
   held-out letter pairs) at a matched trainable-parameter budget: each
   variant's rank is the one whose parameter count is closest to LoRA's at the
   reference rank (required within 10%). 3 seeds; LoRA and full fine-tuning
   are the references; the untouched base model is shown too.
3. Reports final eval loss and exact-match accuracy (mean and sample std over
   seeds) as a markdown table in bench/RESULTS.md ("Learning" section) and a
   JSON file.

    python bench/learning.py            # full suite (< 20 min on 2 CPU cores)
    python bench/learning.py --quick    # smaller model, 1 seed, fewer steps (< 3 min)
    python bench/learning.py real       # SmolLM2-135M on real text (bench/learning_real.py)
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from flora import AdapterConfig, FusedLlama, LlamaArch  # noqa: E402
from flora import synthetic as syn  # noqa: E402
from flora.checkpoint import read_config  # noqa: E402
from flora.data import TokenizedDataset, load_tokenizer  # noqa: E402
from flora.bench.report import machine  # noqa: E402
from flora.evaluate import eval_stats  # noqa: E402
from flora.fileio import atomic_write_text  # noqa: E402
from flora.modules import count_parameters  # noqa: E402
from flora.train import TrainConfig, train  # noqa: E402

VARIANTS = ["lora", "pf-lora", "ffa", "fpa", "ffba", "ffba-ab", "ffba-relu", "ffba-qg-add",
            "zflora-minimal", "zflora", "zflora-mha"]
REFERENCE = "lora"
TASKS = ["topic", "between"]
BEGIN, END = "<!-- learning:begin -->", "<!-- learning:end -->"


def matched_rank(variant: str, budget: int, shapes: LlamaArch, max_rank: int = 512):
    """(rank, count) whose adapter parameter count is closest to ``budget``."""
    best = None
    for r in range(1, max_rank + 1):
        try:
            n = count_parameters(AdapterConfig(variant, r, 2.0 * r), shapes)
        except ValueError:  # e.g. a repeat-add width that does not divide the output
            continue
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (r, n)
        if n > 2 * budget:
            break
    if best is None:
        raise ValueError(f"{variant}: no valid rank on this model")
    return best


def run_one(base_dir, tok, variant, rank, task, seed, args, eval_ds):
    train_recs = syn.finetune_data(task, args.steps * args.batch_size, seed=seed, split="train")
    torch.manual_seed(seed)
    if variant == "full":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        lr = args.full_lr
    else:
        model = FusedLlama.from_pretrained(str(base_dir), adapter=AdapterConfig(variant, rank, 2.0 * rank),
                                           adapter_dtype=torch.float32)
        lr = args.lr
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = TrainConfig(lr=lr, max_steps=args.steps, batch_size=args.batch_size, seq_len=64,
                      warmup_steps=max(1, args.steps // 10), seed=seed, progress=False, eval_batch_size=100)
    t0 = time.perf_counter()
    res = train(model, tok, train_recs, eval_ds, config=cfg)
    return {"variant": variant, "rank": rank, "task": task, "seed": seed, "trainable": n_train,
            "lr": lr, "eval_loss": res.final_eval["loss"], "exact_match": res.final_eval["exact_match"],
            "final_train_loss": res.final_train_loss, "seconds": time.perf_counter() - t0}


def _ms(xs):
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs, tasks, rows):
    """[(variant, rank, trainable, {task: (loss mean, sd, acc mean, sd, n)})]."""
    out = []
    for v in rows:
        mine = [r for r in runs if r["variant"] == v]
        if not mine:
            continue
        per = {}
        for t in tasks:
            rs = [r for r in mine if r["task"] == t]
            if rs:
                per[t] = (*_ms([r["eval_loss"] for r in rs]), *_ms([100 * r["exact_match"] for r in rs]), len(rs))
        out.append((v, mine[0]["rank"], mine[0]["trainable"], per))
    return out


def markdown(result) -> str:
    a = result["args"]
    tasks = a["tasks"]
    lines = [
        "## Learning",
        "",
        f"- date: {result['date']}; machine: {result['machine']}; torch {result['torch']}",
        f"- command: `{result['command']}` ({result['seconds'] / 60:.1f} min wall)",
        f"- base: {result['base']['params'] / 1e6:.2f}M-parameter Llama ({result['base']['shape']}), pretrained "
        f"{result['base']['steps']} steps on the synthetic corpus (flora/synthetic.py)",
        f"- fine-tuning: {a['steps']} steps x batch {a['batch_size']}, AdamW lr {a['lr']} (full fine-tuning "
        f"{a['full_lr']}), 10% warmup + cosine, alpha = 2 x rank for every variant; seeds {a['seeds']}; "
        f"eval {a['n_eval']} examples per task",
        f"- budget: LoRA r={a['ref_rank']} on all 7 projections = {result['budget']:,} trainable parameters; "
        "every other variant at the rank whose count is closest (ratio in the table)",
        "- tasks: " + "; ".join(f"`{t}` = {syn.TASK_KIND[t]}" for t in tasks)
        + ". Exact match = greedy decoding reproduces the completion and stops (computed teacher-forced).",
        "",
    ]
    head = "| variant | rank | trainable | vs budget | " + " | ".join(
        f"{t} loss | {t} EM %" for t in tasks) + " |"
    lines += [head, "|" + "---|" * (4 + 2 * len(tasks))]
    base = result["base_eval"]
    lines.append("| base (no fine-tuning) | - | 0 | - | " + " | ".join(
        f"{base[t]['loss']:.3f} | {100 * base[t]['exact_match']:.1f}" for t in tasks) + " |")
    maj = majority(tasks, a["n_eval"])
    lines.append("| always the most frequent answer | - | - | - | " + " | ".join(
        f"- | {maj[t]:.1f}" for t in tasks) + " |")
    for v, rank, n, per in summarize(result["runs"], tasks, ["full"] + [REFERENCE] + [
            x for x in result["variants"] if x != REFERENCE]):
        ratio = "-" if v == "full" else f"{n / result['budget']:.3f}"
        cells = []
        for t in tasks:
            if t in per:
                lm, ls, am, as_, k = per[t]
                cells.append(f"{lm:.3f} ± {ls:.3f} | {am:.1f} ± {as_:.1f}")
            else:
                cells.append("- | -")
        name = "full fine-tuning" if v == "full" else v
        lines.append(f"| {name} | {rank if v != 'full' else '-'} | {n:,} | {ratio} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds.", ""]
    if result.get("findings"):
        lines += ["Findings:", ""] + [f"- {f}" for f in result["findings"]] + [""]
    return "\n".join(lines)


def majority(tasks, n_eval) -> dict:
    """Exact match (%) of always answering the eval set's most frequent completion."""
    from collections import Counter

    out = {}
    for t in tasks:
        c = Counter(r["completion"] for r in syn.finetune_data(t, n_eval, seed=0, split="eval"))
        out[t] = 100.0 * c.most_common(1)[0][1] / n_eval
    return out


def findings(result) -> list:
    """Plain statements derived from the numbers (no judgement baked in)."""
    tasks = result["args"]["tasks"]
    maj = majority(tasks, result["args"]["n_eval"])
    s = {v: per for v, _, _, per in summarize(result["runs"], tasks, ["full"] + result["variants"])}
    out = []
    if REFERENCE not in s:
        return out
    for v, claim in (("ffba", ">="), ("ffa", "<")):
        if v not in s:
            continue
        parts = []
        for t in tasks:
            if t in s[v] and t in s[REFERENCE]:
                dv, dl = s[v][t], s[REFERENCE][t]
                parts.append(f"{t}: EM {dv[2]:.1f} vs {dl[2]:.1f}, loss {dv[0]:.3f} vs {dl[0]:.3f}")
        out.append(f"papers claim {v} {claim} lora; measured {v} vs lora: " + "; ".join(parts))
    for t in tasks:
        beat = [v for v in result["variants"] if t in s.get(v, {}) and s[v][t][2] >= maj[t] + 5]
        out.append(f"{t}: {len(beat)}/{len(result['variants'])} adapter variants beat the most-frequent-answer "
                   f"guess ({maj[t]:.1f}% EM) by 5 points or more on the 3-seed mean"
                   + (f" ({', '.join(beat)})" if beat else ""))
    return out


def write_results(md: str, path: Path, begin: str = BEGIN, end: str = END):
    """Replace (or append) the section between the markers, atomically."""
    old = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{md}\n{end}"
    if begin in old and end in old:
        new = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, new)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["real"]:  # the real-model suite (SmolLM2-135M on real text)
        sys.path.insert(0, str(HERE))
        import learning_real
        return learning_real.main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, 1 seed, fewer steps (CI)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--ref-rank", type=int, default=4, help="LoRA rank that sets the parameter budget")
    p.add_argument("--n-eval", type=int, default=None)
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tuning reference")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--render", default=None, metavar="JSON",
                   help="re-render the table from a saved result JSON (no training)")
    p.add_argument("--json", default=None, help="JSON output (default bench/learning.json; quick: bench/out/learning-quick.json)")
    p.add_argument("--results", default=None,
                   help="markdown file whose Learning section is replaced (default bench/RESULTS.md; "
                        "quick runs write none unless given)")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        result["findings"] = findings(result)
        md = markdown(result)
        if args.results:
            write_results(md, Path(args.results))
        print(md)
        return result
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.steps = args.steps or (120 if args.quick else 300)
    args.n_eval = args.n_eval or (100 if args.quick else 300)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in syn.FINETUNE_TASKS:
            p.error(f"unknown task {t!r}; choose from {sorted(syn.FINETUNE_TASKS)}")
    t_start = time.perf_counter()
    base_cfg = syn.QUICK_BASE if args.quick else syn.DEFAULT_BASE
    base_dir = syn.build_base_model(base_cfg, cache_dir=args.cache_dir, progress=False)
    tok = load_tokenizer(base_dir)
    shapes = read_config(str(base_dir))
    budget = count_parameters(AdapterConfig(REFERENCE, args.ref_rank, 2.0 * args.ref_rank), shapes)
    ranks = {}
    for v in variants:
        r, n = (args.ref_rank, budget) if v == REFERENCE else matched_rank(v, budget, shapes)
        if abs(n / budget - 1) > 0.10:
            print(f"warning: {v} cannot match the budget within 10% (rank {r}: {n} vs {budget})", file=sys.stderr)
        ranks[v] = r
    eval_sets = {t: TokenizedDataset(syn.finetune_data(t, args.n_eval, seed=0, split="eval"), tok, 64)
                 for t in tasks}
    base_model = FusedLlama.from_pretrained(str(base_dir))
    base_eval = {t: eval_stats(base_model, eval_sets[t], tok, batch_size=100) for t in tasks}
    base_params = base_model.num_parameters()
    del base_model

    jobs = [(v, ranks[v]) for v in variants] + ([] if args.no_full else [("full", None)])
    runs = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs) * len(tasks) * args.seeds, desc="learning", unit="run")
    for task in tasks:
        for seed in range(args.seeds):
            for v, r in jobs:
                rec = run_one(base_dir, tok, v, r, task, seed, args, eval_sets[task])
                runs.append(rec)
                bar.set_postfix_str(f"{task} {v} s{seed}: EM {100 * rec['exact_match']:.0f}%")
                bar.update(1)
    bar.close()
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(), "torch": torch.__version__,
        "command": "python bench/learning.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {**vars(args), "tasks": tasks}, "variants": variants, "ranks": ranks, "budget": budget,
        "base": {"dir": str(base_dir), "params": base_params, "steps": base_cfg.steps,
                 "shape": f"d={shapes.hidden_size}, {shapes.num_hidden_layers} layers, "
                          f"d_ff={shapes.intermediate_size}, vocab={shapes.vocab_size}"},
        "base_eval": base_eval, "runs": runs, "seconds": time.perf_counter() - t_start,
    }
    result["findings"] = findings(result)
    md = markdown(result)
    out_json = Path(args.json or (HERE / "out" / "learning-quick.json" if args.quick else HERE / "learning.json"))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    results = args.results or (None if args.quick else str(HERE / "RESULTS.md"))
    if results:
        write_results(md, Path(results))
    print(md)
    return result


if __name__ == "__main__":
    main()
