"""flora.synthetic: corpus, held-out tasks, tokenizer, cached pretrained base model."""
import dataclasses
import json
import string

import pytest
import torch

from flora import synthetic as syn

TINY = syn.BaseModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, corpus_size=512, steps=12, batch_size=16, lr=1e-2)


def test_corpus_is_deterministic_and_in_vocabulary():
    a, b = syn.pretraining_corpus(300, seed=1), syn.pretraining_corpus(300, seed=1)
    assert a == b and a != syn.pretraining_corpus(300, seed=2)
    vocab = set(syn.VOCAB)
    for r in a:
        assert set(r["text"].split()) <= vocab
    heads = {r["text"].split()[0] for r in a}
    assert {"copy", "reverse", "sort", "count", "max", "is", "the"} <= heads  # every task appears


def test_pretraining_tasks_are_correct():
    import random

    rng = random.Random(0)
    for _ in range(50):
        w = syn._pre_reverse(rng)
        i = w.index("=")
        assert w[i + 1:] == w[2:i][::-1]
        w = syn._pre_sort(rng)
        i = w.index("=")
        assert [int(x) for x in w[i + 1:]] == sorted(int(x) for x in w[2:i])


def _subject(words):
    # first noun of "topic : the [adj]* NOUN verb ..."
    i = 3
    while words[i] in syn.ADJECTIVES:
        i += 1
    return words[i]


def test_topic_labels_are_the_subject_category():
    recs = syn.finetune_data("topic", 400, seed=3)
    cat_of = {n: c for c, ns in syn.CATEGORIES.items() for n in ns}
    labels = set()
    for r in recs:
        w = r["prompt"].split()
        assert w[:3] == ["topic", ":", "the"] and w[-1] == "->"
        assert r["completion"] == cat_of[_subject(w)]
        objs = [x for x in w[4:] if x in cat_of]
        assert cat_of[objs[-1]] != r["completion"]  # the object is always of another category
        labels.add(r["completion"])
    assert labels == {"animal", "vehicle", "food"}


def test_shift_completions_are_successor_letters():
    for r in syn.finetune_data("shift", 300, seed=4):
        src = r["prompt"].split()[2:-1]
        want = [chr(ord(c) + 1) for c in src]
        assert 3 <= len(src) <= 5 and r["completion"].split() == want


def test_between_holds_out_letter_pairs():
    def pairs(split):
        out = set()
        for r in syn.finetune_data("between", 400, seed=5, split=split):
            w = r["prompt"].split()
            i, j = string.ascii_lowercase.index(w[1]), string.ascii_lowercase.index(w[3])
            assert w[0] == "between" and w[2] == "and" and w[-1] == "->"
            assert r["completion"].split() == list(string.ascii_lowercase[i + 1:j])
            out.add((i, j))
        return out

    train, ev = pairs("train"), pairs("eval")
    assert train and ev and not train & ev  # no evaluated pair is ever trained on


def test_splits_and_seeds_differ_and_unknown_task():
    assert syn.finetune_data("shift", 50, 0, "train") != syn.finetune_data("shift", 50, 0, "eval")
    assert syn.finetune_data("shift", 50, 0) == syn.finetune_data("shift", 50, 0)
    with pytest.raises(ValueError, match="unknown fine-tuning task 'nope'"):
        syn.finetune_data("nope", 3)


def test_tokenizer_round_trip_offline(tmp_path):
    from transformers import AutoTokenizer

    syn.build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(tok) == len(syn.VOCAB)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == tuple(
        syn.VOCAB.index(t) for t in ("<s>", "</s>", "<pad>"))
    texts = [r["text"] for r in syn.pretraining_corpus(100)]
    texts += [r["prompt"] + " " + r["completion"] for t in syn.FINETUNE_TASKS for r in syn.finetune_data(t, 50)]
    for t in texts:
        ids = tok(t)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert ids[1:] == [syn.VOCAB.index(w) for w in t.split()]  # one id per word
        assert tok.decode(ids, skip_special_tokens=True) == t


def test_write_jsonl_atomic(tmp_path):
    p = syn.write_jsonl([{"text": "a"}, {"text": "b"}], tmp_path / "x" / "d.jsonl")
    assert [json.loads(l) for l in p.read_text().splitlines()] == [{"text": "a"}, {"text": "b"}]
    assert [q.name for q in p.parent.iterdir()] == ["d.jsonl"]


def test_build_base_model_trains_saves_and_caches(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    d = syn.build_base_model(TINY, cache_dir=tmp_path, progress=False, log=None)
    assert d.name == f"llama-{TINY.key()}" and d.parent == tmp_path
    meta = json.loads((d / "synthetic_config.json").read_text())
    m = LlamaForCausalLM.from_pretrained(str(d))
    assert m.config.vocab_size == len(syn.VOCAB) and m.config.hidden_size == 32
    # pretraining lowered the loss below a freshly initialised model's (about ln(vocab))
    assert meta["final_train_loss"] < 0.9 * torch.log(torch.tensor(float(len(syn.VOCAB)))).item()
    # cached: a second call does not train (train() would fail here)
    import flora.train

    monkeypatch.setattr(flora.train, "train", lambda *a, **k: pytest.fail("retrained a cached model"))
    assert syn.build_base_model(TINY, cache_dir=tmp_path, log=None) == d
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    # any change to the recipe is a different cache entry
    assert dataclasses.replace(TINY, steps=13).key() != TINY.key()
    assert dataclasses.replace(TINY, seed=1).key() != TINY.key()


def test_base_model_loads_into_fused_llama(tmp_path):
    flora = pytest.importorskip("flora")
    d = syn.build_base_model(TINY, cache_dir=tmp_path, progress=False, log=None)
    from transformers import LlamaForCausalLM

    ids = torch.tensor([[1] + [syn.VOCAB.index(w) for w in "copy : a b = a b".split()]])
    ref = LlamaForCausalLM.from_pretrained(str(d)).eval()(ids).logits
    got = flora.FusedLlama.from_pretrained(str(d)).eval()(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
