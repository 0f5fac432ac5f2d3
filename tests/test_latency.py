"""bench/latency.py (flora.bench.latency) in its quickest mode on a tiny model,
plus the pieces it is built from: weight bytes, the results-file insertion,
argument errors, and the NVTX helper."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flora.bench import latency as bl
from flora import _ext, nvtx

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["transformers", "peft", "base", "lora", "ffba", "zflora"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("latency")
    results = d / "RESULTS.md"
    # an existing results file with another section after ours: must be kept intact
    results.write_text("# Benchmark results\n\n## CPU kernels\n\nkernel table\n\n"
                       f"{bl.SECTION}\n\nolder run\n\n## Learning\n\nlearning table\n")
    argv = ["--quick", "--device", "cpu", "--model", "tiny", "--rows", *ROWS, "--rank", "16", "--out-dir", str(d),
            "--name", "run", "--results", str(results)]
    assert bl.main(argv) == 0
    return d, json.loads((d / "run.json").read_text()), results.read_text()


def test_json_rows_and_ratios(quick_run):
    _, res, _ = quick_run
    rows = res["rows"]
    got = {(r["engine"], r["variant"]) for r in rows}
    assert got == {("transformers", "transformers"), ("transformers", "peft"), ("flora", "base"),
                   ("flora", "lora"), ("flora", "ffba"), ("flora", "zflora")}
    assert res["copy_gbps"] == max(res["copy_gbps_runs"]) > 0 and len(res["copy_gbps_runs"]) == 2
    cfg = bl.llama_config("tiny")
    wb = res["models"][0]["weight_bytes"]
    bases = {r["engine"]: r for r in rows if r["variant"] in ("base", "transformers")}
    for r in rows:
        assert r["skipped"] is None
        assert r["ttft_s"] > 0 and r["tpot_s"] > 0
        assert (r["batch"], r["prompt_len"], r["new_tokens"], r["graph"]) == (1, 32, 8, False)
        b = bases[r["engine"]]  # the base of the SAME engine
        if r["variant"] not in ("base", "transformers"):
            # timed interleaved with the base of its engine: the median of per-round ratios
            pr = r["paired"]
            assert len(r["tpot_runs"]) == len(pr["base_tpot_runs"]) == 1
            for k in ("ttft", "tpot"):
                want = [x / y for x, y in zip(r[f"{k}_runs"], pr[f"base_{k}_runs"])]
                assert math.isclose(r[f"{k}_ratio"], statistics.median(want), rel_tol=1e-9)
        else:
            assert math.isclose(r["tpot_ratio"], r["tpot_s"] / b["tpot_s"], rel_tol=1e-9)
            assert math.isclose(r["ttft_ratio"], r["ttft_s"] / b["ttft_s"], rel_tol=1e-9)
        assert math.isclose(r["tokens_per_s"], 1 / r["tpot_s"], rel_tol=1e-9)
        assert math.isclose(r["decode_gbps"], wb / r["tpot_s"] / 1e9, rel_tol=1e-9)
        assert math.isclose(r["floor_ratio"], r["tpot_s"] * res["copy_gbps"] * 1e9 / wb, rel_tol=1e-9)
        assert math.isclose(r["bytes_ratio"], 1 + 4 * r["adapter_params"] / wb, rel_tol=1e-9)  # fp32
        if r["variant"] not in ("base", "transformers"):
            assert r["adapter_params"] > 0 and r["rank"] == 16
    assert bases["flora"]["tpot_ratio"] == 1.0 and bases["transformers"]["tpot_ratio"] == 1.0
    # flora base was paired with each of the 3 variants; the row pools their runs
    assert bases["flora"]["pairings"] == 3 and bases["flora"]["base_drift"] >= 0
    assert cfg.hidden_size == 128
    assert res["environment"]["torch"] == torch.__version__
    assert "--quick" in res["command"]


def test_markdown_inserted_into_its_section(quick_run):
    _, res, text = quick_run
    # the other sections survive, ours gets the new block before "## Learning"
    assert text.startswith("# Benchmark results\n\n## CPU kernels\n\nkernel table\n")
    sec, learn = text.index(bl.SECTION), text.index("## Learning")
    assert sec < text.index("older run") < text.index("| engine | variant |") < learn
    assert text.rstrip().endswith("learning table")
    block = text[sec:learn]
    assert "python bench/latency.py --quick" in block and res["environment"]["device"] in block
    assert block.count("| flora | ") == 4 and block.count("| transformers | ") == 2
    assert "not measured" in block  # says GPU rows are missing on a CPU run


def test_png_written(quick_run):
    d, _, _ = quick_run
    png = (d / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_weight_bytes_match_the_model():
    """Bytes one decode step streams = every 2-D weight of a tied model (the
    embedding doubles as the LM head), counted independently from transformers."""
    cfg = bl.llama_config("tiny")
    m = bl.build_hf_model(cfg, torch.float32, torch.device("cpu"), 0)
    n = sum(p.numel() for p in m.parameters() if p.dim() == 2)
    assert bl.weight_bytes(cfg, torch.float32) == 4 * n
    assert bl.weight_bytes(cfg, torch.bfloat16) == 2 * n


def test_flora_adapters_are_nonzero():
    cfg = bl.llama_config("tiny")
    hf = bl.build_hf_model(cfg, torch.float32, torch.device("cpu"), 0)
    for variant in ("ffba", "zflora"):
        m, n = bl.build_flora(hf, variant, 16, None, torch.float32, torch.device("cpu"), 1)
        params = [p for p in m.parameters() if p.requires_grad]
        assert n == sum(p.numel() for p in params) > 0
        assert all(bool((p != 0).all()) for p in params)


def test_append_results_creates_section(tmp_path):
    p = tmp_path / "R.md"
    bl.append_results(p, "block one\n")
    bl.append_results(p, "block two\n")
    t = p.read_text()
    assert t.count(bl.SECTION) == 1 and t.index("block one") < t.index("block two")


@pytest.mark.parametrize("argv, msg", [
    (["--rank", "0"], "--rank"),
    (["--rows", "nope"], "--rows"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--mode", "graph", "--device", "cpu"], "CUDA"),
    (["--model", "no/such/dir"], "--model"),
    (["--repeats", "0"], "--repeats"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--compile", "--warmup", "0"], "--warmup"),
    (["--prefills", "0"], "--prefills"),
])
def test_bad_arguments(argv, msg, tmp_path, capsys):
    assert bl.main(argv + ["--out-dir", str(tmp_path), "--no-results"]) == 2
    assert msg in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_script_and_cli_entry_points():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--rank-sweep" in r.stdout
    from flora.cli import build_parser

    args = build_parser().parse_args(["bench", "latency", "--quick", "--model", "tiny"])
    assert args.quick and args.model == ["tiny"] and args.func.__name__ == "_bench_latency"
    # TTFT samples a run: 5 prefills on a GPU (host-bound eager prefill), 1 on the CPU
    args = build_parser().parse_args(["bench", "latency", "--model", "tiny", "--device", "cpu"])
    assert bl.make_plan(args).prefills == 1
    args = build_parser().parse_args(["bench", "latency", "--model", "tiny", "--device", "cpu", "--prefills", "3"])
    assert bl.make_plan(args).prefills == 3


def test_nvtx_ranges(monkeypatch):
    calls = []
    monkeypatch.setattr(nvtx, "_backend", lambda: (lambda n: calls.append(("push", n)),
                                                   lambda: calls.append(("pop",))))
    with nvtx.range("attn", 3):
        pass
    assert calls == []  # off by default
    try:
        nvtx.enable()
        with nvtx.range("attn", 3):
            with nvtx.range("prefill"):
                pass
    finally:
        nvtx.enable(False)
    assert calls == [("push", "attn[3]"), ("push", "prefill"), ("pop",), ("pop",)]
    monkeypatch.setattr(nvtx, "_backend", lambda: None)
    with pytest.raises(RuntimeError, match="NVTX"):
        nvtx.enable()
    assert not nvtx.is_enabled()


def test_model_emits_nvtx_ranges(monkeypatch):
    """With ranges on, generation marks prefill, each decode step and each
    layer's attention and MLP, balanced; off, it marks nothing."""
    from flora.bench.timing import measure_latency
    from flora.model import FusedLlama

    calls = []
    monkeypatch.setattr(nvtx, "_backend", lambda: (lambda n: calls.append(n), lambda: calls.append(None)))
    hf = bl.build_hf_model(bl.llama_config("tiny"), torch.float32, torch.device("cpu"), 0)
    m = FusedLlama.from_pretrained(hf)
    measure_latency(m, 1, 4, 3, repeats=1, warmup=0)
    assert calls == []
    try:
        nvtx.enable()
        measure_latency(m, 1, 4, 3, repeats=1, warmup=0)
    finally:
        nvtx.enable(False)
    names = [c for c in calls if c is not None]
    assert len(names) == calls.count(None)  # every push popped
    assert names.count("prefill") == 1 and names.count("decode") == 2
    assert names.count("attn[0]") == names.count("mlp[1]") == 3  # prefill + 2 decode steps


def test_from_json_rerenders_without_measuring(quick_run, tmp_path, capsys):
    """--from-json re-renders an earlier run (a JSON from before the bytes
    column gets it computed); a missing or foreign file is a clear error."""
    _, res, _ = quick_run
    old = json.loads(json.dumps(res))
    for r in old["rows"]:
        r.pop("bytes_ratio", None)
    src = tmp_path / "old.json"
    src.write_text(json.dumps(old))
    out = tmp_path / "out"
    assert bl.main(["--from-json", str(src), "--out-dir", str(out), "--no-results", "--no-plot"]) == 0
    again = json.loads((out / "old.json").read_text())
    for a, b in zip(again["rows"], res["rows"]):
        assert math.isclose(a["bytes_ratio"], b["bytes_ratio"], rel_tol=1e-12)
        assert a["tpot_s"] == b["tpot_s"]
    assert "| bytes × |" in capsys.readouterr().out
    assert bl.main(["--from-json", str(tmp_path / "none.json"), "--no-results"]) == 2
    (tmp_path / "bad.json").write_text("{}")
    assert bl.main(["--from-json", str(tmp_path / "bad.json"), "--no-results"]) == 2
    assert "not a JSON written by this benchmark" in capsys.readouterr().err


def test_truncated_checkpoint_is_a_one_line_error(tmp_path, capsys):
    """issue 16.6: --model on a truncated checkpoint fails before measuring, exit 2."""
    from llama_fixtures import llama_model, save_model

    d = save_model(llama_model(), tmp_path / "ckpt")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "out"
    capsys.readouterr()  # transformers' save progress
    assert bl.main(["--model", str(d), "--quick", "--device", "cpu", "--out-dir", str(out), "--no-results"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated" in err and "Traceback" not in err
    assert not out.exists()


def test_rows_written_as_measured_and_errors_recorded(tmp_path, monkeypatch):
    """Each row reaches the JSON as soon as it is measured; a row that raises
    records its error and the run goes on."""
    writes = []
    real_write = bl.atomic_write_json

    def spy(path, obj):
        writes.append((obj.get("partial", False), len(obj["rows"])))
        real_write(path, obj)

    real_pair = bl.pair_latency

    def pair(base_probe, probe, *a):
        if probe.model.adapter_config.variant == "lora":
            raise RuntimeError("simulated failure\nsecond line")
        return real_pair(base_probe, probe, *a)

    monkeypatch.setattr(bl, "atomic_write_json", spy)
    monkeypatch.setattr(bl, "pair_latency", pair)
    argv = ["--quick", "--device", "cpu", "--model", "tiny", "--rows", "base", "lora", "ffba", "--out-dir",
            str(tmp_path), "--name", "run", "--no-results", "--no-plot"]
    assert bl.main(argv) == 0
    partial = [n for p, n in writes if p]
    assert partial[:3] == [1, 2, 3] and writes[-1][0] is False  # one write per row, then the final one
    res = json.loads((tmp_path / "run.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["lora"]["skipped"] == "error: RuntimeError: simulated failure"
    assert rows["ffba"]["skipped"] is None and rows["ffba"]["tpot_s"] > 0
    assert rows["base"]["skipped"] is None
    assert "partial" not in res
    if _ext.C is not None:  # the CPU kernel: no SDPA under it
        assert res["models"][0]["attention"] == "flora::decode_attention"


def test_compiled_rows_are_judged_against_the_compiled_base(tmp_path):
    """--compile: flora rows decode through torch.compile (as generate(compile=True)),
    each variant paired with the compiled base; the table says so."""
    results = tmp_path / "RESULTS.md"
    argv = ["--quick", "--device", "cpu", "--model", "tiny", "--rows", "base", "ffba", "--rank", "8",
            "--compile", "--out-dir", str(tmp_path), "--name", "c", "--results", str(results), "--no-plot"]
    assert bl.main(argv) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"base", "ffba"}
    for r in rows.values():
        assert r["compiled"] is True and r["skipped"] is None and r["tpot_s"] > 0
    pr = rows["ffba"]["paired"]
    want = statistics.median(x / y for x, y in zip(rows["ffba"]["tpot_runs"], pr["base_tpot_runs"]))
    assert math.isclose(rows["ffba"]["tpot_ratio"], want, rel_tol=1e-9)
    assert "| eager compiled |" in results.read_text()
