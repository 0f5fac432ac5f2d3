"""repetition_penalty, presence_penalty, frequency_penalty, logit_bias and min_p: the
sampler (flora.generation.sample_next / Penalties) against transformers' processors and
plain loops, generate() against a step-by-step loop over the model's forward, and the
server's rows against generate()."""
import math

import pytest
import torch
from _train_helpers import served_checkpoint

import flora.generation
from flora.data import load_tokenizer
from flora.generation import Penalties, Sampling, _eos_set, check_sampling, sample_next
from flora.model import FusedLlama
from flora.serve import BadRequest, Engine
from llama_fixtures import llama_model, random_ids


@pytest.fixture(scope="module")
def pair():
    hf = llama_model(heads=8, kv_heads=2)
    return hf, FusedLlama.from_pretrained(hf)


def _history(seed=0, B=3, T=9, V=40, steps=6):
    """Random logits [B, V], prompts [B, T] (row 1 left-padded by 4), and each row's output so far."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    prompts = torch.randint(0, V, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :4] = False
    outs = torch.randint(0, V, (B, steps), generator=g)
    outs[:, -1] = outs[:, 0]  # a token output twice
    return logits, prompts, valid, outs


def _penalties(s, prompts, valid, outs, V):
    pen = Penalties(s, prompts, V, valid)
    for t in outs.T:
        pen.add(t)
    return pen


@pytest.mark.parametrize("r", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(r):
    """Over each row's prompt (its real tokens) and output: transformers'
    RepetitionPenaltyLogitsProcessor on the same logits; greedy is the argmax of those."""
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, prompts, valid, outs = _history()
    V = logits.shape[1]
    got = _penalties(Sampling(repetition_penalty=r), prompts, valid, outs, V)(logits)
    for b in range(logits.shape[0]):
        seen = torch.cat([prompts[b][valid[b]], outs[b]])[None]
        ref = RepetitionPenaltyLogitsProcessor(r)(seen, logits[b:b + 1].clone())
        torch.testing.assert_close(got[b:b + 1], ref, rtol=0, atol=0)
        assert not torch.equal(ref, logits[b:b + 1])
    pen = _penalties(Sampling(repetition_penalty=r), prompts, valid, outs, V)
    assert torch.equal(sample_next(logits, Sampling(repetition_penalty=r), None, pen), got.argmax(-1))


def test_bias_and_penalties_equal_a_plain_loop():
    """logit_bias added, then repetition over prompt + output, then OpenAI's frequency x
    count and presence over the output only: a loop over each row's tokens."""
    logits, prompts, valid, outs = _history(seed=3)
    B, V = logits.shape
    bias = {0: 5.0, 7: -100.0, int(outs[0, 0]): 2.5, V - 1: 0.75}
    for s in (Sampling(presence_penalty=1.5), Sampling(frequency_penalty=-0.7), Sampling(logit_bias=bias),
              Sampling(repetition_penalty=1.4, presence_penalty=-2.0, frequency_penalty=2.0, logit_bias=bias)):
        got = _penalties(s, prompts, valid, outs, V)(logits)
        for b in range(B):
            out = outs[b].tolist()
            seen = set(prompts[b][valid[b]].tolist()) | set(out)
            for v in range(V):
                x = logits[b, v].item() + (s.logit_bias or {}).get(v, 0.0)
                if v in seen and s.repetition_penalty != 1:
                    x = x / s.repetition_penalty if x > 0 else x * s.repetition_penalty
                c = out.count(v)
                x -= s.frequency_penalty * c + s.presence_penalty * (c > 0)
                assert math.isclose(got[b, v].item(), x, rel_tol=1e-6, abs_tol=1e-5), (s, b, v)


def test_banned_tokens_are_never_drawn_whatever_the_bias():
    """Penalties.banned (the server's min_tokens: the tokens that would end an answer): -inf
    after the bias and penalties, so neither greedy nor sampling draws them, even a token
    biased +100; the other logits as without it; None lifts it."""
    logits, prompts, valid, outs = _history(seed=3)
    B, V = logits.shape
    s = Sampling(temperature=1.0, repetition_penalty=1.3, logit_bias={5: 100.0, 9: 100.0})
    plain = _penalties(s, prompts, valid, outs, V)
    pen = Penalties(s, prompts, V, valid, banned={5, 2})
    for t in outs.T:
        pen.add(t)
    got, want = pen(logits), plain(logits)
    assert torch.isneginf(got[:, [2, 5]]).all()
    keep = [v for v in range(V) if v not in (2, 5)]
    assert torch.equal(got[:, keep], want[:, keep])
    assert (sample_next(logits, Sampling(temperature=0), None, pen) == 9).all()  # greedy: 5 out, 9 next
    g = torch.Generator().manual_seed(0)
    assert all(not {2, 5} & set(sample_next(logits, s, g, pen).tolist()) for _ in range(50))
    pen.banned = None
    assert torch.equal(pen(logits), want)


@pytest.mark.cuda
def test_penalties_on_cuda_equal_the_cpu():
    """The rows' state and the adjusted logits on a GPU (scatter, the bias index, the
    banned mask) are the CPU's, and so is greedy's pick (run by the device script)."""
    logits, prompts, valid, outs = _history(seed=5)
    V = logits.shape[1]
    s = Sampling(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=-0.4,
                 logit_bias={1: 3.0, V - 1: -2.0})
    got = {}
    for dev in ("cpu", "cuda"):
        pen = Penalties(s, prompts.to(dev), V, valid.to(dev), banned={4})
        for t in outs.T:
            pen.add(t.to(dev))
        got[dev] = (pen(logits.to(dev)).cpu(), sample_next(logits.to(dev), s, None, pen).cpu())
    torch.testing.assert_close(got["cuda"][0], got["cpu"][0], rtol=1e-6, atol=1e-5)
    assert torch.equal(got["cuda"][1], got["cpu"][1])


@pytest.mark.parametrize("temperature, min_p, top_k, top_p", [
    (1.0, 0.2, 0, 1.0), (0.7, 0.1, 0, 1.0), (1.5, 0.3, 0, 1.0),
    (1.0, 0.1, 4, 1.0), (1.0, 0.08, 0, 0.7),  # min-p after top-k, top-p
])
def test_min_p_samples_what_transformers_keeps(temperature, min_p, top_k, top_p):
    """The tokens that can be drawn: transformers' warpers in its generate()'s order
    (temperature, top-k, top-p, min-p) as the reference."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.log(torch.tensor([[0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01]]))
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ref = MinPLogitsWarper(min_p)(None, ref)
    keep = set(torch.isfinite(ref[0]).nonzero().flatten().tolist())
    g = torch.Generator().manual_seed(0)
    s = Sampling(temperature, top_p, top_k, min_p)
    seen = {int(sample_next(logits, s, g)) for _ in range(800)}
    assert seen == keep and 1 < len(keep) < 10


def _step_by_step(m, prompt, n, adjust):
    """Greedy tokens after ``prompt`` (a list), each from the model's full forward over
    the sequence so far, its last logits changed by ``adjust(ids [1, t], logits [1, V],
    output so far)``."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.tensor([ids])).logits[:, -1].float()
            tok = int(adjust(torch.tensor([ids]), logits, out).argmax(-1))
            ids.append(tok)
            out.append(tok)
    return out


def _left_padded():
    ids = random_ids(3, 12, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_greedy_generate_with_repetition_penalty_equals_a_step_by_step_loop(pair):
    """A left-padded batch, greedy: each row as the model's forward step by step with
    transformers' RepetitionPenaltyLogitsProcessor (its prompt's real tokens and
    output), and as transformers' own generate() with the penalty."""
    from transformers import RepetitionPenaltyLogitsProcessor

    hf, m = pair
    ids, mask = _left_padded()
    n, r = 10, 1.8
    got = m.generate(ids, attention_mask=mask, max_new_tokens=n, repetition_penalty=r, eos_token_id=[])
    plain = m.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
    proc = RepetitionPenaltyLogitsProcessor(r)
    for b in range(ids.shape[0]):
        prompt = ids[b][mask[b].bool()].tolist()
        want = _step_by_step(m, prompt, n, lambda seq, lg, out: proc(seq, lg))
        assert got[b, ids.shape[1]:].tolist() == want
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, repetition_penalty=r,
                          pad_token_id=0, eos_token_id=None)
        assert ref[0, len(prompt):].tolist() == want
    assert not torch.equal(got, plain)  # the penalty changed tokens: the check means something


def test_greedy_generate_with_bias_and_penalties_equals_a_step_by_step_loop(pair):
    """presence / frequency over the output, logit_bias: a plain loop over the model's forward."""
    _, m = pair
    ids, mask = _left_padded()
    n = 10
    plain = m.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
    bias = {int(plain[0, -1]): -100.0, int(plain[1, -2]): -3.0, 17: 4.0}
    for kw in (dict(presence_penalty=2.0), dict(frequency_penalty=1.5), dict(logit_bias=bias),
               dict(presence_penalty=0.5, frequency_penalty=1.0, logit_bias=bias, repetition_penalty=1.2)):
        got = m.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], **kw)
        s = Sampling(**kw)

        def adjust(seq, lg, out):
            lg = lg.clone()
            for t, v in (s.logit_bias or {}).items():
                lg[0, t] += v
            if s.repetition_penalty != 1:
                for t in set(seq[0].tolist()):
                    x = lg[0, t]
                    lg[0, t] = x / s.repetition_penalty if x > 0 else x * s.repetition_penalty
            for t in set(out):
                lg[0, t] -= s.frequency_penalty * out.count(t) + s.presence_penalty
            return lg

        for b in range(ids.shape[0]):
            prompt = ids[b][mask[b].bool()].tolist()
            assert got[b, ids.shape[1]:].tolist() == _step_by_step(m, prompt, n, adjust), kw
        assert not torch.equal(got, plain), kw


def test_min_p_of_one_samples_greedy_and_defaults_keep_no_state(pair, monkeypatch):
    """min_p 1 keeps only the top token: sampling at any temperature is then greedy
    (penalised greedy with a penalty). Settings that ask for nothing build no
    Penalties: no per-step work in the decode loop."""
    _, m = pair
    ids = random_ids(2, 6, seed=9)
    assert torch.equal(m.generate(ids, max_new_tokens=8, temperature=1.7, min_p=1.0, seed=4),
                       m.generate(ids, max_new_tokens=8))
    assert torch.equal(m.generate(ids, max_new_tokens=8, temperature=1.7, min_p=1.0, seed=4, frequency_penalty=1.0),
                       m.generate(ids, max_new_tokens=8, frequency_penalty=1.0))
    plain = m.generate(ids, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=2)

    def refuse(*a, **k):
        raise AssertionError("Penalties built for settings that ask for nothing")

    monkeypatch.setattr(flora.generation, "Penalties", refuse)
    assert torch.equal(m.generate(ids, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=2, min_p=0.0,
                                  repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                  logit_bias={}), plain)


@pytest.mark.parametrize("kw, msg", [
    (dict(repetition_penalty=0.0), r"repetition_penalty must be a finite number > 0, got 0.0"),
    (dict(repetition_penalty=math.inf), r"repetition_penalty must be a finite number > 0"),
    (dict(presence_penalty=2.5), r"presence_penalty must be a finite number in \[-2, 2\], got 2.5"),
    (dict(frequency_penalty=math.nan), r"frequency_penalty must be a finite number in \[-2, 2\], got nan"),
    (dict(min_p=-0.1), r"min_p must be a finite number in \[0, 1\], got -0.1"),
    (dict(min_p=True), r"min_p must be a finite number"),
    (dict(logit_bias={1003: 1.0}), r"logit_bias: 1003 is not a token id of this model \(an integer in 0 \.\. 1002\)"),
    (dict(logit_bias={"5": 1.0}), r"logit_bias: '5' is not a token id"),
    (dict(logit_bias={5: 100.5}), r"logit_bias\[5\] must be a number in \[-100, 100\], got 100.5"),
    (dict(logit_bias={i: 1.0 for i in range(301)}), r"logit_bias must be a dict of at most 300 .*got 301 entries"),
    (dict(logit_bias=[(5, 1.0)]), r"logit_bias must be a dict of at most 300 \{token id: bias\}, got list"),
])
def test_generate_refuses_bad_settings(pair, kw, msg):
    _, m = pair
    with pytest.raises(ValueError, match=msg):
        m.generate(random_ids(1, 4), max_new_tokens=2, **kw)


def test_cli_flags_and_check_before_a_model_loads():
    """flora generate / chat: --repetition-penalty, --presence-penalty, --frequency-penalty,
    --min-p become the Sampling; a bad one is refused naming it."""
    import argparse

    from flora.inference import add_arguments, sampling_of

    p = add_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--model", "x", "--prompt", "hi", "--repetition-penalty", "1.2", "--presence-penalty", "0.5",
                         "--frequency-penalty", "-0.5", "--min-p", "0.05", "--temperature", "0.8"])
    assert sampling_of(args) == Sampling(0.8, 1.0, 0, 0.05, 1.2, 0.5, -0.5)
    with pytest.raises(ValueError, match=r"presence_penalty must be a finite number in \[-2, 2\], got 3.0"):
        sampling_of(p.parse_args(["--model", "x", "--prompt", "hi", "--presence-penalty", "3"]))
    check_sampling(4, Sampling(logit_bias={10 ** 6: 1.0}))  # no vocab yet: its ids are checked with the model's


# ------------------------------------------------------------------------- serve
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt, _ = served_checkpoint(tmp_path_factory.mktemp("pen"))
    return FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt)


PROMPT = [5, 9, 14, 9, 22, 30, 5, 41]


def _run(m, tok, bodies, max_batch=8):
    """Each body's choices on one engine whose loop runs here after they are all queued
    (the first max_batch rows start together): each choice's (text, reason, tokens)."""
    eng = Engine(m, tok, {"base": None}, max_batch=max_batch, cache_len=64, prefix_cache=0)
    reqs = [eng.submit(eng.parse({"model": "base", "prompt": PROMPT, **b}, False)) for b in bodies]
    eng.close()
    eng.run()
    out = []
    for rs in reqs:
        got = {}
        while len(got) < len(rs):
            ev = rs[0].events.get(timeout=5)
            assert ev[0] != "error", ev
            if ev[0] == "done":
                got[ev[1]] = ev[2:5]
        out.append([got[r.index] for r in rs])
    return out, eng, reqs


def _want(m, tok, r):
    """generate() alone with the Request's settings and seed: (text, reason, tokens)."""
    row = m.generate(torch.tensor([r.prompt]), max_new_tokens=r.max_tokens, seed=r.seed,
                     **vars(r.sampling))[0, len(r.prompt):].tolist()
    eos = set(_eos_set(m.generation_eos_token_id))
    k = next((i for i, t in enumerate(row) if t in eos), None)
    return (tok.decode(row if k is None else row[:k], skip_special_tokens=True),
            "length" if k is None else "stop", len(row) if k is None else k + 1)


def test_serve_rows_with_and_without_penalties_in_one_batch_match_generate(served):
    """Greedy requests with each setting and one without, in one batch: each row gets
    its own (the shared argmax shortcut only for the plain row), each as generate()
    alone with the same settings."""
    m, tok = served
    bodies = [{}, {"repetition_penalty": 2.5}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.5},
              {"logit_bias": {"2": -100, "9": 8.5, "30": -4}}, {"min_p": 0.3},
              {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
               "logit_bias": {"2": -100}}]
    bodies = [{"max_tokens": 20, "temperature": 0, **b} for b in bodies]
    got, eng, reqs = _run(m, tok, bodies)
    assert eng.batches == 1  # they all joined one prefill
    for b, (g,), (r,) in zip(bodies, got, reqs):
        assert g == _want(m, tok, r), b
    plain = got[0][0]
    assert all(g[0] != plain for g in got[1:5] + got[6:]), got  # each setting changed the answer
    assert got[5][0] == plain  # min_p: greedy is the argmax whatever it keeps


def test_serve_seeded_sampling_with_penalties_is_reproducible(served):
    """A seeded sampled request with every setting: the same answer twice, each choice
    as generate() with the same settings and seed + j."""
    m, tok = served
    body = {"max_tokens": 16, "temperature": 1.1, "top_k": 30, "top_p": 0.95, "min_p": 0.05, "seed": 11, "n": 3,
            "repetition_penalty": 1.2, "presence_penalty": 0.4, "frequency_penalty": 0.3,
            "logit_bias": {"2": -100, "7": 1.5}}
    (first,), _, (reqs,) = _run(m, tok, [body])
    (again,), _, _ = _run(m, tok, [body])
    assert first == again and len({c[0] for c in first}) > 1
    assert first == [_want(m, tok, r) for r in reqs]


@pytest.mark.parametrize("field, value, msg", [
    ("repetition_penalty", 0, r"'repetition_penalty' must be a number > 0, got 0"),
    ("repetition_penalty", "1.1", r"'repetition_penalty' must be a number > 0"),
    ("presence_penalty", 2.5, r"'presence_penalty' must be a number >= -2 and <= 2, got 2.5"),
    ("frequency_penalty", -3, r"'frequency_penalty' must be a number >= -2 and <= 2, got -3"),
    ("min_p", 1.5, r"'min_p' must be a number >= 0 and <= 1, got 1.5"),
    ("logit_bias", [1, 2], r"'logit_bias' must be an object of token id: bias, got \[1, 2\]"),
    ("logit_bias", {"x": 1}, r"'logit_bias': 'x' is not a token id"),
    ("logit_bias", {"97": 1}, r"logit_bias: 97 is not a token id of this model \(an integer in 0 \.\. 96\)"),
    ("logit_bias", {"-1": 1}, r"logit_bias: -1 is not a token id of this model"),
    ("logit_bias", {"5": 101}, r"logit_bias\[5\] must be a number in \[-100, 100\], got 101"),
    ("logit_bias", {"5": "1"}, r"logit_bias\[5\] must be a number in \[-100, 100\], got '1'"),
    ("logit_bias", {str(i): 1 for i in range(301)}, r"logit_bias must be a dict of at most 300"),
])
def test_serve_refuses_bad_sampling_fields(served, field, value, msg):
    m, tok = served
    eng = Engine(m, tok, {"base": None}, cache_len=64, prefix_cache=0)
    with pytest.raises(BadRequest, match=msg) as e:
        eng.parse({"prompt": PROMPT, field: value}, False)
    assert e.value.status == 400
    assert eng.parse({"prompt": PROMPT, "logit_bias": {}, "presence_penalty": 0}, False)[0].sampling == Sampling(1.0)


def test_serve_logprobs_stay_the_models_own_with_penalties(served):
    """A penalised, biased request's logprobs: the model's own log_softmax at each step
    (vLLM's raw_logprobs), not the adjusted logits the token was picked from."""
    m, tok = served
    body = {"max_tokens": 8, "temperature": 0, "logprobs": 2, "repetition_penalty": 2.5, "logit_bias": {"2": -100}}
    eng = Engine(m, tok, {"base": None}, cache_len=64, prefix_cache=0)
    r, = eng.submit(eng.parse({"prompt": PROMPT, **body}, False))
    eng.close()
    eng.run()
    while (ev := r.events.get(timeout=5))[0] != "done":
        assert ev[0] != "error", ev
    row = m.generate(torch.tensor([PROMPT]), max_new_tokens=8, **vars(r.sampling))[0, len(PROMPT):].tolist()
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([PROMPT + row])).logits[0].float(), -1)
    ref = [float(lp[len(PROMPT) - 1 + i, x]) for i, x in enumerate(row)]
    assert [e[1] for e in ev[5]] == pytest.approx(ref, abs=1e-4)
    adjusted = Penalties(r.sampling, torch.tensor([PROMPT]), lp.shape[-1])(lp[len(PROMPT) - 1:len(PROMPT)])
    assert ev[5][0][1] != pytest.approx(float(torch.log_softmax(adjusted, -1)[0, row[0]]), abs=1e-3)
