"""bench/train_step.py in its quick mode on the CPU: every row trains (its
adapter tensors all change), each row is in the JSON as soon as it is
measured, and a row that fails records its error while the run goes on."""
import importlib.util
import json

import pytest
from _bench_scripts import load_bench_script

HAVE_PEFT = importlib.util.find_spec("peft") is not None
FLORA_ROWS = ["lora", "ffba", "zflora"]


@pytest.fixture(scope="module")
def ts():
    return load_bench_script("train_step")


@pytest.fixture(scope="module")
def quick(ts, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_step") / "ts.json"
    assert ts.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _ok(doc, name):
    (row,) = [r for r in doc["rows"] if r["row"] == name]
    assert "error" not in row, row
    return row


def test_quick_run_settings(quick):
    st = quick["settings"]
    assert quick["partial"] is False and quick["device_type"] == "cpu"
    assert (st["model"], st["batch"], st["seq"], st["steps"], st["warmup"], st["rank"]) == ("tiny", 2, 64, 2, 1, 32)
    assert st["alpha"] == 64 and st["base_dtype"] == "float32" and st["autocast"] is None
    assert [r["row"] for r in quick["rows"]] == ["peft-lora", *FLORA_ROWS]
    md = quick["markdown"]
    assert "python bench/train_step.py --device cpu --quick" in md and "B = 2, T = 64, r = 32" in md
    assert all(f"| {r} |" in md for r in ["peft-lora", *FLORA_ROWS])


@pytest.mark.parametrize("name", FLORA_ROWS)
def test_flora_rows_train(quick, name):
    r = _ok(quick, name)
    assert r["engine"] == "flora" and r["tokens_per_s"] > 0 and r["ms_per_step"] > 0
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["step_s"]) and len(r["step_s_runs"]) == 2
    assert r["trainable_params"] > 0 and r["adapter_dtype"] == ["float32"]
    assert r["changed"] is True and r["changed_tensors"] == r["trainable_tensors"] > 0
    assert r["peak_gib"] > 0  # on the CPU: the process's peak resident set
    assert r["loss_first"] is not None and r["loss_last"] is not None


@pytest.mark.skipif(not HAVE_PEFT, reason="peft is not installed")
def test_peft_row_trains_and_is_the_reference(quick):
    r = _ok(quick, "peft-lora")
    assert r["engine"] == "peft" and r["tokens_per_s"] > 0 and r["ratio_to_peft"] == 1.0
    assert r["changed"] is True and r["changed_tensors"] == r["trainable_tensors"] == 4 * 7  # 2 layers x 7 x A,B
    # the same LoRA on both engines: the same number of trainable parameters
    assert r["trainable_params"] == _ok(quick, "lora")["trainable_params"]
    for name in FLORA_ROWS:
        f = _ok(quick, name)
        assert f["ratio_to_peft"] == pytest.approx(f["tokens_per_s"] / r["tokens_per_s"])


def test_full_logits_row_is_the_same_step_without_chunking(ts, tmp_path, capsys):
    out = tmp_path / "ts.json"
    assert ts.main(["--device", "cpu", "--quick", "--rows", "zflora", "zflora+full-logits",
                    "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    a, b = _ok(doc, "zflora"), _ok(doc, "zflora+full-logits")
    assert a["variant"] == b["variant"] == "zflora" and b["changed"] is True
    # same weights, batch and seed: the chunked loss is the full one, to fp32 rounding
    assert a["loss_first"] == pytest.approx(b["loss_first"], rel=1e-5)
    assert ts.main(["--device", "cpu", "--quick", "--rows", "peft-lora+full-logits", "--json", str(out)]) == 2
    assert "optionally with +full-logits" in capsys.readouterr().err


def test_a_failing_row_is_recorded_and_the_run_goes_on(ts, tmp_path, monkeypatch):
    out = tmp_path / "ts.json"
    real = ts.build_flora_row
    seen = []

    def flaky(hf, variant, s):
        # every row measured so far is already in the file when the next one is built
        seen.append(len(json.loads(out.read_text())["rows"]))
        if variant == "ffba":
            raise RuntimeError("simulated failure\nsecond line")
        return real(hf, variant, s)

    monkeypatch.setattr(ts, "build_flora_row", flaky)
    argv = ["--device", "cpu", "--quick", "--rows", "ffba", "lora", "--steps", "1", "--warmup", "0",
            "--json", str(out)]
    assert ts.main(argv) == 0
    doc = json.loads(out.read_text())
    assert seen == [0, 1]
    err, ok = doc["rows"]
    assert err == {"row": "ffba", "error": "RuntimeError: simulated failure"}
    assert ok["row"] == "lora" and ok["tokens_per_s"] > 0 and ok["changed"] is True
    assert ok["ratio_to_peft"] is None  # no peft-lora row in this run
    assert "| ffba | error: RuntimeError: simulated failure |" in doc["markdown"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_bad_arguments(ts, capsys):
    assert ts.main(["--device", "cpu", "--rows", "nope"]) == 2
    assert "--rows: unknown ['nope']" in capsys.readouterr().err
    assert ts.main(["--device", "cpu", "--seq", "1"]) == 2
