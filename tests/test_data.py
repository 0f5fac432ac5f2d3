"""flora.data: JSONL loading, completion-only labels, truncation, collation."""
import json

import pytest
import torch

from flora.data import (IGNORE_INDEX, TokenizedDataset, collate, count_target_tokens, load_jsonl,
                        load_tokenizer, tokenize_record)
from flora.synthetic import build_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def _write(path, lines):
    path.write_text("".join(l + "\n" for l in lines))
    return path


def test_load_jsonl_both_formats(tmp_path):
    p = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "copy : a", "completion": "a", "extra": 1}), "",
                                       json.dumps({"text": "the cat sees the dog ."})])
    assert load_jsonl(p) == [{"prompt": "copy : a", "completion": "a"}, {"text": "the cat sees the dog ."}]


@pytest.mark.parametrize("line, msg", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}', "'completion'"),
    ('{"prompt": "x", "completion": 3}', "'completion'"),
    ('{"prompt": "x", "completion": ""}', "empty 'completion'"),
    ('{"input": "x"}', "expected keys 'prompt' and 'completion', or 'text'"),
    ('[1, 2]', "expected a JSON object"),
    ('{"text": ""}', "'text' must be a non-empty string"),
])
def test_load_jsonl_errors_name_the_line(tmp_path, line, msg):
    p = _write(tmp_path / "d.jsonl", [json.dumps({"text": "ok"}), line])
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        load_jsonl(p)


def test_load_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no records"):
        load_jsonl(_write(tmp_path / "e.jsonl", ["", "  "]))


def test_tokenizer_loads_offline_and_missing_dir(tok_dir, tmp_path):
    t = load_tokenizer(tok_dir)
    assert t.decode(t("copy : a b = a b")["input_ids"], skip_special_tokens=True) == "copy : a b = a b"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no usable tokenizer"):
        load_tokenizer(tmp_path)  # exists, but holds no tokenizer


def test_labels_cover_completion_and_eos_only(tok):
    rec = {"prompt": "shift : a b c ->", "completion": "b c d"}
    t = tokenize_record(rec, tok, seq_len=64)
    # independent reference: the tokenizer's own ids for each part
    p_ids = tok(rec["prompt"])["input_ids"]
    c_ids = tok(rec["completion"], add_special_tokens=False)["input_ids"]
    assert p_ids[0] == tok.bos_token_id
    assert t["input_ids"] == p_ids + c_ids + [tok.eos_token_id]
    assert t["labels"] == [IGNORE_INDEX] * len(p_ids) + c_ids + [tok.eos_token_id]
    assert not t["truncated"]


def test_text_records_train_on_every_token(tok):
    t = tokenize_record({"text": "the cat is happy ."}, tok, seq_len=64)
    assert t["labels"] == t["input_ids"] == tok("the cat is happy .")["input_ids"] + [tok.eos_token_id]


def test_truncation_keeps_bos_and_completion(tok):
    rec = {"prompt": "copy : a b c d e f g h", "completion": "a b c"}
    t = tokenize_record(rec, tok, seq_len=7)
    assert t["truncated"] and len(t["input_ids"]) == 7
    c = tok("a b c", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert t["input_ids"][0] == tok.bos_token_id
    assert t["input_ids"][-4:] == c and t["labels"][-4:] == c
    assert t["input_ids"][1:3] == tok("g h", add_special_tokens=False)["input_ids"]  # prompt cut from the left
    assert t["labels"][:3] == [IGNORE_INDEX] * 3
    # a completion longer than the window is cut from the right, one prompt token kept
    t2 = tokenize_record({"prompt": "copy :", "completion": "a b c d e f"}, tok, seq_len=4)
    assert t2["input_ids"] == [tok.bos_token_id, tok(":", add_special_tokens=False)["input_ids"][0]] + \
        tok("a b", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="seq_len"):
        tokenize_record(rec, tok, seq_len=1)


def test_dataset_warns_on_truncation(tok):
    with pytest.warns(UserWarning, match="1 of 2 examples were longer"):
        ds = TokenizedDataset([{"prompt": "copy : a b c d e f", "completion": "a"},
                               {"prompt": "copy : a", "completion": "a"}], tok, seq_len=6)
    assert len(ds) == 2 and all(len(it["input_ids"]) <= 6 for it in ds.items)


def test_collate_pads_right_with_masked_labels(tok):
    items = [tokenize_record({"prompt": "copy : a b", "completion": "a b"}, tok, 64),
             tokenize_record({"prompt": "max : 3", "completion": "3"}, tok, 64)]
    b = collate(items, pad_id=tok.pad_token_id, pad_to_multiple_of=3)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert (n0, n1) == (8, 6) and b["input_ids"].shape == (2, 9)  # 8 rounded up to a multiple of 3
    assert b["attention_mask"][0].tolist() == [1] * n0 + [0] * (9 - n0)
    assert b["attention_mask"][1].tolist() == [1] * n1 + [0] * (9 - n1)
    assert (b["input_ids"][1, n1:] == tok.pad_token_id).all()
    assert (b["labels"][1, n1:] == IGNORE_INDEX).all()
    assert b["labels"][0, :n0].tolist() == items[0]["labels"]
    # target tokens after the shift: completion + EOS of each example
    assert count_target_tokens(b["labels"]) == 3 + 2
    assert b["input_ids"].dtype == torch.long
