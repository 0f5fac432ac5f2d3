"""Pack `.device/`: what a GPU run needs from this machine, small enough to carry.

The device machine gets a copy of the working tree plus at most 8 carried
ignored paths, 64 MiB in all, and has no network and no `gguf` package. This
tool builds one ignored folder (default `.device/`) that fits:

  cutlass.tar.xz    the full CUTLASS/CuTe headers of $FLORA_CUTLASS_DIR or
                    third_party/cutlass: include/ and tools/util/include/ (plus
                    .version), paths relative to the CUTLASS root; ~26 MiB -> ~1 MiB
  smollm2.gguf.xz   SmolLM2-135M-Instruct cut to its first K blocks, xz-compressed:
                    all metadata (tokenizer included), token_embd/output_norm/output
                    and blk.0..blk.K-1 copied bit-exact, llama.block_count = K
  kernels.tar.xz    the kernel objects nvcc built here for Hopper (build/flora_kernels,
                    torch-free), each keyed by its sources + nvcc flags: --unpack puts
                    back those whose key and nvcc release match the device's, so its
                    build compiles only _C (--no-kernels: leave them out)
  whl/              the `gguf` wheel (cp312) and any dependency the image lacks
  MANIFEST.json     K, sizes (compressed and not), the cut file's sha256, versions, checks

How the device command uses it (run(carry=[".device"], ...)):

  python tools/device_pack.py --unpack --dest-gguf /tmp/smollm2.gguf
      (stdlib only, so it runs before anything is installed: the headers go to
      $FLORA_CUTLASS_DIR or third_party/cutlass unless already there, the GGUF to
      --dest-gguf, its sha256 checked against MANIFEST.json; prints both paths)
  or, by hand:
      mkdir -p third_party/cutlass && tar -xJf .device/cutlass.tar.xz -C third_party/cutlass
      xz -dc .device/smollm2.gguf.xz > /tmp/smollm2.gguf
  pip install --no-index --no-deps --target /tmp/site .device/whl/*.whl
      (--no-deps: --target ignores the image's numpy & co. and would want them)
  export PYTHONPATH=/tmp/site
  pip install --no-build-isolation .               # kernel TUs see third_party/cutlass
  FLORA_SMOLLM2_GGUF=/tmp/smollm2.gguf ...          # generation on real weights

  python tools/device_pack.py [--out .device] [--layers K|auto] [--budget-mib 62]
  python tools/device_pack.py --unpack [--out .device] [--dest-gguf PATH] [--dest-cutlass DIR]

K=auto: the budget is --budget-mib minus the bytes the working tree itself
carries (git-tracked and untracked, unignored files). xz of one block's raw
bytes and of the block-less file (written once) estimate the compressed size of
K blocks; K is the largest whose estimate, plus a 1% margin, fits what the
headers, wheels and manifest leave. The cut is checked uncompressed (bit-exact
tensors, block_count, a flora load, tokenizer equality), compressed once, and
cut one block shorter (and redone) only if the archive still overshoots.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from setup_rules import setup_functions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
CUTLASS_SUBDIRS = ("include", "tools/util/include")
CUTLASS_EXTRAS = (".version", "LICENSE.txt")
CUTLASS_SENTINEL = "include/cutlass/version.h"  # archived last: present => complete
CUTLASS_TAR, GGUF_XZ, KERNELS_TAR = "cutlass.tar.xz", "smollm2.gguf.xz", "kernels.tar.xz"
DEVICE_ARCHS = "90"  # the lent cards are Hopper: the TUs FLORA_KERNEL_ARCHS=90 builds
STALE = ("cutlass", "smollm2.gguf", "smollm2.gguf.part", GGUF_XZ + ".part", CUTLASS_TAR + ".part",
         KERNELS_TAR, KERNELS_TAR + ".part")
XZ_PRESET = 6
MARGIN = 0.01
# what the device image already has (numpy, pyyaml, tqdm, requests, sentencepiece)
IMAGE_HAS = frozenset({"numpy", "pyyaml", "tqdm", "requests", "sentencepiece"})
MANIFEST_ALLOWANCE = 16 << 10


# ---- sizes and budget -----------------------------------------------------

def dir_size(path: str) -> int:
    """Bytes of the regular files under `path` (a file: its size)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f))
               for d, _, files in os.walk(path) for f in files
               if os.path.isfile(os.path.join(d, f)))


def tree_bytes(root: str = ROOT, exclude: str = "") -> int:
    """Bytes the working tree carries by itself: git-tracked files plus
    untracked files git does not ignore (`exclude`, a relative folder, left out)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout.decode()
    prefix = exclude.rstrip("/") + "/" if exclude else None
    paths = {p for p in out.split("\0") if p and not (prefix and p.startswith(prefix))}
    return sum(os.path.getsize(os.path.join(root, p)) for p in paths
               if os.path.isfile(os.path.join(root, p)))


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def choose_k(budget: int, fixed: int, blocks: list[int]) -> int:
    """Largest K with fixed + sum(blocks[:K]) <= budget; ValueError when even K=0 overflows."""
    if fixed > budget:
        raise ValueError(f"{fixed / MIB:.2f} MiB without any block exceeds the budget {budget / MIB:.2f} MiB")
    k, total = 0, fixed
    while k < len(blocks) and total + blocks[k] <= budget:
        total += blocks[k]
        k += 1
    return k


def estimate_k(budget: int, fixed_xz: int, block_xz: int, n_blocks: int, margin: float = MARGIN) -> int:
    """Largest K whose estimated archive, (fixed_xz + K * block_xz) * (1 + margin), fits `budget`."""
    return choose_k(int(budget / (1 + margin)), fixed_xz, [block_xz] * n_blocks)


def xz_size(data) -> int:
    """Bytes of `data` (bytes-like) as one xz stream at XZ_PRESET."""
    return len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=XZ_PRESET))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def xz_file(src: str, dst: str) -> str:
    """xz-compress `src` to `dst` (via dst.part); returns sha256 of `src`."""
    h, comp = hashlib.sha256(), lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=XZ_PRESET)
    with open(src, "rb") as fi, open(dst + ".part", "wb") as fo:
        while chunk := fi.read(4 * MIB):
            h.update(chunk)
            fo.write(comp.compress(chunk))
        fo.write(comp.flush())
    os.replace(dst + ".part", dst)
    return h.hexdigest()


def unxz_file(src: str, dst: str, want: str | None = None) -> str:
    """Decompress the xz file `src` to `dst` (via dst.part); returns sha256 of the
    result. ValueError (and no `dst`) when it is not `want`."""
    h = hashlib.sha256()
    with lzma.open(src, "rb") as fi, open(dst + ".part", "wb") as fo:
        while chunk := fi.read(4 * MIB):
            h.update(chunk)
            fo.write(chunk)
    if want and h.hexdigest() != want:
        os.remove(dst + ".part")
        raise ValueError(f"{src}: sha256 {h.hexdigest()} is not the manifest's {want}")
    os.replace(dst + ".part", dst)
    return h.hexdigest()


# ---- CUTLASS headers ------------------------------------------------------

def source_cutlass() -> str:
    """$FLORA_CUTLASS_DIR or third_party/cutlass, fetched when missing."""
    d = os.environ.get("FLORA_CUTLASS_DIR") or os.path.join(ROOT, "third_party", "cutlass")
    if not os.path.isfile(os.path.join(d, CUTLASS_SENTINEL)):
        subprocess.run(["bash", os.path.join(ROOT, "tools", "fetch_cutlass.sh"), d], check=True)
    return os.path.abspath(d)


def cutlass_files(cutlass: str) -> list[str]:
    """Files to archive, relative to the CUTLASS root ('/'-separated, sorted),
    the sentinel version.h last; bin/ and the rest of the tree left out."""
    rels = [r for r in CUTLASS_EXTRAS if os.path.isfile(os.path.join(cutlass, r))]
    for sub in CUTLASS_SUBDIRS:
        for d, dirs, files in os.walk(os.path.join(cutlass, sub)):
            dirs.sort()
            for f in sorted(files):
                if os.path.isfile(os.path.join(d, f)):
                    rels.append(os.path.relpath(os.path.join(d, f), cutlass).replace(os.sep, "/"))
    if CUTLASS_SENTINEL not in rels:
        raise FileNotFoundError(f"{cutlass}: no {CUTLASS_SENTINEL}")
    rels.remove(CUTLASS_SENTINEL)
    return rels + [CUTLASS_SENTINEL]


def cutlass_version(cutlass: str) -> str | None:
    v = _read(os.path.join(cutlass, ".version"))
    if v:
        return v
    text = _read(os.path.join(cutlass, CUTLASS_SENTINEL)) or ""
    parts = [re.search(rf"#define\s+CUTLASS_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def pack_cutlass(cutlass: str, dst: str) -> dict:
    """tar.xz of cutlass_files(cutlass), paths relative to the CUTLASS root."""
    t0, rels = time.time(), cutlass_files(cutlass)
    with tarfile.open(dst + ".part", "w:xz", preset=XZ_PRESET) as tar:
        for rel in rels:
            tar.add(os.path.join(cutlass, rel), arcname=rel, recursive=False, filter=_normalize)
    os.replace(dst + ".part", dst)
    return {"files": len(rels), "bytes": sum(os.path.getsize(os.path.join(cutlass, r)) for r in rels),
            "xz_bytes": os.path.getsize(dst), "seconds": round(time.time() - t0, 1)}


def unpack_cutlass(archive: str, dest: str) -> bool:
    """Extract `archive` into `dest` unless dest already has the headers; True when extracted."""
    if os.path.isfile(os.path.join(dest, CUTLASS_SENTINEL)):
        return False
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # an old Python: refuse absolute or escaping names by hand
            for m in tar.getmembers():
                if os.path.isabs(m.name) or ".." in m.name.split("/") or not (m.isfile() or m.isdir()):
                    raise ValueError(f"{archive}: unsafe member {m.name!r}")
            tar.extractall(dest)
    return True


# ---- kernel objects --------------------------------------------------------
# The kernel TUs are torch-free: objects nvcc builds here link into the device's
# _C as they are, which saves the device build most of its minutes. Each is
# keyed by a digest of its sources (the TU and the project headers it
# includes, as setup.py finds them) and setup.py's nvcc flags, and used there
# only when the device's sources and nvcc release give the same key.

def kernel_keys() -> dict:
    """{TU name: digest} of the TUs a FLORA_KERNEL_ARCHS=90 build compiles."""
    fn = setup_functions("sources", "kernel_sources", "local_includes", "kernel_flags", "kernel_gencode",
                         root=ROOT)
    saved = os.environ.get("FLORA_KERNEL_ARCHS")
    os.environ["FLORA_KERNEL_ARCHS"] = DEVICE_ARCHS
    try:
        tus = fn.kernel_sources()
    finally:
        if saved is None:
            del os.environ["FLORA_KERNEL_ARCHS"]
        else:
            os.environ["FLORA_KERNEL_ARCHS"] = saved
    keys = {}
    for tu in tus:
        h = hashlib.sha256(fn.source.encode())
        for path in sorted(fn.local_includes(os.path.join(ROOT, tu))):
            h.update(os.path.relpath(path, ROOT).encode() + b"\0" + open(path, "rb").read())
        keys[os.path.basename(tu)[:-3]] = h.hexdigest()
    return keys


def nvcc_release(nvcc=None) -> str | None:
    """'13.0' from `nvcc --version` (CUDA_HOME's, else PATH's, else /usr/local/cuda's), or None."""
    home = os.environ.get("CUDA_HOME")
    for cand in (nvcc, home and os.path.join(home, "bin", "nvcc"), shutil.which("nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand):
            r = subprocess.run([cand, "--version"], capture_output=True, text=True)
            m = re.search(r"release (\d+\.\d+)", r.stdout)
            return m.group(1) if m else None
    return None


def pack_kernels(dst: str) -> dict:
    """kernels.tar.xz of the up-to-date objects (+ ptxas logs) in build/flora_kernels."""
    kdir, packed, skipped = os.path.join(ROOT, "build", "flora_kernels"), {}, []
    local = setup_functions("local_includes", root=ROOT).local_includes
    keys = kernel_keys()
    with tarfile.open(dst + ".part", "w:xz", preset=XZ_PRESET) as tar:
        for tu, key in keys.items():
            obj, log = os.path.join(kdir, tu + ".o"), os.path.join(kdir, tu + ".ptxas.log")
            src = os.path.join(ROOT, "csrc", "cuda", "kernels", tu + ".cu")
            newest = max(os.path.getmtime(f) for f in local(src))
            if not (os.path.isfile(obj) and os.path.isfile(log) and os.path.getmtime(obj) > newest):
                skipped.append(tu)
                continue
            for f in (obj, log):
                tar.add(f, arcname=os.path.basename(f), filter=_normalize)
            packed[tu] = key
    os.replace(dst + ".part", dst)
    return {"keys": packed, "stale": skipped, "nvcc": nvcc_release(), "xz_bytes": os.path.getsize(dst)}


def unpack_kernels(archive: str, manifest: dict) -> str:
    """Objects whose key matches these sources and nvcc into build/flora_kernels,
    stamped now (newer than the sources, so setup.py reuses them)."""
    want, have = manifest.get("keys", {}), kernel_keys()
    nvcc = nvcc_release()
    if nvcc is None or nvcc != manifest.get("nvcc"):
        return f"not used: nvcc {nvcc} here, {manifest.get('nvcc')} packed (the build compiles them)"
    use = [tu for tu, key in want.items() if have.get(tu) == key]
    kdir = os.path.join(ROOT, "build", "flora_kernels")
    os.makedirs(kdir, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        for tu in use:
            for name in (tu + ".o", tu + ".ptxas.log"):
                with tar.extractfile(name) as f, open(os.path.join(kdir, name), "wb") as g:
                    shutil.copyfileobj(f, g)
    stale = sorted(set(have) - set(use))
    return f"{len(use)} objects reused" + (f"; built there: {', '.join(stale)}" if stale else "")


# ---- GGUF truncation ------------------------------------------------------

def block_index(name: str):
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _arch_name(reader) -> str:
    return reader.fields["general.architecture"].contents()


def gguf_sizes(reader) -> tuple[int, list[int]]:
    """(bytes without any block, [bytes of block i]) of a truncated copy; the
    header estimate is the full file's (more tensor infos), so an upper bound."""
    a = reader.alignment
    n = int(reader.fields[f"{_arch_name(reader)}.block_count"].contents())
    head, blocks = reader.data_offset, [0] * n
    for t in reader.tensors:
        i = block_index(t.name)
        if i is None:
            head += align_up(int(t.n_bytes), a)
        else:
            blocks[i] += align_up(int(t.n_bytes), a)
    return head, blocks


def block_raw(reader, i: int) -> bytes:
    """The raw bytes of block i's tensors, each padded to the alignment as in the file."""
    parts = []
    for t in reader.tensors:
        if block_index(t.name) == i:
            raw = t.data.view("uint8").tobytes()
            parts += [raw, bytes(align_up(len(raw), reader.alignment) - len(raw))]
    return b"".join(parts)


def truncate_gguf(src: str, dst: str, k: int) -> None:
    """Copy `src` to `dst` keeping blocks 0..k-1 (raw bytes, same types) and all
    metadata, with <arch>.block_count = k."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = _arch_name(reader)
    count_key = f"{arch}.block_count"
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    if "general.alignment" in reader.fields:
        writer.data_alignment = int(reader.fields["general.alignment"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = k if field.name == count_key else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    keep = [t for t in reader.tensors if block_index(t.name) is None or block_index(t.name) < k]
    for t in keep:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in keep:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def compare_gguf(src: str, dst: str, k: int) -> dict:
    """Check `dst` against `src`: metadata equal but block_count (== k), exactly
    the tensors kept, each with the same type, shape and raw bytes."""
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    count_key = f"{_arch_name(a)}.block_count"
    problems = []
    keys_a = [n for n in a.fields if not n.startswith("GGUF.")]
    keys_b = [n for n in b.fields if not n.startswith("GGUF.")]
    if keys_a != keys_b:
        problems.append(f"metadata keys differ: {sorted(set(keys_a) ^ set(keys_b))}")
    for key in keys_a:
        if key in b.fields and key != count_key:
            fa, fb = a.fields[key], b.fields[key]
            if fa.types != fb.types or fa.contents() != fb.contents():
                problems.append(f"metadata {key} differs")
    if int(b.fields[count_key].contents()) != k:
        problems.append(f"{count_key} is {b.fields[count_key].contents()}, not {k}")
    want = {t.name: t for t in a.tensors if block_index(t.name) is None or block_index(t.name) < k}
    got = {t.name: t for t in b.tensors}
    if list(want) != list(got):
        problems.append(f"tensor names differ: {sorted(set(want) ^ set(got))[:8]}")
    for name in set(want) & set(got):
        ta, tb = want[name], got[name]
        same = (ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape)
                and np.array_equal(ta.data.view(np.uint8), tb.data.view(np.uint8)))
        if not same:
            problems.append(f"tensor {name} differs")
    return {"tensors": len(got), "bytes_equal": not problems, "problems": problems}


def flora_check(src: str, dst: str, k: int) -> dict:
    """Load `dst` with flora (arch, weights, tokenizer) and compare with `src`."""
    import torch
    from flora.gguf import load_gguf
    from flora.pretrained import chat_ids, load_tokenizer

    arch_t, sd_t = load_gguf(dst)
    _, sd_f = load_gguf(src)
    layer0 = [n for n in sd_t if n.startswith("model.layers.0.")]
    out = {
        "num_hidden_layers": arch_t.num_hidden_layers,
        "layers_ok": arch_t.num_hidden_layers == k,
        "layer0_equal": bool(layer0) and all(torch.equal(sd_t[n], sd_f[n]) for n in layer0),
        "all_kept_equal": all(torch.equal(v, sd_f[n]) for n, v in sd_t.items()),
    }
    del sd_t, sd_f
    tok_t, tok_f = load_tokenizer(dst), load_tokenizer(src)
    texts = ["Hello, world!", "  What is the capital of France?\n", "naïve café ∑ 😀 <|im_end|>"]
    out["tokenizer_equal"] = (
        tok_t.get_vocab() == tok_f.get_vocab()
        and tok_t.chat_template == tok_f.chat_template
        and all(tok_t(s)["input_ids"] == tok_f(s)["input_ids"] for s in texts)
        and torch.equal(chat_ids(tok_t, "Hi there"), chat_ids(tok_f, "Hi there")))
    out["tokenizer_class"] = type(tok_t).__name__
    return out


# ---- wheels ---------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_requirements(metadata: str, have=IMAGE_HAS) -> list[str]:
    """Requires-Dist names of a wheel's METADATA (extras left out) not in `have`."""
    out = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec, _, marker = line[len("Requires-Dist:"):].partition(";")
        if "extra" in marker:
            continue
        name = _norm(re.match(r"\s*([A-Za-z0-9_.-]+)", spec).group(1))
        if name not in {_norm(h) for h in have} and name not in out:
            out.append(name)
    return out


def pip_download(spec: str, dest: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "-d", dest, spec], check=True)


def wheel_metadata(path: str) -> str:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def fetch_wheels(dest: str, version: str) -> list[str]:
    """The gguf==version wheel (kept when already there) and its missing dependencies."""
    os.makedirs(dest, exist_ok=True)
    if not glob.glob(os.path.join(dest, f"gguf-{version}-*.whl")):
        pip_download(f"gguf=={version}", dest)
    whl = glob.glob(os.path.join(dest, f"gguf-{version}-*.whl"))[0]
    for dep in missing_requirements(wheel_metadata(whl)):
        if not glob.glob(os.path.join(dest, f"{dep.replace('-', '_')}-*.whl")):
            pip_download(dep, dest)
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(dest, "*.whl")))


# ---- main -----------------------------------------------------------------

def default_gguf() -> str:
    env = os.environ.get("FLORA_SMOLLM2_GGUF")
    if env:
        return env
    cache = os.environ.get("FLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flora")
    return os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_cutlass_dest() -> str:
    return os.environ.get("FLORA_CUTLASS_DIR") or os.path.join(ROOT, "third_party", "cutlass")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".device", help="the pack folder (relative to the repo root)")
    p.add_argument("--layers", default="auto", help="blocks to keep: a number or 'auto'")
    p.add_argument("--budget-mib", type=float, default=62.0,
                   help="carry budget; the working tree's own bytes are taken off it")
    p.add_argument("--gguf", default=None, help="source GGUF (default: SmolLM2 in the flora cache)")
    p.add_argument("--no-flora-check", action="store_true", help="skip loading the cut file with flora")
    p.add_argument("--no-kernels", action="store_true",
                   help="leave the kernel objects out (the device build compiles them all)")
    p.add_argument("--unpack", action="store_true",
                   help="unpack --out instead (stdlib only): the headers and the GGUF")
    p.add_argument("--dest-gguf", default=os.path.join(tempfile.gettempdir(), "smollm2.gguf"),
                   help="--unpack: where the GGUF goes (default %(default)s)")
    p.add_argument("--dest-cutlass", default=None,
                   help="--unpack: where the headers go (default $FLORA_CUTLASS_DIR or third_party/cutlass)")
    return p.parse_args(argv)


def xz_sha256(path: str) -> str:
    """sha256 of the decompressed content of the xz file `path` (nothing written)."""
    h = hashlib.sha256()
    with lzma.open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def estimate_xz(src: str, reader, tmpdir: str) -> tuple[int, int]:
    """(xz bytes of the cut with no block, xz bytes of block 0's raw bytes)."""
    zero = os.path.join(tmpdir, "k0.gguf")
    truncate_gguf(src, zero, 0)
    with open(zero, "rb") as f:
        fixed = xz_size(f.read())
    os.remove(zero)
    return fixed, xz_size(block_raw(reader, 0))


def build_gguf(src: str, out: str, layers: str, budget: int, verify=None) -> dict:
    """Write out/smollm2.gguf.xz: the cut (checked uncompressed by `verify(path, k)`,
    a dict) compressed once; with layers='auto', K from estimate_xz and one block
    fewer (redone) while the archive exceeds `budget`."""
    import gguf

    t0, reader = time.time(), gguf.GGUFReader(src)
    n = len(gguf_sizes(reader)[1])
    est = {}
    if layers == "auto":
        with tempfile.TemporaryDirectory() as tmp:  # its own: two packs at once wrote one k0.gguf
            fixed_xz, block_xz = estimate_xz(src, reader, tmp)
        k = estimate_k(budget, fixed_xz, block_xz, n)
        est = {"fixed_xz": fixed_xz, "block_xz": block_xz, "margin": MARGIN, "k": k,
               "predicted_xz": fixed_xz + k * block_xz, "seconds": round(time.time() - t0, 1)}
        print(f"estimate: block-less cut {fixed_xz / MIB:.2f} MiB xz, one block {block_xz / MIB:.3f} MiB xz "
              f"-> K = {k} ({est['predicted_xz'] / MIB:.2f} MiB predicted, budget {budget / MIB:.2f} MiB)",
              flush=True)
    else:
        k = int(layers)
        if not 0 <= k <= n:
            raise SystemExit(f"--layers {k}: the source has {n} blocks")
    dst, tries = os.path.join(out, GGUF_XZ), []
    with tempfile.TemporaryDirectory(prefix="device_pack.") as tmp:
        cut = os.path.join(tmp, "smollm2.gguf")
        while True:
            truncate_gguf(src, cut, k)
            checks = verify(cut, k) if verify else {}
            t1 = time.time()
            digest = xz_file(cut, dst)
            raw, size = os.path.getsize(cut), os.path.getsize(dst)
            tries.append({"k": k, "xz_bytes": size, "seconds": round(time.time() - t1, 1)})
            print(f"K = {k}: {raw / MIB:.2f} MiB -> {size / MIB:.2f} MiB xz ({tries[-1]['seconds']} s)", flush=True)
            if size <= budget or layers != "auto" or k == 0:
                break
            print(f"  over the budget {budget / MIB:.2f} MiB: one block fewer", flush=True)
            k -= 1
    if size > budget:
        print(f"WARNING: {GGUF_XZ} ({size / MIB:.2f} MiB) exceeds its budget {budget / MIB:.2f} MiB",
              file=sys.stderr)
    checks["xz_roundtrip"] = xz_sha256(dst) == digest
    return {"k": k, "source_blocks": n, "sha256": digest, "bytes": raw, "xz_bytes": size,
            "estimate": est, "tries": tries, "checks": checks}


def print_table(rows: list[tuple[str, int, str]]) -> None:
    for name, nbytes, note in rows:
        print(f"  {name:<24}{nbytes / MIB:9.2f} MiB  {note}")


def pack(args) -> int:
    out = os.path.join(ROOT, args.out)
    rel_out = os.path.relpath(out, ROOT)
    os.makedirs(out, exist_ok=True)
    for name in STALE:  # the earlier layout (trimmed headers, an uncompressed GGUF), leftovers
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    src_gguf = args.gguf or default_gguf()
    if not os.path.isfile(src_gguf):
        from flora.pretrained import smollm2_path
        src_gguf = smollm2_path()

    cutlass = source_cutlass()
    cut = pack_cutlass(cutlass, os.path.join(out, CUTLASS_TAR))
    print(f"cutlass: {cut['files']} files, {cut['bytes'] / MIB:.2f} MiB -> {cut['xz_bytes'] / MIB:.2f} MiB xz "
          f"({cut['seconds']} s)", flush=True)
    kern = {"keys": {}, "stale": [], "nvcc": None, "xz_bytes": 0}
    if not args.no_kernels:
        kern = pack_kernels(os.path.join(out, KERNELS_TAR))
    print(f"kernels: {len(kern['keys'])} objects, {kern['xz_bytes'] / MIB:.2f} MiB xz, nvcc {kern['nvcc']}"
          + (f"; not packed (missing or stale, built there): {', '.join(kern['stale'])}" if kern["stale"] else ""),
          flush=True)
    wheels = fetch_wheels(os.path.join(out, "whl"), gguf_version())
    tree = tree_bytes(ROOT, exclude=rel_out)
    budget = int(args.budget_mib * MIB) - tree
    fixed = cut["xz_bytes"] + kern["xz_bytes"] + dir_size(os.path.join(out, "whl")) + MANIFEST_ALLOWANCE

    def verify(path, k):
        checks = {"gguf": compare_gguf(src_gguf, path, k)}
        if not args.no_flora_check:
            checks["flora"] = flora_check(src_gguf, path, k)
        return checks

    g = build_gguf(src_gguf, out, str(args.layers), budget - fixed, verify)
    k, checks = g["k"], g["checks"]
    sizes = {CUTLASS_TAR: cut["xz_bytes"], "cutlass_headers": cut["bytes"], KERNELS_TAR: kern["xz_bytes"],
             GGUF_XZ: g["xz_bytes"], "smollm2.gguf": g["bytes"], "whl": dir_size(os.path.join(out, "whl"))}
    manifest = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layers": k, "source_blocks": g["source_blocks"],
        "source_gguf": os.path.basename(src_gguf), "source_sha256": sha256(src_gguf),
        "smollm2_gguf_sha256": g["sha256"],
        "cutlass_version": cutlass_version(cutlass), "cutlass_files": cut["files"],
        "kernels": {"keys": kern["keys"], "nvcc": kern["nvcc"], "archs": DEVICE_ARCHS},
        "gguf_version": gguf_version(), "wheels": wheels, "xz_preset": XZ_PRESET,
        "sizes": sizes, "tree_bytes": tree, "budget_bytes": budget,
        "estimate": g["estimate"], "tries": g["tries"], "checks": checks,
        "unpack": "python tools/device_pack.py --unpack --dest-gguf /tmp/smollm2.gguf",
    }
    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    total = dir_size(out)
    print(f"\n{rel_out}/ (K = {k} of {g['source_blocks']} blocks):")
    print_table([(CUTLASS_TAR, sizes[CUTLASS_TAR], f"{cut['files']} files, {cut['bytes'] / MIB:.2f} MiB unpacked"),
                 (GGUF_XZ, sizes[GGUF_XZ], (f"blk.0..blk.{k - 1}" if k else "no blocks")
                  + f", {g['bytes'] / MIB:.2f} MiB unpacked"),
                 (KERNELS_TAR, sizes[KERNELS_TAR], f"{len(kern['keys'])} kernel objects, nvcc {kern['nvcc']}"),
                 ("whl/", sizes["whl"], ", ".join(wheels)),
                 ("MANIFEST.json", os.path.getsize(os.path.join(out, "MANIFEST.json")), ""),
                 (f"total {rel_out}/", total, f"budget {budget / MIB:.2f} MiB"),
                 ("working tree", tree, "tracked + untracked unignored"),
                 ("carried in all", tree + total, "limit 64 MiB")])
    print("checks:", json.dumps(checks, default=str))
    ok = (checks.get("gguf", {}).get("bytes_equal", True) and checks["xz_roundtrip"] and total <= budget
          and all(v for key, v in checks.get("flora", {}).items() if key.endswith(("_ok", "_equal"))))
    return 0 if ok else 1


def unpack(args) -> int:
    """The device side, stdlib only: headers into --dest-cutlass (unless there),
    the GGUF to --dest-gguf (unless there with the manifest's sha256)."""
    out = os.path.join(ROOT, args.out)
    if not os.path.isdir(out):
        print(f"{out}: no such folder (run tools/device_pack.py on the CPU machine and carry it)")
        return 1
    manifest = json.loads(_read(os.path.join(out, "MANIFEST.json")) or "{}")
    rc = 0
    tar = os.path.join(out, CUTLASS_TAR)
    dest = os.path.abspath(args.dest_cutlass or default_cutlass_dest())
    if os.path.isfile(tar):
        done = unpack_cutlass(tar, dest)
        print(f"cutlass: {dest} ({'unpacked' if done else 'already there'})")
    else:
        print(f"cutlass: no {tar}")
        rc = 1
    kernels = os.path.join(out, KERNELS_TAR)
    if os.path.isfile(kernels):
        print("kernels: " + unpack_kernels(kernels, manifest.get("kernels", {})))
    xz, dest = os.path.join(out, GGUF_XZ), os.path.abspath(args.dest_gguf)
    want = manifest.get("smollm2_gguf_sha256")
    if not os.path.isfile(xz):
        print(f"gguf: no {xz}")
        return 1
    if want and os.path.isfile(dest) and sha256(dest) == want:
        print(f"gguf: {dest} (already there, K = {manifest.get('layers')})")
        return rc
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        unxz_file(xz, dest, want)
    except ValueError as e:
        print(f"gguf: {e}")
        return 1
    print(f"gguf: {dest} ({os.path.getsize(dest) / MIB:.2f} MiB, K = {manifest.get('layers')}"
          f"{', sha256 checked' if want else ''})")
    return rc


def main(argv=None) -> int:
    args = parse_args(argv)
    return unpack(args) if args.unpack else pack(args)


def _read(path: str):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


if __name__ == "__main__":
    sys.exit(main())
