"""Batched generation for FusedLlama: static KV cache, sampling, CUDA graphs.

Prompts are left-padded to one length T, so every row writes its next token
to the same cache slot; RoPE positions come from the attention mask. The
decode step has fixed shapes (ids [B, 1], positions [B, 1], one slot index,
an additive key mask), and reads only the filled part of the cache: the
first ``window`` slots, the filled length rounded up to a bucket (64 slots
on CPU, 256 on CUDA), so a step costs what the context costs, and the step
has one shape per bucket. On CUDA each bucket's step is captured once in a
CUDA graph and replayed; the per-step inputs are copied into the graph's
static buffers outside it. Sampling runs outside the graph. The prefill of a
short prompt (batch x length up to :func:`prefill_graph_tokens`) is a CUDA
graph too: the prompt padded at its end to a multiple of 64 tokens (of 256
above 512), one graph per length (an eager prefill of a short prompt is bound by the host's launches);
eager CUDA generation pads it the same way, so both run the same kernels.

``compile=True`` runs the step through ``torch.compile(fullgraph=True)``
(gpt-fast's recipe: norms, RoPE and residual adds fuse around the GEMMs).
Decoders that capture graphs or compile are kept per (batch, cache length,
dtype, device, adapter structure) and reused by later generate() calls
(see :func:`decoder_for`).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import nvtx, ops
from .layers import (attention_mask_4d, causal_prompt, check_id_dtype, check_token_ids, cpu_decode_kernel_takes,
                     positions_from_mask, slot_mask)


def bucket_size(device: torch.device) -> int:
    """Slots per attention-window bucket: one CUDA graph (or compiled shape) each."""
    return 256 if device.type == "cuda" else 64


def prefill_graph_tokens() -> int:
    """Prompts of at most this many tokens (batch x the padded prompt length,
    :meth:`Decoder._padded_length`) run their prefill as a CUDA graph: below it
    an eager prefill is bound by the host's launches, above it by the GPU.
    ``FLORA_PREFILL_GRAPH_TOKENS`` sets it (0: every prefill eager)."""
    v = os.environ.get("FLORA_PREFILL_GRAPH_TOKENS", "").strip()
    if not v:
        return 4096
    if not v.isdigit():
        raise ValueError(f"FLORA_PREFILL_GRAPH_TOKENS must be an integer >= 0, got {v!r}")
    return int(v)


class StaticKVCache:
    """Pre-allocated keys/values, one [B, kv_heads, T_max, head_dim] tensor per layer.

    Prefill writes slots [0, T) and attention reads them; a decode step writes
    slot ``slot`` and attention reads the window [0, ``length``). Separate
    tensors per layer (not views of one [layers, ...] tensor): a compiled step
    then writes each layer's slot in place instead of copying the cache back."""

    def __init__(self, n_layers, batch, n_kv, max_len, head_dim, dtype, device):
        shape = (batch, n_kv, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # decode write position
        self.prefill_len: Optional[int] = None  # set during prefill, None while decoding
        # a prefill of some rows only (Decoder.admit): their batch indices, the first slot
        # it writes, and the first its attention reads (earlier: a reused prompt prefix)
        self.prefill_rows: Optional[Tensor] = None
        self.prefill_start = 0
        self.prefill_from = 0
        self.length = max_len  # decode: keys read per step
        self.n: Optional[int] = None  # decode: the first n rows step (None: all)
        self._windows: dict = {}  # (length, n) -> per-layer views of the window, made once
        self._rows: dict = {}  # n -> per-layer views of the first n rows, made once
        # compiled CPU decode: whether the attention op runs flora's kernel for this step's
        # window (Decoder._step asks before the trace; flora.layers.attention)
        self.decode_kernel: Optional[bool] = None
        self.key_mask: Optional[Tensor] = None  # decode: the additive key mask [n, length] (attend)

    def window(self, layer: int):
        if torch.compiler.is_compiling():
            L, n = self.length, self.n
            return self.k[layer][:n, :, :L], self.v[layer][:n, :, :L]
        w = self._windows.get((self.length, self.n))
        if w is None:
            L, n = self.length, self.n
            w = self._windows[(L, n)] = [(k[:n, :, :L], v[:n, :, :L]) for k, v in zip(self.k, self.v)]
        return w[layer]

    def stepped(self, layer: int) -> tuple:
        """(keys, values) of the rows a decode step runs: all, or the first n."""
        if self.n is None:
            return self.k[layer], self.v[layer]
        r = self._rows.get(self.n)
        if r is None:
            r = self._rows[self.n] = [(k[:self.n], v[:self.n]) for k, v in zip(self.k, self.v)]
        return r[layer]

    def clear(self, start: int, stop: int) -> None:
        """Zero slots [start, stop) of every layer, in one call (an earlier
        call's keys/values: masked, and never a NaN)."""
        if stop > start:
            torch._foreach_zero_([t[:, :, start:stop] for t in self.k + self.v])

    def update_rotated(self, layer: int, qk: Tensor, v: Tensor, cos: Tensor, sin: Tensor):
        """A decode step's (q, keys, values): RoPE over q|k [B, T, nq + nkv, hd]
        writes the rotated k, and v [B, T, nkv, hd], at slot in one pass
        (flora.ops.rope_cache); None during prefill (update takes that)."""
        if self.prefill_len is not None:
            return None
        q = ops.rope_cache(qk, v, cos, sin, *self.stepped(layer), self.slot)
        return (q, *self.window(layer))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Optional[Tensor]:
        """A decode step's attention output [B, nq * hd] from the projections q
        [B, nq * hd], k and v [B, nkv * hd]: RoPE, the write at slot and the
        attention over the window in one op (flora.ops.rope_cache_attention).
        None where the pieces run instead: a prefill (update), no key mask set,
        and under torch.compile (update_rotated, then layers.attention: Inductor
        fuses RoPE with the write, and the step picks the attention's form)."""
        if self.prefill_len is not None or self.key_mask is None or torch.compiler.is_compiling():
            return None
        return ops.rope_cache_attention(q, k, v, cos, sin, *self.stepped(layer), self.slot, self.key_mask)

    def update(self, layer: int, k: Tensor, v: Tensor):
        if self.prefill_rows is not None:  # rows joining a running batch: slots start .. start+T-1
            s, T = self.prefill_start, k.shape[2]
            self.k[layer][:, :, s:s + T].index_copy_(0, self.prefill_rows, k)
            self.v[layer][:, :, s:s + T].index_copy_(0, self.prefill_rows, v)
            if self.prefill_from < s:  # the rows' keys from their reused prefixes on
                w = slice(self.prefill_from, s + T)
                return (self.k[layer][:, :, w].index_select(0, self.prefill_rows),
                        self.v[layer][:, :, w].index_select(0, self.prefill_rows))
            return k, v
        if self.prefill_len is not None:
            T = k.shape[2]
            kl, vl = self.k[layer][:, :, :T], self.v[layer][:, :, :T]
            kl.copy_(k)
            vl.copy_(v)
            return kl, vl
        # index_copy_ with a device tensor index: valid inside a CUDA graph
        kr, vr = self.stepped(layer)
        kr.index_copy_(2, self.slot, k)
        vr.index_copy_(2, self.slot, v)
        return self.window(layer)


@dataclass
class Sampling:
    """How a row picks its next token; the defaults ask for nothing (greedy, no
    penalty, no bias). ``temperature`` 0: greedy (the argmax of the penalised,
    biased logits, as vLLM's); ``top_k`` 0: no limit; ``min_p``: drop tokens less
    likely than min_p x the most likely (after temperature). ``repetition_penalty``
    (> 0, 1: none; transformers' and vLLM's): over the tokens of the prompt and the
    output so far, a logit > 0 divided by it, any other multiplied.
    ``presence_penalty`` / ``frequency_penalty`` (OpenAI's, in [-2, 2]): over the
    output's tokens only, each logit less frequency x its count, less presence if
    it occurs. ``logit_bias``: {token id: bias in [-100, 100]} added to the logits
    (at most 300, OpenAI's bound). Checked by :func:`check_sampling`."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None

    @property
    def adjusts(self) -> bool:
        """It changes the logits before sampling (a penalty or a bias): greedy is then not
        the model's argmax, and a row needs its :class:`Penalties`."""
        return bool(self.repetition_penalty != 1 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias)


class Penalties:
    """What a :class:`Sampling`'s penalties and ``logit_bias`` read for B rows sampling
    alike, on the logits' device: the bias [V], which tokens each row's prompt and
    output hold [B, V] (repetition), each output token's count [B, V] (presence,
    frequency); each made only when its setting asks for it. :meth:`add` after
    each step's tokens, :meth:`__call__` on that step's logits. ``banned``: token ids
    no row may draw while it is set (vLLM's ``min_tokens``: the tokens that would end
    an answer, -inf until it has that many; its owner sets it to None then)."""

    def __init__(self, s: Sampling, prompts: Tensor, vocab: int, valid: Optional[Tensor] = None,
                 banned=None):
        """``prompts`` [B, T] token ids (``valid`` [B, T] bool: the real ones, else all);
        ``banned``: token ids (None or none: no mask)."""
        self.s, dev, B = s, prompts.device, prompts.shape[0]
        self.bias = self.seen = self.counts = None
        self.banned = torch.tensor(sorted(banned), dtype=torch.long, device=dev) if banned else None
        if s.logit_bias:
            self.bias = torch.zeros(vocab, device=dev)
            self.bias[torch.tensor(list(s.logit_bias), dtype=torch.long, device=dev)] = torch.tensor(
                list(s.logit_bias.values()), dtype=torch.float32, device=dev)
        if s.repetition_penalty != 1:  # padding scattered into a spare column V, dropped
            ids = prompts if valid is None else prompts.masked_fill(~valid, vocab)
            self.seen = torch.zeros(B, vocab + 1, dtype=torch.bool, device=dev).scatter_(1, ids, True)[:, :vocab]
        if s.presence_penalty or s.frequency_penalty:
            self.counts = torch.zeros(B, vocab, device=dev)

    def add(self, tokens: Tensor) -> None:
        """Each row's next token [B] (on the device: no sync)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))

    def __call__(self, logits: Tensor) -> Tensor:
        """The logits [B, V] (fp32) biased, then penalised (vLLM's order: the bias is a
        logits processor run before its penalties), then the banned tokens masked out."""
        s = self.s
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            r = s.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / r, logits * r), logits)
        if self.counts is not None:
            logits = logits - s.frequency_penalty * self.counts - s.presence_penalty * (self.counts > 0)
        if self.banned is not None:  # after the rest: no bias or penalty brings them back
            logits = logits.index_fill(-1, self.banned, -math.inf)
        return logits


def sample_next(logits: Tensor, s: Sampling, generator: Optional[torch.Generator] = None,
                penalties: Optional[Penalties] = None) -> Tensor:
    """Next tokens [B] from last-position logits [B, V] sampled as ``s`` asks
    (``penalties``: the rows' state when ``s.adjusts``, applied first; ``generator``:
    the batch's, its rows' draws in row order).

    The order: the bias and penalties on the raw logits (vLLM's), then greedy's
    argmax, or temperature, top-k, top-p, min-p (transformers' warpers' order). Each
    filter keeps tokens by their rank or their ratio to the top token, which none of
    them removes, so min-p after top-p keeps what both keep on the temperature's
    distribution (vLLM applies min-p first: its top-p then reads renormalised
    probabilities, and may keep fewer)."""
    logits = logits.float()
    if penalties is not None:
        logits = penalties(logits)
    if s.temperature <= 0:
        return logits.argmax(-1)
    tokens = sample_rows(logits, [s] * logits.shape[0], generator)
    if bool((tokens < 0).any()):
        raise ValueError(f"sampling: rows {(tokens < 0).nonzero().flatten().tolist()} have no finite "
                         f"probability to draw from (NaN or inf logits)")
    return tokens


def _per_row(values: list, dev):
    """One setting of rows sampling together: a number when all share it, else a column [B, 1]."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float32, device=dev)[:, None]


def sample_rows(logits: Tensor, samplings: list, generators=None) -> Tensor:
    """Next tokens [B] of rows each sampling as its own :class:`Sampling` (temperature > 0;
    penalties applied already), in one pass over the batch: a server's rows sample with a
    few operations a step, not a few a row (on a GPU each is a launch, and each row's token
    read back a sync). ``generators``: None (torch's default), one for the batch (its rows'
    draws in row order), or one a row (None: the default). :func:`sample_next` is this
    for rows sampling alike, so a row samples the same tokens alone or in any batch.

    One uniform number a row, from its generator, picks its token by the inverse of its
    distribution's cumulative sum (what torch.multinomial does for one sample): a row's
    draws depend on its generator only. A row with nothing to draw from (NaN logits) gets -1."""
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    ks = [s.top_k if 0 < s.top_k < V else V for s in samplings]
    if min(ks) < V:  # ties at the k-th logit stay in, as in transformers
        top = logits.topk(max(k for k in ks if k < V), dim=-1).values
        kth = top.gather(1, torch.tensor([k - 1 if k < V else 0 for k in ks], device=dev)[:, None])
        kth = kth.masked_fill(torch.tensor([k >= V for k in ks], device=dev)[:, None], -math.inf)
        logits = logits.masked_fill(logits < kth, -math.inf)
    # from the row's max: a tiny temperature (1e-40) then sends the rest to -inf, not the max to inf
    # (inf - inf: NaN probabilities)
    t = _per_row([s.temperature for s in samplings], dev)
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / t, dim=-1)
    ps = [s.top_p if s.top_p < 1.0 else math.inf for s in samplings]  # 1: no cut (not a rounding's)
    if min(ps) < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = (cum - sorted_p) >= _per_row(ps, dev)  # keep the smallest prefix reaching top_p (top-1 kept)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
    mp = [s.min_p for s in samplings]
    if max(mp) > 0:  # a ratio to the top token: the same on probabilities not renormalised
        probs = probs.masked_fill(probs < _per_row(mp, dev) * probs.amax(-1, keepdim=True), 0.0)
    cdf = probs.cumsum(-1)  # non-decreasing: adding a non-negative number never lowers a float
    total = cdf[:, -1:]
    if isinstance(generators, (list, tuple)):  # a draw a row from its own (None: torch's default)
        u = torch.cat([torch.rand(1, generator=g, device=dev) for g in generators])[:, None]
    else:
        u = torch.rand(B, 1, generator=generators, device=dev)
    # the first token whose cumulative sum passes u x total: one of positive probability (strictly below
    # the total, which u x total may round up to)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    # -1: a row with nothing to draw from (NaN logits): its caller's to refuse (no read here: no sync)
    return tokens.masked_fill(~(torch.isfinite(total) & (total > 0)).squeeze(-1), -1)


def _decode(model, ids: Tensor, pos: Tensor, mask: Tensor, cache: StaticKVCache,
            rows: Optional[Tensor] = None) -> Tensor:
    return model.run_layers(ids, pos, mask, cache=cache, rows=rows)[:, -1]


_compiled_decode: dict = {}


def inductor_cache_key():
    """A post-grad pass that does nothing but put flora's op schemas into
    Inductor's cache key (its ``uuid``). Inductor keys a compiled graph on the
    graph, not on the schemas of the custom ops it calls: a step compiled
    against an older flora, whose ``flora::ffl`` took fewer arguments, was
    reused from the on-disk cache and its C++ wrapper passed the arguments
    short ("Expected Tensor but got Int")."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from .ops import SCHEMAS

    class _FloraSchemas(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return hashlib.sha256(repr(sorted(SCHEMAS.items())).encode()).hexdigest()

    return _FloraSchemas()


def compiled_decode(device_type: str = "cpu"):
    """The decode step under torch.compile (one compiled function per device
    type for every model: dynamo guards recompile for another structure or
    window length). On the CPU the graph's wrapper is generated C++
    (cpp_wrapper): the Python wrapper's per-kernel calls cost ~4 ms of a
    ~37 ms SmolLM2-135M step (bench/RESULTS.md)."""
    fn = _compiled_decode.get(device_type)
    if fn is None:
        opts = {"post_grad_custom_post_pass": inductor_cache_key()}
        if device_type == "cpu":
            opts["cpp_wrapper"] = True
        fn = _compiled_decode[device_type] = torch.compile(_decode, fullgraph=True, options=opts)
    return fn


def admit_span(prompts: list, reused: Optional[list] = None) -> int:
    """The tokens each row joining in one :meth:`Decoder.admit` computes (its last S):
    the longest part any of them must, so a row whose reused prefix is longer than
    its length less S recomputes some of it (and its copy is that length less S)."""
    reused = reused or [None] * len(prompts)
    return max(len(p) - (r[1] if r else 0) for p, r in zip(prompts, reused))


# A prefill forward's fixed cost (the weights streamed once; on a GPU, its launches) in the tokens a row
# computes (bench/admit_cost.py measures it): the default of `flora serve`, which learns its machine's from
# its own prefill timings (flora.forward_cost.ForwardCostFit; Engine(admit_cost=N) pins it). CPU: SmolLM2-135M on the 2-core CPU, batch 1
# (bench/RESULTS.md): a 1-token forward 17.2 ms, a 256-token one 348 ms (1.30 ms a token past the first):
# 17.2 / 1.30 = 13 tokens' work for the forward itself
ADMIT_FORWARD_TOKENS = 13
# CUDA: an estimate until a device run measures it (issue 13): an eager 1B bf16 forward launches ~200
# kernels (~3 ms of host time) against ~5 us a token of matrix work (2.5 GFLOP at ~500 TFLOP/s)
ADMIT_FORWARD_TOKENS_BY_DEVICE = {"cpu": ADMIT_FORWARD_TOKENS, "cuda": 512}


def admit_forward_tokens(device) -> int:
    """A prefill forward's own cost in tokens on ``device`` (its type's entry; the CPU's else): the
    engine's until its timings tell it its machine's."""
    return ADMIT_FORWARD_TOKENS_BY_DEVICE.get(torch.device(device).type, ADMIT_FORWARD_TOKENS)


def admit_groups(prompts: list, reused: Optional[list] = None, keys: Optional[list] = None,
                 forward_tokens: int = ADMIT_FORWARD_TOKENS) -> list:
    """Rows joining together split into groups of like length, one :meth:`Decoder.admit`
    each, so that a short prompt beside a long one does not compute the long one's length
    in padding. A group costs ``forward_tokens`` (:func:`admit_forward_tokens`) plus its
    distinct prompts times its :func:`admit_span`; the split is the cheapest (then the
    fewest groups): groups of consecutive rows in order of their span, by dynamic
    programming. ``keys``: each row's prompt as Decoder.admit tells equal ones apart
    (prefilled once: one row, one group; default the prompt). Returns the groups' row
    indices, each in order, shortest first."""
    reused = reused or [None] * len(prompts)
    keys = keys or [tuple(p) for p in prompts]
    units: dict = {}  # a distinct prompt's rows
    for i, k in enumerate(keys):
        units.setdefault(k, []).append(i)
    order = sorted(units.values(), key=lambda u: admit_span([prompts[u[0]]], [reused[u[0]]]))
    need = [admit_span([prompts[u[0]]], [reused[u[0]]]) for u in order]
    best, cut = [(0, 0)] + [None] * len(order), [0] * (len(order) + 1)  # best[i]: (cost, forwards) of order[:i]
    for i in range(1, len(order) + 1):
        for j in range(i):  # the last group: order[j:i], its span need[i - 1]
            c = (best[j][0] + forward_tokens + (i - j) * need[i - 1], best[j][1] + 1)
            if best[i] is None or c < best[i]:
                best[i], cut[i] = c, j
    groups, i = [], len(order)
    while i:
        groups.append(sorted(x for u in order[cut[i]:i] for x in u))
        i = cut[i]
    return groups[::-1]


def kv_slots(kv, n: int) -> Tensor:
    """Keys and values [layers, 2, kv_heads, >= n, head_dim] of at least the first n
    slots of ``kv``: that tensor, or a list of such holding consecutive slots (the
    prefix cache's blocks), only those that hold the n joined (one copy)."""
    if isinstance(kv, Tensor):
        return kv
    parts, m = [], 0
    for part in kv:
        if m >= n:
            break
        parts.append(part)
        m += part.shape[3]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 3)


class Decoder:
    """Prefill + fixed-shape decode steps over one static cache (optionally
    compiled, optionally graphed: one CUDA graph per window bucket)."""

    def __init__(self, model, batch: int, max_len: int, use_cuda_graph: bool, compile: bool = False,
                 bucket: Optional[int] = None):
        a = model.arch
        self._model = weakref.ref(model)  # a kept decoder must not keep its model alive
        self.B, self.max_len = batch, max_len
        dev = model.device
        self.device, self.bucket = dev, bucket or bucket_size(dev)
        self.cache = StaticKVCache(a.num_hidden_layers, batch, a.num_key_value_heads, max_len,
                                   a.head_dim, model.dtype, dev)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        # additive key mask (0: a real key, -inf: padding or not yet written), kept across steps
        self.mask = torch.full((batch, 1, 1, max_len), float("-inf"), dtype=model.dtype, device=dev)
        # each row's adapter slot in a stacked model (-1: the base), written before each prefill
        self.rows = (None if getattr(model, "stacked", None) is None
                     else torch.full((batch,), -1, dtype=torch.long, device=dev))
        self._masks: dict = {}  # (window length, rows) -> views of the mask (_mask)
        self._views: dict = {}  # rows -> views of the step's inputs
        self.use_cuda_graph = use_cuda_graph and dev.type == "cuda"
        self.compile = compile
        self._fn = compiled_decode(dev.type) if compile else _decode
        self.graphs: dict = {}  # (window length, rows) -> (CUDAGraph, its output logits)
        # (padded length, causal) -> _PrefillGraph: static inputs, the graph once captured
        self.prefill_graphs: dict = {}
        # On CUDA a short prompt is padded to a prefill graph's length with graphs or without,
        # so eager and graphed generation run the same shapes, the same kernels, the same
        # tokens (tests set it on the CPU too)
        self.pad_prefill = dev.type == "cuda"
        self._pool = None  # the graphs share one memory pool
        self.t = 0
        self.written = 0  # slots [0, written) may hold keys/values of earlier calls

    @property
    def model(self):
        return self._model()

    @property
    def graph(self):
        """A captured graph (None before the first capture or without graphs)."""
        return next(iter(self.graphs.values()), (None,))[0]

    def window(self, t: int) -> int:
        """Keys read by the step that writes slot t: t + 1 rounded up to the
        bucket; compiled without graphs, up to the bucket times a power of two,
        so that a 2048-slot cache compiles at most 6 window lengths (dynamo
        runs a function eagerly once it has compiled 8 variants)."""
        n = -(-(t + 1) // self.bucket)
        if self.compile and not self.use_cuda_graph:
            n = 1 << (n - 1).bit_length()
        return min(self.max_len, n * self.bucket)

    def prefill(self, input_ids: Tensor, key_valid: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        B, T = input_ids.shape
        if T > self.max_len:
            raise ValueError(f"prompt length {T} exceeds the cache length {self.max_len}")
        if self.rows is not None:
            self.rows.copy_(rows)
        self.mask.fill_(float("-inf"))
        self.mask[:, 0, 0, :T].masked_fill_(key_valid, 0.0)
        self.cache.clear(T, self.written)  # slots an earlier call wrote (a fresh cache is zeros)
        pos = positions_from_mask(key_valid)
        self.pos.copy_(pos[:, -1:])
        causal = causal_prompt(key_valid)
        Tp = self._padded_length(T)
        with nvtx.range("prefill"):
            logits = None if Tp is None else self._prefill_padded(input_ids, pos, key_valid, causal, Tp)
            if logits is None:  # eager: unpadded, or the capture failed
                logits = self._run_prefill(input_ids, pos, None if causal else slot_mask(key_valid), None)
        self.t = T  # next free slot
        self.written = max(T, Tp or 0)
        return logits

    def restart(self, t: int = 0) -> None:
        """Continuous batching: every row free (its keys masked), the next step at slot t."""
        self.mask.fill_(float("-inf"))
        self.t = t

    def advance(self, t: int) -> None:
        """Continuous batching: the next step at slot ``t`` (at least the current one), so
        that a prompt longer than the current slot can join (:meth:`admit` ends it at t - 1).
        The running rows skip slots [self.t, t): their positions go on (RoPE counts tokens,
        not slots), and those slots need nothing done: a row's mask opens only the slots
        the row writes (:meth:`step`: the slot it writes, :meth:`admit`: its prompt's), so
        they stay masked, and they hold zeros, finite for SDPA's masked keys: when the row
        joined, :meth:`admit` zeroed every slot of it a step may have written, and since
        then only the row's own writes reach it, each at a slot before the current one."""
        if t < self.t:
            raise ValueError(f"the batch's next slot only advances: {self.t} -> {t}")
        self.t = t

    def admit(self, rows: list, prompts: list, pad: int, adapters: Optional[list] = None,
              reused: Optional[list] = None) -> Tensor:
        """Continuous batching: prefill ``prompts`` (token id lists) into batch
        rows ``rows`` of a running decoder, each prompt ending at slot ``t - 1``,
        so that the next :meth:`step` feeds every row (old and new) at slot
        ``t``. A row's keys are its own slots only (its mask is reset), its
        positions its prompt's from 0; ``adapters``: each new row's adapter name
        (None: the base) in a stacked model, as generate() takes them.
        ``reused``: per row, None or ``(kv, c)``: the keys and values of its
        prompt's first ``c`` tokens (``kv`` [layers, 2, kv_heads, >= c, head_dim],
        as :meth:`kv` reads them, or a list of such in slot order: :func:`kv_slots`;
        c < the prompt's length), copied in instead of computed. All rows prefill their last S tokens, S the longest part any
        row must compute, attending to the copied slots before them. Returns
        the new rows' next-token logits [n, V]."""
        T = max(len(p) for p in prompts)
        if T > self.t:
            raise ValueError(f"a prompt of {T} tokens cannot end at slot {self.t - 1}")
        reused = reused or [None] * len(prompts)
        # the same prompt for the same adapter twice (n choices of one prompt, clients sending
        # alike): prefilled once, its row copied
        seen: dict = {}
        src = [seen.setdefault((tuple(p), None if adapters is None else adapters[i]), i)
               for i, p in enumerate(prompts)]
        if len(seen) < len(prompts):
            u = sorted(seen.values())
            logits = self.admit([rows[i] for i in u], [prompts[i] for i in u], pad,
                                None if adapters is None else [adapters[i] for i in u], [reused[i] for i in u])
            for i, j in enumerate(src):
                if j != i:
                    self._copy_row(rows[j], rows[i])
            return logits[[u.index(j) for j in src]]
        S = admit_span(prompts, reused)
        if S < 1:
            raise ValueError("a reused prefix must leave at least one prompt token to compute")
        dev = self.device
        ids, valid = left_pad(prompts, pad)
        ids, valid = ids.to(dev), valid.to(dev).bool()
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        start = self.t - T
        pos = positions_from_mask(valid)
        self.mask.index_fill_(0, idx, float("-inf"))
        open_ = torch.zeros(valid.shape, dtype=self.mask.dtype, device=dev).masked_fill_(~valid, float("-inf"))
        self.mask[:, 0, 0, start:self.t].index_copy_(0, idx, open_)
        self.pos.index_copy_(0, idx, pos[:, -1:])
        c = self.cache
        # The rows' slots held an earlier request's keys and values: those this prefill neither computes
        # nor copies stay masked, but attention still reads them (this prefill's keys before the computed
        # ones, each decode step's window), and a masked NaN or inf reaches the row where the attention
        # is SDPA (0 x NaN; the decode kernel skips masked keys, but not every window or build runs it):
        # zeros, every slot a step may have written, before the copies and the prefill fill theirs
        end = max(self.written, self.t)
        for kv in c.k + c.v:
            kv[:, :, :end].index_fill_(0, idx, 0.0)
        self.written = end
        for row, p, r in zip(rows, prompts, reused):
            n = len(p) - S  # the reused tokens this prefill does not recompute
            if r is not None and n > 0:
                first, kv = self.t - len(p), kv_slots(r[0], n)
                for layer in range(len(c.k)):
                    c.k[layer][row, :, first:first + n].copy_(kv[layer, 0, :, :n])
                    c.v[layer][row, :, first:first + n].copy_(kv[layer, 1, :, :n])
        sub = None
        if self.rows is not None:
            self.rows.index_copy_(0, idx, self.model.adapter_rows(adapters, len(rows)))
            sub = self.rows.index_select(0, idx)
        c.prefill_len, c.prefill_rows, c.prefill_start, c.prefill_from = S, idx, self.t - S, start
        try:
            if S == T:
                mask = None if causal_prompt(valid) else slot_mask(valid)
            else:  # queries: the last S slots; keys: the whole window, the reused ones included
                slots = torch.arange(T, device=dev)
                mask = attention_mask_4d(valid, slots[T - S:], slots)
            return self.model.run_layers(ids[:, T - S:], pos[:, T - S:], mask, cache=c, last_only=True,
                                         rows=sub)[:, -1]
        finally:
            c.prefill_len, c.prefill_rows = None, None

    def place(self, row: int, first: int, n: int, adapter=None, reused: Optional[tuple] = None) -> None:
        """Continuous batching, a prompt prefilled in chunks over the next steps (:meth:`fill`):
        row ``row`` takes a prompt of ``n`` tokens at slots ``first`` .. first + n - 1 (its end may
        lie past the current slot t). Its mask opens those slots only, its slots a step may have
        written hold zeros (an earlier request's keys: as :meth:`admit`), but ``reused`` (None or
        ``(kv, c)``, as admit's) copied into its first c; ``adapter``: its adapter (stacked model).
        Nothing is computed here."""
        c = self.cache
        self.mask[row].fill_(float("-inf"))
        self.mask[row, 0, 0, first:first + n] = 0.0
        end = max(self.written, self.t)
        for kv in c.k + c.v:
            kv[row, :, :end].zero_()
        self.written = end
        if reused is not None:
            m = reused[1]
            kv = kv_slots(reused[0], m)
            for layer in range(len(c.k)):
                c.k[layer][row, :, first:first + m].copy_(kv[layer, 0, :, :m])
                c.v[layer][row, :, first:first + m].copy_(kv[layer, 1, :, :m])
        if self.rows is not None:
            self.rows[row] = self.model.adapter_rows([adapter], 1)[0]

    def fill(self, row: int, ids: list, first: int, a: int) -> Tensor:
        """One chunk of a :meth:`place`\\ d prompt: its tokens a .. a + len(ids) - 1 (``ids``)
        computed into slots first + a .., at positions a .., attending causally to the row's
        slots from ``first`` on (its earlier chunks, a reused prefix). The row's position
        becomes the chunk's last (after the last chunk: the prompt's, as :meth:`admit` leaves
        it). Returns the last token's next-token logits [1, V].

        Run before the step that writes slot t, a chunk must end at a slot before t: that step
        writes slot t of every row, this one's too (its token there is nobody's), and later
        steps write later slots, so what a chunk wrote stays; a slot a step wrote in this row is
        rewritten by the chunk that holds it, which runs after that step (Engine._chunk)."""
        dev, c = self.device, self.cache
        n = len(ids)
        b = a + n
        idx = torch.tensor([row], dtype=torch.long, device=dev)
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        pos = torch.arange(a, b, dtype=torch.long, device=dev)[None]
        sub = None if self.rows is None else self.rows.index_select(0, idx)
        mask = None  # the first chunk: causal over its own slots
        if a:  # queries: its slots; keys: the row's from first on, the earlier chunks' included
            slots = torch.arange(b, device=dev)
            mask = attention_mask_4d(torch.ones(1, b, dtype=torch.bool, device=dev), slots[a:], slots)
        c.prefill_len, c.prefill_rows, c.prefill_start, c.prefill_from = n, idx, first + a, first
        try:
            logits = self.model.run_layers(x, pos, mask, cache=c, last_only=True, rows=sub)[:, -1]
        finally:
            c.prefill_len, c.prefill_rows = None, None
        self.pos[row] = b - 1
        self.written = max(self.written, first + b)
        return logits

    def copy_row(self, src: int, dst: int) -> None:
        """Continuous batching: row ``dst`` becomes row ``src`` (a prompt prefilled once for rows
        that share it, :meth:`fill`'s last chunk run)."""
        self._copy_row(src, dst)

    def _copy_row(self, src: int, dst: int) -> None:
        """Row ``dst`` becomes row ``src`` as :meth:`admit` left it: keys and values
        (every slot a step may read: dst's own held an earlier request's), its mask,
        position and adapter."""
        w = self.written
        for k, v in zip(self.cache.k, self.cache.v):
            k[dst, :, :w].copy_(k[src, :, :w])
            v[dst, :, :w].copy_(v[src, :, :w])
        for t in (self.mask, self.pos) + (() if self.rows is None else (self.rows,)):
            t[dst].copy_(t[src])

    def kv(self, row: int, start: int, stop: int) -> Tensor:
        """A copy of row ``row``'s keys and values in slots [start, stop):
        [layers, 2, kv_heads, stop - start, head_dim] (what :meth:`admit` reuses)."""
        c = self.cache
        return torch.stack([torch.stack([k[row, :, start:stop], v[row, :, start:stop]])
                            for k, v in zip(c.k, c.v)])

    def _run_prefill(self, ids: Tensor, pos: Tensor, mask: Optional[Tensor], last: Optional[Tensor]) -> Tensor:
        self.cache.prefill_len = ids.shape[1]
        try:
            return self.model.run_layers(ids, pos, mask, cache=self.cache, last_only=True, rows=self.rows,
                                         last=last)[:, -1]
        finally:
            self.cache.prefill_len = None

    def _padded_length(self, T: int) -> Optional[int]:
        """The length a prompt of T tokens is padded to for a prefill graph, or
        None: eager (graphs off, or too long to be host-bound). A multiple of
        64 up to 512 tokens, where a prefill is host-bound and padding costs
        nothing; of 256 above, where the GPU's work shows (at most a third
        more, at 513 tokens; 8 + 14 lengths up to 4096); at most the cache."""
        if not self.pad_prefill:
            return None
        step = 64 if T <= 512 else 256
        Tp = min(-(-T // step) * step, self.max_len)
        return Tp if self.B * Tp <= prefill_graph_tokens() else None

    def _prefill_padded(self, ids: Tensor, pos: Tensor, key_valid: Tensor, causal: bool, Tp: int):
        """The prefill as a CUDA graph of length Tp: the prompt at the start of
        static buffers, padding after it. Causal attention keeps the padding
        out of every real position's result; its keys and values land in cache
        slots T .. Tp-1, which stay masked until the decode steps write them.
        The logits are the last real position's (a device index: one graph per
        length, not per prompt). None when the capture fails."""
        B, T = ids.shape
        g = self.prefill_graphs.get((Tp, causal))
        if g is None:
            g = self.prefill_graphs[(Tp, causal)] = _PrefillGraph(self, Tp, causal)
        if g.failed:
            return None
        g.ids[:, :T].copy_(ids)
        g.ids[:, T:].fill_(0)
        g.pos[:, :T].copy_(pos)
        g.pos[:, T:].copy_(pos[:, -1:] + torch.arange(1, Tp - T + 1, device=pos.device))
        if not causal:  # the padding is real keys to nothing earlier: causal order hides it
            kv = torch.ones(B, Tp, dtype=torch.bool, device=key_valid.device)
            kv[:, :T] = key_valid
            g.mask.copy_(slot_mask(kv))
        g.last.fill_(T - 1)
        return g.run()

    def _mask(self, L: int, n: Optional[int] = None) -> tuple:
        """The step's key mask [n, 1, 1, L] (run_layers') and as [n, L] (the cache's)."""
        m = self._masks.get((L, n))
        if m is None:
            m4 = self.mask[:n, ..., :L]
            m = self._masks[(L, n)] = m4, m4.view(m4.shape[0], L)
        return m

    def _inputs(self, n: Optional[int]) -> tuple:
        """(ids, positions, adapter rows) of the rows a step runs: all, or the first n."""
        v = self._views.get(n)
        if v is None:
            v = self._views[n] = (self.ids[:n], self.pos[:n], None if self.rows is None else self.rows[:n])
        return v

    def _step(self, L: int, n: Optional[int] = None) -> Tensor:
        self.cache.length, self.cache.n = L, n
        if self.compile and self.device.type == "cpu":  # a constant to the trace (dynamo guards on it)
            a = self.model.arch
            self.cache.decode_kernel = cpu_decode_kernel_takes(
                self.model.dtype, a.head_dim, a.num_attention_heads // a.num_key_value_heads, L)
        ids, pos, rows = self._inputs(n)
        mask, self.cache.key_mask = self._mask(L, n)
        return self._fn(self.model, ids, pos, mask, self.cache, rows)

    def step(self, tokens: Tensor, n_rows: Optional[int] = None) -> Tensor:
        """Feed tokens [B] at the next slot; return logits [B, V] for the following
        one. ``n_rows`` (continuous batching): only the first ``n_rows`` rows run
        (tokens [n_rows]); the others keep their state, and their slot t unwritten."""
        if self.t >= self.max_len:
            raise ValueError("KV cache is full")
        n = None if n_rows is None or n_rows == self.B else n_rows
        self._inputs(n)[0].copy_(tokens.view(-1, 1))
        self.pos.add_(1)
        self.cache.slot.fill_(self.t)
        self.mask[:, 0, 0, self.t] = 0.0
        L = self.window(self.t)
        self.t += 1
        self.written = max(self.written, self.t)
        with nvtx.range("decode"):
            if not self.use_cuda_graph:
                return self._step(L, n)
            g = self.graphs.get((L, n)) or self._capture(L, n)
            if g is None:  # capture failed: eager from now on
                return self._step(L, n)
            g[0].replay()
            return g[1]

    def _capture_fn(self, fn):
        """Warm ``fn`` up on a side stream of the model's device (allocator, lazy
        init, compilation), then capture one call there on the decoders' shared
        memory pool: (CUDAGraph, its output). Warm-up and capture compute what
        a replay recomputes, so they may write the cache."""
        dev = self.device
        with torch.cuda.device(dev):
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                out = fn()
            self._pool = g.pool()
        return g, out

    def _capture(self, L: int, n: Optional[int] = None):
        try:
            g, out = self._capture_fn(lambda: self._step(L, n))
        except Exception as e:  # noqa: BLE001 - any capture failure -> eager fallback
            self.graphs.clear()
            self.use_cuda_graph = False
            warnings.warn(f"flora: CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                          f"falling back to eager decoding", RuntimeWarning, stacklevel=3)
            return None
        self.graphs[(L, n)] = (g, out)
        return self.graphs[(L, n)]


class _PrefillGraph:
    """One prefill length's static inputs and, with CUDA graphs, its graph
    (captured at the first call, on the decoder's memory pool)."""

    def __init__(self, dec: "Decoder", Tp: int, causal: bool):
        B, dev = dec.B, dec.device
        self.dec, self.failed, self.graph, self.out = dec, False, None, None
        self.ids = torch.zeros(B, Tp, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, Tp, dtype=torch.long, device=dev)
        self.mask = None if causal else torch.zeros(B, 1, Tp, Tp, dtype=torch.bool, device=dev)
        self.last = torch.zeros(1, dtype=torch.long, device=dev)

    def _fn(self) -> Tensor:
        return self.dec._run_prefill(self.ids, self.pos, self.mask, self.last)

    def run(self) -> Optional[Tensor]:
        if not self.dec.use_cuda_graph:  # padded, not graphed: eager CUDA (tests: the CPU)
            return self._fn()
        if self.graph is None:
            try:
                self.graph, self.out = self.dec._capture_fn(self._fn)
            except Exception as e:  # noqa: BLE001 - any capture failure -> eager prefill
                self.failed = True
                warnings.warn(f"flora: CUDA graph capture of the prefill failed ({type(e).__name__}: {e}); "
                              f"prefilling eagerly", RuntimeWarning, stacklevel=4)
                return None
        self.graph.replay()
        return self.out


def structure_key(model) -> tuple:
    """What a captured graph or compiled step depends on besides tensor values:
    dtype, device, the adapter structure, each flora module's mode (adapter
    live, folded, merged), and the address of every tensor the step reads. Values
    written in place (set_adapter, fold of the same structure) keep the key."""
    mods = tuple((m.live, m.folded, m.merged) for _, m in model.adapter_modules())
    ptrs = tuple(t.data_ptr() for t in model.buffers()) + tuple(t.data_ptr() for t in model.parameters())
    cfg = model.adapter_config
    # decoding runs in eval mode (inference_mode): dropout never reaches the step, so adapters
    # differing only in it share the captured graphs / compiled step
    cfg = None if cfg is None else cfg.replace(dropout=0.0)
    return (model.dtype, str(model.device), repr(cfg), mods, ptrs)


MAX_CACHED_DECODERS = 4
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> OrderedDict


def decoder_for(model, batch: int, max_len: int, use_cuda_graph: bool, compile: bool = False,
                factory=Decoder) -> Decoder:
    """A decoder for this call: a fresh one for plain eager decoding; for CUDA
    graphs or torch.compile the one kept from an earlier call with the same
    batch, cache length (rounded up to the bucket), dtype, device and
    :func:`structure_key` (so the graphs are captured once), the least recently
    used dropped beyond ``MAX_CACHED_DECODERS`` per model."""
    graphed = use_cuda_graph and model.device.type == "cuda"
    if not (graphed or compile):
        return factory(model, batch, max_len, use_cuda_graph, compile)
    b = bucket_size(model.device)
    max_len = -(-max_len // b) * b
    key = (batch, max_len, graphed, compile, structure_key(model))
    kept = _DECODERS.setdefault(model, OrderedDict())
    dec = kept.get(key)
    if dec is None:
        dec = kept[key] = factory(model, batch, max_len, use_cuda_graph, compile)
        while len(kept) > MAX_CACHED_DECODERS:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return dec


@contextlib.contextmanager
def inference_mode(model):
    """eval(), no grad, adapters folded while generating; state restored after."""
    was_training = model.training
    fold = model.adapter_active() and not model.folded and not model.merged
    model.eval()
    try:
        if fold:
            model.fold()
        elif model.folded:  # folded by the caller: copies current with the tensors
            model.refresh_fold()
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


MAX_LOGIT_BIAS = 300  # logit_bias entries at most (OpenAI's bound)


def check_sampling(max_new_tokens, s: Sampling, vocab: Optional[int] = None) -> None:
    """generate()'s length and a :class:`Sampling` (also checked by the CLI before a
    model loads, and by the server): ValueError naming the setting. ``vocab``: the
    model's, that logit_bias's token ids must lie in (None: not checked yet)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(s, Sampling):
        raise ValueError(f"sampling must be a flora.generation.Sampling, got {type(s).__name__}")

    def real(name, lo, hi=None, lo_open=False):
        v = getattr(s, name)
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and (lo < v if lo_open else lo <= v) and (hi is None or v <= hi)):
            rng = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{name} must be a finite number {rng}, got {v!r}")

    real("temperature", 0)
    if not (isinstance(s.top_p, numbers.Real) and 0 < s.top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {s.top_p!r}")
    if isinstance(s.top_k, bool) or not isinstance(s.top_k, numbers.Integral) or s.top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {s.top_k!r}")
    real("min_p", 0, 1)
    real("repetition_penalty", 0, lo_open=True)
    real("presence_penalty", -2, 2)
    real("frequency_penalty", -2, 2)
    bias = s.logit_bias
    if bias is None:
        return
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        got = f"{len(bias)} entries" if isinstance(bias, dict) else type(bias).__name__
        raise ValueError(f"logit_bias must be a dict of at most {MAX_LOGIT_BIAS} {{token id: bias}}, got {got}")
    for t, v in bias.items():
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 or (vocab is not None and t >= vocab):
            rng = ">= 0" if vocab is None else f"in 0 .. {vocab - 1}"
            raise ValueError(f"logit_bias: {t!r} is not a token id of this model (an integer {rng})")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not -100 <= v <= 100:
            raise ValueError(f"logit_bias[{t}] must be a number in [-100, 100], got {v!r}")


SEEDS = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


def seed_plus(seed: Optional[int], k: int) -> Optional[int]:
    """The k-th seed after ``seed`` (seed + k: a request's choice k, a file's prompt k),
    wrapped into manual_seed's range; None stays None (unseeded)."""
    if seed is None:
        return None
    s = seed + k
    return s - (1 << 64) if s > SEEDS[1] else s


def check_seed(seed) -> None:
    """A sampling seed: an integer manual_seed takes (beyond its range it raised an
    overflow RuntimeError only once generation started)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not SEEDS[0] <= seed <= SEEDS[1]):
        raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {seed!r}")


def left_pad(seqs, pad_id: int) -> tuple:
    """Token id sequences (lists or 1-D tensors) -> ``(input_ids, attention_mask)``
    [B, T], left-padded with ``pad_id`` to the longest: the batch :func:`generate` takes."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


def generate(model, input_ids: Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id=None, attention_mask: Optional[Tensor] = None,
             pad_token_id: Optional[int] = None, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, streamer=None,
             use_cuda_graph: Optional[bool] = None, compile: bool = False, adapters=None,
             top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             logit_bias: Optional[dict] = None) -> Tensor:
    """Generate up to ``max_new_tokens`` for a left-padded batch.

    Returns ``[B, T + n]`` (prompt then new tokens; rows that hit an EOS are
    filled with ``pad_token_id`` (default: the first EOS) afterwards; stops
    when every row is done). ``streamer``: an object with ``put``/``end``
    (like transformers' streamers: ``put`` gets the prompt, then each step's
    tokens [B]) or a callable called with each step's tokens [B]; ``end()``
    is called once generation is over (also when nothing was generated).
    ``eos_token_id=None`` stops at the checkpoint's EOS (generation_config.json,
    else config.json, else the GGUF's), as transformers does; ``[]`` never stops early.
    ``compile=True``: the decode step runs through torch.compile (compiled on
    the first call; the decoder is kept for later calls of the same shapes).

    Generation stops at the model's context (``max_position_embeddings``):
    a larger ``max_new_tokens`` is capped to it with a warning, so the KV
    cache is never sized beyond what the model can attend over.

    ``adapters``: one adapter name (None: the base model) per row, for a
    model holding several side by side (``FusedLlama.stack_adapters``).

    ``temperature`` (0: greedy), ``top_p``, ``top_k``, ``min_p``,
    ``repetition_penalty`` (over each row's prompt and output), ``presence_penalty``
    and ``frequency_penalty`` (over its output), ``logit_bias`` ({token id: bias}):
    see :class:`Sampling`; every row samples alike.
    """
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or not input_ids.numel():
        raise ValueError(f"input_ids must be a [batch, seq] tensor with batch, seq >= 1, got "
                         f"{list(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}")
    check_id_dtype(input_ids, "input_ids")
    if seed is not None and generator is not None:
        raise ValueError("generate: give seed or generator, not both (the generator would silently win)")
    sampling = Sampling(temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
                        frequency_penalty, logit_bias)
    check_sampling(max_new_tokens, sampling, model.arch.vocab_size)
    sampling.top_k = int(top_k)  # a numpy integer too
    check_seed(seed)
    if attention_mask is not None and (not torch.is_tensor(attention_mask)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        got = list(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, got {got}")
    check_token_ids(input_ids, model.arch.vocab_size)  # once per call: a sync where ids live on a GPU
    dev = model.device
    # a copy: the result never aliases the caller's tensor (even with max_new_tokens=0)
    input_ids = input_ids.to(dev, copy=True)
    B, T = input_ids.shape
    rows = None if adapters is None and getattr(model, "stacked", None) is None else model.adapter_rows(adapters, B)
    key_valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(dev).bool())
    if attention_mask is not None and (~key_valid[:, -1]).any():
        raise ValueError("attention_mask must be left-padded (every row's last token real)")
    context = model.arch.max_position_embeddings
    longest = T if attention_mask is None else int(key_valid.sum(-1).max())
    if longest > context:  # its last positions would lie past what the model was trained on
        raise ValueError(f"a prompt of {longest} tokens exceeds the model's context ({context} positions); "
                         f"shorten it (e.g. keep its last {context - 1} tokens)")
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
            _generate_loop(model, input_ids, key_valid, int(max_new_tokens), sampling,
                           eos, pad, generator, put, use_cuda_graph, compile, out, rows)
    finally:  # a consumer waiting on the streamer (TextIteratorStreamer) must always be released
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
    return torch.cat(out, dim=1)


def _generate_loop(model, input_ids, key_valid, max_new_tokens, sampling, eos, pad, generator,
                   put, use_cuda_graph, compile, out, rows=None):
    """The prefill + decode loop of :func:`generate`; appends each step's tokens [B, 1] to ``out``.
    ``sampling``: a :class:`Sampling`."""
    B, T = input_ids.shape
    dev = input_ids.device
    with inference_mode(model):
        dec = decoder_for(model, B, T + max_new_tokens, use_cuda_graph, compile)
        logits = dec.prefill(input_ids, key_valid, rows)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        eos_t = torch.tensor(eos, dtype=torch.long, device=dev) if eos else None
        # the rows' token counts: only when a penalty or a bias asks (none: nothing kept, nothing added)
        pen = Penalties(sampling, input_ids, model.arch.vocab_size, key_valid) if sampling.adjusts else None
        for i in range(max_new_tokens):
            tok = sample_next(logits, sampling, generator, pen)
            if pen is not None:
                pen.add(tok)
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
