"""`flora serve`'s GET /metrics (flora.metrics): the Prometheus text format, and
counters that agree with what the responses themselves reported."""
from __future__ import annotations

import json
import math
import re
import threading
import urllib.request

import pytest
from _train_helpers import served_checkpoint

from flora import FusedLlama
from flora.data import load_tokenizer
from flora.metrics import LATENCY_BUCKETS, TTFT_BUCKETS, Registry
from flora.serve import Engine, serve

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def _unescape(v: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse(text: str) -> tuple:
    """The exposition text -> ({name: type}, [(name, {label: value}, value)]), checking
    its grammar: every line a comment or a sample, every sample's family declared first."""
    assert text.endswith("\n")
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        m = _SAMPLE.match(line)
        assert m, line
        name, body, value = m.groups()
        labels, pos = {}, 0
        while body and pos < len(body):
            lm = _LABEL.match(body, pos)
            assert lm, line
            labels[lm.group(1)] = _unescape(lm.group(2))
            pos = lm.end()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, line
        samples.append((name, labels, float(value)))
    return types, samples


def _value(samples, name, **labels) -> float:
    got = [v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items())]
    return sum(got)


def test_rendering_escapes_labels_and_ends_histograms_with_inf():
    reg = Registry()
    c = reg.counter("t:done_total", "Done.\nA second line, a \\ too.", ("model_name", "reason"))
    c.inc(('a "quoted"\\name\n', "stop"), 2)
    c.inc(("b", "stop"))
    g = reg.gauge("t:busy", "Busy.", ("model_name",))
    g.replace({("b",): 3})
    h = reg.histogram("t:latency_seconds", "Latency.", (0.1, 1.0), ("model_name",))
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(("b",), v)
    text = reg.render()
    assert '# HELP t:done_total Done.\\nA second line, a \\\\ too.\n' in text
    assert 't:done_total{model_name="a \\"quoted\\"\\\\name\\n",reason="stop"} 2\n' in text
    assert 't:busy{model_name="b"} 3\n' in text
    assert ('t:latency_seconds_bucket{model_name="b",le="0.1"} 2\n'  # le: at most the bound
            't:latency_seconds_bucket{model_name="b",le="1.0"} 3\n'
            't:latency_seconds_bucket{model_name="b",le="+Inf"} 4\n'
            't:latency_seconds_sum{model_name="b"} 7.65\n'
            't:latency_seconds_count{model_name="b"} 4\n') in text
    types, samples = parse(text)
    assert types == {"t:done_total": "counter", "t:busy": "gauge", "t:latency_seconds": "histogram"}
    assert _value(samples, "t:done_total", model_name='a "quoted"\\name\n') == 2  # escaped there and back
    g.replace({})  # a gauge's samples all replaced: none left
    assert "t:busy{" not in reg.render()
    with pytest.raises(ValueError, match="only grows"):
        c.inc(("b", "stop"), -1)
    with pytest.raises(ValueError, match="label values"):
        c.inc(("b",))
    with pytest.raises(ValueError, match="increasing"):
        reg.histogram("t:bad", "Bad.", (1.0, 0.5))
    with pytest.raises(ValueError, match="registered already"):
        reg.counter("t:done_total", "Again.")


def test_prometheus_client_parses_it():
    parser = pytest.importorskip("prometheus_client.parser")
    reg = Registry()
    reg.histogram("t:x_seconds", "X.", (1.0,), ("model_name",)).observe(('q"\\', ), 0.5)
    fams = {f.name: f for f in parser.text_string_to_metric_families(reg.render())}
    assert fams["t:x_seconds"].samples[0].labels["model_name"] == 'q"\\'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics")
    return served_checkpoint(d)


@pytest.fixture(scope="module")
def served(setup):
    ckpt, adapter = setup
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    model.load_adapter(str(adapter), name="ffba", activate=False)
    engine = Engine(model, load_tokenizer(ckpt), {"base": None, "ffba": "ffba"}, max_batch=4)
    srv = serve(engine, port=0, api_key="s3cret")  # /metrics stays open
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


def _metrics(url) -> tuple:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:  # no Authorization header
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())


def test_metrics_agree_with_the_responses_usage(served):
    url = served
    types, samples = _metrics(url)
    assert types["flora:num_requests_running"] == "gauge" and types["flora:prompt_tokens_total"] == "counter"
    assert types["flora:time_to_first_token_seconds"] == "histogram"
    # before any request: the gauges name every served model, at 0
    assert {ls["model_name"]: v for n, ls, v in samples if n == "flora:num_requests_waiting"} == \
        {"base": 0, "ffba": 0}
    # and every series of each, at zero (rate() sees a series' first increase only if it existed before)
    for name in ("flora:prompt_tokens_total", "flora:prefix_cache_hits_total", "flora:e2e_request_latency_seconds_count"):
        assert {ls["model_name"]: v for n, ls, v in samples if n == name} == {"base": 0, "ffba": 0}
    assert {(ls["model_name"], ls["finished_reason"]) for n, ls, v in samples
            if n == "flora:request_success_total" and v == 0} == \
        {(m, r) for m in ("base", "ffba") for r in ("stop", "length", "abort", "error")}
    want = {}  # model -> prompt, completion, cached tokens and choices by finish reason, from the responses
    long = " ".join("abcdefghijklmnopqrstuvwxyz") + " copy : a b"  # sent twice: the second from the cache
    bodies = [
        ("/v1/completions", {"model": "base", "prompt": long, "max_tokens": 5, "logprobs": 0}),
        ("/v1/completions", {"model": "base", "prompt": long, "max_tokens": 5, "logprobs": 0}),
        ("/v1/completions", {"model": "ffba", "prompt": ["copy : a b c =", "the big cat"], "max_tokens": 7,
                             "n": 2, "temperature": 1, "seed": 3, "logprobs": 0}),
        ("/v1/chat/completions", {"model": "ffba", "messages": [{"role": "user", "content": "copy : a b"}],
                                  "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"model": "base", "prompt": "between a and f ->", "max_tokens": 1, "stream": True,
                             "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"model": "ffba", "prompt": "copy : a b", "max_tokens": 3, "stop": ["a"],
                             "logprobs": 0}),
    ]
    for path, body in bodies:
        body = {"temperature": 0, **body}
        raw = _post(url + path, body)
        if body.get("stream"):  # one choice
            chunks = [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
            usage = chunks[-1]["usage"]
            reasons = [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
            tokens = [usage["completion_tokens"]]
        else:
            out = json.loads(raw)
            usage, reasons = out["usage"], [c["finish_reason"] for c in out["choices"]]
            tokens = [len(c["logprobs"]["tokens"]) for c in out["choices"]]  # a choice's tokens (its EOS too)
            assert sum(tokens) == usage["completion_tokens"]
        w = want.setdefault(body["model"], {"prompt": 0, "completion": 0, "cached": 0, "reasons": {}, "multi": 0})
        w["multi"] += sum(k > 1 for k in tokens)
        w["prompt"] += usage["prompt_tokens"]
        w["completion"] += usage["completion_tokens"]
        w["cached"] += usage["prompt_tokens_details"]["cached_tokens"]
        for r in reasons:
            w["reasons"][r] = w["reasons"].get(r, 0) + 1
    assert want["base"]["cached"] > 0  # the cache was used: hits are checked against a count that is not 0
    _, samples = _metrics(url)
    for model, w in want.items():
        got = lambda name, **ls: _value(samples, name, model_name=model, **ls)  # noqa: E731
        assert got("flora:prompt_tokens_total") == w["prompt"]
        assert got("flora:generation_tokens_total") == w["completion"]
        assert got("flora:prefix_cache_queries_total") == w["prompt"]
        assert got("flora:prefix_cache_hits_total") == w["cached"]
        assert {ls["finished_reason"]: v for n, ls, v in samples
                if n == "flora:request_success_total" and ls["model_name"] == model and v} == w["reasons"]
        choices = sum(w["reasons"].values())
        for hist, bounds in (("flora:time_to_first_token_seconds", TTFT_BUCKETS),
                             ("flora:e2e_request_latency_seconds", LATENCY_BUCKETS)):
            buckets = [(ls["le"], v) for n, ls, v in samples if n == hist + "_bucket" and ls["model_name"] == model]
            assert [le for le, _ in buckets] == [repr(b) for b in bounds] + ["+Inf"]  # vLLM's bounds, in order
            counts = [v for _, v in buckets]
            assert counts == sorted(counts) and counts[-1] == got(hist + "_count") == choices  # cumulative
            assert 0 < got(hist + "_sum") < math.inf
        # a choice's mean time per token after its first: the choices of two tokens or more
        assert got("flora:time_per_output_token_seconds_count") == w["multi"] > 0
        assert got("flora:num_requests_running") == 0 and got("flora:num_requests_waiting") == 0


def test_aborted_and_failed_choices_are_counted_once(setup):
    """A request whose client left while it waited ends as "abort", one whose sampling fails
    (NaN logits) as "error", each once; the gauges count the queued requests per model."""
    import torch

    ckpt, _ = setup
    model, tok = FusedLlama.from_pretrained(str(ckpt)), load_tokenizer(ckpt)
    with torch.no_grad():
        model.embed[tok.convert_tokens_to_ids("apple")] = float("nan")
    eng = Engine(model, tok, {"base": None}, max_batch=4)
    left, = eng.submit(eng.parse({"prompt": "the big cat", "max_tokens": 5, "temperature": 0}, False))
    bad, = eng.submit(eng.parse({"prompt": "a apple", "max_tokens": 5, "temperature": 1.0}, False))
    good, = eng.submit(eng.parse({"prompt": "copy : a b", "max_tokens": 6, "temperature": 0}, False))
    _, samples = parse(eng.metrics_text())  # not started: all three queued
    assert _value(samples, "flora:num_requests_waiting", model_name="base") == 3
    assert _value(samples, "flora:num_requests_running", model_name="base") == 0
    left.cancelled = True
    eng.start()
    ends = {}
    for r in (bad, good):
        while (ev := r.events.get(timeout=60))[0] not in ("done", "error"):
            pass
        ends[id(r)] = ev
    assert ends[id(bad)][0] == "error" and ends[id(good)][0] == "done"
    _, samples = parse(eng.metrics_text())
    by_reason = {ls["finished_reason"]: v for n, ls, v in samples if n == "flora:request_success_total" and v}
    assert by_reason == {"abort": 1, "error": 1, ends[id(good)][3]: 1}
    assert _value(samples, "flora:generation_tokens_total") == ends[id(good)][4]
    # the prompts that reached an end; a choice that never got a token has no time to first token
    assert _value(samples, "flora:prompt_tokens_total") == sum(len(r.prompt) for r in (left, bad, good))
    assert _value(samples, "flora:time_to_first_token_seconds_count") == 1
    assert _value(samples, "flora:e2e_request_latency_seconds_count") == 3
    eng.close()


def test_queue_prefill_decode_inference_and_inter_token_times(setup):
    """vLLM's request phases (vllm/v1/metrics/loggers.py): queue (arrival to scheduled), prefill
    (to the first token), decode (first to last token), inference (scheduled to the last token),
    and each gap between two tokens (inter-token latency). Per choice they add up: queue + prefill
    = time to first token, prefill + decode = inference, the gaps = decode; a choice that waited
    for the one row (--max-batch 1) while another ran queued at least that long; an echoed prompt
    only scored queues and infers, with no token."""
    import time

    ckpt, _ = setup
    model, tok = FusedLlama.from_pretrained(str(ckpt)), load_tokenizer(ckpt)
    eng = Engine(model, tok, {"base": None}, max_batch=1)
    types, samples = parse(eng.metrics_text())
    names = ("queue_time", "prefill_time", "decode_time", "inference_time")
    for n in [f"flora:request_{x}_seconds" for x in names] + ["flora:inter_token_latency_seconds"]:
        assert types[n] == "histogram" and _value(samples, n + "_count", model_name="base") == 0
    step = eng._step
    eng._step = lambda: (time.sleep(0.01), step())[1]  # every step 10 ms at least
    body = {"prompt": "the big cat", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    first, = eng.submit(eng.parse(body, False))
    second, = eng.submit(eng.parse(body, False))  # waits for the row
    scored, = eng.submit(eng.parse({"prompt": "copy : a b", "echo": True, "logprobs": 0, "max_tokens": 0}, False))
    eng.close()
    eng.run()
    assert second.scheduled - second.arrived >= 7 * 0.01  # the first's 7 steps after its first token
    _, samples = parse(eng.metrics_text())
    v = lambda n: _value(samples, f"flora:{n}", model_name="base")  # noqa: E731
    assert v("request_queue_time_seconds_count") == v("request_inference_time_seconds_count") == 3
    assert v("request_prefill_time_seconds_count") == v("request_decode_time_seconds_count") == 2
    assert v("inter_token_latency_seconds_count") == 2 * 7
    assert v("request_queue_time_seconds_sum") >= second.scheduled - second.arrived
    # the scored prompt: no token (its prefill and decode none), its queue and inference counted
    assert v("request_queue_time_seconds_sum") + v("request_prefill_time_seconds_sum") == pytest.approx(
        v("time_to_first_token_seconds_sum") + scored.scheduled - scored.arrived, abs=1e-6)
    inferred = v("request_inference_time_seconds_sum")
    assert v("request_prefill_time_seconds_sum") + v("request_decode_time_seconds_sum") <= inferred
    assert v("inter_token_latency_seconds_sum") == pytest.approx(v("request_decode_time_seconds_sum"), abs=1e-6)
    assert v("request_decode_time_seconds_sum") >= 2 * 7 * 0.01
    assert inferred <= v("e2e_request_latency_seconds_sum")
