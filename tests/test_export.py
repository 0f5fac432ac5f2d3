"""`flora export` and the library under it (FusedLlama.merged_state_dict /
save_merged, flora.checkpoint.save_checkpoint), against transformers and PEFT
loading what it writes."""
from __future__ import annotations

import json
import os

import pytest
import torch
from _train_helpers import tiny_checkpoint

from flora import FusedLlama
from flora.bench.latency import randomize_adapter
from flora.checkpoint import SHARD_BYTES, load_checkpoint, save_checkpoint
from flora.cli import main
from flora.config import AdapterConfig


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def ids(n=2, t=12):
    return torch.randint(3, 40, (n, t), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(d / "ckpt", seed=4, tied=request.param)
    for variant in ("lora", "pf-lora-mha", "ffba"):
        m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig(variant, 4, 8))
        randomize_adapter(m, seed=1)  # non-zero B: the merge changes the weights
        m.save_adapter(d / variant)
    return d, ckpt


def _hf(path, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True).eval()


@pytest.mark.parametrize("variant", ["lora", "pf-lora-mha"])
def test_merged_checkpoint_is_the_adapted_model(setup, variant, tmp_path):
    """transformers loads the export as a plain Llama and computes what flora computes with the
    adapter on; the model it came from is unchanged (adapter still separate and active)."""
    d, ckpt = setup
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / variant))
    before = {k: v.clone() for k, v in m.base_state_dict().items()}
    m.save_merged(tmp_path / "out", tokenizer=None)
    with torch.no_grad():
        ours = m(ids()).logits
        assert rel_err(_hf(tmp_path / "out")(ids()).logits, ours) <= 1e-5
        again = FusedLlama.from_pretrained(str(tmp_path / "out"))
        assert rel_err(again(ids()).logits, ours) <= 1e-5
        with m.disable_adapter():  # the merge went into copies, not into m's base weights
            assert not torch.equal(m(ids()).logits, ours)
    assert all(torch.equal(before[k], v) for k, v in m.base_state_dict().items())
    assert not m.merged and m.adapter_active()


def test_merged_weights_round_once_like_merge_into_base(setup, tmp_path):
    d, ckpt = setup
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / "lora"), dtype=torch.bfloat16)
    sd = {k: v.clone() for k, v in m.merged_state_dict().items()}
    m.merge_into_base()
    assert all(torch.equal(sd[k], v) for k, v in m.base_state_dict().items())
    assert m.merged_state_dict().keys() == sd.keys()  # merged already: the base as it is


def test_sharded_checkpoint_with_index(setup, tmp_path):
    d, ckpt = setup
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / "lora"))
    sd = m.merged_state_dict()
    save_checkpoint(tmp_path / "out", m.arch, sd, shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "out"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    with torch.no_grad():
        assert rel_err(_hf(tmp_path / "out")(ids()).logits, m(ids()).logits) <= 1e-5
    # the mode open() gives (the umask's), not safetensors' / mkstemp's 0600: a server's user can read them
    from flora.fileio import _file_mode

    assert all(os.stat(tmp_path / "out" / f).st_mode & 0o777 == _file_mode() for f in files)


@pytest.mark.parametrize("old", ["sharded", "single"])
def test_export_over_the_other_weight_layout(setup, tmp_path, old):
    """A checkpoint written over one in the other weight layout replaces its weights whole: no
    stale index + shards (flora read those first) or model.safetensors (transformers reads that
    first) stay next to the new weights for a reader to prefer. Other files are kept as before."""
    d, ckpt = setup
    base = FusedLlama.from_pretrained(str(ckpt))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    save_checkpoint(out, base.arch, base.merged_state_dict(), shard_bytes=40_000 if old == "sharded" else SHARD_BYTES)
    assert ("model.safetensors.index.json" in os.listdir(out)) == (old == "sharded")
    (out / "README.md").write_text("my notes")
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / "lora"))
    if old == "sharded":  # as reported: `flora export --merged` (one file) over a sharded checkpoint
        args = ["export", "--model", str(ckpt), "--adapter", str(d / "lora"), "--merged"]
        assert main([*args, str(out)]) == 0 and main([*args, str(fresh)]) == 0
    else:
        for p in (out, fresh):
            save_checkpoint(p, m.arch, m.merged_state_dict(), shard_bytes=40_000)
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh) + ["README.md"])
    assert (out / "README.md").read_text() == "my notes"
    with torch.no_grad():
        want = m(ids()).logits
        assert rel_err(_hf(out)(ids()).logits, want) <= 1e-5
        assert rel_err(FusedLlama.from_pretrained(str(out))(ids()).logits, want) <= 1e-5
        assert rel_err(base(ids()).logits, want) > 1e-3  # the old weights would have been told apart
    ref = _hf(out).state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in load_checkpoint(str(out))[1].items())


@pytest.mark.parametrize("tok", ["none", "given"])
def test_export_replaces_the_old_tokenizer_whole(setup, tmp_path, tok):
    """An export over an earlier one (of another model, with another kind of tokenizer) takes the
    old tokenizer away with the old weights: without a tokenizer the new checkpoint has none (not a
    stale one a server would pair with these weights); with one (`flora export --merged` passes the
    source's), exactly its files, no leftover tokenizer.model / vocab.json / merges.txt. A README.md
    is kept, as before."""
    from flora.pretrained import load_tokenizer

    d, ckpt = setup
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    old = {"tokenizer.json": '{"model": "another"}', "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
           "tokenizer.model": "sentencepiece", "vocab.json": "{}", "merges.txt": "#version: 0.2",
           "added_tokens.json": "{}", "chat_template.jinja": "{{ old }}"}
    base = FusedLlama.from_pretrained(str(ckpt))
    base.save_merged(out, tokenizer=None)
    for name, text in {**old, "README.md": "my notes"}.items():
        (out / name).write_text(text)
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / "lora"))
    if tok == "none":
        for p in (out, fresh):
            m.save_merged(p, tokenizer=None)
    else:
        args = ["export", "--model", str(ckpt), "--adapter", str(d / "lora"), "--merged"]
        assert main([*args, str(out)]) == 0 and main([*args, str(fresh)]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh) + ["README.md"])
    assert (out / "README.md").read_text() == "my notes"
    if tok == "none":
        assert not set(old) & set(os.listdir(out))
    else:
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
        assert all((out / f).read_bytes() == (fresh / f).read_bytes() for f in os.listdir(fresh))
        assert load_tokenizer(out).encode("a b") == load_tokenizer(ckpt).encode("a b")


def test_fused_variants_have_no_merged_form(setup, tmp_path):
    d, ckpt = setup
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / "ffba"))
    with pytest.raises(ValueError, match="'ffba' cannot be merged"):
        m.save_merged(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_cli_merged_with_tokenizer(setup, tmp_path, capsys):
    d, ckpt = setup
    out = tmp_path / "merged"
    assert main(["export", "--model", str(ckpt), "--adapter", str(d / "lora"), "--merged", str(out),
                 "--dtype", "bf16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["what"] == "HF Llama checkpoint (lora rank 4 merged)" and summary["dtype"] == "bfloat16"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).encode("a b") == AutoTokenizer.from_pretrained(
        str(ckpt)).encode("a b")
    from safetensors.torch import load_file

    want = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / "lora"), dtype=torch.bfloat16).merged_state_dict()
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == {k for k in want if k != "lm_head.weight" or "lm_head.weight" in got}
    assert all(torch.equal(got[k], want[k]) for k in got)  # bf16, rounded once after the float64 merge
    gen = json.load(open(out / "generation_config.json"))
    assert gen["eos_token_id"] in (2, [2])
    # exporting again replaces the earlier export
    assert main(["export", "--model", str(ckpt), "--merged", str(out)]) == 0
    assert json.load(open(out / "config.json"))["dtype"] == "float32"


def test_cli_merged_keeps_the_sources_generation_config(setup, tmp_path, capsys):
    import shutil

    d, ckpt = setup
    src = tmp_path / "src"
    shutil.copytree(ckpt, src)
    gen = json.load(open(src / "generation_config.json"))
    json.dump({**gen, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 1]}, open(src / "generation_config.json", "w"))
    assert main(["export", "--model", str(src), "--adapter", str(d / "lora"), "--merged", str(tmp_path / "out")]) == 0
    got = json.load(open(tmp_path / "out" / "generation_config.json"))
    assert (got["temperature"], got["top_p"], got["eos_token_id"]) == (0.6, 0.9, [2, 1])
    (src / "generation_config.json").write_text("{not json")
    assert main(["export", "--model", str(src), "--merged", str(tmp_path / "out2")]) == 2
    assert "generation_config.json: not valid JSON" in capsys.readouterr().err


def test_cli_peft_loads_in_peft(setup, tmp_path):
    peft = pytest.importorskip("peft")
    d, ckpt = setup
    out = tmp_path / "peft"
    assert main(["export", "--model", str(ckpt), "--adapter", str(d / "lora"), "--peft", str(out)]) == 0
    pm = peft.PeftModel.from_pretrained(_hf(ckpt), str(out)).eval()
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / "lora"))
    with torch.no_grad():
        assert rel_err(pm(ids()).logits, m(ids()).logits) <= 1e-5


@pytest.mark.parametrize("case", ["peft-no-adapter", "fused", "out-is-model", "foreign-dir", "peft-dtype",
                                  "no-model", "peft-over-flora"])
def test_cli_errors_are_one_line(setup, tmp_path, capsys, case):
    d, ckpt = setup
    out = tmp_path / "out"
    args, match = {
        "peft-no-adapter": (["--model", str(ckpt), "--peft", str(out)], "--peft needs --adapter"),
        "fused": (["--model", str(ckpt), "--adapter", str(d / "ffba"), "--merged", str(out)], "cannot be merged"),
        "out-is-model": (["--model", str(ckpt), "--merged", str(ckpt)], "is an input"),
        "foreign-dir": (["--model", str(ckpt), "--merged", str(out)], "not part of a checkpoint"),
        "peft-dtype": (["--model", str(ckpt), "--adapter", str(d / "lora"), "--peft", str(out), "--dtype", "bf16"],
                       "--dtype applies to --merged"),
        "no-model": (["--model", str(tmp_path / "nope"), "--merged", str(out)], "not a local directory"),
        "peft-over-flora": (["--model", str(ckpt), "--adapter", str(d / "lora"), "--peft", str(out)],
                            f"{out} holds a flora adapter (adapter.safetensors)"),
    }[case]
    if case == "foreign-dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case == "peft-over-flora":  # a flora adapter other than the input
        import shutil

        shutil.copytree(d / "ffba", out)
    saved = {f: (out / f).read_bytes() for f in os.listdir(out)} if out.exists() else {}
    before = sorted(os.listdir(ckpt))
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flora export: error:") and match in err[0], err
    assert sorted(os.listdir(ckpt)) == before
    if case == "foreign-dir":
        assert os.listdir(out) == ["notes.txt"]
    if saved:  # what the user had there is untouched
        assert {f: (out / f).read_bytes() for f in os.listdir(out)} == saved
