"""The modes a projection group can run, one class each (PEFT's LoraVariant
pattern): its storage slots, its tensors' shapes and initialisation, its
training-form operands, folding, and its forward as an input group
(``forward_in``) and/or an output projection (``forward_out``).
``roles.role`` picks the mode of each group; groups.py holds the storage.

Modes (see docs/variants.md): base; lora, pflora and pflora-out (lora, pf-lora); ffa;
sum and qgadd (ffba family input groups); bwd and ffbl (ffba family output
projections); read and write (zflora's stream readers and writers).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from .. import ops
from ._base import empty_cols, empty_rows


def _cat(parts: List[Tensor]) -> Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class Mode:
    """The base model: no slots, no tensors, one op."""

    def slots(self, g) -> tuple:
        """(extra rows for A, extra columns for B) of the fused storage."""
        return 0, 0

    def param_shapes(self, targets, rank: int, widths: dict, k: int) -> Dict[str, tuple]:
        return {}

    def zero_init(self, g, name: str) -> bool:
        """Does adapter tensor ``name`` start at 0 (B and C always do)?"""
        return not name.startswith("A_")

    def A_op(self, g, m, like: Tensor) -> Tensor:
        """The A block that rides in the base GEMM (training form)."""
        return _cat([m.param(f"A_{p}", like) for p in g.role.targets])

    def B_op(self, g, m, like: Tensor) -> Tensor:
        """The B block (unscaled, training form): B_p in its projection's rows."""
        return _cat([m.param(f"B_{p}", like) if p in g.role.targets else like.new_zeros(n, g.rank)
                     for p, n in zip(g.names, g.widths)])

    def A_now(self, g, m, like: Tensor) -> Tensor:
        return g.slot_A(m) if m.folded else self.A_op(g, m, like)

    def fold(self, g, m) -> None:
        pass

    def forward_in(self, g, m, x: Tensor, carry: Optional[Tensor]):
        return ops.ffl(x, g.W(m), empty_rows(g.K, x), split=g.widths)[:-1], None

    def forward_out(self, g, m, u: Tensor, state, residual, carry, in_place: bool = False):
        """h' = residual + u W^T (+ the mode's blocks), and the carry after.
        ``in_place``: the caller gives residual up, h' may be written over it."""
        M = u.shape[0]
        return ops.fbl(u, empty_cols(M, u), g.W(m), empty_cols(g.N, u), res=residual, into_res=in_place), carry


class Lora(Mode):
    """Unfused, like PEFT: base, then A and B(+add) per target."""

    def param_shapes(self, targets, rank, widths, k):
        out = {}
        for p in targets:
            out[f"A_{p}"], out[f"B_{p}"] = (rank, k), (widths[p], rank)
        return out

    def forward_in(self, g, m, x, carry):
        M, noA = x.shape[0], empty_rows(g.K, x)
        y, _ = ops.ffl(x, g.W(m), noA)
        ys = g.split(y)
        for i, p in enumerate(g.names):
            if p in g.role.targets:
                z, _ = ops.ffl(x, m.param(f"A_{p}", x), noA)
                ys[i] = ops.fbl(empty_cols(M, x), m.state(z), empty_cols(g.widths[i], x),
                                m.param(f"B_{p}", x), g.s, res=ys[i], into_res=True)
        return ys, None

    def forward_out(self, g, m, u, state, residual, carry, in_place=False):
        M, p = u.shape[0], g.role.targets[0]
        h = ops.fbl(u, empty_cols(M, u), g.W(m), empty_cols(g.N, u), res=residual, into_res=in_place)
        z, _ = ops.ffl(u, m.param(f"A_{p}", u), empty_rows(g.K, u))
        h = ops.fbl(empty_cols(M, u), m.state(z), empty_cols(g.N, u), m.param(f"B_{p}", u), g.s, res=h,
                    into_res=True)
        return h, carry


class PfLora(Lora):
    """pf-lora on q/k/v and gate/up: the A's ride in the base GEMM, the B's
    (block-diagonal) follow in one op; o and down are PfLoraOut."""

    def slots(self, g):
        return len(g.role.targets) * g.rank, 0

    def B_op(self, g, m, like):
        t = g.role.targets
        if len(g.names) == 1:  # one projection: B itself
            return m.param(f"B_{t[0]}", like)
        rows, j = [], 0  # block-diagonal: B_p maps z_p onto y_p only
        for p, n in zip(g.names, g.widths):
            if p in t:
                B = m.param(f"B_{p}", like)
                rows.append(torch.cat([like.new_zeros(n, j * g.rank), B,
                                       like.new_zeros(n, (len(t) - j - 1) * g.rank)], 1))
                j += 1
            else:
                rows.append(like.new_zeros(n, len(t) * g.rank))
        return _cat(rows)

    def fold(self, g, m):
        like = g.storage(m)
        g.slot_A(m).copy_(self.A_op(g, m, like))
        getattr(m, f"bfold_{g.gname}").copy_(g.s * self.B_op(g, m, like))

    def forward_in(self, g, m, x, carry):
        if m.folded:
            y, z = ops.ffl(x, g.W(m), g.slot_A(m))
            B, s = getattr(m, f"bfold_{g.gname}"), 1.0
        else:
            y, z = ops.ffl(x, g.W(m), self.A_op(g, m, x))
            B, s = self.B_op(g, m, x), g.s
        y = ops.fbl(empty_cols(x.shape[0], x), m.state(z), empty_cols(g.N, x), B, s, res=y, into_res=True)
        return g.split(y), None


class _ARows(Mode):
    """Modes whose A rows ride in the base GEMM (folded: pre-summed into the slot)."""

    def slots(self, g):
        return g.rank, 0

    def param_shapes(self, targets, rank, widths, k):
        return {f"A_{p}": (rank, k) for p in targets}

    def fold(self, g, m):
        g.slot_A(m).copy_(self.A_op(g, m, g.storage(m)))


class Ffa(_ARows):
    """ffa: y = x W^T + s tile(x A^T); A starts at 0 so y is the base output."""

    def groups(self, g) -> int:
        """Repeat segments run from column 0: cover names up to the last target."""
        return max(g.names.index(p) for p in g.role.targets) + 1

    def slots(self, g):
        return self.groups(g) * 2 * g.rank, 0

    def param_shapes(self, targets, rank, widths, k):
        return {f"A_{p}": (2 * rank, k) for p in targets}

    def zero_init(self, g, name):
        return True

    def A_op(self, g, m, like):
        return _cat([m.param(f"A_{p}", like) if p in g.role.targets else like.new_zeros(2 * g.rank, g.K)
                     for p in g.names[:self.groups(g)]])

    def forward_in(self, g, m, x, carry):
        A = self.A_now(g, m, x)
        return g.split(g.repeat_add(m, x, A, g.widths[:self.groups(g)], 2 * g.rank, A.shape[0])), None

    def forward_out(self, g, m, u, state, residual, carry, in_place=False):
        A = g.slot_A(m) if m.folded else m.param(f"A_{g.role.targets[0]}", u)
        return g.repeat_add(m, u, A, None, 2 * g.rank, A.shape[0], res=residual), carry


class Sum(_ARows):
    """ffba family input group: one r-block, the targets' A's summed; z is the state."""

    def A_op(self, g, m, like):
        t = g.role.targets
        A = m.param(f"A_{t[0]}", like)
        for p in t[1:]:
            A = A + m.param(f"A_{p}", like)
        return A

    def forward_in(self, g, m, x, carry):
        z_in = carry if (m.config.base_variant == "ffba-ab" and carry is not None) else None
        *ys, state = ops.ffl(x, g.W(m), self.A_now(g, m, x), z_in=z_in, split=g.widths)
        return ys, state


class QgAdd(Sum):
    """ffba-qg-add: q's own repeat-add block (starts at 0) next to the summed block."""

    def slots(self, g):
        return 2 * g.rank, 0

    def zero_init(self, g, name):
        return name == f"A_{g.names[0]}" or super().zero_init(g, name)

    def A_op(self, g, m, like):
        return torch.cat([m.param(f"A_{g.names[0]}", like), super().A_op(g, m, like)])

    def forward_in(self, g, m, x, carry):
        A = self.A_now(g, m, x)
        y, state = g.repeat_add(m, x, A, g.widths[:1], g.rank, g.rank, True)
        return g.split(y), state


class Write(_ARows):
    """zflora writer (o / down): [h'; z'] = [h; z] + [W; A] u, one FFL whose
    epilogue adds the residual to y and the carry to z'. Given the stream
    (in_place, h and z one buffer, folded): one GEMM onto it, the storage
    [W; A] as one operand."""

    def forward_out(self, g, m, u, state, residual, carry, in_place=False):
        stream = ops.adjacent(residual, carry) if in_place and m.folded and carry is not None else None
        if stream is not None:
            WA, M = g.storage(m), u.shape[0]
            hz = ops.fbl(u, empty_cols(M, u), WA, empty_cols(WA.shape[0], u), res=stream, into_res=True)
            return hz.split_with_sizes([g.N, hz.shape[1] - g.N], 1)
        A = g.slot_A(m) if m.folded else m.param(f"A_{g.role.targets[0]}", u)
        return ops.ffl(u, g.W(m), A, z_in=carry, res=residual)


class _BCols(Mode):
    """Modes whose (pre-scaled) B columns ride in the base GEMM."""

    def slots(self, g):
        return 0, g.rank

    def param_shapes(self, targets, rank, widths, k):
        return {f"B_{p}": (widths[p], rank) for p in targets}

    def fold(self, g, m):
        g.slot_B(m).copy_(g.s * self.B_op(g, m, g.storage(m)))


class Read(_BCols):
    """zflora reader (q/k/v, gate/up, head): y = x W^T + s carry B^T."""

    def forward_in(self, g, m, x, carry):
        if carry is None:
            return super().forward_in(g, m, x, carry)
        if m.folded:
            y = ops.fbl(x, m.state(carry), g.W(m), g.slot_B(m), 1.0)
        else:
            y = ops.fbl(x, m.state(carry), g.W(m), self.B_op(g, m, x), g.s)
        return g.split(y), None


class Bwd(_BCols):
    """ffba family output projection: h = res + u W^T + s f(state) B^T; the state ends here."""

    def forward_out(self, g, m, u, state, residual, carry, in_place=False):
        if state is None:  # the input group is off: nothing to read
            return super().forward_out(g, m, u, state, residual, carry, in_place)
        B, s = (g.slot_B(m), 1.0) if m.folded else (m.param(f"B_{g.role.targets[0]}", u), g.s)
        h = ops.fbl(u, m.state(state), g.W(m), B, s, res=residual, relu=g.role.relu, into_res=in_place)
        return h, None  # ffba-ab: last writer, z' dropped


class PfLoraOut(_BCols):
    """pf-lora on o / down: h = res + u W^T + s (u A^T) B^T as two ops, the A
    product and then one GEMM over [u | z] and [W | sB] that also adds the
    residual. (A in the o GEMM, as on the input groups, would leave the B
    product and the residual add as two more ops.) Folded: A waits in the A
    rows of the storage, already in its dtype."""

    def slots(self, g):
        return g.rank, g.rank  # [[W, sB], [A, 0]]: the r x r corner stays zero

    def param_shapes(self, targets, rank, widths, k):
        return Lora.param_shapes(self, targets, rank, widths, k)

    def fold(self, g, m):
        super().fold(g, m)
        g.slot_A(m).copy_(m.param(f"A_{g.role.targets[0]}", g.storage(m)))

    def forward_out(self, g, m, u, state, residual, carry, in_place=False):
        p = g.role.targets[0]
        if m.folded:
            A, B, s = g.slot_A(m), g.slot_B(m), 1.0
        else:
            A, B, s = m.param(f"A_{p}", u), m.param(f"B_{p}", u), g.s
        z, _ = ops.ffl(u, A, empty_rows(g.K, u))
        return ops.fbl(u, m.state(z), g.W(m), B, s, res=residual, into_res=in_place), carry


class Ffbl(Bwd):
    """ffba-ab output projection that hands z' = u A^T + state C^T on."""

    def slots(self, g):
        return g.rank, g.rank

    def param_shapes(self, targets, rank, widths, k):
        out = {}
        for p in targets:
            out[f"B_{p}"], out[f"A_{p}"], out[f"C_{p}"] = (widths[p], rank), (rank, k), (rank, rank)
        return out

    def fold(self, g, m):
        super().fold(g, m)
        p, like = g.role.targets[0], g.storage(m)
        g.slot_A(m).copy_(m.param(f"A_{p}", like))
        g.slot_C(m).copy_(m.param(f"C_{p}", like))

    def forward_out(self, g, m, u, state, residual, carry, in_place=False):
        if state is None:
            return Mode.forward_out(self, g, m, u, state, residual, carry, in_place)
        p = g.role.targets[0]
        if m.folded:
            B, A, C, s = g.slot_B(m), g.slot_A(m), g.slot_C(m), 1.0
        else:
            B, A, C, s = m.param(f"B_{p}", u), m.param(f"A_{p}", u), m.param(f"C_{p}", u), g.s
        return ops.ffbl(u, m.state(state), g.W(m), B, A, C, s, res=residual)


MODES: Dict[str, Mode] = {"base": Mode(), "lora": Lora(), "pflora": PfLora(), "pflora-out": PfLoraOut(),
                          "ffa": Ffa(), "sum": Sum(),
                          "qgadd": QgAdd(), "write": Write(), "read": Read(), "bwd": Bwd(), "ffbl": Ffbl()}
