#!/usr/bin/env python
"""Ops and kernels per decoder layer in one decode step (issue 12, item 3).

    python bench/op_count.py                 # base, ffba, zflora; eager and compiled; fp32
    python bench/op_count.py --no-compile    # eager only (compiling takes minutes on 2 cores)
    python bench/op_count.py --json bench/out/op_count.json
    python bench/op_count.py --no-compile --batch 32   # the GEMMs on ATen (the cuBLAS path's calls)
    python bench/op_count.py --step-ms 16 --variants base ffba   # + eager step and prefill times, 16 layers
    python bench/op_count.py --device cuda --no-compile           # kernels = CUDA launches counted

One decode step is run under torch.profiler (CPU) on a model with L and 3L
layers (random weights, tiny Llama shape); per-layer counts are the
difference / 2L, so the embedding, head and sampling cancel out. Two counts:

* ``ops``: top-level dispatcher calls that are not views or no-op
  conversions (what a dispatch trace shows);
* ``kernels``: leaf compute calls (a composite op such as ``aten::rms_norm``
  counts the kernels it runs, an Inductor kernel counts one; views,
  allocations and no-op ``to`` do not count). A flora op counts one when its
  own kernel runs, else the ATen calls it makes: with ``--batch`` above the
  CPU decode kernels' M (16 in fp32) its GEMMs run on ATen, the calls flora's
  default CUDA path makes on cuBLAS (where an ``addmm`` into a fresh output
  also copies its C operand first: one more launch the profiler does not
  show). With ``--device cuda`` it is the CUDA kernels (and memcpy / memset)
  the step launches, counted by the profiler.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# not kernels: views, metadata, allocations
NON_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::transpose",
    "aten::t", "aten::permute", "aten::slice", "aten::select", "aten::narrow", "aten::unsqueeze",
    "aten::squeeze", "aten::expand", "aten::alias", "aten::detach", "aten::split", "aten::split_with_sizes",
    "aten::unbind", "aten::chunk", "aten::unflatten", "aten::flatten", "aten::view_as", "aten::expand_as",
    "aten::lift_fresh", "aten::result_type", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::new_empty", "aten::new_empty_strided", "aten::resize_", "aten::_unsafe_view",
    "aten::contiguous", "aten::to", "aten::type_as", "aten::_to_copy", "aten::scalar_tensor",
    "aten::resolve_conj", "aten::resolve_neg",
}


def _is_op(e) -> bool:
    return e.name.startswith(("aten::", "flora::")) or "cpp_fused" in e.name or "triton_" in e.name


def _compute(e) -> bool:
    """A call that computes something (a no-op ``to``/``contiguous`` has no children)."""
    if e.name in ("aten::to", "aten::_to_copy", "aten::contiguous"):
        return bool(e.cpu_children)
    return _is_op(e) and e.name not in NON_KERNEL


# GEMMs run natively and may dispatch a copy of their C operand first (addmm
# into a fresh output): one kernel of their own plus what they dispatch
GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def _kernels(e) -> int:
    below = sum(_kernels(c) for c in e.cpu_children)
    if e.name.startswith("flora::"):
        return below or 1  # its own kernel is one, whatever it allocates inside
    if e.name in GEMMS:
        return 1 + below
    return below if below else int(_compute(e) and e.name not in ("aten::to", "aten::_to_copy",
                                                                   "aten::contiguous"))


def _top_level(events):
    """Op calls not nested in another op (wrappers such as a compiled region are transparent)."""
    def walk(e):
        if _is_op(e):
            yield e
        else:
            for c in e.cpu_children:
                yield from walk(c)
    for e in events:
        if e.cpu_parent is None:
            yield from walk(e)


def count_events(events) -> tuple[int, int]:
    """(ops, kernels) of one profiled region (see the module docstring)."""
    top = [e for e in _top_level(events) if _compute(e)]
    return len(top), sum(_kernels(e) for e in top)


def count_launches(events) -> int:
    """CUDA kernels, memcpys and memsets of one profiled region."""
    from torch.autograd import DeviceType

    return sum(1 for e in events if e.device_type == DeviceType.CUDA)


def build(variant: str, layers: int, dtype, rank: int = 8, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from flora import AdapterConfig
    from flora.bench.latency import SHAPES, randomize_adapter
    from flora.model import FusedLlama

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SHAPES["tiny"], "num_hidden_layers": layers}, rms_norm_eps=1e-5,
                      max_position_embeddings=2048, attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg).eval()
    ac = None if variant == "base" else AdapterConfig(variant, rank=rank, alpha=2.0 * rank)
    m = FusedLlama.from_pretrained(hf, adapter=ac, dtype=dtype)
    if ac is not None:
        randomize_adapter(m, 1)
    return m.to(device)


def step_counts(model, compiled: bool, prompt: int = 8, batch: int = 1) -> tuple[int, int]:
    """(ops, kernels) of one decode step of ``batch`` rows (after warm-up steps)."""
    from flora.generation import Decoder, inference_mode

    with inference_mode(model):
        dec = Decoder(model, batch, prompt + 8, use_cuda_graph=False, compile=compiled)
        ids = torch.randint(3, model.arch.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
        ids = ids.to(model.embed.device)
        tok = dec.prefill(ids, torch.ones_like(ids, dtype=torch.bool)).argmax(-1)
        for _ in range(2):
            tok = dec.step(tok).argmax(-1)
        cuda = ids.is_cuda
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            dec.step(tok)
            if cuda:
                torch.cuda.synchronize()
    ops_, kernels = count_events(prof.events())
    return ops_, count_launches(prof.events()) if cuda else kernels


def step_ms(variant: str, layers: int, dtype=torch.float32, steps: int = 200) -> tuple[float, float]:
    """Median eager decode-step and 16-token prefill times (ms) of a
    ``layers``-layer model of the tiny shape, batch 1, after warm-up: host
    work only (what the op and kernel counts cost on the CPU; a host-bound
    GPU prefill's TTFT ratios are these)."""
    import statistics

    from flora.bench.timing import Timer
    from flora.generation import Decoder, inference_mode

    model = build(variant, layers, dtype)
    timer = Timer(torch.device("cpu"))

    def timed(fn, n):
        ts = []
        for _ in range(n):
            t0 = timer.mark()
            fn()
            ts.append(timer.elapsed(t0, timer.mark()))
        return statistics.median(ts) * 1e3

    with inference_mode(model):
        dec = Decoder(model, 1, 48 + steps, use_cuda_graph=False)
        ids = torch.randint(3, model.arch.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        valid = torch.ones_like(ids, dtype=torch.bool)
        for _ in range(10):
            dec.prefill(ids, valid)
        prefill = timed(lambda: dec.prefill(ids, valid), steps // 2)
        tok = dec.prefill(ids, valid).argmax(-1)
        for _ in range(20):
            tok = dec.step(tok).argmax(-1)

        def step():
            nonlocal tok
            tok = dec.step(tok).argmax(-1)
        return timed(step, steps), prefill


def per_layer(variant: str, compiled: bool, dtype=torch.float32, layers: int = 1, batch: int = 1,
              device: str = "cpu") -> dict:
    a = step_counts(build(variant, layers, dtype, device=device), compiled, batch=batch)
    b = step_counts(build(variant, 3 * layers, dtype, device=device), compiled, batch=batch)
    return {"variant": variant, "mode": "compiled" if compiled else "eager", "device": device,
            "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "ops_per_layer": (b[0] - a[0]) / (2 * layers), "kernels_per_layer": (b[1] - a[1]) / (2 * layers),
            "ops_step_rest": a[0] - (b[0] - a[0]) / 2, "kernels_step_rest": a[1] - (b[1] - a[1]) / 2}


def markdown(rows: list, command: str) -> str:
    dev = torch.cuda.get_device_name() if rows and rows[0]["device"] == "cuda" else platform.machine()
    out = [f"{datetime.date.today()}, {platform.node()} ({dev}), torch {torch.__version__}, `{command}`"
           + (" (kernels: CUDA launches)" if rows and rows[0]["device"] == "cuda" else ""), "",
           "| variant | dtype | batch | mode | ops / layer | kernels / layer | kernels outside the layers | step ms "
           "| prefill ms |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = " | ".join(f"{r[k]:.3f}" if k in r else "" for k in ("step_ms", "prefill_ms"))
        out.append(f"| {r['variant']} | {r['dtype']} | {r['batch']} | {r['mode']} | {r['ops_per_layer']:g} | "
                   f"{r['kernels_per_layer']:g} | {r['kernels_step_rest']:g} | {ms} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/op_count.py", description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["base", "ffba", "zflora"])
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--batch", type=int, default=1,
                   help="rows per step (above 16: the GEMMs on ATen, as the default CUDA path runs them)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: kernels = the CUDA launches of the step (profiler), on flora's dispatch there")
    p.add_argument("--step-ms", type=int, default=0, metavar="LAYERS",
                   help="also time the eager decode step and a 16-token prefill of a model with this "
                        "many layers (batch 1)")
    args = p.parse_args(argv)
    if args.step_ms and args.device != "cpu":
        p.error("--step-ms times the CPU's eager step (host work); use the latency benchmark on a GPU")
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # each generated kernel shows in the profile
    # every model compiles the same decode function: 2 per variant, past Dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.variants) + 8)
    rows = []
    for dt in args.dtype:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        for v in args.variants:
            for compiled in ([False] if args.no_compile else [False, True]):
                rows.append(per_layer(v, compiled, dtype, batch=args.batch, device=args.device))
                if args.step_ms and not compiled:
                    rows[-1]["step_ms"], rows[-1]["prefill_ms"] = step_ms(v, args.step_ms, dtype)
                print(rows[-1], file=sys.stderr, flush=True)
    cmd = "python bench/op_count.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(rows, cmd.strip()))
    if args.json:
        from flora.fileio import atomic_write_json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, {"command": cmd.strip(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
