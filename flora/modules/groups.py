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
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ._base import AdapterModule, empty_cols, tile_matrix
from .roles import Role, param_shapes

# storage layout per mode: extra rows (A slots) / extra columns (B slots)
_ROWS = {"pflora", "ffa", "sum", "qgadd", "write", "ffbl"}
_COLS = {"read", "bwd", "ffbl"}


def _slot_rank(r: Role, rank: int, names: Sequence[str]) -> int:
    if r.mode == "pflora":
        return len(r.targets) * rank
    if r.mode == "ffa":
        return _ffa_groups(r, names) * 2 * rank
    if r.mode == "qgadd":
        return 2 * rank
    return rank


def _ffa_groups(r: Role, names: Sequence[str]) -> int:
    """Repeat segments run from column 0: cover names up to the last target."""
    return max(names.index(p) for p in r.targets) + 1


class _Group:
    def __init__(self, owner: AdapterModule, gname: str, names: Sequence[str],
                 weights: Sequence[Tensor], r: Role, rank: int, scale: float,
                 adapter_dtype=None):
        self.gname, self.names, self.role = gname, tuple(names), r
        self.widths = [w.shape[0] for w in weights]
        self.N, self.K = sum(self.widths), weights[0].shape[1]
        self.rank, self.s = rank, scale
        cfg = owner.config
        if cfg is not None:
            for p, n in zip(self.names, self.widths):
                cfg.check_width(p, n)
        R = _slot_rank(r, rank, self.names) if r.adapted else 0
        self.rows = R if r.mode in _ROWS else 0
        self.cols = R if r.mode in _COLS else 0
        if r.mode == "ffbl":
            self.rows = self.cols = rank
        w0 = weights[0]
        if len(weights) == 1 and not self.rows and not self.cols:
            storage = w0  # nothing to fuse: share the caller's tensor, no copy
        else:
            storage = w0.new_zeros(self.N + self.rows, self.K + self.cols)
            off = 0
            for w in weights:
                storage[off:off + w.shape[0], :self.K].copy_(w)
                off += w.shape[0]
        owner.register_buffer(f"w_{gname}", storage)
        if r.mode == "pflora":  # folded s * blockdiag(B_p)
            owner.register_buffer(f"bfold_{gname}", w0.new_zeros(self.N, self.rows), persistent=False)
        for name, shape in param_shapes(r, rank, dict(zip(self.names, self.widths)), self.K).items():
            zero_A = r.mode == "ffa" or (r.mode == "qgadd" and name == f"A_{self.names[0]}")
            init = "A" if name.startswith("A_") and not zero_A else "zero"
            owner._new_param(name, shape, w0, init, adapter_dtype)

    # -- storage views -------------------------------------------------------
    def storage(self, m) -> Tensor:
        return getattr(m, f"w_{self.gname}")

    def W(self, m) -> Tensor:
        st = self.storage(m)
        return st[:self.N, :self.K] if (self.rows or self.cols) else st

    def slot_A(self, m) -> Tensor:
        return self.storage(m)[self.N:, :self.K]

    def slot_B(self, m) -> Tensor:
        return self.storage(m)[:self.N, self.K:]

    def slot_C(self, m) -> Tensor:
        return self.storage(m)[self.N:, self.K:]

    def mode(self, m) -> str:
        return self.role.mode if m._live else "base"

    # -- training-form operands (built from the Parameters) ----------------
    def A_op(self, m, like: Tensor) -> Tensor:
        """The A block that rides in the base GEMM (training form)."""
        r, t = self.role, self.role.targets
        if r.mode in ("pflora", "write", "ffbl"):
            return torch.cat([m._p(f"A_{p}", like) for p in t]) if len(t) > 1 else m._p(f"A_{t[0]}", like)
        if r.mode == "ffa":
            G = _ffa_groups(r, self.names)
            parts = [m._p(f"A_{p}", like) if p in t else like.new_zeros(2 * self.rank, self.K)
                     for p in self.names[:G]]
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        A_sum = m._p(f"A_{t[0]}", like)
        for p in t[1:]:
            A_sum = A_sum + m._p(f"A_{p}", like)
        if r.mode == "qgadd":
            return torch.cat([m._p(f"A_{self.names[0]}", like), A_sum])
        return A_sum

    def B_op(self, m, like: Tensor) -> Tensor:
        """The B block (unscaled, training form)."""
        r, t = self.role, self.role.targets
        if r.mode == "pflora" and len(self.names) == 1:  # one projection: B itself
            return m._p(f"B_{t[0]}", like)
        if r.mode == "pflora":  # block-diagonal: B_p maps z_p onto y_p only
            rows, j = [], 0
            for p, n in zip(self.names, self.widths):
                if p in t:
                    B = m._p(f"B_{p}", like)
                    rows.append(torch.cat([like.new_zeros(n, j * self.rank), B,
                                           like.new_zeros(n, (len(t) - j - 1) * self.rank)], 1))
                    j += 1
                else:
                    rows.append(like.new_zeros(n, len(t) * self.rank))
            return torch.cat(rows) if len(rows) > 1 else rows[0]
        parts = [m._p(f"B_{p}", like) if p in t else like.new_zeros(n, self.rank)
                 for p, n in zip(self.names, self.widths)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def pflora(self, m, x: Tensor) -> Tensor:
        """pf-lora: the A's ride in the base GEMM, the B's follow in one op."""
        if m.folded:
            y, z = ops.ffl(x, self.W(m), self.slot_A(m))
            B, s = getattr(m, f"bfold_{self.gname}"), 1.0
        else:
            y, z = ops.ffl(x, self.W(m), self.A_op(m, x))
            B, s = self.B_op(m, x), self.s
        return ops.fbl(empty_cols(x.shape[0], x), m._drop(z), empty_cols(self.N, x), B, s, res=y)

    # -- folding -------------------------------------------------------------
    def fold(self, m) -> None:
        mode, like = self.role.mode, self.storage(m)
        if mode in ("pflora", "ffa", "sum", "qgadd", "write"):
            self.slot_A(m).copy_(self.A_op(m, like))
        if mode == "pflora":
            getattr(m, f"bfold_{self.gname}").copy_(self.s * self.B_op(m, like))
        if mode in ("read", "bwd", "ffbl"):
            self.slot_B(m).copy_(self.s * self.B_op(m, like))
        if mode == "ffbl":
            p = self.role.targets[0]
            self.slot_A(m).copy_(m._p(f"A_{p}", like))
            self.slot_C(m).copy_(m._p(f"C_{p}", like))

    def merge(self, m, sign: float) -> None:
        """W_p += sign * s * B_p A_p (lora / pf-lora)."""
        W, off = self.W(m), 0
        for p, n in zip(self.names, self.widths):
            if p in self.role.targets:
                B, A = getattr(m, f"B_{p}"), getattr(m, f"A_{p}")
                delta = (B.to(torch.float64) @ A.to(torch.float64)) * (sign * self.s)
                W[off:off + n].copy_((W[off:off + n].to(torch.float64) + delta).to(W.dtype))
            off += n


class InGroup(_Group):
    """Projections sharing one input. forward -> (list of outputs, state)."""

    def forward(self, m, x: Tensor, carry: Optional[Tensor] = None):
        mode, W, M = self.mode(m), self.W(m), x.shape[0]
        noA = x.new_empty(0, self.K)
        state = None
        if mode == "base" or (mode == "read" and carry is None):
            y, _ = ops.ffl(x, W, noA)
        elif mode == "lora":  # unfused, like PEFT: base, A, B(+add) per target
            y, _ = ops.ffl(x, W, noA)
            ys = self._split(y)
            for i, p in enumerate(self.names):
                if p in self.role.targets:
                    z, _ = ops.ffl(x, m._p(f"A_{p}", x), noA)
                    ys[i] = ops.fbl(empty_cols(M, x), m._drop(z), empty_cols(self.widths[i], x),
                                    m._p(f"B_{p}", x), self.s, res=ys[i])
            return ys, None
        elif mode == "pflora":
            y = self.pflora(m, x)
        elif mode == "ffa":
            A = self.slot_A(m) if m.folded else self.A_op(m, x)
            G = _ffa_groups(self.role, self.names)
            y = self._repeat_add(m, x, W, A, self.widths[:G], 2 * self.rank, A.shape[0])
        elif mode == "qgadd":
            A = self.slot_A(m) if m.folded else self.A_op(m, x)
            y, state = self._repeat_add(m, x, W, A, self.widths[:1], self.rank, self.rank, True)
        elif mode == "sum":
            A = self.slot_A(m) if m.folded else self.A_op(m, x)
            z_in = carry if (m.config.base_variant == "ffba-ab" and carry is not None) else None
            y, state = ops.ffl(x, W, A, z_in=z_in)
        elif mode == "read":
            if m.folded:
                y = ops.fbl(x, carry, W, self.slot_B(m), 1.0)
            else:
                y = ops.fbl(x, m._drop(carry), W, self.B_op(m, x), self.s)
        else:  # pragma: no cover
            raise AssertionError(mode)
        return self._split(y), state

    def _repeat_add(self, m, x, W, A, widths, rc, tiled, with_state=False):
        """y = x W^T + s tile(z); dropout (training) must act on z first, so
        then the tile is a second op with a fixed tile matrix."""
        if m._dropping:
            y, z = ops.ffl(x, W, A)
            T = tile_matrix(self.N, widths, rc, x)
            y = ops.fbl(empty_cols(x.shape[0], x), m._drop(z[:, :tiled]), empty_cols(self.N, x),
                        T, self.s, res=y)
        else:
            y, z = ops.ffl(x, W, A, self.s, repeat=list(widths), repeat_rank=rc)
        return (y, z[:, tiled:]) if with_state else y

    def _split(self, y: Tensor) -> List[Tensor]:
        out, off = [], 0
        for n in self.widths:
            out.append(y[:, off:off + n])
            off += n
        return out


class OutProj(_Group):
    """A projection added to the residual stream. forward -> (h, carry)."""

    def forward(self, m, u: Tensor, state: Optional[Tensor], residual: Optional[Tensor],
                carry: Optional[Tensor]):
        mode, W, M = self.mode(m), self.W(m), u.shape[0]
        if mode in ("bwd", "ffbl") and state is None:
            mode = "base"  # the input group is off: nothing to read
        if mode == "base":
            return ops.fbl(u, empty_cols(M, u), W, empty_cols(self.N, u), res=residual), carry
        p = self.role.targets[0]
        if mode == "lora":
            h = ops.fbl(u, empty_cols(M, u), W, empty_cols(self.N, u), res=residual)
            z, _ = ops.ffl(u, m._p(f"A_{p}", u), u.new_empty(0, self.K))
            h = ops.fbl(empty_cols(M, u), m._drop(z), empty_cols(self.N, u), m._p(f"B_{p}", u),
                        self.s, res=h)
            return h, carry
        if mode == "pflora":
            return _add(self.pflora(m, u), residual), carry
        if mode == "ffa":
            A = self.slot_A(m) if m.folded else m._p(f"A_{p}", u)
            if m._dropping:
                y, z = ops.ffl(u, W, A)
                T = tile_matrix(self.N, [self.N], 2 * self.rank, u)
                y = ops.fbl(empty_cols(M, u), m._drop(z), empty_cols(self.N, u), T, self.s, res=y)
            else:
                y, _ = ops.ffl(u, W, A, self.s, repeat_add=True)
            return _add(y, residual), carry
        if mode == "bwd":
            B, s = (self.slot_B(m), 1.0) if m.folded else (m._p(f"B_{p}", u), self.s)
            h = ops.fbl(u, m._drop(state), W, B, s, res=residual, relu=self.role.relu)
            return h, None  # the state ends here (ffba-ab: last writer, z' dropped)
        if mode == "ffbl":
            if m.folded:
                B, A, C, s = self.slot_B(m), self.slot_A(m), self.slot_C(m), 1.0
            else:
                B, A, C, s = m._p(f"B_{p}", u), m._p(f"A_{p}", u), m._p(f"C_{p}", u), self.s
            h, z2 = ops.ffbl(u, m._drop(state), W, B, A, C, s, res=residual)
            return h, z2
        if mode == "write":
            A = self.slot_A(m) if m.folded else m._p(f"A_{p}", u)
            y, c2 = ops.ffl(u, W, A, z_in=carry)
            return _add(y, residual), c2
        raise AssertionError(mode)  # pragma: no cover


def _add(y: Tensor, residual: Optional[Tensor]) -> Tensor:
    return y if residual is None else residual + y
