"""Batched generation for FusedLlama: static KV cache, sampling, CUDA graphs.

Prompts are left-padded to one length T, so every row writes its next token
to the same cache slot; RoPE positions come from the attention mask. The
decode step has fixed shapes (ids [B, 1], positions [B, 1], one slot index,
the key-validity mask [B, T_max]), so on CUDA it is captured once per
generate call in a CUDA graph and replayed; the per-step inputs are copied
into the graph's static buffers. Sampling runs outside the graph.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from . import nvtx
from .layers import attention_mask_4d, positions_from_mask


class StaticKVCache:
    """Pre-allocated keys/values [layers, B, kv_heads, T_max, head_dim]."""

    def __init__(self, n_layers, batch, n_kv, max_len, head_dim, dtype, device):
        shape = (n_layers, batch, n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # decode write position
        self.prefill_len: Optional[int] = None  # set during prefill, None while decoding

    def update(self, layer: int, k: Tensor, v: Tensor):
        if self.prefill_len is not None:
            T = k.shape[2]
            self.k[layer, :, :, :T].copy_(k)
            self.v[layer, :, :, :T].copy_(v)
            return self.k[layer, :, :, :T], self.v[layer, :, :, :T]
        # index_copy_ with a device tensor index: valid inside a CUDA graph
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]


def sample_next(logits: Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> Tensor:
    """Next tokens [B] from last-position logits [B, V]: greedy or nucleus sampling."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = (cum - sorted_p) >= top_p  # keep the smallest prefix reaching top_p (top-1 always kept)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Decoder:
    """Prefill + fixed-shape decode steps over one static cache (optionally graphed)."""

    def __init__(self, model, batch: int, max_len: int, use_cuda_graph: bool):
        a = model.arch
        self.model, self.B, self.max_len = model, batch, max_len
        dev = model.device
        self.cache = StaticKVCache(a.num_hidden_layers, batch, a.num_key_value_heads, max_len,
                                   a.head_dim, model.dtype, dev)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)
        self.use_cuda_graph = use_cuda_graph and dev.type == "cuda"
        self.graph = None
        self.out: Optional[Tensor] = None

    def prefill(self, input_ids: Tensor, key_valid: Tensor) -> Tensor:
        B, T = input_ids.shape
        if T > self.max_len:
            raise ValueError(f"prompt length {T} exceeds the cache length {self.max_len}")
        self.key_valid.zero_()
        self.key_valid[:, :T] = key_valid
        pos = positions_from_mask(key_valid)
        self.pos.copy_(pos[:, -1:])
        slots = torch.arange(T, device=input_ids.device)
        mask = attention_mask_4d(key_valid, slots, slots)
        self.cache.prefill_len = T
        with nvtx.range("prefill"):
            logits = self.model.run_layers(input_ids, pos, mask, cache=self.cache, last_only=True)
        self.cache.prefill_len = None
        self.t = T  # next free slot
        return logits[:, -1]

    def _step(self) -> Tensor:
        mask = self.key_valid[:, None, None, :]
        return self.model.run_layers(self.ids, self.pos, mask, cache=self.cache)[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """Feed tokens [B] at the next slot; return logits [B, V] for the following one."""
        if self.t >= self.max_len:
            raise ValueError("KV cache is full")
        self.ids.copy_(tokens.view(-1, 1))
        self.pos.add_(1)
        self.cache.slot.fill_(self.t)
        self.key_valid[:, self.t] = True
        self.t += 1
        with nvtx.range("decode"):
            if not self.use_cuda_graph:
                return self._step()
            if self.graph is None:
                self._capture()
                if self.graph is None:  # capture failed: eager from now on
                    return self._step()
            self.graph.replay()
            return self.out

    def _capture(self) -> None:
        # warm up on a side stream (allocator + lazy init), then capture one step;
        # both warm-up and capture write the same slot, which replay rewrites.
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.out = self._step()
            self.graph = g
        except Exception as e:  # noqa: BLE001 - any capture failure -> eager fallback
            self.graph, self.use_cuda_graph = None, False
            warnings.warn(f"flora: CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                          f"falling back to eager decoding", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def inference_mode(model):
    """eval(), no grad, adapters folded while generating; state restored after."""
    was_training = model.training
    fold = model.adapter_active() and not model.folded and not model.merged
    model.eval()
    try:
        if fold:
            model.fold()
        with torch.no_grad():
            yield
    finally:
        if fold:
            model.unfold()
        model.train(was_training)


def _eos_set(eos_token_id) -> list:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def generate(model, input_ids: Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id=None, attention_mask: Optional[Tensor] = None,
             pad_token_id: Optional[int] = None, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, streamer=None,
             use_cuda_graph: Optional[bool] = None) -> Tensor:
    """Generate up to ``max_new_tokens`` for a left-padded batch.

    Returns ``[B, T + n]`` (prompt then new tokens; rows that hit an EOS are
    filled with ``pad_token_id`` (default: the first EOS) afterwards; stops
    when every row is done). ``streamer``: an object with ``put``/``end``
    (like transformers' streamers: ``put`` gets the prompt, then each step's
    tokens [B]) or a callable called with each step's tokens [B]; ``end()``
    is called once generation is over (also when nothing was generated).
    ``eos_token_id=None`` stops at the checkpoint's EOS (generation_config.json,
    else config.json, else the GGUF's), as transformers does; ``[]`` never stops early.

    Generation stops at the model's context (``max_position_embeddings``):
    a larger ``max_new_tokens`` is capped to it with a warning, so the KV
    cache is never sized beyond what the model can attend over.
    """
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a [batch, seq] tensor with seq >= 1, got "
                         f"{list(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    # written so that NaN fails too
    if not (isinstance(temperature, numbers.Real) and 0 <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if attention_mask is not None and (not torch.is_tensor(attention_mask)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        got = list(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, got {got}")
    dev = model.device
    # a copy: the result never aliases the caller's tensor (even with max_new_tokens=0)
    input_ids = input_ids.to(dev, copy=True)
    B, T = input_ids.shape
    key_valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(dev).bool())
    if attention_mask is not None and (~key_valid[:, -1]).any():
        raise ValueError("attention_mask must be left-padded (every row's last token real)")
    context = model.arch.max_position_embeddings
    if T + max_new_tokens > context and max_new_tokens > 0:
        capped = max(context - T, 1)  # a prompt already at the context still gets its next token
        if capped < max_new_tokens:
            warnings.warn(f"max_new_tokens={max_new_tokens} with a {T}-token prompt exceeds the model's "
                          f"context ({context} positions); generating at most {capped}", stacklevel=2)
            max_new_tokens = capped
    if use_cuda_graph is None:
        use_cuda_graph = dev.type == "cuda"
    if eos_token_id is None:  # as transformers: the checkpoint's EOS; [] never stops early
        eos_token_id = getattr(model, "generation_eos_token_id", None)
    eos = _eos_set(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if generator is None and seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)
    put = _streamer_fn(streamer)
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    out = [input_ids]
    try:
        if max_new_tokens > 0:
            _decode(model, input_ids, key_valid, int(max_new_tokens), temperature, top_p, eos, pad,
                    generator, put, use_cuda_graph, out)
    finally:  # a consumer waiting on the streamer (TextIteratorStreamer) must always be released
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
    return torch.cat(out, dim=1)


def _decode(model, input_ids, key_valid, max_new_tokens, temperature, top_p, eos, pad, generator, put,
            use_cuda_graph, out):
    """The prefill + decode loop of :func:`generate`; appends each step's tokens [B, 1] to ``out``."""
    B, T = input_ids.shape
    dev = input_ids.device
    with inference_mode(model):
        dec = Decoder(model, B, T + max_new_tokens, use_cuda_graph)
        logits = dec.prefill(input_ids, key_valid)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        eos_t = torch.tensor(eos, dtype=torch.long, device=dev) if eos else None
        for i in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_p, generator)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            out.append(tok[:, None])
            if put is not None:
                put(tok.cpu())
            if eos_t is not None:
                done |= torch.isin(tok, eos_t)
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = dec.step(tok)


def _streamer_fn(streamer) -> Optional[Callable]:
    if streamer is None:
        return None
    if hasattr(streamer, "put"):
        return streamer.put
    if callable(streamer):
        return streamer
    raise TypeError("streamer must have put()/end() or be callable")
