"""Issue 16: reproducible training, safe resume, saves that never lose a file,
clear errors (`flora train`, save_adapter, the loaders, generate)."""
import json
import os
from pathlib import Path

import pytest
import torch

from _train_helpers import records
from flora import FusedLlama
from flora.cli import main
from flora.synthetic import write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(records(n=16), d / "train.jsonl")


def train_argv(ckpt, data, out, *extra):
    return ["train", "--model", str(ckpt), "--data", str(data), "--variant", "lora", "--rank", "4",
            "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2",
            "--device", "cpu", "--no-progress", *extra]


def saved_adapter(ckpt, out):
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(Path(out) / "adapter"))
    return m.adapter_state_dict()


def losses(out):
    return [h["loss"] for h in json.loads((Path(out) / "train_log.json").read_text())["history"]]


def test_same_seed_same_adapter_and_losses(ckpt, data, tmp_path):
    # item 1: the fresh adapter is initialised after the seed is set
    assert main(train_argv(ckpt, data, tmp_path / "a", "--dropout", "0.1", "--seed", "0")) == 0
    torch.manual_seed(1234)  # a disturbed global RNG must not matter
    assert main(train_argv(ckpt, data, tmp_path / "b", "--dropout", "0.1", "--seed", "0")) == 0
    a, b = saved_adapter(ckpt, tmp_path / "a"), saved_adapter(ckpt, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert main(train_argv(ckpt, data, tmp_path / "c", "--dropout", "0.1", "--seed", "1")) == 0
    c = saved_adapter(ckpt, tmp_path / "c")
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- resume (items 2, 6, 7)
def test_resume_refuses_changed_settings_and_data(ckpt, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(ckpt, data, out, "--alpha", "8", "--save-every", "1")
    assert main(argv) == 0
    config = (out / "adapter" / "adapter_config.json").read_text()
    other = write_jsonl(records(n=16, seed=7), tmp_path / "other.jsonl")  # same size, other records
    for change, what in ((["--alpha", "16"], "adapter configuration"), (["--dropout", "0.2"], "adapter configuration"),
                         (["--lr", "5e-3"], "lr differs"), (["--weight-decay", "0.1"], "weight_decay"),
                         (["--max-steps", "4"], "total_steps")):
        capsys.readouterr()
        assert main(argv + change + ["--resume"]) == 2, change
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err, err
    capsys.readouterr()
    assert main([str(other) if a == str(data) else a for a in argv] + ["--resume"]) == 2
    assert "the training data differs" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_config.json").read_text() == config  # nothing rewritten
    # a deliberate schedule change: only with the explicit flag
    with pytest.warns(UserWarning, match="changed lr schedule"):
        assert main(argv + ["--max-steps", "5", "--lr", "5e-3", "--resume", "--allow-schedule-change"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 5 and [h["lr"] for h in log["history"][3:]] != [h["lr"] for h in log["history"][:2]]


def test_resume_of_finished_run_keeps_one_final_eval(ckpt, data, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(ckpt, data, out, "--eval", str(data), "--eval-every", "2")
    assert main(argv) == 0
    first = json.loads((out / "train_log.json").read_text())["eval_history"]
    assert [e["step"] for e in first] == [2, 3]
    for _ in range(2):
        assert main(argv + ["--resume"]) == 0
    again = json.loads((out / "train_log.json").read_text())["eval_history"]
    assert again == first


def _one_line_error(capsys, argv, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("flora train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_cli_train_errors(ckpt, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(ckpt, data, out)
    dev = argv.index("--device") + 1
    _one_line_error(capsys, argv[:dev] + ["bogus"] + argv[dev + 1:], "--device", "bogus")
    if not torch.cuda.is_available():
        _one_line_error(capsys, argv[:dev] + ["cuda"] + argv[dev + 1:], "no CUDA device")
    f = tmp_path / "a_file"
    f.write_text("keep me")
    _one_line_error(capsys, train_argv(ckpt, data, f), str(f), "not a directory")
    assert f.read_text() == "keep me"
    _one_line_error(capsys, train_argv(ckpt, data, tmp_path / "nan", "--lr", "1e30"), "loss is")
    assert not (tmp_path / "nan" / "adapter").exists()
    # a truncated checkpoint file
    assert main(train_argv(ckpt, data, out, "--save-every", "1")) == 0
    t = out / "checkpoint" / "optimizer.safetensors"
    t.write_bytes(t.read_bytes()[:-9])
    _one_line_error(capsys, argv + ["--resume"], "optimizer.safetensors", "truncated")
    (out / "checkpoint" / "state.json").write_text('{"format": 1, "st')
    _one_line_error(capsys, argv + ["--resume"], "state.json")


def _hashes(root):
    import hashlib

    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(root).rglob("*")) if f.is_file()}


def test_train_refuses_to_replace_a_run(ckpt, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(ckpt, data, out, "--save-every", "1")
    assert main(argv) == 0
    before = _hashes(out)
    assert {"train_log.json", "adapter/adapter.safetensors", "checkpoint/state.json"} <= set(before)
    line = _one_line_error(capsys, argv, str(out), "already holds a run", "adapter/", "checkpoint/",
                           "train_log.json", "--resume", "another --out")
    assert _hashes(out) == before  # not a byte rewritten
    # an interrupted run (a checkpoint, no adapter yet) is refused just the same
    import shutil

    shutil.rmtree(out / "adapter")
    (out / "train_log.json").unlink()
    _one_line_error(capsys, argv, str(out), "(checkpoint/)", "--resume")
    assert (out / "checkpoint" / "state.json").is_file()
    # --resume with a finished run's adapter but no checkpoint would retrain over it: refused
    out2 = tmp_path / "done"
    assert main(train_argv(ckpt, data, out2)) == 0
    shutil.rmtree(out2 / "checkpoint")
    kept = _hashes(out2)
    _one_line_error(capsys, train_argv(ckpt, data, out2, "--resume"), str(out2), "no checkpoint to resume from")
    assert _hashes(out2) == kept


def test_resume_without_a_checkpoint_starts_a_new_run_and_says_so(ckpt, data, tmp_path, capsys):
    import warnings

    assert main(train_argv(ckpt, data, tmp_path / "plain")) == 0
    out = tmp_path / "pre" / "emptible"
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the one-line notice replaces load_checkpoint's warning
        assert main(train_argv(ckpt, data, out, "--resume")) == 0
    notes = [l for l in capsys.readouterr().err.splitlines() if l.startswith("flora train:")]
    assert notes == [f"flora train: no checkpoint in {out}; starting a new run"]
    assert losses(out) == losses(tmp_path / "plain")  # the same run a plain first launch gives
    a, b = saved_adapter(ckpt, out), saved_adapter(ckpt, tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failed_train_leaves_no_empty_out(ckpt, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    for d, needle in ((tmp_path / "missing.jsonl", "missing.jsonl"), (bad, "bad.jsonl:2")):
        argv = train_argv(ckpt, d, tmp_path / "new" / "out")
        _one_line_error(capsys, argv, needle)
        assert not (tmp_path / "new").exists()  # every directory it made, and only those
    existing = tmp_path / "mine"
    existing.mkdir()
    _one_line_error(capsys, train_argv(ckpt, bad, existing), "bad.jsonl")
    assert existing.is_dir()  # the user's own (empty) directory stays


def _interrupt_at_step(monkeypatch, n):
    """Ctrl-C in the n-th optimizer step (the loop calls flora.train.optimizer_step once a step)."""
    import flora.train

    real, calls = flora.train.optimizer_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(flora.train, "optimizer_step", step)


def test_ctrl_c_during_train_is_one_line_and_resumable(ckpt, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = train_argv(ckpt, data, out, "--save-every", "2", "--max-steps", "4")
    _interrupt_at_step(monkeypatch, 3)  # after the checkpoint of step 2
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err == (f"flora train: interrupted; the last checkpoint is {out / 'checkpoint'} (step 2): "
                   f"rerun with --resume to continue\n"), err
    assert not (out / "adapter").exists()
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert json.loads((out / "train_log.json").read_text())["steps"] == 4
    # before the first checkpoint: said so, and the --out it made is gone again
    out2 = tmp_path / "early"
    _interrupt_at_step(monkeypatch, 1)
    assert main(train_argv(ckpt, data, out2, "--save-every", "2")) == 130
    assert capsys.readouterr().err == "flora train: interrupted before the first checkpoint\n"
    assert not out2.exists()


def test_ctrl_c_in_other_commands(monkeypatch, capsys):
    import flora.export
    import flora.inference
    from flora import cli

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(flora.export, "run_args", interrupt)
    monkeypatch.setattr(flora.inference, "run_args", interrupt)
    capsys.readouterr()
    assert main(["export", "--model", "m", "--merged", "o"]) == 130
    assert capsys.readouterr().err == "flora export: interrupted\n"
    assert main(["generate", "--model", "m", "--prompt", "p"]) == 130
    assert capsys.readouterr().err == "flora generate: interrupted\n"
    monkeypatch.setattr(cli, "build_parser", interrupt)  # Ctrl-C while torch is still importing
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "flora: interrupted\n"


def test_non_utf8_data_file_named(tmp_path):
    from flora.data import load_jsonl

    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_jsonl(p)


# --------------------------------------------------------------------------- adapter saves (items 3, 4, 5)
@pytest.fixture(scope="module")
def model(ckpt):
    from flora import AdapterConfig

    return FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("lora", 4, 8.0))


def test_save_keeps_files_it_did_not_write(model, tmp_path):
    p = tmp_path / "ad"
    model.save_adapter(p)
    (p / "README.md").write_text("my notes")
    model.save_adapter(p)
    assert (p / "README.md").read_text() == "my notes"
    assert sorted(os.listdir(p)) == ["README.md", "adapter.safetensors", "adapter_config.json"]


def test_save_respects_read_only_dir_and_mode(model, tmp_path):
    p = tmp_path / "ad"
    model.save_adapter(p)
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700
    os.chmod(p, 0o750)
    model.save_adapter(p)
    assert (p.stat().st_mode & 0o777) == 0o750  # a replaced directory keeps its permissions
    before = {f: (p / f).read_bytes() for f in os.listdir(p)}
    os.chmod(p, 0o555)
    try:
        with pytest.raises(PermissionError, match="read-only"):
            model.save_adapter(p)
        assert (p.stat().st_mode & 0o777) == 0o555
        assert {f: (p / f).read_bytes() for f in os.listdir(p)} == before
    finally:
        os.chmod(p, 0o755)
    assert sorted(n for n in os.listdir(tmp_path)) == ["ad"]


def test_save_writes_through_symlink(model, ckpt, tmp_path):
    target = tmp_path / "real"
    model.save_adapter(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    sd = {k: v + 1 for k, v in model.adapter_state_dict().items()}
    m2 = FusedLlama.from_pretrained(str(ckpt), adapter=str(target))
    m2._load_adapter_tensors(sd)
    m2.save_adapter(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    again = FusedLlama.from_pretrained(str(ckpt), adapter=str(target)).adapter_state_dict()
    assert all(torch.equal(again[k], sd[k].to(again[k].dtype)) for k in sd)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_load_and_save_recover_a_killed_save(model, ckpt, tmp_path):
    p = tmp_path / "ad"
    model.save_adapter(p)
    want = model.adapter_state_dict()
    dead = 2 ** 22 + 12345  # above Linux's pid_max default: no such process
    # killed between its two renames: the adapter sits at .old-*, a finished .tmp-* beside it
    os.rename(p, tmp_path / f".ad.old-{dead}-0001")
    model.save_adapter(tmp_path / "scratch")
    os.rename(tmp_path / "scratch", tmp_path / f".ad.tmp-{dead}-0002")
    (tmp_path / ".ad.tmp-legacy").mkdir()  # an older flora's name
    got = FusedLlama.from_pretrained(str(ckpt), adapter=str(p)).adapter_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(os.listdir(tmp_path)) == ["ad"]
    # a save cleans up after a killed save too, but never a live process's directory
    live = tmp_path / f".ad.tmp-{os.getppid()}-0003"
    live.mkdir()
    (tmp_path / f".ad.tmp-{dead}-0004").mkdir()
    model.save_adapter(p)
    assert sorted(os.listdir(tmp_path)) == [live.name, "ad"]


# --------------------------------------------------------------------------- loading (items 9, 10)
def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((Path(dst) / "config.json").read_text())
    cfg.update(changes)
    (Path(dst) / "config.json").write_text(json.dumps(cfg))
    return dst


def test_loader_refuses_tensors_config_does_not_describe(ckpt, tmp_path):
    from flora.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"model\.layers\.1\..*num_hidden_layers=1"):
        FusedLlama.from_pretrained(str(_edit_config(ckpt, tmp_path / "one", num_hidden_layers=1)))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        FusedLlama.from_pretrained(str(_edit_config(ckpt, tmp_path / "true", num_hidden_layers=True)))


def test_dtype_names_and_refusals(ckpt):
    m = FusedLlama.from_pretrained(str(ckpt), dtype="float16")
    assert m.dtype == torch.float16
    assert FusedLlama.from_pretrained(str(ckpt), dtype="bf16").dtype == torch.bfloat16
    assert FusedLlama.from_pretrained(str(ckpt), dtype="torch.float32").dtype == torch.float32
    from flora import AdapterConfig

    a = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("lora", 4, 8.0), dtype="bfloat16",
                                   adapter_dtype="fp32")
    assert {t.dtype for t in a.adapter_state_dict().values()} == {torch.float32}
    for bad in (torch.int8, torch.float8_e4m3fn, "int8", "fp8", "float17"):
        with pytest.raises(TypeError, match="adapter_dtype"):
            FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("lora", 4, 8.0), adapter_dtype=bad)
    with pytest.raises(TypeError, match="dtype"):
        FusedLlama.from_pretrained(str(ckpt), dtype=torch.int32)


# --------------------------------------------------------------------------- generate (item 8)
@pytest.fixture(scope="module")
def small():
    from llama_fixtures import llama_model

    return FusedLlama.from_pretrained(llama_model())


def test_generate_zero_tokens_ends_streamer_and_copies(small):
    from llama_fixtures import random_ids

    class Streamer:
        def __init__(self):
            self.put_calls, self.ended = 0, 0

        def put(self, t):
            self.put_calls += 1

        def end(self):
            self.ended += 1

    ids = random_ids(2, 5)
    s = Streamer()
    out = small.generate(ids, max_new_tokens=0, streamer=s)
    assert s.ended == 1 and torch.equal(out, ids) and out.data_ptr() != ids.data_ptr()
    s = Streamer()
    small.generate(ids, max_new_tokens=3, streamer=s)
    assert s.ended == 1 and s.put_calls == 4


def test_generate_rejects_bad_mask_and_temperature(small):
    from llama_fixtures import random_ids

    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        small.generate(ids, attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        small.generate(ids, attention_mask=torch.ones(5, dtype=torch.long), max_new_tokens=2)
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            small.generate(ids, temperature=t, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        small.generate(ids, top_p=float("nan"), temperature=1.0, max_new_tokens=2)


def test_generate_caps_huge_max_new_tokens_at_the_context(small):
    from llama_fixtures import random_ids

    ids = random_ids(1, 5)
    first = int(small.generate(ids, max_new_tokens=1)[0, -1])
    with pytest.warns(UserWarning, match="context"):
        out = small.generate(ids, max_new_tokens=10 ** 12, eos_token_id=first)
    assert out.shape == (1, 6)  # EOS at once: one new token, no huge cache allocated
    ctx = small.arch.max_position_embeddings
    with pytest.warns(UserWarning, match="context"):
        out = small.generate(ids, max_new_tokens=ctx)
    assert out.shape == (1, ctx)


def test_generate_refuses_a_prompt_past_the_context(small):
    """A prompt longer than the context: a ValueError naming its length and
    the context (it had generated a token from positions the model never
    saw, with only a warning about max_new_tokens). A left-padded batch is
    judged by its longest real prompt; a prompt of exactly the context still
    gets its one next token."""
    from llama_fixtures import random_ids

    ctx = small.arch.max_position_embeddings
    with pytest.raises(ValueError, match=f"a prompt of {ctx + 1} tokens exceeds the model's context \\({ctx} "):
        small.generate(random_ids(1, ctx + 1), max_new_tokens=1)
    ids = random_ids(2, ctx + 3)
    mask = torch.ones_like(ids)
    mask[:, :3] = 0  # both rows padded: the longest real prompt is the context
    with pytest.warns(UserWarning, match="context"):
        out = small.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert out.shape == (2, ctx + 4)


def test_cli_warnings_are_one_line(monkeypatch):
    """A warning a command shows (generate's max_new_tokens past the context,
    say) is formatted as one line of its own, not a source location and a
    code line; Python's own format is back after main returns. (The format
    is checked directly: pytest records warnings instead of printing them.)"""
    import warnings as w

    from flora import cli

    seen = []

    def warns(args):
        seen.append(w.formatwarning("max_new_tokens=9 exceeds the model's context", UserWarning, "x.py", 3))
        return 0

    monkeypatch.setattr(cli, "_info", warns)
    before = w.formatwarning
    assert cli.main(["info"]) == 0
    assert seen == ["flora: warning: max_new_tokens=9 exceeds the model's context\n"]
    assert w.formatwarning is before


def test_from_pretrained_names_a_missing_cuda(tmp_path):
    from llama_fixtures import llama_model

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        FusedLlama.from_pretrained(llama_model(), device="cuda")
