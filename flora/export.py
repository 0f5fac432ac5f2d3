"""Take an adapter out of flora: the logic behind ``flora export``.

    flora export --model DIR|FILE.gguf|smollm2 [--adapter DIR] --merged OUT [--dtype D]
    flora export --model DIR|FILE.gguf|smollm2 --adapter DIR --peft OUT

``--merged`` writes a plain Hugging Face Llama checkpoint (config.json,
safetensors, generation_config.json, the tokenizer) with a lora / pf-lora
adapter merged into the base weights, for servers that take one model
(vLLM, TGI, llama.cpp's converter); without ``--adapter`` it writes the base
alone (a GGUF file, dequantized, becomes a safetensors checkpoint).
``--peft`` writes a lora / pf-lora adapter as a PEFT LoRA directory, for
servers that switch LoRA adapters (vLLM ``--lora-modules``). The fused
variants (ffba, zflora, ...) have neither form: they run inside flora's
fused GEMMs, so they are served with flora (``flora generate``,
``FusedLlama``). Outputs are written atomically and never replace a
directory holding anything else.
"""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True,
                   help="local Llama checkpoint directory, a Llama .gguf file, or 'smollm2'")
    p.add_argument("--adapter", default=None, help="adapter directory (flora's or a PEFT LoRA's)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--merged", metavar="OUT", help="write an HF Llama checkpoint with the adapter merged")
    g.add_argument("--peft", metavar="OUT", help="write the adapter as a PEFT LoRA directory")
    p.add_argument("--dtype", default="auto",
                   help="dtype of the merged weights: auto (the checkpoint's; float32 for a GGUF), "
                        "bfloat16, float16, float32")
    return p


def run_args(args) -> dict:
    from .fileio import read_json_object
    from .model import FusedLlama
    from .pretrained import load_tokenizer, smollm2_path

    out = args.merged or args.peft
    if args.peft is not None and args.adapter is None:
        raise ValueError("--peft needs --adapter (it writes that adapter in PEFT's format)")
    if args.peft is not None and args.dtype != "auto":
        raise ValueError("--dtype applies to --merged; --peft keeps the adapter's own dtype")
    path = smollm2_path() if args.model == "smollm2" else args.model
    for src in filter(None, (path, args.adapter)):
        if os.path.realpath(out) == os.path.realpath(src):
            raise ValueError(f"the output {out} is an input; write the export elsewhere")
    model = FusedLlama.from_pretrained(path, adapter=args.adapter, dtype=args.dtype, device="cpu")
    cfg = model.adapter_config
    if args.peft is not None:
        model.export_peft(out, base_model_name_or_path=args.model)
        what = f"PEFT LoRA adapter ({cfg.variant}, rank {cfg.rank})"
    else:
        gen = os.path.join(path, "generation_config.json")  # a checkpoint dir's sampling defaults, stop tokens
        gen = read_json_object(gen) if os.path.isfile(gen) else None
        model.save_merged(out, tokenizer=load_tokenizer(path), generation_config=gen)
        what = "HF Llama checkpoint" + (f" ({cfg.variant} rank {cfg.rank} merged)" if cfg else " (base)")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    summary = {"wrote": out, "what": what, "files": sorted(os.listdir(out)), "bytes": size,
               "dtype": str(model.dtype).replace("torch.", "")}
    print(json.dumps(summary))
    return summary
