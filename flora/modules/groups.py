"""The two kinds of projection group a Llama sub-block is made of.

* ``InGroup``: projections that share one input (q/k/v, gate/up, or the LM
  head alone), fused into one base GEMM. Variants add A rows (FFL) or B
  columns (FBL) to it.
* ``OutProj``: a projection whose output is added to the residual stream
  (o, down). Variants add B columns (FBL), A rows (FFL) or both (FFBL).

A group holds only metadata; its tensors live on the owning AdapterModule
(so parameters are named A_q, B_o, ... directly on the sub-block module).
The fused storage is one buffer ``w_<group>`` allocated once: W is a view
into it and the slots next to W hold the folded adapter copies.
How a group computes is its mode (modes.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ._base import AdapterModule, cached_views, empty_cols, fused_storage, tile_matrix
from .modes import MODES, Mode, PfLora
from .roles import Role

_BASE = MODES["base"]


class _Group:
    def __init__(self, owner: AdapterModule, gname: str, names: Sequence[str],
                 weights: Sequence[Tensor], r: Role, rank: int, scale: float,
                 adapter_dtype=None):
        self.gname, self.names, self.role = gname, tuple(names), r
        self.mode = MODES[r.mode]
        self.widths = [w.shape[0] for w in weights]
        self.N, self.K = sum(self.widths), weights[0].shape[1]
        self.rank, self.s = rank, scale
        self._cache: dict = {}  # (grad, inference mode) -> (storage, its views); see _views
        cfg = owner.config
        if cfg is not None:
            for p, n in zip(self.names, self.widths):
                cfg.check_width(p, n)
        self.rows, self.cols = self.mode.slots(self)
        w0 = weights[0]
        if len(weights) == 1 and not self.rows and not self.cols:
            storage = w0  # nothing to fuse: share the caller's tensor, no copy
        else:
            storage = fused_storage(weights, self.rows, self.cols)
        self._buffer = f"w_{gname}"
        owner.register_buffer(self._buffer, storage)
        if isinstance(self.mode, PfLora):  # folded s * blockdiag(B_p)
            owner.register_buffer(f"bfold_{gname}", w0.new_zeros(self.N, self.rows), persistent=False)
        shapes = self.mode.param_shapes(r.targets, rank, dict(zip(self.names, self.widths)), self.K)
        for name, shape in shapes.items():
            owner.new_param(name, shape, w0, "zero" if self.mode.zero_init(self, name) else "A", adapter_dtype)

    # -- storage views -------------------------------------------------------
    def storage(self, m) -> Tensor:
        return m._buffers[self._buffer]  # not getattr: nn.Module.__getattr__ costs ~1 us a call

    def _views(self, m) -> tuple:
        """(W, slot A, slot B, slot C) as views of the fused storage."""
        return cached_views(self._cache, self.storage(m), self.N, self.K, self.cols)

    def W(self, m) -> Tensor:
        return self._views(m)[0]

    def slot_A(self, m) -> Tensor:
        return self._views(m)[1]

    def slot_B(self, m) -> Tensor:
        return self._views(m)[2]

    def slot_C(self, m) -> Tensor:
        return self._views(m)[3]

    def mode_of(self, m) -> Mode:
        """This group's mode, or the base while the adapter is off or merged."""
        mode = self.mode
        return mode if mode is _BASE or m.live else _BASE

    def fold(self, m) -> None:
        self.mode.fold(self, m)

    def merge(self, m, sign: float) -> None:
        """W_p += sign * s * B_p A_p (lora / pf-lora)."""
        W, off = self.W(m), 0
        for p, n in zip(self.names, self.widths):
            if p in self.role.targets:
                B, A = getattr(m, f"B_{p}"), getattr(m, f"A_{p}")
                delta = (B.to(torch.float64) @ A.to(torch.float64)) * (sign * self.s)
                W[off:off + n].copy_((W[off:off + n].to(torch.float64) + delta).to(W.dtype))
            off += n

    def repeat_add(self, m, x, A, widths, rc, tiled, with_state=False, res=None):
        """y = x W^T + s tile(z) (+ res) over the segments ``widths`` (None: the
        whole output); dropout (training) must act on z first, so then the tile
        is a second op with a fixed tile matrix."""
        W = self.W(m)
        if m.dropping:
            y, z = ops.ffl(x, W, A, res=res)
            T = tile_matrix(self.N, [self.N] if widths is None else widths, rc, x)
            y = ops.fbl(empty_cols(x.shape[0], x), m.state(z[:, :tiled]), empty_cols(self.N, x),
                        T, self.s, res=y)
        elif widths is None:  # one segment, the whole output
            y, z = ops.ffl(x, W, A, self.s, repeat_add=True, res=res)
        else:
            y, z = ops.ffl(x, W, A, self.s, repeat=list(widths), repeat_rank=rc, res=res)
        return (y, z[:, tiled:]) if with_state else y

    def split(self, y: Tensor) -> List[Tensor]:
        """y's column blocks, one per projection (views; one call, not one slice each)."""
        return list(y.split_with_sizes(self.widths, 1)) if len(self.widths) > 1 else [y]


class InGroup(_Group):
    """Projections sharing one input. forward -> (list of outputs, state)."""

    def forward(self, m, x: Tensor, carry: Optional[Tensor] = None):
        return self.mode_of(m).forward_in(self, m, x, carry)


class OutProj(_Group):
    """A projection added to the residual stream. forward -> (h, carry)."""

    def forward(self, m, u: Tensor, state: Optional[Tensor], residual: Optional[Tensor],
                carry: Optional[Tensor], in_place: bool = False):
        return self.mode_of(m).forward_out(self, m, u, state, residual, carry, in_place)
