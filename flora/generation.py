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
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from . import nvtx
from .model import attention_mask_4d, positions_from_mask


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
            logits = self.model._run_layers(input_ids, pos, mask, cache=self.cache, last_only=True)
        self.cache.prefill_len = None
        self.t = T  # next free slot
        return logits[:, -1]

    def _step(self) -> Tensor:
        mask = self.key_valid[:, None, None, :]
        return self.model._run_layers(self.ids, self.pos, mask, cache=self.cache)[:, -1]

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
    fold = model.adapter_active() and not model._folded and not model._merged
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


class Timer:
    """CUDA events on GPU (device time), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


class LatencyProbe:
    """One model's timed generation runs on a fixed random prompt: TTFT =
    prefill + first token, TPOT = mean of the remaining ``new_tokens - 1``
    decode steps (greedy). Enter it (``with``) to hold the model in inference
    mode and its decoder (static cache, CUDA graph captured at the first run)
    across runs, so several probes can be timed interleaved."""

    def __init__(self, model, batch: int, prompt_len: int, new_tokens: int,
                 use_cuda_graph: Optional[bool] = None, seed: int = 0):
        if batch < 1 or prompt_len < 1 or new_tokens < 2:
            raise ValueError("need batch >= 1, prompt_len >= 1, new_tokens >= 2")
        self.model, self.new_tokens = model, new_tokens
        dev = model.device
        self.use_cuda_graph = dev.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.ids = torch.randint(0, model.arch.vocab_size, (batch, prompt_len), generator=g).to(dev)
        self.valid = torch.ones(batch, prompt_len, dtype=torch.bool, device=dev)
        self.timer = Timer(dev)
        self._ctx: Optional[contextlib.ExitStack] = None
        self.dec: Optional[Decoder] = None

    def __enter__(self) -> "LatencyProbe":
        self._ctx = contextlib.ExitStack()
        self._ctx.enter_context(inference_mode(self.model))
        B, T = self.ids.shape
        self.dec = Decoder(self.model, B, T + self.new_tokens, self.use_cuda_graph)
        return self

    def __exit__(self, *exc) -> None:
        self.dec = None
        self._ctx.close()

    @property
    def graphed(self) -> bool:
        return self.dec is not None and self.dec.graph is not None

    def prefill(self):
        """Prefill + first token; returns the timer marks around it."""
        a = self.timer.mark()
        self.tok = self.dec.prefill(self.ids, self.valid).argmax(-1)
        return a, self.timer.mark()

    def step(self):
        """One decode step (+ its greedy token); returns the timer marks around it."""
        a = self.timer.mark()
        self.tok = self.dec.step(self.tok).argmax(-1)
        return a, self.timer.mark()


def measure_latency(model, batch: int, prompt_len: int, new_tokens: int,
                    use_cuda_graph: Optional[bool] = None, repeats: int = 5, warmup: int = 1,
                    seed: int = 0) -> dict:
    """Time to first token and time per output token (greedy, random prompts).

    Medians over ``repeats`` runs of a :class:`LatencyProbe` after ``warmup``
    runs; the CUDA graph is captured during warm-up (one capture), so TPOT
    measures replay. Returns seconds.
    """
    (r,) = measure_interleaved([model], batch, prompt_len, new_tokens, use_cuda_graph, repeats, warmup, seed)
    return {k: r[k] for k in ("ttft_s", "tpot_s", "batch", "prompt_len", "new_tokens", "cuda_graph",
                              "repeats", "device")}


def run_interleaved(probes: list, repeats: int, warmup: int = 1) -> list[dict]:
    """Time several entered probes (objects with ``prefill()``/``step()``
    returning timer marks, ``timer``, ``new_tokens`` and ``graphed``, such as
    :class:`LatencyProbe`) interleaved step by step so that drift of the
    machine (clock, memory bandwidth taken by neighbours) hits every model
    alike: each round prefills every probe, then runs decode step j of every
    probe before step j + 1 of any, the order reversed on every other step
    and round (A B, B A, ...). TPOT of a round is the mean of that probe's own
    step times. Each result has medians and the per-round ``ttft_runs`` /
    ``tpot_runs``, so ratios can be taken round by round."""
    if not probes or repeats < 1 or warmup < 0:
        raise ValueError("need at least one model, repeats >= 1 and warmup >= 0")
    n_steps = probes[0].new_tokens - 1
    if any(p.new_tokens - 1 != n_steps for p in probes):
        raise ValueError("interleaved probes must generate the same number of tokens")
    runs: list[list] = [[] for _ in probes]
    for k in range(warmup + repeats):
        order = list(range(len(probes)))[::(-1 if k % 2 else 1)]
        pre = {i: probes[i].prefill() for i in order}
        steps: dict = {i: [] for i in order}
        for j in range(n_steps):
            for i in order[::(-1 if j % 2 else 1)]:
                steps[i].append(probes[i].step())
        if k >= warmup:
            for i, p in enumerate(probes):
                tpot = sum(p.timer.elapsed(a, b) for a, b in steps[i]) / n_steps
                runs[i].append((p.timer.elapsed(*pre[i]), tpot))
    return [{"ttft_s": statistics.median(t for t, _ in rs), "tpot_s": statistics.median(t for _, t in rs),
             "ttft_runs": [t for t, _ in rs], "tpot_runs": [t for _, t in rs], "cuda_graph": p.graphed,
             "repeats": repeats} for p, rs in zip(probes, runs)]


def measure_interleaved(models: list, batch: int, prompt_len: int, new_tokens: int,
                        use_cuda_graph: Optional[bool] = None, repeats: int = 5, warmup: int = 1,
                        seed: int = 0) -> list[dict]:
    """Like :func:`measure_latency` for several models at once, their runs
    interleaved step by step (:func:`run_interleaved`)."""
    if repeats < 1 or warmup < 0:  # before any probe folds a model or allocates a cache
        raise ValueError("need at least one model, repeats >= 1 and warmup >= 0")
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(LatencyProbe(m, batch, prompt_len, new_tokens, use_cuda_graph, seed))
                  for m in models]
        res = run_interleaved(probes, repeats, warmup)
    for m, r in zip(models, res):
        r.update(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, device=str(m.device))
    return res
