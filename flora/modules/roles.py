"""What each projection group of one layer does under a config.

A layer has four groups in stream order: the q/k/v input group, the o
output projection, the gate/up input group and the down output projection;
the LM head comes last. ``role(cfg, group, layer)`` says which computation
(mode) a group runs and which projections carry adapter tensors, and
``param_shapes`` gives those tensors' shapes. Modules and
``count_parameters`` both use this, so counts and modules cannot disagree.

Blocks that could never receive a gradient are left out, so every adapter
tensor trains: a zflora reader with no writer before it reads a stream that
is always zero (layer 0's q/k/v), and an ffba-ab / zflora writer with no
reader after it writes a state nobody reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import AdapterConfig
from .modes import MODES

GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gateup": ("gate", "up"),
          "down": ("down",), "head": ("head",)}
_POS = {"qkv": 0, "o": 1, "gateup": 2, "down": 3}
INPUT_GROUPS = ("qkv", "gateup")


@dataclass(frozen=True)
class Role:
    mode: str  # base lora pflora ffa sum qgadd read | base lora pflora-out ffa bwd ffbl write
    targets: tuple = ()  # projections of the group that carry adapter tensors
    relu: bool = False

    @property
    def adapted(self) -> bool:
        return self.mode != "base"


BASE = Role("base")


def _adapted_layers(cfg: AdapterConfig, num_layers: Optional[int]):
    """Sorted adapted layer indices, or None for 'every layer, count unknown'."""
    if cfg.layers is not None:
        return cfg.layers
    return None if num_layers is None else list(range(num_layers))


def _stream_ends(cfg: AdapterConfig):
    """(writer positions, reader positions, head reads) of the carried state."""
    t, base = cfg.resolved_targets, cfg.base_variant
    if base in ("zflora", "zflora-minimal"):
        writers = [_POS[p] for p in cfg.writers]
        readers = [_POS[g] for g in INPUT_GROUPS if any(p in cfg.readers for p in GROUPS[g])]
        return writers, readers, "head" in cfg.readers
    # ffba-ab: o / down hand z' on to the next input group
    writers = [_POS[p] for p in ("o", "down") if p in t]
    readers = [_POS[g] for g in INPUT_GROUPS if any(p in t for p in GROUPS[g])]
    return writers, readers, False


def _reader_active(cfg, layer, pos, num_layers) -> bool:
    """Is there a writer strictly before (layer, pos)?"""
    if layer is None:
        return True
    writers, _, _ = _stream_ends(cfg)
    adapted = _adapted_layers(cfg, num_layers)
    earlier = range(layer) if adapted is None else [j for j in adapted if j < layer]
    if writers and any(True for _ in earlier):
        return True
    return cfg.adapts_layer(layer) and any(w < pos for w in writers)


def _writer_active(cfg, layer, pos, num_layers) -> bool:
    """Is there a reader strictly after (layer, pos)?"""
    if layer is None:
        return True
    _, readers, head = _stream_ends(cfg)
    if head:
        return True
    if any(r > pos for r in readers):
        return True
    adapted = _adapted_layers(cfg, num_layers)
    later = True if adapted is None else any(j > layer for j in adapted)
    return bool(readers) and later


def role(cfg: Optional[AdapterConfig], group: str, layer: Optional[int] = None,
         num_layers: Optional[int] = None) -> Role:
    if cfg is None or (group != "head" and not cfg.adapts_layer(layer)):
        return BASE
    t = tuple(p for p in GROUPS[group] if p in cfg.resolved_targets)
    if not t:
        return BASE
    base = cfg.base_variant
    if base == "pf-lora" and group in ("o", "down"):
        return Role("pflora-out", t)
    if base in ("lora", "pf-lora", "ffa"):
        return Role({"lora": "lora", "pf-lora": "pflora", "ffa": "ffa"}[base], t)
    if base in ("zflora", "zflora-minimal"):
        if group == "head":
            return Role("read", t)
        if group in INPUT_GROUPS:
            ok = _reader_active(cfg, layer, _POS[group], num_layers)
            return Role("read", t) if ok else BASE
        return Role("write", t) if _writer_active(cfg, layer, _POS[group], num_layers) else BASE
    if group == "head":
        return BASE
    # the ffba family
    if group in INPUT_GROUPS:
        if base == "fpa":
            return Role("sum", t[:1])  # one r-block riding in the group's GEMM
        if base == "ffba-qg-add" and t[0] == GROUPS[group][0]:
            return Role("qgadd", t)
        return Role("sum", t)
    relu = base in ("fpa", "ffba-relu")
    if base == "ffba-ab" and _writer_active(cfg, layer, _POS[group], num_layers):
        return Role("ffbl", t)
    return Role("bwd", t, relu)


def param_shapes(r: Role, rank: int, widths: dict, k: int) -> dict:
    """name -> shape of the adapter tensors of one group (widths: p -> d_out)."""
    return MODES[r.mode].param_shapes(r.targets, rank, widths, k)
