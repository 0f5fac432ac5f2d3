"""Sample packing (`flora train --pack`): several examples in one row, each run
as if alone. The reference throughout is the examples run one by one (or as
today's padded batch): a packed row's logits, loss and adapter gradients must
equal theirs."""
import copy
import json
import random

import pytest
import torch

from _train_helpers import records
from flora import AdapterConfig, FusedLlama
from flora.bench.latency import randomize_adapter
from flora.config import BASE_VARIANTS, VARIANTS
from flora.data import IGNORE_INDEX, TokenizedDataset, collate, collate_packed, count_target_tokens, pack_rows
from flora import layers
from flora.layers import (PackedSequences, additive_mask, attention, packed_attention_mask, packed_documents,
                          packed_lengths, packed_mask, per_sequence_pays)
from flora.train import Interrupted, TrainConfig, epoch_order, train
from llama_fixtures import llama_model

LENGTHS = [7, 12, 5, 9, 15, 3, 10, 2, 14]  # 77 tokens
SEQ = 24


def items(lengths=LENGTHS, seed=0, vocab=1003):
    """Tokenized examples: a prompt (label -100) of a third of the tokens, the rest targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        p = n // 3
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def packed_batch(its, seq_len=SEQ):
    rows = pack_rows([len(it["input_ids"]) for it in its], seq_len)
    return rows, collate_packed([[its[i] for i in r] for r in rows], pad_id=0)


def model_of(hf, variant, seed=0):
    if variant == "base":
        return FusedLlama.from_pretrained(hf)
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig(variant, 4, 8.0))
    randomize_adapter(m, seed)  # zero-initialised B would hide the adapter's part
    return m


@pytest.fixture(scope="module")
def hf():
    return llama_model()


# ------------------------------------------------------------------ data
def test_pack_rows_hold_every_example_once_in_order():
    rng = random.Random(0)
    lengths = [rng.randint(2, 200) for _ in range(500)]
    rows = pack_rows(lengths, 256)
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(500))  # every example once
    assert all(r == sorted(r) for r in rows) and [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    assert pack_rows(lengths, 256) == rows  # a pure function of the lengths
    # best-fit decreasing: within 3% of the bound the total length sets
    assert len(rows) <= 1.03 * -(-sum(lengths) // 256)
    with pytest.raises(ValueError, match=r"example 1 has 257 tokens; packing takes 1 to seq_len=256"):
        pack_rows([3, 257], 256)


def test_collate_packed_positions_labels_and_padding():
    its = items()
    rows, b = packed_batch(its)
    T = b["input_ids"].shape[1]
    assert T == max(sum(LENGTHS[i] for i in r) for r in rows) <= SEQ
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            n = LENGTHS[i]
            assert b["input_ids"][r, t:t + n].tolist() == its[i]["input_ids"]
            assert b["position_ids"][r, t:t + n].tolist() == list(range(n))
            # the item's first token takes no target: the one before it belongs to another item
            assert b["labels"][r, t].item() == IGNORE_INDEX
            assert b["labels"][r, t + 1:t + n].tolist() == its[i]["labels"][1:]
            t += n
        assert b["row_tokens"][r].item() == t
        assert (b["labels"][r, t:] == IGNORE_INDEX).all() and (b["input_ids"][r, t:] == 0).all()
        assert b["position_ids"][r, t:].tolist() == list(range(T - t))  # padding: a sequence of its own
        assert packed_documents(b["position_ids"][r:r + 1])[0, -1].item() == len(row) - (t == T)
    # the same targets as the examples padded apart
    assert count_target_tokens(b["labels"]) == count_target_tokens(collate(its, 0)["labels"])


def test_packed_mask_only_where_rows_hold_several_sequences():
    assert packed_mask(torch.arange(3, 15).expand(2, 12)) is None  # plain rows keep the unmasked causal kernel
    m = packed_mask(torch.tensor([[0, 1, 2, 0, 1]]))[0, 0]
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(m, want.bool())


# ------------------------------------------------------------------ model
@pytest.mark.parametrize("variant", ("base",) + VARIANTS)
def test_packed_row_logits_equal_each_example_alone(hf, variant):
    m = model_of(hf, variant).eval()
    its = items()
    rows, b = packed_batch(its)
    with torch.no_grad():
        got = m(b["input_ids"], position_ids=b["position_ids"]).logits
        for r, row in enumerate(rows):
            t = 0
            for i in row:
                n = LENGTHS[i]
                alone = m(torch.tensor([its[i]["input_ids"]])).logits[0]
                # fp32 GEMMs of other shapes round differently: the padded batch's error
                # against the examples alone is of the same size (4e-6 for lora)
                assert rel_err(got[r, t:t + n], alone) <= 2e-5, (r, i)
                t += n


def test_packed_rows_match_transformers(hf):
    """transformers' own Llama reads packed position_ids the same way (without a KV cache)."""
    m = FusedLlama.from_pretrained(hf).eval()
    _, b = packed_batch(items())
    with torch.no_grad():
        ref = hf(b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        assert rel_err(m(b["input_ids"], position_ids=b["position_ids"]).logits, ref) <= 1e-5


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_packed_loss_and_gradients_equal_the_padded_batch(hf, variant, chunked):
    """Token-mean over the batch's targets, packed or padded: the same number and the
    same adapter gradients (the loss the training loop takes, either way)."""
    its = items()
    _, b = packed_batch(its)
    plain = collate(its, 0)
    grads = []
    for batch in (dict(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]),
                  dict(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"], labels=plain["labels"])):
        m = model_of(hf, variant).train()
        m.chunked_loss = chunked
        loss = m(**batch).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    (lp, gp), (lu, gu) = grads
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-6)
    # by hand: the mean over every example's own targets
    m = model_of(hf, variant).eval()
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(m(torch.tensor([it["input_ids"]])).logits[0, :-1],
                                                 torch.tensor(it["labels"][1:]), reduction="sum") for it in its]
    torch.testing.assert_close(lp, sum(nll) / count_target_tokens(plain["labels"]), rtol=1e-5, atol=1e-6)
    assert gp.keys() == gu.keys() and gp
    for k in gp:
        assert rel_err(gp[k], gu[k]) <= 1e-4, k


# ------------------------------------------- per-sequence attention (PackedSequences)
def written_out(q, k, v, mask):
    """Masked softmax attention in fp64 (kv heads repeated) -> [B * T, heads * hd]."""
    B, T, nh, hd = q.shape
    g = nh // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double().transpose(1, 2) @ kk.transpose(-1, -2) * hd ** -0.5).masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2).reshape(B * T, nh * hd)


# a row of sequences with length-1 ones and a padding tail (the last, 4), a row of
# one sequence, a row of length-1 sequences only
EDGE_ROWS = [[7, 1, 6, 1, 4], [19], [1] * 19]


def test_packed_lengths_read_the_rows():
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in EDGE_ROWS])
    assert packed_lengths(pos) == EDGE_ROWS
    assert packed_attention_mask(torch.arange(9).expand(2, 9), torch.device("cpu")) is None  # no row packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (6, 2)])
def test_per_sequence_attention_equals_the_mask_form_and_fp64(dtype, nh, nkv):
    """Output and q / k / v gradients of the per-sequence form against fp64 written-out
    attention under the block-diagonal mask, within twice the mask form's own error."""
    B, T, hd = len(EDGE_ROWS), 19, 16
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in EDGE_ROWS])
    mask = packed_mask(pos)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in ((B, T, nh, hd), (B, nkv, T, hd), (B, nkv, T, hd))]
    grad = torch.randn(B * T, nh * hd, generator=g)
    ref_in = [t.double().requires_grad_() for t in base]
    ref = written_out(*ref_in, mask)
    ref.backward(grad.double())
    results = {}
    for name, m in (("seq", PackedSequences(EDGE_ROWS)), ("mask", additive_mask(mask, dtype))):
        ins = [t.to(dtype).requires_grad_() for t in base]
        out = attention(*ins, m)
        out.backward(grad.to(dtype))
        results[name] = [out] + [t.grad for t in ins]
    eps = torch.finfo(dtype).eps
    for i, r in enumerate([ref] + [t.grad for t in ref_in]):
        err = {n: rel_err(got[i].double(), r) for n, got in results.items()}
        assert err["seq"] <= 2 * err["mask"] + eps, (i, err)
    with pytest.raises(ValueError, match="do not fill 3 rows of 19 slots"):
        attention(*base, PackedSequences([[7, 1, 6, 1, 4], [19], [18]]))


def test_per_sequence_attention_compiles_as_the_mask_form(monkeypatch):
    """Under torch.compile packed_attention_mask gives the mask (no host read): one graph."""
    forced(monkeypatch, True)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in EDGE_ROWS])
    q, k, v = torch.randn(3, 19, 4, 8), torch.randn(3, 2, 19, 8), torch.randn(3, 2, 19, 8)
    fn = torch.compile(lambda q, k, v, p: attention(q, k, v, packed_attention_mask(p, q.device)),
                       backend="aot_eager", fullgraph=True)
    eager = attention(q, k, v, packed_attention_mask(pos, q.device))
    assert isinstance(packed_attention_mask(pos, q.device), PackedSequences)
    torch.testing.assert_close(fn(q, k, v, pos), eager, rtol=1e-5, atol=1e-6)


def test_per_sequence_pays_where_measured():
    """The cost rule picks the measured faster form (layers.PACKED_CALL_COST's table)."""
    for T, n, per_seq in ((128, 8, False), (256, 16, True), (256, 32, False), (512, 64, True),
                          (512, 128, False), (1024, 2, True), (1024, 128, True)):
        assert per_sequence_pays([[T // n] * n] * 2, T) == per_seq, (T, n)
    assert isinstance(packed_attention_mask(torch.arange(64).repeat(8)[None], torch.device("cpu")),
                      PackedSequences)
    assert packed_attention_mask(torch.arange(64).repeat(8)[None], torch.device("meta")).dtype == torch.bool


EDGE_LENGTHS = [7, 12, 1, 5, 9, 24, 1, 3, 10, 1, 14]  # a 24 fills a row alone; three of one token


def forced(monkeypatch, per_sequence: bool):
    monkeypatch.setattr(layers, "per_sequence_pays", lambda lengths, T: per_sequence)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["base", "lora", "ffba", "zflora", "ffba-ab-mha"])
def test_per_sequence_packed_rows_equal_mask_and_each_alone(hf, variant, dtype, monkeypatch):
    """Logits of packed rows, per-sequence form against the mask form, and each
    sequence alone in fp64 (the same weights): the per-sequence form's error within
    twice the mask form's. Adapter gradients of the packed loss likewise against
    the fp64 padded batch's."""
    its = items(EDGE_LENGTHS)
    rows, b = packed_batch(its)
    lengths = packed_lengths(b["position_ids"])
    assert [SEQ] in lengths and any(sum(map(len, (its[i]["input_ids"] for i in r))) < b["input_ids"].shape[1]
                                    for r in rows) and min(map(min, lengths)) == 1
    m = model_of(hf, variant)
    m = m.to(dtype) if variant == "base" else FusedLlama.from_pretrained(hf, dtype=dtype, adapter=AdapterConfig(
        variant, 4, 8.0))
    if variant != "base":
        randomize_adapter(m, 0)
    ref = copy.deepcopy(m).to(torch.float64).eval()
    got, grads = {}, {}
    for form in (True, False):
        forced(monkeypatch, form)
        with torch.no_grad():
            got[form] = m.eval()(b["input_ids"], position_ids=b["position_ids"]).logits
        if variant != "base":
            m.train().zero_grad()
            m(b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss.backward()
            grads[form] = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        for r, row in enumerate(rows):
            t = 0
            for i in row:
                n = len(its[i]["input_ids"])
                alone = ref(torch.tensor([its[i]["input_ids"]])).logits[0]
                err = {f: rel_err(got[f][r, t:t + n].double(), alone) for f in got}
                assert err[True] <= 2 * err[False] + eps, (r, i, err)
                t += n
    if variant == "base":
        return
    plain = collate(its, 0)
    ref.train()
    ref(**{k: plain[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    for name, p in ref.named_parameters():
        if p.requires_grad:
            err = {f: rel_err(grads[f][name].double(), p.grad) for f in grads}
            assert err[True] <= 2 * err[False] + eps, (name, err)


# ------------------------------------------------------------------ training
def fused(ckpt, variant="ffba", seed=0):
    torch.manual_seed(seed)
    return FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig(variant, 4, 8.0))


def cfg(**kw):
    base = dict(lr=1e-2, max_steps=6, batch_size=2, seq_len=32, progress=False, max_grad_norm=None, pack=True)
    return TrainConfig(**{**base, **kw})


def test_first_step_loss_is_the_token_mean_of_its_examples(ckpt, tok):
    """The loop's reduction with packed rows: step 1's loss (before any update) is the
    token-mean of the examples its rows hold, computed padded and apart; its tokens
    count no padding."""
    ds = TokenizedDataset(records(n=40), tok, 32)
    c = cfg(max_steps=1, grad_accum=2)
    rows = pack_rows([len(it["input_ids"]) for it in ds], c.seq_len)
    assert len(rows) < len(ds) // 2  # several examples a row
    ex = [i for r in epoch_order(len(rows), c.seed, 0)[:4] for i in rows[r]]
    ref = fused(ckpt).train()
    plain = collate([ds[i] for i in ex], 0)
    with torch.no_grad():
        want = ref(**plain).loss.item()
    res = train(fused(ckpt), tok, ds, config=c)
    assert res.history[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert res.history[0]["tokens"] == sum(len(ds[i]["input_ids"]) for i in ex)


def test_packed_resume_after_interrupt_equals_uninterrupted(ckpt, tok, tmp_path):
    c = cfg(max_steps=7, save_every=2, grad_accum=2, lr_schedule="cosine", warmup_steps=2)
    ds = TokenizedDataset(records(n=40), tok, 32)
    assert len(pack_rows([len(it["input_ids"]) for it in ds], 32)) // 4 < 7  # crosses an epoch
    r_ref = train(fused(ckpt, seed=1), tok, ds, config=c, out_dir=tmp_path / "ref")

    def stop_at_5(step, rec):
        if step == 5:
            raise Interrupted("simulated interruption")

    with pytest.raises(Interrupted):
        train(fused(ckpt, seed=1), tok, ds, config=c, out_dir=tmp_path / "run", callback=stop_at_5)
    m2 = fused(ckpt, seed=99)
    r2 = train(m2, tok, ds, config=c, out_dir=tmp_path / "run", resume=True)
    assert [h["loss"] for h in r2.history] == [h["loss"] for h in r_ref.history]
    assert [h["tokens"] for h in r2.history] == [h["tokens"] for h in r_ref.history]
    ref = FusedLlama.from_pretrained(str(ckpt), adapter=str(tmp_path / "ref" / "checkpoint" / "adapter"))
    for k, v in ref.adapter_state_dict().items():
        assert torch.equal(m2.adapter_state_dict()[k], v), k
    # packing is part of what a resume must match
    with pytest.raises(ValueError, match="pack"):
        train(fused(ckpt), tok, ds, config=cfg(max_steps=7, save_every=2, grad_accum=2, lr_schedule="cosine",
                                                warmup_steps=2, pack=False),
              out_dir=tmp_path / "run", resume=True)


def test_pack_refuses_what_it_cannot_do(ckpt, tok):
    with pytest.raises(ValueError, match="group_by_length has nothing to group"):
        cfg(group_by_length=True).validate()
    with pytest.raises(ValueError, match="pack=True needs a model that runs packed rows"):
        train(llama_model().train(), tok, records(n=8), config=cfg())
    with pytest.raises(ValueError, match=r"40 training examples pack into \d+ rows of up to 32 tokens, fewer than"):
        train(fused(ckpt), tok, records(n=40), config=cfg(batch_size=40))


def test_cli_train_pack(ckpt, tmp_path, capsys):
    from flora.cli import main
    from flora.synthetic import write_jsonl

    data = write_jsonl(records(n=32), tmp_path / "train.jsonl")
    argv = ["train", "--model", str(ckpt), "--data", str(data), "--variant", "zflora", "--rank", "4",
            "--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--no-progress", "--pack"]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 0
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert log["steps"] == 3 and all(h["tokens"] > 32 for h in log["history"])  # more than one example a row
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "o2"), "--group-by-length"]) == 2
    assert "--pack fills each row to --seq-len already" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
