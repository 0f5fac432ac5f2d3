"""An OpenAI-compatible HTTP server for a model and its adapters: ``flora serve``.

    flora serve --model DIR|FILE.gguf|smollm2 [--adapter NAME=DIR ...] [--port 8000] [--max-batch 8]

The fused variants (ffba, zflora, ...) have no merged or PEFT form to hand to
another server; this serves them, and any other flora or PEFT LoRA adapter,
from one loaded base model:

* ``GET /v1/models``: the base (``--name``, default ``base``) and each adapter;
* ``POST /v1/completions`` (``prompt``: a string, a list of token ids, or a
  list of either, a choice each) and ``POST /v1/chat/completions``
  (``messages``, through the tokenizer's chat template, rendered as training
  renders them): ``model`` names the base or an adapter (as vLLM serves LoRA
  modules); ``n`` (choices a prompt, each its own row; ``best_of`` only equal
  to it); ``max_tokens`` (chat: also ``max_completion_tokens``; default 16
  for completions, as OpenAI's, and ``--max-tokens`` for chat),
  ``temperature`` (default 1, as OpenAI's), ``top_p``, ``top_k``, ``min_p``,
  ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``
  (vLLM's and OpenAI's meanings: flora.generation.Sampling), ``seed``,
  ``stop`` (up to 16 strings: the text ends before the first one), ``logprobs``
  (completions: an integer k, chat: true with ``top_logprobs`` k: each
  generated token's log-probability and its k most likely alternatives', of
  the model's own distribution, before the bias, penalties, temperature, top-k, top-p, min-p),
  ``echo`` (completions: the prompt before the answer, with logprobs its
  tokens' too, from one forward over the prompts waiting together (a shared
  start computed once); with ``max_tokens`` 0 the prompt is only
  scored, as lm-eval-harness's loglikelihood requests ask),
  ``stream`` (server-sent events, as OpenAI's clients read them; ``stream_options``
  ``include_usage``: a last chunk with the token counts); vLLM's ``ignore_eos``,
  ``min_tokens`` (the EOS and stop ids masked out of the logits until then, stop
  strings looked for after), ``stop_token_ids``, ``include_stop_str_in_output``,
  ``skip_special_tokens``, and its ``stop_reason`` on each choice (the stop string or id
  that ended it: a generation config's EOS ids other than the tokenizer's are stop ids; stop
  strings found by one token taken in the list's order); ``request_id`` (the response's
  id, after an ``X-Request-Id`` header's; ``--enable-request-id-headers``: every answer
  carries that header) and ``cache_salt`` (prompts of other salts share no computed start:
  the prefix cache, prompts joining or scored together). Fields not implemented (OpenAI's
  ``tools``, vLLM's ``use_beam_search``, ``guided_json``, ...: ``UNSUPPORTED``) are refused with a 400 naming them unless they
  carry the value that asks for nothing, and so are fields not known at all (``KNOWN``;
  OpenAI's ``user``, ``metadata``, ... are taken): ignored, they answer less than asked;
* with ``--allow-adapter-updates``, ``POST /v1/load_lora_adapter`` (``lora_name``,
  ``lora_path``) and ``/v1/unload_lora_adapter`` (``lora_name``), vLLM's: adapters
  served from the worker's next step on, or no longer (``Engine.load_adapter``).
* ``GET /metrics``: Prometheus's text format, vLLM's metric names under ``flora:``,
  each labelled ``model_name`` (flora.metrics.ServeMetrics), open with ``--api-key`` too.

One worker thread owns the model and runs a batch of up to ``--max-batch``
rows with continuous batching: a request joins the running batch between two
decode steps (its prompt prefilled into a free row), samples with its own
settings (a ``seed``: its own generator, ``seed + j`` for choice j of a
prompt), and leaves it at its EOS, stop
string or ``max_tokens``, its row free for the next (see ``Engine._loop``).
The batch's KV cache holds ``--cache-len`` slots a row; every row's next token goes
to one slot, and a prompt longer than it moves it on (the running rows skip the
slots between) where every row's answer still fits, joining at once rather than
waiting for the batch to drain (see ``Engine._admit``). A prompt that starts as
an earlier one did (a conversation's next turn, a shared system prompt) copies
that prefix's keys and values from the prefix cache (``--prefix-cache`` tokens,
flora.prefix_cache; echo's scoring forwards read and fill it too) and computes only
the rest; prompts joining together that share a start not kept compute it once.
Without ``--mixed`` a
batch serves one model; ``--mixed`` holds the adapters side by side
(``FusedLlama.stack_adapters``), so requests for any of them and the base
share it, each row its own adapter (every projection n*r wider; not for ffa,
ffba-qg-add).
A prompt string is tokenized as training tokenizes one (flora.data.prompt_ids);
token ids are taken as they are.
Bad requests get an OpenAI-style error object and a 4xx status.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
import numbers
import os
import queue
import select
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Optional

import torch

from .devices import resolve_device
from .metrics import CONTENT_TYPE as METRICS_TYPE, ServeMetrics

if TYPE_CHECKING:
    from .adapter_io import AdapterFiles
    from .generation import Sampling


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class NotServed(ValueError):
    """Engine.submit: a request for a model not served (an adapter unloaded since its body was parsed)."""


@contextlib.contextmanager
def _refused():
    """An adapter directory's read refused (not an adapter of this model, another structure,
    unreadable) as one ValueError with its message: a 400 to the client that sent it."""
    try:
        yield
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(e.args[0] if isinstance(e, KeyError) else str(e)) from None


def _not_served(name, served) -> str:
    return f"model {_brief(name)} is not served; the models are: {', '.join(served)}"


@dataclass
class _Change:
    """A runtime adapter change for the worker (Engine.load_adapter / unload_adapter):
    ``done`` gets None once it is made, or the exception that refused it."""
    kind: str  # "load" or "unload"
    name: str
    adapter: Optional[AdapterFiles] = None  # load: its directory, read by Engine.load_adapter
    done: queue.Queue = field(default_factory=queue.Queue)
    closed: bool = False  # unload: its name takes no new requests


@dataclass
class Request:
    """One choice to generate: its tokens, limits and sampling, and the queue its
    results go to, shared by the choices of one HTTP request (with ``echo``
    first ("prompt", index, entries); ("delta", index, text, entries) while
    streaming; then ("done", index, text, finish_reason, tokens, entries), or
    ("error", message)). With ``logprobs``, entries are (text, logprob,
    [(text, logprob) of the alternatives]) a token: the prompt's, a delta's, or
    all the answer's; else None."""
    model: str
    prompt: list
    max_tokens: int
    sampling: Sampling  # temperature, top_p, top_k, min_p, the penalties, logit_bias
    seed: Optional[int] = None
    stream: bool = False
    stop: tuple = ()  # strings that end the text (not included)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False  # its client left: its row generates no further
    usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    index: int = 0  # its choice's index in the response
    first: bool = True  # its prompt's first choice (usage counts a prompt once)
    logprobs: Optional[int] = None  # each token's logprob and this many alternatives' (None: none)
    echo: Optional[str] = None  # the prompt's text, which the answer starts with (None: not echoed)
    scored: bool = False  # echo: its prompt went out (with logprobs: scored)
    # prompt tokens not computed for it, their keys and values copied: from the prefix cache, from the row
    # of a request joining beside it (a shared start; an equal prompt: all of them), or scored for an equal
    # prompt before it (echo with logprobs: neither its scoring forward nor its row computed them)
    cached: int = 0
    arrived: float = 0.0  # time.monotonic() when submitted (the metrics' latencies start here)
    scheduled: Optional[float] = None  # time.monotonic() when its prefill (or echo's scoring) began (queue time)
    ended: bool = False  # its end is counted in Engine.metrics (once, whichever way it ended)
    # vLLM's: the checkpoint's EOS does not end it; the first min_tokens tokens end it by no EOS, stop id
    # or stop string (the sampler never draws the ids); token ids that end it as an EOS does (stop_reason:
    # the id); the stop string or id's text kept at the end of the text; special tokens left out of the text
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_ids: tuple = ()
    include_stop: bool = False
    skip_special: bool = True
    stop_reason: Optional[object] = None  # set at its end: the stop string or stop id that ended it (vLLM's)
    # vLLM's cache_salt: its prompt shares computed keys and values (the prefix cache, a prompt joining or
    # scored beside it) only with requests of the same salt (None: with unsalted ones)
    cache_salt: Optional[str] = None
    request_id: Optional[str] = None  # vLLM's request_id: the response's id (after an X-Request-Id header's)

    def key(self, mixed: bool = False):
        """Requests with equal keys may share the running batch: one model's
        (``mixed``: any model's); each row samples with its own settings."""
        return None if mixed else self.model


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, numbers.Integral if integer else numbers.Real) and not isinstance(v, bool)
    if ok and not integer:
        ok = math.isfinite(v)
    if not ok or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
        what = "an integer" if integer else "a number"
        rng = f"{'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
        raise BadRequest(f"'{name}' must be {what} {rng}, got {v!r}")
    return int(v) if integer else float(v)


# OpenAI's and vLLM's request fields this server does not implement, each with the values that ask
# for nothing (what clients send by default; null always): any other value is refused, not ignored
UNSUPPORTED = {
    # OpenAI's
    "suffix": ("",), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "store": (False,), "modalities": (["text"],), "audio": (),
    "prediction": (), "reasoning_effort": (), "verbosity": (), "web_search_options": (),
    # vLLM's (its SamplingParams and OpenAI-server extras)
    "use_beam_search": (False,), "length_penalty": (1.0,), "early_stopping": (False,), "prompt_logprobs": (),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
    "guided_decoding_backend": (), "guided_whitespace_pattern": (), "structured_outputs": (),
    "truncate_prompt_tokens": (), "allowed_token_ids": (), "bad_words": ([],),
    "spaces_between_special_tokens": (True,), "priority": (0,), "logits_processors": (),
    "return_tokens_as_token_ids": (False,), "return_token_ids": (False,), "prompt_embeds": (),
    "kv_transfer_params": (), "vllm_xargs": (),
    "mm_processor_kwargs": (), "chat_template": (), "chat_template_kwargs": (), "documents": (),
    "add_generation_prompt": (True,), "continue_final_message": (False,)}
# fields of the other endpoint, likewise (completions' prompt gets the tokenizer's special tokens)
ELSEWHERE = {True: {"echo": (False,), "add_special_tokens": ()},
             False: {"top_logprobs": (0,), "add_special_tokens": (True,), "max_completion_tokens": ()}}
# the fields parse reads (each endpoint's), and OpenAI's that ask nothing of the answer (who sent it,
# labels, billing): taken whatever they hold. Any other field not null is refused (docs/serving.md: a
# field ignored is a request silently answered with less than it asked for, as vLLM's ignore_eos was)
READ = {"model", "n", "best_of", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
        "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stream", "stream_options", "stop",
        "logprobs", "ignore_eos", "min_tokens", "stop_token_ids", "include_stop_str_in_output",
        "skip_special_tokens", "user", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
        "safety_identifier", "cache_salt", "request_id"}
KNOWN = {chat: READ | set(UNSUPPORTED) | set(ELSEWHERE[chat])
         | ({"messages", "max_completion_tokens", "top_logprobs"} if chat else {"prompt", "echo"})
         for chat in (True, False)}
MAX_N = 128  # choices a prompt at most (OpenAI's bound on n)
MAX_LOGPROBS = 20  # alternatives a token at most (vLLM's bound; OpenAI's: 5 for completions, 20 for chat)
# stop strings at most: OpenAI's bound is 4, but lm-eval-harness sends a task's `until` and the EOS
# string, often more; each costs a look at the text's tail a token
MAX_STOP = 16
MAX_STOP_IDS = 64  # stop_token_ids at most (each one a set lookup a token)
# echo's scoring, one forward at most: SCORE_TOKENS positions computed (rows x the most any row
# computes: padding counted, the tokens copied from the prefix cache not), SCORE_SLOTS key slots
# (rows x the longest row, copied ones included: the keys and values held); logits alive at once
# (64 MiB in fp32) while their log_softmax and top-k are taken
SCORE_TOKENS = 8192
# the keys held as before the token count (rows x the longest <= SCORE_TOKENS): 4x as many took one
# forward for three but ran 0.95x on the CPU (bench/RESULTS.md, "Scoring forwards sized by the tokens
# they compute"); a bound of its own to raise where a forward's fixed cost dominates (a GPU), measured
SCORE_SLOTS = SCORE_TOKENS
SCORE_LOGITS = 1 << 24
# prompts sharing at least SHARE_MIN first tokens are scored as one sequence (the shared part once),
# PACK_TOKENS tokens at most: its attention mask is [PACK_TOKENS, PACK_TOKENS]
SHARE_MIN = 16
PACK_TOKENS = 2048
# Chunked prefill, vLLM's max_num_batched_tokens: each iteration (one decode step and the prefills
# before it) computes at most this many prompt tokens (past what the prefix cache gives) over every
# joining prompt: the chunks of prompts already prefilling first, then the waiting ones in arrival
# order, whole while they fit, the last one in chunks (Engine._admit, _place, _chunk); 0: off (every
# joining prompt whole, between two steps). SmolLM2-135M on the 2-core CPU, 6 clients streaming while
# a 2000-token prompt joins: their worst gap 0.94 s instead of 4.4 s, the long prompt's first token
# +30% (bench/RESULTS.md, "Chunked prefill"); 8 prompts of ~250 tokens joining 4 streams at once:
# "Chunked prefill as a per-iteration budget"
PREFILL_CHUNK = 256
# CUDA: an estimate until a device run measures it (vLLM's GPU defaults are 2048-8192): a GPU's forward
# of a few hundred tokens costs about its launches, so a small budget only adds forwards
PREFILL_CHUNK_BY_DEVICE = {"cpu": PREFILL_CHUNK, "cuda": 2048}


def prefill_chunk_for(device) -> int:
    """The per-iteration prompt-token budget on ``device`` (its type's entry; the CPU's else)."""
    return PREFILL_CHUNK_BY_DEVICE.get(torch.device(device).type, PREFILL_CHUNK)


def check_admit_cost(v) -> None:
    """Engine's admit_cost: None (learned) or the tokens a prefill forward costs by itself, >= 0."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0):
        raise ValueError(f"admit_cost must be None (learned) or an integer >= 0 tokens, got {v!r}")


def check_prefill_chunk(v) -> None:
    """The budget: an integer >= 0 (0: off)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"prefill_chunk must be an integer >= 0 tokens (0: off), got {v!r}")


def _is_token(t, vocab: int) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab


def _flag(body, name, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"'{name}' must be true or false, got {_brief(v)}")
    return v


def _brief(v) -> str:
    """A value in an error message, cut short."""
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _asks_for_nothing(v, defaults) -> bool:
    return v is None or any(v == d and isinstance(v, bool) == isinstance(d, bool) for d in defaults)


class Engine:
    """The model, its tokenizer, and the worker thread that batches requests."""

    def __init__(self, model, tokenizer, names: dict, max_batch: int = 8, mixed: bool = False,
                 max_tokens: int = 1024, wait_s: float = 0.005, cache_len: int = 2048,
                 prefix_cache: int = 8192, prefill_chunk: Optional[int] = None, admit_cost: Optional[int] = None):
        from .data import pad_id_of
        from .forward_cost import ForwardCostFit
        from .generation import admit_forward_tokens
        from .prefix_cache import PrefixCache

        if prefill_chunk is None:
            prefill_chunk = prefill_chunk_for(model.device)
        check_prefill_chunk(prefill_chunk)
        check_admit_cost(admit_cost)
        # a prefill forward's own cost in tokens, what splitting joining prompts into groups weighs
        # (generation.admit_groups): pinned, or fitted to this engine's own Decoder.admit timings
        # (forward_cost.ForwardCostFit; the device type's default until they span enough lengths)
        self.admit_cost = None if admit_cost is None else int(admit_cost)
        self._admit_fit = None if admit_cost is not None else ForwardCostFit(admit_forward_tokens(model.device))
        self.on_admit_cost = None  # called with the learned constant once it first takes over (flora serve logs it)
        # the prompt tokens an iteration computes at most (PREFILL_CHUNK; 0: off)
        self.prefill_chunk = int(prefill_chunk)
        self._spent = 0  # prompt tokens computed in this iteration so far
        # per iteration that computed prompt tokens: how many (the budget's bound, read by tests and benches)
        self.iteration_tokens: collections.deque = collections.deque(maxlen=4096)

        self.model, self.tok, self.names = model, tokenizer, names  # served name -> adapter (None: base)
        self.max_batch, self.max_tokens = max_batch, max_tokens
        self.wait_s = wait_s  # after a request finds the worker idle: how long others may join it
        # the adapters side by side: one batch takes any of them (and the base), row by row
        self.mixed = mixed and any(a is not None for a in names.values())
        if self.mixed:
            model.stack_adapters([a for a in names.values() if a is not None])
        self.pad = pad_id_of(tokenizer)
        self._decode = _backend_decode(tokenizer)
        self.tok_eos = getattr(tokenizer, "eos_token_id", None)  # the tokenizer's own EOS: stop_reason null
        # vLLM stops at the tokenizer's EOS and at the generation config's (its stop ids), either alone
        self.eos = set(_eos(model)) | ({int(self.tok_eos)} if self.tok_eos is not None else set())
        self.context = model.arch.max_position_embeddings
        # the running batch's KV cache: max_batch rows of this many slots (its prompts and answers)
        self.cache_len = min(cache_len, self.context)
        # prompts' keys and values kept for later prompts that start alike (0 tokens: off)
        self.prefix = PrefixCache(prefix_cache) if prefix_cache else None
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0  # prefills run: groups of requests joining the batch (a test reads it)
        # echo's scoring: forwards run, the prompts they scored, the tokens they computed (a shared
        # context once)
        self.score_forwards = self.score_rows = self.score_tokens = 0
        self.steps = 0  # decode steps run
        self.row_steps = 0  # rows generating, summed over the steps (/ steps: the batch's mean size)
        self.metrics = ServeMetrics()  # GET /metrics: counted once per choice, at its first token and its end
        self._waiting: list = []  # the worker's requests not yet in a row (read by metrics_text)
        self._slots: list = [None] * max_batch  # the batch's rows: a _Row, or None when free
        self._dec = None  # the running batch's decoder (generation.Decoder); None when idle
        self._decoders: dict = {}
        self._session = contextlib.ExitStack()  # the model's inference mode while a batch runs
        self._key = None
        self._worker = threading.Thread(target=self._loop, name="flora-serve", daemon=True)
        # runtime adapter changes (load_adapter / unload_adapter), made by the worker between two steps
        self._stacks = mixed  # --mixed: adapters loaded later are stacked with the others
        self._changes: list = []  # _Change's, first come first made
        self._closing: frozenset = frozenset()  # adapters unloaded whose accepted requests still run
        # self.names and _closing are replaced (never changed in place) under it; submit checks a request's
        # model and queues it under it, so that an unload sees every request accepted before it
        self._lock = threading.RLock()
        self._stopped = threading.Event()  # the worker's loop has ended (after close())

    @property
    def busy(self) -> bool:
        """A batch is running (its last rows' work may follow their answers)."""
        return self._dec is not None

    @property
    def models(self) -> list:
        """The served names that take requests (an adapter being unloaded takes none)."""
        with self._lock:
            return [n for n in self.names if n not in self._closing]

    def start(self) -> "Engine":
        self._worker.start()
        return self

    def run(self) -> None:
        """The worker's loop in the calling thread instead of :meth:`start`'s, until
        :meth:`close` and every request answered (``flora generate`` queues its requests
        first; on the CPU the main thread's parallel ops run faster than a thread's)."""
        self._loop()

    # -------------------------------------------------------------- requests
    def parse(self, body, chat: bool) -> list:
        """A request body -> its choices, one Request each (``n`` for each prompt,
        prompt by prompt: the order of their ``index``; one events queue), or
        BadRequest naming what is wrong."""
        from .data import check_messages, prompt_ids
        from .generation import check_seed, seed_plus
        from .pretrained import chat_prompt

        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        name, served = body.get("model"), self.models
        if name is None and len(served) == 1:
            name = served[0]
        if not isinstance(name, str) or name not in served:  # a list or an object: unhashable, was a 500
            raise BadRequest(_not_served(name, served), 404, "model_not_found")
        bad = [k for k, d in {**UNSUPPORTED, **ELSEWHERE[chat]}.items() if not _asks_for_nothing(body.get(k), d)]
        unknown = [k for k, v in body.items() if k not in KNOWN[chat] and v is not None]
        if bad or unknown:
            raise BadRequest("; ".join(([f"not supported: {', '.join(bad)}"] if bad else [])
                                       + ([f"unknown fields: {', '.join(map(_brief, unknown))}"] if unknown else [])))
        if chat:
            if not getattr(self.tok, "chat_template", None):
                raise BadRequest("this model's tokenizer has no chat template; use /v1/completions")
            try:
                text = chat_prompt(self.tok, check_messages(body.get("messages"), "messages", need_answer=False))
            except ValueError as e:
                raise BadRequest(str(e)) from None
            prompts = [("messages", prompt_ids(self.tok, text), text)]
        else:
            prompts = self._prompts(body.get("prompt"))
        echo = False if chat else _flag(body, "echo", False)
        n = _number(body, "n", 1, 1, MAX_N, integer=True)
        if not _asks_for_nothing(body.get("best_of"), (n,)):  # every choice generated is returned
            raise BadRequest(f"'best_of' must equal 'n' ({n}), got {body.get('best_of')!r}")
        logprobs = self._alternatives(body, chat)
        limit = body.get("max_completion_tokens") if chat else None
        default = self.max_tokens if chat else 16
        # echo with max_tokens 0: the prompt alone, scored (lm-eval-harness's loglikelihood requests)
        max_tokens = _number(body, "max_completion_tokens" if limit is not None else "max_tokens", default,
                             0 if echo else 1, None, integer=True)
        sampling = self._sampling(body)
        seed = body.get("seed")
        try:
            check_seed(seed)
        except ValueError as e:  # at generation it failed the whole (seeded: one-row) batch, a 500
            raise BadRequest(f"'seed'{str(e).removeprefix('seed')}") from None
        stream = _flag(body, "stream", False)
        opts = body.get("stream_options")  # OpenAI's clients send it to get usage when streaming
        if opts is not None and not (isinstance(opts, dict) and set(opts) <= {"include_usage"}
                                     and isinstance(opts.get("include_usage", False), bool) and stream):
            raise BadRequest(f"'stream_options' must be {{\"include_usage\": true|false}} with 'stream': true, "
                             f"got {opts!r}")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not (isinstance(stop, (list, tuple)) and len(stop) <= MAX_STOP
                and all(isinstance(x, str) and x for x in stop)):
            raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP}, "
                             f"got {body.get('stop')!r}")
        ends = self._ends(body, max_tokens)
        salt = body.get("cache_salt")
        if salt is not None and not (isinstance(salt, str) and salt):  # vLLM's rule (entrypoints/openai/protocol.py)
            raise BadRequest(f"'cache_salt' must be a non-empty string if provided, got {_brief(salt)}")
        rid = body.get("request_id")
        if rid is not None and not isinstance(rid, str):
            raise BadRequest(f"'request_id' must be a string, got {_brief(rid)}")
        events, out = queue.Queue(), []
        for where, ids, text in prompts:
            # a prompt alone is one forward over the context; with an answer it takes a row of the cache
            size = self.context + 1 if max_tokens == 0 else self.cache_len
            room = size - len(ids)
            if room < 1:
                what = "context" if size > self.cache_len or self.cache_len == self.context else "cache (--cache-len)"
                label = f"'{where}'" if where.endswith("]") else "the prompt"
                raise BadRequest(f"{label} is {len(ids)} tokens; the model's {what} is {min(size, self.context)}")
            if ends["min_tokens"] > room:
                raise BadRequest(f"'min_tokens' ({ends['min_tokens']}) does not fit: the prompt leaves room for "
                                 f"{room} tokens in the cache (--cache-len {self.cache_len})")
            if echo and text is None:
                text = self.text(ids, ends["skip_special"])
            for j in range(n):
                out.append(Request(name, ids, min(max_tokens, room), sampling,
                                   seed_plus(seed, j), stream, tuple(stop), events,
                                   usage=bool(opts and opts.get("include_usage")), index=len(out), first=j == 0,
                                   logprobs=logprobs, echo=text if echo else None, cache_salt=salt,
                                   request_id=rid, **ends))
        return out

    def _ends(self, body: dict, max_tokens: int) -> dict:
        """vLLM's fields on where an answer ends and what its text holds -> Request's
        fields (``ignore_eos``, ``min_tokens``, ``stop_ids``, ``include_stop``,
        ``skip_special``), or BadRequest naming the field."""
        ids = body.get("stop_token_ids") or []
        vocab = self.model.arch.vocab_size
        if not (isinstance(ids, list) and len(ids) <= MAX_STOP_IDS and all(_is_token(t, vocab) for t in ids)):
            raise BadRequest(f"'stop_token_ids' must be a list of at most {MAX_STOP_IDS} token ids of this model "
                             f"(integers in 0 .. {vocab - 1}), got {_brief(body.get('stop_token_ids'))}")
        return {"ignore_eos": _flag(body, "ignore_eos", False),
                "min_tokens": _number(body, "min_tokens", 0, 0, max_tokens, integer=True),
                "stop_ids": tuple(dict.fromkeys(int(t) for t in ids)),
                "include_stop": _flag(body, "include_stop_str_in_output", False),
                "skip_special": _flag(body, "skip_special_tokens", True)}

    def close(self) -> None:
        """The worker ends once no batch runs (its model free for other uses)."""
        self.queue.put(None)

    def _sampling(self, body: dict) -> "Sampling":
        """The body's sampling settings (OpenAI's, and vLLM's ``top_k``, ``min_p`` and
        ``repetition_penalty``) -> a flora.generation.Sampling, or BadRequest naming
        the field. ``logit_bias``: {token id as a string (JSON's keys): bias}."""
        from .generation import Sampling, check_sampling

        bias = body.get("logit_bias")
        if bias is not None:
            if not isinstance(bias, dict):
                raise BadRequest(f"'logit_bias' must be an object of token id: bias, got {_brief(bias)}")
            ids = {}
            for k, v in bias.items():
                t = k.strip() if isinstance(k, str) else ""
                if not t.lstrip("-").isdecimal():
                    raise BadRequest(f"'logit_bias': {_brief(k)} is not a token id")
                ids[int(t)] = v
            bias = ids or None
        s = Sampling(temperature=_number(body, "temperature", 1.0, 0, None),
                     top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
                     # -1: vLLM's "no limit" (its clients' default until 0 took that meaning)
                     top_k=0 if body.get("top_k") == -1 else _number(body, "top_k", 0, 0, None, integer=True),
                     min_p=_number(body, "min_p", 0.0, 0, 1),
                     repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, None, lo_open=True),
                     presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
                     frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2), logit_bias=bias)
        try:  # logit_bias's bounds and token ids (the other fields are checked above)
            check_sampling(0, s, self.model.arch.vocab_size)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return s

    @staticmethod
    def _alternatives(body: dict, chat: bool) -> Optional[int]:
        """How many alternatives each token's logprob comes with (None: no logprobs):
        completions' ``logprobs`` (an integer), chat's ``top_logprobs`` with ``logprobs: true``."""
        want = body.get("logprobs")
        if not chat:
            return None if want is None or want is False else _number(body, "logprobs", None, 0, MAX_LOGPROBS,
                                                                      integer=True)
        if want is not None and not isinstance(want, bool):
            raise BadRequest(f"'logprobs' must be true or false ('top_logprobs': how many alternatives), "
                             f"got {_brief(want)}")
        top = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
        if top and not want:
            raise BadRequest("'top_logprobs' needs 'logprobs': true")
        return top if want else None

    def _prompts(self, p) -> list:
        """A completion's ``prompt``: a string, a list of token ids, or a list of
        either (a batch, a choice each) -> [(its name in errors, token ids, its
        text or None)]; a string tokenized as training tokenizes a prompt, ids
        taken as they are."""
        from .data import prompt_ids

        if isinstance(p, str) or (isinstance(p, list) and p and not isinstance(p[0], (str, list))):
            items = [("prompt", p)]
        elif isinstance(p, list) and p:
            items = [(f"prompt[{i}]", x) for i, x in enumerate(p)]
        else:
            raise BadRequest(f"'prompt' must be a non-empty string, a list of token ids, or a list of either, "
                             f"got {_brief(p)}")
        vocab, out = self.model.arch.vocab_size, []
        for where, x in items:
            if isinstance(x, str) and x:
                out.append((where, prompt_ids(self.tok, x), x))
                continue
            if not (isinstance(x, list) and x):
                raise BadRequest(f"'{where}' must be a non-empty string or list of token ids, got {_brief(x)}")
            for t in x:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab:
                    raise BadRequest(f"'{where}': {t!r} is not a token id of this model (an integer in "
                                     f"0 .. {vocab - 1})")
            out.append((where, [int(t) for t in x], None))
        return out

    def submit(self, reqs: list) -> list:
        """Queue a request's choices (what :meth:`parse` gave, or Requests built by
        hand: each checked as parse checks a body, ValueError naming what is wrong,
        none queued then; one the worker could never run would block it; NotServed for a
        model not served)."""
        with self._lock:  # queued before an unload of its model closes it: it runs with that adapter
            for r in reqs:
                self.check(r)
            now = time.monotonic()
            for r in reqs:
                r.arrived, r.ended, r.scheduled = now, False, None
                self.queue.put(r)
        return reqs

    def check(self, r) -> None:
        """ValueError unless ``r`` is a Request this engine can run: a served model,
        token ids of its vocabulary, sampling, seed, stop strings and logprobs as
        :meth:`parse` allows them, and a prompt that fits with its max_tokens (a row of
        the cache; with echo and max_tokens 0, the context)."""
        from .generation import Sampling, check_sampling, check_seed

        if not isinstance(r, Request):
            raise ValueError(f"submit takes Requests, got {type(r).__name__}")
        served = self.models
        if not isinstance(r.model, str) or r.model not in served:
            raise NotServed(f"Request.{_not_served(r.model, served)}")
        vocab = self.model.arch.vocab_size
        if not (isinstance(r.prompt, list) and r.prompt):
            raise ValueError(f"Request.prompt must be a non-empty list of token ids, got {_brief(r.prompt)}")
        bad = next((t for t in r.prompt if isinstance(t, bool) or not isinstance(t, numbers.Integral)
                    or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"Request.prompt: {bad!r} is not a token id of this model (an integer in "
                             f"0 .. {vocab - 1})")
        if r.echo is not None and not isinstance(r.echo, str):
            raise ValueError(f"Request.echo must be the prompt's text or None, got {_brief(r.echo)}")
        M, P = r.max_tokens, len(r.prompt)
        if isinstance(M, bool) or not isinstance(M, numbers.Integral) or M < (0 if r.echo is not None else 1):
            raise ValueError(f"Request.max_tokens must be an integer >= {0 if r.echo is not None else 1}"
                             f"{' (0: with echo)' if r.echo is None else ''}, got {M!r}")
        if M == 0 and P > self.context:
            raise ValueError(f"Request.prompt is {P} tokens; the model's context is {self.context}")
        if M and P + M > self.cache_len:
            raise ValueError(f"Request.prompt ({P} tokens) and max_tokens ({M}) exceed the cache "
                             f"(--cache-len {self.cache_len}): at most {self.cache_len} tokens together")
        if not isinstance(r.sampling, Sampling):
            raise ValueError(f"Request.sampling must be a flora.generation.Sampling, got {_brief(r.sampling)}")
        check_sampling(M, r.sampling, vocab)
        check_seed(r.seed)
        if not (isinstance(r.stop, tuple) and len(r.stop) <= MAX_STOP
                and all(isinstance(x, str) and x for x in r.stop)):
            raise ValueError(f"Request.stop must be a tuple of at most {MAX_STOP} non-empty strings, got "
                             f"{_brief(r.stop)}")
        k = r.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral)
                              or not 0 <= k <= MAX_LOGPROBS):
            raise ValueError(f"Request.logprobs must be None or an integer in 0 .. {MAX_LOGPROBS}, got {k!r}")
        for name in ("ignore_eos", "include_stop", "skip_special"):
            if not isinstance(getattr(r, name), bool):
                raise ValueError(f"Request.{name} must be True or False, got {_brief(getattr(r, name))}")
        k = r.min_tokens
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= M:
            raise ValueError(f"Request.min_tokens must be an integer in 0 .. max_tokens ({M}), got {k!r}")
        if not (isinstance(r.stop_ids, tuple) and len(r.stop_ids) <= MAX_STOP_IDS
                and all(_is_token(t, vocab) for t in r.stop_ids)):
            raise ValueError(f"Request.stop_ids must be a tuple of at most {MAX_STOP_IDS} token ids of this model "
                             f"(integers in 0 .. {vocab - 1}), got {_brief(r.stop_ids)}")
        if r.cache_salt is not None and not (isinstance(r.cache_salt, str) and r.cache_salt):
            raise ValueError(f"Request.cache_salt must be None or a non-empty string, got {_brief(r.cache_salt)}")

    # ------------------------------------------------------- adapters at runtime
    # A load's directory is read and checked in the caller's thread (the running batch never
    # waits for the disk); the worker makes the changes between two steps, in the order they
    # come. A load of another adapter of the loaded structure only adds its tensors to the
    # model's registry (a running batch never reads them); an unload first closes its name
    # (requests already queued for it run, new ones get 404), waits for those requests to end,
    # then forgets the adapter and its prefix-cache blocks (a later adapter of that name has
    # other weights).
    # What a running batch's decoder would see -- a restack (--mixed), the model's first
    # adapter structure, the unloaded adapter's tensors held by the modules (a batch of the
    # base runs with them switched off) -- waits for the batch to drain, no request joining it.
    def load_adapter(self, name: str, path) -> None:
        """Serve the adapter directory ``path`` (flora's or a PEFT LoRA's) as model
        ``name``, from the worker's next step on (see above). Reads the directory here,
        then blocks until the worker (:meth:`start` or :meth:`run`, in another thread)
        has made the change; ValueError naming what is wrong (a path that is not an
        adapter of this model or, --mixed, one that cannot be stacked: before the worker
        sees it; a name taken, another structure than the loaded adapters'), the server
        left as it was."""
        from .adapters import UNSTACKABLE

        if not isinstance(name, str) or not name:
            raise ValueError(f"the adapter's name must be a non-empty string, got {_brief(name)}")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"the adapter's path must be a non-empty string, got {_brief(path)}")
        if not os.path.isdir(path):
            raise ValueError(f"{path} is not a directory")
        with _refused():  # not an adapter of this model (the model's arch never changes: read here)
            adapter = self.model.read_adapter(path)
        if self._stacks and adapter.config.base_variant in UNSTACKABLE:
            # refused before it reaches the model: as its first adapter it would set the model's
            # structure (loading, then failing to stack, left it so); after others, never stacked
            raise ValueError(f"{path}: variant {adapter.config.variant!r} cannot be served side by side "
                             f"(--mixed stacks adapters; {', '.join(UNSTACKABLE)} cannot be stacked)")
        self._change(_Change("load", name, adapter))

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name``: requests queued for it before run to their end
        (with it), new ones are refused as for any name not served, and it is then
        forgotten with its prefix-cache blocks. Blocks until then; KeyError when no
        adapter of that name is served, ValueError for the base."""
        self._change(_Change("unload", name))

    def _change(self, op: _Change) -> None:
        self.queue.put(op)
        while True:  # a change put after the worker ended is never made: an error, not a hang
            try:
                err = op.done.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stopped.is_set() and op.done.empty():
                    raise RuntimeError("the engine has stopped (close()): no adapter change is made") from None
        if err is not None:
            raise err

    def _adapter_changes(self, waiting: list) -> bool:
        """The worker's side: each change made as soon as it can be (see above). True
        while the first waits for the running batch to drain (no request may join it)."""
        while self._changes:
            op, whole = self._changes[0], False
            try:
                if op.kind == "unload" and not op.closed:
                    self._close(op.name)
                    op.closed = True
                    return False  # made once the queue is read again: every request accepted for it seen
                running = [row.req for row in self._slots if row is not None]
                if op.kind == "unload" and any(r.model == op.name for r in waiting + running):
                    return False  # they run to their end first (admitted as any others)
                whole = self._restructures(op)
                if whole and self._dec is not None:
                    return True
                (self._load if op.kind == "load" else self._unload)(op.name, op.adapter)
                err = None
            except Exception as e:  # noqa: BLE001 - refused (or failed): its caller gets why, serving goes on
                err = e
            if whole:  # the kept decoders were made for the old structure (a decoder's rows: stacked or not)
                self._decoders.clear()
            self._changes.pop(0)
            op.done.put(err)
        return False

    def _restructures(self, op: _Change) -> bool:
        """The change is one a running batch's decoder would see (above)."""
        m = self.model
        if self._stacks or (op.kind == "load" and m.adapter_config is None):
            return True
        return op.kind == "unload" and m.active_adapter == self.names[op.name]

    def _close(self, name) -> None:
        """An unload's first step: no new request for ``name``."""
        served = self.models
        adapters = [n for n in served if self.names[n] is not None]
        if not isinstance(name, str) or name not in adapters:
            if isinstance(name, str) and name in served:
                raise ValueError(f"{name!r} is the base model; only adapters can be unloaded")
            raise KeyError(f"no adapter named {_brief(name)} is served; the adapters are: "
                           f"{', '.join(adapters) or 'none'}")
        with self._lock:
            self._closing = self._closing | {name}

    def _load(self, name: str, adapter) -> None:
        """The worker's side of a load: ``adapter`` (read by load_adapter) into the model."""
        m = self.model
        if name in self.names or name in m.adapter_names:
            by = "the base model" if name in self.names and self.names[name] is None else \
                "an adapter loaded already (unload it first)"
            raise ValueError(f"the name {name!r} is taken by {by}")
        adapters = [a for a in self.names.values() if a is not None]
        try:
            self._restack(None)
            with _refused():  # another structure: only its tensors' copy to the model's device is left
                m.load_adapter(adapter, name=name, activate=False)
            try:
                self._restack(adapters + [name])
            except BaseException:
                m.delete_adapter(name)
                raise
        except BaseException:
            self._restack(adapters)
            raise
        with self._lock:
            self.names = {**self.names, name: name}

    def _unload(self, name: str, _adapter=None) -> None:
        m, adapter = self.model, self.names[name]
        with self._lock:
            self.names = {n: a for n, a in self.names.items() if n != name}
            self._closing = self._closing - {name}
        if self.prefix is not None:  # kept with its weights: never a later adapter's of this name
            self.prefix.drop(name)
        self._restack(None)
        if m.active_adapter == adapter:
            m.set_adapter(None)
        m.delete_adapter(adapter)
        self._restack([a for a in self.names.values() if a is not None])

    def _restack(self, adapters: Optional[list]) -> None:
        """--mixed: the model holds ``adapters`` side by side (None or none: one at a time)."""
        if not self._stacks:
            return
        m = self.model
        try:
            if adapters:
                m.stack_adapters(adapters)
            else:
                m.unstack_adapters()
        finally:
            self.mixed = m.stacked is not None  # (a failed restack: served one adapter at a time)

    # ---------------------------------------------------------------- worker
    # Continuous batching: one decoder of max_batch rows runs step after step; a request
    # joins it between two steps, prefilled into a free row so that its prompt ends where
    # every row's next token goes (slot t), and leaves it when it ends, its row free for the
    # next. The batch's slots only advance: a request joins where its prompt fits before t
    # (a longer prompt moves t on, the running rows skipping the slots between) and every
    # row's answer after it, in arrival order; when none can, the batch drains and the
    # next one starts at slot 0. Without --mixed a batch serves one model (adapter).
    def _loop(self) -> None:
        try:
            self._serve_loop()
        finally:
            self._stopped.set()

    def _serve_loop(self) -> None:
        waiting: list = self._waiting
        closing = False  # close() was called: the worker ends when nothing is left to do

        def take(timeout=None) -> None:  # one more request (or close()'s None) from the queue
            nonlocal closing
            req = self.queue.get(timeout=timeout) if timeout != 0 else self.queue.get_nowait()
            if req is None:
                closing = True
            elif isinstance(req, _Change):
                self._changes.append(req)
            else:
                waiting.append(req)

        while True:
            if not waiting and self._dec is None and not self._changes:
                if closing:
                    return
                take()
                # clients that send at the same moment arrive a little apart: a few ms for them
                deadline = time.monotonic() + self.wait_s
                while waiting and len(waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    try:
                        take(left)
                    except queue.Empty:
                        break
            while True:
                try:
                    take(0)
                except queue.Empty:
                    break
            held = self._adapter_changes(waiting)  # between two steps
            self._spent = 0
            try:
                self._free_cancelled()
                self._fill_step()  # the chunks of prompts prefilling, before their step: first in line
                if not held:
                    waiting = self._waiting = self._admit(waiting)
                self._free_cancelled()
                if any(self._slots):
                    self._step()
            except Exception as e:  # noqa: BLE001 - the batch's requests get the error, the server goes on
                for row in self._slots:
                    if row is not None:
                        self._fail(row.req, e, row)
                self._slots = [None] * self.max_batch
            if self._spent:
                self.iteration_tokens.append(self._spent)
            if not any(self._slots):
                self._end()

    def _begin(self, key) -> None:
        """A new batch for model ``key``: the adapter switched in, the model in
        inference form (adapters folded), a decoder from slot 0."""
        from .generation import Decoder, inference_mode, structure_key

        m, adapter = self.model, (None if key is None else self.names[key])
        if not self.mixed and adapter is not None and m.active_adapter != adapter:
            m.set_adapter(adapter)  # copies the adapter's tensors only
        self._session.enter_context(inference_mode(m))
        if not self.mixed and adapter is None:
            self._session.enter_context(m.disable_adapter())
        # kept: its cache is allocated once; on CUDA one per mode (base / adapter), whose
        # CUDA graphs (one per window) hold the mode they were captured in
        graphs = m.device.type == "cuda"
        dk = structure_key(m) if graphs else None
        if dk not in self._decoders:
            self._decoders[dk] = Decoder(m, self.max_batch, self.cache_len, graphs)
        self._dec, self._key = self._decoders[dk], key
        self._dec.restart()

    def _end(self) -> None:
        self._session.close()
        self._dec = None

    def _admit(self, waiting: list) -> list:
        """Requests joining the batch (in arrival order, while each fits), prefilled whole in
        groups of like length (generation.admit_groups), the last one in chunks (:meth:`_place`)
        where the iteration's budget ends; the rest, still waiting."""
        if not waiting:
            return waiting
        if self._dec is None:
            try:
                self._begin(waiting[0].key(self.mixed))
            except Exception as e:  # noqa: BLE001 - a batch that cannot start (its cache out of memory,
                # an adapter switch failing) was retried forever, the worker spinning and its requests
                # never answered: the first waiting request gets the error (the next one retries)
                self._end()
                self._fail(waiting[0], e)
                return waiting[1:]
        waiting = self._score(waiting)  # echo: the prompt (scored in this batch's mode) before the answer
        dec, free = self._dec, [i for i, r in enumerate(self._slots) if r is None]
        running = [r for r in self._slots if r is not None]
        # Every row's next token goes to slot t, so a joining prompt ends at t - 1. A longer one moves
        # t on to its length (a new batch starts so, at the longest prompt's end): the running rows
        # skip the slots between (Decoder.advance; _Row.skip), which costs each of them those slots
        # and a longer attention window (the one the long row needs anyway), where every answer still
        # fits in the cache: each running row's rest (max_tokens less its tokens so far) and each
        # joining row's whole. Else the request waits (until the running rows' rests fit after it, or
        # the batch drains), and every request behind it too: in arrival order, never overtaking. Its
        # wait is then bounded by the running rows' rests; requests that overtook it would join with
        # rests of their own, and under a steady stream of them it would wait for the cache's end.
        #
        # The budget (prefill_chunk > 0, vLLM's max_num_batched_tokens): this iteration's prompt tokens,
        # the chunks of prompts prefilling (run already: _fill_step) and the joining prompts' (each
        # prefill group's span times its distinct rows: what its forward computes), at most
        # prefill_chunk. The first waiting prompt that does not fit whole takes a row and prefills in
        # chunks (_place), the first what is left now, then what the budget leaves after the prompts
        # placed before it at each of the next iterations (_plan: a prompt placed keeps its chunks, so
        # its first token comes at the step it was placed for); the walk ends there, but for requests
        # with its prompt (n choices, clients sending alike), which take rows that copy its row once its
        # last chunk ran (_follow). While prompts prefill in chunks (their slots set) a request waits, and
        # those behind it, if it would move t on, or share a prompt's start with the prefix cache on
        # (kept once its last chunk ran, then copied).
        B = self.prefill_chunk if self.max_batch > 1 else 0  # (one row: nothing decodes between chunks)
        left = B - self._spent if B else None
        leaders = [i for i, row in enumerate(self._slots) if row is not None and row.fill is not None and row.lead is None]
        need = max((self._rest(r, dec.t) for r in running), default=0)
        join, reused, follow, t, long, taken = [], [], [], dec.t, None, 0
        keys, bound, f = set(), 0, self.admit_forward_tokens()  # the join's prompts; its cost's bound
        top = 0  # the longest part a joining row computes
        for r in waiting:
            if taken == len(free) or r.key(self.mixed) != self._key:
                break
            q = next((i for i in leaders if self._equal(r, self._slots[i].req)), None)
            if q is not None or (long is not None and self._equal(r, long[0])):
                # its prompt prefilling: its row a copy of that one's after its last chunk
                end = (self._slots[q].runs[0][1] + len(r.prompt)) if q is not None else long[3]
                if end + r.max_tokens > self.cache_len:
                    break
                follow.append((r, q))
                need, taken = max(need, end - t + r.max_tokens), taken + 1
                continue
            if long is not None:
                break
            hit = self.prefix and self.prefix.lookup(r.model, r.prompt, r.cache_salt, count=False) if B else None
            if leaders and (len(r.prompt) > t or any(self._shares(r, self._slots[i].req, hit) for i in leaders)):
                break
            t_new, need_new = max(t, len(r.prompt)), max(need, r.max_tokens)
            key = (tuple(r.prompt), self.names[r.model] if self.mixed else None, r.cache_salt)
            # admit_groups' split costs no more than each distinct prompt alone (its span and a forward's
            # cost each), so its tokens are at most those less one forward's: within the budget, no need
            # to split (its cost grows with the rows)
            bound = bound if key in keys else bound + len(r.prompt) - (hit[1] if hit else 0) + f
            # and at most the longest part times the rows (any split's groups: spans no longer, distinct
            # prompts no more than rows): a burst of like prompts fits without the split computed each time
            top = max(top, len(r.prompt) - (hit[1] if hit else 0))
            if (left is None or bound - f <= left or top * (len(join) + 1) <= left
                    or self._join_cost(join + [r], reused + [hit]) <= left):
                if t_new + need_new > self.cache_len:
                    break
                t, need, taken = t_new, need_new, taken + 1
                join.append(r)
                reused.append(hit)
                keys.add(key)
                continue
            # beyond the budget: in chunks, the first of what the budget leaves; not one smaller than a
            # forward's own cost (or half the budget): it waits for the next iteration's budget
            span = len(r.prompt) - (hit[1] if hit else 0)
            plan = self._plan(span, left - self._join_cost(join, reused), leaders)
            if plan is None or plan[0] < min(f, max(1, B // 2)):
                break
            # its prompt ends at t0 + k - 2 (t0: the slot of the next step), its first token fed at
            # t0 + k - 1; the running rows decode k - 1 of their rests meanwhile
            k = len(plan)
            t0 = max(t, len(r.prompt) - k + 1)
            if (leaders and t0 > t) or t0 + k - 1 + max(need - (k - 1), r.max_tokens) > self.cache_len:
                break
            t, long, taken = t0, (r, hit, plan, t0 + k - 1), taken + 1
            need = max(need, k - 1 + r.max_tokens)
        if not taken:
            return waiting
        _scheduled(join + [f[0] for f in follow] + ([long[0]] if long else []))
        if t > dec.t:
            for row in running:
                row.skip(dec.t, t)
            dec.advance(t)
        # the free rows in arrival order (those joining whole and following run in any order: rows apart)
        at = dict(zip((id(r) for r in waiting[:taken]), free))
        if join:
            self._admit_rows(join, [at[id(r)] for r in join])
        if long is not None:
            # after the rows before it in line (their prompts kept: a start it may copy)
            self._place(at[id(long[0])], *long[:3], [(r, at[id(r)]) for r, q in follow if q is None])
        for r, q in follow:
            if q is not None:
                self._follow(at[id(r)], r, q)
        return waiting[taken:]

    def _equal(self, r: Request, q: Request) -> bool:
        """r's prompt prefills as q's: its tokens, adapter and cache salt (a row copied from q's)."""
        return (r.prompt == q.prompt and r.cache_salt == q.cache_salt
                and (not self.mixed or self.names[r.model] == self.names[q.model]))

    def _join_cost(self, join: list, reused: list) -> int:
        """The prompt tokens :meth:`_admit_rows` computes for ``join`` (``reused``: their prefix cache
        hits): each prefill group's span times its distinct prompts."""
        from .generation import admit_span

        if not join:
            return 0
        groups, given, keys = self._join_groups(join, reused)[:3]
        return sum(admit_span([join[j].prompt for j in g], [given[j] for j in g]) * len({keys[j] for j in g})
                   for g in groups)

    def _join_groups(self, join: list, reused: list) -> tuple:
        """Requests ``join`` prefilled whole together: (their prefill groups (row indices), each
        row's reused start as admit_span reads it, their Decoder.admit keys, their _leads)."""
        from .generation import admit_groups

        lead = self._leads(join, reused)
        # equal prompts (Decoder.admit's key): one computed, the others' rows copies of its
        keys = [(tuple(r.prompt), self.names[r.model] if self.mixed else None, r.cache_salt) for r in join]
        # the prefills, a group of like length each (a short prompt computes no long one's padding): of the
        # rows that compute their prompts, and of those that copy a shared start from one of them (its c
        # first tokens, read from its row once it has run)
        given = [(None, x[1]) if x else reused[j] for j, x in enumerate(lead)]
        groups, f = [], self.admit_forward_tokens()  # a forward's own cost, in tokens, on this machine
        for part in ([j for j, x in enumerate(lead) if x is None], [j for j, x in enumerate(lead) if x]):
            groups += [[part[k] for k in g] for g in admit_groups([join[j].prompt for j in part], [given[j] for j in part],
                                                                  [keys[j] for j in part], forward_tokens=f)]
        return _salts_apart(groups, keys), given, keys, lead

    def _admit_rows(self, join: list, rows: list) -> None:
        """Requests ``join`` prefilled whole into batch rows ``rows`` (ending at slot t - 1), in groups."""
        from .generation import admit_span

        dec, t = self._dec, self._dec.t
        self.batches += 1
        reused = [self.prefix and self.prefix.lookup(r.model, r.prompt, r.cache_salt) for r in join]
        groups, given, keys, lead = self._join_groups(join, reused)
        longest = {}  # a leading row's shared start, read once for all that copy it
        for i, c in filter(None, lead):
            longest[i] = max(longest.get(i, 0), c)
        copies, admitted = {}, set()  # admitted: the requests whose rows run
        try:
            while groups:
                # the shortest whose leaders have run next: its first tokens out before longer prefills run
                g = min((g for g in groups if all(not lead[j] or lead[j][0] in admitted for j in g)),
                        key=lambda g: admit_span([join[j].prompt for j in g], [given[j] for j in g]))
                groups.remove(g)
                for i in {lead[j][0] for j in g if lead[j]} - copies.keys():
                    s = t - len(join[i].prompt)
                    kv = dec.kv(rows[i], s, s + longest[i])
                    # a NaN later in its prompt reaches these through attention's masked weights (0 x NaN),
                    # as the prefix cache's keys: then each computes its own
                    copies[i] = kv if bool(kv.isfinite().all()) else None
                for j in g:
                    if lead[j] and copies[lead[j][0]] is not None:
                        reused[j] = (copies[lead[j][0]], lead[j][1])
                fit = self._admit_fit
                t0 = fit.clock(dec.device) if fit else None
                got = dec.admit([rows[j] for j in g], [join[j].prompt for j in g], self.pad,
                                [self.names[join[j].model] for j in g] if self.mixed else None, [reused[j] for j in g])
                t1 = fit.clock(dec.device) if fit else None
                S = admit_span([join[j].prompt for j in g], [reused[j] for j in g])
                self._spent += S * len({keys[j] for j in g})
                if fit:  # the forward computed S tokens of each distinct prompt (equal ones once)
                    fit.timed(t0, t1, len({keys[j] for j in g}) * S)
                seen = set()
                for j, lg in zip(g, got):
                    self._joined(rows[j], join[j], lg, reused[j], S, keys[j] in seen)
                    seen.add(keys[j])
                    admitted.add(j)
        except Exception as e:  # noqa: BLE001 - the requests not admitted yet get the error (not retried
            # forever); those admitted run on
            for j, r in enumerate(join):
                if j not in admitted:
                    self._fail(r, e)

    def admit_forward_tokens(self) -> int:
        """A prefill forward's own cost in tokens, as the grouping of joining prompts weighs it now:
        ``admit_cost`` when pinned, else learned from the admits timed so far (the worker's call)."""
        fit = self._admit_fit
        if fit is None:
            return self.admit_cost
        learned, v = fit.learned, fit.forward_tokens()
        if fit.learned and not learned and self.on_admit_cost is not None:
            self.on_admit_cost(v, fit)
        return v

    def admit_cost_source(self) -> str:
        """Where admit_forward_tokens() comes from: pinned, learned, or default (the device type's)."""
        fit = self._admit_fit
        return "pinned" if fit is None else "learned" if fit.learned else "default"

    def _rest(self, row: "_Row", t: int) -> int:
        """The slots from t on that row needs: its answer's rest; a chunked prompt's (or its
        follower's), its prompt's slots past t and its whole answer."""
        if row.fill is None:
            return row.req.max_tokens - len(row.ids)
        return row.runs[0][1] + len(row.req.prompt) - t + row.req.max_tokens

    def _plan(self, span: int, now: int, leaders: list) -> Optional[list]:
        """The chunks a prompt computing ``span`` tokens prefills in, one an iteration from this one
        on: at most ``now`` tokens in this one, then at most what the budget leaves after the chunks
        of the prompts prefilling before it (rows ``leaders``: theirs are kept), as many as fit
        (vLLM's: the budget's rest); None when nothing is left now. A prompt placed for k iterations
        ends at the slot before the k-th step's and writes a slot only once every step that writes it
        has run (Decoder.fill): after its j-th chunk, at least k - 1 - j of its tokens are left."""
        B = self.prefill_chunk
        if now <= 0:
            return None

        def cap(j: int) -> int:
            if j == 0:
                return now
            return max(0, B - sum(self._slots[i].plan[j - 1] for i in leaders if len(self._slots[i].plan) >= j))

        k, R = 0, span
        while R > 0:
            R -= min(cap(k), R)
            k += 1
        while True:  # (the greedy count fits unless the tokens left to its last ones bind: one more)
            out, R = [], span
            for j in range(k):
                c = max(0, min(cap(j), R - (k - 1 - j)))
                out.append(c)
                R -= c
            if R == 0:
                return out
            k += 1

    def _shares(self, r: Request, q: Request, hit) -> bool:
        """Request r's prompt starts as the chunked prompt q's does, SHARE_MIN tokens past what the
        prefix cache gives r (of q's cache salt), and the cache is on: r waits for q's last chunk, then
        copies that start."""
        from .prefix_cache import common_length

        need = (hit[1] if hit else 0) + SHARE_MIN
        return (self.prefix is not None and (q.model, q.cache_salt) == (r.model, r.cache_salt)
                and q.prompt[:need] == r.prompt[:need]
                and common_length(q.prompt, r.prompt) >= need)

    def _place(self, i: int, r: Request, hit, plan: list, follow: list) -> None:
        """Request r's prompt into row i in the chunks of ``plan`` (Engine._chunk), one before each of
        the next len(plan) steps; its first token is fed at the last of them, so its prompt ends at
        t0 + k - 2 (t0: the batch's next slot, k: its chunks). ``follow``: (request, row) of those
        with its prompt, their rows copies of its after its last chunk. The first chunk runs now."""
        dec, L, k = self._dec, len(r.prompt), len(plan)
        c0 = hit[1] if hit else 0
        if self.prefix is not None:  # the rows admitted before it (their prompts kept) may give more
            again = self.prefix.lookup(r.model, r.prompt, r.cache_salt)  # (the look that counts: a hit)
            if again and again[1] > c0:
                # a copied slot must lie before this step's slot t0 (no step writes it after): at most
                # L - k + 1 of them; the plan's first chunks compute as many fewer
                c = min(again[1], L - k + 1)
                hit, gain = (again[0], c), c - c0
                for j in range(k):
                    cut = min(gain, plan[j])
                    plan[j] -= cut
                    gain -= cut
        c = hit[1] if hit else 0
        first = dec.t + k - 1 - L
        row = self._slots[i] = _Row(r, first, dec.device)
        row.fill, row.plan = [c, c], plan
        self.batches += 1
        try:
            dec.place(i, first, L, self.names[r.model] if self.mixed else None, hit or None)
        except Exception as e:  # noqa: BLE001 - this request's failure only (and its followers')
            self._slots[i] = None
            self._fail(r, e, row)
            for f, _ in follow:
                self._fail(f, e)
            return
        for f, j in follow:
            self._follow(j, f, i)
        self._chunk(i, row)

    def _follow(self, j: int, r: Request, i: int) -> None:
        """Request r (row j) has row i's prompt, prefilling in chunks: its row waits, a copy of row i's
        once its last chunk ran (_chunk)."""
        lead = self._slots[i]
        row = self._slots[j] = _Row(r, lead.runs[0][1], self._dec.device)
        row.fill, row.lead = lead.fill, lead

    def _free_cancelled(self) -> None:
        """The rows whose clients left: freed (a prompt prefilling in chunks: its first follower still
        waiting takes its row and its chunks on)."""
        for i, row in enumerate(self._slots):
            if row is None or not row.req.cancelled:
                continue
            self._slots[i] = None  # (stepped once more, a step for no one when it was the last)
            self._ended(row.req, "abort", row)
            if row.fill is not None and row.lead is None:
                rest = [j for j, f in enumerate(self._slots) if f is not None and f.lead is row and not f.req.cancelled]
                if rest:
                    f = self._slots[rest[0]]
                    f.lead, f.plan = None, row.plan
                    self._slots[i], self._slots[rest[0]] = f, None
                    for j in rest[1:]:
                        self._slots[j].lead = f

    def _fill_step(self) -> None:
        """The next chunks of the prompts prefilling in chunks (before this iteration's step; each
        holds its share of the budget since it was placed)."""
        for i, row in enumerate(self._slots):
            if row is not None and row.fill is not None and row.lead is None:
                self._chunk(i, row)

    def _chunk(self, i: int, row: "_Row") -> None:
        """Row i's next chunk (Decoder.fill), before the step at the batch's slot t: its plan holds one
        chunk for each step up to the one that feeds its first token (its prompt's end + 1); after the
        last, the row is kept, its followers' rows copies of it, and each one's first token taken."""
        dec, r = self._dec, row.req
        follow = [j for j, f in enumerate(self._slots) if f is not None and f.lead is row]
        if r.cancelled and all(self._slots[j].req.cancelled for j in follow):  # freed before the step
            return
        first, L, a = row.runs[0][1], len(r.prompt), row.fill[0]
        try:
            if len(row.plan) != first + L + 1 - dec.t:  # never: each chunk runs before its step
                raise RuntimeError(f"chunked prefill off its steps (slot {dec.t}, prompt end {first + L - 1}, "
                                   f"{len(row.plan)} chunks left)")
            n = row.plan.pop(0)
            b = a + n
            if L - b < len(row.plan) or (not row.plan and (b != L or not n)):
                raise RuntimeError(f"chunk {a}..{b} of a {L}-token prompt, {len(row.plan)} chunks left")
            if n:
                logits = dec.fill(i, r.prompt[a:b], first, a)
                self._spent += n
        except Exception as e:  # noqa: BLE001 - this request's failure only (and its followers'), rows freed
            for j in [i] + follow:
                f, self._slots[j] = self._slots[j], None
                self._fail(f.req, e, f)
            return
        row.fill[0] = b
        if row.plan:
            return
        c = row.fill[1]
        row.fill = None
        r.cached = min(r.cached, c) if r.echo is not None and r.logprobs is not None else c
        self._keep(i, row)
        for j in follow:
            f = self._slots[j]
            dec.copy_row(i, j)
            f.fill = f.lead = None
            f.req.cached = min(f.req.cached, L) if f.req.echo is not None and f.req.logprobs is not None else L
        for j in [i] + follow:
            self._take(j, self._slots[j], logits)

    def _joined(self, i: int, r: Request, logits, reuse, S: int, whole: bool) -> None:
        """Request r's row i, prefilled (its last S prompt tokens computed, none where ``whole``: a copy
        of an equal prompt's row) with its next-token ``logits`` [V]: kept, its first token taken."""
        row = self._slots[i] = _Row(r, self._dec.t - len(r.prompt), self._dec.device)
        # cached: the prompt tokens not computed for this request. Every row joining in one prefill
        # computes its last S tokens (a longer reused prefix is partly recomputed), a copy of an equal
        # prompt's row none; an echoed prompt scored first counts the tokens neither its forward nor
        # its row computed
        c = len(r.prompt) if whole else max(0, len(r.prompt) - S) if reuse else 0
        r.cached = min(r.cached, c) if r.echo is not None and r.logprobs is not None else c
        self._keep(i, row)
        self._take(i, row, logits[None])

    @staticmethod
    def _leads(join: list, reused: list) -> list:
        """Requests joining together whose prompts start alike, past what the prefix cache
        gives (a system prompt, before anything is kept: a batch's first rows): that start
        is computed once. Per request: None, its prompt computed in a first prefill, or
        (i, c): its first c tokens copied from request i's row after that prefill (SHARE_MIN
        more than it found kept, at least), a second prefill computing the rest. Equal
        prompts stay in one prefill (Decoder.admit computes them once)."""
        from .prefix_cache import common_length

        out, first = [None] * len(join), []
        for j, r in enumerate(join):
            need = (reused[j][1] if reused[j] else 0) + SHARE_MIN  # tokens to share, at least
            best, at = 0, None
            for i in first:
                q = join[i]
                if (q.model, q.cache_salt) != (r.model, r.cache_salt):  # (--mixed) an adapter's keys, a salt's
                    continue
                if q.prompt == r.prompt:
                    best = None
                    break
                if q.prompt[:need] == r.prompt[:need]:  # (in C: the common case, a kept system prompt, is quick)
                    c = min(common_length(q.prompt, r.prompt), len(r.prompt) - 1)
                    if c > best:
                        best, at = c, i
            if best is not None and best >= need:
                out[j] = (at, best)
            else:
                first.append(j)
        return out

    def _keep(self, i: int, row: "_Row") -> None:
        """Row i's tokens in its slots (its prompt, then the answer fed so far) into the prefix
        cache, read around the slots a move of the batch's slot skipped (_Row.slots)."""
        dec = self._dec

        def read(a: int, n: int) -> torch.Tensor:
            parts = [dec.kv(i, lo, hi) for lo, hi in row.slots(a, n)]
            return parts[0] if len(parts) == 1 else torch.cat(parts, 3)

        self._cache_put(row.req.model, (row.req.prompt + row.ids)[:row.fed(dec.t)], read, salt=row.req.cache_salt)

    def _cache_put(self, model: str, tokens: list, read, scores=None, salt: Optional[str] = None) -> None:
        """PrefixCache.insert, where the cache is on."""
        if self.prefix is None:
            return
        try:
            self.prefix.insert(model, tokens, read, scores, salt)
        except Exception as e:  # noqa: BLE001 - out of memory for a copy: the cache is only a saving,
            # never a request's failure; it stops here (its memory back) and serving goes on without it
            self.prefix = None
            print(f"flora serve: prefix cache off ({type(e).__name__}: {e})", file=sys.stderr)

    def _score(self, waiting: list) -> list:
        """The echo requests at the head of the queue that this batch's model serves
        send their prompt before their answer: with logprobs, each prompt token's,
        from forwards in the batch's mode (between two decode steps), the prompts of
        all of them together (:meth:`_score_prompts`); those with max_tokens 0 end
        here, taking no row. The rest, still waiting (those whose client left,
        dropped). One that asks for logprobs and one token (what lm-eval-harness's
        loglikelihood requests send) takes that token from the scoring forward's last
        position, not from a row whose prefill would compute it again; one that asks
        for more finds its prompt's keys and values in the prefix cache (the forward
        kept them) and its row computes only the last few tokens."""
        head = next((j for j, r in enumerate(waiting) if r.key(self.mixed) != self._key), len(waiting))
        waiting, rest = waiting[:head], waiting[head:]
        # (prompt, model) -> [alternatives wanted, the next token's logits wanted, a row generates after it]:
        # a prompt scored once (n choices, equal prompts)
        asks: dict = {}
        for r in waiting:
            if not r.cancelled and r.echo is not None and not r.scored and r.logprobs is not None:
                a = asks.setdefault(self._score_key(r), [0, False, False])
                a[0], a[1], a[2] = max(a[0], r.logprobs), a[1] or r.max_tokens == 1, a[2] or r.max_tokens > 1
        # their queue time ends as their scoring (or, max_tokens 0 without it, their answer) begins
        _scheduled([r for r in waiting if not r.cancelled and r.echo is not None and not r.scored
                    and (r.logprobs is not None or not r.max_tokens)])
        scored = self._score_prompts(asks) if asks else {}
        # cached: the prompt tokens not computed for the request. A forward's row computes each slot
        # once; the first request (in arrival order) whose prompt holds a slot counts it computed, the
        # others (a shared context's other choices, an equal prompt: all of it) as cached
        keep, claimed, texts = [], {}, {}
        for r in waiting:
            if r.cancelled:
                self._ended(r, "abort")
                continue
            if r.echo is not None and not r.scored:
                r.scored = True
                got = None if r.logprobs is None else scored[self._score_key(r)]
                if isinstance(got, Exception):  # this prompt's failure only
                    self._fail(r, got)
                    continue
                # its tokens' texts as its skip_special_tokens asks (special tokens kept with false), once a
                # prompt and flag
                entries, at = None, (self._score_key(r), r.skip_special)
                if got is not None:
                    entries = texts[at] = texts[at] if at in texts else got[0](r.skip_special)
                if got is not None:
                    taken = claimed.setdefault(got[2][0], set())
                    mine = [s for s in got[2][1] if s not in taken]
                    taken.update(mine)
                    r.cached = len(r.prompt) - len(mine)
                if entries is not None and r.logprobs < asks[self._score_key(r)][0]:  # another asked for more
                    entries = [(t, v, None if a is None else a[:r.logprobs]) for t, v, a in entries]
                r.events.put(("prompt", r.index, entries))
                if r.max_tokens == 1 and got is not None:
                    self._take(None, _Row(r, 0, self.model.device), got[1])
                    continue
            if r.max_tokens:
                keep.append(r)
            else:
                r.events.put(("done", r.index, "", "length", 0, None if r.logprobs is None else []))
                self._ended(r, "length")
        return keep + rest

    def _score_key(self, r: Request) -> tuple:
        return tuple(r.prompt), r.model if self.mixed else None, r.cache_salt  # a salt's prompts scored apart

    def _score_prompts(self, asks: dict) -> dict:
        """Prompts scored together: ``asks`` (prompt ids, model) -> [k alternatives,
        the next token's logits wanted, a row generates after it] -> each one's (its logprob
        entries given skip_special_tokens, those logits [1, V] or None, the slots computed for it: _score_forward's),
        or the exception that failed it. Prompts of one model that start alike (at least
        SHARE_MIN tokens: lm-eval's choices after one context) are packed into one
        sequence, their shared prefix computed once (:class:`_Packed`). Each pack first
        looks up the start the prefix cache gives it (:meth:`_lookup`); then the packs,
        those that compute the most tokens first, as many a forward as fit in
        SCORE_TOKENS positions computed (a row computes as many as the one that computes
        the most: padding counted, copied tokens not) and SCORE_SLOTS key slots (copied
        ones included), so that mostly-cached prompts share a forward. A forward that
        fails is run again a pack, then a prompt, at a time, so that only a failing
        prompt fails."""
        out: dict = {}

        def run(group: list) -> None:
            try:
                out.update(self._score_forward(group, asks))
            except Exception as e:  # noqa: BLE001 - answered per prompt
                if len(group) > 1:
                    for p in group:
                        run([p])
                elif len(group[0].keys) > 1:
                    for q in group[0].keys:
                        run([_Packed(q)])
                else:
                    out[group[0].keys[0]] = e

        packs: list = []
        for q in sorted(asks, key=lambda q: (str(q[1]), str(q[2]), q[0])):  # per model and salt, sorted: alike
            # ones adjacent
            p = packs[-1] if packs else None
            if p is None or not p.takes(q):
                packs.append(_Packed(q))
            else:
                p.add(q)
        group, S, T = [], 0, 0
        for p in sorted(packs, key=lambda p: -self._lookup(p, asks)):
            s, t = max(S, self._lookup(p, asks)), max(T, len(p.tokens))
            # a long prompt's forward runs causal, unmasked: never beside a pack's [L, L] mask
            if group and ((len(group) + 1) * s > SCORE_TOKENS or (len(group) + 1) * t > SCORE_SLOTS
                          or len(group[0].tokens) > PACK_TOKENS >= len(p.tokens)):
                run(group)
                group, s, t = [], self._lookup(p, asks), len(p.tokens)
            group.append(p)
            S, T = s, t
        run(group)
        return out

    def _lookup(self, p: "_Packed", asks: dict) -> int:
        """The tokens pack ``p`` computes: its tokens less those the prefix cache gives it
        (``p.hit``, looked up once: PrefixCache.lookup_scored's (kv, scores, c) of its
        start, with the alternatives its prompts ask for, below what they all share; or None)."""
        if not p.looked:
            p.looked, pc = True, self.prefix
            if pc is not None and len(p.tokens) <= PACK_TOKENS:  # a longer prompt runs unmasked; reused,
                # it would need a [T, T] mask
                p.hit = pc.lookup_scored(p.model if self.mixed else self._key, p.keys[0][0],
                                         max(asks[q][0] for q in p.keys), p.trunk - 1, p.salt)
        return len(p.tokens) - (p.hit[2] if p.hit else 0)

    def _score_forward(self, group: list, asks: dict) -> dict:
        """One forward over ``group``'s packs, a row each (``--mixed``: its adapter), padded
        at their end; the head and a log_softmax in fp32 run on the real positions only,
        SCORE_LOGITS logits at a time (no [B, T, V] logits held): each prompt's entries
        (the first token's logprob None, as OpenAI's: nothing comes before it), its
        last position's logits (the next token's) and the slots computed for it ((forward,
        row), slot ids: those of its tokens after the ones the prefix cache gave).
        Rows of one prompt each run causal attention unmasked (nothing reads the
        padding's own results); a pack of several, the prefix tree's mask: a token
        attends to its ancestors, its RoPE position its depth, so each prompt's tokens
        see exactly what they see alone.

        With the prefix cache: a pack's first c slots (its first prompt's first c tokens,
        each slot's depth its index) come from blocks an earlier scoring forward kept,
        their keys and values and the scores of tokens 1 .. c, c below the tokens all its
        prompts share (so that the c-th token, whose logprob is kept, is each one's too);
        the row computes the rest, its queries attending to the copied keys. Then each
        pack's shared start (a prompt alone: the whole of it), and the whole prompt of
        each that a row generates after (echo, max_tokens >= 2), are kept with their
        scores (the blocks not kept yet read from the forward): only such a chain of slots
        holds what its tokens compute alone."""
        m, dev, pc = self.model, self.model.device, self.prefix
        B, T = len(group), max(len(p.tokens) for p in group)
        K = max(asks[q][0] for p in group for q in p.keys)
        owner = [p.model if self.mixed else self._key for p in group]  # the prefix cache's model of each pack
        S = max(self._lookup(p, asks) for p in group)  # the query slots a row
        hits = [p.hit for p in group]
        # the key slots: the copied ones, then the computed (a row copying more than T - S recomputes some)
        start = [min(h[2], T - S) if h else 0 for h in hits]
        ids = torch.full((B, S), self.pad, dtype=torch.long)
        slots = torch.tensor(start)[:, None] + torch.arange(S)  # each query's slot (padding: its own)
        pos = slots.clone()
        for b, p in enumerate(group):
            L = len(p.tokens) - start[b]
            ids[b, :L] = torch.tensor(p.tokens[start[b]:])
            pos[b, :L] = torch.tensor(p.depth[start[b]:])
        mask = None
        if any(start) or any(len(p.keys) > 1 for p in group):
            # key slot j is an ancestor of query slot i (or i itself) when i lies in j's subtree [j, end_j)
            ends = torch.arange(1, T + 1).repeat(B, 1)  # padding: its own slot only
            for b, p in enumerate(group):
                ends[b, :len(p.tokens)] = torch.tensor(p.ends())
            key = torch.arange(T)
            mask = ((key[None, None, :] <= slots[:, :, None]) & (slots[:, :, None] < ends[:, None, :]))[:, None]
            mask = mask.to(dev)
        # what the prefix cache will keep: (row, tokens, the prompt whose scores they are, their slots), the
        # keys and values copied aside in the forward where it has them not
        keeps = []
        if pc is not None:
            for b, p in enumerate(group):
                todo = {tuple(p.keys[0][0][:p.trunk]): (p.keys[0], list(range(p.trunk)))}
                for q, path in zip(p.keys, p.paths):
                    if asks[q][2]:
                        todo.setdefault(q[0], (q, path))
                for tokens, (q, path) in todo.items():
                    # the slots of its whole blocks not kept yet (from lo on)
                    whole, lo = pc.keeps(len(tokens)), pc.held(owner[b], list(tokens), group[b].salt)
                    keeps.append((b, tokens, q, path[lo:whole] if lo < whole else None, lo))
        saved = [(b, torch.tensor(path, device=dev)) for b, _, _, path, _ in keeps if path is not None]
        kv = _ScoreKV([(b, h[0], c) for b, (h, c) in enumerate(zip(hits, start)) if c],
                      torch.tensor(start, device=dev) if any(start) else None, T, saved)
        rows = m.adapter_rows([self.names[p.model] for p in group], B) if self.mixed else None
        n, carry = m.run_layers(ids.to(dev), pos.to(dev), mask, cache=kv, rows=rows, head=False)
        self.score_forwards += 1
        self.score_rows += sum(len(p.keys) for p in group)
        self.score_tokens += sum(len(p.tokens) - c for p, c in zip(group, start))
        # the head runs on every computed real slot (each predicts a prompt's next token, or ends one), row
        # after row: slot j >= start[b] of row b is the head's row first[b] + j - start[b]
        at = torch.tensor([b * S + j for b, p in enumerate(group) for j in range(len(p.tokens) - start[b])],
                          dtype=torch.long)
        first = [0]
        for b, p in enumerate(group):
            first.append(first[-1] + len(p.tokens) - start[b])
        # each prompt: (its key, its row, its slots); each of its tokens after the first whose slot before it
        # was computed: (that slot as the head's row, the token), prompt after prompt
        prompts = [(q, b, path) for b, p in enumerate(group) for q, path in zip(p.keys, p.paths)]
        pairs = [(first[b] + r[k - 1] - start[b], q[0][k]) for q, b, r in prompts for k in range(start[b] + 1, len(r))]
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])  # by slot, as the chunks run
        src = torch.tensor([pairs[i][0] for i in order], dtype=torch.long)
        target = torch.tensor([pairs[i][1] for i in order], dtype=torch.long).to(dev)
        at = at.to(dev)
        # run_layers routed each row's adapter state while it ran; the head runs here: each slot
        # with its row's adapter
        slot_rows = None if rows is None else rows.repeat_interleave(S)

        def head(idx: torch.Tensor) -> torch.Tensor:
            return m.run_head(n[idx], None if carry is None else carry[idx],
                              None if slot_rows is None else slot_rows[idx])

        picked, top_v, top_i = [], [], []
        chunk, lo = max(1, SCORE_LOGITS // m.arch.vocab_size), 0
        for s in range(0, len(at), chunk):
            lp = torch.log_softmax(head(at[s:s + chunk]).float(), -1)
            best = lp.topk(K)
            hi = int(torch.searchsorted(src, s + chunk))  # the pairs whose slot is in this chunk
            picked.append(lp[(src[lo:hi] - s).to(dev), target[lo:hi]])
            top_v.append(best.values)
            top_i.append(best.indices)
            lo = hi
        # the next token's logits, in the model's dtype as a step's, of the prompts that take it from here
        nxt = [j for j, (q, _, _) in enumerate(prompts) if asks[q][1]]
        after = head(at[torch.tensor([first[b] + r[-1] - start[b] for q, b, r in (prompts[j] for j in nxt)],
                                     dtype=torch.long, device=dev)]) if nxt else None
        after = {j: after[i:i + 1] for i, j in enumerate(nxt)}
        # each computed pair's row of scores: [its logprob, the k best's], the k best's ids; on the host
        back = torch.empty(len(pairs), dtype=torch.long)
        back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(pairs))
        back = back.to(dev)
        top_v, top_i, at_pair = torch.cat(top_v), torch.cat(top_i), src.to(dev)[back]
        values = torch.cat([torch.cat(picked)[back, None], top_v[at_pair]], 1).cpu()
        indices = top_i[at_pair].cpu()
        out, o, scores = {}, 0, {}
        for j, (q, b, r) in enumerate(prompts):
            k = len(r) - 1 - start[b]  # its computed rows
            v, i = values[o:o + k], indices[o:o + k]
            if start[b]:  # tokens 1 .. c: the kept scores, with the alternatives its pack asks for
                kh = hits[b][1][1].shape[1]
                v = torch.cat([hits[b][1][0][:start[b]], v[:, :kh + 1]])
                i = torch.cat([hits[b][1][1][:start[b]], i[:, :kh]])
            scores[q] = (v, i)
            # the slots computed for it (its first start[b] tokens copied), named by forward and row
            out[q] = (functools.partial(self._entries, q[0], v.tolist(), i.tolist(), asks[q][0]), after.get(j),
                      ((self.score_forwards, b), r[start[b]:]))
            o += k
        for (b, tokens, q, _, _), got in zip(keeps, kv.got(keeps)):
            self._cache_put(owner[b], list(tokens), got, scores[q], group[b].salt)
        return out

    def _entries(self, prompt: list, values: list, indices: list, k: int, skip_special: bool = True) -> list:
        """A prompt's logprob entries: (its text, its logprob, [(text, logprob) of the k
        most likely]) a token, the first's (None, None); ``values``: per position after
        the first, [the token's logprob, the alternatives' (k or more)], ``indices`` the
        alternatives'; texts without special tokens unless ``skip_special`` is false."""
        d = Detokenizer(functools.partial(self.text, skip_special=skip_special))
        entries = [(d.add(prompt[0]), None, None)]
        for t, v, alts in zip(prompt[1:], values, indices):
            others = [(d.peek(a), x) for a, x in zip(alts[:k], v[1:])]  # before t is added
            entries.append((d.add(t), v[0], others))
        held = d.rest()  # a prompt that ends inside a character: its last token carries it
        entries[-1] = (entries[-1][0] + held, *entries[-1][1:])
        return entries

    def _take(self, i: Optional[int], row: "_Row", logits) -> None:
        """Row i's next token from its logits [1, V]: emitted, and fed at the next step. i None:
        a request answered without a row (one token, from its echo's forward)."""
        self._took(i, row, *self._tokens(logits, [row])[0])

    def _tokens(self, logits, rows: list) -> list:
        """Each row's next token from its logits (rows[j]'s: logits[j], [m, V]) and, where it asks,
        its logprobs, for all the rows at once: a few operations a step, not a few a row (each a
        launch on a GPU, each row's read a sync), and one read. [(token, or the exception its
        sampling raised; (logprob, alternatives) or None)]. A failure of the batch's sampling is
        each row's own: then every row alone."""
        try:
            return self._drawn(logits, rows)
        except Exception:  # noqa: BLE001 - whichever row it was fails alone (below), the rest go on
            if len(rows) == 1:
                raise
        out = []
        for j, row in enumerate(rows):
            try:
                out.append(self._drawn(logits[j:j + 1], [row])[0])
            except Exception as e:  # noqa: BLE001
                out.append((e, None))
        return out

    def _drawn(self, logits, rows: list) -> list:
        from .generation import Penalties, sample_rows

        dev, x = logits.device, logits
        adjusted, hot = [], []
        for j, row in enumerate(rows):
            r, s = row.req, row.req.sampling
            # vLLM's min_tokens: until the answer has that many, the tokens that would end it (the EOS, even
            # with ignore_eos as vLLM's, and the stop ids) are masked out of its logits (Penalties.banned)
            ban = len(row.ids) < r.min_tokens
            if (s.adjusts or ban) and row.penalties is None:  # its prompt's tokens, at its first token
                row.penalties = Penalties(s, torch.tensor([r.prompt], device=dev), logits.shape[-1],
                                          banned=(self.eos | set(r.stop_ids)) if ban else None)
            elif not ban and row.penalties is not None:
                row.penalties.banned = None
            if row.penalties is not None:
                adjusted.append(j)
            if s.temperature > 0:
                hot.append(j)
        if adjusted:
            x = logits.to(torch.float32, copy=True)  # the logprobs read the model's own
            for j in adjusted:
                x[j] = rows[j].penalties(x[j:j + 1])[0]
        tokens = x.argmax(-1)  # greedy: the argmax of the penalised, biased logits (vLLM's)
        if hot:
            at = torch.tensor(hot, device=dev)
            drawn = sample_rows(x if len(hot) == len(rows) else x.index_select(0, at),
                                [rows[j].req.sampling for j in hot], [rows[j].generator for j in hot])
            tokens = drawn if len(hot) == len(rows) else tokens.index_copy(0, at, drawn)
        asks = [j for j, row in enumerate(rows) if row.req.logprobs is not None]
        lps = None
        if asks:  # the model's own log-probabilities (fp32, before temperature, top-k and top-p)
            at = torch.tensor(asks, device=dev)
            lp = torch.log_softmax(logits.index_select(0, at).float(), -1)
            k = max(rows[j].req.logprobs for j in asks)
            top = lp.topk(k) if k else None
            own = lp.gather(1, tokens.index_select(0, at).clamp_min(0)[:, None])
            lps = (own.squeeze(1).tolist(), None if top is None else top.values.tolist(),
                   None if top is None else top.indices.tolist())
        out = []
        for j, t in enumerate(tokens.tolist()):  # the one read
            if t < 0:
                out.append((ValueError("sampling: no finite probability to draw from (NaN or inf logits)"), None))
                continue
            if rows[j].penalties is not None:  # (the adjusted rows)
                rows[j].penalties.add(tokens[j:j + 1])
            out.append((t, None))
        for a, j in enumerate(asks):
            if not isinstance(out[j][0], Exception):
                k = rows[j].req.logprobs
                alts = [] if not k else list(zip(lps[2][a][:k], lps[1][a][:k]))
                out[j] = (out[j][0], (lps[0][a], alts))
        return out

    def _took(self, i: Optional[int], row: "_Row", token, lp) -> None:
        """Row i's next token (or the exception its sampling raised) and its logprobs: emitted, and
        fed at the next step."""
        try:
            if isinstance(token, Exception):
                raise token
            first = row.first_at is None
            row.add(token, self, lp)
            if first and row.first_at is not None:
                self.metrics.first_token(row.req.model, row.req.arrived, row.first_at)
            if row.done and not row.req.cancelled and i is not None:  # a conversation's next turn starts so
                self._keep(i, row)
        except Exception as e:  # noqa: BLE001 - this row's own failure (NaN logits: sampling raises)
            # ends this row only: raised, it failed every row of the batch, and at a prefill it left
            # the joining requests waiting, admitted again and again (errors without end, the worker
            # never free for the next request)
            row.done = True
            self._fail(row.req, e, row)
        if row.done:
            self._ended(row.req, row.reason or "abort", row)
            if i is not None:
                self._slots[i] = None
        else:
            row.next = token

    def _step(self) -> None:
        dec = self._dec
        # the rows up to the last busy one run (new requests take the lowest free rows); under
        # CUDA graphs a power of two of them, one graph each
        n = max(i for i, r in enumerate(self._slots) if r is not None) + 1
        if dec.use_cuda_graph:
            n = min(1 << (n - 1).bit_length(), self.max_batch)
        # a row prefilling in chunks takes no token: its step writes the pad's keys at slot t, which
        # its chunk holding t rewrites later (Engine._place); a step of such rows only moves t on
        decoding = [i for i, r in enumerate(self._slots) if r is not None and r.fill is None]
        if not decoding:
            dec.advance(dec.t + 1)
            return
        fed = [self.pad] * n
        for i in decoding:
            fed[i] = self._slots[i].next
        logits = dec.step(torch.tensor(fed, device=dec.device), n_rows=n)
        self.steps += 1
        self.row_steps += len(decoding)
        if decoding != list(range(len(logits))):
            logits = logits.index_select(0, torch.tensor(decoding, device=logits.device))
        rows = [self._slots[i] for i in decoding]
        for i, row, got in zip(decoding, rows, self._tokens(logits, rows)):
            self._took(i, row, *got)

    def _fail(self, r: Request, e: Exception, row: Optional["_Row"] = None) -> None:
        """A choice's failure: its error event, and its end counted."""
        r.events.put(("error", f"{type(e).__name__}: {e}"))
        self._ended(r, "error", row)

    def _ended(self, r: Request, reason: str, row: Optional["_Row"] = None) -> None:
        """A choice's end into the metrics, once: ``row`` its tokens as usage counts them (an
        EOS too), None when it had none."""
        if r.ended:
            return
        r.ended = True
        self.metrics.ended(r.model, reason, r.arrived, time.monotonic(), len(row.ids) + row.counted if row else 0,
                           row and row.first_at, len(r.prompt) if r.first else 0, r.cached if r.first else 0,
                           r.scheduled, row and row.last_at)

    def metrics_text(self) -> str:
        """GET /metrics: the exposition text; the gauges read now, from the worker's batch and
        queue (a snapshot a scrape may see between two of its updates)."""
        running = dict.fromkeys(self.models, 0)
        waiting = dict(running)
        for row in list(self._slots):
            if row is not None:
                running[row.req.model] = running.get(row.req.model, 0) + 1
        with self.queue.mutex:
            queued = [r for r in self.queue.queue if isinstance(r, Request)]
        for r in queued + list(self._waiting):
            waiting[r.model] = waiting.get(r.model, 0) + 1
        fit = self._admit_fit
        return self.metrics.render(running, waiting, (self.admit_cost if fit is None else fit.value,
                                                      self.admit_cost_source()))

    def text(self, ids: list, skip_special: bool = True) -> str:
        if self._decode is not None:
            return self._decode(ids, skip_special_tokens=skip_special)
        return self.tok.decode(ids, skip_special_tokens=skip_special)


def _eos(model) -> list:
    from .generation import _eos_set

    return _eos_set(model.generation_eos_token_id)


def _scheduled(reqs: list) -> None:
    """The requests' prefill (or scoring) begins now: the end of their queue time (the first time only)."""
    now = time.monotonic()
    for r in reqs:
        if r.scheduled is None:
            r.scheduled = now


def _salts_apart(groups: list, keys: list) -> list:
    """Prefill groups (row indices) with no two rows of one prompt and adapter but other cache salts:
    Decoder.admit computes a prompt once for all its equal rows (their keys: (prompt, adapter, salt));
    such a row moves to a group of its own (rare: clients sending alike with other salts)."""
    out = []
    for g in groups:
        parts: list = []
        for j in g:
            part = next((p for p in parts if all(keys[i][:2] != keys[j][:2] or keys[i] == keys[j] for i in p)), None)
            if part is None:
                parts.append([j])
            else:
                part.append(j)
        out += parts
    return out


def _backend_decode(tokenizer):
    """The tokenizers library's own decode of a fast tokenizer whose transformers decode adds
    nothing to it (its methods transformers' own, no space clean-up): the same text without
    transformers' wrapper, which cost ~3x the decode itself, a decode or two every token of a
    streamed or stopped row (Detokenizer). None for any other tokenizer (its decode used)."""
    try:
        from transformers import PreTrainedTokenizerFast as Fast
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if (isinstance(tokenizer, Fast) and backend is not None and type(tokenizer).decode is Fast.decode
            and type(tokenizer)._decode is Fast._decode and not tokenizer.clean_up_tokenization_spaces):
        return backend.decode
    return None


class Detokenizer:
    """The text of a growing list of token ids, decoded a bounded tail at a time
    (the incremental detokenizer of vLLM and TGI): a token's text is that of the
    ids from ``prefix`` to it less that of the ids from ``prefix`` to ``read``
    (whose text is out), so the tokenizer's spacing rules still see the token
    before it; a character whose bytes are not all out yet (the text ends in
    U+FFFD) waits for the token that completes it. The pieces and :meth:`rest`
    join to ``decode(ids)`` (tests/test_serve.py checks SmolLM2's tokenizer)."""

    def __init__(self, decode):
        self.decode = decode
        self.ids, self.prefix, self.read, self.before = [], 0, 0, ""

    def _piece(self, window: list) -> Optional[str]:
        text = self.decode(window)
        if len(text) > len(self.before) and not text.endswith("\ufffd"):
            return text[len(self.before):]
        return None

    def add(self, token: int) -> str:
        """The text ``token`` adds ("" while it ends inside a character)."""
        self.ids.append(token)
        piece = self._piece(self.ids[self.prefix:])
        if piece is None:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self.before = self.decode(self.ids[self.prefix:self.read])
        return piece

    def peek(self, token: int) -> str:
        """The text ``token`` would add next (it is not added)."""
        return self._piece(self.ids[self.prefix:] + [token]) or ""

    def rest(self) -> str:
        """The text held back: a character cut short at the end, as decode gives it."""
        return self.decode(self.ids[self.prefix:])[len(self.before):]


class _Packed:
    """Prompts (score keys: (token ids, model)) of one model that start alike, as
    one sequence for a scoring forward: each distinct prefix one slot (a node of their
    prefix tree), in the tree's preorder. Added in sorted order, each prompt appends
    the tokens past what it shares with the one before (a prefix sorts first), so a
    node's subtree is the slots from it to its end (:meth:`ends`). ``trunk``: the
    tokens they all share, slots 0 .. trunk - 1 (a prompt alone: all of it)."""

    def __init__(self, key: tuple):
        self.model, self.salt, self.keys = key[1], key[2], []
        self.tokens, self.depth, self.paths = [], [], []  # paths: each prompt's slot a token
        self.trunk = len(key[0])
        self.hit, self.looked = None, False  # Engine._lookup's
        self.add(key)

    def _shared(self, ids: tuple) -> int:
        from .prefix_cache import common_length

        return common_length(self.keys[-1][0], ids)

    def takes(self, key: tuple) -> bool:
        """``key`` (after the last one in sorted order) shares enough to join, and fits."""
        if key[1:] != (self.model, self.salt):  # another model's or salt's: shares nothing
            return False
        c = self._shared(key[0])
        return c >= SHARE_MIN and len(self.tokens) + len(key[0]) - c <= PACK_TOKENS

    def add(self, key: tuple) -> None:
        c = self._shared(key[0]) if self.keys else 0
        path = self.paths[-1][:c] if self.keys else []
        for k in range(c, len(key[0])):
            path.append(len(self.tokens))
            self.tokens.append(key[0][k])
            self.depth.append(k)
        if self.keys:  # sorted: what all share is the least any two neighbours share
            self.trunk = min(self.trunk, c)
        self.keys.append(key)
        self.paths.append(path)

    def ends(self) -> list:
        """Each slot's subtree end: the first later slot no deeper than it (or the end)."""
        out, open_ = [len(self.tokens)] * len(self.tokens), []
        for i, d in enumerate(self.depth):
            while open_ and self.depth[open_[-1]] >= d:
                out[open_.pop()] = i
            open_.append(i)
        return out


class _ScoreKV:
    """``run_layers``' cache in a scoring forward (as generation.StaticKVCache is a
    prefill's): ``update`` gives attention each row's keys and values by slot, those a
    reused prefix copies (``reused``: (row, kv [layers, 2, kv_heads, >= c, hd], c))
    before those the row computes (its queries' first slot: ``start`` [B], None when
    every row computes from slot 0), ``T`` slots; and copies aside, layer by layer, the
    slots of ``saved`` ((row, slot ids)) that the prefix cache will keep. ``kv`` may be
    the prefix cache's list of blocks: the first c slots are joined once, here."""

    def __init__(self, reused: list, start: Optional[torch.Tensor], T: int, saved: list):
        from .generation import kv_slots

        self.reused = [(b, kv_slots(kv, c), c) for b, kv, c in reused]
        self.start, self.T, self.saved = start, T, saved
        self.kept = [[] for _ in saved]  # per saved: (keys, values) a layer

    decode_kernel = None  # a prefill's attention: no decode step to choose a kernel for

    def attend(self, *args):  # the decode step's RoPE, cache write and attention in one op: not here
        return None

    def update_rotated(self, *args):  # the decode step's fused RoPE and cache write: not here
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        if self.start is not None:
            B, h, S, d = k.shape
            kk, vv = k.new_zeros(B, h, self.T, d), v.new_zeros(B, h, self.T, d)  # padding: finite, masked
            for b, kv, c in self.reused:
                kk[b, :, :c] = kv[layer, 0, :, :c]
                vv[b, :, :c] = kv[layer, 1, :, :c]
            at = (self.start[:, None] + torch.arange(S, device=k.device))[:, None, :, None].expand(B, h, S, d)
            k, v = kk.scatter_(2, at, k), vv.scatter_(2, at, v)
        for got, (b, slots) in zip(self.kept, self.saved):
            got.append(torch.stack([k[b].index_select(1, slots), v[b].index_select(1, slots)]))
        return k, v

    def got(self, keeps: list) -> list:
        """Per (row, tokens, prompt, slots from its token lo on or None, lo) of ``keeps``
        (those with slots: ``saved``, in order): a ``read(a, n)`` of PrefixCache.insert
        (None for tokens before lo: blocks an earlier insert let go since), or None."""
        kept = iter(self.kept)
        return [None if x[3] is None else
                (lambda a, n, got=next(kept), lo=x[4]: None if a < lo else torch.stack(got)[:, :, :, a - lo:n - lo])
                for x in keeps]


class _Row:
    """One request's tokens as its batch generates them."""

    def __init__(self, req: Request, start: int, device="cpu"):
        self.req, self.ids, self.done = req, [], False
        # (token index, slot): its tokens from that index on, one a slot from that slot on; a run from
        # its first slot (its prompt's, then its answer's tokens), another after each skip
        self.runs = [(0, start)]
        self.next = None  # the token fed at the next step
        # a seeded request's own RNG
        self.generator = None if req.seed is None else torch.Generator(device=device).manual_seed(req.seed)
        self.penalties = None  # with penalties or a logit_bias: its token counts (generation.Penalties)
        # streaming, stop strings or logprobs: the text as it comes (else decoded once, at the end), in
        # pieces; the last characters out (a stop string may begin there) and those not yet streamed
        self.detok, self.pieces, self.n_out, self.tail, self.unsent, self.n_sent = None, [], 0, "", "", 0
        self.longest = max((len(x) for x in req.stop), default=0)
        self.entries, self.n_streamed = [], 0  # logprobs: one entry a token; how many went out in deltas
        self.first_at = None  # time.monotonic() at its first token (the metrics' time to first token)
        self.last_at = None  # and at its latest (inter-token latency, decode time)
        self.reason, self.counted = None, 0  # finish's reason (None: cancelled) and an EOS it counted
        # prefilling in chunks (Engine._chunk): [its prompt tokens in its slots so far, those reused]; None
        # once its last chunk ran (or never chunked)
        self.fill: Optional[list] = None
        self.plan: Optional[list] = None  # and its chunks' sizes, one an iteration from the next on
        # a request with a prompt prefilling in chunks: that row (its row a copy of it after its last chunk)
        self.lead: Optional["_Row"] = None

    def skip(self, t: int, t_new: int) -> None:
        """The batch's next slot moves from t to t_new (Engine._admit): its next token goes there."""
        self.runs.append((self.fed(t), t_new))

    def fed(self, t: int) -> int:
        """How many of its tokens its slots hold when the batch's next slot is t."""
        k, s = self.runs[-1]
        return k + t - s

    def slots(self, a: int, n: int) -> list:
        """The slot ranges [lo, hi) that hold its tokens a .. n - 1, in order."""
        out = []
        for j, (k, s) in enumerate(self.runs):
            lo, hi = max(a, k), min(n, self.runs[j + 1][0] if j + 1 < len(self.runs) else n)
            if lo < hi:
                out.append((s + lo - k, s + hi - k))
        return out

    def add(self, token: int, eng: Engine, lp: Optional[tuple] = None) -> None:
        """The next token; ``lp``: its logprob and its alternatives' (``Engine._tokens``)."""
        if self.done:
            return
        if self.req.cancelled:  # no one reads it: done, without an answer
            self.done = True
            return
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        else:
            eng.metrics.inter_token(self.req.model, now - self.last_at)
        self.last_at = now
        r = self.req
        if self.detok is None and (r.stream or r.stop or lp is not None):
            self.detok = Detokenizer(self._decode(eng))
        # each alternative as the text it would add here (the EOS: none)
        alts = None if lp is None else [(self.detok.peek(t), v) for t, v in lp[1]]
        # the checkpoint's EOS (unless ignore_eos) or a stop id ends it, never among its first min_tokens
        # tokens (the sampler drew neither there: _take); its text left out unless include_stop (vLLM's)
        eos = token in eng.eos and not r.ignore_eos
        ends = eos or token in r.stop_ids
        # stop_reason: null for the tokenizer's own EOS only; a generation config's other EOS ids (Llama 3's
        # list) are stop token ids to vLLM, their id (SamplingParams.update_from_generation_config,
        # vllm/v1/core/sched/utils.py check_stop)
        stop = None if token == eng.tok_eos and eos else token
        if ends and not r.include_stop:
            if lp is not None:
                self.entries.append(("", lp[0], alts))
            self.finish("stop", eng, counted=1, stop=stop)
            return
        self.ids.append(token)
        if self.detok is not None:
            piece = self.detok.add(token)
            if lp is not None:
                self.entries.append((piece, lp[0], alts))
            if piece and self._text(piece, eng):
                return
        if ends:
            self.finish("stop", eng, stop=stop)
        elif len(self.ids) >= r.max_tokens:
            self.finish("length", eng)

    def _decode(self, eng: Engine):
        """The text of token ids as the request asks: its special tokens left out, or kept."""
        return eng.text if self.req.skip_special else functools.partial(eng.text, skip_special=False)

    def _text(self, piece: str, eng: Engine) -> bool:
        """The next piece of the text: True when it completes a stop string (the row ends)."""
        r = self.req
        stop = r.stop
        # a stop string not in the text before ends in this piece: found in it and the
        # characters before it that may begin one; looked for once the answer has more than
        # min_tokens tokens (vLLM's: one that ended before is not found later)
        window = self.tail + piece
        found = [] if len(self.ids) <= r.min_tokens else [
            (i, x) for x in stop if (i := window.find(x, max(0, len(self.tail) + 1 - len(x)))) >= 0]
        if found:
            # vLLM's order: the first of the list found in the new text's window, not the first in the text
            # (vllm/v1/engine/detokenizer.py, check_stop_strings)
            cut, x = found[0]
            end = self.n_out - len(self.tail) + cut + (len(x) if r.include_stop else 0)
            self.finish("stop", eng, text=("".join(self.pieces) + piece)[:end], stop=x)
            return True
        self.pieces.append(piece)
        self.n_out += len(piece)
        self.tail = window[len(window) - self.longest + 1:] if self.longest > 1 else ""
        if self.req.stream:  # a tail that may be the start of a stop string waits
            self.unsent += piece
            end = len(self.unsent) - max((k for x in stop for k in range(1, len(x))
                                          if self.unsent.endswith(x[:k])), default=0)
            if end > 0:
                self._delta(self.unsent[:end])
                self.unsent, self.n_sent = self.unsent[end:], self.n_sent + end
        return False

    def _delta(self, text: str) -> None:
        """Streaming: the next text, and the logprobs of the tokens since the last delta."""
        entries = None
        if self.req.logprobs is not None:
            entries, self.n_streamed = self.entries[self.n_streamed:], len(self.entries)
        self.req.events.put(("delta", self.req.index, text, entries))

    def finish(self, reason: str, eng: Engine, counted: int = 0, text: Optional[str] = None,
               stop=None) -> None:
        """It ends (``reason``: its finish_reason; ``stop``: the stop string or stop id that
        ended it, its stop_reason; ``counted``: an ending token not in its ids)."""
        if self.done:
            return
        self.done = True
        if text is None:
            text = self._decode(eng)(self.ids) if self.detok is None else "".join(self.pieces) + self.detok.rest()
        self.req.stop_reason = stop
        if self.req.stream and (len(text) > self.n_sent or len(self.entries) > self.n_streamed):
            self._delta(text[self.n_sent:])
        self.req.events.put(("done", self.req.index, text, reason, len(self.ids) + counted,
                             None if self.req.logprobs is None else self.entries))
        self.reason, self.counted = reason, counted


# ------------------------------------------------------------------ HTTP
MAX_BODY = 16 << 20  # bytes of a request body at most (a prompt is bounded by the context anyway)
IO_TIMEOUT_S = 60.0  # a client that stops sending (a Content-Length past its body, an idle keep-alive)
# or stops reading gives its thread and connection back after this long
POLL_S = 0.25  # how often a non-streaming request's handler checks that its client is still there


def _usage(reqs: list, n_new: int) -> dict:
    n_prompt = sum(len(r.prompt) for r in reqs if r.first)  # a prompt once, whatever its n (OpenAI's count)
    cached = sum(r.cached for r in reqs if r.first)  # as OpenAI's: the prompt tokens the prefix cache gave
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _logprobs_json(chat: bool, entries: Optional[list], offset: int = 0) -> Optional[dict]:
    """A choice's (or a chunk's) ``logprobs`` from its entries (a Row's): chat's
    ``{"content": [...]}``, completions' four lists, ``text_offset`` counted from
    ``offset`` (where the first token's text begins in the choice's text)."""
    if entries is None:
        return None
    if chat:
        def item(text, lp):
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in alts]}
                            for t, lp, alts in entries]}
    tops, offsets = [], []
    for t, lp, alts in entries:
        offsets.append(offset)
        offset += len(t)
        if alts is None:  # a prompt's first token: nothing before it
            tops.append(None)
            continue
        top = {}
        for a, v in alts + [(t, lp)]:  # the most likely, and the token itself (OpenAI's: up to logprobs + 1)
            top.setdefault(a, v)
        tops.append(top)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def _response(chat: bool, rid: str, created: int, reqs: list, done: dict, prompts: dict) -> dict:
    """The answer to a request whose choices all ended (``done``: index -> its "done"
    event; ``prompts``: index -> an echoed prompt's entries)."""
    choices = []
    for r in reqs:
        _, i, text, reason, _, entries = done[r.index]
        lp = _logprobs_json(chat, entries, 0 if r.echo is None else len(r.echo))
        if r.echo is not None:  # completions: the prompt first, its tokens' logprobs too
            text = r.echo + text
            if lp is not None:
                lp = {k: v + lp[k] for k, v in _logprobs_json(chat, prompts[i]).items()}
        # stop_reason: vLLM's, the stop string or stop id that ended it (null: the EOS, the length)
        choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                        "finish_reason": reason, "stop_reason": r.stop_reason} if chat
                       else {"index": i, "text": text, "finish_reason": reason, "stop_reason": r.stop_reason,
                             "logprobs": lp})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": reqs[0].model, "choices": choices, "usage": _usage(reqs, sum(d[4] for d in done.values()))}


def _chunk(chat: bool, rid: str, created: int, model: str, index: int, text: Optional[str],
           reason: Optional[str], first: bool = False, logprobs: Optional[dict] = None, stop=None) -> dict:
    if chat:
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
                  "stop_reason": stop}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": reason, "stop_reason": stop,
                  "logprobs": logprobs}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}


def _cancel(reqs: list) -> None:
    """No one reads these choices any more: their rows stop, queued ones are dropped."""
    for r in reqs:
        r.cancelled = True


def _adapter_body(body, load: bool) -> str:
    """A load / unload_lora_adapter body (vLLM's): its ``lora_name``, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    need = ("lora_name", "lora_path") if load else ("lora_name",)
    if not all(isinstance(body.get(k), str) and body[k] for k in need):
        raise BadRequest(f"{' and '.join(repr(k) for k in need)} must be given, as non-empty strings")
    # vLLM's other fields: a replacement in place (here: unload, then load) and integer ids (flora names only)
    bad = [k for k in ("load_inplace",) if body.get(k) not in (None, False)] if load else \
        [k for k in ("lora_int_id",) if body.get(k) is not None]
    if bad:
        raise BadRequest(f"not supported: {', '.join(bad)}" + (" (unload the adapter, then load it)" if load else ""))
    return body["lora_name"]


def make_handler(engine: Engine, quiet: bool = True, api_key: Optional[str] = None,
                 allow_adapter_updates: bool = False, request_id_headers: bool = False):
    import hmac

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = IO_TIMEOUT_S  # the connection's socket timeout (StreamRequestHandler sets it)

        def log_message(self, fmt, *args):  # noqa: D401 - one line per request unless quiet
            if not quiet:
                sys.stderr.write(f"flora serve: {self.address_string()} {fmt % args}\n")

        def _send(self, status: int, obj, text_type: str = "text/plain; charset=utf-8") -> None:
            """A JSON object, or a string as text (vLLM's answer to an adapter update, the metrics)."""
            text = isinstance(obj, str)
            data = obj.encode() if text else json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", text_type if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self._request_id_header()
            if self.close_connection:  # so that the client does not send its next request on it
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _request_id_header(self) -> None:
            """vLLM's --enable-request-id-headers: every answer carries X-Request-Id, the request's
            header or a new id (its XRequestIdMiddleware)."""
            if request_id_headers:
                self.send_header("X-Request-Id", self.headers.get("X-Request-Id") or uuid.uuid4().hex)

        def _error(self, e: BadRequest) -> None:
            self._send(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status}})

        def _allowed(self) -> bool:
            """With an API key, /v1/ wants ``Authorization: Bearer KEY`` (a 401 object otherwise)."""
            if api_key is None or not self.path.startswith("/v1/"):
                return True
            got = self.headers.get("Authorization", "")
            if hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return True
            self.close_connection = True  # a POST's body stays unread
            self._error(BadRequest("a valid API key is needed (Authorization: Bearer KEY)", 401,
                                   "invalid_api_key"))
            return False

        def do_GET(self):
            if not self._allowed():
                return
            path, now = self.path.rstrip("/"), int(time.time())
            card = lambda n: {"id": n, "object": "model", "created": now, "owned_by": "flora"}  # noqa: E731
            served = engine.models
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": [card(n) for n in served]})
            elif path.startswith("/v1/models/"):
                name = urllib.parse.unquote(path[len("/v1/models/"):])
                if name in served:
                    self._send(200, card(name))
                else:
                    self._error(BadRequest(_not_served(name, served), 404, "model_not_found"))
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            elif path == "/metrics":  # not under /v1/: open with --api-key too, as scrapers come without one
                self._send(200, engine.metrics_text(), METRICS_TYPE)
            else:
                self._error(BadRequest(f"no such endpoint: GET {self.path}", 404, "not_found"))

        def do_POST(self):
            if not self._allowed():
                return
            path = self.path.rstrip("/")
            updates = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
            if path not in ("/v1/completions", "/v1/chat/completions") + (updates if allow_adapter_updates else ()):
                self.close_connection = True  # its body is unread: it would be parsed as the next request
                off = " (flora serve --allow-adapter-updates turns it on)" if path in updates else ""
                self._error(BadRequest(f"no such endpoint: POST {self.path}{off}", 404, "not_found"))
                return
            if path in updates:
                self._update(path == updates[0])
                return
            chat = path.endswith("chat/completions")
            ok, reqs = self._answering(lambda: engine.parse(self._json(), chat))
            if not ok:
                return
            # vLLM's id: the X-Request-Id header's, else the body's request_id, else a new one
            # (entrypoints/openai/serving_engine.py, _base_request_id)
            base = self.headers.get("X-Request-Id")
            base = (reqs[0].request_id or uuid.uuid4().hex) if base is None else base
            rid = ("chatcmpl-" if chat else "cmpl-") + base
            created = int(time.time())
            try:
                engine.submit(reqs)
            except NotServed:  # its adapter unloaded since parse: as any name not served
                self._error(BadRequest(_not_served(reqs[0].model, engine.models), 404, "model_not_found"))
                return
            if reqs[0].stream:
                self._stream(reqs, chat, rid, created)
                return
            got = self._wait(reqs)
            if got is None:  # the client left: its rows were cancelled, no one to answer
                return
            if isinstance(got, str):
                self._server_error(got)
                return
            self._send(200, _response(chat, rid, created, reqs, *got))

        def _server_error(self, message: str) -> None:
            """500: what failed in the server (not in the request), named."""
            self._send(500, {"error": {"message": message, "type": "server_error", "code": 500}})

        def _json(self):
            try:
                return json.loads(self._body() or b"null")
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"the request body is not valid JSON ({e})") from None

        def _answering(self, fn) -> tuple:
            """(True, fn()), or (False, None) once its error is answered: a BadRequest as
            it says, anything else a 500 (an answer, never a dropped connection)."""
            try:
                return True, fn()
            except BadRequest as e:
                self._error(e)
            except Exception as e:  # noqa: BLE001
                self._server_error(f"{type(e).__name__}: {e}")
            return False, None

        def _update(self, load: bool) -> None:
            """POST /v1/load_lora_adapter {"lora_name", "lora_path"} or /v1/unload_lora_adapter
            {"lora_name"} (vLLM's): answered once the worker has made the change."""
            def change() -> str:
                body = self._json()
                name = _adapter_body(body, load)
                try:
                    if load:
                        engine.load_adapter(name, body["lora_path"])
                    else:
                        engine.unload_adapter(name)
                except KeyError as e:
                    raise BadRequest(e.args[0], 404, "model_not_found") from None
                except ValueError as e:
                    raise BadRequest(str(e)) from None
                return name

            ok, name = self._answering(change)
            if not ok:
                return
            self._send(200, f"Success: LoRA adapter '{name}' {'added' if load else 'removed'} successfully.")

        def _wait(self, reqs: list):
            """Each choice's "done" event and echoed prompt's entries, by index; or
            the message of an error (the other choices stop), or None when the client
            hangs up first: its rows are then cancelled (they would generate on to
            their max_tokens)."""
            events, done, prompts = reqs[0].events, {}, {}
            while len(done) < len(reqs):
                try:
                    ev = events.get(timeout=POLL_S)
                except queue.Empty:
                    if self._client_gone():
                        _cancel(reqs)
                        self.close_connection = True
                        return None
                    continue
                if ev[0] == "error":
                    _cancel(reqs)
                    return ev[1]
                if ev[0] == "done":
                    done[ev[1]] = ev
                elif ev[0] == "prompt":
                    prompts[ev[1]] = ev[2]
            return done, prompts

        def _client_gone(self) -> bool:
            """The client closed its side (the socket reads as ended, or fails)."""
            sock = self.connection
            try:
                if not select.select([sock], [], [], 0)[0]:
                    return False  # nothing to read: still there, waiting
                return sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _body(self) -> bytes:
            """The request body, all Content-Length bytes of it, or BadRequest; a body
            not read whole closes the connection (its rest would be read as the next request)."""
            size = self.headers.get("Content-Length")
            n = int(size) if size is not None and size.strip().isdigit() else -1
            problem = None
            if self.headers.get("Transfer-Encoding"):
                problem = BadRequest("chunked request bodies are not read; send the body with a Content-Length",
                                     411)
            elif size is None:
                return b""
            elif n < 0:
                problem = BadRequest(f"the Content-Length header must be a byte count, got {size!r}")
            elif n > MAX_BODY:
                problem = BadRequest(f"the request body is {n} bytes; at most {MAX_BODY} are read", 413)
            else:
                try:
                    data = self.rfile.read(n)
                except TimeoutError:
                    data = b""
                if len(data) == n:
                    return data
                problem = BadRequest(f"the request body ended before its Content-Length ({n} bytes)")
            self.close_connection = True
            raise problem

        def _stream(self, reqs: list, chat: bool, rid: str, created: int) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self._request_id_header()
            self.end_headers()
            self.close_connection = True

            def send(obj) -> None:
                self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
                self.wfile.flush()

            model, events, left, seen, n_new = reqs[0].model, reqs[0].events, len(reqs), set(), 0
            offset = {}  # a choice's text_offset so far
            try:
                while left:
                    ev = events.get()
                    if ev[0] == "error":
                        _cancel(reqs)
                        send({"error": {"message": ev[1], "type": "server_error", "code": 500}})
                        break
                    i = ev[1]
                    first = i not in seen  # chat: the first chunk of a choice carries its role
                    seen.add(i)
                    if ev[0] == "prompt":  # echo: the prompt's text (choices are reqs in index order)
                        send(_chunk(chat, rid, created, model, i, reqs[i].echo, None, first,
                                    _logprobs_json(chat, ev[2])))
                        offset[i] = len(reqs[i].echo)
                    elif ev[0] == "delta":
                        lp = _logprobs_json(chat, ev[3], offset.get(i, 0))
                        offset[i] = offset.get(i, 0) + sum(len(e[0]) for e in ev[3] or ())
                        send(_chunk(chat, rid, created, model, i, ev[2], None, first, lp))
                    elif ev[0] == "done":
                        send(_chunk(chat, rid, created, model, i, None, ev[3], first, stop=reqs[i].stop_reason))
                        left, n_new = left - 1, n_new + ev[4]
                if not left and reqs[0].usage:  # as OpenAI's: no choices, the whole request's counts
                    send({**_chunk(chat, rid, created, model, 0, None, None), "choices": [],
                          "usage": _usage(reqs, n_new)})
                send(b"[DONE]")
            except OSError:  # broken pipe, reset, or a client that stopped reading (the timeout)
                _cancel(reqs)  # the client left: its rows stop (and its batch, when no other row goes on)

    return Handler


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True,
          api_key: Optional[str] = None, start: bool = True,
          allow_adapter_updates: bool = False, request_id_headers: bool = False) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving: call ``serve_forever``; port 0 picks a free one).
    ``api_key``: requests to /v1/ need ``Authorization: Bearer <api_key>``.
    ``allow_adapter_updates``: POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    (vLLM's) load and unload adapters while serving (off: 404).
    ``request_id_headers``: every answer carries an X-Request-Id header (vLLM's --enable-request-id-headers).
    ``start``: the engine's worker thread starts here (False: the caller runs
    ``engine.run()`` itself, as `flora serve` does in its main thread)."""
    if start:
        engine.start()
    srv = _Server((host, port), make_handler(engine, quiet, api_key, allow_adapter_updates, request_id_headers))
    srv.daemon_threads = True
    return srv


@contextlib.contextmanager
def serving(engine: Engine, host: str = "127.0.0.1", port: int = 0, **kw):
    """The engine behind an HTTP server in a background thread (port 0: a free one), for a
    Python program or a test: yields its URL. On exit the server and the engine's worker
    end (a worker left inside a torch op at interpreter exit ends the process with
    "terminate called without an active exception"). ``kw``: :func:`serve`'s."""
    srv = serve(engine, host, port, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()
        if engine._worker.is_alive():
            engine._worker.join(timeout=60)


class _Server(ThreadingHTTPServer):
    # connections waiting to be accepted: socketserver's 5 reset a burst of concurrent clients
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        # a client that hung up before its answer was written: nothing to report
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


# ------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .inference import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter served as model NAME (flora's or a PEFT LoRA's; repeatable, one structure)")
    p.add_argument("--name", default="base", help="the model name of the base (no adapter)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together at most")
    p.add_argument("--cache-len", type=int, default=2048,
                   help="KV-cache slots a row (at most the context): a prompt and its answer fit in it")
    p.add_argument("--prefix-cache", type=int, default=8192, metavar="TOKENS",
                   help="prompt tokens whose keys and values are kept (16-token blocks, each once) for later "
                        "prompts starting alike (a conversation's history, a shared system prompt); 0: off")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="the prompt tokens computed between two decode steps at most, over every joining prompt "
                        "(vLLM's max_num_batched_tokens): prompts join whole while they fit, the last in chunks, "
                        "the running requests generating between (default: 256 on the CPU, 2048 on CUDA); 0: "
                        "every joining prompt's prefill whole, every running request waiting for it")
    p.add_argument("--admit-cost", type=int, default=None, metavar="TOKENS",
                   help="what a prefill forward costs by itself, in the tokens a row computes: prompts joining "
                        "together split into groups of like length where that saves more padding than the "
                        "forwards cost (default: learned from this server's own prefill timings, the device "
                        "type's estimate until then)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="a chat completion's max_tokens when the request gives none (capped at the context)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a request that finds the server idle waits for others to batch with")
    p.add_argument("--mixed", action="store_true",
                   help="the adapters side by side: requests for any of them and the base share batches")
    p.add_argument("--allow-adapter-updates", action="store_true",
                   help="POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name} "
                        "(vLLM's) load and unload adapters while serving: a client then makes the server read "
                        "directories of its choosing (with --api-key: only one that has the key)")
    p.add_argument("--enable-request-id-headers", action="store_true",
                   help="every answer carries an X-Request-Id header: the request's, or a new id (vLLM's flag)")
    p.add_argument("--log", action="store_true", help="one line per request on stderr")
    p.add_argument("--api-key", default=os.environ.get("FLORA_API_KEY"),
                   help="requests to /v1/ need 'Authorization: Bearer KEY' (default: $FLORA_API_KEY; none: open)")
    return p


def admit_cost_line(engine: Engine) -> str:
    """The grouping constant, as the startup line tells it."""
    if engine.admit_cost is not None:
        return f"a prefill forward costs {engine.admit_cost} tokens (--admit-cost)"
    return (f"a prefill forward's cost learned from its timings ({engine._admit_fit.default} tokens until "
            "then; GET /metrics flora:admit_forward_tokens)")


def _adapters(specs: list, base_name: str) -> dict:
    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {s!r}: expected NAME=DIR")
        if name in out or name == base_name:
            raise ValueError(f"--adapter {s!r}: the model name {name!r} is taken")
        if not os.path.isdir(path):
            raise ValueError(f"--adapter {s!r}: {path} is not a directory")
        out[name] = path
    return out


def run_args(args) -> None:
    from .inference import load

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.cache_len < 2:
        raise ValueError(f"--cache-len must be >= 2, got {args.cache_len}")
    if args.prefix_cache < 0:
        raise ValueError(f"--prefix-cache must be >= 0, got {args.prefix_cache}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.prefill_chunk is not None and args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be >= 0 tokens (0: off), got {args.prefill_chunk}")
    if args.admit_cost is not None and args.admit_cost < 0:
        raise ValueError(f"--admit-cost must be >= 0 tokens, got {args.admit_cost}")
    if not 0 <= args.batch_wait_ms <= 1000:
        raise ValueError(f"--batch-wait-ms must be in 0 .. 1000, got {args.batch_wait_ms}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0 .. 65535, got {args.port}")
    adapters = _adapters(args.adapter, args.name)
    model, tok = load(args, list(adapters.items()), resolve_device(args.device))
    engine = Engine(model, tok, {args.name: None, **{n: n for n in adapters}}, args.max_batch,
                    mixed=args.mixed, max_tokens=args.max_tokens, wait_s=args.batch_wait_ms / 1000,
                    cache_len=args.cache_len, prefix_cache=args.prefix_cache, prefill_chunk=args.prefill_chunk,
                    admit_cost=args.admit_cost)
    try:
        srv = serve(engine, args.host, args.port, quiet=not args.log, api_key=args.api_key or None, start=False,
                    allow_adapter_updates=args.allow_adapter_updates,
                    request_id_headers=args.enable_request_id_headers)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = srv.server_address[:2]
    # The engine in the main thread, HTTP in threads: GNU OpenMP gives each thread that starts
    # parallel regions a pool of its own, and with more pool threads than cores its workers
    # barely spin, so a worker thread's GEMMs ran ~25-40% slower on a 2-core CPU than the main
    # thread's (the model was loaded here, in parallel regions of this thread).
    engine.on_admit_cost = lambda v, fit: print(
        f"flora serve: a prefill forward costs {v} tokens here (fixed {fit.fixed_s * 1e3:.1f} ms + "
        f"{fit.per_token_s * 1e6:.0f} us a token, from {len(fit.points())} prefill timings)", file=sys.stderr,
        flush=True)
    http = threading.Thread(target=srv.serve_forever, name="flora-serve-http", daemon=True)
    http.start()
    print(f"flora serve: http://{host}:{port}/v1 ({', '.join(engine.names)}); {admit_cost_line(engine)}; "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        engine.run()  # until Ctrl-C
    finally:
        srv.shutdown()
        srv.server_close()
