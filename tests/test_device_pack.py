"""tools/device_pack.py on the CPU: no real model (a tiny GGUF), no real CUTLASS (a fake tree)."""
import importlib.util
import json
import lzma
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("device_pack", os.path.join(ROOT, "tools", "device_pack.py"))
dp = importlib.util.module_from_spec(_spec)
sys.modules["device_pack"] = dp
_spec.loader.exec_module(dp)


@pytest.mark.parametrize("budget,fixed,blocks,k", [
    (100, 40, [10] * 10, 6), (100, 100, [1, 1], 0), (1000, 10, [5] * 3, 3), (100, 40, [60, 1], 1),
    (100, 45, [10, 10, 10, 10, 10, 10], 5),
])
def test_choose_k(budget, fixed, blocks, k):
    assert dp.choose_k(budget, fixed, blocks) == k


def test_choose_k_overflow():
    with pytest.raises(ValueError):
        dp.choose_k(10, 11, [1])


@pytest.mark.parametrize("budget,fixed,block,n,margin,k", [
    (1020, 100, 100, 30, 0.02, 9), (1000, 100, 100, 30, 0.02, 8), (1000, 100, 100, 30, 0.0, 9),
    (10 ** 9, 100, 100, 5, 0.02, 5), (101, 100, 100, 5, 0.0, 0),
])
def test_estimate_k(budget, fixed, block, n, margin, k):
    assert dp.estimate_k(budget, fixed, block, n, margin) == k


def test_estimate_k_overflow():
    with pytest.raises(ValueError):
        dp.estimate_k(1000, 995, 1, 3)  # 995 * 1.01 > 1000


# ---- CUTLASS headers on a fake tree ---------------------------------------

FAKE_CUTLASS = {
    "include/cutlass/version.h": "#define CUTLASS_MAJOR 9\n#define CUTLASS_MINOR 8\n#define CUTLASS_PATCH 7 \n",
    "include/cutlass/gemm/gemm.h": "// gemm\n",
    "include/cute/tensor.hpp": "// cute\n" * 50,
    "tools/util/include/cutlass/util/packed_stride.hpp": "// util\n",
    "LICENSE.txt": "BSD-3\n",
}
NOT_ARCHIVED = ("bin/cuobjdump", "python/cutlass/x.py", "tools/profiler/y.h", "examples/z.cu")


@pytest.fixture
def fake_cutlass(tmp_path):
    root = tmp_path / "src_cutlass"
    for rel, text in FAKE_CUTLASS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for rel in NOT_ARCHIVED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("no")
    return root


def test_cutlass_files_and_version(fake_cutlass):
    rels = dp.cutlass_files(str(fake_cutlass))
    assert sorted(rels) == sorted(FAKE_CUTLASS) and rels[-1] == dp.CUTLASS_SENTINEL
    assert dp.cutlass_version(str(fake_cutlass)) == "9.8.7"
    (fake_cutlass / ".version").write_text("4.2.0.0\n")
    assert dp.cutlass_version(str(fake_cutlass)) == "4.2.0.0"
    assert ".version" in dp.cutlass_files(str(fake_cutlass))
    (fake_cutlass / dp.CUTLASS_SENTINEL).unlink()
    with pytest.raises(FileNotFoundError):
        dp.cutlass_files(str(fake_cutlass))


def test_cutlass_pack_unpack_round_trip(fake_cutlass, tmp_path):
    tar = str(tmp_path / "cutlass.tar.xz")
    info = dp.pack_cutlass(str(fake_cutlass), tar)
    assert info["files"] == len(FAKE_CUTLASS) and info["xz_bytes"] == os.path.getsize(tar)
    assert info["bytes"] == sum(len(t) for t in FAKE_CUTLASS.values())
    with tarfile.open(tar, "r:xz") as t:
        names = t.getnames()
        assert all(m.uid == 0 and m.uname == "" and m.isfile() for m in t.getmembers())
    assert names[-1] == dp.CUTLASS_SENTINEL and sorted(names) == sorted(FAKE_CUTLASS)
    dest = tmp_path / "third_party" / "cutlass"
    assert dp.unpack_cutlass(tar, str(dest))
    for rel, text in FAKE_CUTLASS.items():
        assert (dest / rel).read_text() == text
    assert not any((dest / rel).exists() for rel in NOT_ARCHIVED)
    (dest / "include/cute/tensor.hpp").write_text("kept")
    assert not dp.unpack_cutlass(tar, str(dest))  # already there: untouched
    assert (dest / "include/cute/tensor.hpp").read_text() == "kept"


@pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v tar && command -v xz"],
                                   capture_output=True).returncode != 0, reason="no tar/xz")
def test_cutlass_archive_unpacks_with_tar(fake_cutlass, tmp_path):
    tar = str(tmp_path / "cutlass.tar.xz")
    dp.pack_cutlass(str(fake_cutlass), tar)
    # the docstring's command: mkdir -p third_party/cutlass && tar -xJf ... -C third_party/cutlass
    subprocess.run(["sh", "-c", f"mkdir -p third_party/cutlass && tar -xJf {tar} -C third_party/cutlass"],
                   cwd=tmp_path, check=True)
    assert (tmp_path / "third_party/cutlass/include/cutlass/version.h").read_text() == \
        FAKE_CUTLASS["include/cutlass/version.h"]


def test_xz_file_round_trip(tmp_path):
    src, xz, back = tmp_path / "a.bin", str(tmp_path / "a.xz"), str(tmp_path / "b.bin")
    src.write_bytes(os.urandom(3000) + bytes(100000))
    digest = dp.xz_file(str(src), xz)
    assert digest == dp.sha256(str(src)) and os.path.getsize(xz) < 10000
    assert lzma.decompress(open(xz, "rb").read()) == src.read_bytes()
    assert dp.xz_sha256(xz) == digest
    assert dp.unxz_file(xz, back, digest) == digest and open(back, "rb").read() == src.read_bytes()
    os.remove(back)
    with pytest.raises(ValueError, match="sha256"):
        dp.unxz_file(xz, back, "0" * 64)
    assert not os.path.exists(back) and not os.path.exists(back + ".part")


def test_missing_requirements():
    meta = ("Name: gguf\nRequires-Dist: numpy (>=1.17)\nRequires-Dist: PyYAML>=5.1\n"
            "Requires-Dist: tqdm>=4.27\nRequires-Dist: requests\nRequires-Dist: sentencepiece ; extra == 'x'\n"
            "Requires-Dist: PySide6 (>=6.9,<7.0) ; (python_version >= \"3.9\") and (extra == \"gui\")\n"
            "Requires-Dist: typing_extensions; python_version < '3.13'\n")
    assert dp.missing_requirements(meta) == ["typing-extensions"]


# ---- GGUF truncation on a tiny synthetic file -----------------------------

try:
    import gguf
except ImportError:
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed")
N_BLOCKS = 4


def _tiny_gguf(path):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(N_BLOCKS)
    w.add_embedding_length(32)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", "é"])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 1, 1, 1])
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    q8 = gguf.GGMLQuantizationType.Q8_0
    emb = gguf.quantize(rng.standard_normal((5, 32)).astype(np.float32), q8)
    w.add_tensor("token_embd.weight", emb, raw_dtype=q8)
    w.add_tensor("output_norm.weight", rng.standard_normal(32).astype(np.float32))
    for i in range(N_BLOCKS):
        q = gguf.quantize(rng.standard_normal((32, 32)).astype(np.float32), q8)
        w.add_tensor(f"blk.{i}.attn_q.weight", q, raw_dtype=q8)
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(32).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    return str(path)


@needs_gguf
@pytest.mark.parametrize("k", [0, 2, N_BLOCKS])
def test_truncate_gguf_bit_exact(tiny, tmp_path, k):
    dst = str(tmp_path / "cut.gguf")
    dp.truncate_gguf(tiny, dst, k)
    report = dp.compare_gguf(tiny, dst, k)
    assert report["bytes_equal"], report["problems"]
    r = gguf.GGUFReader(dst)
    assert int(r.fields["llama.block_count"].contents()) == k
    assert r.fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]
    assert sorted({dp.block_index(t.name) for t in r.tensors} - {None}) == list(range(k))
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "</s>", "a", "b", "é"]
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    if k:
        assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F16


@needs_gguf
def test_compare_gguf_catches_changes(tiny, tmp_path):
    dst = str(tmp_path / "cut.gguf")
    dp.truncate_gguf(tiny, dst, 2)
    assert not dp.compare_gguf(tiny, dst, 3)["bytes_equal"]  # block_count and tensors off
    r = gguf.GGUFReader(dst, "r+")
    t = next(t for t in r.tensors if t.name == "blk.1.attn_q.weight")
    t.data.view(np.uint8)[5] ^= 1
    r.data.flush()
    del r
    problems = dp.compare_gguf(tiny, dst, 2)["problems"]
    assert problems == ["tensor blk.1.attn_q.weight differs"]


@needs_gguf
def test_gguf_sizes_bound_the_real_size(tiny, tmp_path):
    head, blocks = dp.gguf_sizes(gguf.GGUFReader(tiny))
    assert len(blocks) == N_BLOCKS and len(set(blocks)) == 1
    for k in (0, 2, N_BLOCKS):
        dst = tmp_path / f"cut{k}.gguf"
        dp.truncate_gguf(tiny, str(dst), k)
        size = os.path.getsize(dst)
        assert size <= head + sum(blocks[:k]) < size + 4096


@needs_gguf
def test_block_raw_and_estimate(tiny, tmp_path):
    r = gguf.GGUFReader(tiny)
    head, blocks = dp.gguf_sizes(r)
    raw = dp.block_raw(r, 1)
    assert len(raw) == blocks[1]
    q = next(t for t in r.tensors if t.name == "blk.1.attn_q.weight")
    assert raw[:q.n_bytes] == q.data.view(np.uint8).tobytes()
    fixed, block = dp.estimate_xz(tiny, r, str(tmp_path))
    cut = tmp_path / "k0.gguf"
    dp.truncate_gguf(tiny, str(cut), 0)
    assert fixed == dp.xz_size(cut.read_bytes()) and block == dp.xz_size(raw)
    assert not (tmp_path / "k0.gguf.part").exists()


def _xz_of_cut(tiny, tmp_path, k):
    cut = tmp_path / f"cut{k}.gguf"
    dp.truncate_gguf(tiny, str(cut), k)
    return dp.xz_size(cut.read_bytes())


@needs_gguf
def test_build_gguf_picks_k_from_estimate(tiny, tmp_path):
    calls = []
    g = dp.build_gguf(tiny, str(tmp_path), "auto", 10 ** 9, lambda p, k: calls.append((os.path.getsize(p), k)) or {})
    assert g["k"] == N_BLOCKS and [t["k"] for t in g["tries"]] == [N_BLOCKS] and calls[0][1] == N_BLOCKS
    assert g["bytes"] == calls[0][0] and g["xz_bytes"] == os.path.getsize(tmp_path / dp.GGUF_XZ)
    assert g["checks"]["xz_roundtrip"] and g["estimate"]["k"] == N_BLOCKS
    # a budget between the estimates of K=1 and K=2 (margin included) gives K=1
    est = g["estimate"]
    budget = int((est["fixed_xz"] + 1.5 * est["block_xz"]) * (1 + dp.MARGIN))
    assert dp.build_gguf(tiny, str(tmp_path), "auto", budget)["estimate"]["k"] == 1


@needs_gguf
def test_build_gguf_drops_a_block_when_the_archive_overshoots(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(dp, "estimate_xz", lambda *a: (1, 1))  # far too optimistic: K = all
    budget = _xz_of_cut(tiny, tmp_path, 2)
    assert _xz_of_cut(tiny, tmp_path, 3) > budget
    seen = []
    g = dp.build_gguf(tiny, str(tmp_path), "auto", budget, lambda p, k: seen.append(k) or {"k": k})
    assert g["k"] == 2 and [t["k"] for t in g["tries"]] == [4, 3, 2] and seen == [4, 3, 2]
    assert g["xz_bytes"] <= budget and g["checks"]["k"] == 2
    got = str(tmp_path / "back.gguf")
    dp.unxz_file(str(tmp_path / dp.GGUF_XZ), got, g["sha256"])
    assert dp.compare_gguf(tiny, got, 2)["bytes_equal"]


@needs_gguf
def test_build_gguf_fixed_layers_never_drops(tiny, tmp_path):
    g = dp.build_gguf(tiny, str(tmp_path), "3", 1)
    assert g["k"] == 3 and len(g["tries"]) == 1 and g["estimate"] == {}
    with pytest.raises(SystemExit):
        dp.build_gguf(tiny, str(tmp_path), str(N_BLOCKS + 1), 10 ** 9)


def _fake_wheel(whl_dir):
    whl_dir.mkdir(parents=True, exist_ok=True)
    name = f"gguf-{dp.gguf_version()}"
    with zipfile.ZipFile(whl_dir / f"{name}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}.dist-info/METADATA", "Name: gguf\nRequires-Dist: numpy>=1.17\n")


@needs_gguf
def test_pack_then_unpack_round_trip(tiny, fake_cutlass, tmp_path, monkeypatch):
    out = tmp_path / "dev"
    _fake_wheel(out / "whl")  # no pip download
    (out / "cutlass" / "include").mkdir(parents=True)  # the earlier layout: removed
    (out / "smollm2.gguf").write_bytes(b"old")
    monkeypatch.setenv("FLORA_CUTLASS_DIR", str(fake_cutlass))
    assert dp.main(["--out", str(out), "--gguf", tiny, "--no-flora-check", "--no-kernels", "--budget-mib", "1000"]) == 0
    assert sorted(os.listdir(out)) == ["MANIFEST.json", dp.CUTLASS_TAR, dp.GGUF_XZ, "whl"]
    m = json.loads((out / "MANIFEST.json").read_text())
    assert m["layers"] == N_BLOCKS and m["source_blocks"] == N_BLOCKS and m["cutlass_version"] == "9.8.7"
    assert m["sizes"][dp.GGUF_XZ] == os.path.getsize(out / dp.GGUF_XZ)
    assert m["sizes"]["smollm2.gguf"] > m["sizes"][dp.GGUF_XZ] > 0
    assert m["sizes"][dp.CUTLASS_TAR] == os.path.getsize(out / dp.CUTLASS_TAR)
    assert m["checks"]["gguf"]["bytes_equal"] and m["checks"]["xz_roundtrip"]

    # the device side: stdlib only (-S: no site-packages, so no numpy/gguf/torch)
    dest_g, dest_c = tmp_path / "u" / "smollm2.gguf", tmp_path / "tp" / "cutlass"
    cmd = [sys.executable, "-S", os.path.join(ROOT, "tools", "device_pack.py"), "--unpack", "--out", str(out),
           "--dest-gguf", str(dest_g), "--dest-cutlass", str(dest_c)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"cutlass: {dest_c} (unpacked)" in r.stdout and f"gguf: {dest_g} (" in r.stdout
    assert dp.sha256(str(dest_g)) == m["smollm2_gguf_sha256"]
    assert dp.compare_gguf(tiny, str(dest_g), N_BLOCKS)["bytes_equal"]
    for rel, text in FAKE_CUTLASS.items():
        assert (dest_c / rel).read_text() == text
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("already there") == 2, r.stdout

    # a manifest that disagrees: no file, rc 1
    m["smollm2_gguf_sha256"] = "0" * 64
    (out / "MANIFEST.json").write_text(json.dumps(m))
    other = tmp_path / "u2" / "g.gguf"
    assert dp.main(["--unpack", "--out", str(out), "--dest-gguf", str(other), "--dest-cutlass", str(dest_c)]) == 1
    assert not other.exists()


def _kernel_tree(root):
    """A repository with setup.py's rules, three kernel TUs (decode, sm_90, sm_80)
    sharing one header, and their objects built after the sources."""
    kdir, build = os.path.join(root, "csrc", "cuda", "kernels"), os.path.join(root, "build", "flora_kernels")
    os.makedirs(kdir)
    os.makedirs(build)
    with open(os.path.join(ROOT, "setup.py")) as f, open(os.path.join(root, "setup.py"), "w") as g:
        g.write(f.read())
    with open(os.path.join(kdir, "plan.h"), "w") as f:
        f.write("// shared\n")
    for tu in ("decode_bf16", "gemm_sm90_bf16", "gemm_sm80_bf16"):
        with open(os.path.join(kdir, tu + ".cu"), "w") as f:
            f.write('#include "plan.h"\n// ' + tu + "\n")
    later = os.path.getmtime(os.path.join(kdir, "plan.h")) + 10
    for tu in ("decode_bf16", "gemm_sm90_bf16", "gemm_sm80_bf16"):
        for ext, data in ((".o", b"OBJ " + tu.encode()), (".ptxas.log", b"log")):
            path = os.path.join(build, tu + ext)
            with open(path, "wb") as f:
                f.write(data)
            os.utime(path, (later, later))
    return kdir, build


def test_kernel_objects_travel_only_for_the_same_sources_and_nvcc(tmp_path, monkeypatch):
    """Hopper's TUs (decode, sm_90) are packed with a key of their sources and
    nvcc flags; unpacked, an object whose sources are unchanged lands newer than
    them (setup.py reuses it), one whose sources changed is left to the build,
    and another nvcc release uses none."""
    root = str(tmp_path / "repo")
    kdir, build = _kernel_tree(root)
    monkeypatch.setattr(dp, "ROOT", root)
    monkeypatch.setattr(dp, "nvcc_release", lambda nvcc=None: "13.0")
    info = dp.pack_kernels(str(tmp_path / "kernels.tar.xz"))
    assert sorted(info["keys"]) == ["decode_bf16", "gemm_sm90_bf16"] and info["nvcc"] == "13.0"
    manifest = {"keys": info["keys"], "nvcc": info["nvcc"]}
    for name in os.listdir(build):
        os.remove(os.path.join(build, name))
    with open(os.path.join(kdir, "gemm_sm90_bf16.cu"), "a") as f:
        f.write("// changed\n")
    msg = dp.unpack_kernels(str(tmp_path / "kernels.tar.xz"), manifest)
    assert msg == "1 objects reused; built there: gemm_sm90_bf16"
    obj = os.path.join(build, "decode_bf16.o")
    assert open(obj, "rb").read() == b"OBJ decode_bf16" and os.path.isfile(obj[:-2] + ".ptxas.log")
    assert os.path.getmtime(obj) > os.path.getmtime(os.path.join(kdir, "plan.h"))
    assert not os.path.exists(os.path.join(build, "gemm_sm90_bf16.o"))
    monkeypatch.setattr(dp, "nvcc_release", lambda nvcc=None: "12.8")
    assert dp.unpack_kernels(str(tmp_path / "kernels.tar.xz"), manifest).startswith("not used: nvcc 12.8")
