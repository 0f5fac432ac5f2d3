"""bench/generate_smoke.py --gguf on the CPU: real SmolLM2-135M weights.

The real file (test_real_model's session fixture: skipped without it unless
FLORA_REQUIRE_REAL_MODEL=1) is cut to its first 2 blocks, bit-exact, by
tools/device_pack.py's truncate_gguf, as it is carried to the device. fp32 on
the CPU: flora eager must generate transformers' greedy tokens exactly.
"""
import hashlib
import importlib.util
import json
import os
import sys

import pytest

from _bench_scripts import load_bench_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 2


def _truncated(src, dst):
    """``src`` cut to its first LAYERS blocks, bit-exact, as tools/device_pack.py
    cuts the file the device gets."""
    spec = importlib.util.spec_from_file_location("device_pack", os.path.join(ROOT, "tools", "device_pack.py"))
    dp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dp)
    dp.truncate_gguf(src, str(dst), LAYERS)
    return str(dst), LAYERS


@pytest.mark.slow
def test_gguf_mode_matches_transformers_on_cpu(gguf_path, tmp_path):
    pytest.importorskip("gguf")
    path, layers = _truncated(gguf_path, tmp_path / "smollm2-2.gguf")
    out = tmp_path / "g.json"
    smoke = load_bench_script("generate_smoke")
    assert smoke.main(["--device", "cpu", "--gguf", path, "--tokens", "4", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    assert (d["mode"], d["real"], d["layers"], d["sha256_first_mib"]) == (
        "real", os.path.basename(path), layers, head)
    assert d["ok"] and d["tokens"] == 4
    assert [(r["case"], r["equal"], r["required"]) for r in d["results"]] == [
        ("float32 base: eager == transformers", True, True)]


def test_gguf_mode_errors_are_one_line(tmp_path, monkeypatch):
    smoke = load_bench_script("generate_smoke")
    with pytest.raises(SystemExit, match="--gguf .*nope.gguf: file not found"):
        smoke.main(["--device", "cpu", "--gguf", str(tmp_path / "nope.gguf")])
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails, as on the device
    with pytest.raises(SystemExit) as e:
        smoke.main(["--device", "cpu", "--gguf", str(tmp_path / "m.gguf")])
    msg = str(e.value.code)
    assert "needs the 'gguf' Python package" in msg and "\n" not in msg
