"""Reading Llama GGUF files (llama.cpp's format), dequantized to torch tensors.

Needs the optional ``gguf`` package (``pip install flora[gguf]``); the
tokenizer additionally needs transformers. The weights are read with gguf's
own reader and dequantizer and renamed to the Hugging Face Llama names, so a
GGUF file becomes the same ``(LlamaArch, state dict)`` pair a checkpoint
directory gives (flora.checkpoint). llama.cpp stores q and k with their rows
permuted for its RoPE layout; they are permuted back here.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import torch

from .checkpoint import CheckpointError, arch_from_config_dict, check_state_dict
from .config import LlamaArch
from .fileio import publish_dir

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# tensors llama.cpp may add that carry no weights the forward needs
_SKIP = ("rope_freqs",)


def is_gguf(path) -> bool:
    """True for a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _reader(path: str):
    try:
        import gguf
    except ImportError:
        raise ImportError(f"{path}: reading GGUF files needs the 'gguf' package: "
                          f"pip install 'flora[gguf]' (or pip install gguf)") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return gguf, gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct.error/... on a bad file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_metadata(path) -> dict:
    """The GGUF key/value metadata (tokenizer vocab arrays left out)."""
    _, reader = _reader(os.fspath(path))
    return {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}


def _arch(reader, path: str) -> LlamaArch:
    name = _field(reader, "general.architecture")
    if name != "llama":
        raise CheckpointError(
            f"{path}: GGUF architecture is {name!r}; flora.FusedLlama only loads Llama models "
            f"(general.architecture 'llama')")

    def need(key):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks llama.{key}")
        return v

    d, nh = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise CheckpointError(f"{path}: GGUF metadata gives no vocabulary size")
    cfg = {
        "model_type": "llama", "hidden_size": d, "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": nh,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv") or nh),
        "intermediate_size": int(need("feed_forward_length")), "vocab_size": int(vocab),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    rot = _field(reader, "llama.rope.dimension_count")
    if rot is not None and int(rot) != d // nh:
        raise CheckpointError(f"{path}: partial rotary embeddings (rope.dimension_count {rot} != "
                              f"head_dim {d // nh}) are not supported")
    kind = _field(reader, "llama.rope.scaling.type", "none")
    if kind == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear",
                               "factor": float(_field(reader, "llama.rope.scaling.factor"))}
    elif kind not in ("none", None):
        raise CheckpointError(f"{path}: GGUF rope scaling {kind!r} is not supported")
    return arch_from_config_dict(cfg, where=path)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (rows (h, 2, half) <- (h, half, 2))."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(name: str):
    base, _, suffix = name.rpartition(".")
    if suffix != "weight":
        return None
    if base.startswith("blk."):
        _, i, part = base.split(".", 2)
        hf = _LAYER_NAMES.get(part)
        return None if hf is None else f"model.layers.{i}.{hf}.weight"
    hf = _TOP_NAMES.get(base)
    return None if hf is None else f"{hf}.weight"


def load_gguf(path, dtype: torch.dtype = torch.float32) -> tuple[LlamaArch, dict]:
    """Read and dequantize a Llama GGUF file: ``(LlamaArch, {HF name: tensor})``."""
    path = os.fspath(path)
    gguf, reader = _reader(path)
    arch = _arch(reader, path)
    sd, unknown = {}, []
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            if not t.name.startswith(_SKIP):
                unknown.append(t.name)
            continue
        try:
            w = gguf.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {t.name} uses quantization {t.tensor_type.name}, which the installed "
                f"gguf package cannot dequantize; use a file in F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_x "
                f"or a K-quant") from None
        w = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)  # a copy: the file is memory-mapped read-only
        if ".attn_q." in t.name:
            w = _unpermute(w, arch.num_attention_heads)
        elif ".attn_k." in t.name:
            w = _unpermute(w, arch.num_key_value_heads)
        sd[hf] = w
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise CheckpointError(f"{path}: tensor(s) a plain Llama does not have: "
                              f"{', '.join(unknown[:5])}{more}")
    check_state_dict(arch, sd, path)
    return arch, sd


def tokenizer_cache_path(path) -> str:
    """Where the converted tokenizer of GGUF file ``path`` is cached: one entry
    per file identity (real path, size, mtime) and transformers version."""
    import transformers

    from .pretrained import cache_dir

    path = os.path.realpath(os.fspath(path))
    st = os.stat(path)
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    return os.path.join(cache_dir(), "tokenizers",
                        f"{os.path.basename(path)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


def load_gguf_tokenizer(path):
    """The file's own tokenizer (transformers' GGUF conversion), with its chat template.

    The conversion parses the file's whole vocabulary (~10 s for SmolLM2's
    49k tokens), so its result is kept in the flora cache
    (:func:`tokenizer_cache_path`) and later calls load that (~0.1 s). A
    cache entry that cannot be written or read is skipped."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    cached = tokenizer_cache_path(path)
    if os.path.isdir(cached):
        try:
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        except Exception:  # a damaged entry (whatever transformers raises for it): convert again
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                        gguf_file=os.path.basename(path), local_files_only=True)
    if getattr(tok, "chat_template", None) is None:
        _, reader = _reader(path)
        tok.chat_template = _field(reader, "tokenizer.chat_template")
    publish_dir(cached, tok.save_pretrained)
    return tok
