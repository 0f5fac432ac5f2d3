"""Adapter directories: flora's own format, PEFT LoRA import, PEFT export.

A flora adapter directory holds ``adapter_config.json`` (variant, rank,
alpha, targets, layers, dropout, flora version, the base model's shape and a
SHA-256 of the tensor file) and ``adapter.safetensors`` (tensor names
``layers.<i>.<attn|o|mlp>.<A|B|C>_<p>`` and ``head.B_head``).

Saves are atomic: the files are written and fsynced in a temporary directory
next to the target, which then replaces it by rename, so an interrupted save
never leaves a half-written adapter where a good one was. Loads validate
everything against the base model and read only safetensors (never pickle).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ._version import __version__
from .checkpoint import load_safetensors, read_safetensors_header, write_safetensors
from .config import AdapterConfig, LlamaArch
from .fileio import atomic_write_dir, atomic_write_json, read_json_object, recover_interrupted_save
from .modules.variants import adapter_shapes

FORMAT = "flora-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# what a save in each format may replace; not the other format's files (the config's name is shared)
_FLORA_FILES = {CONFIG_NAME, WEIGHTS_NAME, "README.md"}
_PEFT_FILES = {CONFIG_NAME, PEFT_WEIGHTS_NAME, "README.md"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# group -> module attribute in a FusedLlama layer
_GROUP_PREFIX = {"qkv": "attn", "o": "o", "gateup": "mlp", "down": "mlp"}
_HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_PREFIX_OF_PROJ = {"q": "attn", "k": "attn", "v": "attn", "o": "o",
                   "gate": "mlp", "up": "mlp", "down": "mlp"}


class AdapterError(ValueError):
    """An adapter directory that does not fit (or cannot be read for) this base model."""


def expected_adapter_shapes(cfg, arch: LlamaArch) -> dict:
    """Tensor name (as in FusedLlama.adapter_state_dict) -> shape of every adapter tensor ``cfg`` gives this base model."""
    return {(f"layers.{i}.{_GROUP_PREFIX[g]}.{n}" if i is not None else f"head.{n}"): s
            for i, g, n, s in adapter_shapes(cfg, arch)}


def check_adapter_state_dict(arch: LlamaArch, cfg, sd: dict, where: str = "adapter") -> None:
    """Exact key / shape / dtype / finiteness check of adapter tensors for base ``arch``."""
    want = expected_adapter_shapes(cfg, arch)
    problems = []
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    if missing:
        problems.append(f"missing tensors {missing[:6]}" + (" ..." if len(missing) > 6 else ""))
    if extra:
        problems.append(f"unexpected tensors {extra[:6]}" + (" ..." if len(extra) > 6 else ""))
    for k in sorted(set(want) & set(sd)):
        t = sd[k]
        if tuple(t.shape) != want[k]:
            problems.append(f"{k} has shape {tuple(t.shape)}, this model needs {want[k]}")
        elif t.dtype not in _FLOATS:
            problems.append(f"{k} has dtype {t.dtype}; adapter tensors must be floating point")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{k} holds NaN or infinite values")
    if problems:
        raise AdapterError(f"{where}: adapter does not match the base model ({cfg.variant}, rank "
                           f"{cfg.rank}): " + "; ".join(problems))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_write_tensors = write_safetensors  # a module name of its own: the crash tests replace it


# --------------------------------------------------------------------------
# flora format
# --------------------------------------------------------------------------
def save_adapter(model, path) -> None:
    """Write ``model``'s current adapter to ``path`` (atomically)."""
    cfg = model.adapter_config
    if cfg is None:
        raise ValueError("this model has no adapter to save")
    if getattr(model, "_merged", False):
        raise ValueError("the adapter was merged into the base weights; there is no separate adapter to save")
    tensors = model.adapter_state_dict()
    check_adapter_state_dict(model.arch, cfg, tensors, where="save_adapter")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "flora_version": __version__,
            **cfg.to_dict(), "scale": cfg.scale, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "base_model": model.arch.shape_dict()}
    digest = {}

    def write_weights(full):
        _write_tensors(full, tensors, metadata={"format": "pt", "flora_format": FORMAT})
        digest["sha"] = _sha256(full)

    def write_config(full):
        atomic_write_json(full, {**meta, "tensors_sha256": digest["sha"]})

    _refuse_other_format(path, saving_peft=False)
    atomic_write_dir(path, {WEIGHTS_NAME: write_weights, CONFIG_NAME: write_config}, _FLORA_FILES, "an adapter")


def _refuse_other_format(path, saving_peft: bool) -> None:
    """Both formats write adapter_config.json: a save into the other format's adapter
    directory would replace its config and orphan its weights, so it is refused."""
    if saving_peft:
        noun, weights, action = "a flora adapter", WEIGHTS_NAME, "flora's PEFT export"
    else:
        noun, weights, action = "a PEFT LoRA adapter", PEFT_WEIGHTS_NAME, "flora's save_adapter"
    path = os.fspath(path)
    recover_interrupted_save(path)  # a killed save's previous directory back first, so it is checked
    found = weights if os.path.isfile(os.path.join(path, weights)) else None
    cfg = os.path.join(path, CONFIG_NAME)
    if found is None and os.path.isfile(cfg):  # its weights gone, the config still says whose it is
        try:
            meta = read_json_object(cfg)
        except (OSError, ValueError):
            meta = {}  # unreadable: not recognisably the other format's
        if (meta.get("format") == FORMAT) if saving_peft else ("peft_type" in meta):
            found = f"{CONFIG_NAME} only"
    if found:
        raise ValueError(f"{path} holds {noun} ({found}); {action} would replace its {CONFIG_NAME}: "
                         f"choose another directory or remove it")


def _read_json(path: str) -> dict:
    return read_json_object(path, AdapterError)


def _missing_dir_message(path: str) -> str:
    parent, base = os.path.split(os.path.abspath(path))
    leftovers = []
    if os.path.isdir(parent):
        leftovers = [n for n in os.listdir(parent) if n.startswith(f".{base}.old-")]
    msg = f"{path}: adapter directory not found"
    if leftovers:
        msg += (f"; an interrupted save left the previous adapter at "
                f"{os.path.join(parent, leftovers[0])}")
    return msg


def read_adapter_dir(path, arch: LlamaArch):
    """(AdapterConfig, tensors) of a flora or PEFT LoRA adapter dir, validated for ``arch``."""
    path = os.fspath(path)
    try:
        recover_interrupted_save(path)  # a save killed between its renames: put the adapter back
    except OSError:
        pass  # a read-only location: load what is there
    if not os.path.isdir(path):
        raise FileNotFoundError(_missing_dir_message(path))
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; not a flora or PEFT adapter directory")
    meta = _read_json(cfg_path)
    if "peft_type" in meta:
        return read_peft_adapter(path, arch, meta)
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{cfg_path}: neither a flora adapter (format {FORMAT!r}) nor a PEFT adapter "
                           f"(peft_type)")
    return _read_flora_adapter(path, arch, meta)


def _read_flora_adapter(path: str, arch: LlamaArch, meta: dict):
    where = os.path.join(path, CONFIG_NAME)
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{where}: format_version {meta.get('format_version')!r} is not supported "
                           f"(this flora reads version {FORMAT_VERSION})")
    fields = {k: meta[k] for k in ("variant", "rank", "alpha", "dropout", "targets", "layers") if k in meta}
    try:
        cfg = AdapterConfig.from_dict(fields)
    except (ValueError, TypeError) as e:
        raise AdapterError(f"{where}: {e}") from None
    base = meta.get("base_model")
    if not isinstance(base, dict):
        raise AdapterError(f"{where}: no base_model shape recorded")
    mine = arch.shape_dict()
    diffs = [f"{k}: adapter was trained on {base.get(k)!r}, this model has {v!r}"
             for k, v in mine.items() if base.get(k) != v]
    if diffs:
        raise AdapterError(f"{path}: adapter was made for a different base model ({'; '.join(diffs)})")
    try:
        cfg.validate_for(arch)
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from None
    wpath = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        pick = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {', '.join(pick)}; flora never reads pickle files)" if pick else ""
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}{hint}")
    read_safetensors_header(wpath)  # truncation check with a clear message
    want_sha = meta.get("tensors_sha256")
    if want_sha is not None and _sha256(wpath) != want_sha:
        raise AdapterError(f"{wpath}: contents do not match the SHA-256 in {CONFIG_NAME} "
                           f"(file corrupted or replaced)")
    sd = load_safetensors(wpath)
    return cfg, sd


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory read and checked for base ``arch`` (:func:`read_adapter`): its
    config and tensors, on the CPU as read. ``FusedLlama.load_adapter`` takes one as it
    takes the directory and then only copies the tensors to the model, so that the disk
    read and the checks can be done elsewhere first (a server's HTTP thread, not the
    thread that runs its batches); one read serves any number of loads."""
    path: str
    arch: LlamaArch
    config: AdapterConfig
    state: dict


def read_adapter(path, arch: LlamaArch) -> AdapterFiles:
    """A flora or PEFT LoRA adapter dir, read and checked for ``arch`` (tensor keys, shapes,
    dtypes, finite values): AdapterError / FileNotFoundError naming what does not fit."""
    cfg, sd = read_adapter_dir(path, arch)
    check_adapter_state_dict(arch, cfg, sd, where=str(path))
    return AdapterFiles(os.fspath(path), arch, cfg, sd)


def resolve_adapter(adapter, arch: LlamaArch):
    """AdapterConfig | dir | AdapterFiles -> (validated AdapterConfig, checked tensors, or
    None for a fresh adapter)."""
    if isinstance(adapter, AdapterConfig):
        return adapter.validate_for(arch), None  # shared safely: a config never changes
    if isinstance(adapter, (str, os.PathLike)):
        adapter = read_adapter(adapter, arch)
    if isinstance(adapter, AdapterFiles):
        if adapter.arch != arch:  # its checks were another base model's
            raise AdapterError(f"{adapter.path}: read for another base model ({adapter.arch.shape_dict()}), "
                               f"not this one ({arch.shape_dict()}); read it for this model")
        return adapter.config, adapter.state
    raise TypeError(f"adapter must be an AdapterConfig, an adapter directory or an AdapterFiles, "
                    f"got {type(adapter).__name__}")


def load_adapter(model, path, name: str = "default") -> None:
    """Load the adapter dir ``path`` into ``model`` under ``name`` (see FusedLlama.load_adapter)."""
    model.load_adapter(path, name)


# --------------------------------------------------------------------------
# PEFT LoRA interop
# --------------------------------------------------------------------------
_PEFT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.lora_([AB])\.weight$")
_HF_TO_PROJ = {v: k for k, v in _HF_MODULE.items()}


def _peft_unsupported(meta: dict) -> list:
    why = []
    if meta.get("use_dora"):
        why.append("DoRA (use_dora)")
    if meta.get("bias", "none") != "none":
        why.append(f"bias={meta.get('bias')!r} (only 'none')")
    if meta.get("modules_to_save"):
        why.append(f"modules_to_save={meta.get('modules_to_save')}")
    if meta.get("fan_in_fan_out"):
        why.append("fan_in_fan_out")
    # a pattern that only repeats the global r / lora_alpha changes nothing (some tools write one
    # for every module); one that differs would give modules their own rank or scale
    for k, glob, noun in (("rank_pattern", "r", "rank"), ("alpha_pattern", "lora_alpha", "alpha")):
        pat = meta.get(k)
        if not pat:
            continue
        if not isinstance(pat, dict):
            why.append(f"{k}={pat!r} (expected an object of module pattern -> value)")
            continue
        other = {m: v for m, v in pat.items() if isinstance(v, bool) or v != meta.get(glob)}
        if other:
            why.append(f"per-module {k} {other} (differs from {glob}={meta.get(glob)!r}; "
                       f"flora uses one {noun} for every module)")
    for k in ("layer_replication", "megatron_config", "trainable_token_indices", "target_parameters",
              "alora_invocation_tokens"):
        if meta.get(k):
            why.append(k)
    for k in ("lora_bias", "use_qalora", "use_bdlora"):
        if meta.get(k):
            why.append(k)
    return why


def read_peft_adapter(path: str, arch: LlamaArch, meta: Optional[dict] = None):
    """A PEFT LoRA adapter dir as (pf-lora AdapterConfig, flora tensors).

    Scale: PEFT's ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
    use_rslora) is expressed as flora's alpha / rank, so B is taken verbatim.
    """
    cfg_path = os.path.join(path, CONFIG_NAME)
    meta = _read_json(cfg_path) if meta is None else meta
    if meta.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {meta.get('peft_type')!r}; flora imports only LORA adapters")
    why = _peft_unsupported(meta)
    if why:
        raise AdapterError(f"{cfg_path}: PEFT LoRA features flora does not support: {', '.join(why)}")
    r, lora_alpha = meta.get("r"), meta.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise AdapterError(f"{cfg_path}: need positive integer r and positive lora_alpha, got {r!r}, {lora_alpha!r}")
    alpha = float(lora_alpha) * math.sqrt(r) if meta.get("use_rslora") else float(lora_alpha)
    wpath = os.path.join(path, PEFT_WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        hint = " (adapter_model.bin is a pickle file, which flora never reads)" \
            if os.path.isfile(os.path.join(path, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"{path}: no {PEFT_WEIGHTS_NAME}{hint}")
    raw = load_safetensors(wpath)
    sd, seen, bad = {}, {}, []
    for k, t in raw.items():
        m = _PEFT_KEY.match(k)
        if m is None:
            bad.append(k)
            continue
        i, proj, ab = int(m.group(1)), _HF_TO_PROJ[m.group(2)], m.group(3)
        sd[f"layers.{i}.{_PREFIX_OF_PROJ[proj]}.{ab}_{proj}"] = t
        seen.setdefault(proj, set()).add(i)
    if bad:
        raise AdapterError(f"{wpath}: tensors flora cannot map onto a Llama's q/k/v/o/gate/up/down "
                           f"LoRA: {bad[:4]}" + (" ..." if len(bad) > 4 else ""))
    if not sd:
        raise AdapterError(f"{wpath}: no LoRA tensors")
    targets = [p for p in _HF_MODULE if p in seen]
    layer_sets = {frozenset(s) for s in seen.values()}
    if len(layer_sets) != 1:
        raise AdapterError(f"{wpath}: projections are adapted in different layer sets "
                           f"({ {p: sorted(s) for p, s in seen.items()} }); flora's pf-lora needs one "
                           f"layer set for all targets")
    layers = sorted(next(iter(layer_sets)))
    if layers[-1] >= arch.num_hidden_layers:
        raise AdapterError(f"{wpath}: adapts layer {layers[-1]} but the base model has "
                           f"{arch.num_hidden_layers} layers")
    cfg = AdapterConfig("pf-lora", rank=r, alpha=alpha, dropout=float(meta.get("lora_dropout", 0.0) or 0.0),
                        targets=targets,
                        layers=None if len(layers) == arch.num_hidden_layers else layers)
    # key and shape check here so the message names PEFT's files
    want = expected_adapter_shapes(cfg, arch)
    problems = [f"{k}: {tuple(sd[k].shape)} (base model needs {want[k]}; r={r})"
                for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    missing = [k for k in want if k not in sd]
    if problems or missing:
        raise AdapterError(f"{path}: PEFT adapter does not fit the base model: "
                           + "; ".join(problems + [f"missing {k}" for k in missing][:6]))
    return cfg, sd


def lora_factors(sd: dict):
    """(transformers module path, A, B) of each projection of a lora / pf-lora
    adapter state dict (``layers.3.attn.A_q`` -> ``model.layers.3.self_attn.q_proj``)."""
    for k, A in sd.items():
        prefix, _, name = k.rpartition(".")
        if name.startswith("A_"):
            proj = name[2:]
            yield f"model.layers.{prefix.split('.')[1]}.{_HF_MODULE[proj]}", A, sd[f"{prefix}.B_{proj}"]


def export_peft(model, path, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the current lora / pf-lora adapter as a PEFT LoRA dir (atomically)."""
    cfg = model.adapter_config
    if cfg is None or cfg.base_variant not in ("lora", "pf-lora"):
        raise ValueError(f"only lora and pf-lora adapters can be exported to PEFT, this model has "
                         f"{'none' if cfg is None else cfg.variant}")
    if getattr(model, "_merged", False):
        raise ValueError("the adapter was merged into the base weights; nothing to export")
    tensors = {}
    for module, A, B in lora_factors(model.adapter_state_dict()):
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
    targets = [f"{p}_proj" for p in cfg.resolved_targets]
    meta = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": targets,
            "layers_to_transform": None if cfg.layers is None else list(cfg.layers),
            "layers_pattern": None, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
            "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path}

    _refuse_other_format(path, saving_peft=True)
    atomic_write_dir(path, {PEFT_WEIGHTS_NAME: lambda full: _write_tensors(full, tensors, {"format": "pt"}),
                            CONFIG_NAME: lambda full: atomic_write_json(full, meta)}, _PEFT_FILES, "an adapter")
