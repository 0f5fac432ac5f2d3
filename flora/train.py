"""The training loop: AdamW on the trainable (adapter) parameters of any model
whose ``forward(input_ids, attention_mask, labels)`` returns ``.loss``
(``flora.FusedLlama``, or a transformers ``LlamaForCausalLM`` for full
fine-tuning and pretraining).

* Gradient accumulation; the loss is weighted by target tokens over the whole
  global batch, so 1 process x 2k accumulation steps and 2 processes x k give
  the same update (up to float summation order).
* torch.distributed: started by ``torchrun`` (gloo on CPU, NCCL on GPU), the
  model is wrapped in DDP and each rank takes its share of every global batch.
* bf16 autocast on CUDA (``bf16="auto"``), gradient checkpointing option.
* A tqdm bar with loss, tokens/s and ETA; periodic eval loss.
* Checkpoints every ``save_every`` steps, written atomically (temp dir +
  rename): trainable parameters, AdamW state, step, data position and RNG
  states, all as safetensors + JSON (no pickle). ``resume=True`` continues
  exactly where the last checkpoint left off.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import train_state as ckpt
from .data import (TokenizedDataset, collate, collate_packed, count_input_tokens, count_target_tokens, pack_rows,
                   pad_id_of)
from .evaluate import eval_stats, model_device


@dataclasses.dataclass
class TrainConfig:
    lr: float = 2e-4
    epochs: int = 1
    max_steps: Optional[int] = None  # overrides epochs when set
    batch_size: int = 8  # per process and micro-step
    grad_accum: int = 1
    seq_len: int = 512
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = only at the end (needs out_dir)
    eval_batch_size: int = 32
    grad_checkpointing: bool = False
    seed: int = 0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    max_grad_norm: Optional[float] = 1.0
    bf16: object = "auto"  # "auto": autocast bf16 on CUDA; True: also on CPU; False: never
    progress: bool = True
    desc: str = "train"
    allow_schedule_change: bool = False  # resume: let lr / lr_schedule / warmup_steps / total steps differ
    fsdp: bool = False  # under torchrun: shard adapters + optimizer state (FSDP2) instead of DDP
    # batches of similar lengths (less padding: see epoch_order); the order stays a function of seed
    group_by_length: bool = False
    save_best: bool = False  # keep the adapter of the lowest eval loss in out_dir/best-adapter
    early_stop: int = 0  # stop after this many evaluations without a lower eval loss (0: never)
    # rows of several examples up to seq_len tokens, each example attending only within itself
    # (data.pack_rows, packed once: the rows, not the examples, are shuffled each epoch)
    pack: bool = False

    def validate(self):
        for name in ("batch_size", "grad_accum", "seq_len", "epochs", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        for name in ("eval_every", "save_every", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"TrainConfig.max_steps must be a positive integer, got {self.max_steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"TrainConfig.lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        if not isinstance(self.group_by_length, bool):
            raise ValueError(f"TrainConfig.group_by_length must be True or False, got {self.group_by_length!r}")
        if not isinstance(self.pack, bool):
            raise ValueError(f"TrainConfig.pack must be True or False, got {self.pack!r}")
        if self.pack and self.group_by_length:
            raise ValueError("TrainConfig.pack fills rows to seq_len already: group_by_length has nothing "
                             "to group; set one of them")
        if not isinstance(self.save_best, bool):
            raise ValueError(f"TrainConfig.save_best must be True or False, got {self.save_best!r}")
        if isinstance(self.early_stop, bool) or not isinstance(self.early_stop, int) or self.early_stop < 0:
            raise ValueError(f"TrainConfig.early_stop must be an integer >= 0, got {self.early_stop!r}")
        if self.bf16 not in ("auto", True, False):
            raise ValueError(f"TrainConfig.bf16 must be 'auto', True or False, got {self.bf16!r}")
        return self

    def lr_at(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        frac = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        if self.lr_schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclasses.dataclass
class TrainResult:
    steps: int
    history: list  # per step: {"step", "loss", "lr", "tokens", "time"}
    eval_history: list  # {"step", "loss", "exact_match"}
    final_train_loss: float  # mean over the last (up to) 10 steps
    final_eval: Optional[dict]
    tokens_per_s: float
    seconds: float
    best_eval: Optional[dict] = None  # the evaluation of the lowest loss (its "step" included)
    stopped_early: bool = False


class Interrupted(Exception):
    """Raised by a callback to stop training (as a user's Ctrl-C would)."""


# --------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------
def dist_plan(local_rank: int, local_world: int, cuda_count: int, forced: Optional[str] = None):
    """(backend, device) for one process of a distributed launch.

    NCCL needs one GPU per local process: with at least as many GPUs as local
    processes, rank r gets NCCL on ``cuda:r``. Otherwise gloo, and every rank
    runs on the CPU: gloo could let ranks share ``cuda:0``, but then they
    compete for its memory and time with no gain over one process, so the
    CPU is the predictable choice (``torchrun --nproc-per-node 2`` on a
    one-GPU box is a CPU run of the distributed code path).
    ``forced`` (FLORA_DIST_BACKEND) = "gloo" keeps the CPU; "nccl" without
    one GPU per local process is an error, not a crash inside NCCL."""
    if forced:
        if forced not in ("gloo", "nccl"):
            raise ValueError(f"FLORA_DIST_BACKEND must be gloo or nccl, got {forced!r}")
        if forced == "nccl" and cuda_count < local_world:
            raise ValueError(
                f"FLORA_DIST_BACKEND=nccl needs one GPU per local process: {local_world} "
                f"processes but {cuda_count} GPU(s)")
    backend = forced or ("nccl" if 0 < local_world <= cuda_count else "gloo")
    if backend == "nccl":
        return backend, torch.device("cuda", local_rank)
    return backend, torch.device("cpu")


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), readable
    before the process group is up: who speaks for all ranks."""
    return int(os.environ.get("RANK", "0"))


def _dist_env():
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (int(os.environ.get("LOCAL_RANK", "0")), local_world, cuda_count,
            os.environ.get("FLORA_DIST_BACKEND") or None)


def dist_backend() -> str:
    """The backend ``dist_plan`` picks for this process (from torchrun's env)."""
    return dist_plan(*_dist_env())[0]


def dist_device(default=None) -> torch.device:
    """This process's device: ``dist_plan``'s under a distributed launch
    (WORLD_SIZE > 1), else ``default`` (or cuda when there is one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return dist_plan(*_dist_env())[1]
    if default is not None:
        return torch.device(default)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed():
    """(rank, world, local_rank); starts the process group when launched by
    torchrun (WORLD_SIZE > 1) and it is not started yet. NCCL: the rank's
    GPU is made current first, so NCCL and every later "cuda" use it."""
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend, device = dist_plan(*_dist_env())
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _all_reduce_sum(vals, device):
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------
def _as_dataset(data, tokenizer, seq_len):
    if data is None or isinstance(data, TokenizedDataset):
        return data
    return TokenizedDataset(data, tokenizer, seq_len)


def fsdp_wrap(model):
    """Shards a FusedLlama's trainable tensors with FSDP2 (``fully_shard``).

    The sub-modules the model calls (attention projections, o, MLP, head) are
    the FSDP units: FusedLlama runs its layers through them, not through the
    layer containers. The frozen base weights are buffers, so FSDP replicates
    them; what gets sharded is the adapter, its gradients and AdamW state.
    """
    from torch.distributed.fsdp import fully_shard

    units = [m for _, m in model.adapter_modules()] if hasattr(model, "adapter_modules") else []
    if not units and hasattr(model, "model") and hasattr(model.model, "layers"):  # transformers Llama
        units = list(model.model.layers)
    for m in units:
        if any(p.requires_grad for p in m.parameters()):
            fully_shard(m)
    fully_shard(model)
    return model


def _enable_grad_checkpointing(model):
    fn = getattr(model, "gradient_checkpointing_enable", None)
    if fn is None:
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                         "cannot use grad_checkpointing with it")
    try:
        fn(gradient_checkpointing_kwargs={"use_reentrant": False})
    except TypeError:
        fn()


def optimizer_step(opt, params, max_grad_norm) -> None:
    """The end of every training step: clip the gradient norm (when
    max_grad_norm is set), step, and drop the gradients."""
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def autocast_factory(cfg: TrainConfig, device: torch.device):
    """A no-argument callable giving the training step's autocast context
    (bf16 on CUDA with bf16="auto", or when asked; else a null context)."""
    use = (cfg.bf16 == "auto" and device.type == "cuda") or cfg.bf16 is True
    if not use:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")  # what a batch gives the model
GROUP_BATCHES = 50  # global batches per length-sorted pool (transformers' LengthGroupedSampler: 50)


def epoch_order(n: int, seed: int, epoch: int, lengths: Optional[list] = None,
                global_batch: int = 1) -> list[int]:
    """The examples' order in one epoch, a pure function of its arguments
    (resuming needs only the position): a seeded permutation. With
    ``lengths``, grouped by length: the permutation is cut into pools of
    ``GROUP_BATCHES`` global batches, each pool sorted by length and cut into
    global batches, and those batches shuffled (seeded), the longest first
    (an out-of-memory shows at step 1, not hours in). Padding then costs what
    the length spread within a batch costs, not within the data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return order
    pool = GROUP_BATCHES * global_batch
    batches = []
    for p in range(0, n, pool):
        chunk = sorted(order[p:p + pool], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        batches += [chunk[b:b + global_batch] for b in range(0, len(chunk), global_batch)]
    full = [b for b in batches if len(b) == global_batch]  # a short tail (never trained on) goes last
    full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
    if full:
        longest = max(range(len(full)), key=lambda i: lengths[full[i][0]])
        full[0], full[longest] = full[longest], full[0]
    return [i for b in full + [b for b in batches if len(b) < global_batch] for i in b]


def _best(eval_history: list) -> Optional[int]:
    """Index of the evaluation with the lowest loss (the first of equals), or None."""
    return min(range(len(eval_history)), key=lambda i: eval_history[i]["loss"]) if eval_history else None


def _stop_early(eval_history: list, patience: int) -> bool:
    """``patience`` evaluations in a row without a loss below the best before them."""
    b = _best(eval_history)
    return bool(patience) and b is not None and len(eval_history) - 1 - b >= patience


def train(model, tokenizer, train_data, eval_data=None, config: TrainConfig = None, out_dir=None,
          resume: bool = False, callback: Callable[[int, dict], None] = None) -> TrainResult:
    """Trains ``model``'s parameters that have ``requires_grad`` (for FusedLlama:
    the adapter) on ``train_data`` (records or a ``TokenizedDataset``), in train
    mode; the model's mode is given back at the end.

    ``out_dir``: where checkpoints go (``out_dir/checkpoint``); ``resume=True``
    continues from it. ``callback(step, metrics)`` runs after every optimizer
    step on every rank (raising ``Interrupted`` there stops training)."""
    cfg = (config or TrainConfig()).validate()
    rank, world, local_rank = init_distributed()
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoint is)")
    if cfg.save_best and (eval_data is None or out_dir is None or not hasattr(model, "save_adapter")):
        raise ValueError("save_best needs eval data, out_dir and a model with an adapter (save_adapter)")
    if cfg.early_stop and (eval_data is None or not cfg.eval_every):
        raise ValueError("early_stop needs eval data and eval_every > 0 (it counts evaluations)")
    if cfg.pack and not getattr(model, "takes_packed_rows", False):
        # transformers' Llama masks packed rows only without a KV cache (use_cache=False)
        raise ValueError(f"pack=True needs a model that runs packed rows (flora.FusedLlama), "
                         f"not {type(model).__name__}")
    train_ds = _as_dataset(train_data, tokenizer, cfg.seq_len)
    eval_ds = _as_dataset(eval_data, tokenizer, cfg.seq_len)
    pad_id = pad_id_of(tokenizer)
    # what the epoch order shuffles: the examples, or the packed rows (example indices each)
    packed = pack_rows([len(it["input_ids"]) for it in train_ds], cfg.seq_len) if cfg.pack else None
    n_units = len(packed) if cfg.pack else len(train_ds)

    device = model_device(model)
    if world > 1 and torch.distributed.get_backend() == "nccl":  # one GPU per rank
        device = torch.device("cuda", local_rank)
        model.to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (nothing requires grad)")
    params = [p for _, p in named]
    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(model)
    net = model
    if cfg.fsdp:
        if world < 2:
            raise ValueError("fsdp=True needs a torch.distributed launch (torchrun) with 2 or more processes")
        if out_dir is not None:
            raise ValueError("checkpointing is not supported with fsdp=True (use DDP, the default)")
        net = fsdp_wrap(model)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = autocast_factory(cfg, device)
    if cfg.fsdp:  # fully_shard swapped the Parameters for sharded DTensors
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    micro_per_step = cfg.grad_accum * world
    global_batch = cfg.batch_size * micro_per_step
    steps_per_epoch = n_units // global_batch
    if steps_per_epoch == 0:
        n = len(train_ds)
        what = f"{n} training example{'' if n == 1 else 's'} {'is' if n == 1 else 'are'}" if not cfg.pack else \
            f"{n} training example{'' if n == 1 else 's'} pack into {n_units} row{'' if n_units == 1 else 's'} of " \
            f"up to {cfg.seq_len} tokens,"
        raise ValueError(f"{what} fewer than one global batch "
                         f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes "
                         f"= {global_batch})")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    start_step, history, eval_history = 0, [], []
    # everything that changes the trained tensors; a resume must match it exactly
    # (the schedule keys, ckpt.SCHEDULE, may differ with allow_schedule_change)
    adapter_cfg = getattr(model, "adapter_config", None) or getattr(model, "flora_adapter_config", None)
    arch = getattr(model, "arch", None)
    fingerprint = ckpt.as_json({
        "global_batch": global_batch, "n_train": len(train_ds), "data_sha256": ckpt.dataset_sha256(train_ds),
        "seed": cfg.seed, "trainable": [n for n, _ in named],
        "adapter": adapter_cfg.to_dict() if hasattr(adapter_cfg, "to_dict") else None,
        "base_model": arch.shape_dict() if hasattr(arch, "shape_dict") else None,
        "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
        "bf16_autocast": autocast is not contextlib.nullcontext,
        "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "warmup_steps": cfg.warmup_steps, "total_steps": total,
        # only when on: checkpoints written before the option resume unchanged
        **({"group_by_length": True} if cfg.group_by_length else {}), **({"pack": True} if cfg.pack else {})})
    if resume:
        state = ckpt.load_checkpoint(out_dir, model, named, opt, fingerprint, rank=rank, world=world,
                                     allow_schedule_change=cfg.allow_schedule_change)
        if state is not None:
            start_step, history, eval_history = state["step"], state["history"], state["eval_history"]
    else:
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)

    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc=cfg.desc, unit="step", dynamic_ncols=True)

    def run_eval(step):
        stats = eval_stats(model, eval_ds, batch_size=cfg.eval_batch_size, autocast=autocast, pad_id=pad_id)
        eval_history.append({"step": step, **stats})
        if cfg.save_best and _best(eval_history) == len(eval_history) - 1 and rank == 0:
            model.save_adapter(Path(out_dir) / "best-adapter")  # atomic: a kill keeps the previous best
        return stats

    def save(step):
        ckpt.save_checkpoint(out_dir, model, named, opt, step=step, fingerprint=fingerprint,
                             history=history, eval_history=eval_history, config=dataclasses.asdict(cfg),
                             rank=rank, world=world)

    t_start = time.perf_counter()
    tok_window = []  # (tokens, seconds) of recent steps, for tokens/s
    order_epoch, order = None, None
    lengths = [len(it["input_ids"]) for it in train_ds] if cfg.group_by_length else None
    was_training = model.training  # given back at the end, as evaluation gives it back
    net.train()
    step = start_step
    stopped = _stop_early(eval_history, cfg.early_stop)  # a resumed run that had stopped stays stopped
    try:
        while step < total and not stopped:
            t0 = time.perf_counter()
            epoch, pos = divmod(step, steps_per_epoch)
            if order_epoch != epoch:
                order, order_epoch = epoch_order(n_units, cfg.seed, epoch, lengths, global_batch), epoch
            first_micro = pos * micro_per_step + rank * cfg.grad_accum
            micros = []
            for j in range(first_micro, first_micro + cfg.grad_accum):
                ids = order[j * cfg.batch_size:(j + 1) * cfg.batch_size]
                b = collate_packed([[train_ds[i] for i in packed[r]] for r in ids], pad_id) if cfg.pack \
                    else collate([train_ds[i] for i in ids], pad_id)
                micros.append({k: v.to(device) for k, v in b.items()})
            local_tgt = [count_target_tokens(b["labels"]) for b in micros]
            local_inp = sum(count_input_tokens(b) for b in micros)
            global_tgt, global_inp = _all_reduce_sum([sum(local_tgt), local_inp], device)
            lr = cfg.lr_at(step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for j, b in enumerate(micros):
                sync = j == len(micros) - 1
                if cfg.fsdp:
                    net.set_requires_gradient_sync(sync)
                    ctx = contextlib.nullcontext()
                else:
                    ctx = net.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    with autocast():
                        out = net(**{k: b[k] for k in MODEL_INPUTS if k in b})
                    # mean loss of this micro-batch -> its share of the global token-weighted mean;
                    # x world because DDP averages gradients over ranks
                    w = local_tgt[j] / global_tgt * world
                    (out.loss.float() * w).backward()
                loss_sum += float(out.loss.detach()) * local_tgt[j]
            optimizer_step(opt, params, cfg.max_grad_norm)
            (loss_sum,) = _all_reduce_sum([loss_sum], device)
            loss = loss_sum / global_tgt
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {step + 1}; lower the learning rate")
            step += 1
            dt = time.perf_counter() - t0
            tok_window = (tok_window + [(global_inp, dt)])[-20:]
            tps = sum(t for t, _ in tok_window) / max(sum(s for _, s in tok_window), 1e-9)
            rec = {"step": step, "loss": loss, "lr": lr, "tokens": int(global_inp), "time": dt}
            history.append(rec)
            if eval_ds is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                run_eval(step)
                stopped = _stop_early(eval_history, cfg.early_stop)
            if bar is not None:
                post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
                if eval_history:
                    post["eval"] = f"{eval_history[-1]['loss']:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if out_dir is not None and cfg.save_every and step % cfg.save_every == 0 and step < total \
                    and not stopped:  # a stopped run saves once, below
                save(step)
            if callback is not None:
                callback(step, rec)
        if stopped:  # the evaluation that stopped it is this step's: not run twice
            final_eval = {k: v for k, v in eval_history[-1].items() if k != "step"}
        else:
            if eval_history and eval_history[-1]["step"] == step:
                eval_history.pop()  # a resumed finished run: re-evaluate, do not add a second final entry
            final_eval = run_eval(step) if eval_ds is not None else None
        if out_dir is not None:
            save(step)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    tail = [h["loss"] for h in history[-10:]]
    new_tokens = sum(h["tokens"] for h in history[start_step:])
    b = _best(eval_history)
    return TrainResult(steps=step, history=history, eval_history=eval_history,
                       final_train_loss=sum(tail) / max(len(tail), 1), final_eval=final_eval,
                       tokens_per_s=new_tokens / max(seconds, 1e-9), seconds=seconds,
                       best_eval=None if b is None else eval_history[b], stopped_early=stopped)
