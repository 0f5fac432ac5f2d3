"""bench/learning.py end to end, kept tiny: quick base model, two variants, one task."""
import json

import pytest
import torch
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


def _real_result(runs, **args):
    a = dict(tasks=["arith"], variants=["lora", "ffba"], lrs=[1e-3, 1e-2], seeds=1, steps=2, batch_size=2,
             top_layers=2, ref_rank=8, n_train=4, n_eval=4, n_gen=0, alpha_ratio=2.0)
    a.update(args)
    return {"date": "d", "machine": "m", "torch": "t", "command": "c", "args": a, "model": "x.gguf",
            "layers": 30, "budget": 100, "ranks": {"lora": 8, "ffba": 20}, "trainable": {"lora": 100, "ffba": 99},
            "base": {"arith": {"loss": 2.0, "exact_match": 0.0}}, "runs": runs, "split_check": {},
            "data": {"arith": {"train": 4, "eval": 4}}, "seconds": 60.0}


def _run(v, seed, lr, loss):
    return {"task": "arith", "variant": v, "rank": {"lora": 8, "ffba": 20}[v], "seed": seed, "lr": lr, "train_loss": loss,
            "eval_loss": loss, "exact_match": 0.0, "seconds": 1.0, "picked": False}


def test_real_bench_picks_lr_by_mean_over_seeds_and_merges_seed_runs():
    """Every lr on every seed (two runs merged: seed 0, then seeds 1-2): the lr
    with the lowest MEAN eval loss wins, even where seed 0 alone prefers another."""
    real = load_bench_script("learning_real")
    s0 = _real_result([_run("lora", 0, 1e-3, 1.0), _run("lora", 0, 1e-2, 1.1),
                       _run("ffba", 0, 1e-3, 1.5), _run("ffba", 0, 1e-2, float("nan"))])
    s12 = _real_result([_run("lora", s, lr, x) for s, lr, x in
                        ((1, 1e-3, 1.4), (2, 1e-3, 1.3), (1, 1e-2, 1.0), (2, 1e-2, 1.0))]
                       + [_run("ffba", s, 1e-3, 1.6) for s in (1, 2)], first_seed=1, seeds=2)
    merged = real.merge([s0, s12])
    lora = real.pick(merged["runs"], "lora")
    assert {r["lr"] for r in lora} == {1e-2} and sorted(r["seed"] for r in lora) == [0, 1, 2]
    ffba = real.pick(merged["runs"], "ffba")  # 1e-2 ran on one seed only (and diverged)
    assert {r["lr"] for r in ffba} == {1e-3} and len(ffba) == 3
    md = real.markdown(merged)
    # lora at 1e-2: mean of 1.1, 1.0, 1.0 = 1.0333, sample sd 0.0577
    assert "| lora | 8 | 100 | 1.000 | 0.01 | 1.033 ± 0.058 |" in md
    assert "| ffba | 20 | 99 | 0.990 | 0.001 | 1.567 ± 0.058 |" in md
    assert "1.233 ± 0.208 / 0 [3]" in md  # lora at 1e-3 in the sweep table: 1.0, 1.4, 1.3
    assert "| ffba | 1.567 ± 0.058 / 0 [3] | diverged [1] |" in md  # lrs in ascending order
    part = real.markdown(_real_result([_run("ffba", 0, 1e-2, 1.5), _run("ffba", 1, 1e-2, float("nan"))]))
    assert "1.500 ± 0.000 / 0 [2, 1 diverged]" in part  # the mean is over the finite runs, and says so
    assert "seeds [0, 1, 2]" in md
    assert "(1.0 min wall for the longest, 2.0 min for all)" in md
    with pytest.raises(ValueError):
        real.merge([s0, _real_result([], alpha_ratio=0.5)])
    one = real.markdown(_real_result([_run("ffba", 0, 1e-3, 1.5)], rank=20, targets=["q", "o", "gate", "down"]))
    assert "every variant at rank 20; targets q,o,gate,down only" in one
    with pytest.raises(ValueError):
        real.merge([s0, _real_result([], targets=["q", "o"])])


def test_real_bench_state_cache_reused_only_for_the_same_ids(tmp_path):
    real = load_bench_script("learning_real")
    calls = []

    def compute(items):  # stands in for the lower layers
        calls.append(len(items))
        for it in items:
            it["h"] = torch.tensor(it["ids"], dtype=torch.float32)[:, None] * 2.0

    path = tmp_path / "c" / "s.pt"
    items = [{"ids": [5, 6, 7]}, {"ids": [8]}]
    assert not real.cached_states(path, items, compute) and calls == [2]
    again = [{"ids": [5, 6, 7]}, {"ids": [8]}]
    assert real.cached_states(path, again, compute) and calls == [2]
    assert torch.equal(again[0]["h"], items[0]["h"]) and torch.equal(again[1]["h"], items[1]["h"])
    other = [{"ids": [5, 6, 9]}, {"ids": [8]}]  # different examples: recomputed, cache replaced
    assert not real.cached_states(path, other, compute) and calls == [2, 2]
    assert torch.equal(other[0]["h"], torch.tensor([[10.0], [12.0], [18.0]]))
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.pt"]


@pytest.mark.parametrize("k", [1, 4])
def test_real_bench_split_check_on_a_tiny_llama(k):
    """check_split_exact: top k layers on cached states == the full model with
    the adapter on those layers, k = all layers included; a wiring error or a
    non-finite forward fails it (nan must not compare as 'small')."""
    from flora import FusedLlama
    from flora.checkpoint import arch_from_hf_config
    from llama_fixtures import llama_model

    real = load_bench_script("learning_real")
    hf = llama_model(layers=4)
    arch = arch_from_hf_config(hf.config)
    sd = {n: t.detach().clone() for n, t in hf.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    items = [{"ids": torch.randint(3, 1000, (n,), generator=g).tolist(), "n_prompt": 3} for n in (7, 5)]
    real.lower_states(FusedLlama(arch, sd, None), items, arch.num_hidden_layers - k)
    for v in ("zflora", "ffba-ab"):
        assert real.check_split_exact(sd, arch, items, k, v) <= 1e-4
    right = real.full_adapter_sd  # the full model gets other adapter weights: must be caught
    real.full_adapter_sd = lambda top, n_lower: {n: -t for n, t in right(top, n_lower).items()}
    try:
        with pytest.raises(AssertionError, match="disagrees"):
            real.check_split_exact(sd, arch, items, k, "ffba-ab")
    finally:
        real.full_adapter_sd = right
    real_top = real.top_forward
    real.top_forward = lambda *a: real_top(*a) * float("nan")
    try:
        with pytest.raises(AssertionError, match="disagrees"):
            real.check_split_exact(sd, arch, items, k, "zflora")
    finally:
        real.top_forward = real_top
