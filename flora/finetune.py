"""Fine-tune a flora adapter on a local Llama checkpoint: the logic behind
``flora train`` (and reused by ``flora demo`` and bench/learning.py).

    flora train --model DIR --data train.jsonl [--eval eval.jsonl] \\
        --variant ffba --rank 32 --alpha 64 --out OUT [--max-steps N | --epochs E] ...

Runs unchanged under ``torchrun --nproc-per-node N -m flora train ...`` (DDP;
gloo on CPU, NCCL on GPU). Writes ``OUT/adapter/`` (``adapter_config.json`` +
``adapter.safetensors``; load with ``FusedLlama.from_pretrained(DIR,
adapter=OUT/adapter)``), ``OUT/train_log.json``, and ``OUT/checkpoint/`` for
``--resume``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch

from .data import load_jsonl, load_tokenizer
from .devices import resolve_device
from .fileio import atomic_write_json
from .train import TrainConfig, dist_device, init_distributed, launch_rank, train


def load_model(model_dir, adapter, device=None, dtype=None, adapter_dtype=torch.float32):
    """FusedLlama from a local checkpoint with a fresh adapter (``AdapterConfig``)
    or a saved one (a directory); adapter tensors fp32 by default for training."""
    from . import FusedLlama

    return FusedLlama.from_pretrained(str(model_dir), adapter=adapter, dtype=dtype, device=device,
                                      adapter_dtype=adapter_dtype)


def finetune(model_dir, train_data, eval_data=None, adapter=None, config: TrainConfig = None,
             out_dir=None, resume: bool = False, device=None, dtype=None, model=None, tokenizer=None):
    """Fine-tunes an adapter; returns ``(model, tokenizer, TrainResult)``.

    ``train_data``/``eval_data``: a JSONL path or a list of records.
    ``adapter``: an ``AdapterConfig`` (fresh) or an adapter directory.
    With ``out_dir`` the adapter is saved to ``out_dir/adapter`` at the end (rank 0)."""
    if model is None and adapter is None:
        raise ValueError("finetune needs an adapter (an AdapterConfig or an adapter directory) or a model")
    rank, _, _ = init_distributed()
    if device is None:  # under torchrun: the backend's device (cuda:local_rank or the CPU)
        device = dist_device()
    tokenizer = tokenizer or load_tokenizer(model_dir)
    if isinstance(train_data, (str, os.PathLike)):
        train_data = load_jsonl(train_data)
    if isinstance(eval_data, (str, os.PathLike)):
        eval_data = load_jsonl(eval_data)
    if model is None:
        # seed before the fresh adapter is initialised: same seed -> same adapter
        seed = (config or TrainConfig()).seed
        torch.manual_seed(seed)
        random.seed(seed)
        model = load_model(model_dir, adapter, device=device, dtype=dtype)
    result = train(model, tokenizer, train_data, eval_data, config=config, out_dir=out_dir, resume=resume)
    if out_dir is not None and rank == 0:
        model.save_adapter(Path(out_dir) / "adapter")
        log = {"steps": result.steps, "final_train_loss": result.final_train_loss,
               "final_eval": result.final_eval, "tokens_per_s": result.tokens_per_s,
               "seconds": result.seconds, "history": result.history, "eval_history": result.eval_history,
               "best_eval": result.best_eval, "stopped_early": result.stopped_early}
        atomic_write_json(Path(out_dir) / "train_log.json", log, indent=1)
    return model, tokenizer, result


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = TrainConfig()
    p.add_argument("--model", required=True, help="local Llama checkpoint directory (with its tokenizer)")
    p.add_argument("--data", required=True, help='training JSONL: {"prompt","completion"}, {"text"} or {"messages"} per line')
    p.add_argument("--eval", default=None, help="evaluation JSONL (same format)")
    p.add_argument("--variant", default="ffba", help="adapter variant (see docs/variants.md)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=None, help="scale numerator (default 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default="all", help='"all", "mha" or a comma list of projections: q,k,v,o,gate,up,down,head '
                   '(or their module names, q_proj ... lm_head)')
    p.add_argument("--out", required=True, help="output directory (adapter, log, checkpoint)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=["cosine", "linear", "constant"])
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process and micro-step")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps (0: at the end only)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps (0: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="with --resume: accept a changed --lr, --lr-schedule, --warmup-steps or step count")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--save-best", action="store_true",
                   help="also keep the adapter of the lowest eval loss in OUT/best-adapter (needs --eval)")
    p.add_argument("--early-stop", type=int, default=0, metavar="N",
                   help="stop after N evaluations without a lower eval loss (needs --eval, --eval-every)")
    p.add_argument("--group-by-length", action="store_true",
                   help="batches of examples of similar length (less padding; the order stays seeded)")
    p.add_argument("--pack", action="store_true",
                   help="pack several examples into each row of up to --seq-len tokens (no padding), each "
                        "attending only within itself; --batch-size then counts rows")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on CUDA only)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true")
    return p


# what a run leaves in --out (finetune + train_state); .checkpoint-old survives a
# save killed between its two renames and is resumed from like checkpoint/
_RUN_FILES = ("adapter", "best-adapter", "checkpoint", ".checkpoint-old", "train_log.json")


def _run_files(out: Path) -> list[str]:
    """The names of a previous run's files in ``out`` (directories with a /)."""
    return [n + ("/" if (out / n).is_dir() else "") for n in _RUN_FILES if (out / n).exists()]


def _check_out(out: Path, resume: bool) -> bool:
    """Refuses an ``out`` whose run this command would replace; returns whether
    to resume (False: --resume found no checkpoint, so a new run starts)."""
    from .train_state import find_checkpoint

    held = _run_files(out) if out.is_dir() else []
    if not resume:
        if held:
            raise ValueError(f"--out {out} already holds a run ({', '.join(held)}); pass --resume to continue "
                             f"it, or another --out to start a new run")
        return False
    if find_checkpoint(out) is not None:
        return True
    if held:  # a finished run whose checkpoint was removed: retraining would replace its adapter
        raise ValueError(f"--out {out} holds {', '.join(held)} but no checkpoint to resume from; pass "
                         f"another --out to start a new run")
    if launch_rank() == 0:  # the process group is not up yet
        # a preemptible job passes --resume from its first launch: not an error
        print(f"flora train: no checkpoint in {out}; starting a new run", file=sys.stderr)
    return False


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, deepest first."""
    created, p = [], path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return created


def run_args(args) -> dict:
    from .config import AdapterConfig

    if args.pack and args.group_by_length:
        raise ValueError("--pack fills each row to --seq-len already: --group-by-length has nothing to group; "
                         "pass one of them")
    device = resolve_device(args.device, auto=False)
    out = Path(args.out)
    for p in (out, out / "adapter", out / "checkpoint"):  # fail now, not after training
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out: {p} exists and is not a directory")
    targets = args.targets if args.targets in ("all", "mha") else [t.strip() for t in args.targets.split(",")]
    adapter = AdapterConfig(args.variant, args.rank, args.alpha, dropout=args.dropout, targets=targets)
    cfg = TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, seq_len=args.seq_len, eval_every=args.eval_every,
                      save_every=args.save_every, grad_checkpointing=args.grad_checkpointing, seed=args.seed,
                      weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                      lr_schedule=args.lr_schedule, bf16={"auto": "auto", "on": True, "off": False}[args.bf16],
                      progress=not args.no_progress, allow_schedule_change=args.allow_schedule_change,
                      group_by_length=args.group_by_length, pack=args.pack, save_best=args.save_best,
                      early_stop=args.early_stop).validate()
    if (cfg.save_best or cfg.early_stop) and args.eval is None:  # before anything loads
        raise ValueError(f"{'--save-best' if cfg.save_best else '--early-stop'} needs --eval (it compares eval losses)")
    if cfg.early_stop and not cfg.eval_every:
        raise ValueError("--early-stop needs --eval-every (it counts evaluations during training)")
    # after the argument checks (a typo is named as such), before anything is loaded or written
    resume = _check_out(out, args.resume)
    created = _make_dirs(out)  # an unwritable --out fails here too
    try:
        model, _, result = finetune(args.model, args.data, args.eval, adapter=adapter, config=cfg,
                                    out_dir=args.out, resume=resume, device=device)
    except BaseException:
        # a run that failed (bad data, a missing model, Ctrl-C) before writing anything
        # leaves no empty --out behind; rmdir removes only what is still empty
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    rank, _, _ = init_distributed()
    summary = {"adapter": str(Path(args.out) / "adapter"), "steps": result.steps, "final_train_loss": result.final_train_loss,
               "final_eval": result.final_eval, "tokens_per_s": result.tokens_per_s,
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if rank == 0:
        print(json.dumps(summary))
    return summary
