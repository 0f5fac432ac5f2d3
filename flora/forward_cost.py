"""A prefill forward's own cost, in tokens, fitted from forwards' timings as they run.

``flora serve`` splits the prompts joining its batch together into groups of like
length (:func:`flora.generation.admit_groups`) by one constant: what a forward
costs by itself, in the tokens a row computes. It is one machine's: 13 on a 2-core
AMD VM, 30 on a 2-core Intel one, hundreds on a GPU (launches against cheap
tokens). :class:`ForwardCostFit` fits ``time = fixed + per_token * tokens`` to the
engine's own ``Decoder.admit`` timings and gives ``fixed / per_token`` once the
timings span enough lengths to tell the two apart, the device type's default
(:func:`flora.generation.admit_forward_tokens`) before. ``bench/admit_cost.py``
fits its timings with :func:`robust_line` too.

Robustness: a timing on a busy machine is the forward's plus whatever else ran
(a GC pause, another process, a first call's lazy set-up): always slower, never
faster, and a whole forward at once. So the line starts from medians (Siegel's
repeated median: up to half the timings may be off), a timing whose relative
residual (log ratio) is further from its peers' (the same token count's, where
counts repeat; else from the line's) than 3 robust sigmas (at least 5%) is dropped, and least squares runs
on the rest (re-trimmed against its own line until the kept set stays). The first :data:`SKIP` timings never
enter (a process's first forwards set up allocators, oneDNN / cuBLAS handles).
The ratio fixed / per_token does not move when the whole machine slows down
evenly (both scale alike).
"""
from __future__ import annotations

import collections
import time

import numpy as np
import torch

SKIP = 2  # a process's first forwards, never fitted
PER_BIN = 16  # the latest timings kept per power-of-two bucket of tokens
MIN_POINTS = 8  # timings the fit keeps (after trimming) before it is trusted
MIN_SPREAD = 4.0  # ... and the most tokens at least this many times the fewest
TRIM = 3.0  # robust sigmas of the relative residuals beyond which a timing is an outlier
TRIM_FLOOR = 0.05  # ... never less than 5% off the line (a quiet machine's timings agree to ~1%)
LOW, HIGH = 1, 4096  # the learned constant's range (below: noise; above: every split joins anyway)


def robust_line(xs, ys) -> tuple:
    """``(a, b, kept)``: ``y = a + b * x`` fitted to the points (x: tokens a forward computed,
    y: its seconds, > 0), least squares over the points ``kept`` (a list of bools) after
    outliers are trimmed (the module's docstring says how). Raises ValueError without two
    distinct x."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"robust_line: {x.size} x values but {y.size} y values")
    if len(np.unique(x)) < 2:
        raise ValueError("robust_line: needs points at two distinct token counts at least")
    if not (y > 0).all():
        raise ValueError("robust_line: timings must be > 0 seconds")
    # the start: Siegel's repeated median (each point's median slope to the others, their median;
    # half the points may be off before it moves), the intercept the residuals' median
    dx, dy = x[None, :] - x[:, None], y[None, :] - y[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = np.where(dx != 0, dy / dx, np.nan)
    b = float(np.median(np.nanmedian(slopes, axis=1)))
    a = float(np.median(y - b * x))
    # where token counts repeat (a bench's lengths, few distinct), an outlier is off its own count's
    # timings, not off the line: a line never fits a real forward's curve exactly, and that misfit (a whole
    # length's timings alike) must not trim a length away; else off the line
    peers = [x == v for v in np.unique(x)] if len(np.unique(x)) <= 24 else []
    kept = None
    for _ in range(5):  # trim against the line, refit the kept ones, until the kept set stays
        r = np.log(y / np.maximum(a + b * x, 1e-3 * y.min()))  # (log: a ratio, whatever the length)
        for m in peers:  # each relative residual against its peers' median
            r[m] -= np.median(r[m])
        r = np.abs(r)
        now = r <= max(TRIM * 1.4826 * float(np.median(r)), TRIM_FLOOR)
        if kept is not None and (now == kept).all() or len(np.unique(x[now])) < 2:
            break
        kept = now
        a, b = (float(v) for v in np.linalg.lstsq(np.stack([np.ones(int(kept.sum())), x[kept]], 1), y[kept],
                                                  rcond=None)[0])
    if kept is None:  # (the start left fewer than two distinct x within reach: every point)
        kept = np.ones(len(x), bool)
        a, b = (float(v) for v in np.linalg.lstsq(np.stack([np.ones(len(x)), x], 1), y, rcond=None)[0])
    return a, b, kept.tolist()


class ForwardCostFit:
    """A running fit of forwards' seconds against the tokens they computed: :meth:`add` a
    timing (or :meth:`clock` around a forward and :meth:`timed`), read :meth:`forward_tokens`.
    ``default``: the constant until the fit is trusted: :data:`MIN_POINTS` timings kept, their
    tokens spanning :data:`MIN_SPREAD` times (the fixed cost is the line at 0 tokens, extrapolated:
    from timings at tokens r times apart, their noise reaches it amplified by sqrt(r^2 + 1) / (r - 1),
    1.4x at 4x, 2.2x at 2x, without bound as r nears 1), a positive per-token cost. The latest
    :data:`PER_BIN` timings of each power-of-two bucket of tokens are kept: a long run of one
    length does not push the others out (the spread stays), and the fit follows a machine whose
    speed drifts."""

    def __init__(self, default: int, skip: int = SKIP):
        self.default = int(default)
        self._skip = skip
        self._bins: dict = {}  # int(tokens).bit_length() -> deque of (tokens, seconds)
        self._pending: list = []  # CUDA: (start event, end event, tokens) not read yet
        self._new = 0  # timings added since the last fit
        self.timed_forwards = 0  # every timing given, the skipped ones too
        self.fixed_s = self.per_token_s = None  # the trusted fit's, None before
        self.value = self.default  # what forward_tokens() gave last (read by GET /metrics)
        self.learned = False

    def add(self, tokens: int, seconds: float) -> None:
        self.timed_forwards += 1
        if self.timed_forwards <= self._skip or tokens < 1 or not seconds > 0:
            return
        b = self._bins.setdefault(int(tokens).bit_length(), collections.deque(maxlen=PER_BIN))
        b.append((int(tokens), float(seconds)))
        self._new += 1

    def points(self) -> list:
        """The timings the fit runs on: (tokens, seconds), bucket by bucket."""
        return [p for k in sorted(self._bins) for p in self._bins[k]]

    @staticmethod
    def clock(device):
        """A mark in time on ``device``'s timeline: perf_counter on the CPU (a forward there runs
        before it returns), a recorded CUDA event on CUDA (read once the stream has passed it, with
        no synchronize of its own), None elsewhere (no timing without a sync)."""
        kind = torch.device(device).type
        if kind == "cpu":
            return time.perf_counter()
        if kind == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return None

    def timed(self, start, end, tokens: int) -> None:
        """A forward between two :meth:`clock` marks that computed ``tokens``."""
        if start is None or end is None:
            return
        if isinstance(start, float):
            self.add(tokens, end - start)
        else:
            self._pending.append((start, end, tokens))

    def forward_tokens(self) -> int:
        """A forward's own cost in tokens: the fit's fixed / per-token cost (in LOW .. HIGH) once
        trusted, ``default`` before. Reads the CUDA timings the stream has passed (never waits)."""
        while self._pending and self._pending[0][1].query():
            start, end, tokens = self._pending.pop(0)
            self.add(tokens, start.elapsed_time(end) / 1e3)
        # trusted, refit once an eighth more timings came (the fit's median of slopes is quadratic in
        # them: ~4 ms at 200 timings, host time beside a GPU's prefill); before, at each (fewer: no spread)
        if self._new and (not self.learned or self._new * 8 >= len(self.points())):
            self._new = 0
            self._refit()
        return self.value

    def _refit(self) -> None:
        pts = self.points()
        if len(pts) < MIN_POINTS or len({x for x, _ in pts}) < 2:
            return
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        a, b, kept = robust_line(xs, ys)
        kx = [x for x, k in zip(xs, kept) if k]
        if len(kx) < MIN_POINTS or max(kx) < MIN_SPREAD * min(kx) or not b > 0:
            return  # (a trusted value stays until the timings give another)
        self.fixed_s, self.per_token_s, self.learned = a, b, True
        self.value = int(round(min(max(a / b, LOW), HIGH)))
