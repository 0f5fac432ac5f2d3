"""`flora serve`: vLLM's request fields on where an answer ends (ignore_eos, min_tokens,
stop_token_ids, include_stop_str_in_output, skip_special_tokens, stop_reason), through HTTP
against the tiny checkpoint's own greedy tokens (generate() and a plain loop over its
forward); vLLM's fields flora does not implement, and unknown ones, refused by name."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from _train_helpers import served_checkpoint

from flora import FusedLlama
from flora.data import load_tokenizer, prompt_ids
from flora.generation import Sampling, _eos_set
from flora.serve import Engine, Request, serve, serving

# greedy on the tiny checkpoint: this prompt's answer hits the checkpoint's EOS at its 6th token;
# THE_BIG_CAT's holds none in 16 and says "follows" twice (tests below check both)
HITS_EOS, THE_BIG_CAT = "between a and f ->", "the big cat"
M = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpt, _ = served_checkpoint(tmp_path_factory.mktemp("vllm-fields"))
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    tok = load_tokenizer(ckpt)
    srv = serve(Engine(model, tok, {"base": None}, max_batch=4), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", model, tok, srv
    srv.shutdown()
    srv.server_close()


def _post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _complete(url, prompt, **fields):
    """A greedy completion's (text, finish_reason, stop_reason, completion_tokens)."""
    status, out = _post(url, "/v1/completions", {"prompt": prompt, "max_tokens": M, "temperature": 0, **fields})
    assert status == 200, out
    c = out["choices"][0]
    return c["text"], c["finish_reason"], c["stop_reason"], out["usage"]["completion_tokens"]


def _row(model, tok, prompt, n=M):
    """generate()'s greedy tokens with no EOS stopping it."""
    ids = prompt_ids(tok, prompt)
    return model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[])[0, len(ids):].tolist()


def _masked_loop(model, tok, prompt, banned, k, n=M):
    """The reference of min_tokens: a plain greedy loop over the model's forward (the whole
    sequence each step), ``banned`` at -inf for its first k tokens, ended by any of them."""
    ids, out = prompt_ids(tok, prompt), []
    eos = set(banned)
    with torch.no_grad():
        for step in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            if step < k:
                logits[list(banned)] = -float("inf")
            out.append(int(logits.argmax()))
            if out[-1] in eos:
                break
    return out


def _text(tok, ids, skip=True):
    return tok.decode(ids, skip_special_tokens=skip)


def test_ignore_eos_generates_exactly_max_tokens(setup):
    url, model, tok, _ = setup
    eos = set(_eos_set(model.generation_eos_token_id))
    row = _row(model, tok, HITS_EOS)
    k = next(i for i, t in enumerate(row) if t in eos)
    assert 0 < k < M - 1  # the prompt's answer stops early without ignore_eos
    assert _complete(url, HITS_EOS) == (_text(tok, row[:k]), "stop", None, k + 1)
    for chat in (False, True):
        if chat:  # the checkpoint's chat answer: its own greedy row, with ignore_eos every one of M tokens
            msgs = [{"role": "user", "content": "copy : a b"}]
            from flora.pretrained import chat_prompt
            want = _row(model, tok, chat_prompt(tok, msgs))
            status, out = _post(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": M, "temperature": 0,
                                                              "ignore_eos": True})
            assert status == 200, out
            c = out["choices"][0]
            got = (c["message"]["content"], c["finish_reason"], c["stop_reason"], out["usage"]["completion_tokens"])
        else:
            want = row
            got = _complete(url, HITS_EOS, ignore_eos=True)
        assert got == (_text(tok, want), "length", None, M)
    # the EOS's own text stays out (a special token); kept with skip_special_tokens false
    assert _complete(url, HITS_EOS, ignore_eos=True, skip_special_tokens=False)[0] == _text(tok, row, skip=False)
    assert "</s>" in _text(tok, row, skip=False)
    # a stop id still ends it, the EOS too when asked for by id (its stop_reason: the id)
    assert _complete(url, HITS_EOS, ignore_eos=True, stop_token_ids=[row[k]]) == (_text(tok, row[:k]), "stop",
                                                                                   row[k], k + 1)


def test_min_tokens_masks_the_eos_until_then(setup):
    url, model, tok, _ = setup
    eos = set(_eos_set(model.generation_eos_token_id))
    row = _row(model, tok, HITS_EOS)
    k = next(i for i, t in enumerate(row) if t in eos)
    for n_min in (k, k + 1, k + 3, M):  # k: the EOS is the (k+1)-th token, allowed
        want = _masked_loop(model, tok, HITS_EOS, eos, n_min)
        ended = want[-1] in eos
        assert n_min > k or want == row[:k + 1]
        assert not eos & set(want[:n_min])
        got = _complete(url, HITS_EOS, min_tokens=n_min)
        assert got == (_text(tok, want[:-1] if ended else want), "stop" if ended else "length", None, len(want))
    # streamed alike (the greedy row takes the sampler's masked path, not the batch's argmax)
    want = _masked_loop(model, tok, HITS_EOS, eos, k + 1)
    status, out = _post(url, "/v1/completions", {"prompt": HITS_EOS, "max_tokens": M, "temperature": 0,
                                                 "min_tokens": k + 1, "stop_token_ids": [], "n": 2})
    assert status == 200 and [c["text"] for c in out["choices"]] == [_text(tok, want[:-1] if want[-1] in eos
                                                                           else want)] * 2


def test_min_tokens_when_sampling(setup):
    """Sampled with a bias that makes the EOS (or a stop id) certain: the answer ends at the
    first token after min_tokens, whatever the seed (and with ignore_eos the EOS is masked
    until then too, as vLLM's: it never ends the answer, the stop id does)."""
    url, model, tok, _ = setup
    eos = min(_eos_set(model.generation_eos_token_id))
    for seed in range(3):
        for n_min in (0, 3):
            body = {"prompt": THE_BIG_CAT, "max_tokens": 10, "temperature": 1.0, "seed": seed, "min_tokens": n_min}
            status, out = _post(url, "/v1/completions", {**body, "logit_bias": {str(eos): 100}})
            assert status == 200, out
            assert (out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]) == ("stop", n_min + 1)
            status, out = _post(url, "/v1/completions", {**body, "logit_bias": {"7": 100}, "stop_token_ids": [7]})
            c = out["choices"][0]
            assert status == 200 and out["usage"]["completion_tokens"] == n_min + 1, out
            assert (c["finish_reason"], c["stop_reason"]) == ("stop", 7)
            status, out = _post(url, "/v1/completions", {**body, "logit_bias": {str(eos): 100}, "ignore_eos": True,
                                                         "skip_special_tokens": False})
            text = out["choices"][0]["text"]
            assert status == 200 and out["choices"][0]["finish_reason"] == "length", out
            tail = tok.decode([eos] * (10 - n_min), skip_special_tokens=False)  # the EOS only after min_tokens
            assert text.endswith(tail) and "</s>" not in text[:-len(tail)], text


def test_stop_token_ids_end_at_the_first(setup):
    url, model, tok, _ = setup
    row = _row(model, tok, THE_BIG_CAT)
    assert not set(_eos_set(model.generation_eos_token_id)) & set(row)
    a, b = row[4], row[7]
    assert a not in row[:4] and b not in row[:4] + row[5:7]
    assert _complete(url, THE_BIG_CAT, stop_token_ids=[b, a]) == (_text(tok, row[:4]), "stop", a, 5)
    assert _complete(url, THE_BIG_CAT, stop_token_ids=[b, a], include_stop_str_in_output=True) == (
        _text(tok, row[:5]), "stop", a, 5)
    # min_tokens past the first: neither is drawn before (the answer goes another way, here to the EOS)
    eos = set(_eos_set(model.generation_eos_token_id))
    want = _masked_loop(model, tok, THE_BIG_CAT, eos | {a, b}, 5)
    assert len(want) > 5 and want[:5] != row[:5] and want[-1] in eos | {a, b}, want
    assert _complete(url, THE_BIG_CAT, stop_token_ids=[b, a], min_tokens=5) == (
        _text(tok, want[:-1]), "stop", None if want[-1] in eos else want[-1], len(want))
    # streamed: the deltas join to the text, the last chunk carries the stop_reason
    req = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": THE_BIG_CAT, "max_tokens": M, "temperature": 0,
                                                  "stop_token_ids": [a], "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        chunks = [json.loads(x[6:]) for x in r.read().decode().split("\n\n") if x.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == _text(tok, row[:4])
    assert [(c["choices"][0]["finish_reason"], c["choices"][0]["stop_reason"]) for c in chunks][-1] == ("stop", a)
    assert all(c["choices"][0]["stop_reason"] is None for c in chunks[:-1])


def test_stop_strings_include_and_min_tokens(setup):
    url, model, tok, _ = setup
    row = _row(model, tok, THE_BIG_CAT)
    full = _text(tok, row)
    first = full.find("follows")
    second = full.find("follows", first + 1)
    assert 0 < first < second
    ends_at = next(i for i in range(M) if "follows" in _text(tok, row[:i + 1]))  # the token that completes it
    assert _complete(url, THE_BIG_CAT, stop=["zzz", "follows"]) == (full[:first], "stop", "follows", ends_at + 1)
    assert _complete(url, THE_BIG_CAT, stop=["zzz", "follows"], include_stop_str_in_output=True) == (
        full[:first + len("follows")], "stop", "follows", ends_at + 1)
    # vLLM's: a stop string is looked for once the answer has more than min_tokens tokens; one that
    # ended within them is passed over (the next one ends the answer)
    for n_min in (ends_at, ends_at + 1):
        cut = full.find("follows", max(0, len(_text(tok, row[:n_min])) - len("follows") + 1))
        assert cut == (first if n_min == ends_at else second)
        assert _complete(url, THE_BIG_CAT, stop=["follows"], min_tokens=n_min)[:3] == (full[:cut], "stop", "follows")


def test_defaults_change_nothing(setup):
    url, model, tok, _ = setup
    for p in (HITS_EOS, THE_BIG_CAT):
        plain = _complete(url, p, stop=["old"])
        assert plain == _complete(url, p, stop=["old"], ignore_eos=False, min_tokens=0, stop_token_ids=[],
                                  include_stop_str_in_output=False, skip_special_tokens=True,
                                  use_beam_search=False, length_penalty=1.0, bad_words=[], prompt_logprobs=None,
                                  spaces_between_special_tokens=True, add_special_tokens=True, priority=0,
                                  guided_json=None, truncate_prompt_tokens=None, typical_p=None,  # null: nothing
                                  user="u-1", metadata={"k": "v"}, service_tier="auto", store=False)


@pytest.mark.parametrize("chat, field, value", [
    (False, "use_beam_search", True), (False, "length_penalty", 0.5), (False, "prompt_logprobs", 1),
    (False, "guided_json", {"type": "object"}), (False, "guided_regex", "a+"), (False, "guided_choice", ["a"]),
    (False, "structured_outputs", {"regex": "a"}), (False, "truncate_prompt_tokens", 4),
    (False, "allowed_token_ids", [5]), (False, "bad_words", ["a"]), (False, "spaces_between_special_tokens", False),
    (True, "add_special_tokens", True), (False, "add_special_tokens", False), (False, "priority", 1),
    (False, "max_completion_tokens", 4), (True, "chat_template_kwargs", {"enable_thinking": False}),
    (False, "store", True), (True, "reasoning_effort", "low"),
])
def test_unimplemented_fields_are_refused_by_name(setup, chat, field, value):
    url = setup[0]
    body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    status, out = _post(url, "/v1/chat/completions" if chat else "/v1/completions", {**body, field: value})
    assert status == 400 and out["error"]["message"] == f"not supported: {field}", out


def test_unknown_fields_are_refused_by_name(setup):
    url = setup[0]
    status, out = _post(url, "/v1/completions", {"prompt": "hi", "typical_p": 0.5, "do_sample": True,
                                                 "use_beam_search": True})
    assert status == 400
    assert out["error"]["message"] == "not supported: use_beam_search; unknown fields: 'typical_p', 'do_sample'"
    status, out = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True,
                                                      "prompt": "hi"})
    assert status == 400 and out["error"]["message"] == "not supported: echo; unknown fields: 'prompt'"


@pytest.mark.parametrize("field, value, says", [
    ("ignore_eos", "yes", "'ignore_eos' must be true or false"),
    ("include_stop_str_in_output", 1, "'include_stop_str_in_output' must be true or false"),
    ("skip_special_tokens", "no", "'skip_special_tokens' must be true or false"),
    ("min_tokens", 17, "'min_tokens' must be an integer >= 0 and <= 16"),
    ("min_tokens", -1, "'min_tokens' must be an integer >= 0"),
    ("min_tokens", 1.5, "'min_tokens' must be an integer"),
    ("stop_token_ids", [5, 97], "'stop_token_ids' must be a list of at most 64 token ids of this model "
                                "(integers in 0 .. 96)"),
    ("stop_token_ids", 5, "'stop_token_ids' must be a list"),
    ("stop_token_ids", [True], "'stop_token_ids' must be a list"),
    ("stop_token_ids", list(range(65)), "'stop_token_ids' must be a list of at most 64"),
])
def test_bad_values_name_the_field(setup, field, value, says):
    status, out = _post(setup[0], "/v1/completions", {"prompt": "hi", "max_tokens": 16, field: value})
    assert status == 400 and out["error"]["message"].startswith(says), out


def test_min_tokens_must_fit_the_cache(setup):
    _, model, tok, _ = setup
    eng = Engine(model, tok, {"base": None}, cache_len=32)
    ids = prompt_ids(tok, "the big cat")
    with pytest.raises(Exception, match=rf"'min_tokens' \(30\) does not fit: the prompt leaves room for "
                                        rf"{32 - len(ids)} tokens"):
        eng.parse({"prompt": ids, "max_tokens": 30, "min_tokens": 30}, False)
    assert eng.parse({"prompt": ids, "max_tokens": 30, "min_tokens": 28}, False)[0].max_tokens == 32 - len(ids)


def test_check_refuses_bad_requests_built_by_hand(setup):
    _, model, tok, _ = setup
    eng = Engine(model, tok, {"base": None})
    ok = dict(model="base", prompt=[1, 5], max_tokens=4, sampling=Sampling())
    for bad, says in [(dict(min_tokens=5), r"Request.min_tokens must be an integer in 0 \.\. max_tokens \(4\)"),
                      (dict(stop_ids=[5]), "Request.stop_ids must be a tuple"),
                      (dict(stop_ids=(97,)), "Request.stop_ids must be a tuple"),
                      (dict(ignore_eos=1), "Request.ignore_eos must be True or False"),
                      (dict(skip_special=None), "Request.skip_special must be True or False")]:
        with pytest.raises(ValueError, match=says):
            eng.check(Request(**ok, **bad))
    eng.check(Request(**ok, min_tokens=4, stop_ids=(5, 96), ignore_eos=True, include_stop=True, skip_special=False))


def test_top_k_minus_one_is_no_limit(setup):
    """vLLM's clients sent top_k -1 for "no limit" (vLLM's old default): taken as 0, the same
    seeded answer; -2 is still a 400 naming the field."""
    server = setup[0]
    body = {"prompt": [1, 2, 3], "max_tokens": 6, "temperature": 1.0, "seed": 5}
    a = _post(server, "/v1/completions", {**body, "top_k": -1})
    b = _post(server, "/v1/completions", body)
    assert a[0] == 200 and a[1]["choices"][0]["text"] == b[1]["choices"][0]["text"]
    status, err = _post(server, "/v1/completions", {**body, "top_k": -2})
    assert status == 400 and "'top_k'" in err["error"]["message"]


# ------------------------------------------------------------ vLLM's remaining behaviours


def test_stop_reason_of_a_generation_configs_extra_eos_ids(setup):
    """vLLM: the tokenizer's own EOS ends an answer with stop_reason null; a generation config's
    other EOS ids (Llama 3's list) are stop token ids, their id the stop_reason (and with
    ignore_eos they end nothing)."""
    _, model, tok, _ = setup
    row = _row(model, tok, THE_BIG_CAT)
    x = row[4]
    assert x not in row[:4] and x != tok.eos_token_id
    assert _eos_set(model.generation_eos_token_id) == [tok.eos_token_id]
    before = model.generation_eos_token_id
    model.generation_eos_token_id = [tok.eos_token_id, x]  # as Llama 3's generation_config.json lists them
    try:
        eng = Engine(model, tok, {"base": None}, max_batch=2)
    finally:
        model.generation_eos_token_id = before
    with serving(eng) as url:
        assert _complete(url, THE_BIG_CAT) == (_text(tok, row[:4]), "stop", x, 5)
        assert _complete(url, THE_BIG_CAT, include_stop_str_in_output=True) == (_text(tok, row[:5]), "stop", x, 5)
        assert _complete(url, THE_BIG_CAT, ignore_eos=True) == (_text(tok, row), "length", None, M)
        eos_row = _row(model, tok, HITS_EOS)
        k = eos_row.index(tok.eos_token_id)
        if x not in eos_row[:k]:
            assert _complete(url, HITS_EOS) == (_text(tok, eos_row[:k]), "stop", None, k + 1)


def test_the_tokenizers_eos_stops_when_the_generation_config_leaves_it_out(setup):
    """vLLM stops at the tokenizer's EOS whatever the generation config lists (its eos_token_id is
    the tokenizer's; the config's ids are stop ids beside it): a checkpoint whose config names
    only another id still ends at the tokenizer's EOS, stop_reason null; ignore_eos runs on."""
    _, model, tok, _ = setup
    eos_row = _row(model, tok, HITS_EOS)
    k = eos_row.index(tok.eos_token_id)
    x = next(t for t in range(tok.vocab_size) if t not in eos_row and t != tok.eos_token_id)
    before = model.generation_eos_token_id
    model.generation_eos_token_id = [x]  # the config names another id only
    try:
        eng = Engine(model, tok, {"base": None}, max_batch=2)
    finally:
        model.generation_eos_token_id = before
    assert eng.eos == {x, tok.eos_token_id}
    with serving(eng) as url:
        assert _complete(url, HITS_EOS) == (_text(tok, eos_row[:k]), "stop", None, k + 1)
        assert _complete(url, HITS_EOS, ignore_eos=True) == (_text(tok, eos_row), "length", None, M)


def _vllm_stop(tok, row, stop, include=False):
    """vLLM's stop strings, as its detokenizer checks them (vllm/v1/engine/detokenizer.py): after
    each token, each string of the list in order, looked for from len(new text) + len(string) - 1
    characters before the end; the first found cuts the text. (text, stop_reason, tokens)."""
    text = ""
    for i in range(len(row)):
        now = _text(tok, row[:i + 1])
        new = len(now) - len(text)
        text = now
        if not new:
            continue
        for s in stop:
            at = text.find(s, 1 - new - len(s))
            if at >= 0:
                return text[:at + len(s) if include else at], s, i + 1
    return text, None, len(row)


def test_several_stop_strings_in_vllms_list_order(setup):
    """Stop strings completed by one token are taken in the list's order (vLLM's), not the first
    in the text: the stop_reason and the cut text are vLLM's (a plain per-token loop)."""
    url, model, tok, _ = setup
    row = _row(model, tok, THE_BIG_CAT)
    full = _text(tok, row)
    i = next(i for i in range(M) if "follows" in _text(tok, row[:i + 1]))
    piece = _text(tok, row[:i + 1])[len(_text(tok, row[:i])):]
    a, b = piece.strip()[:3], piece.strip()[-3:]  # both in one token's text, a before b
    assert a != b and a not in _text(tok, row[:i]) and b not in _text(tok, row[:i])
    cases = [[b, a], [a, b], ["zzz", b, a], [full[-4:], b]]
    for stop in cases:
        for include in (False, True):
            want = _vllm_stop(tok, row, stop, include)
            got = _complete(url, THE_BIG_CAT, stop=stop, include_stop_str_in_output=include)
            assert got == (want[0], "stop" if want[1] else "length", want[1], want[2]), (stop, include)
    assert _vllm_stop(tok, row, [b, a])[:2] == (full[:full.find(b)], b)  # the later one in the text: listed first
    # streamed alike
    req = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": THE_BIG_CAT, "max_tokens": M, "temperature": 0,
                                                  "stop": [b, a], "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        chunks = [json.loads(x[6:]) for x in r.read().decode().split("\n\n") if x.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.find(b)]
    assert chunks[-1]["choices"][0]["stop_reason"] == b


def test_echoed_prompt_logprobs_keep_special_tokens_when_asked(setup):
    """echo with logprobs: the prompt's entries are its tokens' texts as skip_special_tokens asks,
    the special tokens' own text kept with false (the echoed text likewise), "" with true."""
    url, model, tok, _ = setup
    ids = [tok.bos_token_id] + prompt_ids(tok, "the big cat")[1:] + [tok.eos_token_id] + prompt_ids(tok, "a b")[1:]
    for skip in (True, False):
        for max_tokens in (0, 2):
            status, out = _post(url, "/v1/completions", {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens":
                                                         max_tokens, "temperature": 0, "skip_special_tokens": skip})
            assert status == 200, out
            c = out["choices"][0]
            toks = c["logprobs"]["tokens"][:len(ids)]
            assert "".join(toks) == _text(tok, ids, skip) == c["text"][:len("".join(toks))]
            special = [t for t, x in zip(toks, ids) if x in (tok.bos_token_id, tok.eos_token_id)]
            assert [t.strip() for t in special] == (["", ""] if skip else ["<s>", "</s>"])
    # both in one batch: each its own texts (one scoring forward)
    eng = Engine(model, tok, {"base": None}, max_batch=2)
    reqs = [eng.parse({"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0, "skip_special_tokens": s},
                      False)[0] for s in (True, False)]
    eng.submit(reqs)
    eng.close()
    eng.run()
    got = [r.events.get(timeout=5) for r in reqs]
    assert [["".join(e[0] for e in ev[2])] for ev in got] == [[_text(tok, ids)], [_text(tok, ids, False)]]
    assert eng.score_forwards == 1


def test_request_id_and_the_x_request_id_header(setup):
    """vLLM's request_id: the response's id (cmpl- / chatcmpl- before it), an X-Request-Id
    header's before the body's; with --enable-request-id-headers every answer carries the
    header (the request's, or a new one), without it none."""
    url, model, tok, _ = setup

    def post(base, path, body, headers=()):
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **dict(headers)})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode(), r.headers.get("X-Request-Id")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), e.headers.get("X-Request-Id")

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    done = {"prompt": "hi", "max_tokens": 2}
    assert json.loads(post(url, "/v1/completions", {**done, "request_id": "r-1"})[1])["id"] == "cmpl-r-1"
    assert json.loads(post(url, "/v1/chat/completions", {**chat, "request_id": "r-2"})[1])["id"] == "chatcmpl-r-2"
    status, text, echoed = post(url, "/v1/completions", {**done, "request_id": "r-1"}, {"X-Request-Id": "h-9"})
    assert json.loads(text)["id"] == "cmpl-h-9" and echoed is None
    status, text, _ = post(url, "/v1/completions", {**done, "stream": True, "request_id": "r-3"})
    ids = {json.loads(x[6:])["id"] for x in text.split("\n\n") if x.startswith("data: {")}
    assert ids == {"cmpl-r-3"}
    plain = json.loads(post(url, "/v1/completions", done)[1])["id"]
    assert plain.startswith("cmpl-") and len(plain) == 5 + 32
    status, text, _ = post(url, "/v1/completions", {**done, "request_id": 5})
    assert status == 400 and "'request_id' must be a string" in text
    with serving(Engine(model, tok, {"base": None}), request_id_headers=True) as url2:
        assert post(url2, "/v1/completions", done, {"X-Request-Id": "h-7"})[2] == "h-7"
        status, text, got = post(url2, "/v1/completions", {**done, "stream": True}, {"X-Request-Id": "h-8"})
        assert status == 200 and got == "h-8" and "cmpl-h-8" in text
        assert len(post(url2, "/v1/completions", done)[2]) == 32  # none given: a new one
        assert post(url2, "/v1/completions", {"prompt": ""}, {"X-Request-Id": "h-6"})[:3:2] == (400, "h-6")


def _prompt(seed, n):
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 97) for _ in range(n)]


def test_cache_salt_keys_the_prefix_cache(setup):
    """vLLM's cache_salt: a prompt finds kept blocks only of its own salt (none of another salt's
    or of unsalted prompts, and those none of its), answering alike; the PrefixCache keys it so,
    and an adapter's drop takes its salted blocks too. Bad salts are refused as vLLM refuses them."""
    from flora.prefix_cache import BLOCK, PrefixCache

    url, model, tok, _ = setup
    p = _prompt(1, 3 * BLOCK + 3)
    want = model.generate(torch.tensor([p]), max_new_tokens=4, eos_token_id=[])[0, len(p):].tolist()

    def cached(**salt):
        status, out = _post(url, "/v1/completions", {"prompt": p, "max_tokens": 4, "temperature": 0,
                                                     "ignore_eos": True, **salt})
        assert status == 200, out
        assert out["choices"][0]["text"] == _text(tok, want)
        return out["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(cache_salt="a") == 0
    assert cached(cache_salt="a") == 3 * BLOCK
    assert cached(cache_salt="b") == 0
    assert cached() == 0
    assert cached() == 3 * BLOCK and cached(cache_salt="b") == 3 * BLOCK
    for bad in ("", 5, ["a"]):
        status, out = _post(url, "/v1/completions", {"prompt": "hi", "cache_salt": bad})
        assert status == 400 and "'cache_salt' must be a non-empty string" in out["error"]["message"], out
    with pytest.raises(ValueError, match="Request.cache_salt"):
        Engine(model, tok, {"base": None}).check(Request("base", [1, 5], 4, Sampling(), cache_salt=""))
    pc = PrefixCache(8 * BLOCK)
    kv = lambda a, n: torch.zeros(1, 2, 1, n - a, 2)  # noqa: E731
    pc.insert("m", p, kv, salt="x")
    assert pc.lookup("m", p) is None and pc.lookup("m", p, "y") is None and pc.held("m", p) == 0
    assert pc.lookup("m", p, "x")[1] == 3 * BLOCK and pc.held("m", p, "x") == 3 * BLOCK
    pc.insert("m", p, kv)
    assert pc.tokens == 6 * BLOCK  # each salt's blocks its own
    pc.drop("m")
    assert pc.tokens == 0


def _together(eng, bodies):
    """The bodies' requests queued, then served by the worker in this thread (they join together):
    each request's "done" event."""
    reqs = [r for b in bodies for r in eng.submit(eng.parse(b, False))]
    eng.close()
    eng.run()
    out = []
    for r in reqs:
        ev = r.events.get(timeout=5)
        while ev[0] != "done":
            ev = r.events.get(timeout=5)
        out.append((r, ev))
    return out


def test_cache_salt_shares_no_start_between_requests_joining_or_scored_together(setup, monkeypatch):
    """Requests that join (or are scored) together share a start they have in common, or all of an
    equal prompt, only within one salt: of other salts each computes its whole prompt (cached 0; an
    equal prompt's row is no copy of the other's), answering as alone; scoring packs no prompts of
    other salts (every token computed)."""
    from flora.generation import Decoder
    from flora.serve import SHARE_MIN

    copied = []
    copy_row = Decoder._copy_row
    monkeypatch.setattr(Decoder, "_copy_row", lambda self, *a: (copied.append(a), copy_row(self, *a))[1])
    _, model, tok, _ = setup
    start = _prompt(2, SHARE_MIN + 9)
    p, q = start + _prompt(3, 5), start + _prompt(4, 7)
    alone = {tuple(x): model.generate(torch.tensor([x]), max_new_tokens=3, eos_token_id=[])[0, len(x):].tolist()
             for x in (p, q)}
    body = lambda x, **kw: {"prompt": x, "max_tokens": 3, "temperature": 0, "ignore_eos": True, **kw}  # noqa: E731
    for salts, shared in [(("a", "b"), False), ((None, "b"), False), (("a", "a"), True), ((None, None), True)]:
        for second in (q, p):  # a shared start; an equal prompt
            eng = Engine(model, tok, {"base": None}, max_batch=4, prefix_cache=0)
            copied.clear()
            got = _together(eng, [body(p, cache_salt=salts[0]), body(second, cache_salt=salts[1])])
            assert eng.batches == 1 and len(copied) == (shared and second is p)
            for r, ev in got:
                assert ev[2] == _text(tok, alone[tuple(r.prompt)])
            assert got[0][0].cached == 0
            assert (got[1][0].cached > 0) == shared, (salts, second is p)
    for salts, shared in [(("a", "b"), False), (("a", "a"), True)]:
        eng = Engine(model, tok, {"base": None}, max_batch=4, prefix_cache=0)
        got = _together(eng, [{"prompt": x, "echo": True, "logprobs": 1, "max_tokens": 0, "cache_salt": s}
                              for x, s in zip((p, q), salts)])
        assert eng.score_forwards == 1
        assert (eng.score_tokens < len(p) + len(q)) == shared
