"""Reading Hugging Face Llama checkpoint directories, without transformers.

A checkpoint directory holds ``config.json`` and either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Everything is validated before any tensor is used: the config must describe a
plain Llama (no biases, SiLU MLP, a RoPE type we implement), every shard must
exist and be complete, and every expected tensor must be present with the
expected shape. Only safetensors are read; pickle files are refused.
:func:`save_checkpoint` writes one (a merged adapter, a dequantized GGUF).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import LlamaArch
from .fileio import atomic_write_dir, atomic_write_json

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# safetensors dtype names -> bytes per element (for the completeness check)
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class CheckpointError(ValueError):
    """A checkpoint directory or file that flora cannot read as a Llama model."""


def arch_from_config_dict(cfg: dict, where: str = "config") -> LlamaArch:
    """Validate a Llama ``config.json`` dict and return its :class:`LlamaArch`."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    mt = cfg.get("model_type")
    if mt != "llama":
        raise CheckpointError(
            f"{where}: model_type is {mt!r}; flora.FusedLlama only loads Llama checkpoints "
            f"(model_type 'llama')")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key, False):
            raise CheckpointError(f"{where}: {key} is true; flora supports only bias-free Llama projections")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{where}: hidden_act is {act!r}; flora's MLP is SwiGLU (silu)")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if cfg.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: missing field(s): {', '.join(missing)}")

    # transformers 5 writes "rope_parameters" (with rope_theta inside); 4.x wrote
    # "rope_theta" and "rope_scaling" at top level. Accept both.
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise CheckpointError(f"{where}: rope parameters must be an object, got {rp!r}")
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{where}: rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor != 1 is not supported")
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    scaling = None
    if rope_type == "llama3":
        need = ("factor", "low_freq_factor", "high_freq_factor")
        lack = [k for k in need if k not in rp]
        if lack:
            raise CheckpointError(f"{where}: llama3 rope scaling lacks {', '.join(lack)}")
        scaling = {"rope_type": "llama3", "factor": float(rp["factor"]),
                   "low_freq_factor": float(rp["low_freq_factor"]),
                   "high_freq_factor": float(rp["high_freq_factor"]),
                   "original_max_position_embeddings": int(rp.get("original_max_position_embeddings", max_pos))}
    elif rope_type == "linear":
        if "factor" not in rp:
            raise CheckpointError(f"{where}: linear rope scaling lacks factor")
        scaling = {"rope_type": "linear", "factor": float(rp["factor"])}
    try:  # LlamaArch checks the numbers (positive integers, head counts, head_dim)
        return LlamaArch(
            hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"), intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"], rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=max_pos, bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def arch_from_hf_config(config) -> LlamaArch:
    """Same as :func:`arch_from_config_dict` for an in-memory transformers config."""
    return arch_from_config_dict(config.to_dict(), where=f"{type(config).__name__}")


def read_config(path: str) -> LlamaArch:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    return arch_from_config_dict(cfg, where=cfg_path)


# --------------------------------------------------------------------------
# safetensors files
# --------------------------------------------------------------------------
def read_safetensors_header(path: str) -> dict:
    """Parse a safetensors header and check the file holds every byte it promises.

    safetensors itself reports a truncated file with a terse message; this
    names the file, the expected and the actual size.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * _ST_SIZES.get(info["dtype"], 1)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if stop - start != nbytes:
            raise CheckpointError(f"{path}: corrupt safetensors header: {name!r} has inconsistent offsets")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header promises {8 + n + end} bytes, "
            f"the file has {size}")
    return header


def load_safetensors(path: str, device="cpu", keys=None) -> dict[str, Tensor]:
    """Load (some of) the tensors of one safetensors file after validating it."""
    header = read_safetensors_header(path)
    names = [k for k in header if k != "__metadata__"] if keys is None else list(keys)
    out = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for k in names:
                out[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    return out


def checkpoint_files(path: str) -> dict[str, str]:
    """Map tensor name -> safetensors file for a checkpoint dir (validates shards exist)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    # transformers (modeling_utils, _get_resolved_checkpoint_files) takes model.safetensors before
    # the index when a directory holds both; flora must load the same weights
    if os.path.isfile(single):
        return {k: single for k in read_safetensors_header(single) if k != "__metadata__"}
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
        shards = sorted(set(wm.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(
                f"{path}: missing shard(s) listed in model.safetensors.index.json: {', '.join(missing)}")
        return {k: os.path.join(path, v) for k, v in wm.items()}
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle weights ({', '.join(sorted(pickles))}) found; flora reads safetensors "
            f"only (pickle can run code). Convert with transformers' save_pretrained(safe_serialization=True)")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def expected_shapes(arch: LlamaArch) -> dict[str, tuple]:
    """HF tensor name -> shape for every tensor a Llama checkpoint must hold."""
    d, f, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    dq, dkv = arch.q_dim, arch.kv_dim
    s = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not arch.tie_word_embeddings:
        s["lm_head.weight"] = (v, d)
    for i in range(arch.num_hidden_layers):
        p = f"model.layers.{i}."
        s.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (dq, d), p + "self_attn.k_proj.weight": (dkv, d),
            p + "self_attn.v_proj.weight": (dkv, d), p + "self_attn.o_proj.weight": (d, dq),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f)})
    return s


def check_state_dict(arch: LlamaArch, sd: dict, where: str) -> None:
    want = expected_shapes(arch)
    missing = [k for k in want if k not in sd]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensor(s): {', '.join(missing[:5])}{more}")
    bad = [f"{k}: {tuple(sd[k].shape)} (expected {want[k]})" for k in want if tuple(sd[k].shape) != want[k]]
    if bad:
        raise CheckpointError(f"{where}: tensor shape(s) do not match config.json: {'; '.join(bad[:5])}")


def load_checkpoint(path: str, device="cpu") -> tuple[LlamaArch, dict[str, Tensor]]:
    """Read and validate a local HF Llama checkpoint directory (CPU by default)."""
    arch = read_config(path)
    files = checkpoint_files(path)
    want = expected_shapes(arch)
    # rotary inv_freq buffers of old checkpoints are recomputed, not read
    by_file: dict[str, list] = {}
    for k in want:
        if k in files:
            by_file.setdefault(files[k], []).append(k)
    for fpath in by_file:
        header = read_safetensors_header(fpath)  # completeness of every shard we read
        absent = [k for k in by_file[fpath] if k not in header]
        if absent:
            raise CheckpointError(
                f"{fpath}: the index lists {', '.join(absent[:3])} in this shard, but it is not there")
    # tensors config.json does not account for (as transformers, an error): e.g. a
    # num_hidden_layers smaller than the checkpoint would otherwise load a truncated model
    ignorable = {k for k in files if k.endswith(".rotary_emb.inv_freq")}  # recomputed from the config
    if arch.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # a tied head some exporters still write out
    unexpected = sorted(set(files) - set(want) - ignorable)
    if unexpected:
        layers = sorted({int(k.split(".")[2]) for k in unexpected
                         if k.startswith("model.layers.") and k.split(".")[2].isdigit()})
        hint = (f"; the checkpoint has layer(s) up to {layers[-1]}, config.json says num_hidden_layers="
                f"{arch.num_hidden_layers}" if layers and layers[-1] >= arch.num_hidden_layers else "")
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: tensor(s) that config.json does not describe: "
                              f"{', '.join(unexpected[:5])}{more}{hint}")
    sd = {}
    for fpath, keys in by_file.items():
        sd.update(load_safetensors(fpath, device=device, keys=keys))
    check_state_dict(arch, sd, path)
    return arch, sd


def state_dict_from_hf_model(model) -> tuple[LlamaArch, dict[str, Tensor]]:
    """Arch and (aliasing, not copied) tensors of an in-memory LlamaForCausalLM."""
    arch = arch_from_hf_config(model.config)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if arch.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    check_state_dict(arch, sd, type(model).__name__)
    return arch, sd


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------
SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size
# a tokenizer's files (those of the tokenizers a Llama comes with: SentencePiece, BPE, fast)
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt"}
# what a checkpoint directory written here may hold, so a new one can replace it
_CHECKPOINT_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                     "README.md"} | _TOKENIZER_FILES


def _is_weights(name: str) -> bool:
    return name in ("model.safetensors", "model.safetensors.index.json") or (
        name.startswith("model-") and name.endswith(".safetensors"))


def _replaceable(name: str) -> bool:
    return name in _CHECKPOINT_FILES or _is_weights(name)


def hf_config_dict(arch: LlamaArch, dtype: torch.dtype) -> dict:
    """``config.json`` of a transformers LlamaForCausalLM with these numbers,
    dtype and RoPE written both as transformers 5 does (``dtype``,
    ``rope_parameters``) and as 4.x and other readers do (``torch_dtype``,
    ``rope_theta`` + ``rope_scaling``)."""
    d = arch.to_dict()
    scaling = d.pop("rope_scaling")
    name = str(dtype).replace("torch.", "")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, **d, "rope_scaling": scaling,
            "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": d["rope_theta"]},
            "torch_dtype": name, "dtype": name}


def write_safetensors(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
    """``tensors`` as a safetensors file, each copied to the CPU first (views of one
    fused storage share memory, which safetensors refuses)."""
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, path,
              metadata=metadata)


def _shards(sd: dict, limit: int) -> list:
    """Tensor names in order, cut into runs of at most ``limit`` bytes (a larger tensor alone)."""
    out, size = [[]], 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append(k)
        size += n
    return out


def save_checkpoint(path, arch: LlamaArch, sd: dict, eos_token_id=None, tokenizer=None,
                    generation_config: Optional[dict] = None, shard_bytes: int = SHARD_BYTES) -> None:
    """Write an HF Llama checkpoint directory from HF-named tensors ``sd``:
    config.json, generation_config.json (``generation_config``, e.g. the
    source's, with bos / eos / pad filled in where it has none), the weights
    in safetensors shards of at most ``shard_bytes`` (with an index when there
    are several), and the tokenizer's files when one is given. Atomic, as adapter saves are: a
    reader sees the old directory or the new one; an existing ``path`` is
    replaced only when it holds nothing but checkpoint files. The replaced
    checkpoint's weights and tokenizer go with it (without ``tokenizer``, the
    new one has none); other files it held (a README.md) are kept."""
    sd = {k: v for k, v in sd.items() if not (arch.tie_word_embeddings and k == "lm_head.weight")}
    check_state_dict(arch, sd, "save_checkpoint")
    dtype = sd["model.embed_tokens.weight"].dtype
    groups = _shards(sd, shard_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])

    def shard(keys):
        return lambda full: write_safetensors(full, {k: sd[k] for k in keys}, {"format": "pt"})

    writers = {n: shard(keys) for n, keys in zip(names, groups)}
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": {k: n for n, keys in zip(names, groups) for k in keys}}
        writers["model.safetensors.index.json"] = lambda full: atomic_write_json(full, index)
    writers["config.json"] = lambda full: atomic_write_json(full, hf_config_dict(arch, dtype))
    gen = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id if eos_token_id is None
           else eos_token_id, "pad_token_id": arch.pad_token_id}
    gen = {**{k: v for k, v in gen.items() if v is not None}, **(generation_config or {})}
    writers["generation_config.json"] = lambda full: atomic_write_json(full, gen)
    with tempfile.TemporaryDirectory() as tok_dir:
        if tokenizer is not None:
            tokenizer.save_pretrained(tok_dir)
            for n in os.listdir(tok_dir):
                writers.setdefault(n, lambda full, src=os.path.join(tok_dir, n): shutil.copyfile(src, full))
        # the old weights go with the old checkpoint: a stale index + shards next to a new
        # model.safetensors (or the reverse) is a second model some reader would load instead;
        # so does its tokenizer, whole: kept without a new one (or a tokenizer.model next to a
        # new tokenizer.json) it would be read as this model's, and may be another model's
        atomic_write_dir(path, writers, lambda n: _replaceable(n) or n in writers, "a checkpoint",
                         superseded=lambda n: _is_weights(n) or n in _TOKENIZER_FILES)

