"""FFL, FBL, FFBL as standalone modules: one frozen base weight W [N, K],
the trainable adapter blocks, one op call per forward.

The fused storage is allocated once: FFL [[W]; [A]], FBL [W | sB],
FFBL [[W, sB]; [A, C]]. W is a view into it; fold() writes the adapter's
inference copies into the slots next to W, so the op reads one operand.
Without fold() the Parameters are passed as separate operands.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ._base import (AdapterModule, cached_views, check_linear, check_weight, empty_cols, fused_storage,
                    repoint, tile_matrix)


def _rank(rank, what):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"{what}: rank must be an integer >= 0, got {rank!r}")
    return rank


class _Block(AdapterModule):
    def __init__(self, weight: Tensor, rows: int, cols: int, scale: float, dropout: float):
        super().__init__(None)
        w = check_weight(weight, type(self).__name__ + ": weight")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else None
        self.N, self.K, self.cols, self.s = w.shape[0], w.shape[1], cols, float(scale)
        self.register_buffer("storage", fused_storage([w], rows, cols))
        self._views: dict = {}  # cached_views' cache

    def views(self) -> tuple:
        """(W, A slot, B slot, C slot) of the fused storage."""
        return cached_views(self._views, self.storage, self.N, self.K, self.cols)

    @property
    def weight(self) -> Tensor:
        """The frozen base weight: a view into the fused storage."""
        return self.views()[0]

    @classmethod
    def from_linear(cls, linear, rank: int, scale: float = 1.0, **kw):
        m = cls(check_linear(linear, f"{cls.__name__}.from_linear"), rank, scale, **kw)
        repoint(linear, m.weight)
        return m


class FFL(_Block):
    """y, z = x W^T (+ s tile(z) if repeat_add), x A^T (+ z_in).

    A [rank, K] starts random (PEFT's lora_A init), or at 0 with repeat_add
    so that y equals the base output at init."""

    def __init__(self, weight: Tensor, rank: int, scale: float = 1.0, *, repeat_add: bool = False,
                 dropout: float = 0.0, adapter_dtype=None):
        rank = _rank(rank, "FFL")
        super().__init__(weight, rank, 0, scale, dropout)
        if repeat_add and rank and self.N % rank:
            raise ValueError(f"FFL: repeat_add needs the output width {self.N} to be a multiple "
                             f"of rank {rank}")
        self.repeat_add = bool(repeat_add) and rank > 0
        self.new_param("A", (rank, self.K), self.weight, "zero" if repeat_add else "A", adapter_dtype)

    def _fold_slots(self):
        self.views()[1].copy_(self.A)

    def forward(self, x: Tensor, z_in: Optional[Tensor] = None):
        if not self.live:  # adapter off: the base output and no state
            return ops.ffl(x, self.weight, x.new_empty(0, self.K))[0], None
        A = self.views()[1] if self.folded else self.param("A", x)
        if self.repeat_add and self.dropping:
            y, z = ops.ffl(x, self.weight, A, z_in=z_in)
            T = tile_matrix(self.N, [self.N], A.shape[0], x)
            y = ops.fbl(empty_cols(x.shape[0], x), self.state(z), empty_cols(self.N, x), T, self.s,
                        res=y)
            return y, z
        return ops.ffl(x, self.weight, A, self.s, repeat_add=self.repeat_add, z_in=z_in)


class FBL(_Block):
    """y = u W^T + s f(z) B^T (+ res); B [N, rank] starts at 0."""

    def __init__(self, weight: Tensor, rank: int, scale: float = 1.0, *, relu: bool = False,
                 dropout: float = 0.0, adapter_dtype=None):
        rank = _rank(rank, "FBL")
        super().__init__(weight, 0, rank, scale, dropout)
        self.relu = bool(relu)
        self.new_param("B", (self.N, rank), self.weight, "zero", adapter_dtype)

    def _fold_slots(self):
        self.views()[2].copy_(self.s * self.B)

    def forward(self, u: Tensor, z: Optional[Tensor], res: Optional[Tensor] = None) -> Tensor:
        if not self.live or z is None:
            M = u.shape[0]
            return ops.fbl(u, empty_cols(M, u), self.weight, empty_cols(self.N, u), res=res)
        if self.folded:
            W, _, B, _ = self.views()
            return ops.fbl(u, z, W, B, 1.0, res=res, relu=self.relu)
        return ops.fbl(u, self.state(z), self.weight, self.param("B", u), self.s, res=res, relu=self.relu)


class FFBL(_Block):
    """y, z' = u W^T + s f(z) B^T (+ res), u A^T + f(z) C^T.

    B [N, rank] and C [rank_out, rank] start at 0, A [rank_out, K] random."""

    def __init__(self, weight: Tensor, rank: int, scale: float = 1.0, *, rank_out: Optional[int] = None,
                 relu: bool = False, dropout: float = 0.0, adapter_dtype=None):
        rank = _rank(rank, "FFBL")
        r2 = rank if rank_out is None else _rank(rank_out, "FFBL (rank_out)")
        super().__init__(weight, r2, rank, scale, dropout)
        self.relu, self.r2 = bool(relu), r2
        self.new_param("B", (self.N, rank), self.weight, "zero", adapter_dtype)
        self.new_param("A", (r2, self.K), self.weight, "A", adapter_dtype)
        self.new_param("C", (r2, rank), self.weight, "zero", adapter_dtype)

    def _fold_slots(self):
        _, A, B, C = self.views()
        B.copy_(self.s * self.B)
        A.copy_(self.A)
        C.copy_(self.C)

    def forward(self, u: Tensor, z: Optional[Tensor], res: Optional[Tensor] = None):
        if not self.live or z is None:
            M = u.shape[0]
            y = ops.fbl(u, empty_cols(M, u), self.weight, empty_cols(self.N, u), res=res)
            return y, None
        if self.folded:
            W, A, B, C = self.views()
            return ops.ffbl(u, z, W, B, A, C, 1.0, res=res, relu=self.relu)
        return ops.ffbl(u, self.state(z), self.weight, self.param("B", u), self.param("A", u),
                        self.param("C", u), self.s, res=res, relu=self.relu)
