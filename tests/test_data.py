"""flora.data: JSONL loading, completion-only labels, truncation, collation."""
import json

import pytest
import torch
from _train_helpers import CHAT_TEMPLATE

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
    ('{"input": "x"}', "expected keys 'prompt' and 'completion', 'text', or 'messages'"),
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


# -------------------------------------------------------- conversations ("messages")


@pytest.fixture
def chat_tok(tok_dir):
    t = load_tokenizer(tok_dir)
    t.chat_template = CHAT_TEMPLATE
    return t


def _conv(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def _ids_of(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_messages_train_on_assistant_turns_only(chat_tok):
    msgs = _conv(("system", "copy"), ("user", "copy : a b"), ("assistant", "a b"),
                 ("user", "max : 3 7"), ("assistant", "7"))
    t = tokenize_record({"messages": msgs}, chat_tok, seq_len=64)
    # independent reference: the template's text, tokenized piece by piece by hand
    p1 = _ids_of(chat_tok, "s : copy </s> u : copy : a b </s> a :", special=True)
    a1 = _ids_of(chat_tok, "a b </s>")
    p2 = _ids_of(chat_tok, "u : max : 3 7 </s> a :")
    a2 = _ids_of(chat_tok, "7 </s>")
    assert p1[0] == chat_tok.bos_token_id
    assert t["input_ids"] == p1 + a1 + p2 + a2
    assert t["labels"] == [IGNORE_INDEX] * len(p1) + a1 + [IGNORE_INDEX] * len(p2) + a2
    assert not t["truncated"]
    # the tokens before the last answer are what generation is given for that turn
    gen_prompt = chat_tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert t["input_ids"][:len(p1 + a1 + p2)] == _ids_of(chat_tok, gen_prompt, special=True)
    # a conversation ending with a user turn: that turn is context, not a target
    t2 = tokenize_record({"messages": msgs[:3] + msgs[3:4]}, chat_tok, seq_len=64)
    u = _ids_of(chat_tok, "u : max : 3 7 </s>")
    assert t2["input_ids"] == p1 + a1 + u and t2["labels"] == [IGNORE_INDEX] * len(p1) + a1 + [IGNORE_INDEX] * len(u)


def test_messages_truncation_keeps_bos_and_last_answer(chat_tok):
    msgs = _conv(("user", "copy : a b c d e f g h"), ("assistant", "a b c d e f g h"),
                 ("user", "max : 3"), ("assistant", "3"))
    full = tokenize_record({"messages": msgs}, chat_tok, seq_len=256)
    t = tokenize_record({"messages": msgs}, chat_tok, seq_len=12)
    assert t["truncated"] and len(t["input_ids"]) == 12
    last = _ids_of(chat_tok, "3 </s>")
    assert t["input_ids"][0] == chat_tok.bos_token_id
    assert t["input_ids"][-2:] == last and t["labels"][-2:] == last
    # the rest is the full record's tokens and labels just before the last answer, cut from the left
    n = 12 - 1 - 2
    assert t["input_ids"][1:-2] == full["input_ids"][-2 - n:-2]
    assert t["labels"][1:-2] == full["labels"][-2 - n:-2]
    assert any(l != IGNORE_INDEX for l in t["labels"][1:-2])  # the first answer's tail still trains


@pytest.mark.parametrize("msgs, msg", [
    ("hi", "'messages' must be a non-empty list"),
    ([], "'messages' must be a non-empty list"),
    ([{"role": "human", "content": "x"}], r"messages\[0\] must be an object with a 'role'"),
    ([{"role": "user", "content": 3}], r"messages\[0\] must be an object"),
    ([{"role": "assistant", "content": "x"}], r"messages\[0\] is an assistant turn"),
    ([{"role": "user", "content": "x"}], "no assistant message with content"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], "no assistant message with content"),
])
def test_messages_errors_name_the_line(tmp_path, msgs, msg):
    p = _write(tmp_path / "d.jsonl", [json.dumps({"text": "ok"}), json.dumps({"messages": msgs})])
    with pytest.raises(ValueError, match="d.jsonl:2: " + msg):
        load_jsonl(p)


def test_messages_need_a_turn_by_turn_chat_template(tok_dir, chat_tok):
    msgs = _conv(("user", "copy : a"), ("assistant", "a"), ("user", "copy : b"), ("assistant", "b"))
    plain = load_tokenizer(tok_dir)
    with pytest.raises(ValueError, match="record 0: a 'messages' record needs a tokenizer with a chat template"):
        TokenizedDataset([{"messages": msgs}], plain, seq_len=64)
    # a template that drops earlier answers: the prompts it trains on are not generation's
    chat_tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                              "{{ m['role'][0] }} : {{ m['content'] }} </s> {% endif %}{% endfor %}"
                              "{% if add_generation_prompt %}a : {% endif %}")
    with pytest.raises(ValueError, match=r"record 0: the chat template does not render this conversation turn by turn"):
        TokenizedDataset([{"messages": msgs}], chat_tok, seq_len=64)
    chat_tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="record 0: the chat template rejects this conversation: roles must alternate"):
        TokenizedDataset([{"messages": msgs}], chat_tok, seq_len=64)


def test_messages_load_as_prompts_with_their_last_answer(tmp_path):
    from flora.data import load_prompts

    conv = _conv(("user", "copy : a"), ("assistant", "a"), ("user", "copy : b"), ("assistant", "b"))
    p = _write(tmp_path / "d.jsonl", [json.dumps({"messages": conv}), json.dumps({"messages": conv[:3]}),
                                      json.dumps({"prompt": "copy : c", "completion": "c"})])
    assert load_prompts(p) == [{"messages": conv[:3], "completion": "b"},
                               {"messages": conv[:3], "completion": None},
                               {"prompt": "copy : c", "completion": "c"}]
    assert load_jsonl(p)[0] == {"messages": conv}
