"""Training checkpoints: save and restore everything a resumed run needs.

``out_dir/checkpoint/`` holds
  trainable.safetensors  the trainable parameters (the adapter), by name
  optimizer.safetensors  AdamW moment tensors, keyed "<param index>.<name>"
  rng.safetensors        torch CPU (and CUDA) generator states, per rank
  state.json             step, data fingerprint, histories, config, optimizer
                         hyper-parameters, Python RNG states
  adapter/               the adapter in flora's format, when the model has save_adapter
Only safetensors and JSON: nothing is unpickled on load. The directory is
written under a temporary name and swapped in by rename, so an interruption at
any moment leaves either the previous or the new checkpoint, never a mix.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .fileio import fsync_dir
from .checkpoint import load_safetensors  # validates: a truncated file is a clear CheckpointError

FORMAT = 1
NAME, OLD = "checkpoint", ".checkpoint-old"
# fingerprint keys a resume may change with allow_schedule_change (the lr schedule)
SCHEDULE = ("lr", "lr_schedule", "warmup_steps", "total_steps")


def as_json(obj):
    """``obj`` as it reads back from JSON (tuples -> lists), so fingerprints compare equal."""
    return json.loads(json.dumps(obj))


def dataset_sha256(ds) -> str:
    """SHA-256 of a tokenized dataset's token ids and labels, in order."""
    import numpy as np

    h = hashlib.sha256()
    for i in range(len(ds)):
        it = ds[i]
        for k in ("input_ids", "labels"):
            a = np.asarray(it[k], dtype=np.int64)
            h.update(len(a).to_bytes(8, "little"))
            h.update(a.tobytes())
    return h.hexdigest()


def _save_tensors(tensors: dict, path: Path):
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _local_rng() -> dict:
    st = {"torch": torch.get_rng_state(), "python": _py_state_to_json(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])


def _gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)  # in-memory exchange between ranks only
    return out


def find_checkpoint(out_dir) -> Path | None:
    out_dir = Path(out_dir)
    for name in (NAME, OLD):  # OLD only survives a crash between the two renames of a save
        p = out_dir / name
        if (p / "state.json").is_file():
            return p
    return None


def save_checkpoint(out_dir, model, named, opt, *, step, fingerprint, history, eval_history, config,
                    rank=0, world=1):
    rngs = _gather(_local_rng(), world)
    if rank == 0:
        _write(Path(out_dir), model, named, opt, step, fingerprint, history, eval_history, config, rngs)
    if world > 1:
        torch.distributed.barrier()


def _write(out_dir, model, named, opt, step, fingerprint, history, eval_history, config, rngs):
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".checkpoint-tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f".checkpoint-tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _save_tensors({n: p for n, p in named}, tmp / "trainable.safetensors")
        sd = opt.state_dict()
        opt_tensors, opt_scalars = {}, {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    opt_tensors[f"{i}.{k}"] = v
                else:
                    opt_scalars[f"{i}.{k}"] = v
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors = {}
        for r, st in enumerate(rngs):
            rng_tensors[f"rank{r}.torch"] = st["torch"]
            for d, t in enumerate(st.get("cuda", [])):
                rng_tensors[f"rank{r}.cuda{d}"] = t
        _save_tensors(rng_tensors, tmp / "rng.safetensors")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        state = {
            "format": FORMAT, "step": step, "fingerprint": fingerprint, "world_size": len(rngs),
            "history": history, "eval_history": eval_history, "config": config,
            "optimizer": {"param_groups": groups, "scalars": opt_scalars},
            "python_rng": [st["python"] for st in rngs],
        }
        with open(tmp / "state.json", "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        if hasattr(model, "save_adapter"):
            model.save_adapter(tmp / "adapter")
        fsync_dir(tmp)
        final, old = out_dir / NAME, out_dir / OLD
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(out_dir, model, named, opt, fingerprint, *, rank=0, world=1, allow_schedule_change=False):
    """Restores parameters, optimizer and RNG in place; returns the saved state
    dict, or None (with a warning) when ``out_dir`` holds no checkpoint.
    Every fingerprint entry must match the checkpoint's; with
    ``allow_schedule_change`` the :data:`SCHEDULE` entries may differ."""
    path = find_checkpoint(out_dir)
    if path is None:
        if rank == 0:
            warnings.warn(f"no checkpoint in {out_dir}; starting from step 0", stacklevel=3)
        torch.manual_seed(fingerprint["seed"] + rank)
        random.seed(fingerprint["seed"] + rank)
        return None
    try:
        with open(path / "state.json", encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'state.json'}: unreadable checkpoint state ({e}); the file is "
                         f"damaged, start a new run or restore it") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"{path}: checkpoint format {got!r} is not {FORMAT}")
    saved = state["fingerprint"]
    changed = []
    for k, v in fingerprint.items():
        if k not in saved:
            raise ValueError(f"cannot resume from {path}: the checkpoint does not record {k} (written by an "
                             f"older flora), so this run cannot be checked against it; start a new run")
        if saved[k] == v:
            continue
        if k in SCHEDULE and allow_schedule_change:
            changed.append(f"{k} {saved[k]!r} -> {v!r}")
            continue
        what = {"trainable": "trainable parameter names", "data_sha256": "the training data",
                "adapter": "the adapter configuration"}.get(k, k)
        hint = (" (to change the lr schedule deliberately, pass allow_schedule_change / "
                "--allow-schedule-change)" if k in SCHEDULE else "")
        raise ValueError(f"cannot resume from {path}: {what} differs (checkpoint: {saved[k]!r}, "
                         f"this run: {v!r}); resume with the same data and settings{hint}")
    for k in saved.keys() - fingerprint.keys():  # an option recorded only when on (pack, group_by_length)
        raise ValueError(f"cannot resume from {path}: the checkpoint's run had {k}={saved[k]!r}, this run does "
                         f"not; resume with the same data and settings")
    if changed and rank == 0:
        warnings.warn(f"resuming {path} with a changed lr schedule: {', '.join(changed)}", stacklevel=3)
    params = load_safetensors(str(path / "trainable.safetensors"))
    for n, p in named:
        if n not in params:
            raise ValueError(f"{path}: trainable parameter {n!r} missing from the checkpoint")
        if tuple(params[n].shape) != tuple(p.shape):
            raise ValueError(f"{path}: {n} has shape {list(params[n].shape)} in the checkpoint, "
                             f"{list(p.shape)} in the model")
        with torch.no_grad():
            p.copy_(params[n].to(p.dtype))
    opt_t = load_safetensors(str(path / "optimizer.safetensors"))
    per = {}
    for key, v in list(opt_t.items()) + list(state["optimizer"]["scalars"].items()):
        i, k = key.split(".", 1)
        per.setdefault(int(i), {})[k] = v
    groups = [dict(g) for g in state["optimizer"]["param_groups"]]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"{path}: optimizer has {len(groups)} parameter groups, this run {len(opt.param_groups)}")
    offset = 0
    for g, cur in zip(groups, opt.param_groups):
        g["params"] = list(range(offset, offset + len(cur["params"])))
        offset += len(cur["params"])
    opt.load_state_dict({"state": per, "param_groups": groups})
    if state["world_size"] == world:
        rng = load_safetensors(str(path / "rng.safetensors"))
        torch.set_rng_state(rng[f"rank{rank}.torch"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith(f"rank{rank}.cuda")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(_py_state_from_json(state["python_rng"][rank]))
    else:
        warnings.warn(f"checkpoint was written by {state['world_size']} processes, this run has {world}: "
                      "data order and optimizer state are restored, random-number streams are re-seeded",
                      stacklevel=3)
        torch.manual_seed(fingerprint["seed"] + rank + 7919 * state["step"])
    return state
