#!/usr/bin/env python
"""Training-step throughput: flora adapters against PEFT LoRA on transformers.

    python bench/train_step.py                                   # CUDA: 1B shape, batch 8 x 512, r = 32
    python bench/train_step.py --model 3b --rows peft-lora ffba  # other shape / rows
    python bench/train_step.py --device cpu --quick              # smoke run (tiny shape, numbers not meaningful)

Every row starts from the same random base weights (built once, on the CPU,
by flora.bench.latency from the shape table there; or a local checkpoint
directory), and the same random batch:

* ``peft-lora``: transformers LlamaForCausalLM + PEFT ``LoraConfig(r,
  lora_alpha=2r, q/k/v/o/gate/up/down, dropout 0)`` (flora.bench.latency.wrap_peft:
  random non-zero A and B, PEFT's default fp32 adapter upcast);
* ``lora``, ``ffba``, ``zflora`` (any flora variant): ``FusedLlama`` with that
  adapter at rank r on every layer, its adapter tensors made random and
  non-zero as the latency benchmark does (flora.bench.latency.randomize_adapter).

One training step is what flora's trainer (flora/train.py) does per optimizer
step with one micro-batch: forward on ``input_ids`` [B, T] with an all-ones
``attention_mask`` and ``labels = input_ids`` (the model's own causal-LM loss),
``loss.float().backward()``, gradient clipping at ``--max-grad-norm``
(flora.train's default 1.0), ``AdamW`` over the trainable (adapter) parameters
only (flora.train's default lr / weight decay), ``zero_grad(set_to_none=True)``.

Precision (the same for every row): ``--dtype bf16`` (the CUDA default) = base
weights in bf16, adapter parameters in fp32, forward under
``torch.autocast(bf16)`` (flora.train's autocast); ``--dtype fp32`` (the CPU
default) = everything fp32, no autocast.

Timing: ``--warmup`` untimed steps, then ``--steps`` timed ones (CUDA events
on GPU, perf_counter on CPU: flora.bench.timing.Timer); ms/step is the
median, tokens/s = B * T / median. Peak memory is ``max_memory_allocated``
on CUDA, the process's peak resident set on the host (flora.bench.memory),
over the timed steps (reset after the warm-up, so it includes the model,
gradients and AdamW state; on the host also whatever else the process holds,
the base model the rows are built from included: compare rows, not absolutes).
A flora row named ``VARIANT+full-logits`` trains with ``chunked_loss = False``
(the full [tokens, vocab] logits, as transformers computes them), so the
chunked loss's saving is measured in the same run. Each row is written to the
JSON as soon as it is measured; a row that fails (out of memory, an error)
records ``error`` and the run goes on. The markdown table prints last.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from flora.bench.latency import (DTYPES, SHAPES, base_llama, check_checkpoint, free_memory, model_config,
                                 param_count, randomize_adapter, wrap_peft)
from flora.bench.memory import peak_bytes, reset_peak
from flora.bench.report import environment
from flora.bench.timing import Timer
from flora.config import VARIANTS, AdapterConfig
from flora.devices import resolve_device
from flora.fileio import atomic_write_json
from flora.model import FusedLlama
from flora.train import TrainConfig, autocast_factory, optimizer_step

PEFT_ROW = "peft-lora"
DEFAULT_ROWS = (PEFT_ROW, "lora", "ffba", "zflora")
FULL_LOGITS = "+full-logits"  # row suffix: that variant with FusedLlama.chunked_loss = False
ALL_ROWS = (PEFT_ROW,) + tuple(VARIANTS) + tuple(v + FULL_LOGITS for v in VARIANTS)
TRAIN_DEFAULTS = TrainConfig()


# --------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/train_step.py",
                                description="tokens/s and peak memory of one training step: flora adapters vs "
                                            "PEFT LoRA on transformers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--model", default=None, metavar="SHAPE|DIR",
                   help=f"a shape with random weights ({', '.join(SHAPES)}) or a local checkpoint directory "
                        f"(default: 1b on CUDA, small on CPU; tiny with --quick)")
    p.add_argument("--batch", type=int, default=None, help="batch size B (default 8; 2 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="sequence length T (default 512; 64 with --quick)")
    p.add_argument("--rank", type=int, default=32, help="adapter rank r (default 32)")
    p.add_argument("--alpha", type=float, default=None, help="adapter alpha (default 2r)")
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help=f"rows, in order (default: {' '.join(DEFAULT_ROWS)}); {PEFT_ROW} or any flora variant, "
                        f"which {FULL_LOGITS} turns to the full-logits loss")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="bf16: base bf16 + fp32 adapters + bf16 autocast (CUDA default); fp32: all fp32, "
                        "no autocast (CPU default)")
    p.add_argument("--max-grad-norm", type=float, default=TRAIN_DEFAULTS.max_grad_norm,
                   help=f"gradient clipping as flora.train (default {TRAIN_DEFAULTS.max_grad_norm}; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="where the rows go, rewritten after each row (default bench/out/train_step-<date>.json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny shape, B=2, T=64, 2 steps after 1 warm-up (numbers not meaningful)")
    return p


def make_settings(args) -> dict:
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    q = args.quick
    s = {"device": dev,
         "model": args.model or ("tiny" if q else "1b" if gpu else "small"),
         "batch": args.batch if args.batch is not None else (2 if q else 8),
         "seq": args.seq if args.seq is not None else (64 if q else 512),
         "rank": args.rank, "alpha": args.alpha if args.alpha is not None else 2.0 * args.rank,
         "rows": list(args.rows or DEFAULT_ROWS),
         "steps": args.steps if args.steps is not None else (2 if q else 10),
         "warmup": args.warmup if args.warmup is not None else (1 if q else 3),
         "dtype": args.dtype or ("bf16" if gpu else "fp32"),
         "max_grad_norm": args.max_grad_norm or None, "seed": args.seed,
         "lr": TRAIN_DEFAULTS.lr, "weight_decay": TRAIN_DEFAULTS.weight_decay}
    bad = [r for r in s["rows"] if r not in ALL_ROWS]
    if bad:
        raise ValueError(f"--rows: unknown {bad}; choose {PEFT_ROW} or a flora variant ({', '.join(VARIANTS)}), "
                         f"optionally with {FULL_LOGITS}")
    if len(set(s["rows"])) != len(s["rows"]):
        raise ValueError(f"--rows: a row is named twice: {s['rows']}")
    if s["batch"] < 1 or s["seq"] < 2:
        raise ValueError(f"--batch must be >= 1 and --seq >= 2, got {s['batch']} and {s['seq']}")
    if s["rank"] < 1 or s["steps"] < 1 or s["warmup"] < 0:
        raise ValueError("--rank and --steps must be >= 1, --warmup >= 0")
    if s["model"] not in SHAPES:
        model_config(s["model"])  # a checkpoint directory, or a clear error
        check_checkpoint(s["model"])
    s["base_dtype"] = DTYPES[s["dtype"]]
    s["adapter_dtype"] = torch.float32
    s["autocast"] = s["dtype"] == "bf16"
    return s


def precision_text(s: dict) -> str:
    if s["autocast"]:
        return f"base bf16, adapters fp32, torch.autocast({s['device'].type}, bf16)"
    return "base fp32, adapters fp32, no autocast"


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
def base_model(s: dict):
    """(transformers model on the CPU in the base dtype, its config, label): the
    weights every row starts from (kept on the CPU, so a row's peak memory on
    the GPU counts that row's model only)."""
    cfg, label = model_config(s["model"])
    return base_llama(s["model"], cfg, s["base_dtype"], torch.device("cpu"), s["seed"]), cfg, label


def build_peft_row(hf, s: dict):
    """transformers + PEFT LoRA on a copy of the base, on the device."""
    pm, _ = wrap_peft(copy.deepcopy(hf), s["rank"], s["alpha"], True, s["seed"] + 2)
    return pm.to(s["device"])


def build_flora_row(hf, variant: str, s: dict):
    """FusedLlama with a fresh ``variant`` adapter (fp32 tensors), made random."""
    cfg = AdapterConfig(variant, rank=s["rank"], alpha=s["alpha"])
    torch.manual_seed(s["seed"] + 1)
    m = FusedLlama.from_pretrained(hf, adapter=cfg, dtype=s["base_dtype"], device=s["device"],
                                   adapter_dtype=s["adapter_dtype"])
    randomize_adapter(m, s["seed"] + 1)
    return m


def build_row(name: str, hf, s: dict):
    if name == PEFT_ROW:
        return build_peft_row(hf, s)
    m = build_flora_row(hf, name.removesuffix(FULL_LOGITS), s)
    m.chunked_loss = not name.endswith(FULL_LOGITS)
    return m


# --------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------
def train_step(model, opt, params, ids, mask, autocast, max_grad_norm: Optional[float], hf: bool):
    """One optimizer step as flora.train takes it (one micro-batch); returns the loss (detached)."""
    extra = {"use_cache": False} if hf else {}  # transformers would build a KV cache otherwise
    with autocast():
        out = model(input_ids=ids, attention_mask=mask, labels=ids, **extra)
    out.loss.float().backward()
    optimizer_step(opt, params, max_grad_norm)
    return out.loss.detach()


def measure_row(name: str, hf, ids, s: dict) -> dict:
    """Build the row's model, train it ``warmup + steps`` steps; its timing,
    peak memory, and whether every trainable tensor changed."""
    dev = s["device"]
    model = build_row(name, hf, s)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise RuntimeError(f"{name}: the model has no trainable parameters")
    params = [p for _, p in named]
    before = [p.detach().to("cpu", copy=True) for p in params]
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    autocast = autocast_factory(TrainConfig(bf16=s["autocast"]), dev)
    mask = torch.ones_like(ids)
    is_hf = name == PEFT_ROW

    def step():
        return train_step(model, opt, params, ids, mask, autocast, s["max_grad_norm"], is_hf)

    losses = [step() for _ in range(s["warmup"])]
    reset_peak(dev)
    timer, marks = Timer(dev), []
    for _ in range(s["steps"]):
        a = timer.mark()
        losses.append(step())
        marks.append((a, timer.mark()))
    times = [timer.elapsed(a, b) for a, b in marks]
    peak = peak_bytes(dev) / 2**30
    changed = [not torch.equal(b, p.detach().cpu()) for b, p in zip(before, params)]
    loss = [float(x) for x in losses]
    med = statistics.median(times)
    tokens = ids.numel()
    return {"row": name, "engine": "peft" if is_hf else "flora",
            "variant": "lora" if is_hf else name.removesuffix(FULL_LOGITS),
            "rank": s["rank"], "trainable_params": sum(p.numel() for p in params),
            "trainable_tensors": len(params), "adapter_dtype": sorted({str(p.dtype).replace("torch.", "")
                                                                       for p in params}),
            "changed": all(changed), "changed_tensors": sum(changed),
            "step_s": med, "step_s_runs": times, "ms_per_step": med * 1e3, "tokens_per_s": tokens / med,
            "peak_gib": peak, "loss_first": _finite(loss[0]), "loss_last": _finite(loss[-1])}


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def add_ratios(rows: list) -> list:
    ref = next((r for r in rows if r["row"] == PEFT_ROW and "error" not in r), None)
    for r in rows:
        if "error" not in r:
            r["ratio_to_peft"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    return rows


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------
def run(s: dict, path: Path, command: str, log=print) -> dict:
    dev = s["device"]
    doc = {"benchmark": "train_step", "command": command, "environment": environment(dev),
           "device_type": dev.type,
           "settings": {"model": s["model"], "batch": s["batch"], "seq": s["seq"], "rank": s["rank"],
                        "alpha": s["alpha"], "steps": s["steps"], "warmup": s["warmup"], "dtype": s["dtype"],
                        "base_dtype": str(s["base_dtype"]).replace("torch.", ""),
                        "adapter_dtype": str(s["adapter_dtype"]).replace("torch.", ""),
                        "autocast": "bfloat16" if s["autocast"] else None, "precision": precision_text(s),
                        "optimizer": f"AdamW(lr={s['lr']}, weight_decay={s['weight_decay']})",
                        "max_grad_norm": s["max_grad_norm"], "seed": s["seed"]},
           "partial": True, "rows": []}
    rows = doc["rows"]

    def write():
        add_ratios(rows)
        atomic_write_json(path, doc)

    log(f"building the base model ({s['model']}, {s['dtype']}) on the CPU ...")
    hf, cfg, label = base_model(s)
    doc["settings"].update(label=label, base_params=param_count(cfg))
    write()
    g = torch.Generator(device="cpu").manual_seed(s["seed"])
    ids = torch.randint(3, cfg.vocab_size, (s["batch"], s["seq"]), generator=g).to(dev)
    for name in s["rows"]:
        log(f"[{name}] ...")
        try:
            row = measure_row(name, hf, ids, s)
        except Exception as e:  # noqa: BLE001 - out of memory, an error: this row fails, the run goes on
            row = {"row": name, "error": _error(e)}
        free_memory(dev)  # the row's model (the failed one's too, with its traceback) is gone by now
        rows.append(row)
        write()
        log(f"[{name}] " + (f"error: {row['error']}" if "error" in row else
                            f"{row['ms_per_step']:.2f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
                            f"peak {_gib(row['peak_gib'])} GiB, {row['trainable_params']:,} trainable, "
                            f"changed {row['changed_tensors']}/{row['trainable_tensors']}"))
    del hf
    free_memory(dev)
    doc["partial"] = False
    doc["markdown"] = markdown(doc)
    write()
    return doc


def _gib(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def markdown(doc: dict) -> str:
    st, env = doc["settings"], doc["environment"]
    lines = [f"### Training step · {env['device']} · torch {env['torch']} · {st.get('label', st['model'])} · "
             f"B = {st['batch']}, T = {st['seq']}, r = {st['rank']} (alpha {st['alpha']:g}) · {st['precision']} · "
             f"{env['date']}", "",
             f"- command: `{doc['command']}`",
             f"- step: forward + causal-LM loss, backward, clip {st['max_grad_norm']}, {st['optimizer']} over "
             f"the adapter only, zero_grad; median of {st['steps']} steps after {st['warmup']} warm-up; "
             f"peak = {'max_memory_allocated' if doc['device_type'] == 'cuda' else 'the process peak resident set'} "
             f"over the timed steps", "",
             "| row | tokens/s | ms/step | × peft-lora | peak GiB | trainable params |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error']} | | | | |")
            continue
        ratio = "—" if r.get("ratio_to_peft") is None else f"{r['ratio_to_peft']:.3f}"
        lines.append(f"| {r['row']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | {ratio} | "
                     f"{_gib(r['peak_gib'])} | {r['trainable_params']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = ("python bench/train_step.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))).strip()
    err = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        s = make_settings(args)
    except ValueError as e:
        print(f"bench/train_step.py: error: {e}", file=sys.stderr)
        return 2
    path = Path(args.json or f"bench/out/train_step-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    err(f"rows are written to {path} as they are measured")
    doc = run(s, path, command, log=err)
    print(doc["markdown"])
    return 1 if all("error" in r for r in doc["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
