"""Adapter files: flora save/load (atomic, validated), PEFT LoRA import and export."""
import json
import os
import re

import pytest
import torch

from flora import AdapterConfig
from flora import adapter_io
from flora.adapter_io import AdapterError
from flora.model import FusedLlama
from llama_fixtures import llama_model, random_ids, save_model
from test_checkpoint import _digest
from test_model import randomize_adapter, rel_err


@pytest.fixture(scope="module")
def hf():
    return llama_model()


def _trained(hf, variant="ffba-ab", rank=4, seed=0, **kw):
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig(variant, rank=rank, alpha=2.0 * rank, **kw))
    randomize_adapter(m, seed=seed)
    return m


@pytest.mark.parametrize("variant,kw", [("ffba-ab", {}), ("zflora", {}), ("ffa-mha", {}),
                                        ("pf-lora", {"targets": ["q", "v", "down"], "layers": [1]})])
def test_save_load_round_trip_exact(tmp_path, hf, variant, kw):
    m = _trained(hf, variant, **kw)
    d = tmp_path / "ad"
    m.save_adapter(str(d))
    meta = json.loads((d / "adapter_config.json").read_text())
    assert meta["variant"] == variant and meta["rank"] == 4 and meta["alpha"] == 8.0
    assert meta["base_model"]["hidden_size"] == 64 and meta["base_model"]["vocab_size"] == 1003
    assert meta["flora_version"] and meta["format"] == "flora-adapter"
    assert sorted(os.listdir(d)) == ["adapter.safetensors", "adapter_config.json"]
    m2 = FusedLlama.from_pretrained(hf, adapter=str(d))
    a, b = m.adapter_state_dict(), m2.adapter_state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)


def test_expected_shapes_agree_with_modules(hf):
    from flora.config import VARIANTS

    for v in VARIANTS:
        m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig(v, rank=4, alpha=4))
        want = adapter_io.expected_adapter_shapes(m.adapter_config, m.arch)
        have = {k: tuple(t.shape) for k, t in m.adapter_state_dict().items()}
        assert want == have, v


def test_interrupted_save_keeps_old_adapter(tmp_path, hf, monkeypatch):
    d = tmp_path / "ad"
    good = _trained(hf, seed=1)
    good.save_adapter(str(d))
    before = _digest(str(d))
    real = adapter_io._write_tensors

    def half_then_crash(path, tensors, metadata=None):
        real(path, tensors, metadata)
        with open(path, "r+b") as f:  # a half-written file, then the process "dies"
            f.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(adapter_io, "_write_tensors", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _trained(hf, seed=2).save_adapter(str(d))
    assert _digest(str(d)) == before
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temp dirs left behind

    # a crash at the final rename puts the old directory back
    monkeypatch.setattr(adapter_io, "_write_tensors", real)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".ad.tmp-"):
            raise OSError("simulated crash at rename")
        return real_rename(src, dst)

    monkeypatch.setattr(adapter_io.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        _trained(hf, seed=3).save_adapter(str(d))
    assert _digest(str(d)) == before and sorted(os.listdir(tmp_path)) == ["ad"]
    monkeypatch.undo()
    m = FusedLlama.from_pretrained(hf, adapter=str(d))
    a = good.adapter_state_dict()
    assert all(torch.equal(a[k], t) for k, t in m.adapter_state_dict().items())
    # overwriting for real works and replaces the contents
    _trained(hf, seed=4).save_adapter(str(d))
    assert _digest(str(d)) != before


def test_save_refuses_foreign_dir(tmp_path, hf):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        _trained(hf).save_adapter(str(tmp_path))
    assert os.listdir(tmp_path) == ["notes.txt"]


def _edit(d, **changes):
    p = d / "adapter_config.json"
    meta = json.loads(p.read_text())
    for k, v in changes.items():
        if isinstance(v, dict):
            meta[k].update(v)
        else:
            meta[k] = v
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize("change,err,msg", [
    ({"rank": 8}, AdapterError, r"B_o has shape \(64, 4\), this model needs \(64, 8\)"),
    ({"variant": "ffbx"}, AdapterError, "unknown variant 'ffbx'"),
    ({"variant": "ffba"}, AdapterError, "unexpected tensors"),
    ({"base_model": {"hidden_size": 128}}, AdapterError, "hidden_size: adapter was trained on 128, this model has 64"),
    ({"layers": [0, 5]}, AdapterError, "out of range"),
    ({"format_version": 99}, AdapterError, "format_version 99"),
])
def test_load_mismatch_errors(tmp_path, hf, change, err, msg):
    d = tmp_path / "ad"
    _trained(hf).save_adapter(str(d))
    _edit(d, **change)
    before = _digest(str(d))
    with pytest.raises(err, match=msg):
        FusedLlama.from_pretrained(hf, adapter=str(d))
    assert _digest(str(d)) == before


def test_load_other_base_model(tmp_path, hf):
    d = tmp_path / "ad"
    _trained(hf).save_adapter(str(d))
    other = llama_model(hidden=32, heads=2, kv_heads=1)
    with pytest.raises(AdapterError, match="different base model.*hidden_size"):
        FusedLlama.from_pretrained(other, adapter=str(d))
    m = FusedLlama.from_pretrained(other, adapter=AdapterConfig("ffba-ab", rank=4, alpha=8))
    with pytest.raises(AdapterError, match="different base model"):
        m.load_adapter(str(d), "x")
    assert m.adapter_names == ["default"]


def test_load_corrupt_tensor_files(tmp_path, hf):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "ad"
    _trained(hf).save_adapter(str(d))
    f = d / "adapter.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        FusedLlama.from_pretrained(hf, adapter=str(d))
    f.write_bytes(raw)
    sd = load_file(str(f))
    sd["layers.0.o.C_o"] = sd["layers.0.o.C_o"] + 1  # same shape, different bytes
    save_file(sd, str(f))
    with pytest.raises(AdapterError, match="SHA-256"):
        FusedLlama.from_pretrained(hf, adapter=str(d))
    _edit(d, tensors_sha256=None)  # without the digest the key/shape checks still run
    del sd["layers.1.mlp.A_gate"]
    save_file(sd, str(f))
    with pytest.raises(AdapterError, match=r"missing tensors \['layers.1.mlp.A_gate'\]"):
        FusedLlama.from_pretrained(hf, adapter=str(d))
    os.remove(f)
    (d / "adapter.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never reads pickle"):
        FusedLlama.from_pretrained(hf, adapter=str(d))


def test_missing_adapter_dir(tmp_path, hf):
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        FusedLlama.from_pretrained(hf, adapter=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        FusedLlama.from_pretrained(hf, adapter=str(tmp_path))


# --------------------------------------------------------------------------- PEFT
def _peft_model(hf_seed, r, alpha, targets, layers=None, rslora=False, seed=0, dropout=0.0, **extra):
    from peft import LoraConfig, get_peft_model

    base = llama_model(seed=hf_seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, layers_to_transform=layers,
                     use_rslora=rslora, lora_dropout=dropout, task_type="CAUSAL_LM", **extra)
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm.eval()


@pytest.mark.parametrize("r,alpha,targets,layers,rslora", [
    (4, 16, ["q_proj", "v_proj"], None, False),
    (16, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None, False),
    (64, 32, ["o_proj", "down_proj"], [1], False),
    (8, 24, ["k_proj", "gate_proj"], None, True),
])
def test_peft_lora_loads_as_pf_lora(tmp_path, r, alpha, targets, layers, rslora):
    pm = _peft_model(0, r, alpha, targets, layers, rslora)
    ckpt = save_model(llama_model(seed=0), str(tmp_path / "base"))
    pm.save_pretrained(str(tmp_path / "peft"))
    assert os.path.isfile(tmp_path / "peft" / "adapter_model.safetensors")
    m = FusedLlama.from_pretrained(ckpt, adapter=str(tmp_path / "peft"))
    assert m.adapter_config.variant == "pf-lora" and m.adapter_config.rank == r
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        assert rel_err(ref, llama_model(seed=0)(ids).logits) > 1e-3  # the adapter matters
        assert rel_err(m(ids).logits, ref) <= 1e-5


def test_a_peft_lora_with_dropout_scores_as_peft(tmp_path):
    """A PEFT LoRA trained with lora_dropout 0.05 (a common setting) loaded as pf-lora: the
    model came back in train mode, so its logits were randomly perturbed by the dropout."""
    pm = _peft_model(0, 4, 8, ["q_proj", "v_proj", "down_proj"], dropout=0.05)
    ckpt = save_model(llama_model(seed=0), str(tmp_path / "base"))
    pm.save_pretrained(str(tmp_path / "peft"))
    m = FusedLlama.from_pretrained(ckpt, adapter=str(tmp_path / "peft"))
    assert m.adapter_config.dropout == 0.05
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert rel_err(m(ids).logits, pm(input_ids=ids).logits) <= 1e-5


@pytest.mark.parametrize("extra,msg", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern {'q_proj': 8} (differs from r=4"),
    # only the entry that differs is named
    ({"alpha_pattern": {"q_proj": 8, "v_proj": 16}}, "alpha_pattern {'v_proj': 16} (differs from lora_alpha=8"),
])
def test_peft_unsupported_features(tmp_path, extra, msg):
    pm = _peft_model(0, 4, 8, ["q_proj", "v_proj"], **extra)
    pm.save_pretrained(str(tmp_path / "peft"))
    before = _digest(str(tmp_path / "peft"))
    with pytest.raises(AdapterError, match=re.escape(msg)):
        FusedLlama.from_pretrained(llama_model(seed=0), adapter=str(tmp_path / "peft"))
    assert _digest(str(tmp_path / "peft")) == before


def test_peft_patterns_repeating_the_global_values_load(tmp_path):
    """rank_pattern / alpha_pattern entries equal to r / lora_alpha change nothing: the adapter
    loads and computes what PEFT computes."""
    pm = _peft_model(0, 4, 8, ["q_proj", "v_proj", "down_proj"], rank_pattern={"q_proj": 4, "down_proj": 4},
                     alpha_pattern={"v_proj": 8.0})
    pm.save_pretrained(str(tmp_path / "peft"))
    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert meta["rank_pattern"] and meta["alpha_pattern"]  # as written by PEFT, not dropped
    m = FusedLlama.from_pretrained(llama_model(seed=0), adapter=str(tmp_path / "peft"))
    assert (m.adapter_config.rank, m.adapter_config.alpha) == (4, 8.0)
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert rel_err(m(ids).logits, pm(input_ids=ids).logits) <= 1e-5


def test_peft_rank_mismatch_with_base(tmp_path):
    pm = _peft_model(0, 4, 8, ["q_proj", "v_proj"])
    pm.save_pretrained(str(tmp_path / "peft"))
    other = llama_model(hidden=32, heads=2, kv_heads=1)
    with pytest.raises(AdapterError, match="does not fit the base model"):
        FusedLlama.from_pretrained(other, adapter=str(tmp_path / "peft"))


@pytest.mark.parametrize("variant,kw", [("lora", {}), ("pf-lora", {"targets": ["q", "k", "up"], "layers": [0]})])
def test_export_to_peft_round_trip(tmp_path, variant, kw):
    from peft import PeftModel

    hf = llama_model(seed=0)
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig(variant, rank=8, alpha=12, **kw))
    randomize_adapter(m, std=0.05)
    m.export_peft(str(tmp_path / "peft"), base_model_name_or_path="tiny")
    pm = PeftModel.from_pretrained(llama_model(seed=0), str(tmp_path / "peft")).eval()
    ids = random_ids(2, 16)
    with torch.no_grad():
        ours = m(ids).logits
        assert rel_err(ours, hf(ids).logits) > 1e-3
        assert rel_err(pm(input_ids=ids).logits, ours) <= 1e-5
    # and back into flora
    m2 = FusedLlama.from_pretrained(hf, adapter=str(tmp_path / "peft"))
    with torch.no_grad():
        assert rel_err(m2(ids).logits, ours) <= 1e-5


def test_export_other_variants_refused(tmp_path, hf):
    with pytest.raises(ValueError, match="only lora and pf-lora"):
        _trained(hf, "ffba").export_peft(str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_save_refuses_the_other_formats_adapter(tmp_path):
    """Both formats name their config adapter_config.json: a save in one format into the other's
    adapter directory would replace that config and orphan its weights, so it is refused; a save
    over the same format stays allowed."""
    from peft import PeftModel

    hf = llama_model(seed=0)
    ids = random_ids(2, 16)
    pm = _peft_model(0, 4, 8, ["q_proj", "v_proj"])
    peft_dir = tmp_path / "peft"
    pm.save_pretrained(str(peft_dir))  # written by PEFT itself
    before = _digest(str(peft_dir))
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("lora", rank=4, alpha=8))
    randomize_adapter(m, std=0.05)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(peft_dir))} holds a PEFT LoRA adapter \(adapter_model\.safetensors\);"
                                         r" flora's save_adapter would replace its adapter_config\.json"):
        m.save_adapter(str(peft_dir))
    assert _digest(str(peft_dir)) == before
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        again = PeftModel.from_pretrained(llama_model(seed=0), str(peft_dir)).eval()
        assert torch.equal(again(input_ids=ids).logits, ref)  # PEFT still loads its adapter

    flora_dir = tmp_path / "flora"
    m.save_adapter(str(flora_dir))
    before = _digest(str(flora_dir))
    other = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("lora", rank=4, alpha=8))
    randomize_adapter(other, std=0.05, seed=7)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(flora_dir))} holds a flora adapter \(adapter\.safetensors\);"
                                         r" flora's PEFT export would replace its adapter_config\.json"):
        other.export_peft(str(flora_dir))
    assert _digest(str(flora_dir)) == before
    back = FusedLlama.from_pretrained(hf, adapter=str(flora_dir)).adapter_state_dict()
    assert all(torch.equal(t, back[k]) for k, t in m.adapter_state_dict().items())
    # a flora config alone (its weights lost) still says whose directory it is
    os.remove(flora_dir / "adapter.safetensors")
    with pytest.raises(ValueError, match=r"holds a flora adapter \(adapter_config\.json"):
        other.export_peft(str(flora_dir))

    # the same format in place is a replace, as before
    m.export_peft(str(peft_dir))
    with torch.no_grad():
        got = PeftModel.from_pretrained(llama_model(seed=0), str(peft_dir)).eval()(input_ids=ids).logits
        assert rel_err(got, m(ids).logits) <= 1e-5 and rel_err(got, ref) > 1e-3


def test_refused_adapter_leaves_an_adapterless_model_as_it_was(tmp_path, hf):
    """load_adapter into a model without adapters gave it the adapter's structure (fresh,
    nameless trainable tensors that save_adapter then wrote) before the tensors were refused."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "ad"
    _trained(hf).save_adapter(str(d))
    sd = load_file(str(d / "adapter.safetensors"))
    del sd["layers.1.mlp.A_gate"]
    save_file(sd, str(d / "adapter.safetensors"))
    _edit(d, tensors_sha256=None)
    m = FusedLlama.from_pretrained(hf)
    with pytest.raises(AdapterError, match="missing tensors"):
        m.load_adapter(str(d), "x")
    assert m.adapter_config is None and m.adapter_names == [] and not list(m.parameters())
    with pytest.raises(ValueError, match="no adapter to save"):
        m.save_adapter(str(tmp_path / "out"))


def test_the_model_adapter_config_cannot_change(tmp_path, hf):
    """model.adapter_config.alpha = 32 (or .rank = 8) changed the config save_adapter wrote,
    not the modules' tensors or scale: the saved adapter reloaded to other logits or failed
    to load. And the caller's config (a sweep reusing it) had to be copied for the model. A
    config now never changes once built, the model's is not replaced, and each says so."""
    cfg = AdapterConfig("ffba", rank=4, alpha=8)
    m = FusedLlama.from_pretrained(hf, adapter=cfg)
    randomize_adapter(m, seed=1)
    ids = random_ids(2, 12)
    with torch.no_grad():
        want = m(ids).logits
    for c in (cfg, m.adapter_config):
        for field, value in (("alpha", 32.0), ("rank", 8), ("dropout", 0.1), ("layers", [0])):
            with pytest.raises(AttributeError, match=fr"AdapterConfig.{field}: a config cannot change.*"
                                                     fr"cfg.replace\({field}=...\)"):
                setattr(c, field, value)
    with pytest.raises(AttributeError, match="adapter_config"):
        m.adapter_config = AdapterConfig("ffba", rank=4, alpha=32)
    assert m.adapter_config == AdapterConfig("ffba", rank=4, alpha=8)
    m.save_adapter(str(tmp_path / "a"))
    again = FusedLlama.from_pretrained(hf, adapter=str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)


def test_an_adapter_read_first_loads_as_its_directory(tmp_path, hf, monkeypatch):
    """read_adapter reads and checks a directory without loading it; load_adapter of
    what it read then reads nothing (a server reads outside its worker thread) and
    serves as the directory loaded. Each load copies the tensors: one read, several
    adapters, none changed by training another; not for another base model."""
    d = tmp_path / "ad"
    _trained(hf, seed=3).save_adapter(str(d))
    want = FusedLlama.from_pretrained(hf, adapter=str(d))
    m = FusedLlama.from_pretrained(hf)
    files = m.read_adapter(str(d))
    assert m.adapter_config is None and m.adapter_names == []  # read, not loaded
    reads = []
    monkeypatch.setattr(adapter_io, "read_adapter_dir", lambda *a: reads.append(a))
    m.load_adapter(files, "x")
    m.load_adapter(files, "y", activate=False)
    assert reads == [] and m.adapter_names == ["x", "y"] and m.adapter_config == want.adapter_config
    ids = random_ids(2, 12)
    with torch.no_grad():
        ref = want(ids).logits
        assert torch.equal(m(ids).logits, ref)
        next(iter(m.parameters())).add_(1.0)  # "x" trained: not "y", nor what was read
        assert not torch.equal(m(ids).logits, ref)
        m.set_adapter("y")
        assert torch.equal(m(ids).logits, ref)
    other = FusedLlama.from_pretrained(llama_model(hidden=32, heads=2, kv_heads=1))
    with pytest.raises(AdapterError, match="read for another base model"):
        other.load_adapter(files, "x")
    assert other.adapter_config is None and other.adapter_names == []


def test_read_adapter_refuses_what_load_adapter_refuses(tmp_path, hf):
    """The tensor checks run at the read: a directory's every refusal comes from read_adapter."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "ad"
    _trained(hf).save_adapter(str(d))
    sd = load_file(str(d / "adapter.safetensors"))
    sd["layers.0.o.C_o"][0, 0] = float("nan")
    save_file(sd, str(d / "adapter.safetensors"))
    _edit(d, tensors_sha256=None)
    m = FusedLlama.from_pretrained(hf)
    with pytest.raises(AdapterError, match="layers.0.o.C_o holds NaN or infinite values"):
        m.read_adapter(str(d))
    with pytest.raises(AdapterError, match="layers.0.o.C_o holds NaN or infinite values"):
        m.load_adapter(str(d))
    assert m.adapter_config is None
