"""Parameter counts per variant, computed from the same roles the modules
use (no tensors are built), and a short report."""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

from ..config import VARIANTS, AdapterConfig, as_arch
from .roles import GROUPS, param_shapes, role


def adapter_shapes(cfg: AdapterConfig, shapes) -> Iterator[Tuple[Optional[int], str, str, tuple]]:
    """(layer or None for the head, group, tensor name, shape) of every adapter
    tensor ``cfg`` gives a model of ``shapes``, in model order. The one loop
    behind parameter counts and adapter-file checks."""
    sh = as_arch(shapes)
    for i in list(range(sh.num_hidden_layers)) + [None]:
        for g in ("qkv", "o", "gateup", "down") if i is not None else ("head",):
            names = GROUPS[g]
            widths = {p: sh.out_width(p) for p in names}
            for n, s in param_shapes(role(cfg, g, i, sh.num_hidden_layers), cfg.rank, widths, sh.in_width(names[0])).items():
                yield i, g, n, tuple(s)


def parameter_shapes(cfg: AdapterConfig, shapes) -> Dict[str, tuple]:
    """'layers.<i>.<A_q|...>' / 'head.B_head' -> shape, for the whole model."""
    sh = as_arch(shapes)
    cfg.validate_for(sh)
    return {(f"layers.{i}.{n}" if i is not None else f"head.{n}"): s for i, _, n, s in adapter_shapes(cfg, sh)}


def count_parameters(cfg: AdapterConfig, shapes) -> int:
    """Number of trainable adapter parameters of ``cfg`` on a model of ``shapes``."""
    total = 0
    for s in parameter_shapes(cfg, shapes).values():
        total += s[0] * s[1]
    return total


def base_parameters(shapes, tied_head: bool = True) -> int:
    """Parameters of the base Llama (embedding, projections, norms, head)."""
    sh = as_arch(shapes)
    d = sh.hidden_size
    per_layer = sh.layer_projection_parameters + 2 * d  # + the two norms
    return sh.vocab_size * d * (1 if tied_head else 2) + sh.num_hidden_layers * per_layer + d


def parameter_report(shapes, rank: int = 16, alpha: Optional[float] = None,
                     variants=VARIANTS, tied_head: bool = True) -> str:
    """A table: variant, adapter parameters, % of the base model."""
    sh = as_arch(shapes)
    base = base_parameters(sh, tied_head)
    lines = [f"{'variant':<18} {'params':>12} {'% of base':>10}"]
    for v in variants:
        cfg = AdapterConfig(v, rank, alpha)
        try:
            n = count_parameters(cfg, sh)
        except ValueError as e:  # e.g. a repeat-add width that does not divide
            lines.append(f"{v:<18} {'n/a':>12}  ({e})")
            continue
        lines.append(f"{v:<18} {n:>12,} {100.0 * n / base:>9.3f}%")
    return "\n".join(lines)
