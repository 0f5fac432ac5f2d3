"""Generate with a model and an adapter from the command line: the logic behind
``flora generate``, the step after ``flora train``.

    flora generate --model DIR|FILE.gguf|smollm2 [--adapter OUT/adapter ...] [--compare] \\
        (--prompt TEXT ... | --data prompts.jsonl [--limit N]) [--chat] \\
        [--max-new-tokens 128] [--temperature T --top-p P --top-k K --seed S] [--batch-size 8] [--out FILE.jsonl]

Prompts are tokenized as ``flora train`` tokenizes them, so a training or
evaluation JSONL works as it is; when its records carry a ``completion``
(or a conversation ends with an assistant turn), the exact-match rate against
it is reported. ``--compare`` also generates
with the adapter off (the base model, same weights). Several ``--adapter``
(of one variant, rank and targets) share the model and are switched between
runs, as a server would switch them (only adapter tensors are copied). One prompt streams its
tokens as they come; timing goes to stderr, the completions to stdout and,
with ``--out``, to a JSONL file written atomically. ``--mixed`` runs them all
in the same batches instead (each row its own adapter: a multi-adapter server's batches).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from .devices import resolve_device
from .fileio import atomic_write_text


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype: what `flora generate`, `chat` and `serve` load (see :func:`load`)."""
    p.add_argument("--model", required=True,
                   help="local Llama checkpoint directory, a Llama .gguf file, or 'smollm2' "
                        "(SmolLM2-135M-Instruct, fetched once into ~/.cache/flora)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on the CPU)")


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def load(args, adapters: list, device):
    """(model in eval mode, tokenizer): ``args.model`` (a directory, a .gguf file or
    'smollm2') in ``args.dtype`` on ``device``, its base loaded once and each
    (name, directory) of ``adapters`` loaded onto it under its name, none made
    current (adapters of another structure cannot share the model)."""
    from .model import FusedLlama
    from .pretrained import load_tokenizer, smollm2_path

    path = smollm2_path() if args.model == "smollm2" else args.model
    dtype = args.dtype if args.dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = FusedLlama.from_pretrained(path, dtype=dtype, device=device)
    for name, a in adapters:
        try:
            model.load_adapter(a, name=name, activate=False)
        except ValueError as e:  # another variant / rank / targets
            raise ValueError(f"--adapter {a}: {e}; run adapters of another structure in a command of "
                             f"their own") from None
    return model, load_tokenizer(path)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(p)
    p.add_argument("--adapter", action="append", default=None,
                   help="adapter directory (flora's or a PEFT LoRA's); repeat to run several in turn")
    p.add_argument("--compare", action="store_true", help="also generate with the adapter off")
    p.add_argument("--mixed", action="store_true",
                   help="every adapter (and the base, with --compare) in the same batches, each prompt "
                        "once per run: the adapters side by side on one model (stack_adapters)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--data", help='JSONL of {"prompt"} records (a "completion" is the reference answer) '
                                  'or {"messages"} conversations (a last assistant turn is the reference)')
    p.add_argument("--limit", type=int, default=None, help="only the first N records of --data")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template as the user's message")
    p.add_argument("--system", default=None,
                   help="with --chat: a system message (also before a conversation that has none)")
    add_sampling_arguments(p, max_new_tokens=128)
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    p.add_argument("--compile", action="store_true", help="decode step under torch.compile (slow first call)")
    p.add_argument("--out", default=None, help="also write the results as JSONL here")
    return p


def _prompts(args) -> list:
    from .data import load_prompts

    if args.limit is not None and (args.limit < 1 or args.data is None):
        raise ValueError(f"--limit takes an integer >= 1 and applies to --data, got {args.limit}"
                         + ("" if args.data is not None else " with --prompt"))
    if args.data is None:
        recs = [{"prompt": p, "completion": None} for p in args.prompt]
    else:
        recs = load_prompts(args.data)[:args.limit]
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    for i, r in enumerate(recs, 1):
        if args.system is not None and any(m["role"] == "system" for m in r.get("messages", ())):
            raise ValueError(f"--system: record {i} of {args.data} has a system message of its own")
    return recs


def _text(tok, rec, args) -> str:
    """A record's prompt as generation gets it: a conversation through the chat
    template (as training renders it), a prompt as it is or, with --chat, as
    the user's message."""
    from .pretrained import chat_prompt

    if "messages" in rec:
        return chat_prompt(tok, rec["messages"], args.system)
    return chat_prompt(tok, rec["prompt"], args.system) if args.chat else rec["prompt"]


def _timed(model, tok, device, prompts, gen, warm_rows, adapters=None, streamer=None):
    """complete() timed, after an untimed 2-token run of the first ``warm_rows``
    prompts (one-time costs, allocations and kernel setup, out of tokens/s):
    (completions, stats)."""
    from .pretrained import complete

    if not gen["compile"]:
        complete(model, tok, prompts[:warm_rows], **{**gen, "max_new_tokens": min(2, gen["max_new_tokens"])},
                 adapters=None if adapters is None else adapters[:warm_rows])
    t0 = time.perf_counter()
    out = complete(model, tok, prompts, adapters=adapters, streamer=streamer, **gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t0
    new = sum(c.tokens for c in out)
    st = {"seconds": round(secs, 3), "new_tokens": new, "tokens_per_s": round(new / secs, 1)}
    if gen["compile"]:
        st["note"] = "includes torch.compile's compilation of each new batch shape"
    return out, st


def run_args(args) -> dict:
    if args.compare and not args.adapter:
        raise ValueError("--compare needs --adapter (it compares the adapter on and off)")
    if args.mixed and not args.adapter:
        raise ValueError("--mixed needs --adapter (it runs several adapters in one batch)")
    if args.adapter and len({os.path.realpath(a) for a in args.adapter}) < len(args.adapter):
        raise ValueError("--adapter: the same adapter is given twice")
    if args.out is not None:  # checked before the model loads, not after generating
        out = os.path.realpath(args.out)
        if args.data is not None and out == os.path.realpath(args.data):
            raise ValueError("--out is the --data file; write the results elsewhere")
        if os.path.isdir(out) or not os.access(os.path.dirname(out) or ".", os.W_OK):
            raise ValueError(f"--out {args.out}: not a writable file path")
    from .generation import check_sampling

    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)  # before the model loads
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    recs = _prompts(args)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    names = [f"adapter{i}" for i in range(1, len(args.adapter or []) + 1)]
    model, tok = load(args, list(zip(names, args.adapter or [])), device)
    load_s = time.perf_counter() - t0
    texts = [_text(tok, r, args) for r in recs]
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
               top_p=args.top_p, top_k=args.top_k, seed=args.seed, compile=args.compile)
    # (label, adapter name or None for the base)
    runs = ([("adapter", names[0])] if len(names) == 1 else [(f"adapter{i}", n) for i, n in enumerate(names, 1)])
    runs += [("base", None)] if args.compare or not names else []
    stream = len(texts) == 1 and not args.mixed  # one prompt: its tokens print as they come
    refs = {i: r["completion"].strip() for i, r in enumerate(recs) if r["completion"] is not None}
    results, stats = {}, {}
    if args.mixed:  # one pass: each prompt once per run, next to each other in the batches
        model.stack_adapters(names)
        order = [(label, name, i) for i in range(len(texts)) for label, name in runs]
        out, stats["mixed"] = _timed(model, tok, device, [texts[i] for _, _, i in order], gen, len(runs),
                                     adapters=[n for _, n, _ in order])
        for (label, _, _), c in zip(order, out):
            results.setdefault(label, []).append(c)
    for label, name in [] if args.mixed else runs:  # one pass per run, the adapter switched between
        if name is not None:
            model.set_adapter(name)
        streamer = None
        if stream:
            from transformers import TextStreamer

            print(f"[{label}] ", end="", flush=True)
            streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        with model.disable_adapter() if name is None and names else contextlib.nullcontext():
            results[label], stats[label] = _timed(model, tok, device, texts, gen, 1, streamer=streamer)
    for label, _ in runs:
        if refs:
            stats.setdefault(label, {})["exact_match"] = \
                f"{sum(results[label][i].text == ref for i, ref in refs.items())}/{len(refs)}"
    rows = []
    for i, r in enumerate(recs):
        row = {"messages": r["messages"]} if "messages" in r else {"prompt": r["prompt"]}
        row.update({label: results[label][i].text for label, _ in runs})
        if r["completion"] is not None:
            row["reference"] = r["completion"]
        rows.append(row)
    if stream and "reference" in rows[0]:
        print(f"[reference] {rows[0]['reference']}")
    if not stream:
        for i, row in enumerate(rows):
            head = row["prompt"] if "prompt" in row else row["messages"][-1]["content"]
            print(f"=== {i + 1}/{len(rows)}: {head!r}")
            for k, v in row.items():
                if k not in ("prompt", "messages"):
                    print(f"[{k}] {v}")
    if args.out is not None:
        atomic_write_text(args.out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    labels = {label: a for (label, _), a in zip(runs, args.adapter or [])}
    summary = {"model": args.model, "adapters": labels, "device": str(device),
               "dtype": str(model.dtype).replace("torch.", ""), "prompts": len(rows),
               "load_seconds": round(load_s, 2), "runs": stats}
    sys.stdout.flush()  # the completions before the summary, also when both go to one terminal
    print(json.dumps(summary), file=sys.stderr)
    return summary
