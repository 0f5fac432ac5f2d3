"""`flora demo --quick`: every stage (pretrain + cache, two fine-tunes, accuracy,
generation, latency table + plot), small and fast."""
import json
import os
import statistics
import time

import pytest
import torch

from flora import synthetic as syn
from flora.cli import build_parser
from flora.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    args = build_parser().parse_args(["demo", "--quick", "--steps", "6", "--cache-dir", str(d / "cache"),
                                      "--out", str(d / "out"), "--no-progress"])
    return d, run_demo(args)


def test_base_model_built_and_cached(demo):
    d, res = demo
    base = res["base_dir"]
    assert os.path.isfile(os.path.join(base, "config.json"))
    assert os.path.isfile(os.path.join(base, "model.safetensors"))
    mtime = os.path.getmtime(os.path.join(base, "model.safetensors"))
    t = time.perf_counter()
    again = syn.build_base_model(syn.QUICK_BASE, cache_dir=d / "cache", progress=False, log=None)
    assert str(again) == base and time.perf_counter() - t < 5  # reused, not retrained
    assert os.path.getmtime(os.path.join(base, "model.safetensors")) == mtime


def test_finetune_results(demo):
    _, res = demo
    assert set(res["results"]) == {"ffba", "lora"}
    for v, r in res["results"].items():
        assert r["trainable"] > 0 and r["seconds"] > 0
        for k in ("before", "after"):
            assert 0.0 <= r[k]["exact_match"] <= 1.0 and r[k]["loss"] > 0 and r[k]["n"] == 48
        # the base never saw the task; a few steps already lower the eval loss
        assert r["after"]["loss"] < r["before"]["loss"], v


def test_generations(demo):
    _, res = demo
    assert len(res["prompts"]) == 4
    for k in ("base", "ffba", "lora"):
        assert len(res["generations"][k]) == 4 and all(isinstance(s, str) for s in res["generations"][k])


def test_latency_outputs(demo):
    d, res = demo
    j = json.loads(open(res["paths"]["json"]).read())
    variants = {r["variant"]: r for r in j["rows"]}
    assert set(variants) == {"base", "lora", "ffba", "zflora"}
    for r in variants.values():
        assert r["engine"] == "flora" and r["ttft_s"] > 0 and r["tpot_s"] > 0
        if r["variant"] == "base":
            assert r["tpot_ratio"] == 1.0
        else:  # timed interleaved with base: the median round-by-round ratio
            want = [x / y for x, y in zip(r["tpot_runs"], r["paired"]["base_tpot_runs"])]
            assert abs(r["tpot_ratio"] - statistics.median(want)) < 1e-9
    assert j["models"][0]["model"] == res["base_dir"]  # timed on the demo's own model
    assert open(res["paths"]["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| flora | zflora |" in open(res["paths"]["md"]).read()


@pytest.mark.parametrize("device, msg", [("tpu", "expected cpu or cuda"), ("nonsense:x", "expected cpu or cuda")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")]))
def test_bad_device_is_a_clear_error(device, msg, tmp_path, capsys):
    from flora.cli import main

    assert main(["demo", "--quick", "--device", device, "--cache-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err
