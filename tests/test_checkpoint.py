"""Reading HF Llama checkpoint dirs: single file, sharded, and every way they can be broken."""
import hashlib
import json
import os

import pytest
import torch

from flora.checkpoint import CheckpointError, load_checkpoint, read_config
from llama_fixtures import llama_model, save_model


def _digest(path):
    """Names, sizes and contents of every file under path (to prove nothing was modified)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def hf():
    return llama_model(tied=False)


@pytest.fixture
def ckpt(tmp_path, hf):
    return save_model(hf, str(tmp_path / "m"))


@pytest.fixture
def sharded(tmp_path, hf):
    path = save_model(hf, str(tmp_path / "s"), shard="100KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    return path


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_load_matches_model(kind, ckpt, sharded, hf):
    arch, sd = load_checkpoint(ckpt if kind == "single" else sharded)
    ref = hf.state_dict()
    assert arch.hidden_size == 64 and arch.num_key_value_heads == 2 and arch.vocab_size == 1003
    assert set(sd) == set(ref)
    for k, v in sd.items():
        assert torch.equal(v, ref[k]), k


def test_single_file_preferred_over_index_like_transformers(tmp_path, hf):
    """Both layouts in one directory: transformers loads model.safetensors (it looks for that
    before the index), so flora must load the same weights."""
    import shutil

    from transformers import LlamaForCausalLM

    path = save_model(hf, str(tmp_path / "both"), shard="100KB")
    other = llama_model(seed=1, tied=False)
    save_model(other, str(tmp_path / "single"))
    shutil.copy(tmp_path / "single" / "model.safetensors", path)
    ref = LlamaForCausalLM.from_pretrained(path, local_files_only=True).state_dict()
    assert torch.equal(ref["model.norm.weight"], other.state_dict()["model.norm.weight"])  # transformers' choice
    _, sd = load_checkpoint(path)
    assert set(sd) == set(ref) and all(torch.equal(v, ref[k]) for k, v in sd.items())


def test_truncated_file(ckpt):
    f = os.path.join(ckpt, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    before = _digest(ckpt)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(ckpt)
    assert _digest(ckpt) == before


def test_truncated_shard(sharded):
    shard = sorted(n for n in os.listdir(sharded) if n.endswith(".safetensors"))[1]
    f = os.path.join(sharded, shard)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    before = _digest(sharded)
    with pytest.raises(CheckpointError, match=f"truncated.*|{shard}"):
        load_checkpoint(sharded)
    assert _digest(sharded) == before


def test_missing_shard(sharded):
    shard = sorted(n for n in os.listdir(sharded) if n.endswith(".safetensors"))[0]
    os.remove(os.path.join(sharded, shard))
    before = _digest(sharded)
    with pytest.raises(FileNotFoundError, match=f"missing shard.*{shard}"):
        load_checkpoint(sharded)
    assert _digest(sharded) == before


def _edit_config(path, **changes):
    p = os.path.join(path, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("change,msg", [
    ({"model_type": "mistral"}, "model_type is 'mistral'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"hidden_size": 128}, "shape"),
    ({"vocab_size": None}, "missing field.*vocab_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers: must be a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads: must be a positive integer"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"head_dim": 15}, "head_dim: 15 is odd"),
])
def test_bad_config(ckpt, change, msg):
    _edit_config(ckpt, **change)
    before = _digest(ckpt)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(ckpt)
    assert _digest(ckpt) == before


def test_missing_tensor(tmp_path, hf):
    from safetensors.torch import save_file

    path = tmp_path / "x"
    save_model(hf, str(path))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*layers.1.mlp.up_proj"):
        load_checkpoint(str(path))


def test_pickle_only_refused(tmp_path, hf):
    path = tmp_path / "p"
    save_model(hf, str(path))
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_checkpoint(str(path))


def test_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(str(tmp_path))


def test_legacy_rope_keys(ckpt):
    """transformers 4.x configs: rope_theta / rope_scaling at top level."""
    _edit_config(ckpt, rope_parameters=None, rope_theta=12345.0,
                 rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 2.0, "original_max_position_embeddings": 64})
    arch = read_config(ckpt)
    assert arch.rope_theta == 12345.0
    assert arch.rope_scaling["factor"] == 4.0 and arch.rope_scaling["original_max_position_embeddings"] == 64
