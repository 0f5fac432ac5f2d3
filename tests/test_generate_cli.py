"""`flora generate` and the library pieces under it (flora.pretrained.complete,
flora.data.prompt_ids / load_prompts), against per-prompt generate() calls and
separately loaded models; its continuous batches (flora serve's engine)
against the static batches of flora.pretrained.complete, on random models and
on SmolLM2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from _train_helpers import records, tiny_checkpoint, with_chat_template

from flora import FusedLlama
from flora.bench.latency import randomize_adapter
from flora.cli import main
from flora.config import AdapterConfig
from flora.data import load_prompts, load_tokenizer, prompt_ids
from flora.pretrained import complete
from flora.synthetic import write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    ckpt = tiny_checkpoint(d / "ckpt", seed=3)
    m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("ffba", 4, 8))
    randomize_adapter(m, seed=0)  # a non-zero adapter: its generations differ from the base's
    m.save_adapter(d / "adapter")
    recs = records(n=6, split="eval")
    data = write_jsonl(recs, d / "eval.jsonl")
    return d, ckpt, d / "adapter", data, recs


def _alone(model, tok, prompt, n):
    """Reference: one prompt, no padding, generate() directly; new ids up to the first EOS."""
    ids = torch.tensor([prompt_ids(tok, prompt)])
    row = model.generate(ids, max_new_tokens=n)[0, ids.shape[1]:].tolist()
    eos = model.generation_eos_token_id
    k = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
    return tok.decode(row[:k], skip_special_tokens=True).strip(), k


def test_complete_batches_match_one_prompt_at_a_time(setup):
    _, ckpt, adapter, _, recs = setup
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(adapter))
    tok = load_tokenizer(ckpt)
    prompts = [r["prompt"] for r in recs] + ["a", "between a and z -> b c d"]  # several lengths: left padding
    got = complete(m, tok, prompts, max_new_tokens=10, batch_size=3)
    assert len(got) == len(prompts)
    for p, c in zip(prompts, got):
        assert (c.text, c.tokens) == _alone(m, tok, p, 10)
    with pytest.raises(ValueError, match="batch_size"):
        complete(m, tok, prompts, batch_size=0)


def test_prompt_ids_add_no_second_bos(setup):
    _, ckpt, *_ = setup
    tok = load_tokenizer(ckpt)
    plain = prompt_ids(tok, "a b")
    assert plain[0] == tok.bos_token_id
    assert prompt_ids(tok, tok.bos_token + " a b") == plain  # a template's BOS is the only one


def test_cli_generate_compare_and_out(setup, tmp_path, capsys):
    _, ckpt, adapter, data, recs = setup
    out = tmp_path / "res.jsonl"
    argv = ["generate", "--model", str(ckpt), "--adapter", str(adapter), "--compare", "--data", str(data),
            "--max-new-tokens", "8", "--batch-size", "4", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(ckpt)
    on = FusedLlama.from_pretrained(str(ckpt), adapter=str(adapter))
    base = FusedLlama.from_pretrained(str(ckpt))  # the base loaded alone: --compare's adapter-off run
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in recs]
    for row, rec in zip(rows, recs):
        assert row["adapter"] == _alone(on, tok, rec["prompt"], 8)[0]
        assert row["base"] == _alone(base, tok, rec["prompt"], 8)[0]
        assert row["reference"] == rec["completion"]
    assert any(r["adapter"] != r["base"] for r in rows)
    std = capsys.readouterr()
    summary = json.loads(std.err.strip().splitlines()[-1])
    hits = sum(r["adapter"] == r["reference"].strip() for r in rows)
    assert summary["runs"]["adapter"]["exact_match"] == f"{hits}/{len(rows)}"
    assert summary["prompts"] == len(rows) and "[base]" in std.out


def test_cli_generate_switches_several_adapters(setup, tmp_path, capsys):
    _, ckpt, adapter, data, recs = setup
    m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("ffba", 4, 8))
    randomize_adapter(m, seed=1)  # same structure, other values
    m.save_adapter(tmp_path / "second")
    out = tmp_path / "res.jsonl"
    assert main(["generate", "--model", str(ckpt), "--adapter", str(adapter), "--adapter", str(tmp_path / "second"),
                 "--compare", "--data", str(data), "--max-new-tokens", "8", "--device", "cpu",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(ckpt)
    refs = {"adapter1": FusedLlama.from_pretrained(str(ckpt), adapter=str(adapter)),
            "adapter2": FusedLlama.from_pretrained(str(ckpt), adapter=str(tmp_path / "second")),
            "base": FusedLlama.from_pretrained(str(ckpt))}
    for row, rec in zip(rows, recs):
        for label, model in refs.items():
            assert row[label] == _alone(model, tok, rec["prompt"], 8)[0], label
    assert any(r["adapter1"] != r["adapter2"] for r in rows)
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["adapters"] == {"adapter1": str(adapter), "adapter2": str(tmp_path / "second")}
    # adapters of another structure cannot share the model: one line, exit 2
    z = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("zflora", 4, 8))
    z.save_adapter(tmp_path / "z")
    assert main(["generate", "--model", str(ckpt), "--adapter", str(adapter), "--adapter", str(tmp_path / "z"),
                 "--data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora generate: error:") and "structure" in err and "\n" not in err
    assert main(["generate", "--model", str(ckpt), "--adapter", str(adapter), "--adapter", str(adapter),
                 "--data", str(data), "--device", "cpu"]) == 2
    assert "twice" in capsys.readouterr().err


def test_cli_generate_mixed_runs_every_adapter_in_one_batch(setup, tmp_path, capsys):
    """--mixed: the adapters (and the base) side by side, each prompt once per run in
    the same batches; every completion as the adapter alone gives it."""
    _, ckpt, adapter, data, recs = setup
    m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("ffba", 4, 16))  # its own alpha
    randomize_adapter(m, seed=2)
    m.save_adapter(tmp_path / "second")
    out = tmp_path / "mixed.jsonl"
    assert main(["generate", "--model", str(ckpt), "--adapter", str(adapter), "--adapter", str(tmp_path / "second"),
                 "--compare", "--mixed", "--data", str(data), "--limit", "4", "--max-new-tokens", "8",
                 "--batch-size", "5", "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(ckpt)
    refs = {"adapter1": FusedLlama.from_pretrained(str(ckpt), adapter=str(adapter)),
            "adapter2": FusedLlama.from_pretrained(str(ckpt), adapter=str(tmp_path / "second")),
            "base": FusedLlama.from_pretrained(str(ckpt))}
    assert len(rows) == 4
    for row, rec in zip(rows, recs):
        for label, model in refs.items():
            assert row[label] == _alone(model, tok, rec["prompt"], 8)[0], label
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["runs"]["mixed"]["new_tokens"] > 0 and set(summary["runs"]) == {"mixed", "adapter1", "adapter2", "base"}
    assert main(["generate", "--model", str(ckpt), "--mixed", "--prompt", "x", "--device", "cpu"]) == 2
    assert "--mixed needs --adapter" in capsys.readouterr().err
    f = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("ffa", 4, 8))
    f.save_adapter(tmp_path / "ffa")
    assert main(["generate", "--model", str(ckpt), "--adapter", str(tmp_path / "ffa"), "--mixed", "--prompt", "x",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora generate: error:") and "repeat-add" in err and "\n" not in err


def test_cli_generate_one_prompt_streams(setup, capsys):
    _, ckpt, adapter, _, recs = setup
    prompt = recs[0]["prompt"]
    assert main(["generate", "--model", str(ckpt), "--adapter", str(adapter), "--prompt", prompt,
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0
    text = _alone(FusedLlama.from_pretrained(str(ckpt), adapter=str(adapter)), load_tokenizer(ckpt), prompt, 8)[0]
    assert capsys.readouterr().out.strip() == f"[adapter] {text}"


def _eos_prone(src, dest, adapter, prompts: list, n: int):
    """A copy of checkpoint ``src`` whose EOS (id 2) takes the place of a token that
    the greedy answers of ``prompts`` (with the adapter and without) first hold at many
    different positions: its output row that token's, a little larger. Answers that
    end at many lengths."""
    from collections import defaultdict

    from transformers import LlamaForCausalLM

    tok, where = load_tokenizer(src), defaultdict(set)  # token -> (run, position of its first occurrence)
    for a in (None, adapter):
        m = FusedLlama.from_pretrained(str(src), adapter=a and str(a))
        for p in prompts:
            ids = torch.tensor([prompt_ids(tok, p)])
            new = m.generate(ids, max_new_tokens=n, eos_token_id=[])[0, ids.shape[1]:].tolist()
            for t in set(new):
                where[t].add((a, new.index(t)))
    common = max(where, key=lambda t: (min(sum(r == a for r, _ in where[t]) for a in (None, adapter)),
                                       len(where[t])))  # most lengths in the poorer run, then in both
    hf = LlamaForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        hf.lm_head.weight[2] = hf.lm_head.weight[common] * 1.05
    shutil.copytree(src, dest)
    hf.save_pretrained(str(dest))
    return dest


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().err.strip().splitlines()[-1])


PREFIX = "copy : a b c d e f g h i j k l m n o p q r s t u ;"  # > 16 tokens: a whole block reused


def test_cli_generate_continuous_batches_match_static_batches(setup, tmp_path, capsys):
    """--data on the engine: rows that end early give their place to the next prompt,
    prompts sharing a prefix reuse its keys and values; the greedy completions (and
    their token counts) are those of today's static batches (complete()) and of each
    prompt alone, in the records' order, under --limit, for the adapter and the base
    (switched between runs)."""
    _, ckpt, adapter, _, _ = setup
    # a random model's answers follow the prompt's last tokens: a letter each
    recs = [{"prompt": f"{PREFIX} between {w}"} for w in "vwxyzkmqj"]
    eos = _eos_prone(ckpt, tmp_path / "eos", adapter, [r["prompt"] for r in recs], 12)
    data = write_jsonl(recs, tmp_path / "shared.jsonl")
    out = tmp_path / "res.jsonl"
    assert main(["generate", "--model", str(eos), "--adapter", str(adapter), "--compare", "--data", str(data),
                 "--limit", "8", "--max-new-tokens", "12", "--batch-size", "3", "--device", "cpu",
                 "--out", str(out)]) == 0
    summary = _summary(capsys)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in recs[:8]]
    tok = load_tokenizer(eos)
    prompts = [r["prompt"] for r in recs[:8]]
    for label, model in {"adapter": FusedLlama.from_pretrained(str(eos), adapter=str(adapter)),
                         "base": FusedLlama.from_pretrained(str(eos))}.items():
        static = complete(model, tok, prompts, max_new_tokens=12, batch_size=3)
        assert [r[label] for r in rows] == [c.text for c in static], label
        assert [(c.text, c.tokens) for c in static] == [_alone(model, tok, p, 12) for p in prompts]
        run = summary["runs"][label]
        assert run["new_tokens"] == sum(c.tokens for c in static)
        assert len({c.tokens for c in static}) > 2  # answers of several lengths: rows leave early
        # every prompt admitted after the first three reused the shared prefix's block at least
        assert run["cached_prompt_tokens"] >= 16 * 5
        assert run["prompt_tokens"] == sum(len(prompt_ids(tok, p)) for p in prompts)


def test_cli_generate_seeds_are_per_prompt(setup, tmp_path, capsys):
    """--seed S: prompt i samples with its own generator seeded S + i, as generate()
    gives it alone with that seed; so its text does not depend on --batch-size or on the
    prompts beside it, and --compare's runs sample with the same seeds."""
    _, ckpt, adapter, data, recs = setup
    eos = _eos_prone(ckpt, tmp_path / "eos", adapter, [r["prompt"] for r in recs], 10)
    texts = {}
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}.jsonl"
        assert main(["generate", "--model", str(eos), "--adapter", str(adapter), "--compare", "--data", str(data),
                     "--max-new-tokens", "10", "--temperature", "1.5", "--top-k", "20", "--seed", "7",
                     "--batch-size", str(bs), "--device", "cpu", "--out", str(out)]) == 0
        texts[bs] = [json.loads(line) for line in out.read_text().splitlines()]
    assert texts[1] == texts[4]
    tok = load_tokenizer(eos)
    models = {"adapter": FusedLlama.from_pretrained(str(eos), adapter=str(adapter)),
              "base": FusedLlama.from_pretrained(str(eos))}
    eos_id = 2
    for i, (row, rec) in enumerate(zip(texts[4], recs)):
        ids = torch.tensor([prompt_ids(tok, rec["prompt"])])
        for label, m in models.items():
            new = m.generate(ids, max_new_tokens=10, temperature=1.5, top_k=20, seed=7 + i)[0, ids.shape[1]:].tolist()
            k = next((j + 1 for j, t in enumerate(new) if t == eos_id), len(new))
            assert row[label] == tok.decode(new[:k], skip_special_tokens=True).strip(), (label, i)
    greedy = [_alone(models["base"], tok, r["prompt"], 10)[0] for r in recs]
    assert [r["base"] for r in texts[4]] != greedy  # it sampled
    capsys.readouterr()


def test_cli_generate_compile_keeps_static_batches(setup, monkeypatch, capsys):
    """--compile runs complete()'s static batches (the engine's steps are eager): its decode
    steps go through compiled_decode (here: eager, not compiled, to keep the test quick)."""
    import flora.generation as gen

    _, ckpt, adapter, data, recs = setup
    calls = []

    def compiled_decode(device_type="cpu"):
        calls.append(device_type)
        return gen._decode

    monkeypatch.setattr(gen, "compiled_decode", compiled_decode)
    assert main(["generate", "--model", str(ckpt), "--adapter", str(adapter), "--data", str(data), "--limit", "3",
                 "--max-new-tokens", "6", "--compile", "--device", "cpu"]) == 0
    summary = _summary(capsys)
    assert calls and "note" in summary["runs"]["adapter"] and "cached_prompt_tokens" not in summary["runs"]["adapter"]
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(adapter))
    assert summary["runs"]["adapter"]["new_tokens"] == sum(_alone(m, load_tokenizer(ckpt), r["prompt"], 6)[1]
                                                           for r in recs[:3])


def test_cli_generate_real_model_matches_static_batches(gguf_path, tmp_path, capsys):
    """SmolLM2 (real weights and tokenizer): chat prompts under one system prompt, on the
    engine (continuous batches, the system prompt's keys and values reused), give the
    greedy completions and token counts of today's static batches; answers end at the
    model's EOS at several lengths."""
    from flora.pretrained import chat_prompt, load_tokenizer

    system = ("You are a careful assistant for a small science museum. Answer briefly and exactly. "
              "Tickets cost eight euros for adults and four for children; under fives are free. The "
              "exhibits are the planets hall, the insect room, the water lab and the dinosaur gallery.")
    questions = ["What is the capital of France?", "Write a long story about a dinosaur.", "Name a planet.",
                 "How much is a ticket for a child?", "What do bees make?", "Which exhibits are there?"]
    data = write_jsonl([{"prompt": q} for q in questions], tmp_path / "q.jsonl")
    out = tmp_path / "res.jsonl"
    assert main(["generate", "--model", gguf_path, "--data", str(data), "--chat", "--system", system,
                 "--max-new-tokens", "24", "--batch-size", "2", "--device", "cpu", "--out", str(out)]) == 0
    run = _summary(capsys)["runs"]["base"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    m = FusedLlama.from_pretrained(gguf_path, dtype=torch.float32)
    tok = load_tokenizer(gguf_path)
    static = complete(m, tok, [chat_prompt(tok, q, system) for q in questions], max_new_tokens=24, batch_size=2)
    assert [r["base"] for r in rows] == [c.text for c in static]
    assert run["new_tokens"] == sum(c.tokens for c in static)
    assert min(c.tokens for c in static) < 24 and max(c.tokens for c in static) == 24
    # the first two start together: the second copies what it shares with the first from that one's row
    # (computed once); the later four reused the system prompt's 48-token blocks, less what rows joining
    # together computed again (each prefills the longest new part among them: cached_tokens counts copies)
    from flora.data import prompt_ids
    from flora.prefix_cache import common_length

    first, second = (prompt_ids(tok, chat_prompt(tok, q, system)) for q in questions[:2])
    shared = common_length(first, second)
    assert shared > 48 and shared + 3 * 48 < run["cached_prompt_tokens"] <= shared + 4 * 48


@pytest.mark.parametrize("extra, msg", [
    (["--compare"], "--compare needs --adapter"),
    (["--system", "be brief"], "--system needs --chat"),
    (["--chat"], "no chat template"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--limit", "0"], "--limit"),
    (["--limit", "2", "--prompt", "a"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--temperature", "-1"], "temperature"),
    (["--top-k", "-1"], "top_k must be an integer >= 0"),
])
def test_cli_generate_bad_input_is_one_line(setup, capsys, extra, msg):
    _, ckpt, _, data, _ = setup
    src = [] if "--prompt" in extra else ["--data", str(data)]
    assert main(["generate", "--model", str(ckpt), "--device", "cpu"] + src + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora generate: error:") and msg in err and "\n" not in err


def test_cli_generate_bad_files(setup, tmp_path, capsys):
    _, ckpt, _, data, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    long = write_jsonl([{"prompt": "a"}, {"prompt": " ".join(["a"] * 70)}], tmp_path / "long.jsonl")  # context: 64
    cases = [["--data", str(tmp_path / "none.jsonl")], ["--data", str(bad)], ["--data", str(long)],
             ["--data", str(data), "--out", str(data)], ["--data", str(data), "--out", str(tmp_path)],
             ["--data", str(data), "--out", str(tmp_path / "no" / "x.jsonl")],
             ["--data", str(data), "--adapter", str(tmp_path / "no")]]
    before = data.read_bytes()
    for extra in cases:
        assert main(["generate", "--model", str(ckpt), "--device", "cpu"] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flora generate: error:") and "\n" not in err, err
        if extra[1] == str(long):
            assert "record 2 of" in err and "71 tokens leaves no room in the model's context (64" in err, err
    assert data.read_bytes() == before  # never overwritten
    assert "bad.jsonl:2" in str(pytest.raises(ValueError, load_prompts, bad).value)


def test_cli_train_and_generate_on_conversations(setup, tmp_path, capsys):
    """{"messages"} records: `flora train` learns from them and `flora generate`
    prompts with the same chat template, the last assistant turn as the reference."""
    from flora.pretrained import chat_prompt

    _, ckpt, *_ = setup
    chat = with_chat_template(ckpt, tmp_path / "chat")

    def conv(r):
        return {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}

    train = write_jsonl([conv(r) for r in records(n=16)], tmp_path / "train.jsonl")
    evals = write_jsonl([conv(r) for r in records(n=4, split="eval")], tmp_path / "eval.jsonl")
    out = tmp_path / "run"
    assert main(["train", "--model", str(chat), "--data", str(train), "--variant", "ffba", "--rank", "4",
                 "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--seq-len", "48",
                 "--device", "cpu", "--no-progress"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in log["history"])
    res = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(chat), "--adapter", str(out / "adapter"), "--data", str(evals),
                 "--max-new-tokens", "8", "--device", "cpu", "--out", str(res)]) == 0
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    tok = load_tokenizer(chat)
    m = FusedLlama.from_pretrained(str(chat), adapter=str(out / "adapter"))
    for row, r in zip(rows, records(n=4, split="eval")):
        assert row["messages"] == conv(r)["messages"][:1] and row["reference"] == r["completion"]
        assert row["adapter"] == _alone(m, tok, chat_prompt(tok, row["messages"]), 8)[0]
    capsys.readouterr()
    # --system goes before a conversation without one, and is refused where the record has its own
    sys_data = write_jsonl([{"messages": [{"role": "system", "content": "copy"}, *conv(r)["messages"]]}
                            for r in records(n=2, split="eval")], tmp_path / "sys.jsonl")
    assert main(["generate", "--model", str(chat), "--data", str(sys_data), "--chat", "--system", "x",
                 "--device", "cpu"]) == 2
    assert "record 1 of" in capsys.readouterr().err


def test_cli_chat_keeps_the_conversation(setup, tmp_path, capsys, monkeypatch):
    """`flora chat`: each line a user turn, each reply the model's greedy answer to the
    conversation so far (chat template as training renders it), /reset starts over,
    the oldest turns leave when the context is full. A turn reuses the conversation's
    keys and values (the engine's prefix cache), and the engine's worker ends with it."""
    import argparse
    import io

    import flora.serve
    from flora.chat_cli import add_arguments, run_args
    from flora.pretrained import chat_prompt

    engines = []

    class Engine(flora.serve.Engine):
        def run(self):  # flora chat runs the engine in its main thread
            engines.append(self)
            return super().run()

    monkeypatch.setattr(flora.serve, "Engine", Engine)

    _, ckpt, adapter, *_ = setup
    chat = with_chat_template(ckpt, tmp_path / "chat")
    tok = load_tokenizer(chat)
    lines = ["copy : a b", "between a and d ->", "/reset", "copy : c"]
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(chat), "--adapter", str(adapter), "--max-new-tokens", "8", "--device", "cpu"])
    out = io.StringIO()
    run_args(args, stdin=io.StringIO("".join(l + "\n" for l in lines)), out=out)
    replies = out.getvalue().splitlines()
    m = FusedLlama.from_pretrained(str(chat), adapter=str(adapter))
    msgs, want = [], []
    for line in lines:
        if line == "/reset":
            msgs = []
            continue
        msgs.append({"role": "user", "content": line})
        text = _alone(m, tok, chat_prompt(tok, msgs), 8)[0]
        want.append(text)
        msgs.append({"role": "assistant", "content": text})
    assert replies == want
    assert "a new conversation" in capsys.readouterr().err
    assert engines[0].prefix.hits >= 1 and engines[0].prefix.reused >= 16  # the second turn's history
    assert not engines[0]._worker.is_alive() and not engines[0].busy  # run_args returned: the engine ended
    # a long conversation in the tiny context (64): the oldest turns go, with a notice
    args.max_new_tokens = 40
    out = io.StringIO()
    run_args(args, stdin=io.StringIO("copy : a b c d e f\n" * 4), out=out)
    assert len(out.getvalue().splitlines()) == 4
    assert "oldest turns left the conversation" in capsys.readouterr().err


@pytest.mark.parametrize("extra, msg", [(["--max-new-tokens", "0"], "max-new-tokens"),
                                        (["--top-k", "-2"], "top_k"),
                                        (["--logit-bias", "5=x"], "--logit-bias '5=x': expected TOKEN=BIAS"),
                                        (["--logit-bias", "500=1"], "--logit-bias: 500 is not a token id of this "
                                                                    "model (an integer in 0 .. 96)"),
                                        ([], "no chat template")])
def test_cli_chat_bad_input_is_one_line(setup, capsys, extra, msg):
    _, ckpt, *_ = setup
    assert main(["chat", "--model", str(ckpt), "--device", "cpu"] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora chat: error:") and msg in err and "\n" not in err


def test_bench_generate_data_runs_trees_side_by_side(setup, tmp_path, capsys):
    """bench/generate_data.py: each tree's `flora generate` in a process of its own, on
    records mixing short and long answers; here this tree twice (same completions)."""
    from pathlib import Path

    from _bench_scripts import load_bench_script

    _, ckpt, *_ = setup
    chat = with_chat_template(ckpt, tmp_path / "chat")
    root = Path(__file__).resolve().parents[1]
    bench = load_bench_script("generate_data")
    recs = bench.records(30)
    assert len(recs) == 30 and len({r["prompt"] for r in recs}) == 30
    assert sum(r.get("completion") is not None for r in recs) == 6  # the arithmetic problems
    res = bench.main(["--tree", f"a={root}", "--tree", f"b={root}", "--model", str(chat), "--system", "x",
                      "--records", "5", "--max-new-tokens", "4", "--batch-size", "2", "--json",
                      str(tmp_path / "r.json")])
    assert [r["tree"] for r in res["rows"]] == ["a", "b"]
    assert all(r["same_completions"] == 5 and r["new_tokens"] > 0 for r in res["rows"])
    assert json.loads((tmp_path / "r.json").read_text())["rows"][1]["speedup"] > 0
    assert "| a |" in capsys.readouterr().out


def test_cli_generate_logit_bias(setup, capsys):
    """--logit-bias TOKEN=BIAS ... (repeatable) becomes the Sampling's logit_bias; the answer is
    generate()'s with that bias; a bad item, a token twice or a token outside the model's
    vocabulary is a one-line error naming the flag."""
    import argparse

    from flora.generation import Sampling
    from flora.inference import add_arguments, sampling_of

    p = add_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--model", "x", "--prompt", "hi", "--logit-bias", "5=2.5", "9=-100", "--logit-bias", "12=1"])
    assert sampling_of(args) == Sampling(logit_bias={5: 2.5, 9: -100.0, 12: 1.0})
    assert sampling_of(p.parse_args(["--model", "x", "--prompt", "hi"])).logit_bias is None
    _, ckpt, _, _, recs = setup
    prompt = recs[0]["prompt"]
    tok, m = load_tokenizer(ckpt), FusedLlama.from_pretrained(str(ckpt))
    plain = _alone(m, tok, prompt, 8)[0]
    ids = torch.tensor([prompt_ids(tok, prompt)])
    for bias in ({40: 100.0}, {40: 7.5, 41: -3.0}):
        row = m.generate(ids, max_new_tokens=8, logit_bias=bias)[0, ids.shape[1]:].tolist()
        assert 2 not in row
        want = tok.decode(row, skip_special_tokens=True).strip()
        assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--max-new-tokens", "8", "--device", "cpu",
                     "--logit-bias"] + [f"{t}={v}" for t, v in bias.items()]) == 0
        assert capsys.readouterr().out.strip() == f"[base] {want}"
        assert want != plain
    for extra, msg in [(["5=1", "5=2"], "--logit-bias: token 5 is given twice"),
                       (["5=101"], "--logit-bias '5=101': expected TOKEN=BIAS, a token id >= 0 and a number in "
                                   "[-100, 100]"),
                       (["97=1"], "--logit-bias: 97 is not a token id of this model (an integer in 0 .. 96)")]:
        assert main(["generate", "--model", str(ckpt), "--prompt", "x", "--device", "cpu", "--logit-bias"] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"flora generate: error: {msg}", err
