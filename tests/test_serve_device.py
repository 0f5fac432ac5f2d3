"""`flora serve`'s engine on each device (the CPU here; CUDA, with its CUDA graphs, where there is
one: the device script's `-m cuda` subset): a batch whose rows join mid-run, a prompt prefilled in
chunks, a prefix-cache hit, two adapters side by side (--mixed); every answer against its prompt
generated alone on the same device (generate()'s greedy tokens, a plain forward's logprobs)."""
from __future__ import annotations

import random

import pytest
from _train_helpers import served_checkpoint
from test_serve import _alone

from flora import FusedLlama
from flora.data import load_tokenizer
from flora.generation import Sampling
from flora.serve import Engine, Request

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# fp32 logprobs: a served row's GEMMs run at another M than alone (another kernel on a GPU)
LOGPROB_TOL = {"cpu": 1e-4, "cuda": 1e-3}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return served_checkpoint(tmp_path_factory.mktemp("serve-device"))


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
        _alone(ref, tok, long, ev, device, LOGPROB_TOL[device])
        assert len(fills) >= 2  # it ran in chunks
        again = Request("base", long.prompt[:20] + [5, 6, 7], 6, Sampling(), logprobs=0)
        eng.submit([again])  # while the first rows still run: their batch, long's start from the cache
        for r in first + [again]:
            ev = r.events.get(timeout=120)
            assert ev[0] == "done", ev
            _alone(ref, tok, r, ev, device, LOGPROB_TOL[device])
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
            _alone(refs[r.model], tok, r, ev, device, LOGPROB_TOL[device])
    finally:
        eng.close()
