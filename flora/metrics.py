"""Prometheus metrics without a dependency: counters, gauges and histograms with
labels, thread-safe, rendered in the text exposition format 0.0.4 (what a
Prometheus server scrapes from ``GET /metrics``).

    reg = Registry()
    done = reg.counter("app:requests_total", "Requests answered.", ("model_name", "reason"))
    done.inc(("base", "stop"))
    reg.render()  # '# HELP app:requests_total Requests answered.\\n# TYPE ...'

A sample's labels are a tuple of values in the order of the metric's label
names (a tuple is cheap to build on a hot path; no dict per update).
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Optional

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _value(v) -> str:
    """A sample value as the format writes it (integers exactly, +Inf, -Inf, NaN)."""
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def escape_label(v: str) -> str:
    """A label value inside its double quotes: backslash, double quote and newline escaped."""
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(v: str) -> str:  # HELP text: backslash and newline only
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: tuple, values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self._lock = threading.Lock()
        self._values: dict = {}  # label values -> the metric's state for them

    def _check(self, labels: tuple) -> tuple:
        if len(labels) != len(self.labels):
            raise ValueError(f"{self.name} takes {len(self.labels)} label values {self.labels}, got {labels!r}")
        return labels

    def _zero(self):
        return 0

    def touch(self, labels: tuple) -> None:
        """The series of ``labels`` rendered at zero until it counts (a series that appears only
        with its first event hides that first increase from rate() / increase())."""
        with self._lock:
            if labels not in self._values:
                self._values[self._check(labels)] = self._zero()

    def _head(self) -> list:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list:
        with self._lock:
            items = sorted(self._values.items())
        return self._head() + [f"{self.name}{_labels(self.labels, k)} {_value(v)}" for k, v in items]


class Counter(_Metric):
    """A count that only grows (its name ends in ``_total``, as Prometheus's counters do)."""
    kind = "counter"

    def inc(self, labels: tuple = (), amount=1) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only grows, got {amount!r}")
        with self._lock:
            if labels not in self._values:
                self._values[self._check(labels)] = 0
            self._values[labels] += amount


class Gauge(_Metric):
    """A value that goes up and down."""
    kind = "gauge"

    def set(self, labels: tuple, value) -> None:
        with self._lock:
            self._values[self._check(labels)] = value

    def replace(self, values: dict) -> None:
        """All its samples at once (label values -> value): those not named are dropped."""
        for k in values:
            self._check(k)
        with self._lock:
            self._values = dict(values)


class Histogram(_Metric):
    """Observations counted into buckets (``le``: at most the bound), with their sum
    and count; rendered cumulative, ending with the +Inf bucket (= the count)."""
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets, labels: tuple = ()):
        super().__init__(name, help, labels)
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)) or any(math.isinf(b) for b in self.bounds):
            raise ValueError(f"{self.name}: buckets must be finite and increasing, got {buckets!r}")
        if "le" in self.labels:
            raise ValueError(f"{self.name}: 'le' is the bucket's label")

    def observe(self, labels: tuple, v: float) -> None:
        i = bisect.bisect_left(self.bounds, v)  # the first bound >= v (len(bounds): only +Inf)
        with self._lock:
            s = self._values.get(labels)
            if s is None:
                s = self._values[self._check(labels)] = self._zero()
            s[0][i] += 1
            s[1] += v
            s[2] += 1

    def _zero(self) -> list:  # [bucket counts (the last: +Inf), sum, count]
        return [[0] * (len(self.bounds) + 1), 0.0, 0]

    def render(self) -> list:
        with self._lock:
            items = sorted((k, (list(c), total, n)) for k, (c, total, n) in self._values.items())
        out = self._head()
        for k, (counts, total, n) in items:
            run = 0
            for b, c in zip(self.bounds + (math.inf,), counts):
                run += c
                le = 'le="' + _value(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labels, k, le)} {run}")
            out.append(f"{self.name}_sum{_labels(self.labels, k)} {_value(total)}")
            out.append(f"{self.name}_count{_labels(self.labels, k)} {n}")
        return out


class Registry:
    """The metrics a server exposes, rendered in the order they were made."""

    def __init__(self):
        self._metrics: list = []

    def _add(self, m: _Metric) -> _Metric:
        if any(x.name == m.name for x in self._metrics):
            raise ValueError(f"metric {m.name} is registered already")
        self._metrics.append(m)
        return m

    def counter(self, name: str, help: str, labels: tuple = ()) -> Counter:
        return self._add(Counter(name, help, labels))

    def gauge(self, name: str, help: str, labels: tuple = ()) -> Gauge:
        return self._add(Gauge(name, help, labels))

    def histogram(self, name: str, help: str, buckets, labels: tuple = ()) -> Histogram:
        return self._add(Histogram(name, help, buckets, labels))

    def render(self) -> str:
        return "".join(line + "\n" for m in self._metrics for line in m.render())


# vLLM's bucket bounds (vllm/v1/metrics/loggers.py), so that dashboards made for it read these alike
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServeMetrics:
    """``flora serve``'s metrics, vLLM's names under ``flora:``, each sample labelled
    ``model_name`` (the served name: the base's or an adapter's). The engine's worker
    calls :meth:`first_token` and :meth:`ended` once per choice, :meth:`inter_token` once
    per token after a choice's first; the gauges are set
    when scraped (:meth:`render`), so the decode loop pays nothing for them."""

    def __init__(self):
        r = self.registry = Registry()
        m = ("model_name",)
        self.running = r.gauge("flora:num_requests_running", "Choices generating in the running batch.", m)
        self.waiting = r.gauge("flora:num_requests_waiting", "Choices queued, waiting for a row.", m)
        self.prompt_tokens = r.counter("flora:prompt_tokens_total",
                                       "Prompt tokens, each prompt once (usage.prompt_tokens).", m)
        self.generation_tokens = r.counter("flora:generation_tokens_total",
                                           "Generated tokens (usage.completion_tokens).", m)
        self.success = r.counter("flora:request_success_total",
                                 "Choices ended, by finish reason (stop, length; abort: its client left; "
                                 "error: a failure while generating).", m + ("finished_reason",))
        self.cache_queries = r.counter("flora:prefix_cache_queries_total",
                                       "Prompt tokens looked up in the prefix cache (each prompt once).", m)
        self.cache_hits = r.counter("flora:prefix_cache_hits_total",
                                    "Prompt tokens not computed, their keys and values copied "
                                    "(usage.prompt_tokens_details.cached_tokens).", m)
        self.ttft = r.histogram("flora:time_to_first_token_seconds",
                                "Time from a choice's arrival to its first generated token.", TTFT_BUCKETS, m)
        self.tpot = r.histogram("flora:time_per_output_token_seconds",
                                "A choice's mean time per generated token after its first (choices of "
                                "two tokens or more).", TPOT_BUCKETS, m)
        self.e2e = r.histogram("flora:e2e_request_latency_seconds",
                               "Time from a choice's arrival to its end.", LATENCY_BUCKETS, m)
        # vLLM's phases of a request (vllm/v1/metrics/loggers.py, stats.py): queued from its arrival until
        # it is scheduled (its prefill, or echo's scoring, starts), prefill until its first token, decode
        # from there to its last token, inference from scheduled to its last token; and the time between
        # two tokens of a choice, each gap one observation
        self.queue_time = r.histogram("flora:request_queue_time_seconds",
                                      "Time from a choice's arrival until it is scheduled (its prefill or "
                                      "scoring starts).", LATENCY_BUCKETS, m)
        self.prefill_time = r.histogram("flora:request_prefill_time_seconds",
                                        "Time from a choice's scheduling to its first generated token.",
                                        LATENCY_BUCKETS, m)
        self.decode_time = r.histogram("flora:request_decode_time_seconds",
                                       "Time from a choice's first generated token to its last.", LATENCY_BUCKETS, m)
        self.inference_time = r.histogram("flora:request_inference_time_seconds",
                                          "Time from a choice's scheduling to its last generated token (its "
                                          "end, without one).", LATENCY_BUCKETS, m)
        self.itl = r.histogram("flora:inter_token_latency_seconds",
                               "Time between two consecutive generated tokens of a choice.", TPOT_BUCKETS, m)
        # flora's own: the constant behind the grouping of prompts joining together (Engine._admit_rows)
        self.admit_tokens = r.gauge("flora:admit_forward_tokens",
                                    "A prefill forward's own cost in tokens, as the split of prompts joining "
                                    "together into groups of like length weighs it; source: pinned "
                                    "(--admit-cost), learned (fitted to this server's prefill timings) or "
                                    "default (the device type's, until the timings span enough lengths).",
                                    ("source",))

    def first_token(self, model: str, arrived: float, now: float) -> None:
        self.ttft.observe((model,), now - arrived)

    def inter_token(self, model: str, gap: float) -> None:
        self.itl.observe((model,), gap)

    def ended(self, model: str, reason: str, arrived: float, now: float, n_tokens: int,
              first_at, prompt: int, cached: int, scheduled=None, last_at=None) -> None:
        """A choice's end: ``n_tokens`` generated (the first at ``first_at``, the last at
        ``last_at``, None without one); ``prompt`` and ``cached`` its prompt's tokens (0 for a
        prompt's later choices: usage counts a prompt once); ``scheduled``: when its prefill or
        scoring began (None: never, it ended waiting)."""
        k = (model,)
        self.success.inc((model, reason))
        self.generation_tokens.inc(k, n_tokens)
        self.prompt_tokens.inc(k, prompt)
        self.cache_queries.inc(k, prompt)
        self.cache_hits.inc(k, cached)
        self.e2e.observe(k, now - arrived)
        if n_tokens > 1 and first_at is not None:
            self.tpot.observe(k, (now - first_at) / (n_tokens - 1))
        if scheduled is not None:
            self.queue_time.observe(k, scheduled - arrived)
            self.inference_time.observe(k, (now if last_at is None else last_at) - scheduled)
            if first_at is not None:
                self.prefill_time.observe(k, first_at - scheduled)
        if first_at is not None and last_at is not None:
            self.decode_time.observe(k, last_at - first_at)

    REASONS = ("stop", "length", "abort", "error")

    def render(self, running: dict, waiting: dict, admit: Optional[tuple] = None) -> str:
        """The exposition text, the gauges set to ``running`` and ``waiting`` (model -> choices,
        each model served now): every series of a served model from zero on, as vLLM's; ``admit``:
        (a prefill forward's cost in tokens, its source), the engine's grouping constant now."""
        for model in running:
            k = (model,)
            for c in (self.prompt_tokens, self.generation_tokens, self.cache_queries, self.cache_hits,
                      self.ttft, self.tpot, self.e2e, self.queue_time, self.prefill_time, self.decode_time,
                      self.inference_time, self.itl):
                c.touch(k)
            for reason in self.REASONS:
                self.success.touch((model, reason))
        self.running.replace({(m,): n for m, n in running.items()})
        self.waiting.replace({(m,): n for m, n in waiting.items()})
        if admit is not None:
            self.admit_tokens.replace({(admit[1],): admit[0]})
        return self.registry.render()
