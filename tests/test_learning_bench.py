"""bench/learning.py end to end, kept tiny: quick base model, two variants, one task."""
import json

import pytest
from _bench_scripts import load_bench_script



def _load():
    return load_bench_script("learning")


def test_quick_learning_bench(tmp_path):
    bench = _load()
    out = tmp_path / "l.json"
    res_md = tmp_path / "RESULTS.md"
    res_md.write_text("# Results\n\n## Latency\n\nkeep me\n")
    result = bench.main(["--quick", "--variants", "lora,ffba,zflora", "--tasks", "between", "--steps", "40",
                         "--n-eval", "30", "--no-full", "--cache-dir", str(tmp_path / "cache"),
                         "--json", str(out), "--results", str(res_md)])
    data = json.loads(out.read_text())
    assert data["ranks"]["lora"] == 4 and len(data["runs"]) == 3
    for r in data["runs"]:  # matched budgets, and every variant learned something
        assert abs(r["trainable"] / data["budget"] - 1) <= 0.10, r
        assert r["eval_loss"] < 0.6 * data["base_eval"]["between"]["loss"], r
    md = res_md.read_text()
    assert "keep me" in md and "## Learning" in md and "| ffba | " in md
    # a second run replaces the section instead of appending another
    bench.write_results("## Learning\n\nnew", res_md)
    md = res_md.read_text()
    assert md.count("## Learning") == 1 and "new" in md and "keep me" in md
    assert result["budget"] == data["budget"]


def test_matched_rank_picks_closest_valid():
    from flora import AdapterConfig, LlamaArch
    from flora.modules import count_parameters

    bench = _load()
    sh = LlamaArch(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=352, vocab_size=97)  # d_q 128, d_kv 64
    budget = count_parameters(AdapterConfig("lora", 4, 8.0), sh)
    r, n = bench.matched_rank("ffba", budget, sh)
    # independent: FFBA has A_q, A_k, A_v, A_gate, A_up [r, d] and B_o, B_down [d, r] per layer
    per_rank = 4 * (5 * 128 + 2 * 128)
    assert n == r * per_rank
    assert abs(n - budget) <= per_rank / 2
    with pytest.raises(ValueError):
        bench.matched_rank("ffba", budget, sh, max_rank=0)
