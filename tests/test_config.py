"""AdapterConfig: validation (each error names its field) and JSON round trips."""
import json

import pytest

from flora import AdapterConfig
from flora.config import MHA_VARIANTS, VARIANTS, LlamaArch, as_arch

# Llama-3.2-1B: d 2048, d_q 32 * 64, d_kv 8 * 64, d_ff 8192
ONE_B = LlamaArch(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=8192, vocab_size=128256)


def test_variant_list():
    base = ["lora", "pf-lora", "ffa", "fpa", "ffba", "ffba-ab", "ffba-relu", "ffba-qg-add",
            "zflora-minimal", "zflora"]
    assert set(VARIANTS) == set(base) | {v + "-mha" for v in base if v != "zflora-minimal"}
    assert "zflora-mha" in MHA_VARIANTS and "lora-mha" in MHA_VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_json_roundtrip(variant, tmp_path):
    cfg = AdapterConfig(variant, 8, 16, dropout=0.05, layers=[3, 1])
    assert cfg.layers == (1, 3) and cfg.scale == 2.0
    again = AdapterConfig.from_json(cfg.to_json())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert AdapterConfig.from_dict(json.loads(cfg.to_json())) == cfg
    path = tmp_path / "adapter_config.json"
    cfg.to_json(path)
    assert AdapterConfig.load(path) == cfg
    assert cfg.validate_for(ONE_B) is cfg


def test_a_config_never_changes_once_built():
    """A field set after the config was built desynchronised it from a model's tensors and
    scale (and from what it saved): refused by name, replace() gives a validated copy."""
    cfg = AdapterConfig("ffba", 8, 16, layers=[3, 1])
    with pytest.raises(AttributeError, match=r"AdapterConfig.rank: a config cannot change.*cfg.replace\(rank=...\)"):
        cfg.rank = 4
    with pytest.raises(AttributeError):
        cfg.layers.append(5)  # a tuple
    other = cfg.replace(rank=4, dropout=0.1)
    assert other == AdapterConfig("ffba", 4, 16, dropout=0.1, layers=[1, 3]) and other.scale == 4.0
    assert cfg == AdapterConfig("ffba", 8, 16, layers=[1, 3])
    with pytest.raises(ValueError, match="AdapterConfig.rank: must be a positive integer"):
        cfg.replace(rank=0)


def test_alpha_defaults_to_twice_rank(tmp_path):
    """alpha left out (or None) is 2 x rank, as `flora train --alpha` defaults it; what is saved is
    the resolved number, and a saved config still needs one (without it the scale is lost)."""
    cfg = AdapterConfig("ffba", 8)
    assert cfg.alpha == 16.0 and cfg.scale == 2.0
    assert AdapterConfig("lora", 5, None, dropout=0.1) == AdapterConfig("lora", 5, 10.0, dropout=0.1)
    assert AdapterConfig("lora", 4, 3).alpha == 3.0  # a given alpha is kept
    cfg.to_json(tmp_path / "adapter_config.json")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alpha"] == 16.0
    assert AdapterConfig.load(tmp_path / "adapter_config.json") == cfg
    for d in ({"variant": "lora", "rank": 4}, {"variant": "lora", "rank": 4, "alpha": None}):
        with pytest.raises(ValueError, match=r"missing keys \['alpha'\]"):
            AdapterConfig.from_dict(d)
    from flora.cli import build_parser

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--rank", "6"])
    assert AdapterConfig(args.variant, args.rank, args.alpha).alpha == 12.0  # the CLI leaves it to AdapterConfig


def test_targets_resolution():
    assert AdapterConfig("lora", 4, 8).resolved_targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert AdapterConfig("lora-mha", 4, 8).resolved_targets == ("q", "k", "v", "o")
    assert AdapterConfig("ffba", 4, 8, targets="mha").resolved_targets == ("q", "k", "v", "o")
    assert AdapterConfig("lora", 4, 8, targets=["v", "q"]).resolved_targets == ("q", "v")
    z = AdapterConfig("zflora", 4, 8)
    assert z.writers == ("o", "down") and z.readers == ("q", "k", "v", "gate", "up", "head")
    zm = AdapterConfig("zflora-minimal", 4, 8)
    assert zm.writers == ("down",) and zm.readers == ("q", "k", "v", "head")
    zh = AdapterConfig("zflora-mha", 4, 8)
    assert zh.writers == ("o",) and zh.readers == ("q", "k", "v", "head")
    cfg = AdapterConfig("zflora", 4, 8, targets=["q", "o", "head"])
    assert AdapterConfig.from_json(cfg.to_json()).resolved_targets == ("q", "o", "head")


@pytest.mark.parametrize("kwargs,field", [
    (dict(variant="dora", rank=4, alpha=8), "variant"),
    (dict(variant="zflora-minimal-mha", rank=4, alpha=8), "variant"),
    (dict(variant="lora", rank=0, alpha=8), "rank"),
    (dict(variant="lora", rank=-2, alpha=8), "rank"),
    (dict(variant="lora", rank=2.5, alpha=8), "rank"),
    (dict(variant="lora", rank=True, alpha=8), "rank"),
    (dict(variant="lora", rank=4, alpha=float("nan")), "alpha"),
    (dict(variant="lora", rank=4, alpha=0), "alpha"),
    (dict(variant="lora", rank=4, alpha=8, dropout=1.0), "dropout"),
    (dict(variant="lora", rank=4, alpha=8, dropout=-0.1), "dropout"),
    (dict(variant="lora", rank=4, alpha=8, targets="everything"), "targets"),
    (dict(variant="lora", rank=4, alpha=8, targets=["q", "lm_head"]), "targets"),
    (dict(variant="lora", rank=4, alpha=8, targets=["head"]), "targets"),
    (dict(variant="lora", rank=4, alpha=8, targets=[]), "targets"),
    (dict(variant="lora", rank=4, alpha=8, targets=["q", "q"]), "targets"),
    (dict(variant="lora-mha", rank=4, alpha=8, targets=["q", "down"]), "targets"),
    (dict(variant="zflora-mha", rank=4, alpha=8, targets=["q", "down", "head"]), "targets"),
    (dict(variant="ffba", rank=4, alpha=8, targets=["q", "k"]), "targets"),  # A with no B
    (dict(variant="ffba-ab", rank=4, alpha=8, targets=["o"]), "targets"),  # B with no A
    (dict(variant="fpa", rank=4, alpha=8, targets=["q", "o", "gate"]), "targets"),
    (dict(variant="zflora", rank=4, alpha=8, targets=["q", "k"]), "targets"),  # no writer
    (dict(variant="zflora", rank=4, alpha=8, targets=["o", "down"]), "targets"),  # no reader
    (dict(variant="zflora-minimal", rank=4, alpha=8, targets="mha"), "targets"),
    (dict(variant="zflora-minimal", rank=4, alpha=8, targets=["q", "o", "head"]), "targets"),
    (dict(variant="lora", rank=4, alpha=8, layers=[]), "layers"),
    (dict(variant="lora", rank=4, alpha=8, layers=[0, -1]), "layers"),
    (dict(variant="lora", rank=4, alpha=8, layers=[1, 1]), "layers"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"AdapterConfig.{field}"):
        AdapterConfig(**kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match="targets"):
        AdapterConfig("lora", 4, 8, targets=3)
    with pytest.raises(TypeError, match="layers"):
        AdapterConfig("lora", 4, 8, layers=5)


def test_validate_for_widths_and_layers():
    # ffa tiles a 2r wide state: 2*48 = 96 does not divide d = 2048
    with pytest.raises(ValueError, match="AdapterConfig.rank.*projection q"):
        AdapterConfig("ffa", 48, 96).validate_for(ONE_B)
    AdapterConfig("ffa", 32, 64).validate_for(ONE_B)
    # ffba-qg-add tiles the r wide state over q and gate only
    with pytest.raises(ValueError, match="AdapterConfig.rank.*projection q"):
        AdapterConfig("ffba-qg-add", 48, 96).validate_for(dict(  # d_q = 25 * 80 = 2000
            hidden_size=2048, num_hidden_layers=2, num_attention_heads=25, num_key_value_heads=5,
            head_dim=80, intermediate_size=8160, vocab_size=10))
    AdapterConfig("ffba", 48, 96).validate_for(ONE_B)  # no repeat-add: any rank
    with pytest.raises(ValueError, match="AdapterConfig.layers"):
        AdapterConfig("lora", 4, 8, layers=[16]).validate_for(ONE_B)
    with pytest.raises(TypeError):
        AdapterConfig("lora", 4, 8).validate_for([1, 2])


def test_from_dict_and_json_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        AdapterConfig.from_dict({"variant": "lora", "rank": 4, "alpha": 8, "bias": "none"})
    with pytest.raises(ValueError, match="missing keys"):
        AdapterConfig.from_dict({"variant": "lora"})
    with pytest.raises(ValueError, match="JSON"):
        AdapterConfig.from_json("{not json")
    with pytest.raises(FileNotFoundError):
        AdapterConfig.load(tmp_path / "missing.json")


def test_hf_shapes():
    from transformers import LlamaConfig

    c = LlamaConfig(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                    intermediate_size=8192, vocab_size=128256, num_hidden_layers=28)
    sh = as_arch(c)
    assert isinstance(sh, LlamaArch) and as_arch(sh) is sh
    assert (sh.q_dim, sh.kv_dim, sh.num_hidden_layers) == (3072, 1024, 28)
    assert as_arch(sh.shape_dict()).shape_dict() == sh.shape_dict()
    assert (sh.in_width("o"), sh.in_width("down"), sh.in_width("q")) == (3072, 8192, 3072)
    assert (sh.out_width("k"), sh.out_width("up"), sh.out_width("head")) == (1024, 8192, 128256)


def test_arch_defaults_and_errors():
    a = LlamaArch(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=10)
    assert (a.num_key_value_heads, a.head_dim, a.q_dim, a.kv_dim) == (4, 16, 64, 64)
    good = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=10)
    for bad, msg in [(dict(hidden_size=0), "hidden_size: must be a positive integer"),
                     (dict(num_hidden_layers=True), "num_hidden_layers: must be a positive integer"),
                     (dict(vocab_size=10.0), "vocab_size"), (dict(num_key_value_heads=0), "num_key_value_heads"),
                     (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
                     (dict(head_dim=7), "head_dim: 7 is odd"),
                     (dict(hidden_size=2), "head_dim: must be a positive integer, got 0")]:
        with pytest.raises(ValueError, match=msg):
            LlamaArch(**{**good, **bad})
    with pytest.raises(TypeError, match="hidden"):
        as_arch(dict(good, hidden=64))
    with pytest.raises(TypeError, match="validate_for: expected a LlamaArch"):
        AdapterConfig("lora", 4, 8).validate_for("64")


def test_targets_take_transformers_module_names():
    """q_proj, gate_proj, lm_head (PEFT's target_modules spelling) name the
    same projections as q, gate, head."""
    from flora import AdapterConfig

    a = AdapterConfig("lora", 4, 8, targets=["q_proj", "v_proj", "down_proj"])
    assert a.targets == ("q", "v", "down")
    assert AdapterConfig("lora", 4, 8, targets=["q", "v", "down"]).targets == a.targets
    with pytest.raises(ValueError, match="cannot use"):
        AdapterConfig("lora", 4, 8, targets=["qkv_proj"])
