"""`flora serve` through OpenAI's own Python client (the `openai` package), as users call
it: every answer parses into the client's types and equals generate() on a separately
loaded model; errors arrive as the client's exceptions."""
from __future__ import annotations

import threading

import pytest
import torch
from _train_helpers import served_checkpoint

from flora import FusedLlama
from flora.data import load_tokenizer, prompt_ids
from flora.generation import _eos_set
from flora.pretrained import chat_prompt
from flora.serve import Engine, serve

openai = pytest.importorskip("openai")
KEY = "sk-flora-test"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpt, adapter = served_checkpoint(tmp_path_factory.mktemp("client"))
    model = FusedLlama.from_pretrained(str(ckpt))
    model.load_adapter(str(adapter), name="ffba", activate=False)
    srv = serve(Engine(model, load_tokenizer(ckpt), {"base": None, "ffba": "ffba"}, max_batch=4), port=0,
                api_key=KEY)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key=KEY, max_retries=0)
    yield ckpt, adapter, client
    srv.shutdown()
    srv.server_close()


def _greedy(ckpt, adapter, ids, n, **sampling):
    """generate() on a separately loaded model: the text of its greedy tokens up to the EOS
    (``sampling``: generate()'s penalties, logit_bias, ...)."""
    m = FusedLlama.from_pretrained(str(ckpt), adapter=None if adapter is None else str(adapter))
    row = m.generate(torch.tensor([ids]), max_new_tokens=n, **sampling)[0, len(ids):].tolist()
    eos = set(_eos_set(m.generation_eos_token_id))
    row = row[:next((i for i, t in enumerate(row) if t in eos), len(row))]
    return load_tokenizer(ckpt).decode(row, skip_special_tokens=True)


def test_models_and_chat(setup):
    ckpt, adapter, client = setup
    assert [m.id for m in client.models.list()] == ["base", "ffba"]
    messages = [{"role": "user", "content": "copy : a b"}]
    want = _greedy(ckpt, adapter, prompt_ids(load_tokenizer(ckpt), chat_prompt(load_tokenizer(ckpt), messages)), 8)
    r = client.chat.completions.create(model="ffba", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens >= len(load_tokenizer(ckpt)(want, add_special_tokens=False).input_ids)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # streamed: the deltas join to the same text; a last chunk with the usage
    chunks = list(client.chat.completions.create(model="ffba", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    # logprobs and alternatives, as the client's types
    r = client.chat.completions.create(model="ffba", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_completions_batch_n_echo_logprobs(setup):
    ckpt, adapter, client = setup
    tok = load_tokenizer(ckpt)
    prompts = ["between a and f ->", "the big cat"]
    r = client.completions.create(model="base", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:  # greedy: both choices of a prompt are its greedy answer
        assert c.text == _greedy(ckpt, None, prompt_ids(tok, prompts[c.index // 2]), 5)
    ids = prompt_ids(tok, prompts[0])
    r = client.completions.create(model="ffba", prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) >= len(ids)
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    # a seed gives the same sample again
    a, b = (client.completions.create(model="ffba", prompt=prompts[1], max_tokens=6, seed=7).choices[0].text
            for _ in range(2))
    assert a == b


def test_penalties_and_logit_bias_as_the_client_sends_them(setup):
    """OpenAI's presence_penalty, frequency_penalty, logit_bias and vLLM's repetition_penalty,
    min_p (the client's extra_body) reach the sampler: greedy, as generate() with them."""
    ckpt, _, client = setup
    tok = load_tokenizer(ckpt)
    ids = prompt_ids(tok, "copy : a b a b =")
    plain = client.completions.create(model="base", prompt=ids, max_tokens=12, temperature=0).choices[0].text
    kw = dict(presence_penalty=0.5, frequency_penalty=1.0, logit_bias={"2": -100, "9": 3})
    vllm = dict(repetition_penalty=1.5, min_p=0.1)
    r = client.completions.create(model="base", prompt=ids, max_tokens=12, temperature=0, **kw, extra_body=vllm)
    assert r.choices[0].text == _greedy(ckpt, None, ids, 12, **{**kw, "logit_bias": {2: -100, 9: 3}}, **vllm)
    assert r.choices[0].text != plain


def test_vllm_fields_and_openai_bookkeeping_as_the_client_sends_them(setup):
    """vLLM's fields in extra_body (benchmark_serving's ignore_eos: exactly max_tokens tokens;
    stop_token_ids, with vLLM's stop_reason on the choice), and OpenAI's fields that ask nothing
    of the answer (user, metadata, store false, service_tier, parallel_tool_calls) taken as sent."""
    ckpt, _, client = setup
    tok = load_tokenizer(ckpt)
    ids = prompt_ids(tok, "between a and f ->")
    m = FusedLlama.from_pretrained(str(ckpt))
    row = m.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=[])[0, len(ids):].tolist()
    eos = set(_eos_set(m.generation_eos_token_id))
    assert eos & set(row[:-1])  # without ignore_eos the answer stops early
    r = client.completions.create(model="base", prompt=ids, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (
        tok.decode(row, skip_special_tokens=True), "length", 12)
    r = client.completions.create(model="base", prompt=ids, max_tokens=12, temperature=0, user="u-1",
                                  extra_body={"stop_token_ids": [row[2]], "ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason, r.choices[0].stop_reason) == (
        tok.decode(row[:2], skip_special_tokens=True), "stop", row[2])
    messages = [{"role": "user", "content": "copy : a b"}]
    plain = client.chat.completions.create(model="base", messages=messages, max_tokens=6, temperature=0)
    again = client.chat.completions.create(model="base", messages=messages, max_tokens=6, temperature=0, user="u-1",
                                           metadata={"run": "x"}, store=False, service_tier="auto",
                                           parallel_tool_calls=False)
    assert again.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="not supported: use_beam_search"):
        client.completions.create(model="base", prompt="a", max_tokens=2, extra_body={"use_beam_search": True})
    with pytest.raises(openai.BadRequestError, match="unknown fields: 'typical_p'"):
        client.completions.create(model="base", prompt="a", max_tokens=2, extra_body={"typical_p": 0.9})


def test_errors_are_the_clients_exceptions(setup):
    ckpt, _, client = setup
    with pytest.raises(openai.NotFoundError, match="the models are: base, ffba"):
        client.completions.create(model="nope", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="base", prompt="a", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="not supported: suffix"):
        client.completions.create(model="base", prompt="a", max_tokens=2, suffix="b")
    with pytest.raises(openai.BadRequestError, match=r"logit_bias: 500 is not a token id of this model"):
        client.completions.create(model="base", prompt="a", max_tokens=2, logit_bias={"500": 1})
    other = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        other.models.list()
