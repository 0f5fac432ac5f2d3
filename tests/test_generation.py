"""Generation: greedy equals transformers token for token; sampling; streaming; timing."""
import math
import warnings

import pytest
import torch

from flora import AdapterConfig
from flora.bench.timing import measure_latency
from flora.generation import Sampling, sample_next
from flora.model import FusedLlama
from llama_fixtures import llama_model, random_ids
from test_model import randomize_adapter

cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest)


@pytest.fixture(scope="module")
def pair():
    hf = llama_model(heads=8, kv_heads=2, rope_scaling=True)
    return hf, FusedLlama.from_pretrained(hf)


def _left_padded():
    ids = random_ids(3, 14, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :9] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def test_greedy_equals_transformers(pair):
    hf, m = pair
    ids = random_ids(1, 10)
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(m.generate(ids, max_new_tokens=20), ref)


def test_greedy_left_padded_batch_equals_transformers(pair):
    hf, m = pair
    ids, mask = _left_padded()
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    assert torch.equal(m.generate(ids, attention_mask=mask, max_new_tokens=16), ref)


def test_eos_per_sequence_equals_transformers(pair):
    hf, m = pair
    ids, mask = _left_padded()
    free = m.generate(ids, attention_mask=mask, max_new_tokens=12)
    eos = int(free[1, 14 + 3])  # row 1 emits this token at step 3: it stops there
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      eos_token_id=eos)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    assert (out[1, 14 + 4:] == 0).all()


def test_cached_decode_equals_full_forward_with_adapter():
    """zflora's carry and the static cache agree with an uncached forward."""
    hf = llama_model(tied=True)
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("zflora", rank=4, alpha=8))
    randomize_adapter(m)
    ids, mask = _left_padded()
    out = m.generate(ids, attention_mask=mask, max_new_tokens=8)
    full_mask = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = m(out, attention_mask=full_mask).logits
    assert torch.equal(out[:, 14:], logits[:, 13:-1].argmax(-1))


def test_sampling_seeded_and_top_p(pair):
    _, m = pair
    ids = random_ids(2, 6)
    a = m.generate(ids, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    b = m.generate(ids, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    c = m.generate(ids, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    m.generate(ids, max_new_tokens=1, temperature=1.0, seed=-1)  # manual_seed's whole range is taken
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got 18446744073709551616"):
        m.generate(ids, max_new_tokens=1, temperature=1.0, seed=2 ** 64)  # not manual_seed's overflow
    # a vanishing nucleus keeps only the top token: sampling becomes greedy
    assert torch.equal(m.generate(ids, max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=1),
                       m.generate(ids, max_new_tokens=10))


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, Sampling(1.0, 0.75), g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 >= 0.75: tokens 2 and 3 never drawn
    seen = {int(sample_next(logits, Sampling(1.0, 1.0), g)) for _ in range(400)}
    assert seen == {0, 1, 2, 3}


def _row_settings():
    """Rows of different settings (temperature, top-p, top-k, min-p), as a server's batch holds."""
    return [Sampling(0.7), Sampling(1.0, 0.8), Sampling(1.3, 1.0, 5), Sampling(0.9, 0.95, 20, 0.05),
            Sampling(1e-30), Sampling(2.0, 0.5, 3, 0.2)]


def test_a_row_samples_the_same_alone_or_in_any_batch():
    """sample_rows: each row's tokens, step after step, are those of the row alone (sample_next
    with a generator seeded alike), whatever its neighbours' settings, and whether they have
    generators of their own or draw from torch's default one."""
    from flora.generation import sample_rows

    torch.manual_seed(0)
    rows = _row_settings()
    logits = [torch.randn(8, 300) * 3 for _ in rows]  # 8 steps a row
    alone = []
    for j, s in enumerate(rows):
        g = torch.Generator().manual_seed(100 + j)
        alone.append([int(sample_next(logits[j][k:k + 1], s, g)) for k in range(8)])
    for own in ([True] * 6, [True, False, True, False, False, True]):
        gens = [torch.Generator().manual_seed(100 + j) if own[j] else None for j in range(len(rows))]
        for k in range(8):
            got = sample_rows(torch.stack([x[k] for x in logits]), rows, gens).tolist()
            assert [got[j] for j in range(len(rows)) if own[j]] == [alone[j][k] for j in range(len(rows)) if own[j]]
            assert all(0 <= t < 300 for t in got)


def _kept_distribution(logits: list, s: Sampling) -> list:
    """The probabilities a Sampling draws from, in plain Python (transformers' warper order:
    temperature, top-k keeping ties, top-p's smallest prefix reaching p, min-p on the top's ratio)."""
    m = max(logits)
    e = [math.exp((x - m) / s.temperature) for x in logits]
    p = [x / sum(e) for x in e]
    if s.top_k:
        kth = sorted(logits, reverse=True)[min(s.top_k, len(logits)) - 1]  # k past V: no limit
        p = [x if logits[i] >= kth else 0.0 for i, x in enumerate(p)]
        p = [x / sum(p) for x in p]
    if s.top_p < 1:
        order, before, keep = sorted(range(len(p)), key=lambda i: -p[i]), 0.0, set()
        for i in order:
            if before >= s.top_p:
                break
            keep.add(i)
            before += p[i]
        p = [x if i in keep else 0.0 for i, x in enumerate(p)]
    if s.min_p:
        p = [x if x >= s.min_p * max(p) else 0.0 for x in p]
    return [x / sum(p) for x in p]


def test_sample_rows_draws_each_rows_own_distribution():
    """Many rows of the same logits and each setting drawn in one batch: the frequencies are the
    plain-Python distribution's (within 5 standard errors), and a token it leaves out never comes."""
    from flora.generation import sample_rows

    logits = [2.0, 1.5, 1.4, 0.3, -0.5, 0.0, -2.0, 1.0]
    n = 4000
    torch.manual_seed(1)
    for s in _row_settings()[:4] + [Sampling(1.0, 0.9, 0, 0.3)]:
        want = _kept_distribution(logits, s)
        got = sample_rows(torch.tensor([logits] * n), [s] * n).tolist()
        for t, q in enumerate(want):
            f = got.count(t) / n
            if q == 0:
                assert f == 0, (s, t)
            else:
                assert abs(f - q) <= 5 * math.sqrt(q * (1 - q) / n) + 1e-9, (s, t, f, q)


def test_a_row_without_finite_probabilities_gets_minus_one():
    """A NaN row (a poisoned prompt's logits) draws -1 in sample_rows, its neighbours their own
    tokens; sample_next (generate()) refuses it by name."""
    from flora.generation import sample_rows

    x = torch.randn(3, 50)
    x[1, 7] = float("nan")
    s = [Sampling(1.0)] * 3
    got = sample_rows(x, s, [torch.Generator().manual_seed(j) for j in range(3)]).tolist()
    assert got[1] == -1 and got[0] == int(sample_next(x[:1], s[0], torch.Generator().manual_seed(0)))
    assert got[2] == int(sample_next(x[2:], s[2], torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="no finite probability"):
        sample_next(x, Sampling(1.0))


def test_a_tiny_temperature_samples_the_top_token():
    logits = torch.tensor([[3.0, 7.5, -2.0, 7.0], [30.0, -5.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for t in (1e-40, 1e-45, 1e-30):  # logits / t overflowed to inf: NaN probabilities
        for top_k, top_p in ((0, 1.0), (2, 0.5)):
            assert sample_next(logits, Sampling(t, top_p, top_k), g).tolist() == [1, 0]


@pytest.mark.parametrize("probs, top_k, top_p", [
    ([0.3, 0.25, 0.1, 0.25, 0.06, 0.04], 2, 1.0),  # tied at the k-th: both stay, as in transformers
    ([0.3, 0.25, 0.1, 0.2, 0.09, 0.06], 3, 0.6),
    ([0.3, 0.25, 0.1, 0.2, 0.09, 0.06], 3, 0.8),
    ([0.3, 0.25, 0.1, 0.2, 0.09, 0.06], 1, 1.0),
    ([0.3, 0.25, 0.1, 0.2, 0.09, 0.06], 9, 0.9),
])
def test_top_k_then_top_p_sample_what_transformers_keeps(probs, top_k, top_p):
    """The tokens that can be drawn: transformers' top-k then top-p warpers (its
    generate()'s order) as the reference."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.log(torch.tensor([probs]))
    ref = TopKLogitsWarper(top_k)(None, logits.clone())
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    keep = set(torch.isfinite(ref[0]).nonzero().flatten().tolist())
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, Sampling(1.0, top_p, top_k), g)) for _ in range(500)}
    assert seen == keep and 0 < len(keep) < len(probs)


def test_top_k_checked_and_one_is_greedy(pair):
    _, m = pair
    ids = random_ids(2, 5)
    assert torch.equal(m.generate(ids, max_new_tokens=8, temperature=0.9, top_k=1, seed=3),
                       m.generate(ids, max_new_tokens=8))
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
            m.generate(ids, max_new_tokens=2, temperature=1.0, top_k=bad)


def test_streaming_callback_and_streamer(pair):
    _, m = pair
    ids = random_ids(2, 5)
    steps = []
    out = m.generate(ids, max_new_tokens=6, streamer=lambda t: steps.append(t.clone()))
    assert torch.equal(torch.stack(steps, 1), out[:, 5:])

    class Streamer:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t)

        def end(self):
            self.ended = True

    s = Streamer()
    m.generate(ids, max_new_tokens=6, streamer=s)
    assert s.ended and len(s.puts) == 7 and torch.equal(s.puts[0], ids)


def test_bad_arguments(pair):
    _, m = pair
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="left-padded"):
        m.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0]] * 2))
    with pytest.raises(ValueError, match="top_p"):
        m.generate(ids, temperature=1.0, top_p=0.0)
    assert torch.equal(m.generate(ids, max_new_tokens=0), ids)


def test_measure_latency_cpu(pair):
    _, m = pair
    r = measure_latency(m, batch=2, prompt_len=8, new_tokens=4, repeats=2)
    assert r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["cuda_graph"] is False


def test_measure_interleaved_alternates_steps_and_drops_warmup(pair, monkeypatch):
    """Each round prefills every model, then alternates their decode steps
    (A B, B A, ...; the next round starts reversed); warm-up rounds run but are
    not kept; each model is in inference mode (adapters folded) only while
    measured, its training state restored after."""
    from flora.bench import timing as generation

    hf, base = pair
    ffba = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffba", rank=4, alpha=4))
    calls = []

    def fake(kind):
        def f(self):
            assert not self.model.training and (self.model is base or self.model._folded)
            calls.append((kind, "A" if self.model is base else "B"))
            return 0.0, float(len(calls))  # elapsed = b - a on the CPU timer
        return f

    monkeypatch.setattr(generation.LatencyProbe, "prefill", fake("p"))
    monkeypatch.setattr(generation.LatencyProbe, "step", fake("s"))
    ffba.train()
    a, b = generation.measure_interleaved([base, ffba], 1, 4, 3, repeats=2, warmup=1)
    one = [("p", "A"), ("p", "B"), ("s", "A"), ("s", "B"), ("s", "B"), ("s", "A")]
    rev = [("p", "B"), ("p", "A"), ("s", "B"), ("s", "A"), ("s", "A"), ("s", "B")]
    assert calls == one + rev + one
    # round 1 (calls 7-12): A prefill is call 8, its steps 10 and 11; round 2: 13, 15, 18
    assert a["ttft_runs"] == [8.0, 13.0] and a["tpot_runs"] == [10.5, 16.5]
    assert b["ttft_runs"] == [7.0, 14.0] and b["tpot_runs"] == [10.5, 16.5]
    assert ffba.training and not ffba._folded
    with pytest.raises(ValueError, match="repeats"):
        generation.measure_interleaved([base], 1, 4, 3, repeats=0)


def test_run_interleaved_by_run_keeps_each_run_together():
    """by_run: each probe's prefill and steps in a row, the probe order
    reversed every round; TPOT = mean of the probe's own steps."""
    from flora.bench.timing import Timer, run_interleaved

    calls = []

    class Probe:
        new_tokens, graphed, timer = 3, False, Timer(torch.device("cpu"))

        def __init__(self, name):
            self.name = name

        def prefill(self):
            calls.append(("p", self.name))
            return 0.0, float(len(calls))

        def step(self):
            calls.append(("s", self.name))
            return 0.0, float(len(calls))

    a, b = run_interleaved([Probe("A"), Probe("B")], repeats=1, warmup=1, by_run=True)
    one = [("p", "A"), ("s", "A"), ("s", "A"), ("p", "B"), ("s", "B"), ("s", "B")]
    rev = one[3:] + one[:3]
    assert calls == one + rev
    assert b["ttft_runs"] == [7.0] and b["tpot_runs"] == [8.5]
    assert a["ttft_runs"] == [10.0] and a["tpot_runs"] == [11.5]


def test_generate_restores_training_state():
    m = FusedLlama.from_pretrained(llama_model(), adapter=AdapterConfig("ffba", rank=4, alpha=4))
    m.train()
    m.generate(random_ids(1, 4), max_new_tokens=3)
    assert m.training and not m._folded
    assert all(not mod.folded for _, mod in m.adapter_modules())


@cuda
@pytest.mark.parametrize("variant", [None, "ffba-ab", "zflora"])
def test_cuda_graph_equals_eager(variant):
    hf = llama_model(tied=True)
    cfg = None if variant is None else AdapterConfig(variant, rank=4, alpha=8)
    m = FusedLlama.from_pretrained(hf, adapter=cfg, device="cuda")
    if cfg is not None:
        randomize_adapter(m)
    ids, mask = _left_padded()
    ids, mask = ids.cuda(), mask.cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture failure would warn: make it fail the test
        g = m.generate(ids, attention_mask=mask, max_new_tokens=12, use_cuda_graph=True)
    e = m.generate(ids, attention_mask=mask, max_new_tokens=12, use_cuda_graph=False)
    assert torch.equal(g, e)
    if variant is None:
        ref = hf.cuda().generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)
        assert torch.equal(e, ref)


def _greedy(m, ids, mask, steps, pad_prefill, rows=None):
    """Prefill (optionally padded to a prefill graph's length, run eagerly) and
    greedy steps on one Decoder: (prefill logits, tokens)."""
    from flora.generation import Decoder, inference_mode

    with inference_mode(m):
        dec = Decoder(m, ids.shape[0], 64 + steps, use_cuda_graph=False)
        dec.pad_prefill = pad_prefill
        logits = dec.prefill(ids, mask.bool(), rows)
        first, toks = logits.clone(), []
        for _ in range(steps):
            t = logits.argmax(-1)
            toks.append(t)
            logits = dec.step(t)
        padded = [k for k, g in dec.prefill_graphs.items()]
    return first, torch.stack(toks, 1), padded


@pytest.mark.parametrize("variant", [None, "ffba", "zflora", "pf-lora"])
@pytest.mark.parametrize("left_padded", [False, True])
def test_prefill_padded_to_a_graph_length_is_the_plain_prefill(variant, left_padded):
    """A CUDA graph's prefill pads the prompt at its end (to 64 tokens here): the
    last real position's logits and every later token are the plain prefill's
    (run here eagerly, the padding path without the graph)."""
    hf = llama_model(heads=8, kv_heads=2, tied=True)
    cfg = None if variant is None else AdapterConfig(variant, rank=4, alpha=8)
    m = FusedLlama.from_pretrained(hf, adapter=cfg)
    if cfg is not None:
        randomize_adapter(m)
    ids, mask = _left_padded() if left_padded else (random_ids(2, 21, seed=4), torch.ones(2, 21, dtype=torch.long))
    l0, t0, _ = _greedy(m, ids, mask, 10, pad_prefill=False)
    l1, t1, keys = _greedy(m, ids, mask, 10, pad_prefill=True)
    assert keys == [(64, not left_padded)]  # one padded length, the causal form without padding
    assert torch.allclose(l1, l0, rtol=1e-4, atol=1e-5)
    assert torch.equal(t1, t0)


@pytest.mark.parametrize("pad_prefill", [False, True])
def test_reused_decoder_equals_a_fresh_one(pad_prefill):
    """A kept decoder (graphs, compile) serves later calls: the slots an earlier,
    longer call wrote are cleared, so a shorter prompt decodes as on a fresh cache."""
    from flora.generation import Decoder, inference_mode

    m = FusedLlama.from_pretrained(llama_model(heads=8, kv_heads=2))
    long_ids, short_ids = random_ids(2, 30, seed=7), random_ids(2, 9, seed=8)
    ones = lambda ids: torch.ones_like(ids, dtype=torch.bool)

    def run(dec, ids, n):
        logits, toks = dec.prefill(ids, ones(ids)), []
        for _ in range(n):
            toks.append(logits.argmax(-1))
            logits = dec.step(toks[-1])
        return torch.stack(toks, 1), logits

    with inference_mode(m):
        kept = Decoder(m, 2, 96, use_cuda_graph=False)
        kept.pad_prefill = pad_prefill
        run(kept, long_ids, 20)
        assert kept.written == (64 if pad_prefill else 50)
        for t in kept.cache.k + kept.cache.v:  # what an earlier call left: even NaN must not leak
            t[:, :, :kept.written].fill_(float("nan"))
        again = run(kept, short_ids, 12)
        fresh = Decoder(m, 2, 96, use_cuda_graph=False)
        fresh.pad_prefill = pad_prefill
        ref = run(fresh, short_ids, 12)
    assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])


class _ReplayedOnTheCpu:
    """A stand-in for a captured CUDA graph: replay() reruns the captured call
    and writes its result into the output the capture returned (what a graph's
    replay does to its static output), so the decoder's graph bookkeeping runs
    on the CPU."""

    captured = 0

    def __init__(self, fn):
        self.fn, self.out = fn, fn()
        type(self).captured += 1

    def replay(self):
        self.out.copy_(self.fn())


def test_graph_bookkeeping_replays_prefill_and_steps(monkeypatch):
    """With graphs "captured" (on the CPU, by _ReplayedOnTheCpu): one prefill graph
    per padded length and form, reused by a later call; tokens as plain eager."""
    from flora.generation import Decoder, inference_mode

    def fake(self, fn):
        g = _ReplayedOnTheCpu(fn)
        return g, g.out

    monkeypatch.setattr(Decoder, "_capture_fn", fake)
    monkeypatch.setattr(_ReplayedOnTheCpu, "captured", 0)
    m = FusedLlama.from_pretrained(llama_model(heads=8, kv_heads=2), adapter=AdapterConfig("zflora", rank=4, alpha=8))
    randomize_adapter(m)

    def run(ids, mask, graphs, dec=None):
        with inference_mode(m):
            if dec is None:
                dec = Decoder(m, ids.shape[0], 96, use_cuda_graph=False)
                dec.use_cuda_graph = dec.pad_prefill = graphs
            logits, toks = dec.prefill(ids, mask.bool()), []
            for _ in range(10):
                toks.append(logits.argmax(-1))
                logits = dec.step(toks[-1])
        return torch.stack(toks, 1), dec

    a_ids, a_mask = random_ids(3, 14, seed=5), torch.ones(3, 14, dtype=torch.long)
    b_ids, b_mask = _left_padded()
    ref_a, _ = run(a_ids, a_mask, False)
    ref_b, _ = run(b_ids, b_mask, False)
    got_a, dec = run(a_ids, a_mask, True)
    got_b, _ = run(b_ids, b_mask, True, dec)  # the kept decoder: a second form
    again, _ = run(a_ids, a_mask, True, dec)  # replayed, not captured again
    assert torch.equal(got_a, ref_a) and torch.equal(got_b, ref_b) and torch.equal(again, ref_a)
    assert sorted(dec.prefill_graphs) == [(64, False), (64, True)]
    assert len(dec.graphs) == 1  # the decode step: one window (bucket 64 on the CPU)
    assert _ReplayedOnTheCpu.captured == 3


def test_failed_prefill_capture_prefills_eagerly(monkeypatch):
    from flora.generation import Decoder, inference_mode

    def failing(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(Decoder, "_capture_fn", failing)
    m = FusedLlama.from_pretrained(llama_model(heads=8, kv_heads=2))
    ids = random_ids(2, 12, seed=3)
    kv = torch.ones_like(ids, dtype=torch.bool)
    with inference_mode(m):
        plain = Decoder(m, 2, 80, use_cuda_graph=False)
        ref = plain.prefill(ids, kv)
        dec = Decoder(m, 2, 80, use_cuda_graph=False)
        dec.use_cuda_graph = dec.pad_prefill = True
        with pytest.warns(RuntimeWarning, match="prefill failed"):
            got = dec.prefill(ids, kv)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
        assert dec.prefill_graphs[(64, True)].failed
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not tried again
            dec.prefill(ids, kv)


def test_prefill_graph_tokens_setting(monkeypatch):
    from flora.generation import Decoder, prefill_graph_tokens

    m = FusedLlama.from_pretrained(llama_model())
    assert not Decoder(m, 2, 600, use_cuda_graph=True).pad_prefill  # the CPU: never padded
    dec = Decoder(m, 2, 600, use_cuda_graph=False)
    dec.pad_prefill = True
    assert prefill_graph_tokens() == 4096 and dec._padded_length(5) == 64 and dec._padded_length(65) == 128
    assert dec._padded_length(200) == 256 and dec._padded_length(300) == 320 and dec._padded_length(512) == 512
    assert dec._padded_length(513) == 600  # 768 past 512, the cache at most
    big = Decoder(m, 1, 5000, use_cuda_graph=False)
    big.pad_prefill = True
    assert big._padded_length(513) == 768 and big._padded_length(2049) == 2304 and big._padded_length(4097) is None
    monkeypatch.setenv("FLORA_PREFILL_GRAPH_TOKENS", "200")
    assert dec._padded_length(64) == 64 and dec._padded_length(65) is None  # 2 x 64 <= 200 < 2 x 128
    monkeypatch.setenv("FLORA_PREFILL_GRAPH_TOKENS", "128")
    assert dec._padded_length(60) == 64
    monkeypatch.setenv("FLORA_PREFILL_GRAPH_TOKENS", "0")
    assert dec._padded_length(1) is None
    monkeypatch.setenv("FLORA_PREFILL_GRAPH_TOKENS", "lots")
    with pytest.raises(ValueError, match="FLORA_PREFILL_GRAPH_TOKENS"):
        dec._padded_length(1)


@cuda
@pytest.mark.parametrize("left_padded", [False, True])
def test_cuda_prefill_graph_is_captured_and_equals_eager(left_padded):
    m = FusedLlama.from_pretrained(llama_model(tied=True), adapter=AdapterConfig("zflora", rank=4, alpha=8),
                                   device="cuda")
    randomize_adapter(m)
    ids, mask = _left_padded() if left_padded else (random_ids(2, 21, seed=4), torch.ones(2, 21, dtype=torch.long))
    ids, mask = ids.cuda(), mask.cuda()
    from flora.generation import decoder_for

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture failure would warn: make it fail the test
        g1 = m.generate(ids, attention_mask=mask, max_new_tokens=12, use_cuda_graph=True)
        g2 = m.generate(ids, attention_mask=mask, max_new_tokens=12, use_cuda_graph=True)  # replayed
    dec = decoder_for(m, ids.shape[0], ids.shape[1] + 12, True)
    assert dec.prefill_graphs and all(g.graph is not None for g in dec.prefill_graphs.values())
    assert decoder_for(m, ids.shape[0], ids.shape[1] + 12, False).pad_prefill  # eager: the same shapes
    e = m.generate(ids, attention_mask=mask, max_new_tokens=12, use_cuda_graph=False)
    assert torch.equal(g1, e) and torch.equal(g2, e)


@cuda
def test_measure_latency_cuda_graph():
    m = FusedLlama.from_pretrained(llama_model(), device="cuda")
    r = measure_latency(m, batch=2, prompt_len=16, new_tokens=8, use_cuda_graph=True, repeats=2)
    assert r["cuda_graph"] is True and r["tpot_s"] > 0


def test_run_interleaved_prefills_and_gc():
    """prefills > 1: every probe prefilled that many times a round, interleaved
    in alternating order, TTFT the median of those; the collector is off
    during the timed rounds and on again after."""
    import gc

    from flora.bench.timing import Timer, run_interleaved

    calls, gc_seen = [], []

    class Probe:
        new_tokens, graphed, timer = 2, False, Timer(torch.device("cpu"))

        def __init__(self, name, ttfts):
            self.name, self.ttfts = name, iter(ttfts)

        def prefill(self):
            calls.append(("p", self.name))
            gc_seen.append(gc.isenabled())
            return 0.0, next(self.ttfts)

        def step(self):
            calls.append(("s", self.name))
            return 0.0, 1.0

    a, b = run_interleaved([Probe("A", [5.0, 1.0, 3.0]), Probe("B", [2.0, 9.0, 4.0])], repeats=1, warmup=0,
                           prefills=3)
    assert calls == [("p", "A"), ("p", "B"), ("p", "B"), ("p", "A"), ("p", "A"), ("p", "B"),
                     ("s", "A"), ("s", "B")]
    assert a["ttft_runs"] == [3.0] and b["ttft_runs"] == [4.0]
    assert not any(gc_seen) and gc.isenabled()
    with pytest.raises(ValueError, match="prefills"):
        run_interleaved([Probe("A", [])], repeats=1, prefills=0)


def test_decoder_admits_rows_into_a_running_batch(pair):
    """Continuous batching (Decoder.admit + step(n_rows=n)): prompts prefilled into free
    rows of a running decoder at its current slot decode what transformers' generate
    gives each prompt alone; a step of the first n rows leaves the others as they are."""
    from flora.generation import Decoder, inference_mode

    hf, m = pair
    prompts = [random_ids(1, n, seed=s)[0].tolist() for n, s in ((9, 1), (5, 2), (12, 3))]

    def alone(p, k):
        ids = torch.tensor([p])
        return hf.generate(ids, max_new_tokens=k, do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()

    got = {0: [], 1: [], 2: []}
    with inference_mode(m):
        dec = Decoder(m, 4, 64, use_cuda_graph=False)
        dec.restart(9)
        nxt = {0: int(dec.admit([0], [prompts[0]], pad=0).argmax(-1))}
        got[0].append(nxt[0])
        for step in range(10):
            if step == 3:  # two rows join a batch already 3 steps in, one of them in row 2 (row 1 idle)
                lg = dec.admit([2, 1], [prompts[2], prompts[1]], pad=0)
                nxt[2], nxt[1] = (int(t) for t in lg.argmax(-1))
                got[2].append(nxt[2])
                got[1].append(nxt[1])
            n = 3 if step >= 3 else 1  # rows 0 .. n-1 run; row 3 never does
            tokens = torch.tensor([nxt.get(i, 0) for i in range(n)])
            logits = dec.step(tokens, n_rows=n)
            assert logits.shape[0] == n
            for i in range(n):
                if i in nxt:
                    nxt[i] = int(logits[i].argmax())
                    got[i].append(nxt[i])
    assert got[0] == alone(prompts[0], 11)
    assert got[2] == alone(prompts[2], 8) and got[1] == alone(prompts[1], 8)
    with pytest.raises(ValueError, match="cannot end at slot"):
        dec.admit([3], [list(range(1, 40))], pad=0)


@pytest.mark.parametrize("stacked", [False, True])
def test_admit_with_reused_prefixes_equals_computing_them(pair, stacked):
    """Decoder.admit(reused=...): a prompt prefix's keys/values copied in (as the
    server's prefix cache reads them with Decoder.kv) give the logits, and the
    decode steps after them, that prefilling every token gives; rows that reuse
    and rows that do not share one prefill (the longest part to compute sets S).
    Stacked: each row its own adapter, the reused keys computed under it."""
    from flora.generation import Decoder, inference_mode

    hf, m = pair
    adapters = None
    if stacked:
        m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("zflora", rank=4))
        randomize_adapter(m, seed=3)
        m.add_adapter("b", AdapterConfig("zflora", rank=4))
        randomize_adapter(m, seed=4)
        m.stack_adapters(["default", "b"])
        adapters = ["b", "b", None, "b"]
    donor = random_ids(1, 20, seed=7)[0].tolist()
    tail = random_ids(1, 10, seed=8)[0].tolist()
    prompts = [donor[:16] + tail[:3], donor, random_ids(1, 7, seed=9)[0].tolist(), donor[:16] + tail]
    with inference_mode(m):
        src = Decoder(m, 1, 32, use_cuda_graph=False)
        src.restart(20)
        src.admit([0], [donor], pad=0, adapters=adapters and ["b"])
        kv = src.kv(0, 0, 20)
        assert kv.shape == (m.arch.num_hidden_layers, 2, m.arch.num_key_value_heads, 20, m.arch.head_dim)

        def run(reused):
            dec = Decoder(m, 5, 48, use_cuda_graph=False)
            dec.restart(26)
            out = [dec.admit([4, 0, 2, 1], prompts, pad=0, adapters=adapters, reused=reused)]
            nxt = out[0].argmax(-1)
            for _ in range(4):  # row 3 idle, rows 0 .. 4 stepped
                tokens = torch.zeros(5, dtype=torch.long)
                tokens[[4, 0, 2, 1]] = nxt
                lg = dec.step(tokens)[[4, 0, 2, 1]]
                out.append(lg)
                nxt = lg.argmax(-1)
            return out

        plain = run(None)
        reused = run([(kv, 16), (kv, 16), None, (kv, 16)])  # the longest part to compute: 14 tokens
        for a, b in zip(plain, reused):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        only = run([(kv, 16), (kv, 19), None, None])  # S = the unreused 26-token prompt: nothing copied
        for a, b in zip(plain, only):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        dec = Decoder(m, 2, 48, use_cuda_graph=False)
        dec.restart(20)
        with pytest.raises(ValueError, match="at least one prompt token"):
            dec.admit([0], [donor], pad=0, adapters=adapters and ["b"], reused=[(kv, 20)])
        # one row reusing 19 of its 20 tokens: a one-token prefill over 20 keys (the decode attention)
        got = dec.admit([1], [donor], pad=0, adapters=adapters and ["b"], reused=[(kv, 19)])
        torch.testing.assert_close(got, plain[0][1:2], rtol=1e-5, atol=1e-5)


def test_admit_prefills_a_repeated_prompt_once(pair, monkeypatch):
    """Decoder.admit: the same prompt twice (n choices of one prompt) is prefilled once
    and its row copied; every row then decodes as if prefilled on its own."""
    from flora.generation import Decoder, inference_mode

    hf, m = pair
    a, b = random_ids(1, 9, seed=11)[0].tolist(), random_ids(1, 6, seed=12)[0].tolist()
    seen = []
    run = m.run_layers
    monkeypatch.setattr(m, "run_layers", lambda ids, *x, **k: seen.append(ids.shape[0]) or run(ids, *x, **k))
    with inference_mode(m):
        def decode(rows, prompts):
            dec = Decoder(m, 4, 32, use_cuda_graph=False)
            dec.restart(9)
            out = [dec.admit(rows, prompts, pad=0)]
            for _ in range(3):
                tokens = torch.zeros(4, dtype=torch.long)
                tokens[rows] = out[-1].argmax(-1)
                out.append(dec.step(tokens)[rows])
            return out

        got = decode([3, 0, 2, 1], [a, b, a, a])
        assert seen[0] == 2  # a and b
        for p, i in ((a, 0), (b, 1), (a, 2), (a, 3)):
            alone = decode([0], [p])
            for x, y in zip(got, alone):
                torch.testing.assert_close(x[i:i + 1], y, rtol=1e-5, atol=1e-5)
