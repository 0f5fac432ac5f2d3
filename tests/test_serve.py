"""`flora serve`: the OpenAI-compatible server (flora.serve), against generate()
called directly on separately loaded models."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from _train_helpers import served_checkpoint

from flora import FusedLlama
from flora.bench.latency import randomize_adapter
from flora.cli import main
from flora.config import AdapterConfig
from flora.data import load_tokenizer, prompt_ids
from flora.generation import Sampling, _eos_set
from flora.metrics import ServeMetrics
from flora.pretrained import chat_prompt
from flora.serve import Engine, Request, serve

PROMPTS = ["between a and f ->", "copy : a b c =", "the big cat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    return (d, *served_checkpoint(d))


@pytest.fixture(scope="module")
def server(setup):
    d, ckpt, adapter = setup
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    model.load_adapter(str(adapter), name="ffba", activate=False)
    engine = Engine(model, load_tokenizer(ckpt), {"base": None, "ffba": "ffba"}, max_batch=4)
    srv = serve(engine, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", engine
    srv.shutdown()
    srv.server_close()


def _post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _submit(eng, body, chat=False):
    """A one-choice request, queued: its Request."""
    return eng.submit(eng.parse(body, chat))[0]


def _end(req, timeout=60):
    """A request's (text, finish_reason, tokens) once it ends (or ("error", message))."""
    while True:
        ev = req.events.get(timeout=timeout)
        if ev[0] in ("done", "error"):
            return ev[2:5] if ev[0] == "done" else ev


def _ends(reqs, timeout=60):
    """Each choice's (text, finish_reason, tokens) by index, once all of a request's
    choices (one events queue) have ended (or ("error", message))."""
    got = {}
    while len(got) < len(reqs):
        ev = reqs[0].events.get(timeout=timeout)
        if ev[0] == "error":
            return ev
        if ev[0] == "done":
            got[ev[1]] = ev[2:5]
    return [got[r.index] for r in reqs]


def _reference(ckpt, adapter, text, n):
    """generate() on a separately loaded model: (new text up to the EOS, finish reason, tokens)."""
    m = FusedLlama.from_pretrained(str(ckpt), adapter=None if adapter is None else str(adapter))
    tok = load_tokenizer(ckpt)
    ids = torch.tensor([prompt_ids(tok, text)])
    row = m.generate(ids, max_new_tokens=n)[0, ids.shape[1]:].tolist()
    eos = set(_eos_set(m.generation_eos_token_id))
    k = next((i for i, t in enumerate(row) if t in eos), None)
    new = row if k is None else row[:k]
    return tok.decode(new, skip_special_tokens=True), ("length" if k is None else "stop"), len(row if k is None else row[:k + 1])


def test_models_and_greedy_completions_match_generate(setup, server):
    _, ckpt, adapter = setup
    url, _ = server
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["base", "ffba"]
    with urllib.request.urlopen(url + "/v1/models/ffba", timeout=30) as r:
        assert json.loads(r.read())["id"] == "ffba"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/v1/models/nope", timeout=30)
    assert e.value.code == 404 and "model 'nope' is not served" in json.loads(e.value.read())["error"]["message"]
    for name, path in (("ffba", adapter), ("base", None), ("ffba", adapter)):  # switched back and forth
        for p in PROMPTS:
            status, body = _post(url + "/v1/completions", {"model": name, "prompt": p, "max_tokens": 12,
                                                           "temperature": 0})
            assert status == 200, body
            out = json.loads(body)
            text, reason, n = _reference(ckpt, path, p, 12)
            assert out["object"] == "text_completion" and out["model"] == name
            assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == (text, reason)
            assert out["usage"]["prompt_tokens"] == len(prompt_ids(load_tokenizer(ckpt), p))
            assert out["usage"]["completion_tokens"] == n


def test_chat_completions_use_the_chat_template(setup, server):
    _, ckpt, adapter = setup
    url, _ = server
    msgs = [{"role": "system", "content": "copy"}, {"role": "user", "content": "copy : a b"}]
    status, body = _post(url + "/v1/chat/completions", {"model": "ffba", "messages": msgs, "max_tokens": 10,
                                                        "temperature": 0})
    assert status == 200, body
    out = json.loads(body)
    text, reason, _ = _reference(ckpt, adapter, chat_prompt(load_tokenizer(ckpt), msgs), 10)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert out["choices"][0]["finish_reason"] == reason


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_sends_the_same_text(server, chat):
    url, _ = server
    body = ({"messages": [{"role": "user", "content": "copy : a b"}]} if chat else {"prompt": PROMPTS[0]})
    body = {**body, "model": "ffba", "max_tokens": 12, "temperature": 0}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    whole = json.loads(_post(url + path, body)[1])["choices"][0]
    status, raw = _post(url + path, {**body, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    if chat:
        assert chunks[0]["delta"]["role"] == "assistant"
        text = "".join(c["delta"].get("content", "") for c in chunks)
        assert text == whole["message"]["content"]
    else:
        assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [whole["finish_reason"]]
    # stream_options.include_usage (OpenAI's clients send it for usage): a last chunk of the counts
    status, raw = _post(url + path, {**body, "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(line[len("data: "):]) for line in raw.split("\n\n") if line and line != "data: [DONE]"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == json.loads(_post(url + path, body)[1])["usage"]
    assert [e["choices"][0] for e in events[:-1]] == chunks
    assert _post(url + path, {**body, "stream_options": {"include_usage": True}})[0] == 400  # not streaming


def _stream_choices(raw):
    """A stream's chunks -> index -> (its text joined, its finish_reason), and the chunks."""
    chunks = [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    got = {}
    for c in chunks:
        for ch in c["choices"]:
            text, reason = got.get(ch["index"], ("", None))
            piece = ch["delta"].get("content", "") if "delta" in ch else ch["text"]
            got[ch["index"]] = (text + piece, ch["finish_reason"] or reason)
    return got, chunks


def test_a_batch_of_prompts_strings_or_token_ids(setup, server):
    """``prompt`` as a list of strings, a list of token ids, or a list of those: one
    choice each, ``index`` in order, each what the prompt gives alone (greedy); a
    token-id prompt is taken as it is (no BOS added); usage sums the prompts."""
    _, ckpt, adapter = setup
    url, _ = server
    tok = load_tokenizer(ckpt)
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    body = {"model": "ffba", "max_tokens": 8, "temperature": 0}
    want = [_reference(ckpt, adapter, p, 8) for p in PROMPTS]
    for prompt in (PROMPTS, ids, [ids[0], PROMPTS[1], ids[2]]):
        status, raw = _post(url + "/v1/completions", {**body, "prompt": prompt})
        assert status == 200, raw
        out = json.loads(raw)
        assert [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]] == \
            [(i, w[0], w[1]) for i, w in enumerate(want)]
        assert out["usage"]["prompt_tokens"] == sum(map(len, ids))
        assert out["usage"]["completion_tokens"] == sum(w[2] for w in want)
    one = json.loads(_post(url + "/v1/completions", {**body, "prompt": ids[1]})[1])["choices"]
    assert [c["text"] for c in one] == [want[1][0]]
    no_bos = json.loads(_post(url + "/v1/completions", {**body, "prompt": ids[1][1:]})[1])
    assert no_bos["usage"]["prompt_tokens"] == len(ids[1]) - 1
    # streamed: each chunk one choice, by its index
    status, raw = _post(url + "/v1/completions", {**body, "prompt": PROMPTS, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    got, chunks = _stream_choices(raw)
    assert got == {i: w[:2] for i, w in enumerate(want)}
    assert all(len(c["choices"]) == 1 for c in chunks[:-1])
    assert chunks[-1]["usage"]["prompt_tokens"] == sum(map(len, ids))


@pytest.mark.parametrize("chat", [False, True])
def test_n_choices_sample_each_with_its_own_seed(server, chat):
    """``n``: that many choices of one prompt, each its own generator (``seed`` + its
    index: reproducible, choice 0 as with n=1); usage counts the prompt once;
    greedy choices are all the same; streamed, each chunk names its choice."""
    url, _ = server
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "ffba", "max_tokens": 10, "temperature": 1.0, "seed": 11,
            **({"messages": [{"role": "user", "content": "copy : a b"}]} if chat else {"prompt": PROMPTS[1]})}
    text = (lambda c: c["message"]["content"]) if chat else (lambda c: c["text"])  # noqa: E731

    def choices(b):
        status, raw = _post(url + path, b)
        assert status == 200, raw
        out = json.loads(raw)
        assert [c["index"] for c in out["choices"]] == list(range(len(out["choices"])))
        return [text(c) for c in out["choices"]], out["usage"]

    a, usage = choices({**body, "n": 4})
    assert choices({**body, "n": 4, "best_of": 4})[0] == a  # reproducible
    assert len(set(a)) > 1  # each its own draw
    assert choices({**body, "n": 1})[0] == a[:1]
    assert choices({**body, "n": 1, "seed": 12})[0] == a[1:2]  # choice 1 samples with seed + 1
    one = choices(body)[1]
    assert usage["prompt_tokens"] == one["prompt_tokens"] and usage["completion_tokens"] >= 4
    greedy, _ = choices({**body, "n": 3, "temperature": 0})
    assert len(greedy) == 3 and len(set(greedy)) == 1
    got, chunks = _stream_choices(_post(url + path, {**body, "n": 4, "stream": True})[1])
    assert [got[i][0] for i in range(4)] == a and all(got[i][1] for i in range(4))
    if chat:  # each choice's first chunk carries the role
        firsts = {}
        for c in chunks:
            firsts.setdefault(c["choices"][0]["index"], c["choices"][0]["delta"])
        assert all(d.get("role") == "assistant" for d in firsts.values())


def _greedy_ids(ckpt, adapter, ids, n):
    """generate() on a separately loaded model: the greedy tokens after ``ids``, up to its EOS."""
    m = FusedLlama.from_pretrained(str(ckpt), adapter=None if adapter is None else str(adapter))
    row = m.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids):].tolist()
    eos = set(_eos_set(m.generation_eos_token_id))
    k = next((i for i, t in enumerate(row) if t in eos), None)
    return row if k is None else row[:k + 1]


def _reference_logprobs(ckpt, adapter, ids):
    """log_softmax (fp32) of a separately loaded model's full-forward logits over ``ids``:
    row i, the distribution token i + 1 was drawn from."""
    m = FusedLlama.from_pretrained(str(ckpt), adapter=None if adapter is None else str(adapter)).eval()
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)


def _added(tok, before, t):
    """The text token t adds after ``before`` (whole decodes, special tokens skipped)."""
    whole = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    return whole(before + [t])[len(whole(before)):]


def _merge_logprobs(parts, chat):
    """Streamed chunks' logprobs joined (each chunk has those of its tokens)."""
    if chat:
        return {"content": [c for p in parts if p for c in p["content"]]}
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: [x for p in parts if p for x in p[k]] for k in keys}


def _check_logprobs(tok, lp, chat, ids, gen, ref, k, text):
    """A choice's logprobs against the reference: each generated token's text, its
    logprob and its k most likely alternatives' (in fp32's tolerance)."""
    entries = lp["content"] if chat else [
        {"token": t, "logprob": v, "top": top, "offset": o}
        for t, v, top, o in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"])]
    assert len(entries) == len(gen)
    offset = 0
    for i, (e, t) in enumerate(zip(entries, gen)):
        row = ref[len(ids) + i - 1]
        assert e["token"] == _added(tok, gen[:i], t)
        assert e["logprob"] == pytest.approx(float(row[t]), abs=1e-4)
        vals, idx = row.topk(k)
        want = [(_added(tok, gen[:i], int(a)), float(v)) for a, v in zip(idx, vals)]
        if chat:
            got = [(a["token"], a["logprob"]) for a in e["top_logprobs"]]
            assert e["bytes"] == list(e["token"].encode()) and all(a["bytes"] == list(a["token"].encode())
                                                                   for a in e["top_logprobs"])
        else:
            got = list(e["top"].items())
            want = list(dict(want + [(e["token"], e["logprob"])]).items())  # and the token itself
            assert e["offset"] == offset
            offset += len(e["token"])
        assert [a for a, _ in got] == [a for a, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)
        if t == int(row.argmax()) and k:  # greedy: exactly the most likely's value (lm-eval's is_greedy)
            assert e["logprob"] == max(v for _, v in got)
    assert "".join(e["token"] for e in entries) == text


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_the_models_own(setup, server, chat, stream):
    """logprobs (completions: ``logprobs: k``; chat: ``logprobs: true, top_logprobs:
    k``): each generated token's and its k most likely alternatives', equal to the
    log_softmax of the model's own full-forward logits; streamed, each chunk
    carries its tokens' and they join to the whole."""
    _, ckpt, adapter = setup
    url, _ = server
    tok = load_tokenizer(ckpt)
    msgs = [{"role": "user", "content": "copy : a b"}]
    text = chat_prompt(tok, msgs) if chat else PROMPTS[0]
    ids = prompt_ids(tok, text)
    name, adapter = ("ffba", adapter) if chat else ("base", None)
    gen = _greedy_ids(ckpt, adapter, ids, 12)
    assert chat or (len(gen) < 12 and gen[-1] == tok.eos_token_id)  # the EOS has an entry too (its text: "")
    ref = _reference_logprobs(ckpt, adapter, ids + gen)
    k = 3
    body = {"model": name, "max_tokens": 12, "temperature": 0, "stream": stream,
            **({"messages": msgs, "logprobs": True, "top_logprobs": k} if chat else {"prompt": text, "logprobs": k})}
    status, raw = _post(url + ("/v1/chat/completions" if chat else "/v1/completions"), body)
    assert status == 200, raw
    if stream:
        got, chunks = _stream_choices(raw)
        answer = got[0][0]
        lp = _merge_logprobs([c["choices"][0]["logprobs"] for c in chunks], chat)
        assert sum(bool(c["choices"][0]["logprobs"]) for c in chunks) > 1
    else:
        choice = json.loads(raw)["choices"][0]
        answer, lp = (choice["message"]["content"] if chat else choice["text"]), choice["logprobs"]
    _check_logprobs(tok, lp, chat, ids, gen, ref, k, answer)


def test_logprobs_are_before_temperature_top_k_and_top_p(server):
    """The logprobs are the model's distribution itself (vLLM's default), not the one
    temperature, top_k and top_p make of it to sample from: sampling that can only
    pick the argmax gives the greedy answer's logprobs."""
    url, _ = server
    body = {"model": "ffba", "prompt": PROMPTS[2], "max_tokens": 8, "logprobs": 2}
    greedy = json.loads(_post(url + "/v1/completions", {**body, "temperature": 0})[1])["choices"][0]
    for extra in ({"temperature": 1e-6, "seed": 1}, {"temperature": 1.5, "top_k": 1}, {"top_p": 1e-6}):
        got = json.loads(_post(url + "/v1/completions", {**body, **extra})[1])["choices"][0]
        assert got["text"] == greedy["text"] and got["logprobs"] == greedy["logprobs"], extra


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("max_tokens", [0, 6])
def test_echo_sends_the_prompt_and_its_logprobs(setup, server, stream, max_tokens):
    """``echo``: the answer starts with the prompt; with logprobs, the prompt's tokens
    come first (the first's logprob null, as OpenAI's), each equal to the log_softmax of
    the model's full-forward logits; ``max_tokens: 0`` scores the prompt alone."""
    _, ckpt, adapter = setup
    url, _ = server
    tok = load_tokenizer(ckpt)
    ids = prompt_ids(tok, PROMPTS[1])
    gen = _greedy_ids(ckpt, adapter, ids, max_tokens) if max_tokens else []
    ref = _reference_logprobs(ckpt, adapter, ids + gen)
    body = {"model": "ffba", "prompt": PROMPTS[1], "echo": True, "logprobs": 2, "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    status, raw = _post(url + "/v1/completions", body)
    assert status == 200, raw
    if stream:
        got, chunks = _stream_choices(raw)
        text, reason = got[0]
        assert chunks[0]["choices"][0]["text"] == PROMPTS[1]  # the prompt comes first, in one chunk
        lp = _merge_logprobs([c["choices"][0]["logprobs"] for c in chunks], False)
    else:
        out = json.loads(raw)
        text, reason, lp = out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["choices"][0]["logprobs"]
        assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(gen),
                                "total_tokens": len(ids) + len(gen), "prompt_tokens_details": {"cached_tokens": 0}}
    answer = tok.decode(gen, skip_special_tokens=True)
    assert text == PROMPTS[1] + answer and reason == "length"
    if not stream:  # without logprobs: the text alone
        plain = json.loads(_post(url + "/v1/completions", {**body, "logprobs": None})[1])["choices"][0]
        assert (plain["text"], plain["logprobs"]) == (text, None)
    P = len(ids)
    assert lp["tokens"][:P] == [_added(tok, ids[:i], t) for i, t in enumerate(ids)]
    assert "".join(lp["tokens"][:P]) == PROMPTS[1] and lp["text_offset"][:P] == [
        len("".join(lp["tokens"][:i])) for i in range(P)]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, P):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        vals, idx = ref[i - 1].topk(2)
        want = dict([(_added(tok, ids[:i], int(a)), float(v)) for a, v in zip(idx, vals)]
                    + [(lp["tokens"][i], lp["token_logprobs"][i])])
        assert list(lp["top_logprobs"][i]) == list(want)
        assert list(lp["top_logprobs"][i].values()) == pytest.approx(list(want.values()), abs=1e-4)
    rest = {k: v[P:] for k, v in lp.items()}
    rest["text_offset"] = [o - len(PROMPTS[1]) for o in rest["text_offset"]]  # offsets in the whole text
    _check_logprobs(tok, rest, False, ids, gen, ref, 2, answer)


def _lm_eval_parse_logprobs(out, ctxlens, generated=1):
    """lm-evaluation-harness's LocalCompletionsAPI.parse_logprobs (lm_eval/models/
    openai_completions.py): the continuation's summed logprob and whether it is the
    greedy one, from token_logprobs / top_logprobs after the context (``generated``:
    the tokens generated after the prompt, 1 in its requests, 0 in older ones)."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        end = len(choice["logprobs"]["token_logprobs"]) - generated
        lps = choice["logprobs"]["token_logprobs"][ctxlen:end]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:end]
        res.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))))
    return res


def test_lm_eval_harness_requests(setup, server):
    """The requests lm-evaluation-harness's local-completions model sends (token-id
    prompts without BOS, as its tokenizer gives them): loglikelihood ({"echo": true,
    "logprobs": 1, "max_tokens": 1}, 0 in its older versions, "temperature": 0,
    "seed"), read as it reads them, equal to the model's own; and generate_until
    (token ids, "stop", "seed"), the greedy text."""
    _, ckpt, _ = setup
    url, eng = server
    tok = load_tokenizer(ckpt)
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731 - lm-eval's add_bos_token=False
    ctx = [enc("copy : a b c ="), enc("between a and f ->")]
    greedy = [_greedy_ids(ckpt, None, c, 3)[:2] for c in ctx]  # its own continuation: is_greedy
    pairs = [(ctx[0], greedy[0]), (ctx[1], greedy[1]), (ctx[0], enc("the cat"))]
    want = []
    for c, cont in pairs:
        ref = _reference_logprobs(ckpt, None, c + cont)
        lps = [ref[len(c) + i - 1] for i in range(len(cont))]
        want.append((sum(float(r[t]) for r, t in zip(lps, cont)), all(int(r.argmax()) == t for r, t in zip(lps, cont))))
    assert [w[1] for w in want] == [True, True, False]
    for generated in (1, 0):
        payload = {"model": "base", "prompt": [c + cont for c, cont in pairs], "temperature": 0,
                   "max_tokens": generated, "logprobs": 1, "seed": 1234, "echo": True}
        batches = eng.batches
        status, raw = _post(url + "/v1/completions", payload)
        assert status == 200, raw
        assert eng.batches == batches  # answered from the scoring forward: no row prefilled the prompts again
        out = json.loads(raw)
        if generated:  # the one token: the greedy one after each prompt, with its logprob
            for ch, (c, cont) in zip(out["choices"], pairs):
                nxt = int(_reference_logprobs(ckpt, None, c + cont)[-1].argmax())
                assert ch["logprobs"]["tokens"][-1] == tok.decode([nxt], skip_special_tokens=True)  # the answer's
        got = _lm_eval_parse_logprobs(out, [len(c) for c, _ in pairs], generated)
        assert [g[1] for g in got] == [w[1] for w in want]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    # generate_until: {"prompt": [ids], "model", "max_tokens", "temperature", "stop", "seed"}
    payload = {"prompt": ctx, "model": "base", "max_tokens": 8, "temperature": 0, "seed": 1234,
               "stop": ["\n\n", "</s>", "Question:", "Q:", "<|im_end|>"]}  # a task's `until` and the EOS: over 4
    out = json.loads(_post(url + "/v1/completions", payload)[1])
    assert [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])] == [
        tok.decode(_greedy_ids(ckpt, None, c, 8), skip_special_tokens=True) for c in ctx]


def _served_and_alone(setup, tmp_path, mixed: bool) -> tuple:
    """(tokenizer, model names, the model to serve: --mixed its two adapters side by side,
    {name: a model of that adapter alone}: the references)."""
    _, ckpt, adapter = setup
    names = {"base": None, "a": "a", "b": "b"} if mixed else {"base": None}
    model = _two_adapters(ckpt, adapter, tmp_path) if mixed else FusedLlama.from_pretrained(str(ckpt))
    paths = {"base": None, "a": adapter, "b": tmp_path / "second"}
    refs = {n: FusedLlama.from_pretrained(str(ckpt), adapter=None if paths[n] is None else str(paths[n])).eval()
            for n in names}
    return load_tokenizer(ckpt), names, model, refs


def _two_adapters(ckpt, adapter, tmp_path):
    """The base with two ffba adapters loaded, "a" (the fixture's) and "b" (its own tensors), none current."""
    m2 = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("ffba", 4, 8))
    randomize_adapter(m2, seed=1)
    m2.save_adapter(tmp_path / "second")
    model = FusedLlama.from_pretrained(str(ckpt))
    model.load_adapter(str(adapter), name="a", activate=False)
    model.load_adapter(str(tmp_path / "second"), name="b", activate=False)
    return model


def test_echo_in_mixed_batches_scores_each_prompt_with_its_adapter(setup, tmp_path):
    """--mixed: an echoed prompt is scored with its own request's adapter (or the
    base), whatever the others in the batch use; max_tokens 0 takes no row."""
    _, ckpt, adapter = setup
    model = _two_adapters(ckpt, adapter, tmp_path)
    tok = load_tokenizer(ckpt)
    eng = Engine(model, tok, {"base": None, "a": "a", "b": "b"}, mixed=True)
    plan = [("a", adapter, 0), ("base", None, 3), ("b", tmp_path / "second", 0), ("a", adapter, 2)]
    reqs = [_submit(eng, {"model": n, "prompt": PROMPTS[2], "echo": True, "logprobs": 0, "max_tokens": k,
                          "temperature": 0}) for n, _, k in plan]
    eng.start()
    ids = prompt_ids(tok, PROMPTS[2])
    for r, (_, path, k) in zip(reqs, plan):
        ev = r.events.get(timeout=60)
        assert ev[0] == "prompt"
        ref = _reference_logprobs(ckpt, path, ids)
        assert [e[1] for e in ev[2][1:]] == pytest.approx([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                          abs=1e-4)
        assert _end(r)[1:] == ("length", k)
    assert eng.batches == 1  # the two that generate, together
    assert (eng.score_forwards, eng.score_rows) == (1, 3)  # one forward, a row each prompt and adapter
    reqs = eng.submit(eng.parse({"model": "b", "prompt": PROMPTS[0], "echo": True, "logprobs": 1, "max_tokens": 0,
                                 "n": 3}, False))
    assert [_end(r) for r in reqs] == [("", "length", 0)] * 3
    assert (eng.score_forwards, eng.score_rows) == (2, 4)  # a prompt scored once, not n times


def test_echo_with_max_tokens_0_takes_the_context_not_a_row(setup):
    _, ckpt, _ = setup
    small = Engine(FusedLlama.from_pretrained(str(ckpt)), load_tokenizer(ckpt), {"base": None}, cache_len=20)
    r, = small.parse({"prompt": "a " * 40, "echo": True, "max_tokens": 0}, False)  # past the cache, in the context
    assert (r.max_tokens, len(r.prompt), r.echo) == (0, 41, "a " * 40)
    with pytest.raises(Exception, match=r"the prompt is 41 tokens; the model's cache \(--cache-len\) is 20"):
        small.parse({"prompt": "a " * 40, "echo": True, "max_tokens": 1}, False)
    r, = small.parse({"prompt": [5, 6], "echo": True}, False)  # token ids: the echo is their text
    assert r.echo == small.text([5, 6]) and r.max_tokens == 16


def _scored(ev, tok, ids, ref, k):
    """An echoed prompt's entries (its "prompt" event) against the reference log_softmax
    rows of a plain forward over ``ids``: each token's text, logprob and k alternatives'."""
    assert ev[0] == "prompt"
    entries = ev[2]
    assert len(entries) == len(ids) and entries[0][1:] == (None, None)
    assert "".join(e[0] for e in entries) == tok.decode(ids, skip_special_tokens=True)
    for i in range(1, len(ids)):
        text, lp, alts = entries[i]
        assert text == _added(tok, ids[:i], ids[i])
        assert lp == pytest.approx(float(ref[i - 1, ids[i]]), rel=1e-5, abs=1e-4)  # fp32's rounding
        vals, idx = ref[i - 1].topk(k)
        assert [a for a, _ in alts] == [_added(tok, ids[:i], int(a)) for a in idx]
        assert [v for _, v in alts] == pytest.approx(vals.tolist(), rel=1e-5, abs=1e-4)


def _choices(tok):
    """lm-eval's multiple-choice prompts as token ids: one context (over SHARE_MIN
    tokens) and its continuations, one a prefix of another, one a branch between them."""
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    ctx = enc(" ".join("abcdefghijklmnopqrstuvwxyz") + " copy :")
    return [ctx + enc(" a b"), ctx + enc(" a b c d"), ctx + enc(" the big cat"), ctx + enc(" f"), ctx + enc(" a b c")]


def _prefixes(prompts):
    """The distinct prefixes of ``prompts``: the tokens a prefix tree of them holds."""
    return len({tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)})


@pytest.mark.parametrize("budget", ["default", "small"])
def test_echo_scores_the_waiting_prompts_together(setup, monkeypatch, budget):
    """lm-eval's loglikelihood requests (lists of prompts, strings or token ids, of
    different lengths, several sharing a context; echo, logprobs, max_tokens 1 or 0; n
    choices of a prompt), waiting together, are scored by one forward, a shared context
    computed once (``small``: SCORE_TOKENS, PACK_TOKENS and SCORE_LOGITS split them into
    several forwards and packs, and run the head a few positions at a time); every
    prompt's logprobs and alternatives equal the log_softmax of a plain forward over it
    alone, max_tokens 1's token is its argmax, and scoring a prompt alone gives the same."""
    from flora import serve as serve_mod

    _, ckpt, adapter = setup
    tok = load_tokenizer(ckpt)
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    model.load_adapter(str(adapter), name="ffba", activate=False)
    eng = Engine(model, tok, {"base": None, "ffba": "ffba"}, max_batch=2)
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    choices = _choices(tok)
    long = enc("copy : a b c d e f g h =") + enc(" a b c d e f g h")
    bodies = [
        {"prompt": choices[:4], "logprobs": 3, "max_tokens": 1},
        {"prompt": [PROMPTS[0], enc("the big cat"), long, [7]], "logprobs": 1, "max_tokens": 0},  # a 1-token one
        {"prompt": choices[4], "logprobs": 2, "max_tokens": 1, "n": 2},  # n choices: one row
        {"prompt": [choices[2]], "logprobs": 1, "max_tokens": 0},  # another request's prompt: one row
    ]
    if budget == "small":
        monkeypatch.setattr(serve_mod, "SCORE_TOKENS", 2 * len(long))
        monkeypatch.setattr(serve_mod, "PACK_TOKENS", len(choices[1]) + 2)
        monkeypatch.setattr(serve_mod, "SCORE_LOGITS", 3 * model.arch.vocab_size)
    sent = [eng.submit(eng.parse({"model": "ffba", "echo": True, "temperature": 0, "seed": 1234, **b}, False))
            for b in bodies]
    eng.start()
    eos = set(_eos_set(model.generation_eos_token_id))
    refs = {}
    for body, reqs in zip(bodies, sent):
        for r in reqs:
            key = tuple(r.prompt)
            if key not in refs:  # row len(prompt) - 1: the token after it
                refs[key] = _reference_logprobs(ckpt, adapter, r.prompt + [0])
            _scored(r.events.get(timeout=60), tok, r.prompt, refs[key], body["logprobs"])
            nxt = int(refs[key][len(r.prompt) - 1].argmax())
            assert _end(r) == ((tok.decode([nxt], skip_special_tokens=True), "stop" if nxt in eos else "length", 1)
                               if r.max_tokens else ("", "length", 0))
    assert eng.score_rows == len(refs) == 9 and eng.batches == 0  # no row prefilled a prompt again
    # cached_tokens: a token computed once counts for the first prompt (in arrival order) that holds it, cached for
    # the others (a shared context's other choices, an equal prompt's every token)
    assert sum(len(r.prompt) - r.cached for reqs in sent for r in reqs) == eng.score_tokens
    if budget == "default":  # one pack: each choice's tokens shared with a choice before it cached
        from flora.prefix_cache import common_length

        assert [r.cached for r in sent[0]] == [max([0] + [common_length(choices[i], choices[j]) for j in range(i)])
                                               for i in range(4)]
        assert sent[0][1].cached == len(choices[0]) and sent[3][0].cached == len(choices[2])  # an equal prompt
    single = _prefixes(choices) + sum(len(p) for p in bodies[1]["prompt"][1:]) + len(prompt_ids(tok, PROMPTS[0]))
    if budget == "default":  # one forward; the context and each branch's tokens once
        assert (eng.score_forwards, eng.score_tokens) == (1, single)
    else:
        assert eng.score_forwards > 1 and eng.score_tokens > single
    forwards = eng.score_forwards
    alone = _submit(eng, {"model": "ffba", "prompt": choices[1], "echo": True, "logprobs": 3, "max_tokens": 0})
    _scored(alone.events.get(timeout=60), tok, choices[1], refs[tuple(choices[1])], 3)
    assert eng.score_forwards == forwards + 1


def test_echo_in_mixed_batches_routes_the_head_too(setup, tmp_path):
    """--mixed zflora adapters, whose head adds each row's own adapter state (the
    scoring forward runs the head itself, a chunk of positions at a time, each routed
    to its row's adapter): prompts for both adapters and the base, scored in one
    forward, each as its own model scores it alone, max_tokens 1's token too."""
    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    paths = {"base": None}
    model = FusedLlama.from_pretrained(str(ckpt))
    for i, name in enumerate(("a", "b")):
        m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("zflora", 4, 8))
        randomize_adapter(m, seed=10 + i)
        m.save_adapter(tmp_path / name)
        paths[name] = tmp_path / name
        model.load_adapter(str(tmp_path / name), name=name, activate=False)
    eng = Engine(model, tok, {"base": None, "a": "a", "b": "b"}, mixed=True)
    eos = set(_eos_set(model.generation_eos_token_id))
    choices = _choices(tok)
    plan = [("a", choices[:3]), ("base", [prompt_ids(tok, PROMPTS[1])]), ("b", choices[1:]), ("a", [choices[4]])]
    sent = [eng.submit(eng.parse({"model": n, "prompt": p, "echo": True, "logprobs": 2, "max_tokens": 1,
                                  "temperature": 0}, False)) for n, p in plan]
    eng.start()
    for reqs, (name, _) in zip(sent, plan):
        for r in reqs:
            ref = _reference_logprobs(ckpt, paths[name], r.prompt + [0])  # row len(prompt) - 1: the token after it
            _scored(r.events.get(timeout=60), tok, r.prompt, ref, 2)
            nxt = int(ref[len(r.prompt) - 1].argmax())
            assert _end(r) == (tok.decode([nxt], skip_special_tokens=True), "stop" if nxt in eos else "length", 1)
    # one forward; each adapter's choices share their context, never another adapter's
    assert (eng.score_forwards, eng.score_rows, eng.batches) == (1, 9, 0)
    assert eng.score_tokens == _prefixes(choices[:3] + choices[4:]) + _prefixes(choices[1:]) + len(sent[1][0].prompt)

def test_a_prompt_whose_scoring_fails_fails_alone(setup):
    """A scoring forward that raises is run again a pack, then a prompt, at a time:
    only the requests of the prompt that fails get the error (here one of a context's
    choices), the others their logprobs."""
    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), tok, {"base": None})
    real = eng._score_forward
    choices = _choices(tok)
    prompts = choices[:3] + [prompt_ids(tok, PROMPTS[0])]
    tried = []

    def forward(group, asks):
        tried.append(sum(len(p.keys) for p in group))
        if any(list(q[0]) == choices[1] for p in group for q in p.keys):
            raise RuntimeError("out of memory")
        return real(group, asks)

    eng._score_forward = forward
    reqs = eng.submit(eng.parse({"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0}, False))
    eng.start()
    events = []
    while sum(e[0] in ("done", "error") for e in events) < len(reqs):
        events.append(reqs[0].events.get(timeout=60))
    assert [e for e in events if e[0] == "error"] == [("error", "RuntimeError: out of memory")]
    assert sorted(e[1] for e in events if e[0] == "done") == [0, 2, 3]
    assert tried == [4, 3, 1, 1, 1, 1]  # all, the choices' pack, each choice, the other prompt
    scored = {e[1]: e for e in events if e[0] == "prompt"}
    for i in (0, 2, 3):
        _scored(scored[i], tok, prompts[i], _reference_logprobs(ckpt, None, prompts[i]), 1)


@pytest.mark.parametrize("field, value, msg", [
    ("prompt", list(range(3, 33)), r"Request.prompt \(30 tokens\) and max_tokens \(5\) exceed the cache "
                                   r"\(--cache-len 32\): at most 32 tokens together"),
    ("max_tokens", 28, r"Request.prompt \(5 tokens\) and max_tokens \(28\) exceed the cache"),
    ("model", "nope", r"Request.model 'nope' is not served; the models are: base"),
    ("prompt", [], r"Request.prompt must be a non-empty list of token ids, got \[\]"),
    ("prompt", (3, 4), r"Request.prompt must be a non-empty list of token ids, got \(3, 4\)"),
    ("prompt", [3, 10 ** 6], r"Request.prompt: 1000000 is not a token id of this model \(an integer in 0 \.\. "),
    ("prompt", [3, True], r"Request.prompt: True is not a token id"),
    ("max_tokens", 0, r"Request.max_tokens must be an integer >= 1 \(0: with echo\), got 0"),
    ("max_tokens", 2.0, r"Request.max_tokens must be an integer >= 1"),
    ("sampling", (0.0, 1.0, 0), r"Request.sampling must be a flora.generation.Sampling, got \(0.0, 1.0, 0\)"),
    ("sampling", Sampling(-1.0), r"temperature must be a finite number >= 0"),
    ("sampling", Sampling(1.0, 0.0), r"top_p must be in \(0, 1\]"),
    ("sampling", Sampling(1.0, min_p=1.5), r"min_p must be a finite number in \[0, 1\], got 1.5"),
    ("sampling", Sampling(repetition_penalty=0.0), r"repetition_penalty must be a finite number > 0, got 0.0"),
    ("sampling", Sampling(logit_bias={97: 1.0}), r"logit_bias: 97 is not a token id of this model \(an integer "
                                                 r"in 0 \.\. 96\)"),
    ("seed", 2 ** 64, r"seed must be an integer in"),
    ("stop", ["x"], r"Request.stop must be a tuple of at most 16 non-empty strings"),
    ("stop", ("",), r"Request.stop must be a tuple"),
    ("logprobs", 21, r"Request.logprobs must be None or an integer in 0 \.\. 20, got 21"),
    ("echo", 5, r"Request.echo must be the prompt's text or None, got 5"),
])
def test_submit_refuses_a_hand_built_request_it_cannot_run(setup, field, value, msg):
    """A Request built by hand (not by parse) is checked as parse checks a body: one
    whose prompt and max_tokens exceed the cache never joined a batch and blocked the
    worker (every later request waited behind it). submit raises ValueError naming the
    problem and queues none of the request's choices; the worker goes on serving."""
    ckpt = setup[1]
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None},
                 cache_len=32).start()
    good = Request("base", [3, 4, 5, 6, 7], 5, Sampling())
    bad = Request(**{**vars(good), "events": queue.Queue(), field: value})
    with pytest.raises(ValueError, match=msg):
        eng.submit([good, bad])
    assert eng.queue.empty() and good.events.empty()
    eng.submit([good])  # the same, alone: served
    ids = _greedy_ids(ckpt, None, good.prompt, 5)
    assert _end(good) == (load_tokenizer(ckpt).decode(ids, skip_special_tokens=True),
                          "stop" if len(ids) < 5 else "length", len(ids))
    long = Request("base", list(range(3, 60)), 0, Sampling(), echo="")  # echo, max_tokens 0: the context (64)
    assert eng.submit([long]) == [long] and _end(long) == ("", "length", 0)
    with pytest.raises(ValueError, match=r"Request.prompt is 65 tokens; the model's context is 64"):
        eng.submit([Request("base", list(range(3, 68)), 0, Sampling(), echo="")])


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_before_them(setup, server, stream):
    _, ckpt, adapter = setup
    url, _ = server
    ref, _, _ = _reference(ckpt, adapter, PROMPTS[0], 12)
    words = ref.split()
    assert len(words) >= 4, ref
    stop = " " + words[2]  # where it first occurs in the greedy text
    want = ref[:ref.find(stop)]
    body = {"model": "ffba", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stop": ["zzz", stop],
            "stream": stream}
    status, raw = _post(url + "/v1/completions", body)
    assert status == 200, raw
    if stream:
        chunks = [json.loads(e[len("data: "):])["choices"][0] for e in raw.split("\n\n") if e and e != "data: [DONE]"]
        text, reason = "".join(c["text"] for c in chunks), chunks[-1]["finish_reason"]
    else:
        text, reason = json.loads(raw)["choices"][0]["text"], json.loads(raw)["choices"][0]["finish_reason"]
    assert (text, reason) == (want, "stop")


def test_seeded_sampling_repeats(server):
    url, _ = server
    body = {"model": "ffba", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0, "seed": 7}
    a, b = (json.loads(_post(url + "/v1/completions", body)[1])["choices"][0]["text"] for _ in range(2))
    c = {json.loads(_post(url + "/v1/completions", {**body, "seed": s})[1])["choices"][0]["text"] for s in range(8)}
    assert a == b and len(c) > 1


def test_requests_waiting_together_run_as_one_batch(setup):
    """Requests queued before the worker runs: the greedy ones of one model are one
    batch (each row its own max_tokens, equal to its prompt alone), another model's
    and a sampled one each their own."""
    _, ckpt, adapter = setup
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    model.load_adapter(str(adapter), name="ffba", activate=False)
    eng = Engine(model, load_tokenizer(ckpt), {"base": None, "ffba": "ffba"}, max_batch=8)
    reqs = [_submit(eng, {"model": "ffba", "prompt": p, "max_tokens": n, "temperature": 0})
            for p, n in zip(PROMPTS, (12, 5, 9))]
    other = _submit(eng, {"model": "base", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
    sampled = _submit(eng, {"model": "ffba", "prompt": PROMPTS[0], "max_tokens": 4})
    eng.start()
    for r, p, n in zip(reqs, PROMPTS, (12, 5, 9)):
        assert _end(r) == _reference(ckpt, adapter, p, n)
    assert _end(other) == _reference(ckpt, None, PROMPTS[0], 6)
    assert _end(sampled)[1] in ("stop", "length")
    assert eng.batches == 3


def test_a_batch_never_cuts_a_row_short_of_its_max_tokens(setup):
    """Rows share one cache of the longest prompt plus the longest answer: a short
    prompt with a long answer does not join a long prompt's batch past the context
    (it got only what the long prompt left, finish_reason "length")."""
    _, ckpt, _ = setup
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None})
    long = _submit(eng, {"prompt": "a b c d e f " * 6, "max_tokens": 3, "temperature": 0})
    short = _submit(eng, {"prompt": PROMPTS[2], "max_tokens": 50, "temperature": 0})
    assert len(long.prompt) + short.max_tokens > 64  # together past the tiny model's context
    eng.start()
    assert _end(long) == _reference(ckpt, None, "a b c d e f " * 6, 3)
    assert _end(short) == _reference(ckpt, None, PROMPTS[2], 50)
    assert eng.batches == 2


def test_a_finished_row_is_freed_and_no_step_runs_for_it(setup):
    """A row ended by a stop string, by its own max_tokens, or by its streaming
    client leaving is freed at once: the batch steps only while a row goes on."""
    _, ckpt, _ = setup
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None})
    ref, reason, _ = _reference(ckpt, None, PROMPTS[2], 50)
    assert reason == "length"  # no EOS: only the stop string ends the row
    stop = " " + ref.split()[2]
    short = _submit(eng, {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0})
    stopped = _submit(eng, {"prompt": PROMPTS[2], "max_tokens": 50, "temperature": 0, "stop": stop})
    eng.start()
    assert _end(short)[1] == "length"
    ev = _end(stopped)
    assert ev[:2] == (ref[:ref.find(stop)], "stop")
    left = Request("base", stopped.prompt, 50, Sampling(), stream=True)
    left.cancelled = True  # what the handler sets when the client's connection is gone
    eng.submit([left])
    _end(eng.submit([Request("base", [1], 1, Sampling())])[0])  # queued behind it: it is over
    # the first token of a row comes from its prefill, each next one from a step
    assert eng.steps == ev[2] - 1


def test_a_row_whose_client_leaves_mid_stream_is_not_stepped_again(setup):
    """A streaming client that leaves after its 3rd token (the handler sets cancelled when
    a write fails): its row is freed before the next step; it was stepped once more, for no one."""
    import queue

    _, ckpt, _ = setup
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None})
    req, = eng.parse({"prompt": PROMPTS[2], "max_tokens": 40, "temperature": 0, "stream": True}, False)

    class Leaves(queue.Queue):  # the client is gone once the 3rd delta is written
        def put(self, ev, *a, **k):
            super().put(ev, *a, **k)
            if self.qsize() == 3:
                req.cancelled = True

    req.events = Leaves()
    eng.submit([req])
    eng.start()
    deadline = time.monotonic() + 60
    while not (req.cancelled and eng._dec is None) and time.monotonic() < deadline:  # its batch is over
        time.sleep(0.01)
    assert req.events.qsize() == 3 and eng._dec is None
    assert eng.steps == 2  # the 1st token from the prefill, the 2nd and 3rd from steps


def test_a_failing_prefill_answers_its_requests_and_the_server_goes_on(setup, monkeypatch):
    from flora.generation import Decoder

    _, ckpt, _ = setup
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None}).start()
    real = Decoder.admit
    monkeypatch.setattr(Decoder, "admit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    bad = _submit(eng, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert bad.events.get(timeout=60) == ("error", "RuntimeError: out of memory")
    monkeypatch.setattr(Decoder, "admit", real)
    ok = _submit(eng, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert _end(ok) == _reference(ckpt, None, PROMPTS[0], 4)


def test_a_failing_prefill_of_a_long_group_fails_its_requests_only(setup, monkeypatch):
    """Requests joining together prefill in groups of like length, the shortest first: when the
    long group's prefill fails, its request gets the error, the short ones (admitted already)
    answer as alone, and the server goes on."""
    from flora.generation import Decoder

    _, ckpt, _ = setup
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None}, max_batch=4)
    real = Decoder.admit

    def admit(self, rows, prompts, *a, **k):
        if max(map(len, prompts)) > 40:
            raise RuntimeError("out of memory")
        return real(self, rows, prompts, *a, **k)

    monkeypatch.setattr(Decoder, "admit", admit)
    long = "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2
    reqs = [_submit(eng, {"prompt": p, "max_tokens": 4, "temperature": 0}) for p in (PROMPTS[0], long, PROMPTS[2])]
    assert len(reqs[1].prompt) > 40 >= max(len(reqs[0].prompt), len(reqs[2].prompt))
    eng.start()
    assert _end(reqs[1]) == ("error", "RuntimeError: out of memory")
    for r, p in ((reqs[0], PROMPTS[0]), (reqs[2], PROMPTS[2])):
        assert _end(r) == _reference(ckpt, None, p, 4)
    assert eng.batches == 1
    monkeypatch.setattr(Decoder, "admit", real)
    ok = _submit(eng, {"prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0})
    assert _end(ok) == _reference(ckpt, None, PROMPTS[1], 4)
    assert reqs[1].events.empty()  # answered once


def test_a_batch_that_cannot_start_answers_its_request_and_the_server_goes_on(setup, monkeypatch):
    """The batch's decoder cannot be made (its KV cache out of memory): the request gets
    the error (it was retried forever, the worker spinning), and the next one is served."""
    from flora.generation import Decoder

    _, ckpt, _ = setup
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None}).start()
    real = Decoder.__init__

    def oom(self, *a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Decoder, "__init__", oom)
    bad = _submit(eng, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert bad.events.get(timeout=10) == ("error", "RuntimeError: out of memory")
    monkeypatch.setattr(Decoder, "__init__", real)
    ok = _submit(eng, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert _end(ok) == _reference(ckpt, None, PROMPTS[0], 4)
    assert bad.events.empty()  # answered once, not run again


def _poisoned(setup, names, **kw):
    """(an Engine, its tokenizer) on the fixture's base whose embedding of "apple" is NaN:
    a prompt with that word gives NaN logits, keys and values."""
    _, ckpt, _ = setup
    model = FusedLlama.from_pretrained(str(ckpt))
    tok = load_tokenizer(ckpt)
    with torch.no_grad():
        model.embed[tok.convert_tokens_to_ids("apple")] = float("nan")
    return Engine(model, tok, names, **kw), tok


def test_a_row_that_cannot_sample_fails_alone(setup):
    """A sampled request whose logits are NaN (sampling raises) gets the error once; the
    greedy row it joined goes on to its end, and the next request is served (the error
    failed the whole batch and left the request waiting, admitted again without end)."""
    ckpt = setup[1]
    eng, tok = _poisoned(setup, {"base": None}, max_batch=4)
    good = _submit(eng, {"prompt": PROMPTS[2], "max_tokens": 20, "temperature": 0})
    bad = _submit(eng, {"prompt": "a apple", "max_tokens": 5, "temperature": 1.0})
    eng.start()
    assert _end(good) == _reference(ckpt, None, PROMPTS[2], 20)
    assert _end(bad)[0] == "error"
    assert eng.batches == 1  # they ran together
    ok = _submit(eng, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert _end(ok) == _reference(ckpt, None, PROMPTS[0], 4)
    assert bad.events.empty()  # answered once


def test_a_request_joins_the_running_batch(setup):
    """Continuous batching: a request that arrives while another generates joins the
    batch at the next step, and both give what each gives alone."""
    _, ckpt, adapter = setup
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None}).start()
    long_ref = _reference(ckpt, None, PROMPTS[2], 40)
    assert long_ref[1] == "length" and long_ref[2] == 40  # runs its 40 tokens
    # the worker waits at its 5th step until the short request is in (a loaded machine may
    # otherwise run the long one to its end first), and notes the step each one ends at
    gate, ended, step = threading.Event(), {}, eng._step
    eng._step = lambda: (eng.steps != 5 or gate.wait(60)) and step()

    def submit(body, name):
        reqs = eng.parse(body, False)
        put = reqs[0].events.put
        reqs[0].events.put = lambda ev: (ev[0] == "done" and ended.setdefault(name, eng.steps), put(ev))
        return eng.submit(reqs)[0]

    long = submit({"prompt": PROMPTS[2], "max_tokens": 40, "temperature": 0, "stream": True}, "long")
    for _ in range(5):  # it is generating
        assert long.events.get(timeout=60)[0] == "delta"
    short = submit({"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}, "short")
    gate.set()
    assert _end(short) == _reference(ckpt, None, PROMPTS[0], 4)
    assert _end(long) == long_ref
    assert ended["short"] <= 5 + 4 < ended["long"]  # it joined at once and did not wait for the long one
    assert eng.batches == 2


# A prompt longer than the running batch's slot joins it: the batch's next slot moves on to the
# prompt's end, the running rows skipping the slots between (Engine._admit, Decoder.advance)
def _mid_batch(eng, first, later, at):
    """``first`` (Requests, greedy, logprobs 0) queued before the worker starts (one batch),
    ``later`` queued by the worker itself before its step at+1 (deterministic: it joins after
    that step): {id(request): (its done event, the decode steps run when it ended)}."""
    ended, step = {}, eng._step
    for r in first + later:
        r.events.put = lambda ev, r=r, put=r.events.put: (ev[0] == "done" and ended.setdefault(id(r), eng.steps),
                                                          put(ev))
    eng._step = lambda: (eng.steps == at and eng.submit(later), step())[1]
    eng.submit(first)
    eng.start()
    got = {}
    for r in first + later:
        ev = r.events.get(timeout=60)
        assert ev[0] == "done", ev
        got[id(r)] = ev, ended[id(r)]
    return got


def _alone(model, tok, r, ev, device="cpu", tol=1e-4):
    """A greedy request's done event (with logprobs) against its model alone on ``device``:
    generate()'s tokens (text, finish reason, count), and each token's logprob that of a plain
    forward over the prompt and the answer (within ``tol``). The tokens it generated (its EOS too)."""
    row = model.generate(torch.tensor([r.prompt], device=device), max_new_tokens=r.max_tokens)[0, len(r.prompt):]
    row = row.tolist()
    eos = set(_eos_set(model.generation_eos_token_id))
    k = next((i for i, t in enumerate(row) if t in eos), None)
    row = row if k is None else row[:k + 1]
    assert ev[2:5] == (tok.decode([t for t in row if t not in eos], skip_special_tokens=True),
                       "length" if k is None else "stop", len(row))
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([r.prompt + row], device=device)).logits[0].float(), -1).cpu()
    assert [e[1] for e in ev[5]] == pytest.approx([float(lp[len(r.prompt) - 1 + i, t]) for i, t in enumerate(row)],
                                                  abs=tol)
    return row


def _runs_on(model, rng, n, m):
    """A random prompt of n tokens whose answer alone holds no EOS in m tokens (its row runs to
    its max_tokens: a test's step counts)."""
    eos = set(_eos_set(model.generation_eos_token_id))
    for _ in range(100):
        p = [rng.randrange(3, model.arch.vocab_size) for _ in range(n)]
        if not eos & set(model.generate(torch.tensor([p]), max_new_tokens=m)[0, n:].tolist()):
            return p
    raise AssertionError("no prompt runs on")


def _fresh_kv(model, ids):
    """The keys and values of ``ids`` prefilled alone [layers, 2, kv_heads, len, hd]."""
    from flora.generation import Decoder, inference_mode

    with inference_mode(model):
        dec = Decoder(model, 1, len(ids), False)
        dec.restart(len(ids))
        dec.admit([0], [ids], 0)
        return dec.kv(0, 0, len(ids))


@pytest.mark.parametrize("mixed", [False, True])
def test_a_prompt_longer_than_the_batchs_slot_joins_it(setup, tmp_path, mixed):
    """Two short prompts generate (the batch's slot past their prompts); a prompt longer than
    that slot arrives, and a short one behind it: both join at once (the slot moves on to the
    long prompt's end, the running rows skipping the slots between), the long one ends long
    before the first two (no wait for the batch to drain: the batch runs no step beyond
    theirs), and every row's tokens and logprobs equal its prompt's alone, the running rows'
    after their gap too (--mixed: each row its own adapter). A running row's kept prompt and
    answer hold the keys of its tokens, read around the gap: a fresh prefill's; the next turn
    that reuses them answers as alone."""
    import random

    from flora.prefix_cache import BLOCK

    tok, names, model, refs = _served_and_alone(setup, tmp_path, mixed)
    eng = Engine(model, tok, names, max_batch=4, mixed=mixed)
    rng = random.Random(3)
    ask = lambda name, n, m: Request(name, _runs_on(refs[name], rng, n, m), m, Sampling(), logprobs=0)  # noqa: E731
    first = [ask("base", 5, 28), ask("a" if mixed else "base", 3, 28)]
    later = [ask("b" if mixed else "base", 30, 10), ask("base", 4, 6)]
    # after the 5th step the slot is 5 + 5 and each short row has 22 tokens to go: 30 + 22 fit in 64
    got = _mid_batch(eng, first, later, at=4)
    rows = [_alone(refs[r.model], tok, r, got[id(r)][0]) for r in first + later]
    steps = [got[id(r)][1] for r in first + later]
    assert eng.batches == 2  # the first two, then the other two together
    assert steps == [27, 27, 5 + 9, 5 + 5]  # the later ones joined after the 5th step
    assert eng.steps == 27  # none beyond the first rows' own
    # the first row's prompt and answer (its last token not fed), kept: a fresh prefill's keys
    turn = first[0].prompt + rows[0][:-1]
    assert len(turn) >= 2 * BLOCK and len(first[0].prompt) + 5 < BLOCK  # its first block spans the gap
    kv, c = eng.prefix.lookup("base", turn + [3])
    assert c == len(turn) // BLOCK * BLOCK
    assert torch.allclose(torch.cat(kv, 3), _fresh_kv(refs["base"], turn)[:, :, :, :c], atol=1e-5)
    nxt = Request("base", turn + [rng.randrange(3, len(tok)) for _ in range(3)], 8, Sampling(), logprobs=0)
    eng.submit([nxt])
    ev = nxt.events.get(timeout=60)
    _alone(refs["base"], tok, nxt, ev)
    assert nxt.cached == c
    eng.close()


def test_a_jump_that_would_cut_a_running_row_short_waits(setup):
    """A prompt longer than the batch's slot whose jump would leave a running row too few
    slots for the rest of its max_tokens waits (until the running rows' rests fit after it),
    and so does a short request behind it that would fit now (arrival order: never
    overtaken); every answer as alone."""
    import random

    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    ref = FusedLlama.from_pretrained(str(ckpt)).eval()
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), tok, {"base": None}, max_batch=4)
    rng = random.Random(4)
    ask = lambda n, m: Request("base", _runs_on(ref, rng, n, m), m, Sampling(), logprobs=0)  # noqa: E731
    first = [ask(5, 40), ask(3, 40)]
    # after the 5th step the slot is 10 and each short row has 34 tokens to go: 35 + 34 > 64; after
    # the 10th, 29 to go: 35 + 29 fit in 64
    later = [ask(35, 4), ask(4, 4)]
    got = _mid_batch(eng, first, later, at=4)
    for r in first + later:
        _alone(ref, tok, r, got[id(r)][0])
    assert eng.batches == 2
    assert [got[id(r)][1] for r in first + later] == [39, 39, 10 + 3, 10 + 3]


@pytest.mark.parametrize("attention", ["kernel", "sdpa"])
def test_a_running_rows_skipped_slots_are_masked_zeros(setup, monkeypatch, attention):
    """The slots a running row skips when a long prompt joins held an earlier request's NaN
    keys (its prompt poisoned): they are masked for the row and zeros (with SDPA a masked NaN
    reached the row, 0 x NaN), and the row answers as alone."""
    import random

    from flora import ops

    if attention == "sdpa":
        monkeypatch.setattr(ops, "decode_attention", ops.grouped_sdpa)
    ckpt = setup[1]
    eng, tok = _poisoned(setup, {"base": None}, max_batch=2)
    ref = FusedLlama.from_pretrained(str(ckpt)).eval()
    poison = prompt_ids(tok, "apple " * 40)
    assert len(poison) > 30
    rng = random.Random(5)
    ask = lambda n, m: Request("base", _runs_on(ref, rng, n, m), m, Sampling(), logprobs=0)  # noqa: E731
    eng.start()
    bad, = eng.submit([Request("base", poison, 2, Sampling())])  # row 0: NaN keys in its slots
    assert bad.events.get(timeout=60)[0] in ("done", "error")
    assert not bool(eng._decoders[None].cache.k[0][0, :, :30].isfinite().all())
    eng.close()
    eng._worker.join(30)
    eng2 = Engine(eng.model, tok, {"base": None}, max_batch=2)
    eng2._decoders = eng._decoders  # the same cache, its NaN still there
    seen = []
    step = eng2._step

    def check():  # the step after the jump: row 0's slots [10, 30) (its last at 9) masked, zeros
        dec = eng2._dec
        if dec.t == 30:
            seen.append(bool(dec.mask[0, 0, 0, 10:30].eq(float("-inf")).all())
                        and all(bool(k[0, :, 10:30].eq(0).all()) for k in dec.cache.k + dec.cache.v))
        step()

    eng2._step = check
    first, later = [ask(5, 20)], [ask(30, 4)]
    got = _mid_batch(eng2, first, later, at=4)
    for r in first + later:
        _alone(ref, tok, r, got[id(r)][0])
    assert seen == [True]


def _partitions(xs):
    """Every split of the list ``xs`` into groups."""
    if not xs:
        yield []
        return
    for p in _partitions(xs[1:]):
        yield [[xs[0]]] + p
        for i in range(len(p)):
            yield p[:i] + [[xs[0]] + p[i]] + p[i + 1:]


def _split_cost(groups, need, fixed):
    """(padded tokens computed plus ``fixed`` a forward, forwards) of prefilling ``groups`` (of
    distinct prompts, by their spans ``need``), a forward each."""
    return sum(fixed + len(g) * max(need[u] for u in g) for g in groups), len(groups)


def test_admit_groups_is_the_cheapest_split():
    """generation.admit_groups against every split of the distinct prompts (by brute force): the
    least tokens computed, a forward counted as ADMIT_FORWARD_TOKENS (then the fewest forwards);
    equal prompts (equal keys) in one group, every row once, the groups shortest first; the rows'
    spans are their lengths less their reused prefixes."""
    import random

    from flora.generation import ADMIT_FORWARD_TOKENS, admit_forward_tokens, admit_groups, admit_span

    rng = random.Random(0)
    assert admit_groups([[5] * 20, [6] * 600]) == [[0], [1]]  # a chat beside a document: apart
    assert admit_groups([[5] * 20, [6] * 24]) == [[0, 1]]  # 4 padded tokens: less than a forward
    for _ in range(300):
        n = rng.randint(1, 8)
        prompts = [[rng.randrange(3)] * rng.randint(1, 80) for _ in range(n)]  # equal ones now and then
        reused = [None if rng.random() < 0.6 else (None, rng.randrange(len(p))) for p in prompts]
        for i in range(n):  # an equal prompt finds what the other found kept
            reused[i] = reused[prompts.index(prompts[i])]
        keys = [(tuple(p), rng.randrange(2) if rng.random() < 0.3 else 0) for p in prompts]
        groups = admit_groups(prompts, reused, keys)
        assert sorted(i for g in groups for i in g) == list(range(n)) and all(g == sorted(g) for g in groups)
        assert all(len({gi for gi, g in enumerate(groups) for i in g if keys[i] == k}) == 1 for k in keys)
        units = sorted(set(keys), key=keys.index)
        need = {k: len(k[0]) - (reused[keys.index(k)][1] if reused[keys.index(k)] else 0) for k in units}
        spans = [admit_span([prompts[i] for i in g], [reused[i] for i in g]) for g in groups]
        assert spans == sorted(spans)
        f = rng.choice([ADMIT_FORWARD_TOKENS, 1, 40, 512])  # a device's forward cost (admit_forward_tokens)
        groups = admit_groups(prompts, reused, keys, forward_tokens=f) if f != ADMIT_FORWARD_TOKENS else groups
        got = _split_cost([sorted({keys[i] for i in g}) for g in groups], need, f)
        assert got == min(_split_cost(p, need, f) for p in _partitions(units))
    # a GPU's forward costs more tokens' work: a chat beside a 200-token prompt prefills with it there
    assert admit_groups([[5] * 20, [6] * 200]) == [[0], [1]]
    assert admit_groups([[5] * 20, [6] * 200], forward_tokens=admit_forward_tokens("cuda")) == [[0, 1]]
    assert admit_forward_tokens("cpu") == ADMIT_FORWARD_TOKENS == admit_forward_tokens("meta")


def test_admit_cost_fits_a_forward_and_its_tokens():
    """bench/admit_cost.py: its fit (flora.forward_cost.robust_line, the engine's) recovers a line
    exactly from every repeat's timing, a slow repeat trimmed; on the CPU a tiny model's
    Decoder.admit is timed at each length."""
    from _bench_scripts import load_bench_script

    ac = load_bench_script("admit_cost")
    a, b, kept = ac.fit({1: [0.0102, 0.0102], 8: [0.0116, 0.0348, 0.0116], 64: [0.0228]})  # 10 ms + 0.2 ms a token
    assert abs(a - 0.010) < 1e-9 and abs(b - 0.0002) < 1e-12 and kept == 5  # (8 tokens' 34.8 ms: a stall)
    m, _ = ac.load("tiny", torch.float32, torch.device("cpu"))
    times = ac.admit_times(m, [1, 4, 16], repeats=2)
    assert sorted(times) == [1, 4, 16] and all(len(ts) == 2 and min(ts) > 0 for ts in times.values())


def counted_prefills(model) -> list:
    """The model's prefills of rows joining a batch from now on, each (its rows, tokens a
    row), as the engine calls run_layers (a real call log, the calls themselves unchanged)."""
    calls, run = [], model.run_layers

    def counted(ids, *a, cache=None, **kw):
        if getattr(cache, "prefill_rows", None) is not None:
            calls.append((cache.prefill_rows.tolist(), ids.shape[1]))
        return run(ids, *a, cache=cache, **kw)

    model.run_layers = counted
    return calls


@pytest.mark.parametrize("mixed", [False, True])
def test_prompts_of_very_different_lengths_join_in_groups_of_like_length(setup, tmp_path, mixed):
    """Requests joining a batch together (one admit), their prompts 3 to 50 tokens: they prefill
    in groups of like length, a forward each (counted: the model's own run_layers calls, each
    one's rows and tokens a row), the split that computes least (checked against every split),
    shortest first; each answer's tokens and logprobs are its prompt's alone (--mixed: each row
    its own adapter), an equal prompt is computed once (its row a copy), and cached_tokens counts
    what the request's own group did not compute: a prompt whose prefix is kept computes only
    what its group's longest needs (beside the 50-token prompts in one forward: all of it)."""
    import random

    from flora.generation import ADMIT_FORWARD_TOKENS
    from flora.prefix_cache import BLOCK

    tok, names, model, refs = _served_and_alone(setup, tmp_path, mixed)
    calls = counted_prefills(model)
    # wait_s: the burst, queued at once, is one admit however the worker is scheduled
    eng = Engine(model, tok, names, max_batch=8, mixed=mixed, wait_s=0.5, admit_cost=ADMIT_FORWARD_TOKENS).start()
    rng = random.Random(6)
    rand = lambda n: [rng.randrange(3, model.arch.vocab_size) for _ in range(n)]  # noqa: E731
    kept = Request("base", rand(40), 6, Sampling(), logprobs=0)
    eng.submit([kept])
    _alone(refs["base"], tok, kept, _end_event(kept))
    while eng.busy:  # its prompt and answer kept, the batch drained
        time.sleep(0.01)
    short, long = rand(3), rand(50)
    plan = [("base", kept.prompt + rand(5)), ("base", short), ("a" if mixed else "base", rand(4)),
            ("base", long), ("base", rand(20)), ("b" if mixed else "base", rand(48)), ("base", long),
            ("a" if mixed else "base", short)]
    reqs = [Request(m, p, 6, Sampling(), logprobs=0) for m, p in plan]
    c = eng.prefix.lookup("base", plan[0][1])[1]
    assert c == 2 * BLOCK  # its first 32 tokens kept
    calls.clear()
    eng.submit(reqs)
    for r in reqs:
        _alone(refs[r.model], tok, r, _end_event(r))
    assert eng.batches == 2  # the burst joined in one admit
    # a fresh batch: request j in row j; equal prompts of one model are one distinct prompt
    keys = [(tuple(r.prompt), r.model if mixed else None) for r in reqs]
    units = sorted(set(keys), key=keys.index)
    need = {k: len(k[0]) - (c if k == keys[0] else 0) for k in units}
    groups = [[keys[j] for j in rows] for rows, _ in calls]
    assert sorted(k for g in groups for k in g) == sorted(units)  # each computed once, by one forward
    assert [w for _, w in calls] == [max(need[k] for k in g) for g in groups] == sorted(w for _, w in calls)
    best = min(_split_cost(p, need, ADMIT_FORWARD_TOKENS) for p in _partitions(units))
    assert _split_cost(groups, need, ADMIT_FORWARD_TOKENS) == best and best[1] > 1
    width = {j: w for rows, w in calls for j in rows}
    assert sum(len(g) * w for g, (_, w) in zip(groups, calls)) < len(units) * 50  # one forward: each 50
    cached = [len(r.prompt) if j not in width else max(0, len(r.prompt) - width[j]) if j == 0 else 0
              for j, r in enumerate(reqs)]
    assert [r.cached for r in reqs] == cached
    assert cached[6] == 50 and (cached[7] == 3) != mixed and 0 < cached[0] <= c  # (one forward: 0)
    eng.close()


def _end_event(r, timeout=60):
    """A request's done event (its logprobs with it)."""
    ev = r.events.get(timeout=timeout)
    assert ev[0] == "done", ev
    return ev


def test_requests_arriving_a_moment_apart_share_a_batch(setup):
    import time

    _, ckpt, adapter = setup
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    eng = Engine(model, load_tokenizer(ckpt), {"base": None}, wait_s=0.5).start()
    reqs = []
    for p in PROMPTS[:2]:
        reqs.append(_submit(eng, {"prompt": p, "max_tokens": 6, "temperature": 0}))
        time.sleep(0.02)
    for r, p in zip(reqs, PROMPTS):
        assert _end(r) == _reference(ckpt, None, p, 6)
    assert eng.batches == 1


def test_mixed_batches_take_every_adapter_and_the_base(setup, tmp_path):
    """--mixed: the adapters side by side, requests for any of them (and the base)
    in one batch, each row equal to its own model alone."""
    _, ckpt, adapter = setup
    model = _two_adapters(ckpt, adapter, tmp_path)
    eng = Engine(model, load_tokenizer(ckpt), {"base": None, "a": "a", "b": "b"}, mixed=True)
    plan = [("a", adapter, PROMPTS[0]), ("base", None, PROMPTS[1]), ("b", tmp_path / "second", PROMPTS[2]),
            ("a", adapter, PROMPTS[2]), ("b", tmp_path / "second", PROMPTS[0])]
    reqs = [_submit(eng, {"model": n, "prompt": p, "max_tokens": 8, "temperature": 0})
            for n, _, p in plan]
    eng.start()
    for r, (_, path, p) in zip(reqs, plan):
        assert _end(r) == _reference(ckpt, path, p, 8)
    assert eng.batches == 1


@pytest.mark.parametrize("path, body, status, msg", [
    ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model 'nope' is not served; the models are: base, ffba"),
    ("/v1/completions", {"model": ["base"], "prompt": "a"}, 404, "model ['base'] is not served"),
    ("/v1/completions", {"model": "base"}, 400, "'prompt' must be a non-empty string"),
    ("/v1/completions", {"model": "base", "prompt": ["a", ""]}, 400, "'prompt[1]' must be a non-empty string or list"),
    ("/v1/completions", {"model": "base", "prompt": []}, 400, "'prompt' must be a non-empty string, a list of token"),
    ("/v1/completions", {"model": "base", "prompt": [5, 99999]}, 400,
     "'prompt': 99999 is not a token id of this model (an integer in 0 .. "),
    ("/v1/completions", {"model": "base", "prompt": [[5], [5, -1]]}, 400, "'prompt[1]': -1 is not a token id"),
    ("/v1/completions", {"model": "base", "prompt": [[5, True]]}, 400, "'prompt[0]': True is not a token id"),
    ("/v1/completions", {"model": "base", "prompt": ["a b", "a " * 80]}, 400, "'prompt[1]' is 81 tokens"),
    ("/v1/completions", {"model": "base", "prompt": "a", "n": 0}, 400, "'n' must be an integer >= 1 and <= 128"),
    ("/v1/completions", {"model": "base", "prompt": "a", "n": 2, "best_of": 3}, 400, "'best_of' must equal 'n' (2)"),
    ("/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 0}, 400, "'max_tokens' must be an integer >= 1"),
    ("/v1/completions", {"model": "base", "prompt": "a", "top_p": 0}, 400, "'top_p' must be a number > 0"),
    ("/v1/completions", {"model": "base", "prompt": "a", "temperature": -1}, 400, "'temperature'"),
    ("/v1/completions", {"model": "base", "prompt": "a", "stop": [""]}, 400, "'stop' must be a non-empty string"),
    ("/v1/completions", {"model": "base", "prompt": "a", "stop": list("abcdefghijklmnopq")}, 400,
     "a list of at most 16"),
    ("/v1/completions", {"model": "base", "prompt": "a", "logprobs": 21}, 400,
     "'logprobs' must be an integer >= 0 and <= 20, got 21"),
    ("/v1/completions", {"model": "base", "prompt": "a", "logprobs": True}, 400, "'logprobs' must be an integer"),
    ("/v1/completions", {"model": "base", "prompt": "a", "top_logprobs": 2}, 400, "not supported: top_logprobs"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "echo": True}, 400,
     "not supported: echo"),
    ("/v1/completions", {"model": "base", "prompt": "a", "echo": "yes"}, 400, "'echo' must be true or false"),
    ("/v1/completions", {"model": "base", "prompt": "a " * 80, "echo": True, "max_tokens": 0}, 400,
     "the prompt is 81 tokens; the model's context is 64"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "logprobs": 3}, 400,
     "'logprobs' must be true or false"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
     400, "'top_logprobs' needs 'logprobs': true"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "'top_logprobs' must be an integer >= 0 and <= 20"),
    ("/v1/completions", {"model": "base", "prompt": "a", "seed": 2 ** 64}, 400,
     "'seed' must be an integer in [-2**63, 2**64 - 1], got 18446744073709551616"),
    ("/v1/completions", {"model": "base", "prompt": "a", "seed": 1.5}, 400, "'seed' must be an integer"),
    ("/v1/completions", {"model": "base", "prompt": "a " * 80}, 400, "the model's context is 64"),
    ("/v1/chat/completions", {"model": "base", "messages": "hi"}, 400, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/embeddings", {"model": "base"}, 404, "no such endpoint"),
])
def test_bad_requests_get_an_error_object(server, path, body, status, msg):
    url, _ = server
    got, raw = _post(url + path, body)
    err = json.loads(raw)["error"]
    assert got == status and err["code"] == status and msg in err["message"]


def test_bad_json_and_defaults_that_ask_for_nothing(server):
    url, _ = server
    got, raw = _post(url + "/v1/completions", None, raw=b"{not json")
    assert got == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
    # what OpenAI's client sends by default is accepted
    got, raw = _post(url + "/v1/completions", {"model": "base", "prompt": "a", "n": 1, "stop": None, "logprobs": None,
                                               "echo": False, "presence_penalty": 0, "max_tokens": 2})
    assert got == 200, raw


def test_bodies_that_are_not_read_whole_are_refused_and_close_the_connection(setup, monkeypatch):
    """A Content-Length past the body (the read would wait forever), negative, not a
    number, too large, or a chunked body: a 4xx error object, and the connection
    closes (what is left of the body would be read as the next request); so does a
    POST to no endpoint."""
    import socket

    import flora.serve as fs

    _, ckpt, _ = setup
    monkeypatch.setattr(fs, "IO_TIMEOUT_S", 0.5, raising=False)
    srv = serve(Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None}), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    body = b'{"prompt": "a b", "max_tokens": 2, "temperature": 0}'
    nxt = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    def send(head, data):
        with socket.create_connection(srv.server_address[:2], timeout=30) as s:
            s.sendall(head + b"\r\n\r\n" + data)
            out = b""
            while chunk := s.recv(65536):  # until the server closes the connection
                out += chunk
        return out.decode()

    try:
        for head, data, status, msg in [
            (b"Content-Length: 100", body, 400, "the request body ended before its Content-Length (100 bytes)"),
            (b"Content-Length: -1", body + nxt, 400, "must be a byte count, got '-1'"),
            (b"Content-Length: abc", body + nxt, 400, "must be a byte count, got 'abc'"),
            (b"Content-Length: 1000000000", body + nxt, 413, "the request body is 1000000000 bytes"),
            (b"Transfer-Encoding: chunked", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) + nxt, 411, "chunked"),
        ]:
            out = send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head, data)
            assert out.startswith(f"HTTP/1.1 {status} ") and out.count("HTTP/1.1") == 1, out
            assert "Connection: close" in out and msg in json.loads(out.split("\r\n\r\n", 1)[1])["error"]["message"]
        out = send(b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d" % len(body), body + nxt)
        assert out.startswith("HTTP/1.1 404 ") and out.count("HTTP/1.1") == 1 and "Connection: close" in out, out
        assert _post(f"http://127.0.0.1:{srv.server_address[1]}/v1/completions", json.loads(body))[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_burst_of_clients_is_not_reset(server):
    """Clients connecting at one moment wait to be accepted (socketserver's
    backlog of 5 reset about a third of 100)."""
    import socket

    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    errors, go = [], threading.Barrier(128)

    def client():
        go.wait()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert s.recv(64).startswith(b"HTTP/1.1 200")
        except Exception as e:  # noqa: BLE001 - counted
            errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(128)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_a_template_that_rejects_the_conversation_is_a_bad_request(setup):
    from flora.serve import BadRequest

    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)), tok, {"base": None})
    with pytest.raises(BadRequest, match="the chat template rejects this conversation: roles must alternate"):
        eng.parse({"messages": [{"role": "user", "content": "a"}]}, True)


def test_default_max_tokens(setup):
    _, ckpt, _ = setup
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)), load_tokenizer(ckpt), {"base": None}, max_tokens=5)
    chat = {"messages": [{"role": "user", "content": "a"}]}
    assert eng.parse(chat, True)[0].max_tokens == 5  # --max-tokens, not the whole context
    assert eng.parse({**chat, "max_completion_tokens": 7}, True)[0].max_tokens == 7
    assert eng.parse({"prompt": "a"}, False)[0].max_tokens == 16  # OpenAI's completions default
    assert eng.parse({"prompt": "a", "max_tokens": 500}, False)[0].max_tokens == 64 - 2  # capped at the context
    small = Engine(FusedLlama.from_pretrained(str(ckpt)), load_tokenizer(ckpt), {"base": None}, cache_len=20)
    assert small.parse({"prompt": "a", "max_tokens": 500}, False)[0].max_tokens == 20 - 2  # capped at the cache
    with pytest.raises(Exception, match=r"the prompt is 25 tokens; the model's cache \(--cache-len\) is 20"):
        small.parse({"prompt": "a " * 24}, False)


def test_chat_without_a_template_is_refused(setup):
    plain = setup[0] / "plain-ckpt"  # the checkpoint before its tokenizer got a chat template
    eng = Engine(FusedLlama.from_pretrained(str(plain)), load_tokenizer(plain), {"base": None})
    with pytest.raises(Exception, match="no chat template; use /v1/completions"):
        eng.parse({"messages": [{"role": "user", "content": "a"}]}, True)


def test_an_api_key_guards_v1(setup):
    _, ckpt, _ = setup
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None})
    srv = serve(eng, port=0, api_key="s3cret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        body = json.dumps({"prompt": "a", "max_tokens": 2, "temperature": 0}).encode()
        for auth, want in ((None, 401), ("Bearer wrong", 401), ("s3cret", 401), ("Bearer s3cret", 200)):
            req = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={} if auth is None else {"Authorization": auth})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    got = r.status
            except urllib.error.HTTPError as e:
                got = e.code
                assert json.loads(e.read())["error"]["type"] == "invalid_api_key"
            assert got == want, auth
        with urllib.request.urlopen(url + "/health", timeout=30) as r:  # outside /v1/: open
            assert r.status == 200
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("extra, msg", [
    (["--adapter", "x"], "expected NAME=DIR"),
    (["--adapter", "base=/tmp"], "the model name 'base' is taken"),
    (["--adapter", "a=/nonexistent"], "is not a directory"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--cache-len", "1"], "--cache-len"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
    (["--port", "70000"], "--port"),
])
def test_cli_bad_arguments_are_one_line(setup, capsys, extra, msg):
    _, ckpt, _ = setup
    assert main(["serve", "--model", str(ckpt), "--device", "cpu"] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora serve: error:") and msg in err and "\n" not in err


def test_cli_serves_until_ctrl_c(setup):
    _, ckpt, adapter = setup
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-m", "flora", "serve", "--model", str(ckpt), "--adapter",
                          f"mine={adapter}", "--port", "0", "--device", "cpu"],
                         stderr=subprocess.PIPE, text=True, env=env,
                         # Ctrl-C's default even where this test runs with SIGINT ignored (nohup, a
                         # background job): Python then installs its KeyboardInterrupt handler
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stderr.readline()
        assert line.startswith("flora serve: http://"), line
        url = line.split()[2].removesuffix("/v1")
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["base", "mine"]
        status, body = _post(url + "/v1/completions", {"model": "mine", "prompt": PROMPTS[0], "max_tokens": 6,
                                                       "temperature": 0})
        assert status == 200 and json.loads(body)["choices"][0]["text"] == _reference(ckpt, adapter, PROMPTS[0], 6)[0]
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
        assert p.stderr.read().strip() == "flora serve: stopped"
    finally:
        p.kill()


def test_bench_serve_runs(setup, tmp_path, capsys):
    from _bench_scripts import load_bench_script

    _, ckpt, _ = setup
    load_bench_script("serve").main(["--model", str(ckpt), "--clients", "1", "3", "--requests", "2",
                                     "--max-tokens", "3", "--json", str(tmp_path / "s.json")])
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["requests"] for r in rows] == [2, 6] and all(r["tokens"] > 0 for r in rows)
    assert "| 3 | 6 |" in capsys.readouterr().out
    load_bench_script("serve").main(["--model", str(ckpt), "--conversation", "2", "--rounds", "1", "--system",
                                     " ".join("abcdefghijklmnopqrst"), "--max-tokens", "2",
                                     "--json", str(tmp_path / "p.json")])
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["turn"] for r in rows] == [1, 2] and rows[0]["cached_tokens"] == 0 < rows[1]["cached_tokens"]
    assert all(r["same_answer"] for r in rows)
    load_bench_script("serve").main(["--model", str(ckpt), "--conversations", "3", "--conversation", "2", "--system",
                                     " ".join("abcdefghijklmnopqrst"), "--max-tokens", "2",
                                     "--json", str(tmp_path / "c.json")])
    r = json.loads((tmp_path / "c.json").read_text())
    assert r["requests"] == 6 and 0 < r["cached_tokens"] < r["prompt_tokens"] and r["requests_reused"] >= 3
    assert 0 < r["held_end"] <= r["held_peak"] <= r["capacity"] == 8192
    bench = load_bench_script("serve")
    bench.SCORING_WORDS = 20  # the tiny model's context is 64 tokens (a word of the text a token here)
    for distinct in (False, True):
        bench.main(["--model", str(ckpt), "--scoring", "1", "--clients", "2", "--scoring-prompts", "3",
                    "--json", str(tmp_path / "l.json")] + ["--scoring-distinct"] * distinct)
        row, = json.loads((tmp_path / "l.json").read_text())["rows"]
        assert row["prompts"] == 6 and row["prompts_per_s"] > 0
        assert 3 <= row["prompts_per_forward"] <= 6  # a request's prompts in one forward at least
        # the 20-token context a request's prompts share: computed once; distinct ones, all
        assert row["computed_share"] == 1.0 if distinct else row["computed_share"] < 0.6
    # each question's first choice scored before the run: its choices, one a request, find the context kept
    share = []
    for warm in (False, True):
        bench.main(["--model", str(ckpt), "--scoring", "1", "--clients", "2", "--scoring-prompts", "3",
                    "--scoring-split", "--scoring-words", "24", "--json", str(tmp_path / "w.json")]
                   + ["--scoring-warm"] * warm)
        row, = json.loads((tmp_path / "w.json").read_text())["rows"]
        assert row["prompts"] == 6
        share.append(row["computed_share"])
    assert share[1] < share[0] < 1
    bench.main(["--model", str(ckpt), "--long-prompt", "30", "--clients", "2", "--requests", "2", "--max-tokens", "3",
                "--long-after", "0.05", "--long-max-tokens", "2", "--json", str(tmp_path / "long.json")])
    r = json.loads((tmp_path / "long.json").read_text())
    assert r["long_prompt_tokens"] == 30 and 0 < r["long_ttft_s"] <= r["long_latency_s"] < r["seconds"]
    for plain in (False, True):  # short requests and a long one at once: one join
        bench.main(["--model", str(ckpt), "--burst", "30", "--clients", "2", "--rounds", "1", "--max-tokens", "3",
                    "--long-max-tokens", "2", "--json", str(tmp_path / "burst.json")] + ["--burst-plain"] * plain)
        r = json.loads((tmp_path / "burst.json").read_text())
        assert r["admits"] == [1] and r["long_prompt_tokens"] == 30
        assert 0 < r["short_ttft_p50_s"] <= r["short_ttft_max_s"] < r["seconds"] and 0 < r["long_ttft_s"] < r["seconds"]


def test_streaming_holds_back_what_may_start_a_stop_string():
    """A row's deltas never show a stop string's first characters before it is
    known whether the stop string follows (a fake engine: one character a token)."""
    from types import SimpleNamespace

    from flora.serve import Request, _Row

    eng = SimpleNamespace(eos={0}, tok_eos=0, metrics=ServeMetrics(), text=lambda ids: "".join(chr(i) for i in ids))
    for chars, n, stop, want, reason in [("xyabz", 9, ("abc",), "xyabz", "stop"),  # ended by the EOS
                                         ("xyabcz", 9, ("abc", "q"), "xy", "stop"),
                                         ("xy", 9, ("yz",), "xy", "stop"),
                                         ("xyab", 4, ("abc",), "xyab", "length")]:  # held back, then out
        req = Request("m", [1], max_tokens=n, sampling=Sampling(), stream=True, stop=stop)
        row = _Row(req, 0)
        for c in chars:
            row.add(ord(c), eng)
        row.add(0, eng)  # an EOS ends a row that is still going
        events = []
        while not req.events.empty():
            events.append(req.events.get())
        deltas = [e[2] for e in events if e[0] == "delta"]
        assert events[-1][2:4] == (want, reason) and "".join(deltas) == want
        seen = ""
        for d in deltas:  # no delta ends inside a possible stop string
            seen += d
            assert not any(seen.endswith(s[:k]) for s in stop for k in range(1, len(s))) or seen == want


def test_a_non_streaming_client_that_hangs_up_cancels_its_row(setup, monkeypatch):
    """The handler of a non-streaming request notices its client hang up while the
    answer is generated, and the row stops (it generated on to its max_tokens)."""
    import socket

    from flora.generation import Decoder

    _, ckpt, _ = setup
    real = Decoder.step

    def slow(self, *a, **k):  # 50 steps take seconds: time for the client to leave
        time.sleep(0.05)
        return real(self, *a, **k)

    monkeypatch.setattr(Decoder, "step", slow)
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), load_tokenizer(ckpt), {"base": None})
    srv = serve(eng, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        body = json.dumps({"prompt": PROMPTS[2], "max_tokens": 50, "temperature": 0}).encode()
        s = socket.create_connection(("127.0.0.1", srv.server_address[1]))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while eng.steps < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        s.close()
        deadline = time.monotonic() + 30
        while any(eng._slots):  # the row is freed: cancelled, not run to its 50 tokens
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert eng.steps < 40
        status, raw = _post(f"http://127.0.0.1:{srv.server_address[1]}/v1/completions",
                            {"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0})
        assert status == 200
    finally:
        srv.shutdown()
        srv.server_close()


# ------------------------------------------------------------------ prefix cache
def _kv(tokens):
    """A read(a, n) of PrefixCache.insert: stands for keys/values [layers, 2, kv_heads, n - a, hd], the token
    ids as values."""
    return lambda a, n: torch.tensor(tokens[a:n], dtype=torch.float32).view(1, 1, 1, n - a, 1).expand(2, 2, 1, -1, 1)


def _ids(kv, n):
    """The first n token ids a lookup's keys/values (a list of blocks) hold."""
    from flora.generation import kv_slots

    return kv_slots(kv, n)[0, 0, 0, :n, 0].tolist()


def _check_prefix_cache(pc):
    """The block tree's invariants: tokens counted once a block, within the capacity; each block's parent
    kept and knowing it; every block before its ancestors in LRU order (the first a leaf)."""
    from flora.prefix_cache import BLOCK

    blocks = list(pc._blocks.values())
    assert pc.tokens == BLOCK * len(blocks) <= pc.capacity
    at = {id(b): j for j, b in enumerate(blocks)}
    for j, b in enumerate(blocks):
        assert pc._blocks[b.key] is b and len(b.tokens) == BLOCK and b.kv.shape[3] == BLOCK
        assert all(c.parent is b and at[id(c)] < j for c in b.children.values())
        if b.parent is not None:
            assert b.parent.children[b.key] is b and at[id(b.parent)] > j
    assert not blocks or not blocks[0].children


def test_prefix_cache_keeps_whole_blocks_per_model():
    """PrefixCache: the longest kept prefix in whole blocks, one token always left
    to compute, never another model's; a prompt that extends a kept one adds only
    its new blocks."""
    from flora.prefix_cache import BLOCK, PrefixCache

    a = list(range(100, 100 + 3 * BLOCK + 5))
    pc = PrefixCache(capacity=8 * BLOCK)
    assert pc.lookup("m", a) is None
    pc.insert("m", a, _kv(a))
    assert pc.tokens == 3 * BLOCK
    got, n = pc.lookup("m", a)
    assert n == 3 * BLOCK and len(got) == 3 and _ids(got, n) == a[:n]
    assert pc.lookup("m", a[:3 * BLOCK])[1] == 2 * BLOCK  # its last token is computed
    assert pc.lookup("other", a) is None
    b = a[:BLOCK + 3] + [7] * (2 * BLOCK)
    assert pc.lookup("m", b)[1] == BLOCK  # diverges in the second block
    assert pc.hits == 3 and pc.reused == 6 * BLOCK
    calls = []
    pc.insert("m", a[:2 * BLOCK], lambda *x: calls.append(x))  # kept already
    longer = a + [9] * BLOCK
    pc.insert("m", longer, lambda *x: calls.append(x) or _kv(longer)(*x))  # reads only its new block
    assert calls == [(3 * BLOCK, 4 * BLOCK)] and pc.tokens == 4 * BLOCK
    assert _ids(pc.lookup("m", longer + [1])[0], 4 * BLOCK) == longer[:4 * BLOCK]
    pc.insert("o", a, _kv(a))
    assert pc.tokens == 7 * BLOCK and pc.lookup("o", a)[1] == 3 * BLOCK
    _check_prefix_cache(pc)
    # longer than the whole cache: its first blocks, as many as it holds (a start later prompts may share),
    # the least recently used leaves going for them
    small = PrefixCache(capacity=2 * BLOCK + 5)
    y = list(range(500, 500 + BLOCK)) + [1]
    small.insert("m", y, _kv(y))
    calls.clear()
    small.insert("m", a, lambda *x: calls.append(x) or _kv(a)(*x))
    assert calls == [(0, 2 * BLOCK)] and small.tokens == 2 * BLOCK and small.lookup("m", y) is None
    assert _ids(*small.lookup("m", a)) == a[:2 * BLOCK]
    calls.clear()
    small.insert("m", a[:BLOCK] + y, lambda *x: calls.append(x) or _kv(a[:BLOCK] + y)(*x))  # its first block kept
    assert calls == [(BLOCK, 2 * BLOCK)] and small.lookup("m", a)[1] == BLOCK  # a's second block (a leaf) went
    assert small.lookup("m", a[:BLOCK] + y)[1] == 2 * BLOCK
    _check_prefix_cache(small)


def test_prefix_cache_shares_blocks_and_evicts_leaves_first():
    """Prompts under one system prompt (siblings) hold its blocks once: the capacity
    counts distinct blocks. Beyond it the least recently used block that no kept
    block extends goes first (a lookup uses a block and its ancestors), so a shared
    parent outlives its children; a prompt whose parent went finds the blocks before
    it, and keeps its own again."""
    from flora.prefix_cache import BLOCK, PrefixCache

    system = list(range(1000, 1000 + 4 * BLOCK))
    rows = [system + [j] * (2 * BLOCK) + [0] for j in range(6)]
    pc = PrefixCache(capacity=16 * BLOCK)
    reads = []
    for r in rows:
        pc.insert("m", r, lambda a, n, r=r: reads.append(n - a) or _kv(r)(a, n))
    assert reads == [6 * BLOCK] + [2 * BLOCK] * 5  # the system prompt read once
    assert pc.tokens == 16 * BLOCK  # 4 + 6 x 2 blocks; 6 copies would be 36
    for r in rows:
        kv, n = pc.lookup("m", r)
        assert n == 6 * BLOCK and _ids(kv, n) == r[:n]
        assert kv[0] is pc.lookup("m", rows[0])[0][0]  # one tensor for the shared block
    _check_prefix_cache(pc)
    # rows 0 .. 5 used in that order, then row 0 again: a new sibling evicts row 1's leaf, then its parent
    # (a leaf now), not the system prompt's blocks (every row's ancestors: used with each)
    pc.lookup("m", rows[0])
    new = system + [77] * (2 * BLOCK) + [0]
    pc.insert("m", new, _kv(new))
    assert pc.tokens == 16 * BLOCK
    assert pc.lookup("m", rows[1])[1] == 4 * BLOCK  # the system prompt's blocks stayed
    assert [pc.lookup("m", r)[1] for r in rows] == [6 * BLOCK, 4 * BLOCK] + [6 * BLOCK] * 4
    _check_prefix_cache(pc)
    # an evicted parent: its child cannot be reached (nor kept alone); the prompt keeps its blocks again
    little = PrefixCache(capacity=3 * BLOCK)
    x = list(range(3 * BLOCK)) + [5]
    little.insert("m", x, _kv(x))
    y = list(range(500, 500 + 3 * BLOCK)) + [5]
    little.insert("m", y[:BLOCK + 1], _kv(y))  # one block: x's last block (its leaf) goes
    assert little.lookup("m", x)[1] == 2 * BLOCK
    little.insert("m", y, _kv(y))  # 2 more: x's other two go, leaf first, never a parent before its child
    assert little.lookup("m", x) is None and little.lookup("m", y)[1] == 3 * BLOCK
    little.insert("m", x, _kv(x))
    assert little.lookup("m", y) is None and _ids(*little.lookup("m", x)) == x[:3 * BLOCK]
    _check_prefix_cache(little)


def test_prefix_cache_checks_tokens_not_only_hashes(monkeypatch):
    """A block found under a prompt's chained hash is its only when its tokens and
    the block before it are the prompt's (hashes may collide)."""
    import flora.prefix_cache as m

    B = m.BLOCK
    # colliding keys: a block's index and tokens, not the blocks before it
    monkeypatch.setattr(m.PrefixCache, "_keys", staticmethod(
        lambda model, tokens, n, salt=None: (((model, j, tuple(tokens[j * B:(j + 1) * B])),
                                              tuple(tokens[j * B:(j + 1) * B])) for j in range(n))))
    pc = m.PrefixCache(capacity=8 * B)
    p = [1] * B + [2] * B + [0]
    pc.insert("m", p, _kv(p))
    q = [3] * B + [2] * B + [0]  # its second block's key and tokens are p's, the block before it is not
    assert pc.lookup("m", q) is None
    pc.insert("m", q, _kv(q))  # its first block kept; the second's key is taken: that one stays p's
    assert pc.tokens == 3 * B and pc.lookup("m", q)[1] == B and _ids(*pc.lookup("m", p)) == p[:2 * B]
    monkeypatch.setattr(m.PrefixCache, "_keys", staticmethod(  # every block j under one key
        lambda model, tokens, n, salt=None: (((model, j), tuple(tokens[j * B:(j + 1) * B])) for j in range(n))))
    pc = m.PrefixCache(capacity=8 * B)
    pc.insert("m", p, _kv(p))
    r = [1] * B + [7] * B + [0]
    assert pc.lookup("m", r)[1] == B  # its second block's key is p's: its tokens are not
    _check_prefix_cache(pc)


@pytest.mark.parametrize("mixed", [False, True])
def test_prefix_cache_reuses_prompts_and_answers(setup, mixed):
    """Requests that start as earlier ones did (a shared system prompt; the next turn
    of a conversation: the earlier prompt and its answer) reuse their keys and values,
    and answer exactly what generate() gives them on a separately loaded model; an
    adapter never reuses the base's."""
    d, ckpt, adapter = setup
    tok = load_tokenizer(ckpt)
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    model.load_adapter(str(adapter), name="ffba", activate=False)
    eng = Engine(model, tok, {"base": None, "ffba": "ffba"}, max_batch=4, mixed=mixed).start()
    system = prompt_ids(tok, " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(37)))
    assert len(system) >= 37

    def ask(name, ids, n=6):
        req, = eng.submit([Request(name, ids, n, Sampling())])
        ev = req.events.get(timeout=60)
        assert ev[0] == "done", ev
        m = FusedLlama.from_pretrained(str(ckpt), adapter=None if name == "base" else str(adapter))
        row = m.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids):].tolist()
        eos = set(_eos_set(m.generation_eos_token_id))
        new = row[:next((i for i, t in enumerate(row) if t in eos), len(row))]
        assert ev[2] == tok.decode(new, skip_special_tokens=True)
        return req.cached, new

    q1, q2 = prompt_ids(tok, "copy : a b"), prompt_ids(tok, "the big cat")
    assert ask("base", system + q1)[0] == 0
    cached, _ = ask("base", system + q2)
    assert cached == len(system) // 16 * 16 > 0  # the system prompt's whole blocks
    assert ask("ffba", system + q2)[0] == 0  # the adapter's own keys, not the base's
    cached, answer = ask("base", system + q1, n=8)
    turn = system + q1 + answer + q2  # the next turn: the first, its answer, and more
    cached, _ = ask("base", turn)
    fed = len(answer) if len(answer) < 8 else 7  # ended by its EOS: every token fed; by length: the last not
    assert cached == (len(system + q1) + fed) // 16 * 16 > len(system) // 16 * 16
    assert eng.prefix.hits == 3  # the second, fourth (the first again) and fifth requests


def test_usage_reports_the_reused_prompt_tokens(server):
    """usage.prompt_tokens_details.cached_tokens (as OpenAI's): 0 the first time, the
    reused whole blocks when a prompt starts as an earlier one did; the answer is the same."""
    url, _ = server
    body = {"model": "base", "prompt": " ".join("abcdefghijklmnopqrstuvwxyz") + " copy : a b", "max_tokens": 4,
            "temperature": 0}
    first, again = (json.loads(_post(url + "/v1/completions", body)[1]) for _ in range(2))
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    n = first["usage"]["prompt_tokens"]
    assert n > 16 and again["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}
    assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_cached_tokens_count_only_the_prompt_tokens_not_computed(setup):
    """usage.prompt_tokens_details.cached_tokens: the rows joining a batch in one prefill (a
    group of like length) all prefill their last S tokens (S: the most any of them must
    compute), so a row whose reused prefix is longer than its length less S recomputes part of
    it: only the tokens not computed count (S read from the prefill itself); a prompt much
    longer than the rest of one that found a prefix prefills apart, and the prefix is all
    reused; the answers are generate()'s."""
    from flora.generation import ADMIT_FORWARD_TOKENS

    ckpt = setup[1]
    tok = load_tokenizer(ckpt)
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    eng = Engine(model, tok, {"base": None}, max_batch=2, admit_cost=ADMIT_FORWARD_TOKENS)
    calls = counted_prefills(model)
    srv = serve(eng, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1/completions"
    system = " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(40))
    kept = len(prompt_ids(tok, system)) // 16 * 16
    assert kept == 32

    def ask(*prompts):
        out = json.loads(_post(url, {"prompt": list(prompts), "max_tokens": 4, "temperature": 0})[1])
        want = [_reference(ckpt, None, p, 4)[0] for p in prompts]
        assert [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])] == want
        return out["usage"]["prompt_tokens_details"]["cached_tokens"]

    try:
        assert ask(system + " copy : a b") == 0  # its blocks kept
        for other, hits in ((" ".join("zyxwvutsrqponmlkjihg"), 2), (" ".join("mnbvcxzlkjhgfdsapoiuytrewq" * 2), 3)):
            mine = system + (" the big cat" if hits == 2 else " copy : a b c")
            P, Q = len(prompt_ids(tok, mine)), len(prompt_ids(tok, other))
            calls.clear()
            got = ask(mine, other)  # one request, its two choices (rows 0 and 1) joining together
            # one prefill where its padding costs less than a second forward
            together = 2 * max(P - kept, Q) <= P - kept + Q + ADMIT_FORWARD_TOKENS
            assert eng.prefix.hits == hits - 1
            assert sorted(calls) == ([([0, 1], max(P - kept, Q))] if together else [([0], P - kept), ([1], Q)])
            S = next(w for rows, w in calls if 0 in rows)
            assert got == max(0, P - S)  # `other`'s prompt shares nothing
            assert (together and 0 < got < kept) if hits == 2 else (not together and got == kept and Q >= P)
    finally:
        srv.shutdown()
        srv.server_close()


def test_prefix_cache_keeps_a_scoring_forwards_scores():
    """PrefixCache.lookup_scored: a prompt to score reuses only blocks with scores (a
    scoring forward's: each token's logprob and k alternatives'), as many of its tokens
    as they scored and the prompt shares, the c-th token included (its kept logprob
    must be the prompt's token's), partly into a scored block that extends the last
    whole one it shares, at most ``most``, never another model's nor blocks with fewer
    alternatives; scores join blocks kept already, stay with a block a longer prompt
    extends, and are never kept when not all finite."""
    from flora.prefix_cache import BLOCK, PrefixCache

    def scores(tokens, k):  # row j (token j + 1): its "logprob" its id, its alternatives id + 1 .. id + k
        rows = [[t + a for a in range(k + 1)] for t in tokens[1:]]
        return torch.tensor(rows, dtype=torch.float32), torch.tensor([r[1:] for r in rows]).view(len(rows), k)

    a = list(range(100, 100 + 3 * BLOCK + 5))
    pc = PrefixCache(capacity=16 * BLOCK)
    pc.insert("m", a, _kv(a))  # a generating row's: keys and values, no scores
    assert pc.lookup_scored("m", a, 1, len(a)) is None and pc.lookup("m", a)[1] == 3 * BLOCK
    pc.insert("m", a, None, scores(a, 2))  # kept already: the scores join its blocks
    got, (v, i), c = pc.lookup_scored("m", a + [1], 2, 10 ** 6)
    assert c == 3 * BLOCK - 1  # tokens 1 .. 47: the 48th's next token is not the block's
    assert _ids(got, c) == a[:c] and v.shape == (c, 3) and i.shape == (c, 2)
    assert v[:, 0].tolist() == a[1:c + 1] and i.tolist() == [[t + 1, t + 2] for t in a[1:c + 1]]
    assert pc.lookup_scored("m", a, 1, 99)[1][1].shape == (3 * BLOCK - 1, 1)  # as many alternatives as asked
    assert pc.lookup_scored("m", a, 3, 99) is None  # 3 alternatives wanted, 2 kept
    assert pc.lookup_scored("m", a, 1, 20)[2] == 20  # at most `most`
    b = a[:BLOCK + 3] + [7] * (2 * BLOCK)
    got, (v, i), c = pc.lookup_scored("m", b, 1, 99)
    assert c == BLOCK + 2 and _ids(got, c) == b[:c]  # into a's second block: its token BLOCK + 3 is not a's
    assert v[:, 0].tolist() == b[1:c + 1]
    assert pc.lookup_scored("other", a, 1, 99) is None and pc.lookup_scored("m", a[:BLOCK], 1, 99) is None
    longer = a + [9] * BLOCK
    pc.insert("m", longer, _kv(longer))  # a generating row's: its new block unscored, a's keep theirs
    assert pc.tokens == 4 * BLOCK and pc.lookup_scored("m", longer, 2, 99)[2] == 3 * BLOCK - 1
    bad = scores(b, 1)
    bad[0][5, 0] = float("nan")
    pc.insert("m", b, _kv(b), bad)  # not all finite: neither kept
    assert pc.tokens == 4 * BLOCK and pc.lookup("m", b)[1] == BLOCK
    pc.insert("m", b, _kv(b), scores(b, 1))  # its first block shared (keeps its 2 alternatives), 2 new
    assert pc.tokens == 6 * BLOCK and pc.lookup_scored("m", b + [0], 1, 99)[2] == 3 * BLOCK - 1
    # 2 alternatives: not b's own blocks; the shared one, then into a's second (3 tokens alike)
    assert pc.lookup_scored("m", b + [0], 2, 99)[2] == BLOCK + 2
    pc.insert("m", longer, None, scores(longer, 3))  # more alternatives: they replace the kept ones
    assert pc.lookup_scored("m", longer + [0], 3, 99)[2] == 4 * BLOCK - 1
    _check_prefix_cache(pc)


def _widths(model, admits):
    """``model.run_layers`` noting each prefill of rows joining a batch: its tokens a row."""
    run = model.run_layers

    def noted(ids, *a, cache=None, **kw):
        if getattr(cache, "prefill_rows", None) is not None:
            admits.append(ids.shape[1])
        return run(ids, *a, cache=cache, **kw)

    model.run_layers = noted


def test_scoring_reuses_and_keeps_prefixes(setup):
    """lm-eval's loglikelihood requests that share a context but arrive one after the
    other: the first forward keeps its prompts' shared start (keys, values and each
    token's scores) in the prefix cache, a later prompt computes only its rest
    (attending to the copied keys), and a generating request reuses those keys too;
    every logprob is a plain forward's over the prompt alone, every answer generate()'s,
    and cached_tokens counts the tokens not computed for the request. Keys a generating row kept come without
    scores (scoring computes that prompt whole); an adapter never scores from the base's."""
    from flora.prefix_cache import BLOCK, common_length

    _, ckpt, adapter = setup
    tok = load_tokenizer(ckpt)
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    model.load_adapter(str(adapter), name="ffba", activate=False)
    eng = Engine(model, tok, {"base": None, "ffba": "ffba"}, max_batch=2).start()
    choices = _choices(tok)

    def score(prompts, name="base"):  # one request: (the tokens its forward computed, each choice's cached)
        before = eng.score_tokens
        reqs = eng.submit(eng.parse({"model": name, "prompt": prompts, "echo": True, "logprobs": 2,
                                     "max_tokens": 1, "temperature": 0}, False))
        for r in reqs:  # each choice's events in turn: its prompt, then its token
            ref = _reference_logprobs(ckpt, None if name == "base" else adapter, r.prompt + [0])
            _scored(r.events.get(timeout=60), tok, r.prompt, ref, 2)
            assert _end(r)[1:] in (("length", 1), ("stop", 1))
        return eng.score_tokens - before, [r.cached for r in reqs]

    def generate(ids):  # (the answer is generate()'s) its cached tokens
        r, = eng.submit([Request("base", ids, 4, Sampling())])
        gen = _greedy_ids(ckpt, None, ids, 4)
        assert _end(r)[::2] == (tok.decode(gen, skip_special_tokens=True), len(gen))
        return r.cached

    shared = common_length(choices[2], choices[3])  # the context (" the big cat", " f" after it)
    kept = shared // BLOCK * BLOCK
    assert kept >= BLOCK
    # the context computed once, for the first choice: the second's cached
    assert score(choices[2:4]) == (_prefixes(choices[2:4]), [0, shared])
    # the context's whole blocks kept, with the scores of tokens 1 .. kept - 1: the rest computed
    assert score([choices[4]]) == (len(choices[4]) - (kept - 1), [kept - 1])
    assert score([choices[4]], "ffba") == (len(choices[4]), [0])  # the adapter's keys are its own
    # a generating row finds the last prompt whole (kept by its forward): the blocks before its last token
    whole = len(choices[4]) // BLOCK * BLOCK
    assert generate(choices[1]) == min(whole, (len(choices[1]) - 1) // BLOCK * BLOCK) > 0
    fresh = prompt_ids(tok, " ".join("zyxwvutsrqponmlkjihgfedcba")) + [7]
    assert generate(fresh) == 0  # its blocks kept without scores: scoring computes the prompt whole
    assert score([fresh + [8, 9]]) == (len(fresh) + 2, [0])
    # an equal prompt is scored once: the second computed nothing of its own, every token counts
    other = prompt_ids(tok, " ".join("qwertyuiopasdfghjklzxcvbnm")) + [5]
    assert score([other, other]) == (len(other), [0, len(other)])


def _contexts(tok, n, length):
    """n token-id contexts of ``length`` tokens, no two starting alike."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = [tok(" ".join((letters[5 * i:] + letters[:5 * i]) * 4), add_special_tokens=False).input_ids[:length]
           for i in range(n)]
    assert all(len(c) == length for c in out) and len({c[0] for c in out}) == n
    return out


def _run(eng, body):
    """One prompt's request on ``eng``: (its prompt's logprob entries or None, its done event's text, reason,
    tokens and entries), and its cached tokens."""
    r, = eng.submit(eng.parse({"temperature": 0, "logprobs": 2, **body}, False))
    prompt = None
    while True:
        ev = r.events.get(timeout=60)
        assert ev[0] != "error", ev
        if ev[0] == "prompt":
            prompt = ev[2]
        if ev[0] == "done":
            return (prompt, ev[2:6]), r.cached


def _same_entries(got, want):
    """Logprob entries alike: texts equal, logprobs within fp32's rounding (another batch shape)."""
    assert (got is None) == (want is None)
    for (t, v, alts), (t2, v2, alts2) in zip(got or [], want or []):
        assert t == t2 and (v is None) == (v2 is None) and (v is None or v == pytest.approx(v2, abs=1e-4))
        assert [a for a, _ in alts or []] == [a for a, _ in alts2 or []]
        assert [x for _, x in alts or []] == pytest.approx([x for _, x in alts2 or []], abs=1e-4)
    assert len(got or []) == len(want or [])


@pytest.mark.parametrize("echo", [False, True])
def test_a_prompt_longer_than_the_prefix_cache_keeps_its_first_blocks(setup, echo):
    """A prompt longer than the whole prefix cache keeps its first blocks, as many as it
    holds (the least recently used ones going): a later request that shares its start
    (a long system prompt, a document) copies them, reports them as cached_tokens, and
    answers what it answers without the cache (greedy tokens and logprobs; ``echo``:
    scored, the prompt's logprobs, the kept blocks' scores reused)."""
    from flora.prefix_cache import BLOCK

    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    engines = [Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), tok, {"base": None}, max_batch=2,
                      prefix_cache=c).start() for c in (2 * BLOCK + 8, 0)]
    other, doc = _contexts(tok, 2, 3 * BLOCK + 2)
    later = doc[:2 * BLOCK + 8] + tok(" the big cat", add_special_tokens=False).input_ids
    extra = {"echo": True, "max_tokens": 0} if echo else {"max_tokens": 4}
    on, off = engines
    _run(on, {"prompt": other[:BLOCK + 3], **extra})  # a block, which the long prompt's evict
    for eng in engines:
        _, cached = _run(eng, {"prompt": doc, **extra})
        assert cached == 0
    assert on.prefix.tokens == 2 * BLOCK and on.prefix.lookup("base", other) is None
    got, cached = _run(on, {"prompt": later, **extra})
    want, _ = _run(off, {"prompt": later, **extra})
    # its first two blocks kept (scoring: the scores of tokens 1 .. 2 x BLOCK - 1: the next one's is not kept)
    assert cached == (2 * BLOCK - 1 if echo else 2 * BLOCK)
    assert got[1][:3] == want[1][:3]
    _same_entries(got[0], want[0])
    _same_entries(got[1][3], want[1][3])
    if echo:
        _scored(("prompt", 0, got[0]), tok, later, _reference_logprobs(ckpt, None, later), 2)
    else:
        gen = _greedy_ids(ckpt, None, later, 4)
        assert got[1][:3] == (tok.decode(gen, skip_special_tokens=True), "length", len(gen))
    for eng in engines:
        eng.close()


@pytest.mark.parametrize("slots", ["default", "small"])
def test_mostly_cached_prompts_share_a_scoring_forward(setup, monkeypatch, slots):
    """A scoring forward's budget counts the positions it computes (rows x the most one
    computes), not the prompts' lengths: prompts whose contexts an earlier forward kept
    (each context's other choices, as lm-eval sends them one request after another)
    compute only their continuation and share one forward, where their whole lengths
    would take two; SCORE_SLOTS (the key slots, copied ones included) still bounds it
    (``small``: two). Every prompt's logprobs are a plain forward's over it alone;
    cached_tokens counts the tokens not computed for it (their sum with those computed:
    the prompts' tokens)."""
    from flora import serve as serve_mod
    from flora.prefix_cache import BLOCK

    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    eng = Engine(FusedLlama.from_pretrained(str(ckpt)).eval(), tok, {"base": None}).start()
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    contexts = _contexts(tok, 4, 3 * BLOCK + 2)
    first = [c + enc(" a b") for c in contexts]
    then = [c + enc(" the big cat") for c in contexts]
    T = max(map(len, then))
    monkeypatch.setattr(serve_mod, "SCORE_TOKENS", 2 * T + 1)  # two whole prompts a forward
    if slots == "small":
        monkeypatch.setattr(serve_mod, "SCORE_SLOTS", 2 * T + 1)

    def score(prompts):  # one request: its forwards, the tokens they computed, each prompt's cached
        f, n = eng.score_forwards, eng.score_tokens
        reqs = eng.submit(eng.parse({"prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 0}, False))
        for r in reqs:
            _scored(r.events.get(timeout=60), tok, r.prompt, _reference_logprobs(ckpt, None, r.prompt), 2)
            assert _end(r) == ("", "length", 0)
        assert sum(len(r.prompt) - r.cached for r in reqs) == eng.score_tokens - n
        return eng.score_forwards - f, eng.score_tokens - n, [r.cached for r in reqs]

    assert score(first) == (2, sum(map(len, first)), [0] * 4)  # nothing kept: whole prompts, two a forward
    kept = 3 * BLOCK - 1  # each context's 3 whole blocks, the scores of tokens 1 .. 47
    assert score(then) == (1 if slots == "default" else 2, sum(len(p) - kept for p in then), [kept] * 4)


@pytest.mark.parametrize("prefix_cache", [8192, 0])
def test_an_echoed_prompt_that_generates_is_computed_once(setup, prefix_cache):
    """echo with logprobs and max_tokens >= 2: the scoring forward keeps each prompt's
    keys and values, so its row computes only the tokens after their whole blocks (the
    prefix cache off: the whole prompt again); a prompt scored from a kept prefix counts
    as cached the tokens neither its forward nor its row computed. Prompt logprobs,
    answers and their logprobs are those of the prompt served alone."""
    from flora.prefix_cache import BLOCK, common_length

    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    admits = []
    _widths(model, admits)
    eng = Engine(model, tok, {"base": None}, max_batch=2, prefix_cache=prefix_cache).start()
    choices = _choices(tok)

    def echo(prompts):  # one request, a choice a prompt: each one's cached
        before = eng.score_tokens
        reqs = eng.submit(eng.parse({"prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 4,
                                     "temperature": 0}, False))
        events = []
        while sum(e[0] == "done" for e in events) < len(reqs):
            events.append(reqs[0].events.get(timeout=60))
        for r in reqs:
            gen = _greedy_ids(ckpt, None, r.prompt, 4)
            ref = _reference_logprobs(ckpt, None, r.prompt + gen)
            _scored(next(e for e in events if e[:2] == ("prompt", r.index)), tok, r.prompt, ref, 2)
            done = next(e for e in events if e[:2] == ("done", r.index))
            assert done[2:5] == (tok.decode(gen, skip_special_tokens=True), "length", len(gen))
            assert [e[1] for e in done[5]] == pytest.approx(
                [float(ref[len(r.prompt) + i - 1, t]) for i, t in enumerate(gen)], abs=1e-4)
        return eng.score_tokens - before, [r.cached for r in reqs]

    def copied(ids):  # what the row finds kept: the whole blocks before its last token
        return (len(ids) - 1) // BLOCK * BLOCK if prefix_cache else 0

    pair = [choices[0], choices[2]]
    shared = common_length(*pair)
    # their forward computed the context once, for the first; their rows join together (the prefix cache off,
    # the second copies the shared context from the first's row): the second's context counts as cached as far
    # as its row did not compute it either
    S = max(len(p) - copied(p) for p in pair)
    assert echo(pair) == (_prefixes(pair), [0, min(shared, len(pair[1]) - S) if prefix_cache else shared])
    assert admits == ([S] if prefix_cache else [len(pair[0]), len(pair[1]) - shared])
    computed, cached = echo([choices[4]])  # ctx + " a b c": scored from choices[0]'s kept blocks
    c = len(choices[4]) - computed  # the tokens its forward did not compute
    assert (c > 0) == bool(prefix_cache) and cached == [min(c, copied(choices[4]))]
    assert admits[-1] == len(choices[4]) - copied(choices[4])


@pytest.mark.parametrize("prefix_cache", [8192, 0])
def test_prompts_joining_together_compute_their_shared_start_once(setup, prefix_cache):
    """Prompts that join a batch together and start alike, nothing of that start kept
    (a batch's first rows under one system prompt): the first computes its prompt, the
    others copy the shared start from its row, a second prefill computing their rest;
    an equal prompt is one row copied, a prompt that shares nothing and another model's
    (--mixed: its keys are its own) are computed in the first (in groups of like length).
    Each answer is
    generate()'s; cached_tokens counts the tokens not computed for the request: the copied
    start, or the whole prompt of the equal prompt's copied row."""
    from flora.prefix_cache import common_length

    _, ckpt, adapter = setup
    tok = load_tokenizer(ckpt)
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    model.load_adapter(str(adapter), name="ffba", activate=False)
    admits = []
    _widths(model, admits)
    eng = Engine(model, tok, {"base": None, "ffba": "ffba"}, max_batch=6, mixed=True, prefix_cache=prefix_cache)
    system = prompt_ids(tok, " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(40)))
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    lead, *rest = [system + enc(t) for t in (" copy : a b", " the big cat", " between a and f ->")]
    plan = [("base", lead), ("base", rest[0]), ("base", lead), ("ffba", rest[1]), ("base", prompt_ids(tok, "a b")),
            ("base", rest[1])]
    reqs = [eng.submit([Request(name, ids, 4, Sampling())])[0] for name, ids in plan]
    eng.start()
    for r, (name, ids) in zip(reqs, plan):
        gen = _greedy_ids(ckpt, None if name == "base" else adapter, ids, 4)
        assert _end(r)[::2] == (tok.decode(gen, skip_special_tokens=True), len(gen))
    S = max(len(p) - common_length(lead, p) for p in rest)
    # the first prefills in groups of like length: "a b" apart from the long prompts (Engine._admit)
    assert eng.batches == 1 and admits == [len(plan[4][1]), max(len(plan[i][1]) for i in (0, 2, 3)), S]
    assert [r.cached for r in reqs] == [0, len(rest[0]) - S, len(lead), 0, 0, len(rest[1]) - S]
    assert min(common_length(lead, p) for p in rest) >= len(system)


def test_rows_copying_a_shared_start_prefill_before_a_longer_group(setup):
    """Chats under one system prompt joining with a long prompt: the first chat prefills
    apart from the long one (a group each), the chat that copies its start right after it
    and before the long one (the shortest prefill whose leader has run goes first: their
    first tokens come before the long prefill's); each answer is generate()'s, and the copy
    counts its copied start as cached."""
    import random

    from flora.prefix_cache import common_length

    _, ckpt, _ = setup
    tok = load_tokenizer(ckpt)
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    admits, firsts = [], []
    _widths(model, admits)
    eng = Engine(model, tok, {"base": None}, max_batch=4)
    system = prompt_ids(tok, " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(20)))
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    lead, copy = system + enc(" copy : a b"), system + enc(" the big cat")
    rng = random.Random(7)
    long = [rng.randrange(3, model.arch.vocab_size) for _ in range(62)]
    plan = [long, lead, copy]
    reqs = [eng.submit([Request("base", ids, 1, Sampling())])[0] for ids in plan]
    for r in reqs:  # the order first tokens come in (each its only one)
        r.events.put = lambda ev, r=r, put=r.events.put: (ev[0] == "done" and firsts.append(r), put(ev))
    eng.start()
    for r, ids in zip(reqs, plan):
        gen = _greedy_ids(ckpt, None, ids, 1)
        assert _end(r)[::2] == (tok.decode(gen, skip_special_tokens=True), len(gen))
    c = common_length(lead, copy)
    assert c >= len(system) >= 16
    assert eng.batches == 1 and admits == [len(lead), len(copy) - c, len(long)]
    assert firsts == reqs[1:] + reqs[:1]
    assert [r.cached for r in reqs] == [0, 0, c]


def test_a_prefill_reusing_a_prefix_never_reads_an_earlier_rows_keys(setup):
    """A row joining beside a longer prompt that reuses a kept prefix is left-padded over
    slots that prefill neither computes nor copies: they held an earlier request's keys
    and values, masked, but a NaN there (a request whose logits were NaN) still reached
    the row through attention (0 x NaN) and its answer was garbage."""
    ckpt = setup[1]
    eng, tok = _poisoned(setup, {"base": None}, max_batch=2, wait_s=0.2)
    eng.start()
    system = " ".join("abcdefghijklmnopqrstuvwxyz") + " copy"  # 28 tokens: one kept block

    def ask(*prompts):  # one request, a choice a prompt: admitted together, in rows 0, 1
        return eng.submit(eng.parse({"prompt": list(prompts), "max_tokens": 8, "temperature": 0}, False))

    assert _ends(ask(system))[0][1] == "length"
    reqs = ask(PROMPTS[2], "apple " * 40)  # the NaN prompt in row 1, all its slots
    assert _ends(reqs)[0] == _reference(ckpt, None, PROMPTS[2], 8)
    long, short = reqs = ask(system, PROMPTS[2])  # row 1 again: 4 tokens beside 28 reusing 16
    assert _ends(reqs) == [_reference(ckpt, None, system, 8), _reference(ckpt, None, PROMPTS[2], 8)]
    assert long.cached == 16 and short.cached == 0


def test_the_prefix_cache_never_keeps_keys_that_are_not_finite(setup):
    """A NaN at one position of a prompt reaches the keys and values of positions
    before it (SDPA's blocked causal attention weighs the masked future keys 0, and
    0 x NaN is NaN): kept, a clean prompt with the same first block reused them and
    its answer was garbage. Keys and values that are not all finite are never kept."""
    from flora.prefix_cache import BLOCK, PrefixCache

    pc = PrefixCache(8 * BLOCK)
    bad = torch.zeros(1, 2, 1, 2 * BLOCK, 1)
    bad[..., 20, :] = float("inf")
    pc.insert("m", list(range(2 * BLOCK)), lambda a, n: bad[..., a:n, :])
    assert pc.tokens == 0 and pc.lookup("m", list(range(2 * BLOCK + 1))) is None
    ckpt = setup[1]
    eng, tok = _poisoned(setup, {"base": None})
    eng.start()
    system = " ".join("abcdefghijklmnopqrstuvwxyz")  # 27 tokens: one block to keep
    _end(_submit(eng, {"prompt": system + " apple", "max_tokens": 2, "temperature": 0}))
    clean = _submit(eng, {"prompt": system + " copy : a b", "max_tokens": 8, "temperature": 0})
    assert _end(clean) == _reference(ckpt, None, system + " copy : a b", 8) and clean.cached == 0
    again = _submit(eng, {"prompt": system + " the big cat", "max_tokens": 8, "temperature": 0})
    assert _end(again) == _reference(ckpt, None, system + " the big cat", 8) and again.cached == BLOCK


def test_randomized_engine_against_generate(setup, tmp_path, monkeypatch):
    """A short, seeded run of the stress harness: random engines (batch size, a cache
    small enough to drain and restart, a prefix cache small enough to evict, --mixed or
    not) take random requests (arriving while others run; prompts sharing blocks, repeated,
    cut at a block boundary +-1, a conversation's next turn; n, stop strings, echo,
    logprobs, streaming, greedy or seeded, sometimes with penalties, a logit_bias or min_p;
    some with a NaN embedding's token, whose rows
    fail alone, with the decode step's attention SDPA as where the kernel does not run),
    and every other choice ends once with what generate() gives it on a separately
    loaded model, its logprobs the full forward's."""
    import random

    from flora import ops
    from flora.prefix_cache import BLOCK

    _, ckpt, adapter = setup
    tok = load_tokenizer(ckpt)
    second = tmp_path / "second"
    _two_adapters(ckpt, adapter, tmp_path)
    paths = {"base": None, "a": adapter, "b": second}
    refs = {n: FusedLlama.from_pretrained(str(ckpt), adapter=None if p is None else str(p)) for n, p in paths.items()}
    eos = set(_eos_set(refs["base"].generation_eos_token_id))
    poison = tok.convert_tokens_to_ids("egg")
    V = len(tok)

    def want(r):  # generate(): (text, finish_reason, tokens) with r's stop strings
        row = refs[r.model].generate(torch.tensor([r.prompt]), max_new_tokens=r.max_tokens, seed=r.seed,
                                     **vars(r.sampling))[0, len(r.prompt):].tolist()
        ids = []
        for j, x in enumerate(row):
            if x in eos:
                return tok.decode(ids, skip_special_tokens=True), "stop", j + 1, row[:j + 1]
            ids.append(x)
            text = tok.decode(ids, skip_special_tokens=True)
            hits = [text.find(s) for s in r.stop if s in text]
            if hits:
                return text[:min(hits)], "stop", j + 1, row[:j + 1]
        return tok.decode(ids, skip_special_tokens=True), "length", len(row), row

    rng = random.Random(1234)
    chunks = random.Random(99)  # chunked prefill's budget (its own draws: the scenarios stay as they were)
    checked = adjusted = 0
    for scenario in range(40):
        mixed, cache_len = rng.random() < 0.5, rng.choice([20, 33, 64])
        model = _two_adapters(ckpt, adapter, tmp_path) if scenario else None
        if model is None:  # the first: base only
            model = FusedLlama.from_pretrained(str(ckpt))
        bad = scenario % 4 == 3
        if bad:
            with torch.no_grad():
                model.embed[poison] = float("nan")
            monkeypatch.setattr(ops, "decode_attention", ops.grouped_sdpa)
        names = {"base": None, "a": "a", "b": "b"} if scenario else {"base": None}
        eng = Engine(model, tok, names, max_batch=rng.choice([1, 2, 3, 4]), mixed=mixed, cache_len=cache_len,
                     prefix_cache=rng.choice([16, 48, 8192]), wait_s=rng.choice([0.0, 0.005]),
                     prefill_chunk=chunks.choice([0, 1, 3, 8, 256]))
        step = eng._step
        eng._step = lambda step=step: (time.sleep(0.001), step())[1]  # so that requests arrive mid-batch
        eng.start()
        pool, sent = [], []
        for _ in range(rng.randint(3, 10)):
            P = cache_len - 1
            c = rng.random()
            if not pool or c < 0.3:
                p = [rng.randrange(3, V) for _ in range(rng.randint(1, P))]
            elif c < 0.45 and min(map(len, pool)) + 5 < P:  # the next turn: an earlier prompt, its answer, more
                q = rng.choice([q for q in pool if len(q) + 5 < P])
                answer = refs["base"].generate(torch.tensor([q]), max_new_tokens=5)[0, len(q):].tolist()
                p = (q + answer + [rng.randrange(3, V) for _ in range(rng.randint(1, 6))])[:P]
            else:
                q = rng.choice(pool)
                cut = min(len(q), rng.choice([BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, len(q)]))
                p = (q[:cut] + [rng.randrange(3, V) for _ in range(rng.randint(0, 12))])[:P]
            p = [x if x != poison else poison + 1 for x in p]
            if bad and rng.random() < 0.4:  # often past the first block: another prompt may share that
                p[rng.randrange(min(len(p) - 1, BLOCK), len(p))] = poison
            pool.append(p)
            body = {"model": rng.choice(list(names)), "prompt": p, "max_tokens": rng.choice([1, 2, 5, 9, 20]),
                    "temperature": 0.0}
            if rng.random() < 0.4:
                body.update(temperature=rng.choice([0.7, 1.2]), seed=rng.randrange(100),
                            top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.9]))
            if rng.random() < 0.25:  # the rows that sample through Penalties (greedy ones too)
                body.update(repetition_penalty=rng.choice([1.0, 1.4]), presence_penalty=rng.choice([0.0, 0.8, -0.5]),
                            frequency_penalty=rng.choice([0.0, 0.6]), min_p=rng.choice([0.0, 0.1]))
            if rng.random() < 0.2:
                body["logit_bias"] = {str(rng.randrange(V)): rng.choice([-100, -6.5, 4.0, 100])
                                      for _ in range(rng.randint(1, 3))}
            if rng.random() < 0.25:
                body["n"] = rng.randint(2, 3)
            if rng.random() < 0.2:
                body["stop"] = [" " + tok.decode([rng.randrange(3, V)])]
            if rng.random() < 0.2:
                body.update(echo=True, logprobs=rng.randint(0, 2), max_tokens=rng.choice([0, 1, 3]))
            elif rng.random() < 0.2:
                body["logprobs"] = rng.randint(0, 2)
            body["stream"] = rng.random() < 0.3
            sent.append(eng.submit(eng.parse(body, False)))
            time.sleep(rng.choice([0.0, 0.002, 0.01]))
        for reqs in sent:
            events = []
            while sum(e[0] in ("done", "error") for e in events) < len(reqs):
                events.append(reqs[0].events.get(timeout=60))
            if bad and any(poison in r.prompt + want(r)[-1] for r in reqs):
                continue  # NaN logits (its prompt's, or after its answer's token): garbage or an error, its own
            assert not [e for e in events if e[0] == "error"], (scenario, events)
            for r in reqs:
                mine = [e for e in events if e[1] == r.index]
                (_, _, text, reason, n, entries), = [e for e in mine if e[0] == "done"]
                # copied, never the last token (its logits) but by a copy of an equal prompt's row or scores
                assert 0 <= r.cached <= len(r.prompt)
                if r.stream:
                    assert "".join(e[2] for e in mine if e[0] == "delta") == text
                if r.max_tokens == 0:
                    assert (text, reason, n) == ("", "length", 0)
                    continue
                *expect, row = want(r)
                assert (text, reason, n) == tuple(expect), (scenario, r)
                checked += 1
                adjusted += r.sampling.adjusts or r.sampling.min_p > 0
                if r.logprobs is not None:
                    with torch.no_grad():
                        lp = torch.log_softmax(refs[r.model](torch.tensor([r.prompt + row])).logits[0].float(), -1)
                    got = [e[1] for e in entries] + ([e[1] for e in mine[0][2][1:]] if r.echo is not None else [])
                    ref = [float(lp[len(r.prompt) - 1 + i, x]) for i, x in enumerate(row)]
                    if r.echo is not None:
                        ref += [float(lp[i - 1, r.prompt[i]]) for i in range(1, len(r.prompt))]
                    assert got == pytest.approx(ref, abs=1e-4)
        eng.close()
        eng._worker.join(30)
        assert not eng._worker.is_alive() and not any(eng._slots)
        pc = eng.prefix
        _check_prefix_cache(pc)
        monkeypatch.undo()
    assert checked > 100 and adjusted > 20, (checked, adjusted)


def test_randomized_shared_prefixes_against_alone(setup, tmp_path):
    """A seeded run built for the paths that reuse a prompt's start: prompts from two
    shared contexts (a system prompt, lm-eval's choices after a question) and short
    continuations, echoed and scored (max_tokens 0, 1 or 3), or generated, for the base
    or an adapter, in bursts (a burst's requests join together: rows copy a shared start
    from one row; a later burst finds what the earlier ones kept, scores included), on
    engines with the prefix cache off, small or large, --mixed or not: every logprob is
    a plain forward's over the prompt alone, every answer generate()'s, cached_tokens
    within the prompt; and kept scores and copied starts were used."""
    import random

    _, ckpt, adapter = setup
    tok = load_tokenizer(ckpt)
    second = tmp_path / "second"
    _two_adapters(ckpt, adapter, tmp_path)
    paths = {"base": None, "a": adapter, "b": second}
    refs = {n: FusedLlama.from_pretrained(str(ckpt), adapter=None if p is None else str(p)).eval()
            for n, p in paths.items()}
    eos = set(_eos_set(refs["base"].generation_eos_token_id))
    rng, V = random.Random(11), len(tok)
    used = {"scored": 0, "copied": 0}
    checked = 0
    for scenario in range(14):
        mixed = scenario % 2 == 1
        eng = Engine(_two_adapters(ckpt, adapter, tmp_path), tok, {"base": None, "a": "a", "b": "b"},
                     max_batch=rng.choice([2, 4]), mixed=mixed, cache_len=64,
                     prefix_cache=rng.choice([0, 0, 48, 8192]), wait_s=0.005)
        if eng.prefix is not None:
            lookup = eng.prefix.lookup_scored
            eng.prefix.lookup_scored = lambda *a, f=lookup: (lambda got: (used.__setitem__(
                "scored", used["scored"] + (got is not None)), got)[1])(f(*a))
        leads = eng._leads
        eng._leads = lambda join, reused, f=leads: (lambda got: (used.__setitem__(
            "copied", used["copied"] + sum(x is not None for x in got)), got)[1])(f(join, reused))
        eng.start()
        contexts = [[rng.randrange(3, V) for _ in range(rng.randint(17, 40))] for _ in range(2)]
        for _ in range(rng.randint(3, 4)):
            sent = []
            for _ in range(rng.randint(2, 5)):
                p = rng.choice(contexts) + [rng.randrange(3, V) for _ in range(rng.randint(1, 8))]
                body = {"model": rng.choice(["base"] * 4 + ["a", "b"]), "prompt": p, "temperature": 0.0,
                        "max_tokens": rng.choice([2, 5])}
                if rng.random() < 0.6:
                    body.update(echo=True, logprobs=rng.randint(0, 2), max_tokens=rng.choice([0, 1, 3]))
                if rng.random() < 0.2:
                    body["n"] = 2
                sent.append(eng.submit(eng.parse(body, False)))
            for reqs in sent:  # all answered before the next burst
                events = []
                while sum(e[0] in ("done", "error") for e in events) < len(reqs):
                    events.append(reqs[0].events.get(timeout=60))
                assert not [e for e in events if e[0] == "error"], (scenario, events)
                for r in reqs:
                    mine = [e for e in events if e[1] == r.index]
                    (_, _, text, reason, n, entries), = [e for e in mine if e[0] == "done"]
                    assert 0 <= r.cached <= len(r.prompt)  # all of them: an equal prompt's copy
                    ref = refs[r.model]
                    row = ref.generate(torch.tensor([r.prompt]), max_new_tokens=r.max_tokens)[0, len(r.prompt):]
                    row = row.tolist() if r.max_tokens else []
                    k = next((i for i, t in enumerate(row) if t in eos), None)
                    row = row if k is None else row[:k + 1]
                    assert (text, reason, n) == (tok.decode([t for t in row if t not in eos], skip_special_tokens=True),
                                                 "length" if k is None else "stop", len(row)), (scenario, r)
                    if r.logprobs is not None:
                        with torch.no_grad():
                            lp = torch.log_softmax(ref(torch.tensor([r.prompt + row])).logits[0].float(), -1)
                        got = [e[1] for e in mine[0][2][1:]] + [e[1] for e in entries]
                        want = [float(lp[i - 1, t]) for i, t in enumerate(r.prompt + row) if i]
                        assert got == pytest.approx(want, abs=1e-4), (scenario, r)
                    checked += 1
        eng.close()
        eng._worker.join(30)
        assert not eng._worker.is_alive()
    assert checked > 100 and used["scored"] > 0 and used["copied"] > 0, (checked, used)


@pytest.mark.parametrize("attention", ["kernel", "sdpa"])
def test_a_row_never_reads_an_earlier_requests_keys_in_its_decode_window(setup, monkeypatch, attention):
    """A decode step reads a row's whole window, its masked slots too: those before the
    row's prompt and after its last token held an earlier request's keys and values.
    Where the step's attention is SDPA (no extension; on the CPU, windows over 128
    keys) a NaN there (a request whose logits were NaN) reached the row (0 x NaN), and
    every later request in that row answered garbage."""
    from flora import ops

    if attention == "sdpa":
        monkeypatch.setattr(ops, "decode_attention", ops.grouped_sdpa)
    ckpt = setup[1]
    eng, tok = _poisoned(setup, {"base": None}, max_batch=2, wait_s=0.2)
    eng.start()

    def ask(*prompts, n=8):  # one request, a choice a prompt: admitted together, in rows 0, 1
        return eng.submit(eng.parse({"prompt": list(prompts), "max_tokens": n, "temperature": 0}, False))

    _ends(ask(PROMPTS[0], "apple " * 40))  # row 1: NaN from its prompt's slots on
    for prompts in ([PROMPTS[2]], [PROMPTS[0], PROMPTS[2]], ["a b c d e f " * 6, PROMPTS[2]]):  # row 0, row 1
        assert _ends(ask(*prompts))[-1] == _reference(ckpt, None, PROMPTS[2], 8)


@pytest.fixture(scope="module")
def smollm2_tok(gguf_path):
    return load_tokenizer(gguf_path)


def test_incremental_detokenization_is_the_whole_decode(smollm2_tok):
    """Detokenizer (a tail window a token) gives, after every token, the text that
    decoding all of them gives: SmolLM2's byte-level BPE, with characters whose
    bytes split over tokens (emoji, CJK), special tokens and random ids (bytes that
    never make a character)."""
    import random

    from flora.serve import Detokenizer

    tok = smollm2_tok
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731 - as Engine.text
    texts = ["Hello world, this is a test. 🎉🎉 日本語のテキスト、中文字符 👩‍👩‍👧 café naïve",
             " leading space\n\nnew lines\ttabs  two spaces 🙂", "€100 — “quotes” ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
    rng = random.Random(0)
    seqs = [tok(t).input_ids for t in texts]
    seqs.append(tok(texts[0]).input_ids + [tok.eos_token_id] + tok(texts[2]).input_ids)  # a special token inside
    seqs += [[rng.randrange(len(tok)) for _ in range(200)] for _ in range(3)]
    assert any("\ufffd" in tok.decode([i]) for s in seqs for i in s)  # some tokens are parts of characters
    for ids in seqs:
        d, out = Detokenizer(decode), ""
        for k, t in enumerate(ids, 1):
            out += d.add(t)
            assert out + d.rest() == decode(ids[:k])
        assert len(d.ids) - d.prefix <= 64  # the window stays a tail


def test_the_engines_decode_is_the_tokenizers(smollm2_tok, setup):
    """Engine.text decodes with the tokenizers library directly where transformers' decode adds
    nothing (SmolLM2's and the tiny checkpoint's fast tokenizers): the same text as
    tokenizer.decode, special tokens skipped or kept, on texts and random ids; a tokenizer
    that cleans up spaces, or a decode of its own, keeps transformers' decode."""
    import random

    from flora.serve import _backend_decode

    rng = random.Random(1)
    for tok in (load_tokenizer(smollm2_tok.name_or_path), load_tokenizer(setup[1])):
        # (transformers' versions differ on whether a checkpoint cleans up spaces: the fast path is
        # taken where it does not)
        assert (_backend_decode(tok) is None) == bool(tok.clean_up_tokenization_spaces)
        tok.clean_up_tokenization_spaces = False
        fast = _backend_decode(tok)
        assert fast is not None
        seqs = [tok("Hello world 🎉 日本語, naïve").input_ids + [tok.eos_token_id] + tok(" two  spaces").input_ids]
        seqs += [[rng.randrange(len(tok)) for _ in range(n)] for n in (1, 2, 7, 64)]
        for ids in seqs:
            for skip in (True, False):
                assert fast(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
    cleaning = load_tokenizer(setup[1])
    cleaning.clean_up_tokenization_spaces = True
    assert _backend_decode(cleaning) is None

    class Own(type(cleaning)):
        def decode(self, *a, **kw):
            return "own"
    own = load_tokenizer(setup[1])
    own.__class__ = Own
    assert own._tokenizer is not None and _backend_decode(own) is None


def test_streaming_on_a_real_tokenizer_sends_the_decoded_text(smollm2_tok):
    """A row fed SmolLM2 tokens (emoji and CJK split over them) streams deltas that
    join to the whole decode; a stop string cuts it where it first occurs."""
    from types import SimpleNamespace

    from flora.serve import _Row

    tok = smollm2_tok
    eng = SimpleNamespace(eos={tok.eos_token_id}, tok_eos=tok.eos_token_id, metrics=ServeMetrics(),
                          text=lambda ids: tok.decode(ids, skip_special_tokens=True))
    ids = tok("Grüße 🎉 aus 東京! Ein Test 🙂 mit Emoji und 漢字 zum Schluss.").input_ids
    whole = eng.text(ids)
    for stop in ((), ("漢字",), ("🙂",), ("Schluss.",)):
        req = Request("m", [1], max_tokens=len(ids), sampling=Sampling(), stream=True, stop=stop)
        row = _Row(req, 0)
        for t in ids:
            row.add(t, eng)
        events = []
        while not req.events.empty():
            events.append(req.events.get())
        want = whole[:whole.find(stop[0])] if stop else whole
        assert events[-1][2:4] == (want, "stop" if stop else "length")
        deltas = [e[2] for e in events if e[0] == "delta"]
        assert "".join(deltas) == want and len(deltas) > 5 and not any("\ufffd" in d for d in deltas)


def test_logprob_entries_on_a_real_tokenizer(smollm2_tok):
    """A row's logprob entries with SmolLM2's tokenizer: one a token (the EOS's
    included), each the text the token adds (a token inside a character adds "",
    the one that completes it the character), so they join to the answer; each
    alternative likewise, the text it would add in the token's place (after a
    character cut short, its U+FFFD first)."""
    from types import SimpleNamespace

    from flora.serve import _Row

    tok = smollm2_tok
    eng = SimpleNamespace(eos={tok.eos_token_id}, tok_eos=tok.eos_token_id, metrics=ServeMetrics(),
                          text=lambda ids: tok.decode(ids, skip_special_tokens=True))
    ids = tok("Grüße 🎉 aus 東京!").input_ids
    alts = tok(" a 🎉").input_ids  # whole words, and parts of a character
    for stream in (False, True):
        req = Request("m", [1], max_tokens=50, sampling=Sampling(), stream=stream, logprobs=len(alts))
        row = _Row(req, 0)
        for k, t in enumerate(ids + [tok.eos_token_id]):
            row.add(t, eng, (-0.5 - k, [(a, -1.0 - j) for j, a in enumerate(alts)]))
        events = []
        while not req.events.empty():
            events.append(req.events.get())
        done = events[-1]
        entries = done[5]
        assert done[2:5] == (eng.text(ids), "stop", len(ids) + 1) and len(entries) == len(ids) + 1
        assert "".join(e[0] for e in entries) == done[2] and entries[-1][0] == ""
        assert [e[1] for e in entries] == [-0.5 - k for k in range(len(ids) + 1)]
        assert any(e[0] == "" for e in entries[:-1]) and "🎉" in [e[0].strip() for e in entries]
        out = ""  # the text out before each token: an alternative adds what follows it ("" inside a character)
        for k, e in enumerate(entries):
            after = [eng.text(ids[:k] + [a]) for a in alts]
            assert [a for a, _ in e[2]] == ["" if x.endswith("\ufffd") else x[len(out):] for x in after]
            out += e[0]
        if stream:  # the deltas' entries join to the whole
            assert [x for ev in events if ev[0] == "delta" for x in ev[3]] == entries


def test_echo_and_logprobs_on_smollm2(gguf_path, smollm2_tok):
    """SmolLM2 end to end: a prompt whose emoji and CJK characters split over tokens,
    echoed with its logprobs and a greedy answer's: the prompt tokens' texts join to
    the prompt (a part of a character: ""), every logprob equals log_softmax of the
    model's full forward over prompt and answer."""
    tok = smollm2_tok
    model = FusedLlama.from_pretrained(gguf_path)
    prompt = "Tokyo 東京 is fun 🎉! The capital of France is"
    ids = prompt_ids(tok, prompt)
    gen = model.generate(torch.tensor([ids]), max_new_tokens=4)[0, len(ids):].tolist()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids + gen])).logits[0].float(), -1)
    eng = Engine(model, tok, {"base": None}, max_batch=2, cache_len=128).start()
    r, = eng.submit(eng.parse({"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0},
                              False))
    scored, done = r.events.get(timeout=120), r.events.get(timeout=120)
    assert (scored[0], done[0]) == ("prompt", "done")
    assert "".join(e[0] for e in scored[2]) == prompt and any(e[0] == "" for e in scored[2])
    assert done[2:5] == (tok.decode(gen, skip_special_tokens=True), "length", 4)
    got = [e[1] for e in scored[2][1:] + done[5]]
    assert got == pytest.approx([float(ref[i - 1, t]) for i, t in enumerate(ids + gen) if i], abs=1e-4)


def test_choices_scored_together_on_smollm2(gguf_path, smollm2_tok):
    """SmolLM2: a multiple-choice question's choices (a shared context, continuations of
    different lengths) and a prompt of its own, in one request, scored by one forward (the
    context once): every logprob and alternative equals log_softmax of the model's forward
    over that prompt alone, and the token after it is its argmax."""
    tok = smollm2_tok
    model = FusedLlama.from_pretrained(gguf_path)
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    ctx = enc("Question: Which of these animals can fly? Think about the body of each one before you answer.\n"
              "Answer:")
    prompts = [ctx + enc(c) for c in (" the eagle", " a fish", " the eagle and the bat", " a dog")]
    prompts.append(enc("The capital of France is Paris, and the capital of Italy is"))
    eng = Engine(model, tok, {"base": None}, max_batch=2, cache_len=128).start()
    reqs = eng.submit(eng.parse({"prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0},
                                False))
    events = []
    while sum(e[0] == "done" for e in events) < len(reqs):
        events.append(reqs[0].events.get(timeout=120))
    assert (eng.score_forwards, eng.score_rows) == (1, 5)
    assert eng.score_tokens == _prefixes(prompts[:4]) + len(prompts[4]) < sum(map(len, prompts))
    scored = {e[1]: e for e in events if e[0] == "prompt"}
    done = {e[1]: e for e in events if e[0] == "done"}
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        _scored(scored[i], tok, ids, ref, 2)
        assert done[i][2:5] == (tok.decode([int(ref[-1].argmax())], skip_special_tokens=True), "length", 1)



def test_choices_over_several_steps_on_smollm2(gguf_path, smollm2_tok):
    """SmolLM2: a question's choices sent a request at a time (lm-eval's batch_size 1),
    then an echoed one that generates: the first forward keeps the context, the later
    ones compute their continuation (attending to the kept keys), the generating row
    its last tokens. Every logprob and alternative equals log_softmax of the model's
    forward over that prompt alone, every answer the same request's on an engine
    without a prefix cache."""
    tok = smollm2_tok
    model = FusedLlama.from_pretrained(gguf_path)
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    ctx = enc("Question: Which of these animals can fly? Think about the body of each one before you answer. "
              "Wings alone are not enough.\nAnswer:")
    plan = [(ctx + enc(c), k) for c, k in ((" the eagle", 1), (" a fish", 1), (" the eagle and the bat", 0),
                                            (" a dog", 4))]
    eng = Engine(model, tok, {"base": None}, max_batch=2, cache_len=128).start()
    plain = Engine(model, tok, {"base": None}, max_batch=2, cache_len=128, prefix_cache=0).start()
    try:
        for i, (ids, k) in enumerate(plan):
            body = {"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": k, "temperature": 0}
            (r,), (q,) = eng.submit(eng.parse(body, False)), plain.submit(plain.parse(body, False))
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            _scored(r.events.get(timeout=120), tok, ids, ref, 2)
            assert q.events.get(timeout=120)[0] == "prompt"
            got, want = r.events.get(timeout=120), q.events.get(timeout=120)
            assert got[:5] == want[:5] and got[0] == "done"
            assert [e[1] for e in got[5]] == pytest.approx([e[1] for e in want[5]], abs=1e-4)
            assert (r.cached > 0) == (i > 0) and q.cached == 0
        assert eng.score_tokens < plain.score_tokens - 2 * len(ctx)
    finally:
        eng.close()
        plain.close()


def test_a_long_prompt_joins_a_running_batch_on_smollm2(gguf_path, smollm2_tok):
    """SmolLM2: two short prompts generate; a ~200-token prompt arrives, longer than the
    batch's slot, and joins at once (ending before them: no wait for the batch to drain);
    every answer's tokens and logprobs equal its prompt's alone."""
    tok = smollm2_tok
    model = FusedLlama.from_pretrained(gguf_path)
    text = ("The river rises in the hills, runs through the old town, turns the mill and passes under "
            "seven bridges before it reaches the sea. ") * 6
    ask = lambda t, n: Request("base", prompt_ids(tok, t), n, Sampling(), logprobs=0)  # noqa: E731
    first = [ask("Write the numbers from 1 to 100, separated by commas:", 24), ask("Count to thirty: one, two,", 24)]
    later = [ask(text + "After the seventh bridge the river", 8)]
    assert len(later[0].prompt) > 150
    eng = Engine(model, tok, {"base": None}, max_batch=4, cache_len=256)
    got = _mid_batch(eng, first, later, at=4)
    rows = [_alone(model, tok, r, got[id(r)][0]) for r in first + later]
    assert [len(x) for x in rows] == [24, 24, 8]
    assert [got[id(r)][1] for r in first + later] == [23, 23, 5 + 7]
    eng.close()
