"""Timing harness for generation: one Timer, a probe per model, and runs of
several probes interleaved step by step (used by the latency benchmark)."""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from typing import Optional

import torch

from ..generation import Decoder, inference_mode


class Timer:
    """CUDA events on GPU (device time, recorded on the current stream of the
    timed device, which need not be the current device), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record(torch.cuda.current_stream(self.device))
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
    mode and its decoder (static cache, CUDA graph captured at the first run,
    the step compiled with ``compile=True``) across runs, so several probes
    can be timed interleaved."""

    def __init__(self, model, batch: int, prompt_len: int, new_tokens: int,
                 use_cuda_graph: Optional[bool] = None, seed: int = 0, compile: bool = False,
                 adapters: Optional[list] = None):
        if batch < 1 or prompt_len < 1 or new_tokens < 2:
            raise ValueError("need batch >= 1, prompt_len >= 1, new_tokens >= 2")
        # a stacked model's per-row adapters (FusedLlama.stack_adapters)
        self.rows = model.adapter_rows(adapters, batch) if hasattr(model, "adapter_rows") else None
        self.model, self.new_tokens = model, new_tokens
        dev = model.device
        self.use_cuda_graph = dev.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.ids = torch.randint(0, model.arch.vocab_size, (batch, prompt_len), generator=g).to(dev)
        self.valid = torch.ones(batch, prompt_len, dtype=torch.bool, device=dev)
        self.timer = Timer(dev)
        self.compile = compile
        self._ctx: Optional[contextlib.ExitStack] = None
        self.dec: Optional[Decoder] = None

    def __enter__(self) -> "LatencyProbe":
        self._ctx = contextlib.ExitStack()
        self._ctx.enter_context(inference_mode(self.model))
        B, T = self.ids.shape
        self.dec = Decoder(self.model, B, T + self.new_tokens, self.use_cuda_graph, compile=self.compile)
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
        self.tok = self.dec.prefill(self.ids, self.valid, self.rows).argmax(-1)
        return a, self.timer.mark()

    def step(self):
        """One decode step (+ its greedy token); returns the timer marks around it."""
        a = self.timer.mark()
        self.tok = self.dec.step(self.tok).argmax(-1)
        return a, self.timer.mark()


def attention_backend(model) -> str:
    """The attention kernel(s) one decode step of ``model`` runs, read from a
    torch.profiler trace of a real step (not predicted from the dispatch
    rules): ``flora::decode_attention`` alone where flora's split-key kernel
    ran, followed by the SDPA kernel where the op fell back to SDPA."""
    from torch.profiler import profile

    dev = model.device
    with inference_mode(model):
        dec = Decoder(model, 1, 8, use_cuda_graph=False)
        ids = torch.ones(1, 4, dtype=torch.long, device=dev)
        tok = dec.prefill(ids, torch.ones_like(ids, dtype=torch.bool)).argmax(-1)
        with profile() as prof:
            dec.step(tok)
    found = []
    for e in prof.events():
        p = e.cpu_parent
        if e.name == "flora::decode_attention" and e.name not in found:
            found.insert(0, e.name)
        if p is not None and p.name == "aten::scaled_dot_product_attention" and e.name.startswith("aten::_"):
            name = e.name[len("aten::"):]
            if name not in found:
                found.append(name)
    return ", ".join(found) or "unknown"


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


@contextlib.contextmanager
def cuda_kernels(value: Optional[str]):
    """FLORA_CUDA_KERNELS set to ``value`` ("1": every flora kernel, "0":
    cuBLAS / ATen; None: left as it is) while timing, restored after (the
    dispatch reads it on every call)."""
    old = os.environ.get("FLORA_CUDA_KERNELS")
    if value is not None:
        os.environ["FLORA_CUDA_KERNELS"] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop("FLORA_CUDA_KERNELS", None)
            else:
                os.environ["FLORA_CUDA_KERNELS"] = old


@contextlib.contextmanager
def _gc_off():
    """A collection first, then the collector off while a round is timed (one
    inside it would land on whichever probe it hit); back as it was after."""
    was_on = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def iqr(runs) -> float:
    """Interquartile range of timed runs (same unit; 0 for one run): the
    spread to read next to their median, which one outlying run moves no more
    than it moves the median."""
    runs = list(runs)
    if len(runs) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(runs, n=4, method="inclusive")
    return q3 - q1


def run_interleaved(probes: list, repeats: int, warmup: int = 1, by_run: bool = False,
                    prefills: int = 1) -> list[dict]:
    """Time several entered probes (objects with ``prefill()``/``step()``
    returning timer marks, ``timer``, ``new_tokens`` and ``graphed``, such as
    :class:`LatencyProbe`) interleaved step by step so that drift of the
    machine (clock, memory bandwidth taken by neighbours) hits every model
    alike: each round prefills every probe, then runs decode step j of every
    probe before step j + 1 of any, the order reversed on every other step
    and round (A B, B A, ...). TPOT of a round is the mean of that probe's own
    step times. Each result has medians and the per-round ``ttft_runs`` /
    ``tpot_runs``, so ratios can be taken round by round.

    ``by_run=True`` interleaves whole runs instead (each probe's prefill and
    all its steps in a row, the probe order reversed every round): for probes
    of different runtimes, whose idle worker threads spin after each call
    and would take the cores from the other runtime's next step.

    ``prefills`` > 1: each round prefills every probe that many times
    (interleaved, alternating order; the last one feeds the decode steps) and
    its TTFT is the median of those: one prefill a round is one noisy sample
    where the prefill is host-bound (an eager one on a GPU; with CUDA graphs a
    short prompt's prefill is a graph too). The garbage collector
    is off during the timed rounds (a collection inside one would land on
    whichever probe it hit)."""
    if not probes or repeats < 1 or warmup < 0 or prefills < 1:
        raise ValueError("need at least one model, repeats >= 1, warmup >= 0 and prefills >= 1")
    n_steps = probes[0].new_tokens - 1
    if any(p.new_tokens - 1 != n_steps for p in probes):
        raise ValueError("interleaved probes must generate the same number of tokens")
    runs: list[list] = [[] for _ in probes]
    for k in range(warmup + repeats):
        order = list(range(len(probes)))[::(-1 if k % 2 else 1)]
        pre: dict = {i: [] for i in order}
        steps: dict = {i: [] for i in order}
        with _gc_off():
            if by_run:
                for i in order:
                    pre[i] = [probes[i].prefill() for _ in range(prefills)]
                    steps[i] = [probes[i].step() for _ in range(n_steps)]
            else:
                for s in range(prefills):
                    for i in order[::(-1 if s % 2 else 1)]:
                        pre[i].append(probes[i].prefill())
                for j in range(n_steps):
                    for i in order[::(-1 if j % 2 else 1)]:
                        steps[i].append(probes[i].step())
        if k >= warmup:
            for i, p in enumerate(probes):
                tpot = sum(p.timer.elapsed(a, b) for a, b in steps[i]) / n_steps
                ttft = statistics.median(p.timer.elapsed(a, b) for a, b in pre[i])
                runs[i].append((ttft, tpot))
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
