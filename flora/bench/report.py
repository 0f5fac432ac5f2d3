"""Reporting for the latency benchmark (flora/bench/latency.py): the markdown
table (inserted into the "End-to-end latency" section of bench/RESULTS.md),
the PNG chart, and the run's environment."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from .._version import __version__
from ..fileio import atomic_write_json, atomic_write_text

SECTION = "## End-to-end latency"


def environment(device: torch.device) -> dict:
    import transformers

    try:
        import peft
        peft_v = peft.__version__
    except ImportError:
        peft_v = None
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = f"CPU {cpu_name()} ({torch.get_num_threads()} threads)"
    return {"device": dev, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "flora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft_v, "python": platform.python_version(), "host": platform.node()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    """One line naming this CPU host, for benchmark reports."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_device_dtype(p) -> None:
    """A benchmark's --device (default CUDA where visible) and --dtype (default bf16 on CUDA, fp32 on CPU)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")


def device_dtype(a, script: str) -> tuple:
    """(torch.device, torch.dtype) of :func:`add_device_dtype`'s arguments; exits naming ``script``
    when --device cuda sees no CUDA device."""
    import sys

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: --device cuda, but no CUDA device is visible")
    return device, DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]


def title(device: torch.device, command: str) -> str:
    """A benchmark table's first line: date, device, torch and the command."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {machine()}"
    return f"{datetime.date.today()}, {name}, torch {torch.__version__}, `{command}`"


def publish(md: str, doc: dict, md_path: Optional[str] = None, json_path: Optional[str] = None) -> None:
    """Print a benchmark's markdown; write it and its JSON document where asked (each atomically)."""
    print(md)
    if md_path:
        atomic_write_text(md_path, md + "\n")
    if json_path:
        atomic_write_json(json_path, doc)


def _ms(x):
    return "—" if x is None else f"{x * 1e3:.2f}"


def _x(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def mode_label(r) -> str:
    """How a row decoded: eager or CUDA graph, and whether the step was compiled."""
    return ("graph" if r["graph"] else "eager") + (" compiled" if r.get("compiled") else "")


def row_label(r) -> str:
    if r["engine"] == "transformers":
        return {"transformers": "base", "peft": "PEFT LoRA (fp32 adapter upcast)",
                "peft-noupcast": "PEFT LoRA (autocast_adapter_dtype=False)",
                "peft-merged": "LoRA merged"}[r["variant"]]
    return r["variant"]


def markdown(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    lines = [f"### {env['date'][:10]} · {env['device']}", "",
             f"- command: `{result['command']}`",
             f"- versions: flora {env['flora']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, python {env['python']}",
             f"- copy bandwidth (one {result['copy_bytes'] // 2**20} MiB tensor copy, read + write): "
             f"{result['copy_gbps']:.1f} GB/s{_copy_runs(result)}; floor = base weight bytes / that bandwidth",
             f"- adapters: r = {result['rank']}, alpha = {result['alpha']}, every adapter tensor random "
             f"and non-zero; medians of {result['repeats']} runs after {result['warmup']} warm-up",
             "- TTFT = prefill + first token" + (f" (median of {result['prefills']} prefills a run)"
                                                 if result.get("prefills", 1) > 1 else "")
             + "; TPOT = mean of the later decode steps; ratios (×) are to the "
             "base of the same engine and setting; bytes × = (base + adapter weight bytes) / base weight bytes, "
             "the TPOT ratio a weight-streaming-bound decode step cannot beat; tok/s = batch / TPOT; "
             "GB/s = base weight bytes / TPOT", ""]
    for m in result["models"]:
        if m.get("skipped"):
            lines.append(f"**{m['label']}, {_short(m['dtype'])}**: not run ({m['skipped']})")
            lines.append("")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["dtype"], r["batch"], r["prompt_len"], r["new_tokens"]), []).append(r)
    info = {(m["model"], m["dtype"]): m for m in result["models"]}
    for (model, dtype, b, p, n), rs in groups.items():
        wb = info[(model, dtype)]["weight_bytes"]
        lines += [f"**{info[(model, dtype)]['label']}, {_short(dtype)}, batch {b}, prompt {p}, {n} new tokens** "
                  f"(base weights {wb / 1e6:.0f} MB, floor {wb / result['copy_gbps'] / 1e6:.2f} ms/token)", "",
                  "| engine | variant | r | mode | TTFT ms | TTFT × | TPOT ms | TPOT × | bytes × | tok/s | GB/s "
                  "| × floor |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rs:
            mode = mode_label(r)
            if r["skipped"]:
                lines.append(f"| {r['engine']} | {row_label(r)} | {r['rank'] or ''} | {mode} | not run: "
                             f"{r['skipped']} | | | | | | | |")
                continue
            lines.append(
                f"| {r['engine']} | {row_label(r)} | {r['rank'] or ''} | {mode} | {_ms(r['ttft_s'])} | "
                f"{_x(r['ttft_ratio'])} | {_ms(r['tpot_s'])} | {_x(r['tpot_ratio'])} | {_x(r.get('bytes_ratio'))} | "
                f"{_x(r['tokens_per_s'], 1)} | {_x(r['decode_gbps'], 2)} | {_x(r['floor_ratio'], 2)} |")
        drift = [r for r in rs if r.get("base_drift") is not None]
        lines.append("")
        if drift and "pairings" not in drift[0]:  # JSON of a run before interleaving
            lines += [f"flora base was measured first and last (the row shows their mean, the base of the "
                      f"ratios); its TPOT moved by {drift[0]['base_drift'] * 100:.1f}% in between.", ""]
        elif any("paired" in r for r in rs):
            text = ("Each variant was timed interleaved with the base of its engine, decode step by decode step "
                    "(base, variant, variant, base, ...), so drift of the machine hits both alike; its ratios are "
                    "medians of the per-round ratios, so they can differ from the quotient of the ms columns. "
                    "The base rows pool all their runs.")
            if drift:
                d = max(drift, key=lambda r: r["base_drift"])
                text += (f" {d['engine']} base's median TPOT moved by {d['base_drift'] * 100:.1f}% across its "
                         f"{d['pairings']} pairings, a measure of the machine's drift.")
            lines += [text, ""]
    if result["goals"]:
        lines += ["Issue-8 goals this run measures:", ""]
        for g in result["goals"]:
            mark = "met" if g["met"] else "**missed**"
            lines.append(f"- {g['goal']}: {g['value']:.3f}{g['unit']} — {mark}")
        lines.append("")
    if result["device_type"] == "cpu":
        lines += ["GPU rows (CUDA graphs, H100 goals) need a CUDA device and are not measured in this run.", ""]
    return "\n".join(lines)


def _copy_runs(result: dict) -> str:
    runs = result.get("copy_gbps_runs")
    if not runs or len(runs) < 2:
        return ""
    return f" (the better of {runs[0]:.1f} at the start and {runs[1]:.1f} at the end)"


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def append_results(path: Path, block: str) -> None:
    """Insert ``block`` at the end of the "End-to-end latency" section (created
    at the end of the file if missing); the rest of the file is kept as is."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    try:
        start = next(i for i, l in enumerate(lines) if l.strip() == SECTION)
    except StopIteration:
        new = text.rstrip("\n") + f"\n\n{SECTION}\n\nWritten by `bench/latency.py` (`flora bench latency`).\n\n" \
            + block.rstrip("\n") + "\n"
        atomic_write_text(path, new)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before = "\n".join(lines[:end]).rstrip("\n")
    after = "\n".join(lines[end:])
    new = before + "\n\n" + block.rstrip("\n") + "\n" + ("\n" + after + ("\n" if after else "") if after else "")
    atomic_write_text(path, new)


def plot(result: dict, path: Path) -> Optional[Path]:
    """Bar chart: TTFT and TPOT of each variant as a ratio to its engine's base,
    eager and graphed, one panel per model/dtype/batch/prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["skipped"] is None and r["tpot_ratio"] is not None
            and r["variant"] not in ("base", "transformers")]
    if not rows:
        return None
    panels: dict = {}
    for r in rows:
        panels.setdefault((r["model"], r["dtype"], r["batch"], r["prompt_len"]), []).append(r)
    n = len(panels)
    labels_of = {m["model"]: m["label"] for m in result["models"]}
    fig, axes = plt.subplots(n, 1, figsize=(max(8.0, 0.9 * max(len(v) for v in panels.values()) + 3), 4.2 * n),
                             squeeze=False)
    for ax, ((model, dtype, b, p), rs) in zip(axes[:, 0], panels.items()):
        labels = []
        for r in rs:
            if _plot_label(r, result["rank"]) not in labels:
                labels.append(_plot_label(r, result["rank"]))
        series = [("TTFT", False), ("TPOT", False)]
        if any(r["graph"] for r in rs):
            series += [("TTFT", True), ("TPOT", True)]
        width = 0.8 / len(series)
        colors = {("TTFT", False): "#9ecae1", ("TPOT", False): "#3182bd", ("TTFT", True): "#fdae6b",
                  ("TPOT", True): "#e6550d"}
        top = 1.0
        for si, (metric, graph) in enumerate(series):
            xs, ys = [], []
            for r in rs:
                if r["graph"] != graph:
                    continue
                xs.append(labels.index(_plot_label(r, result["rank"])) + (si - (len(series) - 1) / 2) * width)
                ys.append(r["ttft_ratio" if metric == "TTFT" else "tpot_ratio"])
            if xs:
                comp = " compiled" if any(r.get("compiled") for r in rs) else ""
                bars = ax.bar(xs, ys, width, label=f"{metric} {'graph' if graph else 'eager'}{comp}",
                              color=colors[(metric, graph)])
                top = max(top, max(ys))
                if len(labels) * len(series) <= 48:
                    ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=6, rotation=90, padding=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("× base of the same engine")
        ax.set_ylim(0, top * 1.18)
        ax.set_title(f"{labels_of[model]}, {_short(dtype)}, batch {b}, prompt {p} — "
                     f"r = {result['rank']} · {result['environment']['device']}", fontsize=9)
        ax.legend(fontsize=7, ncol=4, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_label(r, rank):
    lab = ("HF " if r["engine"] == "transformers" else "") + (
        {"peft": "PEFT", "peft-noupcast": "PEFT no-upcast", "peft-merged": "merged"}.get(r["variant"], r["variant"]))
    if r["rank"] and r["rank"] != rank:
        lab += f" r{r['rank']}"
    return lab
