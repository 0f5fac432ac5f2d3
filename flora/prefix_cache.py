"""Prompt-prefix reuse for continuous batching (``flora serve``): the keys and
values of prompts already computed, kept so that a later prompt starting with
the same tokens copies them in and computes only the rest
(:meth:`flora.generation.Decoder.admit` with ``reused``).

A conversation sends its whole history at every turn, and requests of one
application share a system prompt or few-shot examples: their prefill is then
mostly work done before. Prefixes are matched in whole blocks of ``BLOCK``
tokens (as vLLM's automatic prefix caching does), each block keyed by a hash
of itself and every block before it; a hit is checked token by token. Keys are
per served model (an adapter's keys and values are its own), never across.

What is kept: each admitted prompt, each finished request's prompt and
answer (the next turn of a conversation starts with both), and what a scoring
forward computed (``echo`` with logprobs: flora.serve.Engine._score_forward),
as one entry of its whole blocks; an entry whose tokens a newer one extends is
dropped, and the least recently used go beyond ``capacity`` tokens in all.
Keys and values that are not all finite are never kept (a NaN at one position
reaches the keys before it through attention's masked weights, 0 x NaN).

A scoring forward reports every prompt token's logprob, and the keys and
values of a prefix do not give those of its tokens: an entry a scoring forward
made also keeps its *scores* (:meth:`lookup_scored`), per token after the
first its logprob and the k most likely alternatives' (ids and logprobs), so
that a later prompt scored from it computes only its rest. An entry a
generating row made has none (a prefill computes no logprobs), and scoring
reuses no prefix from it; one that extends an entry with scores takes them over.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Callable, Optional

from torch import Tensor

BLOCK = 16  # tokens per matched block


def common_length(a, b) -> int:
    """How many first tokens ``a`` and ``b`` share: a binary search of slice comparisons
    (each compared in C; a token at a time in Python cost ~0.1 ms for 2048 tokens)."""
    if type(a) is not type(b):
        a, b = tuple(a), tuple(b)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _rows(scores: Optional[tuple]) -> tuple:
    """(tokens scored, alternatives a token) of an entry's scores, for picking the better."""
    return (0, -1) if scores is None else (scores[1].shape[0], scores[1].shape[1])


class _Entry:
    __slots__ = ("id", "tokens", "kv", "keys", "scores")
    _ids = itertools.count()

    def __init__(self, tokens: tuple, kv: Tensor, keys: list, scores: Optional[tuple] = None):
        self.id = next(self._ids)
        self.tokens, self.kv, self.keys = tokens, kv, keys  # kv [layers, 2, kv_heads, len(tokens), hd]
        # None, or (values [m, 1 + k] fp32, ids [m, k]): row j is token j + 1's logprob and its k most
        # likely alternatives' (values), m <= len(tokens) - 1 (the next token is not the entry's)
        self.scores = scores


class PrefixCache:
    def __init__(self, capacity: int):
        self.capacity = capacity  # tokens kept at most, all entries together
        self.tokens = 0
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()  # id -> entry, least recently used first
        # (model, block chain hash) -> {entry id: None}: the entries holding that prefix, newest last
        self._index: dict = {}
        self.hits = 0  # prompts that reused a prefix
        self.reused = 0  # prompt tokens found kept (a joining batch may recompute some: Request.cached)

    @staticmethod
    def _chain(model, tokens, n_blocks: int):
        h = hash(model)
        for j in range(n_blocks):
            h = hash((h, tuple(tokens[j * BLOCK:(j + 1) * BLOCK])))
            yield h

    def lookup(self, model, tokens: list) -> Optional[tuple]:
        """(kv, c): the keys and values of the longest kept prefix of ``tokens``
        for ``model`` in whole blocks, c tokens, at least one token left to
        compute; None when none is kept."""
        best = None
        for j, h in enumerate(self._chain(model, tokens, (len(tokens) - 1) // BLOCK)):
            n = (j + 1) * BLOCK
            e = self._holding((model, h), tokens[:n])
            if e is None:
                break
            best = (e, n)
        if best is None:
            return None
        e, n = best
        return self._hit(e, n)[0], n

    def lookup_scored(self, model, tokens: list, k: int, most: int) -> Optional[tuple]:
        """(kv, scores, c) for a prompt to score: the keys and values of its first c
        tokens and the scores of its tokens 1 .. c (``scores[0][:c]``, ``scores[1][:c]``,
        at least k alternatives a token), from the kept entry that gives the most,
        1 <= c <= ``most`` (any length, not whole blocks: the entry's c-th token,
        whose logprob is kept, is the prompt's too); None when none is kept."""
        if len(tokens) <= BLOCK or most < 1:
            return None
        best, c = None, 0
        for i in self._index.get((model, next(self._chain(model, tokens, 1))), ()):
            e = self._entries[i]
            if e.scores is not None and e.scores[1].shape[1] >= k:
                n = min(common_length(e.tokens, tokens) - 1, e.scores[1].shape[0], most)
                if n > c:
                    best, c = e, n
        if best is None:
            return None
        return (*self._hit(best, c), c)

    def _hit(self, e: _Entry, n: int) -> tuple:
        self._entries.move_to_end(e.id)
        self.hits += 1
        self.reused += n
        return e.kv, e.scores

    def wants(self, model, tokens: list) -> bool:
        """Whether :meth:`insert` of ``tokens`` would read their keys and values."""
        n = len(tokens) // BLOCK * BLOCK
        return 0 < n <= self.capacity and self._holding(
            (model, list(self._chain(model, tokens, n // BLOCK))[-1]), tokens[:n]) is None

    def insert(self, model, tokens: list, read: Optional[Callable[[int], Tensor]],
               scores: Optional[tuple] = None) -> None:
        """Keep ``tokens``' whole blocks for ``model``; ``read(n)``: their keys
        and values [layers, 2, kv_heads, n, hd], called only when not kept yet
        (None: only the scores, where kept already). ``scores``: a scoring
        forward's (values [m, 1 + k] fp32, ids [m, k]) of tokens 1 .. m, kept with
        them (as many rows as the whole blocks hold), or given to the entry that
        holds them, where they score more of it."""
        n = len(tokens) // BLOCK * BLOCK
        if n == 0 or n > self.capacity:
            return
        if scores is not None:
            scores = (scores[0][:n - 1], scores[1][:n - 1])
            if not bool(scores[0].isfinite().all()):  # as below: not what the prefix alone scores
                return
        keys = [(model, h) for h in self._chain(model, tokens, n // BLOCK)]
        kept = self._holding(keys[-1], tokens[:n])
        if kept is not None:
            self._entries.move_to_end(kept.id)
            if _rows(scores) > _rows(kept.scores):
                kept.scores = scores
            return
        if read is None:
            return
        kv = read(n)
        # a NaN or inf at one position reaches the keys of positions before it (blocked causal attention
        # weighs the masked future keys 0, and 0 x NaN is NaN): not what the prefix alone computes
        if not bool(kv.isfinite().all()):
            return
        e = _Entry(tuple(tokens[:n]), kv, keys, scores)
        for k in keys:
            ids = self._index.setdefault(k, {})
            for old in [self._entries[i] for i in ids]:
                # an entry the new one extends (its tokens all a prefix of these) is dropped, its
                # scores (a prefix's: valid for these) taken over where they score more
                if len(old.tokens) <= n and e.tokens[:len(old.tokens)] == old.tokens:
                    if _rows(old.scores) > _rows(e.scores):
                        e.scores = old.scores
                    self._drop(old)
            self._index.setdefault(k, {})[e.id] = None
        self._entries[e.id] = e
        self.tokens += n
        while self.tokens > self.capacity:
            self._drop(next(iter(self._entries.values())))

    def _holding(self, key, tokens: list) -> Optional[_Entry]:
        """The newest entry under ``key`` whose tokens start with ``tokens`` (a hash
        is not a proof)."""
        t = tuple(tokens)
        for i in reversed(self._index.get(key, ())):
            e = self._entries[i]
            if e.tokens[:len(t)] == t:
                return e
        return None

    def _drop(self, e: _Entry) -> None:
        if self._entries.pop(e.id, None) is None:
            return
        self.tokens -= len(e.tokens)
        for k in e.keys:
            ids = self._index[k]
            del ids[e.id]
            if not ids:
                del self._index[k]

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.tokens = 0
