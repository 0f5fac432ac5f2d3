"""`flora serve`'s engine on each device (the CPU here; CUDA, with its CUDA graphs, where there is
one: the device script's `-m cuda` subset): a batch whose rows join mid-run, a prompt prefilled in
chunks, a prefix-cache hit, two adapters side by side (--mixed); every answer against its prompt
generated alone on the same device (generate()'s greedy tokens, a plain forward's logprobs)."""
from __future__ import annotations

import random

import pytest
import torch
from _train_helpers import served_checkpoint

from flora import FusedLlama
from flora.data import load_tokenizer
from flora.generation import Sampling, _eos_set
from flora.serve import Engine, Request

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# fp32 logprobs: a served row's GEMMs run at another M than alone (another kernel on a GPU)
LOGPROB_TOL = {"cpu": 1e-4, "cuda": 1e-3}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return served_checkpoint(tmp_path_factory.mktemp("serve-device"))


def _alone(model, tok, r, ev, device):
    """Request r's done event against its prompt alone on ``device``: generate()'s tokens (text,
    finish reason, count; up to and with an EOS), each token's logprob a plain forward's."""
    row = model.generate(torch.tensor([r.prompt], device=device), max_new_tokens=r.max_tokens)[0, len(r.prompt):]
    row = row.tolist()
    eos = set(_eos_set(model.generation_eos_token_id))
    k = next((i for i, t in enumerate(row) if t in eos), None)
    row = row if k is None else row[:k + 1]
    assert ev[2:5] == (tok.decode([t for t in row if t not in eos], skip_special_tokens=True),
                       "length" if k is None else "stop", len(row))
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([r.prompt + row], device=device)).logits[0].float(), -1).cpu()
    want = [float(lp[len(r.prompt) - 1 + i, t]) for i, t in enumerate(row)]
    assert [e[1] for e in ev[5]] == pytest.approx(want, abs=LOGPROB_TOL[device])


def _ask(rng, model, name, n, m):
    return Request(name, [rng.randrange(3, model.arch.vocab_size) for _ in range(n)], m, Sampling(), logprobs=0)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_on_the_device_equals_each_prompt_alone(ckpt, device, monkeypatch):
    """Rows joining a running batch, a prompt in chunks of 5 between its steps, then a prompt
    starting as it does from the prefix cache, on ``device``: each answer its prompt's alone there."""
    from flora.generation import Decoder

    path, _ = ckpt
    tok = load_tokenizer(path)
    model = FusedLlama.from_pretrained(str(path), device=device).eval()
    ref = FusedLlama.from_pretrained(str(path), device=device).eval()
    fills, fill = [], Decoder.fill
    monkeypatch.setattr(Decoder, "fill", lambda self, *a, **kw: (fills.append(1), fill(self, *a, **kw))[1])
    eng = Engine(model, tok, {"base": None}, max_batch=4, prefill_chunk=5)
    rng = random.Random(0)
    first = [_ask(rng, ref, "base", n, 30) for n in (3, 6)]
    long = _ask(rng, ref, "base", 24, 4)  # chunked: more than 5 tokens to compute
    eng.submit(first + [long])
    eng.start()
    try:
        ev = long.events.get(timeout=120)
        assert ev[0] == "done", ev
        _alone(ref, tok, long, ev, device)
        assert len(fills) >= 2  # it ran in chunks
        again = Request("base", long.prompt[:20] + [5, 6, 7], 6, Sampling(), logprobs=0)
        eng.submit([again])  # while the first rows still run: their batch, long's start from the cache
        for r in first + [again]:
            ev = r.events.get(timeout=120)
            assert ev[0] == "done", ev
            _alone(ref, tok, r, ev, device)
        assert eng.prefix.hits >= 1
    finally:
        eng.close()


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_adapters_on_the_device(ckpt, device):
    """--mixed on ``device``: the base and the ffba adapter in one batch, each row its own."""
    path, adapter = ckpt
    tok = load_tokenizer(path)
    model = FusedLlama.from_pretrained(str(path), device=device).eval()
    model.load_adapter(str(adapter), name="ffba", activate=False)
    refs = {"base": FusedLlama.from_pretrained(str(path), device=device).eval(),
            "ffba": FusedLlama.from_pretrained(str(path), adapter=str(adapter), device=device).eval()}
    eng = Engine(model, tok, {"base": None, "ffba": "ffba"}, max_batch=4, mixed=True, prefill_chunk=5)
    rng = random.Random(1)
    reqs = [_ask(rng, refs[name], name, n, 10) for name, n in (("base", 4), ("ffba", 9), ("ffba", 3), ("base", 12))]
    eng.submit(reqs)
    eng.start()
    try:
        for r in reqs:
            ev = r.events.get(timeout=120)
            assert ev[0] == "done", ev
            _alone(refs[r.model], tok, r, ev, device)
    finally:
        eng.close()
