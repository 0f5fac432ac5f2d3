"""Training's loss (FusedLlama in train mode with labels): the head runs in chunks
of rows inside one autograd Function, and the loss and every gradient equal the
full-logits path (causal_lm_loss on model(...).logits), for base, adapted heads
and every form of targets."""
import math

import pytest
import torch

import flora.layers
from flora import AdapterConfig, FusedLlama
from flora.layers import chunked_lm_loss
from llama_fixtures import llama_model, random_ids


def _model(variant, tied, dtype=torch.float32):
    cfg = None if variant == "base" else AdapterConfig(variant, rank=4, alpha=8)
    m = FusedLlama.from_pretrained(llama_model(tied=tied), adapter=cfg, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _labels(ids):
    lab = ids.clone()
    lab[0, :9] = -100  # a masked prompt
    lab[1, -3:] = -100  # padding at the end
    return lab


def _loss_and_grads(m, ids, mask, labels, train, **kw):
    m.train(train)
    m.zero_grad(set_to_none=True)
    out = m(ids, attention_mask=mask, labels=labels, **kw)
    if out.loss.requires_grad:  # the base alone has nothing to train
        out.loss.backward()
    return out, [None if p.grad is None else p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("variant", ["base", "lora", "ffba", "zflora", "zflora-mha"])
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_and_grads_equal_the_full_path(variant, tied, monkeypatch):
    m = _model(variant, tied)
    ids = random_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = _labels(ids)
    monkeypatch.setattr(flora.layers, "LOSS_CHUNK_LOGITS", 7 * m.arch.vocab_size)  # 7 rows: several chunks
    m64 = _model(variant, tied, torch.float64)  # the same weights in float64: the exact answer
    for kw in ({}, {"num_items_in_batch": torch.tensor(50)}):
        ref, gref = _loss_and_grads(m, ids, mask, labels, train=False, **kw)  # eval: full logits
        got, ggot = _loss_and_grads(m, ids, mask, labels, train=True, **kw)
        _, g64 = _loss_and_grads(m64, ids, mask, labels, train=False, **kw)
        assert got.logits is None and "logits" not in got and got[0] is got.loss
        assert ref.logits is not None
        assert math.isclose(got.loss.item(), ref.loss.item(), rel_tol=1e-6)
        assert len(ggot) == len(gref) == len(g64)
        for a, b, e in zip(ggot, gref, g64):
            assert (a is None) == (b is None) == (e is None)
            if a is not None:
                # as close to the float64 gradient as the full fp32 path is (the chunks
                # reorder fp32 sums: an ulp apart from it, not bitwise)
                own = (b.double() - e).abs().max().item()
                assert (a.double() - e).abs().max().item() <= 2 * own + 1e-6 * e.abs().max().item()
    if variant == "base":
        assert not list(m.parameters())


def test_chunked_loss_grad_of_the_head_input_and_carry():
    """chunked_lm_loss against causal_lm_loss directly: gradients for n and the carry."""
    m = _model("zflora", tied=True)
    B, T, d, r, V = 3, 10, m.arch.hidden_size, 4, m.arch.vocab_size
    n = torch.randn(B * T, d, dtype=torch.float64).float().requires_grad_()
    carry = torch.randn(B * T, r).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    labels[2, :4] = -100
    got = chunked_lm_loss(m.head, n, carry, labels, chunk=4)
    gn, gc = torch.autograd.grad(got, [n, carry])
    ref = flora.layers.causal_lm_loss(m.head(n, carry).view(B, T, -1), labels)
    rn, rc = torch.autograd.grad(ref, [n, carry])
    assert math.isclose(got.item(), ref.item(), rel_tol=1e-6)
    assert torch.allclose(gn, rn, rtol=1e-5, atol=1e-7) and torch.allclose(gc, rc, rtol=1e-5, atol=1e-7)


def test_no_target_gives_what_the_full_path_gives():
    m = _model("lora", tied=True).train()
    ids = random_ids(2, 8)
    labels = torch.full_like(ids, -100)
    assert math.isnan(m(ids, labels=labels).loss.item())
    assert m(ids, labels=labels, num_items_in_batch=4).loss.item() == 0.0


def test_bf16_autocast_close_to_the_full_path():
    m = _model("ffba", tied=False)
    ids = random_ids(2, 16)
    labels = _labels(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, gref = _loss_and_grads(m, ids, None, labels, train=False)
        got, ggot = _loss_and_grads(m, ids, None, labels, train=True)
    assert math.isclose(got.loss.item(), ref.loss.item(), rel_tol=1e-2)
    for a, b in zip(ggot, gref):
        assert (a - b).norm() <= 0.05 * b.norm()


def test_eval_and_no_grad_keep_the_logits():
    m = _model("lora", tied=True).train()
    ids = random_ids(1, 8)
    with torch.no_grad():
        out = m(ids, labels=ids)
    assert out.logits.shape == (1, 8, m.arch.vocab_size) and out.loss is not None


def test_eval_stats_without_logits_equal_the_logits_path(monkeypatch):
    """flora.evaluate on a FusedLlama (forward(target_stats=True), chunked) against the
    same model seen as any causal LM (full logits)."""
    from flora.evaluate import eval_stats

    m = _model("zflora", tied=True)
    monkeypatch.setattr(flora.layers, "LOSS_CHUNK_LOGITS", 5 * m.arch.vocab_size)

    class AnyLM(torch.nn.Module):  # hides FusedLlama: evaluate takes the logits path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids, attention_mask=attention_mask)

    ids = random_ids(6, 14, seed=3)
    ds = []
    for i in range(6):
        x = ids[i, : 10 + i % 4]
        lab = x.clone()
        if i % 2:  # the model's own argmax as the targets: an exact match, so the count is compared too
            with torch.no_grad():
                lab[1:] = m(x[None]).logits[0, :-1].argmax(-1)
        lab[: 3 + i] = -100  # prompts of several lengths
        ds.append({"input_ids": x.tolist(), "labels": lab.tolist()})
    got, ref = eval_stats(m, ds, batch_size=4), eval_stats(AnyLM(m), ds, batch_size=4)
    assert got["exact_match"] == 0.5
    assert got["tokens"] == ref["tokens"] and got["n"] == ref["n"] == 6
    assert math.isclose(got["loss"], ref["loss"], rel_tol=1e-6)
    assert got["exact_match"] == ref["exact_match"]
    with pytest.raises(ValueError, match="needs labels"):
        m(ids, target_stats=True)
    with pytest.raises(ValueError, match="torch.no_grad"):
        m(ids, labels=ids, target_stats=True)
