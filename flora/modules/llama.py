"""The sub-blocks a Llama decoder is made of, with any adapter variant fused in.

Activations are 2-D [M, features]. ``config=None`` gives the base model
(no adapter tensors). ``layer`` is the decoder layer index (None: a
standalone module, every block kept); ``num_layers`` lets ffba-ab / zflora
leave out the blocks of the last layers whose output nobody reads (see
roles.py); without it the model's last writer keeps blocks that get no
gradient (harmless, but they count as parameters).

See docs/variants.md for what each variant computes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ._base import AdapterModule, check_linear, check_weight, repoint
from .groups import InGroup, OutProj
from .roles import role


class _SubBlock(AdapterModule):
    def __init__(self, config, layer, num_layers):
        super().__init__(config)
        if layer is not None and (not isinstance(layer, int) or layer < 0):
            raise ValueError(f"{type(self).__name__}: layer must be an index >= 0 or None, got {layer!r}")
        if num_layers is not None and layer is not None and layer >= num_layers:
            raise ValueError(f"{type(self).__name__}: layer {layer} out of range for {num_layers} layers")
        self.layer, self.num_layers = layer, num_layers
        self._groups = []

    def _group(self, cls, gname, names, weights, adapter_dtype):
        cfg = self.config
        r = role(cfg, gname, self.layer, self.num_layers)
        rank, scale = (cfg.rank, cfg.scale) if cfg is not None else (0, 1.0)
        g = cls(self, gname, names, weights, r, rank, scale, adapter_dtype)
        self._groups.append(g)
        return g

    def set_config(self, cfg) -> None:
        """Another adapter of the same structure (variant, rank, targets,
        layers): its scale and dropout, which the structure does not fix."""
        self.config = cfg
        for g in self._groups:
            g.s = cfg.scale
        self.dropout = torch.nn.Dropout(cfg.dropout).train(self.training) if cfg.dropout > 0 else None

    def _apply(self, fn, recurse=True):
        for g in self._groups:  # .to() / .cuda() replace the storage: drop the old views with it
            g._cache.clear()
        return super()._apply(fn, recurse)

    def _fold_slots(self) -> None:
        for g in self._groups:
            if g.role.adapted:
                g.fold(self)

    def merge_into_base(self):
        """W += s B A for lora / pf-lora; the adapter then stops adding itself."""
        if self.config is None or self.config.base_variant not in ("lora", "pf-lora"):
            return super().merge_into_base()
        if not self.merged:
            with torch.no_grad():
                for g in self._groups:
                    if g.role.adapted:
                        g.merge(self, +1.0)
            self.merged, self.folded = True, False
        return self

    def unmerge_from_base(self):
        """Undo merge_into_base (exact to rounding of W's dtype)."""
        if self.merged:
            with torch.no_grad():
                for g in self._groups:
                    if g.role.adapted:
                        g.merge(self, -1.0)
            self.merged = False
        return self

    def base_weight(self, p: str) -> Tensor:
        """The frozen weight of projection p: a view into the fused storage."""
        for g in self._groups:
            if p in g.names:
                i = g.names.index(p)
                off = sum(g.widths[:i])
                return g.W(self)[off:off + g.widths[i]]
        raise ValueError(f"{type(self).__name__}: no projection {p!r}")

    def extra_repr(self) -> str:
        v = None if self.config is None else self.config.variant
        modes = ", ".join(f"{g.gname}={g.role.mode}" for g in self._groups)
        return f"variant={v}, layer={self.layer}, {modes}, folded={self.folded}"


def _widths_check(what, ws):
    k = ws[0].shape[1]
    for w in ws:
        if w.shape[1] != k:
            raise ValueError(f"{what}: weights must share the input width {k}, got shape {list(w.shape)}")


class FusedAttentionProjections(_SubBlock):
    """q, k, v = x W_q^T, x W_k^T, x W_v^T in one fused GEMM, plus the variant's
    forward adapters (A rows) or stream readers (B columns).

    forward(x [M, d], carry=None) -> (q, k, v, state); state feeds the output
    projection (ffba family, fpa) or is None.
    """

    def __init__(self, wq: Tensor, wk: Tensor, wv: Tensor, config=None, layer: Optional[int] = None,
                 *, num_layers: Optional[int] = None, adapter_dtype=None):
        super().__init__(config, layer, num_layers)
        ws = [check_weight(w, f"FusedAttentionProjections: w{n}") for w, n in zip((wq, wk, wv), "qkv")]
        _widths_check("FusedAttentionProjections", ws)
        self.qkv = self._group(InGroup, "qkv", ("q", "k", "v"), ws, adapter_dtype)

    @classmethod
    def from_linear(cls, q_proj, k_proj, v_proj, config=None, layer=None, **kw):
        ws = [check_linear(l, f"FusedAttentionProjections.from_linear: {n}_proj")
              for l, n in zip((q_proj, k_proj, v_proj), "qkv")]
        m = cls(*ws, config=config, layer=layer, **kw)
        for l, p in zip((q_proj, k_proj, v_proj), "qkv"):
            repoint(l, m.base_weight(p))
        return m

    def forward(self, x: Tensor, carry: Optional[Tensor] = None):
        (q, k, v), state = self.qkv.forward(self, x, carry)
        return q, k, v, state


class FusedOutputProjection(_SubBlock):
    """h' = residual + a W_o^T (+ the variant's B / A / C blocks).

    forward(a [M, d_q], state=None, residual=None, carry=None, in_place=False)
    -> (h', carry'). ``in_place``: the caller gives residual (and the carry)
    up; h' may be written over it (no copy of it on cuBLAS) wherever the
    call records no autograd. A caller whose residual autograd may still
    read (a checkpointed layer's input) must not give it up.
    """

    def __init__(self, wo: Tensor, config=None, layer: Optional[int] = None,
                 *, num_layers: Optional[int] = None, adapter_dtype=None):
        super().__init__(config, layer, num_layers)
        w = check_weight(wo, "FusedOutputProjection: wo")
        self.o = self._group(OutProj, "o", ("o",), [w], adapter_dtype)

    @classmethod
    def from_linear(cls, o_proj, config=None, layer=None, **kw):
        m = cls(check_linear(o_proj, "FusedOutputProjection.from_linear: o_proj"),
                config=config, layer=layer, **kw)
        repoint(o_proj, m.weight)
        return m

    @property
    def weight(self) -> Tensor:
        return self.o.W(self)

    def forward(self, a: Tensor, state: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                carry: Optional[Tensor] = None, in_place: bool = False):
        return self.o.forward(self, a, state, residual, carry, in_place)


class FusedMLP(_SubBlock):
    """The SwiGLU MLP with its residual add:
    h' = residual + (silu(x W_g^T) * (x W_u^T)) W_d^T (+ adapters).

    forward(x [M, d], residual=None, carry=None, x_carry=None, in_place=False)
    -> (h', carry'); ``in_place`` as FusedOutputProjection's.
    gate/up read ``x_carry`` (default ``carry``): zflora's model hands it the
    carry's copy next to x, so that the reader's GEMM takes [x | z] as one
    operand, and the writer adds [residual | carry], also adjacent.
    """

    def __init__(self, w_gate: Tensor, w_up: Tensor, w_down: Tensor, config=None,
                 layer: Optional[int] = None, *, num_layers: Optional[int] = None, adapter_dtype=None):
        super().__init__(config, layer, num_layers)
        wg = check_weight(w_gate, "FusedMLP: w_gate")
        wu = check_weight(w_up, "FusedMLP: w_up")
        wd = check_weight(w_down, "FusedMLP: w_down")
        _widths_check("FusedMLP", [wg, wu])
        if wg.shape[0] != wu.shape[0] or wd.shape[1] != wg.shape[0]:
            raise ValueError(f"FusedMLP: gate {list(wg.shape)}, up {list(wu.shape)} and down "
                             f"{list(wd.shape)} do not fit together (down must be [d, d_ff])")
        self.gate_up = self._group(InGroup, "gateup", ("gate", "up"), [wg, wu], adapter_dtype)
        self.down = self._group(OutProj, "down", ("down",), [wd], adapter_dtype)

    @classmethod
    def from_linear(cls, gate_proj, up_proj, down_proj, config=None, layer=None, **kw):
        ws = [check_linear(l, f"FusedMLP.from_linear: {n}")
              for l, n in zip((gate_proj, up_proj, down_proj), ("gate_proj", "up_proj", "down_proj"))]
        m = cls(*ws, config=config, layer=layer, **kw)
        for l, p in zip((gate_proj, up_proj, down_proj), ("gate", "up", "down")):
            repoint(l, m.base_weight(p))
        return m

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, carry: Optional[Tensor] = None,
                x_carry: Optional[Tensor] = None, in_place: bool = False):
        (g, u), state = self.gate_up.forward(self, x, carry if x_carry is None else x_carry)
        # with a state (ffba family) the product takes u's place, next to it
        mid = ops.silu_mul(g, u, over_u=state is not None)
        return self.down.forward(self, mid, state, residual, carry, in_place)


class FusedLMHead(_SubBlock):
    """logits = n W_head^T (+ s B_head z for zflora: the one merge of the stream).

    forward(n [M, d], carry=None) -> logits [M, vocab]. ``weight`` is the
    frozen head weight (a view) for tying the embedding to it.
    """

    def __init__(self, w_head: Tensor, config=None, *, adapter_dtype=None):
        super().__init__(config, None, None)
        w = check_weight(w_head, "FusedLMHead: w_head")
        self.head = self._group(InGroup, "head", ("head",), [w], adapter_dtype)

    @classmethod
    def from_linear(cls, lm_head, config=None, **kw):
        m = cls(check_linear(lm_head, "FusedLMHead.from_linear: lm_head"), config=config, **kw)
        repoint(lm_head, m.weight)
        return m

    @property
    def weight(self) -> Tensor:
        return self.head.W(self)

    def forward(self, n: Tensor, carry: Optional[Tensor] = None) -> Tensor:
        (y,), _ = self.head.forward(self, n, carry)
        return y


def initial_carry(config, M: int, dtype=torch.float32, device=None) -> Optional[Tensor]:
    """The carried adapter state before layer 0: zflora* -> zeros [M, r]
    (the stream's extra channels, set to 0 by the embedding); else None."""
    if config is None or config.base_variant not in ("zflora", "zflora-minimal"):
        return None
    return torch.zeros(M, config.rank, dtype=dtype, device=device)
