"""Generate with a model and an adapter from the command line: the logic behind
``flora generate``, the step after ``flora train``.

    flora generate --model DIR|FILE.gguf|smollm2 [--adapter OUT/adapter ...] [--compare] \\
        (--prompt TEXT ... | --data prompts.jsonl [--limit N]) [--chat] \\
        [--max-new-tokens 128] [--temperature T --top-p P --top-k K --min-p P --seed S] \\
        [--repetition-penalty R --presence-penalty P --frequency-penalty F] [--logit-bias TOKEN=BIAS ...] \
        [--batch-size 8] [--out FILE.jsonl]

Prompts are tokenized as ``flora train`` tokenizes them, so a training or
evaluation JSONL works as it is; when its records carry a ``completion``
(or a conversation ends with an assistant turn), the exact-match rate against
it is reported. ``--compare`` also generates
with the adapter off (the base model, same weights). Several ``--adapter``
(of one variant, rank and targets) share the model and are switched between
runs, as a server would switch them (only adapter tensors are copied). One prompt streams its
tokens as they come; timing goes to stderr, the completions to stdout and,
with ``--out``, to a JSONL file written atomically, in the order of the prompts. ``--mixed`` runs them all
in the same batches instead (each row its own adapter: a multi-adapter server's batches).

The prompts run on ``flora serve``'s engine (flora.serve.Engine): up to
``--batch-size`` rows decode together, a row that ends (its EOS or
``--max-new-tokens``) gives its place to the next prompt between two decode
steps (continuous batching: no steps for rows already done), and a prompt
that starts as an earlier one did (a shared system prompt, few-shot examples)
copies that prefix's keys and values from the prefix cache and computes only
the rest (the first rows, starting together, compute their shared start once:
one of them, the others copying it from its row). ``--compile`` keeps static
batches (:func:`flora.pretrained.complete`): the engine's decode steps are eager
(their row count changes as rows come and go, a compiled shape each).

``--seed S``: prompt i (counted from 0, in the file's order) samples with a
generator of its own, seeded S + i, so its text depends on its prompt, S and
i only, not on ``--batch-size`` or the prompts beside it (up to the float
rounding that a batch's shapes change, as for greedy tokens): ``--prompt TEXT
--seed S+i`` gives it alone; ``--compare``'s runs use the same seeds. Under
``--compile`` a static batch samples from one generator seeded S, its rows'
draws depending on each other.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import sys
import time
import warnings

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
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than min-p x the most likely (0: none)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="over the prompt's and answer's tokens: a logit > 0 divided by it, else multiplied "
                        "(1: none; vLLM's, transformers')")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of each token the answer holds (-2 .. 2; OpenAI's)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="x its count in the answer, subtracted from each token's logit (-2 .. 2; OpenAI's)")
    p.add_argument("--logit-bias", nargs="+", action="extend", default=None, metavar="TOKEN=BIAS",
                   help="added to a token id's logit before sampling (-100 .. 100; -100 bans it, 100 all but "
                        "forces it; OpenAI's logit_bias); repeatable")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def _logit_bias(items) -> "dict | None":
    """--logit-bias TOKEN=BIAS ... -> {token id: bias}, or ValueError naming the item."""
    if not items:
        return None
    out: dict = {}
    for item in items:
        tok, sep, bias = item.partition("=")
        try:
            t, v = int(tok), float(bias)
        except ValueError:
            t = v = None
        if not sep or t is None or t < 0 or not math.isfinite(v) or not -100 <= v <= 100:
            raise ValueError(f"--logit-bias {item!r}: expected TOKEN=BIAS, a token id >= 0 and a number in "
                             f"[-100, 100]")
        if t in out:
            raise ValueError(f"--logit-bias: token {t} is given twice")
        out[t] = v
    return out


def sampling_of(args):
    """The sampling settings of add_sampling_arguments' flags, checked (before a model loads;
    :func:`check_vocab` checks --logit-bias's token ids once it has)."""
    from .generation import Sampling, check_sampling, check_seed

    s = Sampling(args.temperature, args.top_p, args.top_k, args.min_p, args.repetition_penalty,
                 args.presence_penalty, args.frequency_penalty, _logit_bias(getattr(args, "logit_bias", None)))
    check_sampling(args.max_new_tokens, s)
    check_seed(args.seed)
    return s


def check_vocab(sampling, model) -> None:
    """--logit-bias's token ids lie in the loaded model's vocabulary (ValueError naming the flag)."""
    from .generation import check_sampling

    try:
        check_sampling(0, sampling, model.arch.vocab_size)
    except ValueError as e:
        raise ValueError(f"--{e}".replace("--logit_bias", "--logit-bias", 1)) from None


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
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows generated together at most (a row that ends takes the next prompt)")
    p.add_argument("--compile", action="store_true",
                   help="decode step under torch.compile (slow first call), in static left-padded batches")
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


CACHE_LEN = 2048  # the engine's KV-cache slots a row (flora serve's default) unless a prompt needs more


def _prompt_ids(model, tok, texts: list, args) -> list:
    """Each prompt's token ids, checked against the model's context; a warning where
    --max-new-tokens passes it (those prompts generate up to the context)."""
    from .data import prompt_ids

    context, M = model.arch.max_position_embeddings, args.max_new_tokens
    ids, capped = [prompt_ids(tok, t) for t in texts], 0
    for i, x in enumerate(ids, 1):
        where = f"record {i} of {args.data}" if args.data is not None else f"--prompt {i}"
        if not x:
            raise ValueError(f"{where}: the prompt is empty (no tokens)")
        if len(x) + min(M, 1) > context:
            raise ValueError(f"{where}: a prompt of {len(x)} tokens leaves no room in the model's context "
                             f"({context} positions)")
        capped += len(x) + M > context
    if capped:
        warnings.warn(f"max_new_tokens={M}: {capped} prompt(s) would pass the model's context ({context} "
                      f"positions); each generates up to it", stacklevel=2)
    return ids


class _Printing(queue.Queue):
    """A request's events queue that prints its streamed text as the engine puts it."""

    def put(self, item, block=True, timeout=None):
        if item[0] == "delta":
            print(item[2], end="", flush=True)
        super().put(item, block, timeout)


def _serve(engine, reqs: list) -> list:
    """``reqs`` answered by ``engine``, whose loop runs here (Engine.run; not in a
    thread: on a 2-core CPU the main thread's parallel ops ran ~20% faster): each one's
    ("done", ...) event, in order. They are all queued before it starts, so its
    batches do not depend on timing: the first ``max_batch`` start together, the
    next join as rows free."""
    engine.submit(reqs)
    engine.close()  # the loop returns once they are all answered (the model's state restored)
    engine.run()
    events, done = reqs[0].events, [None] * len(reqs)
    while not events.empty():
        ev = events.get()
        if ev[0] == "error":
            raise RuntimeError(f"flora generate: {ev[1]}")
        if ev[0] == "done":
            done[ev[1]] = ev
    return done


def _continuous(model, tok, device, ids: list, jobs: list, names: dict, args, stream: bool, warm: int):
    """The completions of ``jobs`` ([(label, prompt index)]) on one engine serving
    ``names`` (label -> adapter name, None: the base; side by side with ``--mixed``),
    timed after an untimed 2-token pass of the first ``warm`` jobs (one-time costs
    out of tokens/s): (completions, stats)."""
    from .generation import seed_plus
    from .pretrained import Completion
    from .serve import Engine, Request

    context, M, mixed = model.arch.max_position_embeddings, args.max_new_tokens, args.mixed
    sampling = sampling_of(args)

    def requests(jobs, max_tokens, cache_len, stream=False):
        events = _Printing() if stream else queue.Queue()
        return [Request(model=label, prompt=ids[i], max_tokens=min(max_tokens, cache_len - len(ids[i])),
                        sampling=sampling, seed=seed_plus(args.seed, i),
                        stream=stream, events=events, index=j) for j, (label, i) in enumerate(jobs)]

    n = min(context, max(len(ids[i]) for _, i in jobs[:warm]) + 2)
    _serve(Engine(model, tok, names, max_batch=warm, mixed=mixed, cache_len=n, prefix_cache=0),
           requests(jobs[:warm], min(2, M), n))
    # a row holds any prompt and its whole answer; a batch's slots only advance, so room for
    # about four of them lets prompts join it longer before it drains (rows idle at its end)
    need = max(len(x) for x in ids) + M
    n = min(context, max(need, min(CACHE_LEN, 4 * need)))
    # prefill_chunk 0: offline, no client waits on a running row's next token, and a prompt in chunks
    # costs more in all (each chunk a forward, reading the keys before it: bench/RESULTS.md "Chunked prefill")
    engine = Engine(model, tok, names, max_batch=args.batch_size, mixed=mixed, cache_len=n, prefill_chunk=0)
    reqs = requests(jobs, M, n, stream)
    t0 = time.perf_counter()
    done = _serve(engine, reqs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t0
    out = [Completion(ev[2].strip(), ev[4]) for ev in done]
    new = sum(c.tokens for c in out)
    return out, {"seconds": round(secs, 3), "new_tokens": new, "tokens_per_s": round(new / secs, 1),
                 "prompts_per_s": round(len(out) / secs, 2),
                 "prompt_tokens": sum(len(r.prompt) for r in reqs),
                 "cached_prompt_tokens": sum(r.cached for r in reqs),  # the prefix cache's, not computed
                 "rows_per_step": round(engine.row_steps / max(engine.steps, 1), 2)}


def _static(model, tok, device, texts, gen, runs, names, args, stream):
    """--compile: each run in static left-padded batches (flora.pretrained.complete),
    each batch until its longest answer ends: (results, stats) by label."""
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
    return results, stats


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
    sampling = sampling_of(args)  # checked before the model loads
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    recs = _prompts(args)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    names = [f"adapter{i}" for i in range(1, len(args.adapter or []) + 1)]
    model, tok = load(args, list(zip(names, args.adapter or [])), device)
    check_vocab(sampling, model)
    load_s = time.perf_counter() - t0
    texts = [_text(tok, r, args) for r in recs]
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, compile=args.compile,
               **vars(sampling))
    # (label, adapter name or None for the base)
    runs = ([("adapter", names[0])] if len(names) == 1 else [(f"adapter{i}", n) for i, n in enumerate(names, 1)])
    runs += [("base", None)] if args.compare or not names else []
    stream = len(texts) == 1 and not args.mixed  # one prompt: its tokens print as they come
    refs = {i: r["completion"].strip() for i, r in enumerate(recs) if r["completion"] is not None}
    if args.compile:  # static batches (the engine's steps are not compiled)
        results, stats = _static(model, tok, device, texts, gen, runs, names, args, stream)
    else:
        ids = _prompt_ids(model, tok, texts, args)
        results, stats = {}, {}
        if args.mixed:  # one pass: each prompt once per run, next to each other in the batches
            jobs = [(label, i) for i in range(len(ids)) for label, _ in runs]
            out, stats["mixed"] = _continuous(model, tok, device, ids, jobs, dict(runs), args, False, len(runs))
            for (label, _), c in zip(jobs, out):
                results.setdefault(label, []).append(c)
        for label, name in [] if args.mixed else runs:  # one pass per run, the adapter switched between
            if stream:
                print(f"[{label}] ", end="", flush=True)
            jobs = [(label, i) for i in range(len(ids))]
            results[label], stats[label] = _continuous(model, tok, device, ids, jobs, {label: name}, args, stream, 1)
            if stream:
                print(flush=True)
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
