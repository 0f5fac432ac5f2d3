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

What is kept: each admitted prompt, and each finished request's prompt and
answer (the next turn of a conversation starts with both), as one entry of
its whole blocks; an entry whose tokens a newer one extends is dropped, and
the least recently used go beyond ``capacity`` tokens in all. Keys and values
that are not all finite are never kept (a NaN at one position reaches the
keys before it through attention's masked weights, 0 x NaN).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Callable, Optional

from torch import Tensor

BLOCK = 16  # tokens per matched block


class _Entry:
    __slots__ = ("id", "tokens", "kv", "keys")
    _ids = itertools.count()

    def __init__(self, tokens: tuple, kv: Tensor, keys: list):
        self.id = next(self._ids)
        self.tokens, self.kv, self.keys = tokens, kv, keys  # kv [layers, 2, kv_heads, len(tokens), hd]


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
        self._entries.move_to_end(e.id)
        self.hits += 1
        self.reused += n
        return e.kv, n

    def insert(self, model, tokens: list, read: Callable[[int], Tensor]) -> None:
        """Keep ``tokens``' whole blocks for ``model``; ``read(n)``: their keys
        and values [layers, 2, kv_heads, n, hd], called only when not kept yet."""
        n = len(tokens) // BLOCK * BLOCK
        if n == 0 or n > self.capacity:
            return
        keys = [(model, h) for h in self._chain(model, tokens, n // BLOCK)]
        kept = self._holding(keys[-1], tokens[:n])
        if kept is not None:
            self._entries.move_to_end(kept.id)
            return
        kv = read(n)
        # a NaN or inf at one position reaches the keys of positions before it (blocked causal attention
        # weighs the masked future keys 0, and 0 x NaN is NaN): not what the prefix alone computes
        if not bool(kv.isfinite().all()):
            return
        e = _Entry(tuple(tokens[:n]), kv, keys)
        for k in keys:
            ids = self._index.setdefault(k, {})
            for old in [self._entries[i] for i in ids]:
                # an entry the new one extends (its tokens all a prefix of these) is dropped
                if len(old.tokens) <= n and e.tokens[:len(old.tokens)] == old.tokens:
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
