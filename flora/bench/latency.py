"""End-to-end latency benchmark: what fusing the adapters buys at generation time.

Used by ``python bench/latency.py`` and ``flora bench latency`` (one parser,
one implementation, here). For each model shape (random weights built from a
config, nothing downloaded), dtype, batch, prompt length and decode mode
(eager, CUDA graph) it measures time to first token (TTFT) and time per
output token (TPOT) for

* transformers: the base model, + PEFT LoRA on all seven projections (with
  PEFT's default fp32 adapter upcast and with ``autocast_adapter_dtype=False``),
  and with that LoRA merged (eager only);
* flora: the base model and each adapter variant (eager, and CUDA graphs on GPU).

Every adapter weight is random and non-zero, so no kernel can skip a zero
block. Ratios are taken against the base of the same engine and setting.
Decode is weight-streaming bound, so each row also gets the achieved
weight-streaming rate (base weight bytes / TPOT) and its ratio to the floor
(base weight bytes / the copy bandwidth of one large tensor copy measured in
the same run, counted read + write as STREAM does).

Outputs: a JSON file and a PNG chart under ``--out-dir``, and a markdown block
inserted at the end of the "End-to-end latency" section of ``--results``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import inspect
import json
import shlex
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import nvtx
from ..config import AdapterConfig, as_arch, default_alpha
from ..devices import resolve_device
from ..fileio import atomic_write_json
from ..model import FusedLlama
from ..modules.variants import base_parameters
from .report import SECTION, append_results, environment, markdown, mode_label, plot  # noqa: F401
from .memory import peak_bytes, reset_peak, resident_bytes
from .timing import LatencyProbe, Timer, attention_backend, run_interleaved

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRANSFORMERS_ROWS = ("transformers", "peft", "peft-noupcast", "peft-merged")
FLORA_ROWS = ("base", "lora", "pf-lora", "ffa", "ffba", "ffba-qg-add", "zflora-minimal", "zflora",
              "lora-mha", "zflora-mha")
ALL_ROWS = TRANSFORMERS_ROWS + FLORA_ROWS
SWEEP_VARIANTS = ("ffba", "zflora")
SWEEP_RANKS = (8, 16, 32, 64, 128)

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Llama shapes (random weights). "small" is the 1024-wide CPU shape; "tiny" is for tests.
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True,
                  rope_parameters=_LLAMA3_ROPE),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
               rope_parameters=_LLAMA3_ROPE),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
               rope_parameters=_LLAMA3_ROPE),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
               rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
}
SHAPE_LABEL = {"tiny": "tiny (128-wide, 2 layers)", "small": "small (1024-wide, 8 layers)",
               "1b": "Llama-3.2-1B shape", "3b": "Llama-3.2-3B shape", "8b": "Llama-3.1-8B shape"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", nargs="+", default=None, metavar="SHAPE|DIR",
                   help=f"model shapes with random weights ({', '.join(SHAPES)}) or local checkpoint "
                        f"directories; default: small on CPU, 1b and 3b on GPU")
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help=f"which rows to run (default all): {' '.join(ALL_ROWS)}")
    p.add_argument("--rank", type=int, default=32, help="adapter rank r (default 32)")
    p.add_argument("--alpha", type=float, default=None, help="adapter alpha (default 2r)")
    p.add_argument("--rank-sweep", action="store_true",
                   help=f"also run {'/'.join(SWEEP_VARIANTS)} at ranks {','.join(map(str, SWEEP_RANKS))}")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default: 1 on CPU, 1 8 on GPU)")
    p.add_argument("--prompt", nargs="+", type=int, default=None, help="prompt lengths (default 512)")
    p.add_argument("--long", action="store_true", help="add prompt length 2048")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per run (default 128)")
    p.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                   help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--mode", choices=("eager", "graph", "both"), default=None,
                   help="decode mode for flora rows (default: both on GPU, eager on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="flora rows: the decode step compiled with torch.compile, as generate(compile=True) "
                        "(compilation happens in the untimed warm-up runs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (median; default 3)")
    p.add_argument("--prefills", type=int, default=None,
                   help="prefills per run, interleaved between the paired models; TTFT of a run is their "
                        "median (default 5 on GPU, where an eager prefill is host-bound and noisy; 1 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: prompt 32, 8 new tokens, 1 timed run (numbers are not meaningful)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench/out", help="where the JSON and PNG go (default bench/out)")
    p.add_argument("--name", default=None, help="base name of the JSON/PNG files (default: latency-<date>)")
    p.add_argument("--results", default="bench/RESULTS.md",
                   help="markdown file whose 'End-to-end latency' section gets the table")
    p.add_argument("--no-results", action="store_true", help="do not touch the results markdown")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (for Nsight Systems)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: re-render the markdown/plot of an earlier run's JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="bench/latency.py", description="TTFT/TPOT of flora adapters vs transformers + PEFT"))


@dataclass
class Plan:
    device: torch.device
    models: list
    dtypes: list
    rows: list  # (row name, rank)
    batches: list
    prompts: list
    new_tokens: int
    modes: list  # [False] or [False, True] (use_cuda_graph)
    repeats: int
    warmup: int
    rank: int
    alpha: Optional[float]
    seed: int
    compile: bool = False  # flora rows: decode step under torch.compile
    prefills: int = 1  # TTFT samples per run (their median)


def make_plan(args) -> Plan:
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    rows = list(args.rows or ALL_ROWS)
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad:
        raise ValueError(f"--rows: unknown {bad}; choose from {' '.join(ALL_ROWS)}")
    if any(r in TRANSFORMERS_ROWS for r in rows) and "transformers" not in rows:
        rows.insert(0, "transformers")  # the base of the transformers ratios
    if any(r in FLORA_ROWS for r in rows) and "base" not in rows:
        rows.insert(0, "base")
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    plan_rows = [(r, args.rank) for r in rows]
    if args.rank_sweep:
        plan_rows += [(v, r) for v in SWEEP_VARIANTS for r in SWEEP_RANKS if (v, r) not in plan_rows]
    quick = args.quick
    prompts = args.prompt or ([32] if quick else [512])
    if args.long and 2048 not in prompts:
        prompts = prompts + [2048]
    new = args.new_tokens if args.new_tokens is not None else (8 if quick else 128)
    batches = args.batch or ([1] if quick or not gpu else [1, 8])
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    for name, vals in (("--batch", batches), ("--prompt", prompts)):
        if any(v < 1 for v in vals):
            raise ValueError(f"{name}: values must be >= 1, got {vals}")
    if new < 2:
        raise ValueError(f"--new-tokens must be >= 2 (TPOT needs a decode step), got {new}")
    if repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    prefills = args.prefills if args.prefills is not None else (5 if gpu and not quick else 1)
    if prefills < 1:
        raise ValueError(f"--prefills must be >= 1, got {prefills}")
    mode = args.mode or ("both" if gpu else "eager")
    if mode != "eager" and not gpu:
        raise ValueError("--mode graph/both needs a CUDA device (CUDA graphs)")
    modes = {"eager": [False], "graph": [True], "both": [False, True]}[mode]
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if gpu else ["fp32"]))]
    models = args.model or (["1b", "3b"] if gpu else ["small"])
    for m in models:
        if m not in SHAPES and not Path(m, "config.json").is_file():
            raise ValueError(f"--model {m!r}: neither a shape ({', '.join(SHAPES)}) nor a local checkpoint "
                             f"directory with config.json")
        if m not in SHAPES:
            check_checkpoint(m)
    if args.compile and args.warmup < 1:
        raise ValueError("--compile needs --warmup >= 1 (the first run compiles; it must not be timed)")
    return Plan(dev, models, dtypes, plan_rows, batches, prompts, new, modes, repeats, args.warmup,
                args.rank, args.alpha, args.seed, args.compile, prefills)


def check_checkpoint(path: str) -> None:
    """Fail before measuring anything on a checkpoint that cannot load: its config,
    its shards, and every byte each safetensors header promises (no weights read)."""
    from ..checkpoint import checkpoint_files, read_config, read_safetensors_header

    try:
        read_config(path)
        for f in sorted(set(checkpoint_files(path).values())):
            read_safetensors_header(f)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        raise ValueError(f"--model {path}: {e}") from None


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, max_position_embeddings=131072,
                       attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=0)


def weight_bytes(cfg, dtype) -> int:
    """Bytes of base weights one decode step streams: every projection and the
    LM head (the embedding lookup reads only a few rows)."""
    sh = as_arch(cfg, "cfg")
    n = sh.num_hidden_layers * sh.layer_projection_parameters + sh.vocab_size * sh.hidden_size
    return n * torch.finfo(dtype).bits // 8


def param_count(cfg) -> int:
    return base_parameters(cfg, tied_head=cfg.tie_word_embeddings)


def check_memory(cfg, dtype, device, plan: Plan) -> Optional[str]:
    """None if the run fits, else why not (the transformers model, flora base
    and one flora variant live at once, each with a KV cache)."""
    elem = torch.finfo(dtype).bits // 8
    need = 3.3 * param_count(cfg) * elem
    hd = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * max(plan.batches) * (max(plan.prompts) + plan.new_tokens) \
        * cfg.num_key_value_heads * hd * elem
    act = max(plan.batches) * max(plan.prompts) * max(cfg.intermediate_size * 3, cfg.vocab_size // 8) * elem * 2
    need += 3 * kv + act
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _mem_available()
    if free is not None and need > 0.9 * free:
        return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"
    return None


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def build_hf_model(cfg, dtype, device, seed: int):
    """A transformers LlamaForCausalLM with random weights, built on ``device``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # init directly in the target dtype: no fp32 copy of an 8B model
    try:
        with torch.device(device):
            m = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return m.to(dtype).eval()


def randomize_adapter(model, seed: int) -> int:
    """Make every adapter tensor random and non-zero (zero-initialised B/C would
    let a kernel skip work). Returns the number of adapter parameters."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                std = 1.0 / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1 else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += p.numel()
    return n


def build_flora(hf, variant: str, rank: int, alpha: Optional[float], dtype, device, seed: int):

    cfg = None
    if variant != "base":
        cfg = AdapterConfig(variant, rank=rank, alpha=alpha)
    m = FusedLlama.from_pretrained(hf, adapter=cfg, dtype=dtype, device=device)
    n = randomize_adapter(m, seed) if cfg is not None else 0
    if cfg is not None and n == 0:
        raise RuntimeError(f"flora {variant}: the model has no adapter parameters")
    return m.eval(), n


def wrap_peft(hf, rank: int, alpha: Optional[float], upcast: bool, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lc = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else default_alpha(rank), target_modules=PROJ,
                    lora_dropout=0.0, init_lora_weights=False)  # False: random, non-zero B
    with warnings.catch_warnings():  # transformers' deprecation notes triggered inside peft
        warnings.simplefilter("ignore", FutureWarning)
        pm = get_peft_model(hf, lc, autocast_adapter_dtype=upcast).eval()
    n = sum(p.numel() for n_, p in pm.named_parameters() if "lora_" in n_)
    return pm, n


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Bytes/s of one large tensor copy (read + write counted, as STREAM copy does)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = Timer(device)
    times = []
    for i in range(repeats + 2):
        a = t.mark()
        dst.copy_(src)
        b = t.mark()
        if i >= 2:
            times.append(t.elapsed(a, b))
    del src, dst
    return 2 * n * 4 / statistics.median(times)


class HFProbe:
    """transformers' own eager decode loop (DynamicCache, as generate() uses by
    default) with the probe interface of flora.generation.run_interleaved:
    prefill() = prefill + first token, step() = one decode step."""

    graphed = False

    def __init__(self, model, vocab: int, batch: int, prompt_len: int, new_tokens: int, seed: int,
                 device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.model, self.new_tokens = model, new_tokens
        self.ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
        self.timer = Timer(device)
        self._grad = None
        # transformers >= 5.24 names the KV cache `cache` (argument and output);
        # before, `past_key_values`, which 5.24 still takes with a warning
        from transformers import LlamaForCausalLM
        params = inspect.signature(LlamaForCausalLM.forward).parameters
        self._cache_name = "cache" if "cache" in params else "past_key_values"

    def __enter__(self) -> "HFProbe":
        self._grad = torch.no_grad()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.cache = self.tok = None
        self._grad.__exit__(*exc)

    def prefill(self):
        a = self.timer.mark()
        with nvtx.range("prefill"):
            out = self.model(input_ids=self.ids, use_cache=True, logits_to_keep=1)
        self.tok, self.cache = out.logits[:, -1].argmax(-1), getattr(out, self._cache_name)
        return a, self.timer.mark()

    def step(self):
        a = self.timer.mark()
        with nvtx.range("decode"):
            out = self.model(input_ids=self.tok[:, None], use_cache=True, **{self._cache_name: self.cache})
        self.tok, self.cache = out.logits[:, -1].argmax(-1), getattr(out, self._cache_name)
        return a, self.timer.mark()


def solo_latency(probe, repeats: int, warmup: int, prefills: int = 1) -> dict:
    """One probe alone: medians of TTFT/TPOT."""
    with probe:
        (t,) = run_interleaved([probe], repeats, warmup, prefills=prefills)
    return _timing(t)


def pair_latency(base_probe, probe, repeats: int, warmup: int, prefills: int = 1) -> tuple[dict, dict]:
    """A base and one model timed interleaved step by step
    (flora.generation.run_interleaved). The model's ``paired`` ratios are
    medians of the per-round ratios, each between the two models' steps
    taken alternately over the same stretch of time."""
    with base_probe, probe:
        b, v = run_interleaved([base_probe, probe], repeats, warmup, prefills=prefills)
    v["paired"] = {k: statistics.median(x / y for x, y in zip(v[f"{k}_runs"], b[f"{k}_runs"]))
                   for k in ("ttft", "tpot")}
    v["paired"].update(base_ttft_runs=b["ttft_runs"], base_tpot_runs=b["tpot_runs"])
    return b, v


def _timing(t: dict) -> dict:
    keep = ("ttft_s", "tpot_s", "cuda_graph", "paired", "ttft_runs", "tpot_runs")
    return {k: t[k] for k in keep if k in t}


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------
def free_memory(device):
    """Collect garbage and hand cached CUDA blocks back, so the next model starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _settings(plan: Plan):
    for b in plan.batches:
        for p in plan.prompts:
            yield b, p


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _row(shape, dtype, engine, variant, rank, b, p, new, graph, timing=None, n_adapter=0, skipped=None,
         compiled=False):
    return {"model": shape, "dtype": str(dtype).replace("torch.", ""), "engine": engine, "variant": variant,
            "rank": rank if variant not in ("base", "transformers") else 0, "batch": b, "prompt_len": p,
            "new_tokens": new, "graph": graph, "compiled": compiled, "adapter_params": n_adapter,
            "skipped": skipped,
            **(timing or {"ttft_s": None, "tpot_s": None, "cuda_graph": False})}


def model_config(shape: str):
    """(LlamaConfig, label) of a shape from SHAPES or a local checkpoint directory."""
    if shape in SHAPES:
        return llama_config(shape), SHAPE_LABEL[shape]
    from transformers import LlamaConfig

    if not Path(shape, "config.json").is_file():
        raise ValueError(f"--model {shape!r}: neither a shape ({', '.join(SHAPES)}) nor a checkpoint "
                         f"directory with config.json")
    cfg = LlamaConfig.from_pretrained(shape, local_files_only=True)
    return cfg, f"checkpoint {Path(shape).name} ({cfg.hidden_size}-wide, {cfg.num_hidden_layers} layers)"


def base_llama(shape: str, cfg, dtype, device, seed: int):
    """The transformers model every row starts from: random weights for a shape
    (seeded), the checkpoint's own for a directory."""
    if shape in SHAPES:
        return build_hf_model(cfg, dtype, device, seed)
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(shape, dtype=dtype, local_files_only=True).to(device).eval()


def run_model(shape: str, dtype, plan: Plan, log=print) -> tuple[list, dict]:
    """All rows for one model shape and dtype; returns (rows, model info)."""
    dev = plan.device
    cfg, label = model_config(shape)
    info = {"model": shape, "label": label, "dtype": str(dtype).replace("torch.", ""),
            "params": param_count(cfg), "weight_bytes": weight_bytes(cfg, dtype)}
    rows = []
    why = check_memory(cfg, dtype, dev, plan)
    if why:
        log(f"[{shape} {info['dtype']}] skipped: {why}")
        info["skipped"] = why
        return rows, info
    hf = base_llama(shape, cfg, dtype, dev, plan.seed)
    hf_rows = [r for r, _ in plan.rows if r in TRANSFORMERS_ROWS]
    flora_rows = [(r, k) for r, k in plan.rows if r in FLORA_ROWS]

    if flora_rows:
        rows += flora_rows_timed(hf, shape, dtype, flora_rows, plan, log, info)
    if hf_rows:
        rows = hf_rows_timed(hf, cfg, shape, dtype, hf_rows, plan, log) + rows
    del hf
    free_memory(dev)
    return rows, info


def flora_rows_timed(hf, shape, dtype, flora_rows, plan: Plan, log, info: Optional[dict] = None) -> list:
    """flora base stays built; each variant is built in turn and timed
    interleaved with it, per setting and mode. ``info`` gets the SDPA kernel a
    decode step runs."""

    dev, rows = plan.device, []
    if dev.type == "cuda":  # what loading costs on the GPU beyond the weights it keeps
        before = reset_peak(dev)
    base, _ = build_flora(hf, "base", plan.rank, plan.alpha, dtype, dev, plan.seed + 1)
    if dev.type == "cuda" and info is not None:
        info["load_peak_bytes"] = peak_bytes(dev) - before
        info["load_kept_bytes"] = resident_bytes(dev) - before
        log(f"  flora base load: peak {info['load_peak_bytes'] / 2**30:.2f} GiB beyond the transformers model, "
            f"{info['load_kept_bytes'] / 2**30:.2f} GiB kept")
    if info is not None:
        info["attention"] = attention_backend(base)
        log(f"  decode attention: {info['attention']}")
    base_runs: dict = {}  # (b, p, graph) -> list of per-pairing timings

    def probe(m, b, p, g):
        return LatencyProbe(m, b, p, plan.new_tokens, use_cuda_graph=g, seed=plan.seed, compile=plan.compile)

    def row(*a, **kw):
        return _row(*a, compiled=plan.compile, **kw)

    for variant, rank in [(v, k) for v, k in flora_rows if v != "base"]:
        try:
            m, n = build_flora(hf, variant, rank, plan.alpha, dtype, dev, plan.seed + 1)
        except Exception as e:  # noqa: BLE001 - e.g. repeat-add widths that do not fit, out of memory
            why = str(e) if isinstance(e, ValueError) else _failed(log, f"flora {variant} r{rank}", e)
            for b, p in _settings(plan):
                for g in plan.modes:
                    rows.append(row(shape, dtype, "flora", variant, rank, b, p, plan.new_tokens, g,
                                     skipped=why))
                    _done(log, rows[-1])
            log(f"[flora {variant} r{rank}] skipped: {why}")
            free_memory(dev)
            continue
        for b, p in _settings(plan):
            for g in plan.modes:
                try:
                    tb, tv = pair_latency(probe(base, b, p, g), probe(m, b, p, g), plan.repeats, plan.warmup,
                                          plan.prefills)
                except Exception as e:  # noqa: BLE001 - this row fails, the run goes on
                    rows.append(row(shape, dtype, "flora", variant, rank, b, p, plan.new_tokens, g,
                                     skipped=_failed(log, f"flora {variant} r{rank} b{b} p{p}", e)))
                    _done(log, rows[-1])
                    free_memory(dev)
                    continue
                base_runs.setdefault((b, p, g), []).append(tb)
                rows.append(row(shape, dtype, "flora", variant, rank, b, p, plan.new_tokens, g, _timing(tv), n))
                _done(log, rows[-1])
        del m
        free_memory(dev)
    base_rows = _base_rows(shape, dtype, "flora", "base", plan, base_runs,
                           lambda b, p, g, m=base: probe(m, b, p, g), log)
    del base
    free_memory(dev)
    return base_rows + rows


def hf_rows_timed(hf, cfg, shape, dtype, hf_rows, plan: Plan, log) -> list:
    """transformers base, and PEFT LoRA (upcast / no upcast / merged) on a
    copy of it, each timed interleaved with the base, per setting."""

    dev, rows, base_runs = plan.device, [], {}

    def probe(m, b, p):
        return HFProbe(m, cfg.vocab_size, b, p, plan.new_tokens, plan.seed, dev)

    for name in ("peft", "peft-noupcast", "peft-merged"):
        if name not in hf_rows:
            continue
        try:
            pm, n = wrap_peft(copy.deepcopy(hf), plan.rank, plan.alpha, name != "peft-noupcast", plan.seed + 2)
            if name == "peft-merged":
                pm, n = pm.merge_and_unload(), 0
        except Exception as e:  # noqa: BLE001 - this row fails, the run goes on
            why = _failed(log, name, e)
            for b, p in _settings(plan):
                rows.append(_row(shape, dtype, "transformers", name, plan.rank, b, p, plan.new_tokens, False,
                                 skipped=why))
                _done(log, rows[-1])
            free_memory(dev)
            continue
        for b, p in _settings(plan):
            try:
                tb, tv = pair_latency(probe(hf, b, p), probe(pm, b, p), plan.repeats, plan.warmup, plan.prefills)
            except Exception as e:  # noqa: BLE001
                rows.append(_row(shape, dtype, "transformers", name, plan.rank, b, p, plan.new_tokens, False,
                                 skipped=_failed(log, f"{name} b{b} p{p}", e)))
                _done(log, rows[-1])
                free_memory(dev)
                continue
            base_runs.setdefault((b, p, False), []).append(tb)
            rows.append(_row(shape, dtype, "transformers", name, plan.rank, b, p, plan.new_tokens, False,
                             _timing(tv), n))
            _done(log, rows[-1])
        del pm
        free_memory(dev)
    if "transformers" not in hf_rows:
        return rows
    eager = dataclasses.replace(plan, modes=[False], compile=False)  # transformers rows are eager only
    return _base_rows(shape, dtype, "transformers", "transformers", eager, base_runs,
                      lambda b, p, g: probe(hf, b, p), log) + rows


def _base_rows(shape, dtype, engine, name, plan: Plan, base_runs: dict, make_probe, log) -> list:
    """One base row per setting and mode: the median of every run it made in
    its pairings (and how much its median moved between them), or timed alone
    when nothing was paired with it."""
    out = []
    for b, p in _settings(plan):
        for g in plan.modes:
            pairings = base_runs.get((b, p, g))
            if not pairings:
                try:
                    t = solo_latency(make_probe(b, p, g), plan.repeats, plan.warmup, plan.prefills)
                except Exception as e:  # noqa: BLE001 - this row fails, the run goes on
                    out.append(_row(shape, dtype, engine, name, plan.rank, b, p, plan.new_tokens, g,
                                    skipped=_failed(log, f"{engine} {name} b{b} p{p}", e), compiled=plan.compile))
                    _done(log, out[-1])
                    continue
            else:
                t = {"ttft_s": statistics.median(x for tb in pairings for x in tb["ttft_runs"]),
                     "tpot_s": statistics.median(x for tb in pairings for x in tb["tpot_runs"]),
                     "cuda_graph": pairings[0]["cuda_graph"]}
                if len(pairings) > 1:
                    med = [tb["tpot_s"] for tb in pairings]
                    t["base_drift"], t["pairings"] = max(med) / min(med) - 1, len(pairings)
            out.append(_row(shape, dtype, engine, name, plan.rank, b, p, plan.new_tokens, g, t, compiled=plan.compile))
            _done(log, out[-1])
    return out


class Progress:
    """The run's log, and its JSON rewritten (atomically) after every row, so a
    run that dies keeps every row measured so far (``"partial": true``)."""

    def __init__(self, log=print, path=None, head: Optional[dict] = None):
        self.log, self.path, self.head, self.rows = log, path, dict(head or {}), []

    def __call__(self, msg: str) -> None:
        self.log(msg)

    def row(self, r: dict) -> None:
        _log_row(self.log, r)
        self.rows.append(r)
        self.write()

    def write(self, **extra) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {**self.head, **extra, "partial": True, "rows": self.rows})


def _done(log, r: dict) -> None:
    """A row is measured (or failed): log it, and record it when the log is a Progress."""
    if isinstance(log, Progress):
        log.row(r)
    else:
        _log_row(log, r)


def _failed(log, what: str, e: BaseException) -> str:
    """The error text a row records (the run goes on with the next row)."""
    msg = f"error: {type(e).__name__}: {e}".splitlines()[0][:300]
    log(f"[{what}] {msg}")
    return msg


def _log_row(log, r):
    if r["skipped"]:
        return
    g = "" if mode_label(r) == "eager" else " " + mode_label(r)
    rank = f" r{r['rank']}" if r["rank"] else ""
    log(f"  {r['engine']:>12} {r['variant'] + rank:<20} b{r['batch']} p{r['prompt_len']}{g}: "
        f"TTFT {r['ttft_s'] * 1e3:9.2f} ms  TPOT {r['tpot_s'] * 1e3:8.2f} ms")


def bytes_ratio(row: dict, weight_bytes: int) -> float:
    """The TPOT ratio a decode step bound by weight streaming cannot beat:
    (base + adapter bytes) / base bytes (adapters stored in the base dtype)."""
    return 1 + row["adapter_params"] * torch.finfo(getattr(torch, row["dtype"])).bits / 8 / weight_bytes


def add_ratios(rows: list, infos: list, copy_bw: float) -> list:
    """TTFT/TPOT ratio to the base of the same engine, model, dtype, setting and
    mode (for flora variants: the median of round-by-round ratios against the
    base timed interleaved with them); tokens/s; weight-streaming GB/s and the
    ratio to the floor."""
    wb = {(i["model"], i["dtype"]): i["weight_bytes"] for i in infos if "weight_bytes" in i}

    def key(r):
        return (r["engine"], r["model"], r["dtype"], r["batch"], r["prompt_len"], r["new_tokens"], r["graph"],
                r.get("compiled", False))

    bases = {key(r): r for r in rows if r["skipped"] is None and r["variant"] in ("base", "transformers")}
    for r in rows:
        for k in ("ttft_ratio", "tpot_ratio", "tokens_per_s", "decode_gbps", "floor_ratio", "bytes_ratio"):
            r[k] = None
        r.setdefault("base_drift", None)
        if r["skipped"] is not None:
            continue
        b = bases.get(key(r))
        if "paired" in r:
            r["ttft_ratio"], r["tpot_ratio"] = r["paired"]["ttft"], r["paired"]["tpot"]
        elif b is not None:
            r["ttft_ratio"] = r["ttft_s"] / b["ttft_s"]
            r["tpot_ratio"] = r["tpot_s"] / b["tpot_s"]
        r["tokens_per_s"] = r["batch"] / r["tpot_s"]
        w = wb[(r["model"], r["dtype"])]
        r["decode_gbps"] = w / r["tpot_s"] / 1e9
        r["floor_ratio"] = r["tpot_s"] / (w / copy_bw)
        r["bytes_ratio"] = bytes_ratio(r, w)
    return rows


# --------------------------------------------------------------------------
# goals (issue 8)
# --------------------------------------------------------------------------
def evaluate_goals(rows: list, device: torch.device, rank: int) -> list:
    """Each goal of issue 8 that this run can speak to: measured value and met/missed."""
    goals = []
    live = [r for r in rows if r["skipped"] is None and r["tpot_ratio"] is not None and r["rank"] in (0, rank)]

    def find(variant, engine="flora", **kw):
        out = [r for r in live if r["engine"] == engine and r["variant"] == variant
               and all(r[k] == v for k, v in kw.items())]
        return out

    if device.type == "cpu":
        for v in ("ffba", "zflora"):
            for r in find(v, dtype="float32", model="small", batch=1):
                goals.append(_goal(f"CPU fp32 small, b1 p{r['prompt_len']}: {v} TPOT <= 1.05x flora base",
                                   r["tpot_ratio"], 1.05))
    else:
        limits = {"ffba": (1.03, 1.05), "zflora": (1.02, 1.05), "pf-lora": (1.15, None)}
        for v, (tp, tt) in limits.items():
            for r in find(v, dtype="bfloat16", batch=1, prompt_len=512):
                mode = mode_label(r)
                goals.append(_goal(f"{r['model']} bf16 b1 p512 {mode}: {v} TPOT <= {tp}x flora base",
                                   r["tpot_ratio"], tp))
                if tt:
                    goals.append(_goal(f"{r['model']} bf16 b1 p512 {mode}: {v} TTFT <= {tt}x flora base",
                                       r["ttft_ratio"], tt))
        for r in find("base", dtype="bfloat16", graph=True, batch=1):
            lim = {"1b": 1.5, "3b": 1.3}.get(r["model"])
            if lim:
                goals.append(_goal(f"{r['model']} bf16 b1 p{r['prompt_len']} graph: flora base TPOT <= "
                                   f"{lim}x weight-streaming floor", r["floor_ratio"], lim))
    # flora base vs transformers eager, same weights and setting (an H100 goal; on CPU decode is
    # bound by weight streaming for both, so it is reported in the table, not judged)
    for r in (find("base", graph=False) if device.type == "cuda" else []):
        hf = [h for h in live if h["engine"] == "transformers" and h["variant"] == "transformers"
              and all(h[k] == r[k] for k in ("model", "dtype", "batch", "prompt_len"))]
        for h in hf[:1]:
            goals.append({"goal": f"{r['model']} {r['dtype']} b{r['batch']} p{r['prompt_len']}: flora base "
                                  f">= 5x faster per token than transformers eager",
                          "value": h["tpot_s"] / r["tpot_s"], "limit": 5.0,
                          "met": h["tpot_s"] / r["tpot_s"] >= 5.0, "unit": "x faster"})
    return goals


def _short_dt(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def _goal(text, value, limit):
    return {"goal": text, "value": value, "limit": limit, "met": value <= limit, "unit": "x"}


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------
def run(plan: Plan, log=print) -> dict:
    """Measure every row of the plan; returns the result dict (not yet written)."""
    dev = plan.device
    copy_bytes = 256 * 2**20 if dev.type == "cpu" else 2 * 2**30
    log(f"measuring copy bandwidth ({copy_bytes // 2**20} MiB) on {dev} ...")
    bws = [copy_bandwidth(dev, copy_bytes)]
    log(f"  {bws[0] / 1e9:.1f} GB/s")
    rows, infos = [], []
    for shape in plan.models:
        for dtype in plan.dtypes:
            log(f"[{SHAPE_LABEL.get(shape, shape)}, {str(dtype).replace('torch.', '')}]")
            try:
                r, i = run_model(shape, dtype, plan, log)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory building the model: next model
                r, i = [], {"model": shape, "label": SHAPE_LABEL.get(shape, shape), "dtype": _dt(dtype),
                            "skipped": _failed(log, f"{shape} {_dt(dtype)}", e)}
                free_memory(dev)
            rows += r
            infos.append(i)
            if isinstance(log, Progress):
                log.write(models=infos)
    bws.append(copy_bandwidth(dev, copy_bytes))  # again at the end: the floor uses the best of both
    log(f"copy bandwidth at the end: {bws[1] / 1e9:.1f} GB/s")
    bw = max(bws)
    rows = add_ratios(rows, infos, bw)
    return {"environment": environment(dev), "device_type": dev.type, "copy_gbps": bw / 1e9,
            "copy_gbps_runs": [b / 1e9 for b in bws], "copy_bytes": copy_bytes, "rank": plan.rank,
            "alpha": plan.alpha if plan.alpha is not None else default_alpha(plan.rank),
            "repeats": plan.repeats, "warmup": plan.warmup, "prefills": plan.prefills, "models": infos,
            "rows": rows,
            "goals": evaluate_goals(rows, dev, plan.rank)}


def json_path(args) -> Path:
    """Where the run's JSON goes (fixed once: the partial file and the final one)."""
    if args.name is None:
        args.name = f"latency-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    return Path(args.out_dir) / f"{args.name}.json"


def write_outputs(result: dict, args, log=print) -> dict:
    paths = {"json": json_path(args)}
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths["json"], result)
    if not args.no_plot:
        png = plot(result, paths["json"].with_suffix(".png"))
        if png:
            paths["png"] = png
    md = markdown(result)
    att = sorted({f"{i['label']} {_short_dt(i['dtype'])}: {i['attention']}" for i in result["models"]
                  if i.get("attention")})
    if att:  # which SDPA kernel the decode step runs (issue 12.5)
        md += "\n\nDecode attention kernel: " + "; ".join(att) + "\n"
    loads = [f"{i['label']} {_short_dt(i['dtype'])}: peak {i['load_peak_bytes'] / i['weight_bytes']:.2f}x, "
             f"kept {i['load_kept_bytes'] / i['weight_bytes']:.2f}x" for i in result["models"] if i.get("load_peak_bytes")]
    if loads:  # GPU memory of FusedLlama.from_pretrained beyond the transformers model, over the weight bytes
        md += "\nflora base load, GPU memory over the weight bytes: " + "; ".join(loads) + "\n"
    if not args.no_results:
        paths["results"] = Path(args.results)
        append_results(paths["results"], md)
    print(md)
    for k, v in paths.items():
        log(f"{k}: {v}")
    return paths


def rerender(path, args) -> dict:
    """Markdown and plot again from a saved JSON (goals re-evaluated); nothing measured."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--from-json: no such file {path!r}")
    try:
        result = json.loads(p.read_text())
        wb = {(i["model"], i["dtype"]): i["weight_bytes"] for i in result["models"]}
        for r in result["rows"]:  # a JSON from before the column
            if r["skipped"] is None and r.get("bytes_ratio") is None:
                r["bytes_ratio"] = bytes_ratio(r, wb[(r["model"], r["dtype"])])
        result["goals"] = evaluate_goals(result["rows"], torch.device(result["device_type"]), result["rank"])
        result["command"] = result["command"].strip()
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--from-json: {path} is not a JSON written by this benchmark ({e})") from None
    if args.name is None:
        args.name = p.stem
    return write_outputs(result, args, log=lambda s: print(s, file=sys.stderr, flush=True))


def run_args(args, command: Optional[str] = None) -> dict:
    if args.from_json:
        return rerender(args.from_json, args)
    plan = make_plan(args)
    if args.nvtx:
        try:
            nvtx.enable()
        except RuntimeError as e:
            raise ValueError(f"--nvtx: {e}") from None
    command = command or " ".join(shlex.quote(a) for a in sys.argv)
    err = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    path = json_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(err, path, {"command": command, "environment": environment(plan.device),
                                    "device_type": plan.device.type})
    err(f"rows are written to {path} as they are measured")
    result = run(plan, log=progress)
    result["command"] = command
    return write_outputs(result, args, log=err)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cmd = ("python bench/latency.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))).strip()
    try:
        run_args(args, command=cmd)
    except ValueError as e:
        print(f"bench/latency.py: error: {e}", file=sys.stderr)
        return 2
    return 0
