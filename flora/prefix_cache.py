"""Prompt-prefix reuse for continuous batching (``flora serve``): the keys and
values of prompts already computed, kept so that a later prompt starting with
the same tokens copies them in and computes only the rest
(:meth:`flora.generation.Decoder.admit` with ``reused``).

A conversation sends its whole history at every turn, and requests of one
application share a system prompt or few-shot examples: their prefill is then
mostly work done before. Prompts are kept and matched in whole blocks of
``BLOCK`` tokens, each block once, shared by every prompt that starts with it
(vLLM's automatic prefix caching, SGLang's radix cache): a block is keyed by its
model and a hash of its tokens and every block's before it, and holds its keys
and values [layers, 2, kv_heads, BLOCK, hd]; a lookup walks a prompt's chain of
blocks, each checked exactly (its tokens, and the block before it), and gives
the kept blocks' keys and values as a list (:func:`flora.generation.kv_slots`
joins only those a copy needs). Keys are per served model (an adapter's keys and
values are its own), never across, and per cache salt (vLLM's ``cache_salt``: its first
block's hash holds the salt, vllm/v1/core/kv_cache_utils.py, so that prompts of another
salt share no block and cannot time what is kept).

What is kept: each admitted prompt, each finished request's prompt and
answer (the next turn of a conversation starts with both), and what a scoring
forward computed (``echo`` with logprobs: flora.serve.Engine._score_forward),
the blocks not kept yet. ``capacity`` bounds the tokens of all blocks together;
beyond it the least recently used block that no kept block extends goes (a
block is used whenever a prompt that holds it is looked up or kept, and its
ancestors with it: leaves first). A prompt longer than the capacity keeps its
first blocks, as many as it holds (the others all go). Eviction never takes
from a running request: a row copies a prefix's keys and values in when it
joins, and a scoring forward holds the tensors of the blocks it reuses. Keys and values that are not all finite are
never kept (a NaN at one position reaches the keys before it through
attention's masked weights, 0 x NaN).

A scoring forward reports every prompt token's logprob, and the keys and
values of a prefix do not give those of its tokens: a block a scoring forward
kept (or that one scored later) also holds its tokens' *scores*
(:meth:`lookup_scored`), per token its logprob and the k most likely
alternatives' (ids and logprobs; the first block's first token has none), so
that a later prompt scored from it computes only its rest. A block a
generating row kept has none (a prefill computes no logprobs), and scoring
reuses no prefix through it. Scores that are not all finite are never kept.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch
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


def _scored(b: "_Block", k: int) -> bool:
    return b.scores is not None and b.scores[1].shape[1] >= k


class _Block:
    __slots__ = ("key", "tokens", "kv", "parent", "children", "scores")

    def __init__(self, key, tokens: tuple, kv: Tensor, parent: Optional["_Block"]):
        self.key, self.tokens, self.kv, self.parent = key, tokens, kv, parent  # kv [layers, 2, kv_heads, BLOCK, hd]
        self.children: dict = {}  # key -> the kept blocks that extend this one
        # None, or (values [m, 1 + k] fp32, ids [m, k]): row j is the score of this block's token j (block 0:
        # token j + 1; its first has none), its logprob and its k most likely alternatives' (values)
        self.scores = None


class PrefixCache:
    def __init__(self, capacity: int):
        self.capacity = capacity  # tokens kept at most, all blocks together
        # (model, chain hash) -> block, least recently used first: a block's ancestors always after it
        self._blocks: "OrderedDict[tuple, _Block]" = OrderedDict()
        self.hits = 0  # prompts that reused a prefix
        self.reused = 0  # prompt tokens found kept (a joining batch may recompute some: Request.cached)

    @property
    def tokens(self) -> int:
        """Tokens kept: distinct blocks', each once however many prompts share it."""
        return len(self._blocks) * BLOCK

    @staticmethod
    def _keys(model, tokens, n_blocks: int, salt: Optional[str] = None):
        """(key, tokens) of ``tokens``' first ``n_blocks`` blocks: key (model, salt, hash of the block
        and every block before it; the first's with the salt). The salt is in every key, so it is
        compared exactly, not only hashed."""
        h = hash(model) if salt is None else hash((model, salt))
        for j in range(n_blocks):
            t = tuple(tokens[j * BLOCK:(j + 1) * BLOCK])
            h = hash((h, t))
            yield (model, salt, h), t

    def _walk(self, keys) -> list:
        """The kept blocks that a prompt's first blocks are (``keys``: theirs, as :meth:`_keys`
        gives them), from the first on: each one's tokens and the block before it checked (a
        hash is not a proof)."""
        chain = []
        for key, t in keys:
            b = self._blocks.get(key)
            if b is None or b.tokens != t or b.parent is not (chain[-1] if chain else None):
                break
            chain.append(b)
        return chain

    def _use(self, chain: list) -> None:
        for b in reversed(chain):  # its ancestors after it: the least recently used block is a leaf
            self._blocks.move_to_end(b.key)

    def lookup(self, model, tokens: list, salt: Optional[str] = None, count: bool = True) -> Optional[tuple]:
        """(kv, c): the keys and values of the longest kept prefix of ``tokens``
        for ``model`` (and cache ``salt``), c tokens in whole blocks with at least one token left to
        compute, as a list of its blocks' [layers, 2, kv_heads, BLOCK, hd]; None
        when none is kept. ``count`` False: a look that reuses nothing yet (flora serve's
        scheduler weighing a prompt), out of :attr:`hits` and :attr:`reused`."""
        chain = self._walk(self._keys(model, tokens, (len(tokens) - 1) // BLOCK, salt))
        return self._hit(chain, len(chain) * BLOCK, count) if chain else None

    def lookup_scored(self, model, tokens: list, k: int, most: int, salt: Optional[str] = None) -> Optional[tuple]:
        """(kv, scores, c) for a prompt to score: the keys and values of its first c
        tokens (a list of blocks, as :meth:`lookup`'s) and the scores of its tokens
        1 .. c (values [c, 1 + k], ids [c, k]), from kept blocks with at least k
        alternatives a token, 1 <= c <= ``most`` (any length, not whole blocks: the
        c-th token, whose logprob is kept, is the prompt's too, in the last whole
        block it shares or in a scored block that extends it); None when none is kept."""
        if len(tokens) <= BLOCK or most < 1:
            return None
        chain = self._walk(self._keys(model, tokens, len(tokens) // BLOCK, salt))
        chain = chain[:next((j for j, b in enumerate(chain) if not _scored(b, k)), len(chain))]
        if not chain:
            return None
        n, best, share = len(chain) * BLOCK, None, 0
        rest = tuple(tokens[n:n + BLOCK])
        for b in chain[-1].children.values():  # a block the prompt shares some first tokens of
            j = common_length(b.tokens, rest) if _scored(b, k) else 0
            if j > share:
                best, share = b, j
        c = min(n + share - 1, most)
        chain = (chain + [best] if best is not None else chain)[:c // BLOCK + 1]  # those scoring tokens 1 .. c
        kv, _ = self._hit(chain, c)
        values = torch.cat([b.scores[0][:, :k + 1] for b in chain])[:c]
        ids = torch.cat([b.scores[1][:, :k] for b in chain])[:c]
        return kv[:-(-c // BLOCK)], (values, ids), c

    def _hit(self, chain: list, n: int, count: bool = True) -> tuple:
        self._use(chain)
        if count:
            self.hits += 1
            self.reused += n
        return [b.kv for b in chain], n

    def keeps(self, n: int) -> int:
        """How many first tokens of a prompt of n :meth:`insert` keeps: its whole blocks,
        as many of the first as the whole capacity holds (a prompt longer than it keeps
        its start, what later prompts may share: a long system prompt or document)."""
        return min(n, self.capacity) // BLOCK * BLOCK

    def held(self, model, tokens: list, salt: Optional[str] = None) -> int:
        """How many of the first tokens :meth:`insert` keeps of ``tokens`` are kept
        already (it reads the rest, up to :meth:`keeps`)."""
        return len(self._walk(self._keys(model, tokens, self.keeps(len(tokens)) // BLOCK, salt))) * BLOCK

    def insert(self, model, tokens: list, read: Optional[Callable[[int, int], Optional[Tensor]]],
               scores: Optional[tuple] = None, salt: Optional[str] = None) -> None:
        """Keep ``tokens``' whole blocks for ``model`` and ``salt`` (:meth:`keeps`: the first ones
        that fit); ``read(a, n)``: the keys and
        values of tokens a .. n - 1 [layers, 2, kv_heads, n - a, hd], called only for
        the blocks not kept yet (None, or a read giving None: only the scores, for
        the blocks kept). ``scores``: a scoring forward's (values [m, 1 + k] fp32,
        ids [m, k]) of tokens 1 .. m, each whole block's given to it where it has
        none or fewer alternatives."""
        n = self.keeps(len(tokens))
        if n == 0:
            return
        if scores is not None and not bool(scores[0][:n - 1].isfinite().all()):
            return  # as below: not what the prefix alone scores
        keys = list(self._keys(model, tokens, n // BLOCK, salt))
        chain = self._walk(keys)
        if len(chain) < len(keys) and read is not None:
            a = len(chain) * BLOCK
            kv = read(a, n)
            # a NaN or inf at one position reaches the keys of positions before it (blocked causal attention
            # weighs the masked future keys 0, and 0 x NaN is NaN): not what the prefix alone computes
            if kv is not None and bool(kv.isfinite().all()):
                for j, (key, t) in enumerate(keys[len(chain):]):
                    if key in self._blocks:  # another chain's block under this hash: that one stays
                        break
                    parent = chain[-1] if chain else None
                    b = self._blocks[key] = _Block(key, t, kv[:, :, :, j * BLOCK:(j + 1) * BLOCK].clone(), parent)
                    if parent is not None:
                        parent.children[key] = b
                    chain.append(b)
        if scores is not None:
            for j, b in enumerate(chain):
                lo = max(j * BLOCK - 1, 0)  # rows of this block's tokens (row r: token r + 1)
                hi = (j + 1) * BLOCK - 1
                if hi <= scores[0].shape[0] and (b.scores is None or b.scores[1].shape[1] < scores[1].shape[1]):
                    b.scores = (scores[0][lo:hi].clone(), scores[1][lo:hi].clone())
        self._use(chain)  # the most recently used: at most the capacity, it outlives every other block
        while self.tokens > self.capacity:
            self._drop(next(iter(self._blocks.values())))

    def _drop(self, b: _Block) -> None:
        del self._blocks[b.key]
        if b.parent is not None:
            del b.parent.children[b.key]

    def clear(self) -> None:
        self._blocks.clear()

    def drop(self, model) -> None:
        """Forget ``model``'s blocks (its adapter unloaded: one loaded later under its name has
        other weights, and its prompts' keys and values are not these), whatever their salts.
        A block's chain is its model's alone, so whole chains go."""
        for key in [k for k in self._blocks if k[0] == model]:
            del self._blocks[key]
