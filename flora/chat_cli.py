"""A conversation with a model and its adapter in the terminal: ``flora chat``.

    flora chat --model DIR|FILE.gguf|smollm2 [--adapter DIR] [--system TEXT] \\
        [--max-new-tokens 256] [--temperature 0.7 --top-p 0.9 --top-k 0 --seed S]

Each line read is the user's turn; the reply streams as it is generated and
joins the conversation, which goes through the tokenizer's chat template as
training renders it (flora.data). ``/reset`` starts over, ``/exit`` (or the
end of the input) quits; lines may come from a pipe. When the conversation
and the next answer would pass the model's context, the oldest turns go
(the system message stays), with a notice.
"""
from __future__ import annotations

import argparse
import sys

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


def run_args(args, stdin=None, out=None) -> None:
    import torch

    from .generation import _eos_set, check_sampling
    from .inference import load

    stdin, out = stdin or sys.stdin, out or sys.stdout
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    model, tok = load(args, [("adapter", args.adapter)] if args.adapter else [], device)
    if args.adapter:
        model.set_adapter("adapter")
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{args.model}: its tokenizer has no chat template; flora chat needs an instruct model")
    context = model.arch.max_position_embeddings
    if args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context "
                         f"({context})")
    generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
    messages: list = []
    interactive = stdin.isatty()
    if interactive:
        print("flora chat: /reset starts over, /exit quits", file=sys.stderr)
    while True:
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
            print(f"flora chat: the {dropped} oldest turns left the conversation (the context is {context} tokens)",
                  file=sys.stderr)
        reply: list = []
        shown = [""]

        def put(tokens):  # the reply's text as its tokens come (a character split over tokens waits)
            reply.append(int(tokens[0]))
            text = tok.decode(reply, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                out.write(text[len(shown[0]):])
                out.flush()
                shown[0] = text

        new = model.generate(ids.to(device), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, generator=generator, streamer=put)
        eos = set(_eos_set(model.generation_eos_token_id))
        row = new[0, ids.shape[1]:].tolist()
        row = row[:next((i for i, t in enumerate(row) if t in eos), len(row))]
        text = tok.decode(row, skip_special_tokens=True)
        out.write(text[len(shown[0]):] + "\n")
        out.flush()
        messages.append({"role": "assistant", "content": text.strip()})
