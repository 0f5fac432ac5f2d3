"""`flora serve`'s chunked prefill (Engine(prefill_chunk=C,
                     admit_cost=ADMIT_FORWARD_TOKENS), --prefill-chunk): a prompt computing
more than C tokens prefills a chunk of at most C a step while the running rows decode; every
answer against its prompt's alone (generate() and a plain forward's logprobs)."""
from __future__ import annotations

import random

import pytest
from test_serve import _alone, _mid_batch, _runs_on, _served_and_alone, setup  # noqa: F401

from flora import FusedLlama
from flora.cli import main
from flora.data import load_tokenizer, prompt_ids
from flora.generation import ADMIT_FORWARD_TOKENS, Sampling
from flora.prefix_cache import BLOCK
from flora.serve import Engine, Request


def _noted(eng, model) -> list:
    """Each prefill forward of a joining row from now on: (its rows, tokens a row, decode steps run
    before it), from the model's real calls."""
    calls, run = [], model.run_layers

    def noted(ids, *a, cache=None, **kw):
        if getattr(cache, "prefill_rows", None) is not None:
            calls.append((cache.prefill_rows.tolist(), ids.shape[1], eng.steps))
        return run(ids, *a, cache=cache, **kw)

    model.run_layers = noted
    return calls


def _base_engine(setup, **kw) -> tuple:
    """(tokenizer, a reference model, the served model, an Engine serving it as "base" with ``kw``)."""
    _, ckpt, _ = setup
    model = FusedLlama.from_pretrained(str(ckpt))
    tok = load_tokenizer(ckpt)
    return tok, FusedLlama.from_pretrained(str(ckpt)).eval(), model, Engine(model, tok, {"base": None},
                                                                       **{"admit_cost": ADMIT_FORWARD_TOKENS, **kw})


def _together(eng, model, ref, tok, reqs: list) -> tuple:
    """``reqs`` submitted together to ``eng`` (its worker started): (its joining rows' prefills as
    _noted logs them, each request's tokens as _alone checks them against its prompt alone)."""
    calls = _noted(eng, model)
    eng.submit(reqs)
    eng.start()
    rows = []
    for r in reqs:
        ev = r.events.get(timeout=60)
        assert ev[0] == "done", ev
        rows.append(_alone(ref, tok, r, ev))
    return calls, rows


def _chunk_sizes(n: int, C: int) -> list:
    """A prompt computing n tokens in chunks of C, the budget whole for it: C each, the last what is left."""
    k = -(-n // C)
    return [C] * (k - 1) + [n - (k - 1) * C]


@pytest.mark.parametrize("C", [1, 5, 7, 29])
def test_a_chunked_prompt_alone_answers_as_generate(setup, C):
    """A 30-token prompt alone in chunks of C (1, dividing it, not, one less than it): its tokens
    and logprobs are generate()'s and a plain forward's; its forwards compute the chunks, none more
    than C tokens; no decode step runs while it prefills (its steps only move the slot on)."""
    tok, ref, model, eng = _base_engine(setup, max_batch=2, prefix_cache=0, prefill_chunk=C,
                     admit_cost=ADMIT_FORWARD_TOKENS)
    r = Request("base", _runs_on(ref, random.Random(C), 30, 8), 8, Sampling(), logprobs=0)
    calls = _noted(eng, model)
    eng.submit([r])
    eng.start()
    ev = r.events.get(timeout=60)
    assert ev[0] == "done", ev
    _alone(ref, tok, r, ev)
    assert [c[1] for c in calls] == _chunk_sizes(30, C) and all(c[2] == 0 for c in calls)
    assert eng.steps == 7 and eng.batches == 1  # its 8 tokens: 7 decode steps after its first
    eng.close()


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("C", [1, 7])
def test_running_rows_decode_while_a_long_prompt_prefills(setup, tmp_path, mixed, C):
    """Two 1-token prompts generate; a 30-token prompt arrives, and a
    short one behind it: the long one prefills a chunk (at most C tokens) before each of the next
    steps, the running rows decoding at each (one step between two chunks), the short one joining
    at the next step; every row's tokens and logprobs equal its prompt's alone (--mixed: each
    row its own adapter)."""
    tok, names, model, refs = _served_and_alone(setup, tmp_path, mixed)
    eng = Engine(model, tok, names, max_batch=4, mixed=mixed, prefix_cache=0, prefill_chunk=C,
                     admit_cost=ADMIT_FORWARD_TOKENS)
    rng = random.Random(5)
    ask = lambda name, n, m: Request(name, _runs_on(refs[name], rng, n, m), m, Sampling(), logprobs=0)  # noqa: E731
    # within every budget, running through the long prompt's chunks (C 1: 30 steps, no skip) or fitting
    # the cache after its skip (C 7: the batch's slot moved on to 26)
    m = 45 if C == 1 else 30
    first = [ask("base", 1, m), ask("a" if mixed else "base", 1, m)]
    later = [ask("b" if mixed else "base", 30, 6), ask("base", 4, 4)]
    calls = _noted(eng, model)
    got = _mid_batch(eng, first, later, at=4)
    for r in first + later:
        _alone(refs[r.model], tok, r, got[id(r)][0])
    sizes = _chunk_sizes(30, C)
    k = len(sizes)
    # after the 5th step: the long prompt's chunks, one before each of the next k steps (its row 2)
    chunks = [c for c in calls if c[0] == [2]]
    assert [c[1] for c in chunks] == sizes and [c[2] for c in chunks] == list(range(5, 5 + k))
    assert all(c[1] <= C for c in calls if c[2] >= 5)  # no forward beyond the budget while it prefilled
    # the short one behind it waits for the budget the long one's chunks leave (the budget is the
    # iteration's: vLLM's max_num_batched_tokens): C 7, beside its last chunk (2 tokens: 5 left), whole
    # (row 3: one forward of its 4 tokens); C 1, in chunks once the long one's were done
    at = 5 + k - 1 if C - sizes[-1] >= 4 else 5 + k
    short = _chunk_sizes(4, C)
    assert [c[1:] for c in calls if c[0] == [3]] == [(n, at + j) for j, n in enumerate(short)]
    ended = [got[id(r)][1] for r in first + later]
    # each one's first token from its last chunk, before the next step: then one step a token
    assert ended[2] == 5 + k - 1 + 5 and ended[3] == at + len(short) - 1 + 3
    # the first two: C 1 prefills one of their tokens an iteration, the second's a step later
    late = int(C < 2)
    assert calls[:2 if late else 1] == ([([0], 1, 0), ([1], 1, 1)] if late else [([0, 1], 1, 0)])
    assert ended[0] + late == ended[1] == eng.steps == m - 1 + late
    assert max(eng.iteration_tokens) == C
    eng.close()


def test_chunk_budget_validation(setup, capsys):
    _, ckpt, _ = setup
    model, tok = FusedLlama.from_pretrained(str(ckpt)), load_tokenizer(ckpt)
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 0"):
            Engine(model, tok, {"base": None}, prefill_chunk=bad)
    assert main(["serve", "--model", str(ckpt), "--device", "cpu", "--prefill-chunk", "-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora serve: error:") and "--prefill-chunk must be >= 0" in err and "\n" not in err


def test_a_chunked_prompt_cancelled_mid_prefill(setup):
    """A long prompt's client leaves after its 3rd chunk: no more chunk runs, its row is freed
    (no event for it), and the running row answers as alone."""
    tok, ref, model, eng = _base_engine(setup, max_batch=2, prefix_cache=0, prefill_chunk=3)
    rng = random.Random(7)
    first = [Request("base", _runs_on(ref, rng, 4, 30), 30, Sampling(), logprobs=0)]
    long = Request("base", _runs_on(ref, rng, 30, 4), 4, Sampling())
    calls, run = [], model.run_layers

    def noted(ids, *a, cache=None, **kw):
        if getattr(cache, "prefill_rows", None) is not None and cache.prefill_rows.tolist() == [1]:
            calls.append(ids.shape[1])
            if len(calls) == 3:
                long.cancelled = True
        return run(ids, *a, cache=cache, **kw)

    model.run_layers = noted
    step = eng._step
    eng._step = lambda: (eng.steps == 2 and eng.submit([long]), step())[1]
    eng.submit(first)
    eng.start()
    ev = first[0].events.get(timeout=60)
    assert ev[0] == "done", ev
    _alone(ref, tok, first[0], ev)
    assert calls == [3, 3, 3] and long.events.empty() and long.ended
    assert eng._slots == [None, None]
    eng.close()


def test_a_failing_chunk_fails_its_request_only(setup, monkeypatch):
    """A chunk that raises answers its request with the error and frees its row; the running row
    answers as alone, and the next long prompt prefills in chunks as alone."""
    from flora.generation import Decoder

    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    ref = FusedLlama.from_pretrained(str(ckpt)).eval()
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)), tok, {"base": None}, max_batch=3, prefix_cache=0,
                 prefill_chunk=4)
    rng = random.Random(8)
    first = [Request("base", _runs_on(ref, rng, 4, 30), 30, Sampling(), logprobs=0)]
    bad, good = (Request("base", _runs_on(ref, rng, 20, 4), 4, Sampling(), logprobs=0) for _ in range(2))
    fill, n = Decoder.fill, []

    def failing(self, row, ids, first, a):
        n.append(a)
        if len(n) == 2:
            raise RuntimeError("chunk out of memory")
        return fill(self, row, ids, first, a)

    monkeypatch.setattr(Decoder, "fill", failing)
    step = eng._step
    eng._step = lambda: (eng.steps == 2 and eng.submit([bad, good]), step())[1]
    eng.submit(first)
    eng.start()
    assert bad.events.get(timeout=60) == ("error", "RuntimeError: chunk out of memory") and bad.events.empty()
    for r in first + [good]:
        ev = r.events.get(timeout=60)
        assert ev[0] == "done", ev
        _alone(ref, tok, r, ev)
    assert n == [0, 4] + [0, 4, 8, 12, 16]  # the second's chunks after the first's failure
    eng.close()


def test_a_chunked_prompt_shares_its_system_prompt_through_the_prefix_cache(setup):
    """Two long prompts with one 34-token system prompt arrive together: the first prefills in
    chunks; the second waits for its last chunk, then copies the kept system prompt's blocks and
    computes only its rest (its cached tokens counted); a later turn with the first's prompt and
    answer reuses them (kept after its chunks); every answer as alone."""
    tok, ref, model, eng = _base_engine(setup, max_batch=4, prefill_chunk=6)
    rng = random.Random(9)
    system = _runs_on(ref, rng, 34, 1)
    a, b = (Request("base", system + _runs_on(ref, rng, 6, 1), 6, Sampling(), logprobs=0) for _ in range(2))
    calls, rows = _together(eng, model, ref, tok, [a, b])
    assert a.cached == 0 and b.cached == 2 * BLOCK  # the system prompt's whole blocks
    assert [c[:2] for c in calls] == ([([0], n) for n in _chunk_sizes(40, 6)]
                                      + [([1], n) for n in _chunk_sizes(40 - 2 * BLOCK, 6)])
    nxt = Request("base", a.prompt + rows[0][:-1] + [5, 6], 4, Sampling(), logprobs=0)
    eng.submit([nxt])
    ev = nxt.events.get(timeout=60)
    _alone(ref, tok, nxt, ev)
    assert nxt.cached == len(nxt.prompt) // BLOCK * BLOCK
    eng.close()


def test_a_chunked_prompt_shares_nothing_with_another_cache_salt(setup):
    """As above, the second prompt with a cache_salt: it copies nothing from the first (unsalted)
    but computes its whole prompt in chunks; a third with its salt and prompt reuses its blocks."""
    tok, ref, model, eng = _base_engine(setup, max_batch=4, prefill_chunk=6)
    rng = random.Random(9)
    system = _runs_on(ref, rng, 34, 1)
    a = Request("base", system + _runs_on(ref, rng, 6, 1), 6, Sampling(), logprobs=0)
    b = Request("base", list(a.prompt), 6, Sampling(), logprobs=0, cache_salt="x")
    calls, _ = _together(eng, model, ref, tok, [a, b])
    assert a.cached == 0 and b.cached == 0
    assert [c[:2] for c in calls] == [([0], n) for n in _chunk_sizes(40, 6)] + [([1], n) for n in _chunk_sizes(40, 6)]
    c = Request("base", list(a.prompt), 6, Sampling(), logprobs=0, cache_salt="x")
    eng.submit([c])
    ev = c.events.get(timeout=60)
    _alone(ref, tok, c, ev)
    assert c.cached == 2 * BLOCK
    eng.close()


def test_a_long_prompt_in_chunks_joins_a_running_batch_on_smollm2(gguf_path, smollm2_tok):
    """SmolLM2: two short prompts generate; a ~200-token prompt arrives and prefills in chunks of
    64 (and 50: not dividing it) while they decode; every answer's tokens and logprobs equal
    its prompt's alone."""
    tok = smollm2_tok
    model = FusedLlama.from_pretrained(gguf_path)
    text = ("The river rises in the hills, runs through the old town, turns the mill and passes under "
            "seven bridges before it reaches the sea. ") * 6
    for C in (64, 50):
        ask = lambda t, n: Request("base", prompt_ids(tok, t), n, Sampling(), logprobs=0)  # noqa: E731
        first = [ask("Write the numbers from 1 to 100, separated by commas:", 24),
                 ask("Count to thirty: one, two,", 24)]
        later = [ask(text + "After the seventh bridge the river", 8)]
        L = len(later[0].prompt)
        assert L > 150 and L % C
        eng = Engine(model, tok, {"base": None}, max_batch=4, cache_len=320, prefill_chunk=C,
                     admit_cost=ADMIT_FORWARD_TOKENS)
        got = _mid_batch(eng, first, later, at=4)
        rows = [_alone(model, tok, r, got[id(r)][0]) for r in first + later]
        assert [len(x) for x in rows] == [24, 24, 8]
        k = -(-L // C)
        assert [got[id(r)][1] for r in first + later] == [23, 23, 5 + k - 1 + 7]
        eng.close()
        model.run_layers = type(model).run_layers.__get__(model)


@pytest.fixture(scope="module")
def smollm2_tok(gguf_path):
    return load_tokenizer(gguf_path)


def test_bench_long_prompt_compares_chunk_budgets(setup, tmp_path):
    """bench/serve.py --long-prompt --prefill-chunk: a row per budget, its inter-token latencies."""
    import json

    from _bench_scripts import load_bench_script

    _, ckpt, _ = setup
    load_bench_script("serve").main([
        "--model", str(ckpt), "--long-prompt", "30", "--clients", "2", "--requests", "2", "--max-tokens", "3",
        "--long-after", "0.05", "--long-max-tokens", "2", "--prefill-chunk", "0", "8", "--rounds", "1",
        "--joiners", "2", "--json", str(tmp_path / "long.json")])
    rows = json.loads((tmp_path / "long.json").read_text())["rows"]
    assert [r["prefill_chunk"] for r in rows] == [0, 8] and all(r["long_prompt_tokens"] == 30 for r in rows)
    for r in rows:
        assert r["joiners"] == 2 and 0 < r["itl_p50_s"] <= r["itl_p99_s"] <= r["itl_max_s"] < r["seconds"]
        assert 0 < r["long_ttft_s"] <= r["long_ttft_max_s"] < r["seconds"]
        assert r["long_ttft_s"] <= r["long_latency_s"] < r["seconds"]


def test_a_chunked_prompt_copies_the_start_a_row_before_it_kept(setup):
    """A 23-token prompt (within the budget of 24) and a 40-token one sharing its first 20 tokens
    arrive together: the first prefills whole; the second, placed after it, finds its first block
    kept and computes only the rest (its first chunk, all copied, skipped): every answer as alone."""
    tok, ref, model, eng = _base_engine(setup, max_batch=2, prefill_chunk=24)
    rng = random.Random(10)
    start = _runs_on(ref, rng, 20, 1)
    a = Request("base", start + _runs_on(ref, rng, 3, 1), 4, Sampling(), logprobs=0)
    b = Request("base", start + _runs_on(ref, rng, 20, 1), 4, Sampling(), logprobs=0)
    calls, _ = _together(eng, model, ref, tok, [a, b])
    assert [c[:2] for c in calls] == [([0], 23), ([1], 40 - BLOCK)] and (a.cached, b.cached) == (0, BLOCK)
    eng.close()


def test_an_echoed_prompt_that_generates_in_chunks(setup):
    """echo with logprobs and max_tokens 3, the prefix cache off: the prompt is scored (one forward,
    as unchunked), then its row prefills in chunks of 4; the answer's tokens and logprobs are
    generate()'s and a plain forward's, the prompt's entries an unchunked engine's."""
    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    ref = FusedLlama.from_pretrained(str(ckpt)).eval()
    prompt = _runs_on(ref, random.Random(11), 30, 3)
    got = {}
    for C in (0, 4):
        model = FusedLlama.from_pretrained(str(ckpt))
        eng = Engine(model, tok, {"base": None}, max_batch=2, prefix_cache=0, prefill_chunk=C,
                     admit_cost=ADMIT_FORWARD_TOKENS)
        calls = _noted(eng, model)
        r = Request("base", prompt, 3, Sampling(), logprobs=1, echo="")
        eng.submit([r])
        eng.start()
        evs = [r.events.get(timeout=60) for _ in range(2)]
        assert [e[0] for e in evs] == ["prompt", "done"], evs
        row = _alone(ref, tok, r, evs[1])
        assert len(row) == 3 and [c[1] for c in calls] == ([30] if C == 0 else _chunk_sizes(30, 4))
        got[C] = evs[0][2]
        eng.close()
    assert len(got[4]) == 30 and [e[0] for e in got[4]] == [e[0] for e in got[0]]
    assert [e[1] for e in got[4][1:]] == pytest.approx([e[1] for e in got[0][1:]], abs=1e-5)


def _iterations(calls) -> list:
    """The prompt tokens each iteration computed, from _noted's log of the model's real prefill
    forwards (rows x tokens each; an iteration: the forwards between two decode steps)."""
    out: dict = {}
    for rows, n, steps in calls:
        out[steps] = out.get(steps, 0) + len(rows) * n
    return [out[k] for k in sorted(out)]


@pytest.mark.parametrize("mixed", [False, True])
def test_a_burst_of_prompts_joins_running_rows_within_the_budget(setup, tmp_path, mixed):
    """Two rows generate; seven prompts (7-30 tokens, one twice: --mixed for another adapter) arrive
    at once. Without the budget they prefill in one iteration (102+ tokens between two steps); with
    a budget of 16 every iteration's prefill forwards (the model's real calls) compute at most 16
    tokens, the engine's count (iteration_tokens) the same, prompts joining in arrival order, whole
    while they fit, the last of an iteration in chunks (two prompts' chunks in one iteration); every
    answer's tokens and logprobs equal its prompt's alone (--mixed: its adapter's), so equal with
    the budget and without."""
    tok, names, model, refs = _served_and_alone(setup, tmp_path, mixed)
    rng = random.Random(12)
    models = ["base", "a", "b"] if mixed else ["base"]
    # (the model's context is 64: the running rows' rests fit after the longest prompt)
    spec = [(models[j % len(models)], _runs_on(refs[models[j % len(models)]], rng, 2, 20), 20) for j in range(2)]
    for j, n in enumerate([20, 9, 30, 12, 7, None, 25]):
        name = models[(j + 1) % len(models)]
        p = spec[-1][1] if n is None else _runs_on(refs[name], rng, n, 4)  # None: the one before's prompt again
        if n is None and mixed:
            assert name != spec[-1][0]
        spec.append((name, p, 4))
    late = sum(len(p) for _, p, _ in spec[2:])
    for C in (0, 16):
        eng = Engine(model, tok, names, max_batch=10, mixed=mixed, prefix_cache=0, prefill_chunk=C,
                     admit_cost=ADMIT_FORWARD_TOKENS)
        reqs = [Request(name, p, m, Sampling(), logprobs=0) for name, p, m in spec]
        calls = _noted(eng, model)
        got = _mid_batch(eng, reqs[:2], reqs[2:], at=3)
        for r in reqs:
            _alone(refs[r.model], tok, r, got[id(r)][0])
        per = _iterations(calls)
        assert per == list(eng.iteration_tokens)
        if C == 0:  # the burst whole, between two steps
            assert per[1] >= late - (0 if mixed else 7) and len(per) == 2
        else:
            assert max(per) <= C and sum(per[1:]) >= late - (0 if mixed else 7)
            # in arrival order: each one's answer (4 tokens) ends no sooner than the one's before it
            ended = [got[id(r)][1] for r in reqs[2:]]
            assert ended == sorted(ended)
            # some iteration ran two prompts' chunks (the last of one, the first of the next)
            assert any(len({tuple(c[0]) for c in calls if c[2] == s}) > 1 and any(c[1] < C for c in calls if c[2] == s)
                       for s in {c[2] for c in calls})
        eng.close()
        del model.run_layers


@pytest.mark.parametrize("prefix_cache", [0, 8192])
def test_equal_long_prompts_prefill_once_in_chunks(setup, prefix_cache):
    """A row generates; three clients send one 30-token prompt at once (n choices, clients sending
    alike), the budget 8: one row computes its chunks (30 tokens, none more), the others wait in
    their rows and copy it after its last chunk (their prompts counted cached), with the prefix
    cache on or off; all first tokens at one step, every answer as alone."""
    tok, ref, model, eng = _base_engine(setup, max_batch=4, prefix_cache=prefix_cache, prefill_chunk=8)
    rng = random.Random(13)
    first = [Request("base", _runs_on(ref, rng, 3, 20), 20, Sampling(), logprobs=0)]
    p = _runs_on(ref, rng, 30, 5)
    later = [Request("base", list(p), 5, Sampling(), logprobs=0) for _ in range(3)]
    calls = _noted(eng, model)
    got = _mid_batch(eng, first, later, at=2)
    for r in first + later:
        _alone(ref, tok, r, got[id(r)][0])
    assert [c[:2] for c in calls[1:]] == [([1], n) for n in _chunk_sizes(30, 8)]
    assert [r.cached for r in later] == [0, 30, 30]
    assert len({got[id(r)][1] for r in later}) == 1  # their answers end at one step
    eng.close()


def test_a_prompt_cancelled_mid_chunk_hands_its_row_to_a_follower(setup):
    """Two clients send one 30-token prompt (budget 6); the first leaves after its row's 2nd chunk:
    the second's row takes its chunks on (none computed again: 30 tokens in all), and answers as
    alone; the first gets no event."""
    tok, ref, model, eng = _base_engine(setup, max_batch=3, prefix_cache=0, prefill_chunk=6)
    rng = random.Random(14)
    first = [Request("base", _runs_on(ref, rng, 4, 20), 20, Sampling(), logprobs=0)]
    p = _runs_on(ref, rng, 30, 4)
    a, b = (Request("base", list(p), 4, Sampling(), logprobs=0) for _ in range(2))
    calls, run = [], model.run_layers

    def noted(ids, *x, cache=None, **kw):
        if getattr(cache, "prefill_rows", None) is not None and eng.steps >= 2:
            calls.append((cache.prefill_rows.tolist(), ids.shape[1]))
            if len(calls) == 2:
                a.cancelled = True
        return run(ids, *x, cache=cache, **kw)

    model.run_layers = noted
    step = eng._step
    eng._step = lambda: (eng.steps == 2 and eng.submit([a, b]), step())[1]
    eng.submit(first)
    eng.start()
    for r in first + [b]:
        ev = r.events.get(timeout=60)
        assert ev[0] == "done", ev
        _alone(ref, tok, r, ev)
    assert [n for _, n in calls] == _chunk_sizes(30, 6) and {tuple(r) for r, _ in calls} == {(1,)}
    assert a.events.empty() and a.ended and b.cached == 0  # (its row computed them)
    assert eng._slots == [None] * 3
    eng.close()


def test_the_budget_default_is_the_devices(setup):
    """256 tokens on the CPU (2048 on CUDA: an estimate); --prefill-chunk given wins, 0 too."""
    from flora.serve import PREFILL_CHUNK, add_arguments, prefill_chunk_for

    import argparse

    _, ckpt, _ = setup
    model, tok = FusedLlama.from_pretrained(str(ckpt)), load_tokenizer(ckpt)
    assert Engine(model, tok, {"base": None}).prefill_chunk == PREFILL_CHUNK == prefill_chunk_for("cpu") == 256
    assert prefill_chunk_for("cuda") == 2048
    assert Engine(model, tok, {"base": None}, prefill_chunk=0).prefill_chunk == 0
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--model", "m"])
    assert args.prefill_chunk is None  # the device's
