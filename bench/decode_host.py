#!/usr/bin/env python
"""Host time of the eager decode step, and where it goes.

    python bench/decode_host.py                               # base, ffba, zflora; fp32, bf16; batch 1 and 8
    python bench/decode_host.py --profile                     # + each op's calls per layer and host us per call
    python bench/decode_host.py --baseline-src ../before      # that checkout's Python against this one, one process
    python bench/decode_host.py --real --threads 2            # SmolLM2-135M itself: ms per step, tokens/s
    python bench/decode_host.py --real --baseline-gemv-max-m 4  # the CPU decode kernels' M cutoff 4 against the rule

The eager step (flora serve's and flora generate's engine, generate() without
compile=True) is host-bound on the CPU: Python and the dispatcher, per op
call, cost what the compiled step does not (bench/RESULTS.md, "flora vs
llama.cpp").

Default (host time): a model of SmolLM2-135M's structure (30 layers, 9 query
and 3 kv heads, tied head) with 8-wide heads and tiny projections (hidden 72,
MLP 64, vocab 256; random weights, rank-8 adapters folded as generate() runs
them), so a step's kernels cost next to nothing and its time is host time.
One torch thread; each step timed as this thread's CPU time
(time.thread_time: other tenants of the machine hardly move it); the figure
is the median step of a round, the median over rounds.

--profile: five steps of each case under torch.profiler: every op's calls
per layer (per-step ops show as fractions) and self host us per call (the
profiler's own overhead included).

--real: the SmolLM2-135M-Instruct GGUF (flora.pretrained.smollm2_path,
dequantized; cast for bf16), ``--threads`` torch threads, wall time per step
and tokens/s (batch rows / step time), prompt 64 tokens.

--baseline-src DIR: DIR/flora (another checkout: the code before a change)
is imported as a second package, ``flora_baseline``, on this process's
compiled extension (the flora:: ops register once per process: its Python
registrations are skipped and this checkout's serve both), so both run in
one process on the same operator library; each round times the baseline and
this checkout in turn (the order reversed every round) and the table gives
each one's median and the median of the per-round ratios. Valid where the
baseline's Python runs on this extension (its ops unchanged).

--baseline-gemv-max-m N: the baseline is this checkout with the CPU decode
kernels' M cutoff forced to N (flora._C.set_cpu_gemv_max_m, set before each
of its rounds), against this checkout on the machine's rule: a change of the
cutoff, before / after in one process.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch

import flora
from flora.bench.latency import randomize_adapter
from flora.bench.report import publish, title

LAYERS = 30
TINY = dict(hidden_size=72, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=9,
            num_key_value_heads=3, head_dim=8, vocab_size=256, tie_word_embeddings=True,
            max_position_embeddings=2048, rms_norm_eps=1e-5)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = 64


def baseline_package(src: str):
    """``src``/flora imported as the package ``flora_baseline`` on this process's extension."""
    from flora import _ext

    if _ext.C is None:
        raise SystemExit(f"--baseline-src needs this checkout's compiled extension ({_ext.ERROR})")
    root = os.path.join(os.path.abspath(src), "flora")
    if not os.path.isfile(os.path.join(root, "__init__.py")):
        raise SystemExit(f"--baseline-src: no flora package in {src}")
    sys.modules["flora_baseline._C"] = _ext.C  # `from . import _C` finds the loaded one

    # the baseline's own registrations of flora:: ops are skipped (those of this checkout
    # serve both); anything else registered meanwhile (a torch module imported for the
    # first time) goes through
    def flora_skipped(real):
        def call(op, *args, **kw):
            if str(op).startswith("flora::"):
                return lambda fn: fn  # register_fake's decorator form
            return real(op, *args, **kw)
        return call

    real_impl = torch.library.Library.impl

    def impl(lib, *args, **kw):
        return None if lib.ns == "flora" else real_impl(lib, *args, **kw)

    with mock.patch.object(torch.library, "register_fake", flora_skipped(torch.library.register_fake)), \
            mock.patch.object(torch.library, "register_autograd", flora_skipped(torch.library.register_autograd)), \
            mock.patch.object(torch.library.Library, "impl", impl):
        spec = importlib.util.spec_from_file_location("flora_baseline", os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["flora_baseline"] = pkg
        spec.loader.exec_module(pkg)
    return pkg


def build(pkg, variant: str, dtype, real: bool):
    """A FusedLlama of ``pkg`` (flora or the baseline package): SmolLM2 or its tiny-width copy."""
    ac = None if variant == "base" else pkg.AdapterConfig(variant, rank=32 if real else 8,
                                                          alpha=64.0 if real else 16.0)
    if real:
        from flora.pretrained import smollm2_path

        m = pkg.model.FusedLlama.from_pretrained(smollm2_path(), adapter=ac, dtype=dtype)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        m = pkg.model.FusedLlama.from_pretrained(LlamaForCausalLM(LlamaConfig(**TINY)).eval(), adapter=ac,
                                                 dtype=dtype)
    if ac is not None:
        randomize_adapter(m, 1)
    return m


class Probe:
    """One model's decoder (``pkg``'s Decoder, in ``pkg``'s inference mode): each
    round prefills the same prompt again, then times ``steps`` decode steps."""

    def __init__(self, pkg, model, batch: int, steps: int, warmup: int, host: bool):
        self.pkg, self.model, self.steps, self.warmup, self.host = pkg, model, steps, warmup, host
        self.ids = torch.randint(3, model.arch.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
        self.valid = torch.ones_like(self.ids, dtype=torch.bool)
        self.ctx = pkg.generation.inference_mode(model)
        self.ctx.__enter__()
        self.dec = pkg.generation.Decoder(model, batch, PROMPT + warmup + steps + 1, use_cuda_graph=False)

    def round(self) -> float:
        """Median seconds per step of one round (thread CPU time in host mode, else wall)."""
        clock = time.thread_time if self.host else time.perf_counter
        tok = self.dec.prefill(self.ids, self.valid).argmax(-1)
        for _ in range(self.warmup):
            tok = self.dec.step(tok).argmax(-1)
        ts = []
        for _ in range(self.steps):
            t0 = clock()
            logits = self.dec.step(tok)
            ts.append(clock() - t0)
            tok = logits.argmax(-1)
        return statistics.median(ts)

    def profile(self) -> list:
        """(op, calls per layer, self host us per call) over 5 steps (argmax included), most time first."""
        from torch.profiler import ProfilerActivity, profile

        tok = self.dec.prefill(self.ids, self.valid).argmax(-1)
        for _ in range(self.warmup):
            tok = self.dec.step(tok).argmax(-1)
        steps = 5
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                tok = self.dec.step(tok).argmax(-1)
        n = self.model.arch.num_hidden_layers * steps
        rows = [(e.key, e.count / n, e.self_cpu_time_total / e.count) for e in prof.key_averages()
                if e.key.startswith(("aten::", "flora::"))]
        return sorted(rows, key=lambda r: -r[1] * r[2])

    def close(self):
        self.ctx.__exit__(None, None, None)


def use_cutoff(args, name: str):
    """--baseline-gemv-max-m: N for the baseline's rounds, the machine's rule (-1) for this checkout's."""
    if args.baseline_gemv_max_m is not None:
        flora._ext.C.set_cpu_gemv_max_m(args.baseline_gemv_max_m if name == "baseline" else -1)


def run_case(pkgs: dict, variant: str, dt: str, batch: int, args) -> dict:
    probes = {name: Probe(pkg, build(pkg, variant, DTYPES[dt], args.real), batch, args.steps, args.warmup,
                          not args.real) for name, pkg in pkgs.items()}
    try:
        times = defaultdict(list)
        names = list(probes)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                use_cutoff(args, name)
                times[name].append(probes[name].round())
        row = dict(variant=variant, dtype=dt, batch=batch,
                   us={n: statistics.median(t) * 1e6 for n, t in times.items()})
        if len(names) == 2:
            row["ratio"] = statistics.median(a / b for a, b in zip(times[names[1]], times[names[0]]))
        if args.profile:
            row["profile"] = {}
            for n, p in probes.items():
                use_cutoff(args, n)
                row["profile"][n] = p.profile()
        return row
    finally:  # last in, first out: each probe's inference mode restores what it found
        for p in reversed(list(probes.values())):
            p.close()


def markdown(rows: list, names: list, real: bool, command: str) -> str:
    unit = "ms / step" if real else "host us / step"
    head = "| variant | dtype | batch | " + " | ".join(f"{n} {unit}" for n in names)
    head += " | x baseline |" if len(names) == 2 else " |"
    head += " tokens/s |" if real else " us / layer |"
    out = [title(torch.device("cpu"), command), "", head,
           "|---|---|---:|" + "---:|" * (len(names) + (len(names) == 2) + 1)]
    for r in rows:
        cur = r["us"][names[-1]]
        cells = [f"{r['us'][n] / 1e3:.2f}" if real else f"{r['us'][n]:.0f}" for n in names]
        if len(names) == 2:
            cells.append(f"{r['ratio']:.3f}")
        cells.append(f"{r['batch'] / cur * 1e6:.1f}" if real else f"{cur / LAYERS:.1f}")
        out.append(f"| {r['variant']} | {r['dtype']} | {r['batch']} | " + " | ".join(cells) + " |")
    for r in rows:
        for n, prof in r.get("profile", {}).items():
            out += ["", f"{n}: {r['variant']} {r['dtype']} batch {r['batch']}, five steps under torch.profiler",
                    "", "| op | calls / layer | self us / call |", "|---|---:|---:|"]
            out += [f"| {op} | {c:.2f} | {us:.2f} |" for op, c, us in prof if c * us > 0.05]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/decode_host.py", description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["base", "ffba", "zflora"])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--steps", type=int, default=100, help="timed decode steps per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per round, after its prefill")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1; --real: 2)")
    p.add_argument("--real", action="store_true", help="SmolLM2-135M itself (wall time, tokens/s)")
    p.add_argument("--profile", action="store_true", help="+ a per-op table of five steps per case")
    p.add_argument("--baseline-src", default=None, help="a checkout whose flora/ runs as the baseline")
    p.add_argument("--baseline-gemv-max-m", type=int, default=None,
                   help="baseline: this checkout with the CPU decode kernels' M cutoff forced to this")
    p.add_argument("--out", default=None, help="also write the markdown here")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.baseline_gemv_max_m is not None and (args.baseline_src or flora._ext.C is None):
        p.error("--baseline-gemv-max-m: needs the compiled extension, and not with --baseline-src")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (2 if args.real else 1))
    try:  # (the caller's thread count back after: a test calls main())
        pkgs = {"this": flora}
        if args.baseline_src is not None:
            pkgs = {"baseline": baseline_package(args.baseline_src), "this": flora}
        elif args.baseline_gemv_max_m is not None:
            pkgs = {"baseline": flora, "this": flora}
        rows = []
        for v in args.variants:
            for dt in args.dtype:
                for b in args.batch:
                    rows.append(run_case(pkgs, v, dt, b, args))
                    print({k: x for k, x in rows[-1].items() if k != "profile"}, file=sys.stderr, flush=True)
        cmd = ("python bench/decode_host.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        md = markdown(rows, list(pkgs), args.real, cmd)
        doc = {"command": cmd, "threads": torch.get_num_threads(), "rows": rows}
    finally:
        torch.set_num_threads(threads)
        if args.baseline_gemv_max_m is not None:
            flora._ext.C.set_cpu_gemv_max_m(-1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    publish(md, doc, args.out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
