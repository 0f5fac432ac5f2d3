"""Shared machinery of every adapter module: adapter tensors, enable/disable,
fold/unfold, adapter state dicts, and small tensor helpers."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn


def init_A(t: Tensor) -> None:
    """PEFT's lora_A initialisation (kaiming-uniform, a = sqrt(5))."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


_EMPTY: Dict[tuple, Tensor] = {}


def empty(shape: tuple, like: Tensor) -> Tensor:
    """A zero-element operand ([m, 0] or [0, k]), made once per shape, dtype and
    device (and inference mode) instead of on every call."""
    if torch.compiler.is_compiling():
        return like.new_empty(shape)
    key = (shape, like.dtype, like.device, torch.is_inference_mode_enabled())  # never needs grad
    t = _EMPTY.get(key)
    if t is None:
        if len(_EMPTY) > 256:  # many batch shapes (training): start over
            _EMPTY.clear()
        t = _EMPTY[key] = like.new_empty(shape)
    return t


def empty_cols(m: int, like: Tensor) -> Tensor:
    """[m, 0]: the missing operand of an op used for only one of its blocks."""
    return empty((m, 0), like)


def empty_rows(k: int, like: Tensor) -> Tensor:
    """[0, k]: no A rows (the base product alone)."""
    return empty((0, k), like)


def fused_storage(weights, rows: int, cols: int) -> Tensor:
    """The fused storage [[W, B]; [A, C]] as zeros with the stacked weights
    copied into W [N, K], ``rows`` A rows below and ``cols`` B columns beside.
    Each row is padded to a multiple of 8 elements, so every view's rows start
    16-byte aligned for any K and rank (TMA and the CUDA kernels' 16-byte
    loads need it); the pad stays zero and no view includes it."""
    w0 = weights[0]
    N, K = sum(w.shape[0] for w in weights), w0.shape[1]
    st = w0.new_zeros(N + rows, -(-(K + cols) // 8) * 8)
    off = 0
    for w in weights:
        st[off:off + w.shape[0], :K].copy_(w)
        off += w.shape[0]
    return st


def storage_views(st: Tensor, N: int, K: int, cols: int) -> tuple:
    """(W, A slot, B slot, C slot) of a fused storage, as views (W is ``st``
    itself when the storage holds W alone)."""
    W = st if tuple(st.shape) == (N, K) else st[:N, :K]
    return W, st[N:, :K], st[:N, K:K + cols], st[N:, K:K + cols]


def cached_views(cache: dict, st: Tensor, N: int, K: int, cols: int) -> tuple:
    """storage_views, sliced once per storage tensor (and grad / inference
    mode) instead of on every call. A new storage (moved, cast, rebuilt, or a
    copy not aliasing the views) is sliced again; writes into it (fold, merge)
    keep the views valid."""
    if torch.compiler.is_compiling():
        return storage_views(st, N, K, cols)
    key = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    c = cache.get(key)
    if c is None or c[0] is not st or c[1].data_ptr() != st.data_ptr():
        c = cache[key] = (st,) + storage_views(st, N, K, cols)
    return c[1:]


def tile_matrix(n: int, widths, rc: int, like: Tensor) -> Tensor:
    """T [n, G*rc] with z T^T == the repeat-add tile of z's chunks over the
    consecutive segments ``widths`` (used when dropout must act on z first)."""
    T = like.new_zeros(n, len(widths) * rc)
    off = 0
    for g, w in enumerate(widths):
        idx = torch.arange(w, device=like.device)
        T[off + idx, g * rc + idx % rc] = 1
        off += w
    return T


def check_linear(linear, what: str) -> Tensor:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{what}: expected an nn.Linear, got {type(linear).__name__}")
    if linear.bias is not None:
        raise ValueError(f"{what}: the Linear has a bias; flora's fused projections have none")
    return linear.weight


def check_weight(w, what: str) -> Tensor:
    if not isinstance(w, Tensor):
        raise TypeError(f"{what}: expected a Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D weight [out, in], got shape {list(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point weight, got {w.dtype}")
    return w.detach()


def repoint(linear: nn.Linear, view: Tensor) -> None:
    """Point the Linear's weight at the module's storage, so the old copy can
    be freed and a tie (e.g. embedding = LM head) keeps sharing one tensor."""
    with torch.no_grad():
        linear.weight.data = view


class AdapterModule(nn.Module):
    """Base of every flora module. Subclasses register their adapter tensors
    with ``new_param`` and implement ``_fold_slots`` (write the folded copies
    into the fused storage)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config
        self.adapter_enabled = True
        self.folded = False
        self._folded_at: tuple = ()  # _versions() when fold() last wrote the folded copies
        self.merged = False
        self._adapter_names: List[str] = []
        self._adapter_init: Dict[str, str] = {}  # name -> "A" (kaiming) or "zero": a fresh adapter's values
        p = 0.0 if config is None else getattr(config, "dropout", 0.0)
        self.dropout = nn.Dropout(p) if p > 0 else None
        self.route_off: Optional[Tensor] = None  # set by FusedLlama.run_layers for a mixed batch

    # -- construction --------------------------------------------------------
    def new_param(self, name: str, shape, like: Tensor, init: str, dtype=None) -> None:
        t = torch.zeros(shape, dtype=dtype or like.dtype, device=like.device)
        if init == "A":
            init_A(t)
        self.register_parameter(name, nn.Parameter(t))
        self._adapter_names.append(name)
        self._adapter_init[name] = init

    def param(self, name: str, like: Tensor) -> Tensor:
        """Adapter tensor cast to the activation dtype."""
        t = getattr(self, name)
        return t if t.dtype == like.dtype else t.to(like.dtype)

    def state(self, z: Optional[Tensor]) -> Optional[Tensor]:
        """The adapter state z as a B or C product reads it: dropout (training)
        and, in a mixed batch (``FusedLlama.stack_adapters``), each row's z
        zeroed outside its own adapter's columns (``route_off`` [M, R], True
        where a column is not the row's; a z that is several R-blocks wide,
        pf-lora's one per target, repeats it)."""
        if z is None:
            return z
        off = self.route_off
        if off is not None:  # [M, k*R] seen as [M, k, R]: the mask broadcasts over k, no repeat
            z = z.unflatten(1, (-1, off.shape[1])).masked_fill(off.unsqueeze(1), 0).flatten(1)
        if self.dropout is None or not self.training:
            return z
        return self.dropout(z)

    @property
    def dropping(self) -> bool:
        return self.dropout is not None and self.training

    @property
    def live(self) -> bool:
        """Adapter contributes through its own tensors (not off, not merged)."""
        return self.adapter_enabled and not self.merged and bool(self._adapter_names)

    # -- public API ----------------------------------------------------------
    def trainable_parameters(self) -> List[nn.Parameter]:
        return [getattr(self, n) for n in self._adapter_names]

    def adapter_state_dict(self) -> Dict[str, Tensor]:
        return {n: getattr(self, n).detach() for n in self._adapter_names}

    def fresh_adapter_state_dict(self) -> Dict[str, Tensor]:
        """New adapter tensors as the module's construction initialises them."""
        out = {}
        for n in self._adapter_names:
            t = torch.zeros_like(getattr(self, n), requires_grad=False)
            if self._adapter_init.get(n) == "A":
                init_A(t)
            out[n] = t
        return out

    def load_adapter_state_dict(self, sd: Dict[str, Tensor], strict: bool = True) -> None:
        names = set(self._adapter_names)
        missing = sorted(names - set(sd))
        unexpected = sorted(set(sd) - names)
        if strict and (missing or unexpected):
            raise KeyError(f"{type(self).__name__}.load_adapter_state_dict: missing keys "
                           f"{missing}, unexpected keys {unexpected}")
        for n in self._adapter_names:
            if n not in sd:
                continue
            p, t = getattr(self, n), sd[n]
            if not isinstance(t, Tensor):
                raise TypeError(f"load_adapter_state_dict: {n} is a {type(t).__name__}, not a Tensor")
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{type(self).__name__}.load_adapter_state_dict: {n} has shape "
                                 f"{list(t.shape)}, expected {list(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
        if self.folded:
            self.fold()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        if self.folded:  # model.load_state_dict() changed the Parameters: fold them again
            self.fold()

    def set_adapter_enabled(self, flag: bool) -> None:
        self.adapter_enabled = bool(flag)

    def fold(self) -> "AdapterModule":
        """Write the inference form (pre-summed A's, pre-scaled B) into the
        fused storage; forward then runs one op per projection. Writes into the
        adapter tensors afterwards are folded again by refold_if_stale (which
        FusedLlama's forward / generate and a patched model's layers call);
        writes through ``.data`` bypass the version counter: fold() again."""
        if self.merged:
            raise ValueError(f"{type(self).__name__}.fold: adapter is merged into the base weight")
        with torch.no_grad():
            self._fold_slots()
        self.folded = True
        self._folded_at = self._versions()
        return self

    def _versions(self) -> tuple:
        """The adapter Parameters' version counters (bumped by every in-place write
        through the Parameter, not through ``.data``)."""
        p = self._parameters
        return tuple(p[n]._version for n in self._adapter_names)

    def refold_if_stale(self) -> None:
        """Fold again if an adapter tensor was written in place since the last fold
        (an optimizer step, a copy_): the folded copies would be stale otherwise."""
        # under torch.compile: the caller's eager entry has checked (a trace bakes no check in)
        if self.folded and not torch.compiler.is_compiling() and self._folded_at != self._versions():
            self.fold()

    def unfold(self) -> "AdapterModule":
        """Back to training form: the adapter Parameters feed the ops directly."""
        self.folded = False
        return self

    def merge_into_base(self) -> "AdapterModule":
        raise ValueError(f"{type(self).__name__}.merge_into_base: only lora and pf-lora adapters "
                         f"can be merged into the base weight (variant "
                         f"{getattr(self.config, 'variant', None)})")

    def _fold_slots(self) -> None:  # pragma: no cover - overridden
        pass
