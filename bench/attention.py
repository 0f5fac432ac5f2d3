#!/usr/bin/env python
"""Prompt and training attention as flora calls SDPA, against the call it made before.

    python bench/attention.py --device cuda                      # 1B / 3B shapes, bf16, fwd and fwd+bwd
    python bench/attention.py --device cpu --shapes smollm2 --batch 1 --seq 512 2048 --no-backward

flora.layers.attention takes a prompt without padding as SDPA's ``is_causal``
(the flash kernel on CUDA, kv heads grouped) and a padded one with its mask
and the kv heads expanded (the memory-efficient kernel). Until 2026-11-28 it
passed the explicit causal mask with ``enable_gqa`` in both cases, which on
CUDA no fused kernel takes (flash takes no mask, memory-efficient no grouped
kv heads), so SDPA ran its math kernel, fp32 scores [B, heads, T, T] in
memory. Rows per shape, batch, length and padding:

* ``flora``: ``attention(q, k, v, prompt_mask(key_valid))``, as the model calls it;
* ``mask+gqa``: the former call (additive mask, ``enable_gqa``);
* ``x`` = flora / mask+gqa, medians of the same process, the two interleaved.

``--packed K [K ...]``: also rows of K sequences packed one after another
(``flora train --pack``): ``per-sequence`` (one causal SDPA call per sequence,
``flora.layers.PackedSequences``), ``mask`` (the block-diagonal ``packed_mask``:
a mask, so the memory-efficient kernel on CUDA) and ``causal`` over the whole
row (the boundaries ignored: what the same tokens cost without the mask);
``x`` = per-sequence / mask, and ``picks``: the form flora's model takes for
such rows on this device (``packed_attention_mask``).

``--decode``: a decode step's attention instead (one query row per sequence
over a KV-cache window of ``--context`` keys, the decoder's additive mask),
``flora.ops.decode_attention`` as the model calls it (default dispatch),
flora's split-key kernel forced (``FLORA_CUDA_KERNELS=1``, CUDA) and the
grouped SDPA call the decoder made before; each timed over enough cache
copies (rotated) that no call finds its keys in L2, eagerly and (CUDA) as
one CUDA graph of the rotation; GB/s counts the unmasked K/V bytes read, and
``x floor`` is the time over those bytes at the copy bandwidth measured in
the same run.

    python bench/attention.py --device cuda --decode --shapes 1b 3b --batch 1 8 --context 640 4096 32768

``--decode --compiled`` (CPU): the two forms a compiled decode step can run,
each inside one ``torch.compile(fullgraph=True, cpp_wrapper)`` function as
``flora.generation.compiled_decode`` compiles the step, ``--calls`` calls of
it per compiled function (distinct queries, as the layers of a step; the
function's own call cost spread over them): ``op compiled``, the custom op
``torch.ops.flora.decode_attention`` (Inductor calls the kernel through the
dispatcher) and ``written-out compiled`` (``flora.layers.
written_out_decode_attention``: two bmms around a fused mask + softmax), with
the op called eagerly beside them; windows are views of a cache 16 slots
wider, the mask the decoder's ``[B, 1, 1, L]`` view. With ``--cold`` each call
reads its own cache copy and a 64 MB buffer is written between the timed
calls, so every window comes from memory.

    python bench/attention.py --device cpu --decode --compiled --shapes smollm2 1b 3b --batch 1 --context 64 4096 --dtype bf16

Times are CUDA events (CPU: perf_counter) around a few calls after warm-up,
medians; TFLOP/s counts the causal half of QK^T and PV (4 B H T^2 hd / 2 for
the forward; forward + backward 3.5x that). On CUDA, ``kernel`` is the first
SDPA backend in priority order (flash, memory-efficient, math) that accepts
the call, and ``peak MiB`` the memory the call allocates above its inputs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flora import _ext, ops
from flora.bench.latency import copy_bandwidth
from flora.bench.report import add_device_dtype, device_dtype, publish, title
from flora.bench.timing import Timer, cuda_kernels
from flora.layers import (PackedSequences, additive_mask, attention, packed_attention_mask, packed_lengths,
                          packed_mask, prompt_mask, slot_mask,
                          written_out_decode_attention)

SHAPES = {  # query heads, kv heads, head dim
    "smollm2": (9, 3, 64), "1b": (32, 8, 64), "3b": (24, 8, 128), "8b": (32, 8, 128),
}


def former(q, k, v, key_valid):
    """flora's call before 2026-11-28: the explicit mask, grouped kv heads."""
    T = q.shape[1]
    mask = additive_mask(slot_mask(key_valid), q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape[0] * T, -1)


def flora_form(q, k, v, key_valid):
    mask = prompt_mask(key_valid)
    return attention(q, k, v, None if mask is None else additive_mask(mask, q.dtype))


def kernel_of(fn) -> str:
    for name, b in (("flash", SDPBackend.FLASH_ATTENTION), ("mem-efficient", SDPBackend.EFFICIENT_ATTENTION),
                    ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel([b]):
                fn()
            return name
        except RuntimeError:
            continue
    return "?"


def timed(fn, device, reps: int) -> float:
    """Median seconds of one call (reps medians of 3 calls each, after 2 warm-up calls)."""
    timer = Timer(device)
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        a = timer.mark()
        for _ in range(3):
            fn()
        ts.append(timer.elapsed(a, timer.mark()) / 3)
    return statistics.median(ts)


def peak_mib(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def packed_positions(B: int, T: int, k: int, device) -> torch.Tensor:
    """[B, T] positions of k sequences of near-equal length packed into each row."""
    lengths = [T // k + (i < T % k) for i in range(k)]
    row = torch.cat([torch.arange(n) for n in lengths])
    return row.expand(B, T).to(device)


def case(shape, B, T, padded, dtype, device, backward, reps, packed=0):
    """``padded``: one row left-padded by a quarter; ``packed`` k > 0: rows of k sequences
    (then ``padded`` is False), flora's packed call against causal over the row."""
    nh, nkv, hd = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(backward)
    q, k, v = mk(B, T, nh, hd), mk(B, nkv, T, hd), mk(B, nkv, T, hd)
    key_valid = torch.ones(B, T, dtype=torch.bool, device=device)
    if padded:
        key_valid[0, : T // 4] = False  # one row left-padded by a quarter
    grad = torch.randn(B * T, nh * hd, generator=g).to(device, dtype)
    flops = 4 * B * nh * T * T * hd / 2 * (3.5 if backward else 1.0)
    rows = []
    fns = {}
    forms = (("flora", flora_form), ("mask+gqa", former))
    picks = None
    if packed:
        pos = packed_positions(B, T, packed, device)
        pmask = additive_mask(packed_mask(pos), dtype)
        seqs = PackedSequences(packed_lengths(pos))
        picks = "per-sequence" if isinstance(packed_attention_mask(pos, device), PackedSequences) else "mask"
        forms = (("per-sequence", lambda q, k, v, _: attention(q, k, v, seqs)),
                 ("mask", lambda q, k, v, _: attention(q, k, v, pmask)),
                 ("causal", lambda q, k, v, _: attention(q, k, v, None)))
        flops /= packed  # each sequence's causal half only
    for name, form in forms:
        if backward:
            def fn(form=form):
                form(q, k, v, key_valid).backward(grad)
        else:
            def fn(form=form):
                with torch.no_grad():
                    form(q, k, v, key_valid)
        fns[name] = fn
    times = {n: [] for n in fns}
    for _ in range(3):  # interleaved rounds
        for n, fn in fns.items():
            try:
                times[n].append(timed(fn, device, reps))
            except torch.OutOfMemoryError:
                times[n].append(float("nan"))
                torch.cuda.empty_cache()
    for n, fn in fns.items():
        t = statistics.median(times[n])
        row = dict(shape=shape, batch=B, seq=T, padded=padded, packed=packed, dtype=str(dtype).replace("torch.", ""),
                   backward=backward, form=n, ms=t * 1e3, tflops=flops / t / 1e12,
                   **({"picks": picks} if picks else {}))
        if device.type == "cuda":
            row["kernel"] = kernel_of(fn)
            row["peak_mib"] = peak_mib(fn, device)
        rows.append(row)
    rows[0]["x"] = rows[0]["ms"] / rows[1]["ms"]
    return rows


def markdown(rows, device) -> str:
    cuda = device.type == "cuda"
    packed = any(r.get("packed") for r in rows)
    head = "| shape | batch | T | padded | pass | form | ms | TFLOP/s | x the second |" + (" kernel | peak MiB |" if cuda else "") \
        + (" picks |" if packed else "")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        x = f"{r['x']:.3f}" if "x" in r else ""
        pad = f"packed {r['packed']}" if r.get("packed") else "yes" if r["padded"] else "no"
        line = (f"| {r['shape']} | {r['batch']} | {r['seq']} | {pad} | "
                f"{'fwd+bwd' if r['backward'] else 'fwd'} | {r['form']} | {r['ms']:.3f} | {r['tflops']:.3g} | {x} |")
        if cuda:
            line += f" {r['kernel']} | {r['peak_mib']:.0f} |"
        if packed:
            line += f" {r.get('picks', '') if 'x' in r else ''} |"
        out.append(line)
    return "\n".join(out)


def decode_case(shape, B, L, padded, dtype, device, reps, copy_bps, graphs, splits=(), cold=False):
    """Decode attention over a window of L keys: rows per form (see the module doc)."""
    nh, nkv, hd = SHAPES[shape]
    # drawn on the device: a 32K-key 3B cache at batch 8 is 0.5 G elements per tensor
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    q = mk(B, nh, hd)
    kv_bytes = 2 * B * nkv * L * hd * q.element_size()
    # enough copies that a rotation streams >= 256 MB (no call hits L2), at most 64; on
    # the CPU one (the window stays in its caches) unless cold (>= 256 MB, as many as
    # that takes: each call then reads its window from memory, as in a decode step,
    # whose weights and other layers' caches went through the caches since)
    n = 1
    if device.type == "cuda" or cold:
        n = max(1, min(64 if device.type == "cuda" else 1 << 16, -(-(256 << 20) // kv_bytes)))
    caches = [(mk(B, nkv, L, hd), mk(B, nkv, L, hd)) for _ in range(n)]
    mask = torch.zeros(B, L, dtype=dtype, device=device)
    if padded:
        mask[0, : L // 4] = float("-inf")  # one row left-padded by a quarter
    read = kv_bytes * (1 - (0.25 / B if padded else 0.0))
    forms = {"flora": lambda k, v: ops.decode_attention(q, k, v, mask),
             "sdpa (before)": lambda k, v: ops.grouped_sdpa(q, k, v, mask)}
    if device.type == "cuda":
        forms = {"flora": forms["flora"], "kernel (forced)": forms["flora"],
                 **{f"kernel s={n}": (lambda k, v, n=n: torch.ops.flora.decode_attention(q, k, v, mask, n))
                    for n in splits},
                 "sdpa (before)": forms["sdpa (before)"]}
    rows = []
    for name, form in forms.items():
        def rotation(form=form):
            for k, v in caches:
                form(k, v)
        with cuda_kernels("1" if name.startswith("kernel") else None), torch.no_grad():
            t = timed(rotation, device, reps) / n
            dispatch = ""
            if device.type == "cuda":
                form(*caches[0])
                dispatch = "sdpa" if name == "sdpa (before)" or _ext.C is None else _ext.C.cuda_last_dispatch()
            tg = float("nan")
            if graphs and device.type == "cuda":
                rotation()
                torch.cuda.synchronize()
                gr = torch.cuda.CUDAGraph()
                with torch.cuda.graph(gr):
                    rotation()
                tg = timed(gr.replay, device, reps) / n
        best = t if tg != tg else min(t, tg)
        rows.append(dict(shape=shape, batch=B, context=L, padded=padded, dtype=str(dtype).replace("torch.", ""),
                         form=name, us=t * 1e6, graph_us=tg * 1e6, best_us=best * 1e6, gbps=read / best / 1e9,
                         x_floor=best / (read / copy_bps), dispatch=dispatch))
    for r in rows[:-1]:  # the last row is SDPA's
        r["x"] = r["best_us"] / rows[-1]["best_us"]
    return rows


def decode_compiled_case(shape, B, L, dtype, reps, calls, cold=False):
    """Decode attention inside a compiled function, per call (see the module doc)."""
    nh, nkv, hd = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    qs = [mk(B, nh, hd) for _ in range(calls)]
    caches = [(mk(B, nkv, L + 16, hd)[:, :, :L], mk(B, nkv, L + 16, hd)[:, :, :L]) for _ in range(calls if cold else 1)]
    mask = torch.zeros(B, 1, 1, L + 16, dtype=dtype)[..., :L]

    def stacked(form):
        def f(qs, caches, mask):
            return [form(q, *caches[i % len(caches)], mask) for i, q in enumerate(qs)]
        return f

    op = lambda q, k, v, m: torch.ops.flora.decode_attention(q, k, v, m[:, 0, 0])  # noqa: E731
    # both forms' functions share one code object: without a reset, dynamo's recompile
    # limit (8 entries) is reached after four cases and the rest would run eagerly
    torch._dynamo.reset()
    opts = {"cpp_wrapper": True}
    forms = {"op compiled": torch.compile(stacked(op), fullgraph=True, options=opts),
             "written-out compiled": torch.compile(stacked(written_out_decode_attention), fullgraph=True,
                                                   options=opts),
             "op eager": stacked(op)}
    flush = torch.empty(16 << 20) if cold else None  # 64 MB, twice the L3

    def timed_calls(fn):
        for _ in range(2):
            fn(qs, caches, mask)
        ts = []
        for _ in range(reps):
            if cold:
                flush.fill_(1.0)
                t0 = time.perf_counter()
                fn(qs, caches, mask)
                ts.append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                for _ in range(3):
                    fn(qs, caches, mask)
                ts.append((time.perf_counter() - t0) / 3)
        return statistics.median(ts) / calls

    with torch.no_grad():
        ref = ops.decode_attention_reference(qs[0], *caches[0], mask[:, 0, 0])
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for name, fn in forms.items():
            torch.testing.assert_close(fn(qs, caches, mask)[0], ref, rtol=tol, atol=tol, msg=name)
        times = {n: [] for n in forms}
        for _ in range(3):  # interleaved rounds
            for n, fn in forms.items():
                times[n].append(timed_calls(fn))
    rows = [dict(shape=shape, batch=B, context=L, dtype=str(dtype).replace("torch.", ""), cold=cold, form=n,
                 us=statistics.median(t) * 1e6) for n, t in times.items()]
    for r in rows:
        r["x"] = r["us"] / rows[1]["us"]  # against the written-out form
    return rows


def decode_compiled_markdown(rows) -> str:
    out = ["| shape | batch | keys | dtype | form | us per call | x written-out |", "|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {r['dtype']} | {r['form']} | {r['us']:.1f} | "
                   f"{r['x']:.2f} |")
    return "\n".join(out)


def decode_markdown(rows, copy_bps) -> str:
    out = [f"copy bandwidth (read + write) {copy_bps / 1e9:.0f} GB/s, measured in this run", "",
           "| shape | batch | keys | padded | form | us eager | us graph | GB/s | x floor | x sdpa | dispatch |",
           "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        x = f"{r['x']:.3f}" if "x" in r else ""
        gu = f"{r['graph_us']:.1f}" if r["graph_us"] == r["graph_us"] else "-"
        out.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {'yes' if r['padded'] else 'no'} | "
                   f"{r['form']} | {r['us']:.1f} | {gu} | {r['gbps']:.0f} | {r['x_floor']:.2f} | {x} | "
                   f"{r['dispatch']} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_dtype(p)
    p.add_argument("--shapes", nargs="+", default=["1b", "3b"], choices=sorted(SHAPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--seq", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--no-backward", action="store_true", help="forward only (default: forward, then forward + backward)")
    p.add_argument("--no-padded", action="store_true", help="only prompts without padding")
    p.add_argument("--packed", type=int, nargs="+", default=[], metavar="K",
                   help="also rows of K sequences packed (flora train --pack): per-sequence, mask, causal")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode", action="store_true", help="a decode step's attention (see the module doc)")
    p.add_argument("--context", nargs="+", type=int, default=[640, 4096, 32768], help="--decode: window lengths")
    p.add_argument("--no-graphs", action="store_true", help="--decode on CUDA: eager only")
    p.add_argument("--cold", action="store_true",
                   help="--decode on the CPU: rotate cache copies (>= 256 MB) so each call reads its window from memory")
    p.add_argument("--compiled", action="store_true",
                   help="--decode on the CPU: the op and the written-out form inside compiled functions (module doc)")
    p.add_argument("--calls", type=int, default=16, help="--compiled: calls per compiled function")
    p.add_argument("--splits", nargs="*", type=int, default=[],
                   help="--decode on CUDA: also the kernel at these split counts (the automatic plan's alternatives)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--md", default=None, help="write the markdown table here too")
    a = p.parse_args(argv)
    device, dtype = device_dtype(a, "bench/attention.py")
    cmd = "python bench/attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.decode and a.compiled:
        if device.type != "cpu":
            sys.exit("bench/attention.py: --compiled is for the CPU's decode step")
        rows = [r for shape in a.shapes for B in a.batch for L in a.context
                for r in decode_compiled_case(shape, B, L, dtype, a.reps, a.calls, a.cold)]
        publish(title(device, cmd.strip()) + "\n\n" + decode_compiled_markdown(rows),
                {"command": cmd.strip(), "rows": rows}, a.md, a.json)
        return
    if a.decode:
        bw = copy_bandwidth(device)
        rows = [r for shape in a.shapes for B in a.batch for L in a.context
                for padded in ((False,) if a.no_padded else (False, True))
                for r in decode_case(shape, B, L, padded, dtype, device, a.reps, bw, not a.no_graphs, a.splits,
                                     a.cold)]
        publish(title(device, cmd.strip()) + "\n\n" + decode_markdown(rows, bw),
                {"command": cmd.strip(), "copy_gbps": bw / 1e9, "rows": rows}, a.md, a.json)
        return
    rows = []
    for shape in a.shapes:
        for B in a.batch:
            for T in a.seq:
                for padded in (False,) if a.no_padded else (False, True):
                    for bwd in (False,) if a.no_backward else (False, True):
                        rows += case(shape, B, T, padded, dtype, device, bwd, a.reps)
                for K in a.packed:
                    for bwd in (False,) if a.no_backward else (False, True):
                        rows += case(shape, B, T, False, dtype, device, bwd, a.reps, K)
    publish(title(device, cmd.strip()) + "\n\n" + markdown(rows, device), {"command": cmd.strip(), "rows": rows},
            a.md, a.json)

if __name__ == "__main__":
    main()
