"""Learning on a real model: SmolLM2-135M-Instruct fine-tuned on real text (issue 15).

Run through ``python bench/learning.py real ...`` (see ``--help``). Sized for
CPU: only the top ``k`` decoder layers (and, for zflora, the LM head's
reader) carry adapters. The frozen layers below them compute the same
hidden states with or without the adapter (no adapter reads or writes there),
so those states are computed once per dataset and cached; training and the
teacher-forced evals run only the top k layers and the head. For the zflora
forms the extra residual channels start at the first adapted layer with
z = 0, which is exactly what the embedding's z = 0 becomes when no lower
layer writes the stream. The head's logits are computed only at the
positions that carry loss. Checked at start-up: the top-k model on cached
states matches the full 30-layer model with the same adapter tensors.

ROUGE-L (summary task) needs free generation, so it runs the full model
with the trained adapter moved onto it (``layers = [L-k, L)``).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from flora import AdapterConfig, FusedLlama  # noqa: E402
from flora.bench.report import machine  # noqa: E402
from flora.fileio import atomic_write_json  # noqa: E402
from flora.gguf import load_gguf  # noqa: E402
from flora.layers import additive_mask, rms_norm, rope_cos_sin, slot_mask  # noqa: E402
from flora.modules import count_parameters, initial_carry  # noqa: E402
from flora.pretrained import chat_ids, load_tokenizer, smollm2_path  # noqa: E402
from flora.train import TrainConfig  # noqa: E402

import real_tasks as rt  # noqa: E402

VARIANTS = ["lora", "pf-lora", "ffa", "fpa", "ffba", "ffba-ab", "ffba-relu", "ffba-qg-add",
            "zflora", "zflora-minimal", "zflora-mha"]
TASKS = ["mansum", "arith"]
SYSTEM = ""  # an empty system turn: the template's default one would cost ~20 tokens per example
BEGIN, END = "<!-- learning-real:begin -->", "<!-- learning-real:end -->"


# ---------------------------------------------------------------- data
def encode(tok, rec, eos: int) -> dict:
    """Chat-formatted prompt ids + completion ids + EOS; labels only on the completion."""
    p = chat_ids(tok, rec["prompt"], system=SYSTEM)[0].tolist()
    c = tok(rec["completion"], add_special_tokens=False)["input_ids"] + [eos]
    return {"ids": p + c, "n_prompt": len(p), "rec": rec}


def build_task(task, tok, eos, n_train, n_eval, seed_data=0):
    if task == "mansum":
        d = rt.man_records()
        rng = random.Random(seed_data)
        train, ev = d["train"], d["eval"]
        rng.shuffle(train)
        train, ev = train[:n_train], ev[:n_eval]
    elif task == "arith":
        d = rt.arith_records(n_train, n_eval)
        train, ev = d["train"], d["eval"]
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if len(train) < n_train:
        print(f"note: {task} has only {len(train)} training records", file=sys.stderr)
    return [encode(tok, r, eos) for r in train], [encode(tok, r, eos) for r in ev]


# --------------------------------------------------- split model (bottom / top)
@torch.no_grad()
def lower_states(full: FusedLlama, items, n_lower: int, batch: int = 16):
    """Each item's hidden state [T_i, d] entering layer ``n_lower`` (base model, fp32)."""
    a = full.arch
    order = sorted(range(len(items)), key=lambda i: len(items[i]["ids"]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        T = max(len(items[i]["ids"]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        valid = torch.zeros(len(idx), T, dtype=torch.bool)
        for r, i in enumerate(idx):
            n = len(items[i]["ids"])
            ids[r, :n] = torch.tensor(items[i]["ids"])
            valid[r, :n] = True
        B = len(idx)
        pos = torch.arange(T).expand(B, T)
        mask = additive_mask(slot_mask(valid), full.dtype)  # as run_layers passes it
        cos, sin = rope_cos_sin(full.inv_freq, pos, full.dtype)
        h = F.embedding(ids, full.embed).reshape(B * T, a.hidden_size)
        for i in range(n_lower):
            h, _ = full._layer(full.layers[i], i, h, None, B, T, cos, sin, mask, None)
        h = h.view(B, T, -1)
        for r, i in enumerate(idx):
            items[i]["h"] = h[r, :len(items[i]["ids"])].clone()


def cached_states(path, items, compute) -> bool:
    """Fill each item's ``h`` from ``path`` when it holds the states of exactly
    these token ids, else ``compute(items)`` and save them there (atomically).
    Returns whether the cache was used."""
    ids = [it["ids"] for it in items]
    if path is not None and Path(path).exists():
        saved = torch.load(path)
        if saved["ids"] == ids:
            for it, h in zip(items, saved["h"]):
                it["h"] = h
            return True
    compute(items)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp{os.getpid()}")
        torch.save({"ids": ids, "h": [it["h"] for it in items]}, tmp)
        os.replace(tmp, path)
    return False


def top_state_dict(sd: dict, arch, k: int) -> tuple:
    """(arch, sd) of a Llama made of the top k layers of ``sd`` (renumbered from 0)."""
    L = arch.num_hidden_layers
    out = {n: t for n, t in sd.items() if not n.startswith("model.layers.")}
    for n, t in sd.items():
        if n.startswith("model.layers."):
            i = int(n.split(".")[2])
            if i >= L - k:
                out[n.replace(f"model.layers.{i}.", f"model.layers.{i - (L - k)}.", 1)] = t
    return dataclasses.replace(arch, num_hidden_layers=k), out


def top_forward(model: FusedLlama, batch_items, want_logits_at):
    """Logits [N, V] at the selected positions of a right-padded batch of cached states.

    ``want_logits_at``: bool [B, T] (positions whose next token carries loss)."""
    a = model.arch
    B = len(batch_items)
    T = max(len(it["ids"]) for it in batch_items)
    h = torch.zeros(B, T, a.hidden_size)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for r, it in enumerate(batch_items):
        n = len(it["ids"])
        h[r, :n] = it["h"]
        valid[r, :n] = True
    pos = torch.arange(T).expand(B, T)
    mask = additive_mask(slot_mask(valid), model.dtype)  # as run_layers passes it
    cos, sin = rope_cos_sin(model.inv_freq, pos, model.dtype)
    h = h.reshape(B * T, -1)
    carry = initial_carry(model.adapter_config, B * T, model.dtype, h.device)
    for i, layer in enumerate(model.layers):
        h, carry = model._layer(layer, i, h, carry, B, T, cos, sin, mask, None)
    sel = want_logits_at.reshape(-1)
    n = rms_norm(h[sel], model.final_norm, a.rms_norm_eps)
    return model.head(n, None if carry is None else carry[sel])


def targets_of(batch_items):
    """(bool [B, T] positions predicting a completion token, targets [N])."""
    B = len(batch_items)
    T = max(len(it["ids"]) for it in batch_items)
    want = torch.zeros(B, T, dtype=torch.bool)
    tgt = []
    for r, it in enumerate(batch_items):
        n, p = len(it["ids"]), it["n_prompt"]
        want[r, p - 1:n - 1] = True
        tgt.append(torch.tensor(it["ids"][p:]))
    return want, torch.cat(tgt)


@torch.no_grad()
def eval_top(model, items, batch: int = 32) -> dict:
    """Token-weighted eval loss and teacher-forced exact match (= greedy reproduces it)."""
    model.eval()
    loss = toks = hits = 0.0
    for s in range(0, len(items), batch):
        b = items[s:s + batch]
        want, tgt = targets_of(b)
        logits = top_forward(model, b, want).float()
        loss += float(F.cross_entropy(logits, tgt, reduction="sum"))
        toks += len(tgt)
        ok = logits.argmax(-1) == tgt
        o = 0
        for it in b:
            m = len(it["ids"]) - it["n_prompt"]
            hits += bool(ok[o:o + m].all())
            o += m
    model.train()
    return {"loss": loss / toks, "exact_match": hits / len(items)}


def train_top(model, items, steps, batch, lr, seed) -> float:
    """AdamW on the adapter, warmup 10% + cosine, grad-norm clip 1.0; the same
    example order for every variant of a seed. Returns the last-10-step mean loss."""
    cfg = TrainConfig(lr=lr, max_steps=steps, warmup_steps=max(1, steps // 10))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order = []
    while len(order) < steps * batch:
        o = list(range(len(items)))
        rng.shuffle(o)
        order += o
    model.train()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step, steps)
        b = [items[i] for i in order[step * batch:(step + 1) * batch]]
        want, tgt = targets_of(b)
        loss = F.cross_entropy(top_forward(model, b, want).float(), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not math.isfinite(loss.item()):
            return float("nan")
        losses.append(loss.item())
    return statistics.fmean(losses[-10:])


def full_adapter_sd(top: FusedLlama, n_lower: int) -> dict:
    out = {}
    for k, t in top.adapter_state_dict().items():
        if k.startswith("layers."):
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.", f"layers.{i + n_lower}.", 1)
        out[k] = t
    return out


@torch.no_grad()
def generate_rouge(full: FusedLlama, tok, items, eos, max_new: int = 24, batch: int = 16) -> dict:
    """Greedy generation on the full model: mean ROUGE-L F1 and exact-match rate."""
    scores, em = [], 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    for s in range(0, len(items), batch):
        b = items[s:s + batch]
        P = max(it["n_prompt"] for it in b)
        ids = torch.full((len(b), P), pad, dtype=torch.long)
        mask = torch.zeros(len(b), P, dtype=torch.long)
        for r, it in enumerate(b):  # left-padded prompts
            p = it["ids"][:it["n_prompt"]]
            ids[r, P - len(p):] = torch.tensor(p)
            mask[r, P - len(p):] = 1
        out = full.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos)
        for r, it in enumerate(b):
            pred = tok.decode(out[r, P:], skip_special_tokens=True).strip()
            ref = it["rec"]["completion"]
            scores.append(rt.rouge_l(pred, ref))
            em += pred == ref
    return {"rouge_l": 100 * statistics.fmean(scores), "gen_exact_match": em / len(items)}


# ------------------------------------------------------------- budgets
def matched_rank(variant, budget, arch, targets="all", max_rank=512):
    best = None
    for r in range(1, max_rank + 1):
        try:
            n = count_parameters(AdapterConfig(variant, r, 2.0 * r, targets=targets), arch)
        except ValueError:
            continue
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (r, n)
        if n > 2 * budget:
            break
    return best


def check_split_exact(full_sd, arch, items, k, variant="zflora"):
    """Top-k on cached states == full model with the adapter on layers [L-k, L)."""
    L = arch.num_hidden_layers
    cfg_top = AdapterConfig(variant, 4, 8.0)
    ta, tsd = top_state_dict(full_sd, arch, k)
    torch.manual_seed(0)
    top = FusedLlama(ta, tsd, cfg_top, torch.float32)
    with torch.no_grad():
        # B = 0 at init would hide a wiring error; smaller with more layers, whose
        # perturbed adapters compound (0.05 on all 30 layers overflows to nan)
        for p in top.parameters():
            p.add_(0.05 * min(1.0, 2.0 / k) * torch.randn_like(p))
    cfg_full = AdapterConfig(variant, 4, 8.0, layers=list(range(L - k, L)))
    full = FusedLlama(arch, full_sd, cfg_full, torch.float32)
    full._load_adapter_tensors(full_adapter_sd(top, L - k))
    b = items[:2]
    want, _ = targets_of(b)
    with torch.no_grad():
        got = top_forward(top.eval(), b, want)
        ref = []
        for r, it in enumerate(b):
            lg = full.eval()(torch.tensor([it["ids"]])).logits[0]
            ref.append(lg[want[r, :len(it["ids"])]])
        ref = torch.cat(ref)
    err = float((got - ref).abs().max() / ref.abs().max())
    if not err <= 1e-4:  # nan (a non-finite forward) fails too
        raise AssertionError(f"split model disagrees with the full model ({variant}): rel err {err:.2e}")
    return err


# ---------------------------------------------------------------- main
def run(args) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    path = smollm2_path()
    tok = load_tokenizer(path)
    arch, sd = load_gguf(path)
    L, k = arch.num_hidden_layers, args.top_layers
    eos = arch.eos_token_id
    full_base = FusedLlama(arch, sd, None)
    ta, tsd = top_state_dict(sd, arch, k)
    budget = count_parameters(AdapterConfig("lora", args.ref_rank, 2.0 * args.ref_rank), ta)
    variants = args.variants
    ranks = {}
    ar, tg = args.alpha_ratio, args.targets
    for v in variants:
        if args.rank:
            ranks[v] = args.rank
        elif v in ("lora", "pf-lora") and tg == "all":
            ranks[v] = args.ref_rank
        else:
            ranks[v] = matched_rank(v, budget, ta, tg)[0]
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              "torch": torch.__version__, "command": "python bench/learning.py real " + " ".join(args.argv),
              "args": {k_: v_ for k_, v_ in vars(args).items() if k_ != "argv"}, "model": os.path.basename(path),
              "layers": L, "budget": budget, "ranks": ranks,
              "trainable": {v: count_parameters(AdapterConfig(v, ranks[v], ar * ranks[v], targets=tg), ta)
                            for v in variants},
              "base": {}, "runs": [], "split_check": {}, "seconds": 0.0}

    def save():
        result["seconds"] = time.perf_counter() - t0
        atomic_write_json(out_json, result)

    data = {}
    for task in args.tasks:
        train_items, eval_items = build_task(task, tok, eos, args.n_train or args.steps * args.batch_size,
                                             args.n_eval)
        tc = time.perf_counter()
        cache = (Path(args.state_cache) / f"{Path(path).stem}-{task}-layer{L - k}.pt") if args.state_cache else None
        hit = cached_states(cache, train_items + eval_items, lambda its: lower_states(full_base, its, L - k))
        print(f"[{task}] {'loaded' if hit else 'cached'} layer-{L - k} states of {len(train_items) + len(eval_items)} "
              f"examples ({sum(len(x['ids']) for x in train_items + eval_items)} tokens) in "
              f"{time.perf_counter() - tc:.0f}s", flush=True)
        if task == args.tasks[0]:
            for v in ("zflora", "ffba-ab"):
                result["split_check"][v] = check_split_exact(sd, arch, eval_items, k, v)
        base = eval_top(FusedLlama(ta, tsd, None), eval_items)
        if task == "mansum" and args.n_gen:
            base.update(generate_rouge(full_base, tok, eval_items[:args.n_gen], eos))
        result["base"][task] = base
        result.setdefault("data", {})[task] = {"train": len(train_items), "eval": len(eval_items)}
        print(f"[{task}] base: {base}", flush=True)
        data[task] = (train_items, eval_items)
        save()
    # variants in the given (priority) order, each on every task, so a cut-short run covers both tasks
    for v in variants:
        for task in args.tasks:
            train_items, eval_items = data[task]
            r = ranks[v]
            best = None
            seeds = list(range(args.first_seed, args.first_seed + args.seeds))
            for seed in seeds:
                sweep = args.sweep_every_seed or seed == seeds[0]
                lrs = args.lrs if sweep else [best["lr"]]
                for lr in lrs:
                    torch.manual_seed(seed)
                    model = FusedLlama(ta, tsd, AdapterConfig(v, r, ar * r, targets=tg), torch.float32)
                    ts = time.perf_counter()
                    tl = train_top(model, train_items, args.steps, args.batch_size, lr, seed)
                    ev = eval_top(model, eval_items) if math.isfinite(tl) else {"loss": float("nan"),
                                                                                 "exact_match": 0.0}
                    rec = {"task": task, "variant": v, "rank": r, "seed": seed, "lr": lr, "train_loss": tl,
                           "eval_loss": ev["loss"], "exact_match": ev["exact_match"],
                           "seconds": time.perf_counter() - ts, "picked": not sweep}
                    result["runs"].append(rec)
                    print(f"[{task}] {v} r={r} seed {seed} lr {lr:g}: train {tl:.3f} eval {ev['loss']:.3f} "
                          f"EM {100 * ev['exact_match']:.1f}% ({rec['seconds']:.0f}s)", flush=True)
                    if seed == seeds[0] and math.isfinite(ev["loss"]) and (best is None or ev["loss"] < best[0]["eval_loss"]):
                        best = (rec, model)
                    if (not sweep or args.sweep_every_seed) and task == "mansum" and args.n_gen \
                            and math.isfinite(ev["loss"]):
                        rec.update(_gen(model, sd, arch, k, v, r, tok, eval_items, eos, args))
                    save()
                if seed == seeds[0] and not args.sweep_every_seed:
                    if best is None:
                        break
                    best, m = best
                    best["picked"] = True
                    if task == "mansum" and args.n_gen:
                        best.update(_gen(m, sd, arch, k, v, r, tok, eval_items, eos, args))
                        print(f"[{task}] {v} ROUGE-L {best['rouge_l']:.1f}", flush=True)
                    save()
    save()
    return result


def _gen(top, sd, arch, k, v, r, tok, eval_items, eos, args) -> dict:
    L = arch.num_hidden_layers
    full = FusedLlama(arch, sd, AdapterConfig(v, r, args.alpha_ratio * r, targets=args.targets,
                                              layers=list(range(L - k, L))), torch.float32)
    full._load_adapter_tensors(full_adapter_sd(top, L - k))
    return generate_rouge(full, tok, eval_items[:args.n_gen], eos)


def _ms(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), 0.0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pick(runs, variant) -> list:
    """The runs of ``variant`` at its picked lr: among the lrs run on the most
    seeds, the one with the lowest mean eval loss (a diverged run counts as inf)."""
    by_lr = {}
    for r in runs:
        if r["variant"] == variant:
            by_lr.setdefault(r["lr"], []).append(r)
    if not by_lr:
        return []
    most = max(len(rs) for rs in by_lr.values())

    def mean_loss(rs):
        xs = [r["eval_loss"] for r in rs]
        return statistics.fmean(xs) if all(math.isfinite(x) for x in xs) else math.inf

    return min((rs for rs in by_lr.values() if len(rs) == most), key=mean_loss)


def markdown(result) -> str:
    a = result["args"]
    lines = [
        "## Learning on a real model (SmolLM2-135M-Instruct, real text)",
        "",
        f"- date: {result['date']}; machine: {result['machine']}; torch {result['torch']}",
        f"- command: `{result['command']}` ({result['seconds'] / 60:.1f} min wall"
        + (f" for the longest, {result['seconds_total'] / 60:.1f} min for all" if "seconds_total" in result else "")
        + ")",
        f"- model: {result['model']} (dequantized to fp32); adapters on the top {a['top_layers']} of "
        f"{result['layers']} layers (+ the LM head's reader for the zflora forms); the frozen lower layers' "
        f"states are cached (exact: split vs full model max rel. error "
        + ", ".join(f"{v} {e:.1e}" for v, e in result["split_check"].items()) + ")",
        f"- fine-tuning: {a['steps']} steps x batch {a['batch_size']} (the same examples in the same order for "
        f"every variant of a seed; distinct train/eval examples: "
        + ", ".join(f"{t} {d['train']}/{d['eval']}" for t, d in result.get("data", {}).items()) + "), AdamW, 10% warmup + cosine, "
        f"grad clip 1.0, alpha = {a.get('alpha_ratio', 2.0):g} x rank; lr(s) {a['lrs']}, seeds "
        f"{sorted({r['seed'] for r in result['runs']})}; per variant and task the lr with the lowest mean eval "
        "loss among the lrs run on the most seeds is picked",
        f"- budget: LoRA r={a['ref_rank']} on all 7 projections of the adapted layers = {result['budget']:,} "
        f"trainable parameters; "
        + (f"every variant at rank {a['rank']}" if a.get("rank") else "every other variant at the rank whose count "
           "is closest") + ("" if a.get("targets", "all") == "all" else f"; targets {','.join(a['targets'])} only"),
        "- tasks: " + "; ".join(f"`{t}` = {rt.TASK_KIND[t]}" for t in a["tasks"])
        + f"; eval {a['n_eval']} held-out examples (ROUGE-L by greedy generation on the first {a['n_gen']}); "
        "EM = teacher-forced exact match of the whole completion + EOS (= greedy reproduces it)",
        "",
    ]
    for task in a["tasks"]:
        runs = [r for r in result["runs"] if r["task"] == task]
        if task not in result["base"]:
            continue
        gen = task == "mansum"
        lines += [f"### {task}", "",
                  "| variant | rank | trainable | vs budget | lr | eval loss | EM % |" + (" ROUGE-L |" if gen else "")
                  + " seeds |", "|---" * (8 + gen) + "|"]
        b = result["base"][task]
        lines.append(f"| base (no fine-tuning) | - | 0 | - | - | {b['loss']:.3f} | {100 * b['exact_match']:.1f} |"
                     + (f" {b.get('rouge_l', float('nan')):.1f} |" if gen else "") + " - |")
        for v in result["args"]["variants"]:
            picked = pick(runs, v)
            if not picked:
                continue
            n = result["trainable"][v]
            lm, ls = _ms([r["eval_loss"] for r in picked])
            em, es = _ms([100 * r["exact_match"] for r in picked])
            row = (f"| {v} | {picked[0]['rank']} | {n:,} | {n / result['budget']:.3f} | {picked[0]['lr']:g} | "
                   f"{lm:.3f} ± {ls:.3f} | {em:.1f} ± {es:.1f} |")
            if gen:
                g = [r["rouge_l"] for r in picked if "rouge_l" in r]
                gm, gs = _ms(g)
                row += f" {gm:.1f} ± {gs:.1f}" + (f" (n={len(g)})" if len(g) != len(picked) else "") + " |"
            lines.append(row + f" {len(picked)} |")
        lrs = sorted(result["args"]["lrs"])
        lines += ["", f"lr sweep ({task}; eval loss mean ± sd over seeds / EM % mean, [n seeds]):", "",
                  "| variant | " + " | ".join(f"lr {x:g}" for x in lrs) + " |", "|---" * (1 + len(lrs)) + "|"]
        for v in result["args"]["variants"]:
            cells = []
            for x in lrs:
                rs = [r for r in runs if r["variant"] == v and r["lr"] == x]
                lm, ls = _ms([r["eval_loss"] for r in rs])
                em, _ = _ms([100 * r["exact_match"] for r in rs])
                bad = sum(not math.isfinite(r["eval_loss"]) for r in rs)
                if not rs:
                    cells.append("-")
                elif bad == len(rs):
                    cells.append(f"diverged [{len(rs)}]")
                else:  # the mean is over the finite runs; say how many diverged
                    cells.append(f"{lm:.3f} ± {ls:.3f} / {em:.0f} [{len(rs)}"
                                 + (f", {bad} diverged]" if bad else "]"))
            if any(c != "-" for c in cells):
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Mean ± sample standard deviation over the seeds run at the picked lr.", ""]
    return "\n".join(lines)


def merge(results: list) -> dict:
    """One result from runs made with the same settings in separate processes
    (e.g. different variants or tasks in parallel)."""
    out = results[0]
    for r in results[1:]:
        same = ("top_layers", "steps", "batch_size", "ref_rank", "n_train", "n_eval", "n_gen", "alpha_ratio",
                "targets", "rank")
        if any(r["args"].get(k, DEFAULTS.get(k)) != out["args"].get(k, DEFAULTS.get(k)) for k in same):
            raise ValueError("can only merge runs made with the same settings")
        out["runs"] += r["runs"]
        for k in ("base", "ranks", "trainable", "split_check", "data"):
            out[k] = {**r.get(k, {}), **out.get(k, {})}
        for k in ("variants", "tasks", "lrs"):
            out["args"][k] += [x for x in r["args"][k] if x not in out["args"][k]]
        out["command"] += f"` and `{r['command']}"
        out["seconds_total"] = out.get("seconds_total", out["seconds"]) + r["seconds"]
        out["seconds"] = max(out["seconds"], r["seconds"])
    return out


DEFAULTS = {"alpha_ratio": 2.0, "targets": "all", "rank": None}  # for results saved before these options


def write_results(md: str, path: Path):
    from learning import write_results as write_section
    write_section(md, path, BEGIN, END)


def main(argv=None):
    import argparse
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="bench/learning.py real", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-layers", type=int, default=4, help="adapt only the top k decoder layers")
    p.add_argument("--ref-rank", type=int, default=8, help="LoRA rank that sets the parameter budget")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="lr sweep (on the first seed; see --sweep-every-seed)")
    p.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--sweep-every-seed", action="store_true",
                   help="run every lr on every seed (default: the sweep on the first seed, its best lr on the rest)")
    p.add_argument("--alpha-ratio", type=float, default=2.0, help="alpha = ratio x rank (scale s = ratio)")
    p.add_argument("--targets", default="all", help="adapted projections, comma-separated (default all)")
    p.add_argument("--rank", type=int, default=None, help="this rank for every variant (default: matched budget)")
    p.add_argument("--n-train", type=int, default=None,
                   help="distinct training examples (default steps x batch: every example seen once)")
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--n-gen", type=int, default=32, help="eval examples scored by generation (ROUGE-L)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--state-cache", default=None, metavar="DIR",
                   help="keep the frozen lower layers' states here and reuse them when the examples match")
    p.add_argument("--json", default=str(HERE / "out" / "learning-real.json"))
    p.add_argument("--results", default=None, help="markdown file whose real-model section is replaced")
    p.add_argument("--render", default=None, metavar="JSON[,JSON...]",
                   help="only re-render saved results (several: runs of the same settings merged)")
    args = p.parse_args(argv)
    if args.render:
        result = merge([json.loads(Path(f).read_text()) for f in args.render.split(",")])
    else:
        args.tasks = [t for t in args.tasks.split(",") if t]
        args.variants = [v for v in args.variants.split(",") if v]
        args.lrs = [float(x) for x in args.lrs.split(",") if x]
        args.targets = "all" if args.targets == "all" else [t for t in args.targets.split(",") if t]
        bad = [t for t in args.tasks if t not in TASKS]
        if bad:
            p.error(f"unknown task(s) {bad}; choose from {TASKS}")
        args.argv = argv
        result = run(args)
    md = markdown(result)
    if args.results:
        write_results(md, Path(args.results))
    print(md)
    return result


if __name__ == "__main__":
    main()
