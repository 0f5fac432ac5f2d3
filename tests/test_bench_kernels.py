"""bench/kernels.py survives: each row is in the JSON as soon as it is
measured, and a row that fails records its error while the sweep goes on."""
import json

import pytest
from _bench_scripts import load_bench_script



@pytest.fixture(scope="module")
def kb():
    return load_bench_script("kernels")


ARGS = ["--device", "cpu", "--models", "1024-wide", "--shapes", "o", "--ranks", "16", "--dtypes", "float32",
        "--min-time", "0.001"]


def test_rows_and_errors_land_in_the_json(kb, tmp_path, monkeypatch):
    out = tmp_path / "k.json"
    real = kb.bench_case
    seen = []

    def flaky(torch, flora, timer, device, dtype, name, op, N, K, M, r, **kw):
        # every row written so far is already in the file when the next case starts
        seen.append(len(json.loads(out.read_text())["rows"]))
        if M == 2:
            raise RuntimeError("simulated failure\nsecond line")
        return real(torch, flora, timer, device, dtype, name, op, N, K, M, r, **kw)

    monkeypatch.setattr(kb, "bench_case", flaky)
    kb.main(ARGS + ["--ms", "1,2,3", "--json", str(out)])
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    # M=1: base fused lora fbl ffbl base+res fbl+res ffl+z_in+res; M=2: one error row
    assert seen == [0, 8, 9]
    err = [r for r in rows if "error" in r]
    assert len(err) == 1 and err[0]["M"] == 2 and err[0]["error"] == "RuntimeError: simulated failure"
    ok = [r for r in rows if "error" not in r]
    assert {r["M"] for r in ok} == {1, 3} and all(r["t_us"] > 0 and r["ratio"] > 0 for r in ok)
    assert doc["copy_gbs"] > 0 and not list(tmp_path.glob("*.tmp*"))


def test_a_failing_timing_is_one_error_row(kb):
    import torch

    import flora

    calls = []

    def timer(fns):
        calls.append(len(fns))
        if len(calls) == 2:  # the second timing (the "fused" row) fails
            raise MemoryError("out of memory")
        return 1e-5

    rows = kb.bench_case(torch, flora, timer, "cpu", torch.float32, "o", "fbl", 64, 32, 2, 4)
    assert [r["op"] for r in rows] == ["base", "fused", "lora", "fbl", "ffbl", "base+res", "fbl+res", "ffl+z_in+res"]
    assert rows[1]["error"] == "MemoryError: out of memory" and "t_us" not in rows[1]
    assert all(r["t_us"] == pytest.approx(10.0) for i, r in enumerate(rows) if i != 1)
    assert calls == [1] * 8  # one operand copy on the CPU (rotation is for CUDA's L2)


def test_ffl_shapes_time_the_backward_dx_against_its_own_yardsticks(kb, tmp_path):
    """FFL cases add dy W + dz A rows: cuBLAS on W alone (their ratio's
    base), on [W; A], unfused, and the flora op over the transposed views,
    which computes the same product as the fused matmul it is judged by."""
    import torch

    import flora

    timed = []

    def timer(fns):
        timed.append(fns[0]())
        return 1e-5 * len(timed)

    rows = kb.bench_case(torch, flora, timer, "cpu", torch.float64, "qkv", "ffl", 40, 24, 3, 8)
    ops = [r["op"] for r in rows]
    assert ops == ["base", "fused", "lora", "ffl", "dx-base", "dx-fused", "dx-lora", "dx"]
    torch.testing.assert_close(timed[ops.index("dx")], timed[ops.index("dx-fused")])
    torch.testing.assert_close(timed[ops.index("dx-lora")], timed[ops.index("dx-fused")])
    out = tmp_path / "k.json"
    kb.main(ARGS + ["--shapes", "qkv", "--ms", "2", "--json", str(out)])
    by = {r["op"]: r for r in json.loads(out.read_text())["rows"]}
    assert by["dx-base"]["ratio"] == 1.0 and by["base"]["ratio"] == 1.0
    assert by["dx"]["ratio"] == pytest.approx(by["dx"]["t_us"] / by["dx-base"]["t_us"])


def test_output_projection_rows_compute_what_the_model_does(kb):
    """Decode-M o / down cases time the calls a layer makes with its residual;
    each computes its reference (float64), and --aten-too times the same call
    again on the ATen path, which it restores afterwards."""
    import torch

    import flora

    out = {}

    def timer(fns):
        out[len(out)] = fns[0]()
        return 1e-5

    isa = flora._ext.C.cpu_isa() if flora._ext.C is not None else None
    rows = kb.bench_case(torch, flora, timer, "cpu", torch.float64, "o", "fbl", 40, 24, 2, 8,
                         aten_too=flora._ext.C is not None)
    ops = [r["op"] for r in rows]
    got = {op: out[i] for i, op in enumerate(ops)}
    if flora._ext.C is not None:
        assert ops[-5:] == ["base+res", "fbl+res@aten", "fbl+res", "ffl+z_in+res@aten", "ffl+z_in+res"]
        assert flora._ext.C.cpu_isa() == isa
        torch.testing.assert_close(got["fbl+res@aten"], got["fbl+res"])
        for a, b in zip(got["ffl+z_in+res@aten"], got["ffl+z_in+res"]):
            torch.testing.assert_close(a, b)
    # the residual is what base+res adds to base; fbl+res adds the same to fbl
    h = got["base+res"] - got["base"]
    assert h.abs().max() > 0
    torch.testing.assert_close(got["fbl+res"] - got["fbl"], h)
    y, z2 = got["ffl+z_in+res"]  # a writer: y = x W^T + h (base+res), z2 = x A^T + z_in
    assert z2.shape == (2, 8)
    torch.testing.assert_close(y, got["base+res"])


def test_aten_path_switches_and_restores(kb, monkeypatch):
    import os

    import flora

    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")
    with kb.aten_path(flora, "cuda"):
        assert os.environ["FLORA_CUDA_KERNELS"] == "0"
    assert os.environ["FLORA_CUDA_KERNELS"] == "1"
    monkeypatch.delenv("FLORA_CUDA_KERNELS")
    with kb.aten_path(flora, "cuda"):
        assert os.environ["FLORA_CUDA_KERNELS"] == "0"
    assert "FLORA_CUDA_KERNELS" not in os.environ


def test_decode_gemms_times_kernel_and_aten(capsys):
    """bench/decode_gemms.py: a row per M, kernel and ATen on streamed and resident weights;
    the ISA and the machine's M cutoff back after."""
    import torch

    from flora import _ext

    C = _ext.C
    if C is None or C.cpu_isa() == "aten":
        pytest.skip("needs the CPU decode kernels")
    isa, cut = C.cpu_isa(), C.cpu_gemv_max_m(torch.float32)
    assert load_bench_script("decode_gemms").main(["--dtype", "float32", "--ms", "2,3", "--rounds", "3",
                                                   "--layers", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 2 |", "| 3 |"))]
    assert len(rows) == 2 and all(len(r.split("|")) == 9 for r in rows)
    assert C.cpu_isa() == isa and C.cpu_gemv_max_m(torch.float32) == cut
