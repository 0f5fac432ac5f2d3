"""A conversation with a model and its adapter in the terminal: ``flora chat``.

    flora chat --model DIR|FILE.gguf|smollm2 [--adapter DIR] [--system TEXT] \\
        [--max-new-tokens 256] [--temperature 0.7 --top-p 0.9 --top-k 0 --min-p 0 --seed S] \\
        [--repetition-penalty 1.1 --presence-penalty 0 --frequency-penalty 0] [--logit-bias TOKEN=BIAS ...]

Each line read is the user's turn; the reply streams as it is generated and
joins the conversation, which goes through the tokenizer's chat template as
training renders it (flora.data). ``/reset`` starts over, ``/exit`` (or the
end of the input) quits; lines may come from a pipe. When the conversation
and the next answer would pass the model's context, the oldest turns go
(the system message stays), with a notice. It runs on ``flora serve``'s
engine, whose prefix cache keeps the conversation's keys and values: a turn
prefills its new tokens only. ``--seed S``: turn k samples with seed S + k.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import threading

from .devices import resolve_device


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .inference import add_model_arguments, add_sampling_arguments

    add_model_arguments(p)
    p.add_argument("--adapter", default=None, help="adapter directory (flora's or a PEFT LoRA's)")
    p.add_argument("--system", default=None, help="a system message")
    add_sampling_arguments(p, max_new_tokens=256)
    return p


def _fit(tok, messages: list, system, context: int, room: int) -> tuple:
    """(ids [1, T], messages kept): the oldest turns dropped, a user turn and its
    answer at a time, until the prompt leaves ``room`` tokens of the context."""
    from .pretrained import chat_ids

    dropped = 0
    while True:
        ids = chat_ids(tok, messages, system)
        if ids.shape[1] + room <= context or len(messages) <= 1:
            return ids, messages, dropped
        messages, dropped = messages[2:], dropped + 2


CACHE_LEN = 4096  # the conversation's KV-cache slots at most (the model's context when smaller)


def run_args(args, stdin=None, out=None) -> None:
    from .inference import check_vocab, load, sampling_of
    from .serve import Engine, Request

    stdin, out = stdin or sys.stdin, out or sys.stdout
    sampling = sampling_of(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    model, tok = load(args, [("adapter", args.adapter)] if args.adapter else [], device)
    check_vocab(sampling, model)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{args.model}: its tokenizer has no chat template; flora chat needs an instruct model")
    context = min(model.arch.max_position_embeddings, CACHE_LEN)
    if args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context "
                         f"({context})")
    # the server's engine, one row: each turn reuses the keys and values of the conversation
    # before it (its prefix cache), so a turn costs its new tokens, not the whole history
    name = "adapter" if args.adapter else "base"
    engine = Engine(model, tok, {name: args.adapter and "adapter"}, max_batch=1, cache_len=context)
    failed: list = []

    def converse() -> None:
        messages: list = []
        interactive = stdin.isatty()
        if interactive:
            print("flora chat: /reset starts over, /exit quits", file=sys.stderr)
        try:
            for turn in itertools.count():
                if interactive:
                    out.write("> ")
                    out.flush()
                line = stdin.readline()
                if not line or line.strip() == "/exit":
                    return
                line = line.rstrip("\n")
                if line.strip() == "/reset":
                    messages = []
                    print("flora chat: a new conversation", file=sys.stderr)
                    continue
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line})
                ids, messages, dropped = _fit(tok, messages, args.system, context, args.max_new_tokens)
                if dropped:
                    print(f"flora chat: the {dropped} oldest turns left the conversation (the context is {context} "
                          f"tokens)", file=sys.stderr)
                seed = None if args.seed is None else (args.seed + turn) % 2 ** 63  # reproducible, each turn its own
                req, = engine.submit([Request(name, ids[0].tolist(), args.max_new_tokens,
                                              sampling, seed, stream=True)])
                while (ev := req.events.get())[0] == "delta":  # the reply's text as it comes
                    out.write(ev[2])
                    out.flush()
                if ev[0] == "error":
                    raise RuntimeError(ev[1])
                out.write("\n")
                out.flush()
                messages.append({"role": "assistant", "content": ev[2].strip()})
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread
            failed.append(e)
        finally:
            engine.close()

    # the engine in the main thread, the conversation in another: a thread's parallel ops run
    # slower than the main thread's on the CPU (GNU OpenMP, flora/serve.py run_args)
    talk = threading.Thread(target=converse, name="flora-chat", daemon=True)
    talk.start()
    engine.run()  # until the conversation ends (engine.close())
    talk.join()
    if failed:
        raise failed[0]
