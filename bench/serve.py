#!/usr/bin/env python
"""`flora serve` under load: completion tokens/s and request latency as concurrent clients grow.

    python bench/serve.py                                  # SmolLM2-135M, CPU, 1 / 4 / 8 clients
    python bench/serve.py --model DIR --device cuda --clients 1 8 32 --max-batch 32
    python bench/serve.py --long-tokens 128               # half the clients ask for long answers
    python bench/serve.py --conversation 6                # the prefix cache: a chat's turns, on / off
    python bench/serve.py --conversations 16 --conversation 4   # many chats under one system prompt
    python bench/serve.py --scoring 64                    # lm-eval-harness's loglikelihood requests
    python bench/serve.py --scoring 2 --scoring-words 1000 --scoring-warm --clients 8   # long contexts kept
    python bench/serve.py --long-prompt 600 --clients 6 --max-tokens 64   # a long prompt joins short chats
    python bench/serve.py --long-prompt 2000 --clients 6 --prefill-chunk 0 128 256 512   # its prefill in chunks
    python bench/serve.py --long-prompt 250 --joiners 8 --clients 4 --max-batch 12   # 8 prompts join at once
    python bench/serve.py --burst 600 --clients 7 --rounds 3     # short chats arriving with a long prompt

The server (flora.serve, in this process, on a free port) serves the base
model; each client thread sends ``--requests`` chat completions (greedy,
``--max-tokens`` new tokens, a different question each) one after another over
HTTP. The server batches them continuously (a request joins the running batch
between decode steps), so more clients should give more tokens/s at some cost
in latency per request. Reported per client count: completion tokens/s over the
wall time of the whole load, the median and the 90th percentile request
latency, and the mean number of rows a decode step ran. ``--long-tokens N``: the
even-numbered clients ask for N tokens (a long answer) and the table splits
the latency of the short requests from the long ones': a short request should
not wait for a long one to end.

``--conversation K`` measures the prefix cache instead: one client holds a
K-turn chat under a long system prompt (every turn sends the whole history,
as chat clients do), on two servers of the same model, the prefix cache on
and off (``--prefix-cache 0``), the conversations alternating between them
for ``--rounds`` rounds (the cache emptied before each). Reported per turn:
the median latency on each, their ratio, and the prompt tokens the cache
reused (usage.prompt_tokens_details.cached_tokens).

``--conversations N`` (with ``--conversation K``) measures what the prefix
cache holds when many chats share the system prompt: N clients at once, each a
K-turn chat of its own (a visitor's number in its first message) under it, on
one server with the prefix cache on (``--prefix-cache``, default 8192 tokens).
Reported: the prompt tokens sent and the share the cache gave
(cached_tokens / prompt_tokens, the hit rate), the requests that reused some,
the tokens the cache held (its peak, read after each answer, and at the end),
completion tokens/s and the wall time.

``--scoring R`` sends R requests shaped as lm-evaluation-harness's
local-completions loglikelihood requests (``--scoring-prompts`` token-id prompts
each, lm-eval's ``batch_size``, default 4: a shared context and a different
continuation, as a multiple-choice question's choices; ``--scoring-distinct``:
each its own context; ``echo``, ``logprobs: 1``, ``max_tokens: 1``, greedy) from
each of ``--clients`` threads (lm-eval's ``num_concurrent``), and reports prompts
scored a second, the prompts a scoring forward took on average and the share of
their tokens it computed (a shared context once). ``--scoring-split``: each prompt
its own request, one after another (lm-eval's ``batch_size`` 1: a question's
choices reach the server in different steps); ``--scoring-max-tokens M`` (default
1, as lm-eval's): 2 or more, an echo that generates after the prompt;
``--scoring-words W``: the contexts' words (default 120, ~150 tokens);
``--scoring-warm``: before each run, each question's first choice is scored alone
(untimed), so that the run's prompts find their contexts kept (a question's later
choices, or another task over the same documents): mostly-cached prompts.

``--long-prompt T`` measures a long prompt arriving while short chats generate:
``--clients`` threads (the first count) each send ``--requests`` short chats
(``--max-tokens``) one after another, and ``--long-after`` seconds in one more
(``--joiners N``: N more, at once) streams a completion of a T-token prompt (the
system prompt's words, as token ids, each joiner's from another word on;
``--long-max-tokens`` new tokens). Reported: the long requests' time to their
first token (median and slowest) and their median latency, the short requests' median latency and their
inter-token latency (p50 / p99 / max of the gaps between their streamed chunks:
a prefill run whole between two decode steps stalls each of them), and the
wall time of the whole load; medians over ``--rounds`` runs of each
``--prefill-chunk`` budget given (interleaved; 0: chunked prefill off). A prompt
longer than the running batch's slot joins it (the slot moves on) where every
row's answer still fits; before that change it waited for the batch to drain,
and the requests behind it too.

``--burst T`` measures short prompts arriving together with a long one: on an
idle server, ``--clients`` threads (the first count) each stream one short chat
(``--max-tokens``) and one more a completion of the T-token prompt
(``--long-max-tokens``), all sent at once and joining in one admit (the server
waits 50 ms for them, ``--batch-wait-ms``'s 5 being too short for threads
started on a busy machine; ``admits`` counts the joins, 1 when they were one),
``--rounds`` times (the chats share the chat template's start, computed once;
``--burst-plain``: the short ones completions of the questions, sharing nothing).
Reported, medians over the rounds: the short requests' median
and slowest time to first token, the long one's, and the wall time of the load.
A join prefilled as one forward padded every short prompt to the long one's
length; prefilled in groups of like length, it does not.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import threading
import time
import urllib.request
from typing import Optional

import torch

from flora import FusedLlama
from flora.pretrained import load_tokenizer, smollm2_path
from flora.serve import Engine, serving



QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 7 times 8?",
             "Say hello in Spanish.", "What do bees make?", "How many legs does a spider have?",
             "What is the opposite of hot?", "Name a planet.", "What is water made of?",
             "Which animal barks?", "What color is the sky?", "Count to five."]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run_clients(client, clients: int) -> float:
    """client(0) ... client(clients - 1), each in its own thread: the wall seconds they
    took together; a client's exception is raised here, not lost in its thread."""
    errors = []

    def run(c: int) -> None:
        try:
            client(c)
        except Exception as e:  # noqa: BLE001 - raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def load(url: str, clients: int, requests: int, max_tokens: int, long_tokens: int = 0) -> dict:
    lat, lat_long, tokens, lock = [], [], [0], threading.Lock()

    def client(c: int) -> None:
        long = long_tokens and c % 2 == 0
        for i in range(requests):
            q = QUESTIONS[(c * requests + i) % len(QUESTIONS)]
            if long:  # a question whose answer runs on (max_tokens ends it)
                q = f"Write a long, detailed story that begins with this question: {q}"
            t0 = time.perf_counter()
            out = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": q}],
                                                      "max_tokens": long_tokens if long else max_tokens,
                                                      "temperature": 0})
            with lock:
                (lat_long if long else lat).append(time.perf_counter() - t0)
                tokens[0] += out["usage"]["completion_tokens"]

    wall = run_clients(client, clients)
    lat.sort()
    out = {"clients": clients, "requests": len(lat) + len(lat_long), "tokens": tokens[0], "seconds": wall,
           "tokens_per_s": tokens[0] / wall, "latency_p50_s": statistics.median(lat),
           "latency_p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))]}
    if lat_long:
        out["long_latency_p50_s"] = statistics.median(lat_long)
    return out


SYSTEM = ("You are a careful assistant for a small science museum. Answer visitors' questions briefly "
          "and exactly. ") + " ".join(
    f"Rule {i}: {r}" for i, r in enumerate([
        "Use plain words a twelve-year-old knows.", "Give numbers with their units.",
        "If a question is about opening hours, say the museum opens at nine and closes at five.",
        "Never invent an exhibit; the exhibits are the planets hall, the insect room, the water lab, "
        "the light and color studio, and the dinosaur gallery.", "Answer in at most two sentences.",
        "When a visitor asks for directions, the planets hall is on the ground floor, the insect room and "
        "the water lab on the first floor, and the dinosaur gallery in the basement.",
        "Tickets cost eight euros for adults and four for children; under fives are free.",
        "Do not give medical or legal advice; suggest asking a member of staff instead.",
        "If you do not know, say so and suggest the information desk by the main entrance."] * 3, 1))


def conversation(url: str, system: str, turns: int, max_tokens: int) -> list:
    """One chat of ``turns`` turns (greedy): per turn (latency s, prompt tokens, cached tokens, answer)."""
    msgs, out = [{"role": "system", "content": system}], []
    for q in QUESTIONS[:turns]:
        msgs.append({"role": "user", "content": q})
        t0 = time.perf_counter()
        r = post(url + "/v1/chat/completions", {"messages": msgs, "max_tokens": max_tokens, "temperature": 0})
        u = r["usage"]
        answer = r["choices"][0]["message"]["content"]
        out.append((time.perf_counter() - t0, u["prompt_tokens"],
                    (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0), answer))
        msgs.append({"role": "assistant", "content": answer})
    return out


def conversations(url: str, engine, system: str, clients: int, turns: int, max_tokens: int) -> dict:
    """``clients`` chats of ``turns`` turns at once under ``system`` (each client's questions its
    own: its number in the first, the questions after it in turn), greedy: what the prefix cache
    gave and held."""
    totals, held, lock = [0, 0, 0, 0], [], threading.Lock()  # prompt, cached, completion tokens; requests reused

    def client(c: int) -> None:
        msgs = [{"role": "system", "content": system}]
        for t in range(turns):
            q = QUESTIONS[(c + t) % len(QUESTIONS)]
            msgs.append({"role": "user", "content": f"I am visitor number {c + 1}. {q}" if t == 0 else q})
            r = post(url + "/v1/chat/completions", {"messages": msgs, "max_tokens": max_tokens, "temperature": 0})
            u = r["usage"]
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
            with lock:
                for j, x in enumerate((u["prompt_tokens"], cached, u["completion_tokens"], cached > 0)):
                    totals[j] += x
                held.append(engine.prefix.tokens)

    wall = run_clients(client, clients)
    while engine.busy:  # the last answers are kept after their clients have them
        time.sleep(0.01)
    return {"clients": clients, "turns": turns, "requests": clients * turns, "prompt_tokens": totals[0],
            "cached_tokens": totals[1], "hit_rate": totals[1] / totals[0], "requests_reused": totals[3],
            "held_peak": max(held + [engine.prefix.tokens]), "held_end": engine.prefix.tokens,
            "capacity": engine.prefix.capacity, "completion_tokens": totals[2], "seconds": wall,
            "tokens_per_s": totals[2] / wall}


SCORING_WORDS = 120  # words of a scoring request's shared context


def scoring(url: str, tok, clients: int, requests: int, per_request: int = 4, distinct: bool = False,
            split: bool = False, max_tokens: int = 1, n_words: Optional[int] = None) -> dict:
    """lm-eval's loglikelihood requests, ``per_request`` prompts each: prompts scored a
    second. ``distinct``: each prompt its own context (a word later), none shared;
    ``split``: each prompt sent alone, one after another; ``max_tokens``: 1 as lm-eval's,
    more: an echo that generates; ``n_words``: a context's words (the system prompt's, over
    again as needed). With ``per_request`` 1, each question's first choice alone."""
    words, n_words = SYSTEM.split(), n_words or SCORING_WORDS
    words = (words * (1 + (n_words + 40 + per_request) // len(words)))[:n_words + 40 + per_request]
    done, lock = [0, 0], threading.Lock()  # prompts, their tokens

    def client(c: int) -> None:
        for i in range(requests):
            at = (c * requests + i) * (per_request if distinct else 1) % 40  # (distinct: none alike)
            ctx = [tok(" ".join(words[at + (j if distinct else 0):][:n_words]),
                       add_special_tokens=False).input_ids for j in range(per_request)]
            prompts = [x + tok(" " + q, add_special_tokens=False).input_ids
                       for x, q in zip(ctx, (QUESTIONS * per_request)[i % 8:][:per_request])]
            for part in ([[p] for p in prompts] if split else [prompts]):
                r = post(url + "/v1/completions", {"model": "base", "prompt": part, "echo": True, "logprobs": 1,
                                                   "max_tokens": max_tokens, "temperature": 0, "seed": 1234})
                assert all(ch["logprobs"]["token_logprobs"][0] is None for ch in r["choices"])
            with lock:
                done[0] += len(prompts)
                done[1] += sum(map(len, prompts))

    wall = run_clients(client, clients)
    return {"clients": clients, "prompts": done[0], "prompt_tokens": done[1], "seconds": wall,
            "prompts_per_s": done[0] / wall}


def long_ids(tok, tokens: int, shift: int = 0) -> list:
    """A ``tokens``-token prompt: the system prompt's words over again (from word ``shift`` on:
    prompts sharing no start), as token ids."""
    words = SYSTEM.split()
    words = words[shift % len(words):] + words[:shift % len(words)]
    return tok(" ".join(words * (1 + 2 * tokens // len(words))), add_special_tokens=False).input_ids[:tokens]


def stream(url: str, path: str, body: dict, t0: Optional[float] = None) -> tuple:
    """A streamed request: (seconds to its first chunk, seconds to its end) from ``t0``
    (a perf_counter time; default: when it is sent)."""
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0, first = time.perf_counter() if t0 is None else t0, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: ") and first is None:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def stream_gaps(url: str, path: str, body: dict) -> list:
    """A streamed request's chunk arrival times (perf_counter), its first at [0]."""
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    times = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                times.append(time.perf_counter())
    return times


def long_prompt(url: str, tok, clients: int, requests: int, max_tokens: int, tokens: int, after: float,
                long_max_tokens: int, joiners: int = 1) -> dict:
    """Short streamed chats from ``clients`` threads and, ``after`` seconds in, ``joiners``
    streamed completions of ``tokens``-token prompts (each its own, sent at once): their time to
    first token (median, slowest) and latency, the short requests' median latency and their
    inter-token latency (the gaps between their streamed chunks: a prefill between two steps
    stalls every one), the load's wall time."""
    ids = [long_ids(tok, tokens, 7 * j) for j in range(joiners)]
    lat, gaps, ttft, lats, lock = [], [], [], [], threading.Lock()

    def client(c: int) -> None:
        if c >= clients:  # a long one
            time.sleep(after)
            first, end = stream(url, "/v1/completions", {
                "model": "base", "prompt": ids[c - clients], "max_tokens": long_max_tokens, "temperature": 0})
            with lock:
                ttft.append(first)
                lats.append(end)
            return
        for i in range(requests):
            q = QUESTIONS[(c * requests + i) % len(QUESTIONS)]
            t0 = time.perf_counter()
            times = stream_gaps(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": q}],
                                                              "max_tokens": max_tokens, "temperature": 0})
            with lock:
                lat.append(time.perf_counter() - t0)
                gaps.extend(b - a for a, b in zip(times, times[1:]))

    wall = run_clients(client, clients + joiners)
    gaps.sort()
    return {"clients": clients, "joiners": joiners, "long_prompt_tokens": len(ids[0]),
            "long_ttft_s": statistics.median(ttft), "long_ttft_max_s": max(ttft),
            "long_latency_s": statistics.median(lats), "short_latency_p50_s": statistics.median(lat),
            "itl_p50_s": gaps[len(gaps) // 2], "itl_p99_s": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))],
            "itl_max_s": gaps[-1], "seconds": wall}


def burst(url: str, engine, tok, clients: int, max_tokens: int, tokens: int, long_max_tokens: int,
          plain: bool = False) -> dict:
    """``clients`` short chats (``plain``: completions of the questions, no chat template) and
    one ``tokens``-token prompt, streamed, sent at once to an idle server: each one's time to
    first token (from the burst's start: a thread started late counts its wait), the load's
    wall time, the joins they took."""
    ids, short, got = long_ids(tok, tokens), [], {}

    def client(c: int) -> None:
        if c == clients:
            got["ttft_s"] = stream(url, "/v1/completions", {"model": "base", "prompt": ids,
                                                            "max_tokens": long_max_tokens, "temperature": 0}, t0)[0]
        elif plain:
            short.append(stream(url, "/v1/completions", {"model": "base", "prompt": QUESTIONS[c % len(QUESTIONS)],
                                                         "max_tokens": max_tokens, "temperature": 0}, t0)[0])
        else:
            short.append(stream(url, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": QUESTIONS[c % len(QUESTIONS)]}],
                "max_tokens": max_tokens, "temperature": 0}, t0)[0])

    while engine.busy:
        time.sleep(0.01)
    b0, t0 = engine.batches, time.perf_counter()
    wall = run_clients(client, clients + 1)
    return {"short_ttft_p50_s": statistics.median(short), "short_ttft_max_s": max(short),
            "long_ttft_s": got["ttft_s"], "seconds": wall, "admits": engine.batches - b0}


def prefix_bench(model, tok, args) -> dict:
    engines = {"on": Engine(model, tok, {"base": None}, args.max_batch),
               "off": Engine(model, tok, {"base": None}, args.max_batch, prefix_cache=0)}
    runs = {"on": [], "off": []}
    with contextlib.ExitStack() as stack:
        urls = {k: stack.enter_context(serving(eng)) for k, eng in engines.items()}
        for i in range(args.rounds + 1):  # round 0: warm-up
            for k in (("on", "off") if i % 2 else ("off", "on")):
                while engines[k].busy:  # the last turn's answer is kept after its client has it
                    time.sleep(0.01)
                if engines[k].prefix is not None:
                    engines[k].prefix.clear()
                r = conversation(urls[k], args.system, args.conversation, args.max_tokens)
                if i:
                    runs[k].append(r)
    print("| turn | prompt tokens | reused | latency s, cache off | latency s, cache on | off / on | same answer |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for t in range(args.conversation):
        off = statistics.median(r[t][0] for r in runs["off"])
        on = statistics.median(r[t][0] for r in runs["on"])
        # greedy: the reused keys give the answer computing them gives (up to rounding)
        same = len({r[t][3] for r in runs["on"] + runs["off"]}) == 1
        rows.append({"turn": t + 1, "prompt_tokens": runs["on"][0][t][1], "cached_tokens": runs["on"][0][t][2],
                     "latency_off_s": off, "latency_on_s": on, "ratio": off / on, "same_answer": same})
        print(f"| {t + 1} | {runs['on'][0][t][1]} | {runs['on'][0][t][2]} | {off:.3f} | {on:.3f} | {off / on:.2f} "
              f"| {'yes' if same else 'no'} |", flush=True)
    return {"conversation": args.conversation, "rounds": args.rounds, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=4, help="per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--long-tokens", type=int, default=0, help="the even-numbered clients' max_tokens (0: all short)")
    p.add_argument("--conversation", type=int, default=0, metavar="TURNS",
                   help="measure the prefix cache: a chat of TURNS turns, cache on and off (see above)")
    p.add_argument("--conversations", type=int, default=0, metavar="N",
                   help="N chats of --conversation turns at once under the system prompt: what the prefix cache "
                        "holds (see above)")
    p.add_argument("--prefix-cache", type=int, default=8192, metavar="TOKENS",
                   help="--conversations, --scoring: its capacity")
    p.add_argument("--rounds", type=int, default=3,
                   help="--conversation: conversations on each server; --burst: bursts; --long-prompt: runs of "
                        "each --prefill-chunk")
    p.add_argument("--system", default=SYSTEM, help="--conversation: the system prompt (default: ~600 tokens)")
    p.add_argument("--scoring", type=int, default=0, metavar="R",
                   help="lm-eval-harness loglikelihood requests a client (see above)")
    p.add_argument("--scoring-prompts", type=int, default=4, metavar="N",
                   help="--scoring: prompts a request (lm-eval's batch_size)")
    p.add_argument("--scoring-distinct", action="store_true",
                   help="--scoring: each prompt its own context (default: a request's prompts share one)")
    p.add_argument("--scoring-split", action="store_true",
                   help="--scoring: each prompt its own request, one after another (lm-eval's batch_size 1)")
    p.add_argument("--scoring-max-tokens", type=int, default=1, metavar="M",
                   help="--scoring: max_tokens (1 as lm-eval's; 2 or more: an echo that generates)")
    p.add_argument("--scoring-words", type=int, default=SCORING_WORDS, metavar="W",
                   help="--scoring: words of a context (default %(default)s, ~150 tokens)")
    p.add_argument("--scoring-warm", action="store_true",
                   help="--scoring: each question's first choice scored before each run, untimed (its context "
                        "kept: mostly-cached prompts)")
    p.add_argument("--long-prompt", type=int, default=0, metavar="T",
                   help="a T-token prompt arriving while short chats generate (see above)")
    p.add_argument("--long-after", type=float, default=2.0, metavar="S", help="--long-prompt: when it is sent")
    p.add_argument("--long-max-tokens", type=int, default=16, metavar="N",
                   help="--long-prompt, --burst: the long prompt's max_tokens")
    p.add_argument("--joiners", type=int, default=1, metavar="N",
                   help="--long-prompt: N long prompts (each its own) sent at once")
    p.add_argument("--prefill-chunk", type=int, nargs="+", default=None, metavar="TOKENS",
                   help="--long-prompt: the chunk budgets compared (0: off), --rounds each, interleaved "
                        "(default: the engine's)")
    p.add_argument("--burst", type=int, default=0, metavar="T",
                   help="short chats and a T-token prompt sent at once (see above)")
    p.add_argument("--burst-plain", action="store_true",
                   help="--burst: the short requests as completions of the questions (no chat template)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    path = args.model or smollm2_path()
    dev = torch.device(args.device)
    model = FusedLlama.from_pretrained(path, device=dev,
                                       dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    if args.conversations:
        engine = Engine(model, load_tokenizer(path), {"base": None}, args.max_batch, prefix_cache=args.prefix_cache)
        with serving(engine) as url:
            load(url, 1, 1, 4)  # warm-up
            while engine.busy:
                time.sleep(0.01)
            engine.prefix.clear()
            r = conversations(url, engine, args.system, args.conversations, args.conversation or 4, args.max_tokens)
        print("| chats | requests | prompt tokens | cached | hit rate | requests reused | held peak / end | "
              "capacity | completion tokens/s | seconds |\n|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
        print(f"| {r['clients']} | {r['requests']} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['hit_rate']:.1%} | "
              f"{r['requests_reused']} | {r['held_peak']} / {r['held_end']} | {r['capacity']} | "
              f"{r['tokens_per_s']:.1f} | {r['seconds']:.1f} |")
        save(args, dev, path, r)
        return
    if args.conversation:
        if not 1 <= args.conversation <= len(QUESTIONS):
            p.error(f"--conversation must be in 1 .. {len(QUESTIONS)}")
        save(args, dev, path, prefix_bench(model, load_tokenizer(path), args))
        return
    if args.burst:
        # 50 ms for the burst's threads to reach the server (one admit: `admits`)
        engine = Engine(model, load_tokenizer(path), {"base": None}, args.max_batch, prefix_cache=0, wait_s=0.05)
        with serving(engine) as url:
            burst(url, engine, engine.tok, args.clients[0], 4, min(64, args.burst), 4)  # warm-up
            runs = [burst(url, engine, engine.tok, args.clients[0], args.max_tokens, args.burst,
                          args.long_max_tokens, args.burst_plain) for _ in range(args.rounds)]
        r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        r.update(clients=args.clients[0], long_prompt_tokens=args.burst, rounds=args.rounds, plain=args.burst_plain,
                 admits=[x["admits"] for x in runs])
        print("| clients | long prompt tokens | short: first token p50 s | short: first token max s | "
              "long: first token s | seconds | admits |\n|---:|---:|---:|---:|---:|---:|---|")
        print(f"| {r['clients']} | {r['long_prompt_tokens']} | {r['short_ttft_p50_s']:.2f} | "
              f"{r['short_ttft_max_s']:.2f} | {r['long_ttft_s']:.2f} | {r['seconds']:.2f} | {r['admits']} |")
        save(args, dev, path, r)
        return
    engine = Engine(model, load_tokenizer(path), {"base": None}, args.max_batch, prefix_cache=args.prefix_cache)
    if args.long_prompt:
        chunks = args.prefill_chunk or [engine.prefill_chunk]
        runs = {c: [] for c in chunks}
        with serving(engine) as url:
            load(url, 1, 1, 4)  # warm-up
            for _ in range(args.rounds):  # the chunk budgets interleaved, round by round
                for c in chunks:
                    while engine.busy:
                        time.sleep(0.01)
                    if engine.prefix is not None:  # the long prompt computed each time
                        engine.prefix.clear()
                    engine.prefill_chunk = c  # read at each admission
                    runs[c].append(long_prompt(url, engine.tok, args.clients[0], args.requests, args.max_tokens,
                                               args.long_prompt, args.long_after, args.long_max_tokens,
                                               args.joiners))
        rows = [{**{k: statistics.median(x[k] for x in runs[c]) for k in runs[c][0]}, "prefill_chunk": c,
                 "rounds": args.rounds} for c in chunks]
        print("| prefill chunk | clients | long prompts x tokens | long: first token p50 / max s | long: latency s | "
              "short latency p50 s | short inter-token p50 / p99 / max s | seconds |\n"
              "|---:|---:|---:|---|---:|---:|---|---:|")
        for r in rows:
            print(f"| {r['prefill_chunk'] or 'off'} | {r['clients']} | {args.joiners} x {r['long_prompt_tokens']} | "
                  f"{r['long_ttft_s']:.2f} / {r['long_ttft_max_s']:.2f} | {r['long_latency_s']:.2f} | "
                  f"{r['short_latency_p50_s']:.2f} | "
                  f"{r['itl_p50_s']:.3f} / {r['itl_p99_s']:.3f} / {r['itl_max_s']:.3f} | {r['seconds']:.1f} |")
        save(args, dev, path, {**rows[0], "rows": rows})
        return
    if args.scoring:
        with serving(engine) as url:
            scoring(url, engine.tok, 1, 1, n_words=args.scoring_words)  # warm-up
            def count() -> list:
                return [getattr(engine, k, 0) for k in ("score_forwards", "score_rows", "score_tokens")]

            rows = []
            for c in args.clients:
                while engine.busy:  # (a row's answer and prompt are kept after its client has them)
                    time.sleep(0.01)
                if getattr(engine, "prefix", None) is not None:  # each run from an empty prefix cache: the
                    engine.prefix.clear()  # warm-up's and earlier runs' contexts are the same
                if args.scoring_warm:  # each question's first choice (its context kept), untimed
                    scoring(url, engine.tok, c, args.scoring, 1, n_words=args.scoring_words)
                before = count()
                r = scoring(url, engine.tok, c, args.scoring, args.scoring_prompts, args.scoring_distinct,
                            args.scoring_split, args.scoring_max_tokens, args.scoring_words)
                forwards, rows_, tokens = (a - b for a, b in zip(count(), before))
                # (an engine that scores a prompt a forward, every token of it, counts none)
                r["prompts_per_forward"] = rows_ / forwards if forwards else 1.0
                r["computed_share"] = tokens / r["prompt_tokens"] if forwards else 1.0
                rows.append(r)
        print("| clients | prompts | prompts scored / s | prompts a forward | tokens computed |\n"
              "|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['clients']} | {r['prompts']} | {r['prompts_per_s']:.1f} | {r['prompts_per_forward']:.1f} | "
                  f"{r['computed_share']:.0%} |")
        save(args, dev, path, {"scoring": args.scoring, "scoring_prompts": args.scoring_prompts,
                               "scoring_distinct": args.scoring_distinct, "scoring_split": args.scoring_split,
                               "scoring_max_tokens": args.scoring_max_tokens, "rows": rows})
        return
    with serving(engine) as url:
        load(url, 1, 1, 4)  # warm-up: first-call costs out of the figures
        rows = []
        short = "short " if args.long_tokens else ""
        print(f"| clients | requests | completion tokens/s | {short}latency p50 s | {short}latency p90 s | "
              f"{'long latency p50 s | ' if args.long_tokens else ''}rows a step |")
        print("|---:|---:|---:|---:|---:|" + ("---:|" if args.long_tokens else "") + "---:|")
        for c in args.clients:
            s0, r0 = getattr(engine, "steps", 0), getattr(engine, "row_steps", 0)
            r = load(url, c, args.requests, args.max_tokens, args.long_tokens)
            r["rows_per_step"] = (getattr(engine, "row_steps", 0) - r0) / max(getattr(engine, "steps", 0) - s0, 1)
            rows.append(r)
            print(f"| {c} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} | "
                  f"{r['latency_p90_s']:.2f} | " + (f"{r['long_latency_p50_s']:.2f} | " if args.long_tokens else "")
                  + f"{r['rows_per_step']:.1f} |", flush=True)
    save(args, dev, path, {"long_tokens": args.long_tokens, "rows": rows})


def save(args, dev, path, result: dict) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(dev), "cpu": platform.processor() or platform.machine(),
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "model": str(path),
                       "max_tokens": args.max_tokens, **result}, f, indent=1)


if __name__ == "__main__":
    main()
