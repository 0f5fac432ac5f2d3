"""AdapterConfig: which adapter variant, where, and how big; LlamaArch: the
model it goes on.

A config is validated when it is built (everything that can be checked
without the model) and again by ``validate_for(arch)`` once the model's
widths are known (repeat-add widths, layer indices). Every problem is a
ValueError (TypeError for a wrong type) that names the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

from .fileio import atomic_write_text

ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")
PROJECTIONS = ATTN + MLP  # every projection of a decoder layer
ALL_NAMES = PROJECTIONS + ("head",)

# base variant -> projections "all" resolves to
_ALL_TARGETS = {
    "lora": PROJECTIONS,
    "pf-lora": PROJECTIONS,
    "ffa": PROJECTIONS,
    "fpa": PROJECTIONS,
    "ffba": PROJECTIONS,
    "ffba-ab": PROJECTIONS,
    "ffba-relu": PROJECTIONS,
    "ffba-qg-add": PROJECTIONS,
    "zflora": ("q", "k", "v", "o", "gate", "up", "down", "head"),
    "zflora-minimal": ("q", "k", "v", "down", "head"),
}
BASE_VARIANTS = tuple(_ALL_TARGETS)
# the -mha forms (zflora-minimal has no attention writer, so no -mha form)
MHA_VARIANTS = tuple(v + "-mha" for v in BASE_VARIANTS if v != "zflora-minimal")
VARIANTS = BASE_VARIANTS + MHA_VARIANTS

FFBA_FAMILY = ("fpa", "ffba", "ffba-ab", "ffba-relu", "ffba-qg-add")
ZFLORA_FAMILY = ("zflora", "zflora-minimal")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class LlamaArch:
    """A Llama's architecture numbers, named as in its ``config.json``: what
    the forward needs, what an AdapterConfig is checked against and what
    parameter counts are computed from. ``flora.checkpoint`` builds one from
    a checkpoint (checking the rest of the config); built directly,
    num_key_value_heads and head_dim default as in transformers. A bad
    number is a ValueError that names the field."""

    hidden_size: int  # d
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # d_ff
    vocab_size: int
    num_key_value_heads: Optional[int] = None  # None: num_attention_heads
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3"|"linear", ...} or None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    def __post_init__(self):
        def positive(k):
            # bool is an int in Python: `"num_hidden_layers": true` must not read as 1 layer
            v = getattr(self, k)
            if not _is_int(v) or v < 1:
                raise ValueError(f"LlamaArch.{k}: must be a positive integer, got {v!r}")

        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            positive(k)
        nh = self.num_attention_heads
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", nh)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // nh)
        positive("num_key_value_heads")
        positive("head_dim")
        if nh % self.num_key_value_heads:
            raise ValueError(f"LlamaArch.num_key_value_heads: num_attention_heads ({nh}) is not a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaArch.head_dim: {self.head_dim} is odd; RoPE needs an even head_dim")

    @property
    def q_dim(self) -> int:
        """d_q = num_attention_heads * head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """d_kv = num_key_value_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_projection_parameters(self) -> int:
        """Weights of one decoder layer's seven projections (q, k, v, o, gate,
        up, down): what a decode step streams per layer."""
        d = self.hidden_size
        return d * (2 * self.q_dim + 2 * self.kv_dim) + 3 * d * self.intermediate_size

    def out_width(self, p: str) -> int:
        return {"q": self.q_dim, "k": self.kv_dim, "v": self.kv_dim, "o": self.hidden_size,
                "gate": self.intermediate_size, "up": self.intermediate_size,
                "down": self.hidden_size, "head": self.vocab_size}[p]

    def in_width(self, p: str) -> int:
        return {"o": self.q_dim, "down": self.intermediate_size}.get(p, self.hidden_size)

    def shape_dict(self) -> dict:
        """The numbers an adapter file records to identify its base model."""
        return {k: getattr(self, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")}

    def to_dict(self) -> dict:
        return asdict(self)


def as_arch(shapes, what: str = "shapes") -> LlamaArch:
    """``shapes`` as a LlamaArch: itself, a dict of its fields, or a
    transformers LlamaConfig (checked as a checkpoint's config.json is)."""
    if isinstance(shapes, LlamaArch):
        return shapes
    if isinstance(shapes, dict):
        return LlamaArch(**shapes)
    if hasattr(shapes, "hidden_size") and hasattr(shapes, "to_dict"):
        from .checkpoint import arch_from_hf_config  # checkpoint imports this module

        return arch_from_hf_config(shapes)
    raise TypeError(f"{what}: expected a LlamaArch, a dict of its fields or a transformers "
                    f"LlamaConfig, got {type(shapes).__name__}")


_DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "half": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float32": "float32", "fp32": "float32", "float": "float32",
                "float64": "float64", "fp64": "float64", "double": "float64"}


def parse_dtype(value, what: str = "dtype"):
    """A model / adapter dtype: None, a torch dtype or a name users write
    ("float16", "fp16", "bf16", "torch.float32", ...), as a torch floating
    dtype flora computes in (float16, bfloat16, float32, float64); anything
    else (int, fp8, unknown names) is a clear TypeError."""
    import torch

    if value is None:
        return None
    if isinstance(value, str):
        key = value.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key not in _DTYPE_NAMES:
            raise TypeError(f"{what}: unknown dtype {value!r}; use float16, bfloat16, float32 or float64")
        return getattr(torch, _DTYPE_NAMES[key])
    if value not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{what} must be float16, bfloat16, float32 or float64 (or its name), got {value!r}")
    return value


def default_alpha(rank: int) -> float:
    """The alpha an adapter gets when none is given: 2 x rank (scale 2), as
    ``flora train --alpha`` and the benchmarks default it."""
    return 2.0 * rank


class AdapterConfig:
    """One adapter variant, its rank/scale and where it goes.

    AdapterConfig(variant, rank, alpha=None, dropout=0.0, targets="all", layers=None)

    * variant: one of ``VARIANTS`` (e.g. "ffba", "zflora-mha").
    * rank r > 0; ``scale`` = alpha / rank.
    * alpha > 0; None (the default) is 2 x rank (``default_alpha``), so scale 2.
      ``alpha`` and what is saved always hold the resolved number.
    * dropout in [0, 1): acts on the adapter state z, never on the shared input.
    * targets: "all", "mha" (attention only, same as the -mha form) or a list
      of projection names from q, k, v, o, gate, up, down (and head for zflora).
    * layers: None (every layer) or a list of layer indices; other layers
      carry no adapter.

    A config never changes once built (targets and layers are kept as
    tuples): a model's adapter tensors, scale and saved files follow it, so
    setting a field is an error; ``replace(...)`` gives a changed copy.
    """

    def __init__(self, variant: str, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
                 targets: Union[str, Sequence[str]] = "all",
                 layers: Optional[Sequence[int]] = None):
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise ValueError(f"AdapterConfig.variant: unknown variant {variant!r}; "
                             f"expected one of {', '.join(VARIANTS)}")
        if not _is_int(rank) or rank <= 0:
            raise ValueError(f"AdapterConfig.rank: must be a positive integer, got {rank!r}")
        if alpha is None:
            alpha = default_alpha(rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"AdapterConfig.alpha: must be a finite number > 0 (or None: 2 x rank), "
                             f"got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not (0.0 <= dropout < 1.0):
            raise ValueError(f"AdapterConfig.dropout: must be a number in [0, 1), got {dropout!r}")
        self.variant = variant
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.targets = self._check_targets(targets)
        self.layers = self._check_layers(layers)
        self._frozen = True

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"AdapterConfig.{name}: a config cannot change once built (a model's adapter "
                                 f"tensors and saved files follow it); cfg.replace({name}=...) gives a changed copy")
        object.__setattr__(self, name, value)

    def replace(self, **changes) -> "AdapterConfig":
        """A copy with ``changes`` (field=value), validated as a new config."""
        return AdapterConfig.from_dict({**self.to_dict(), **changes})

    # -- derived -----------------------------------------------------------
    @property
    def base_variant(self) -> str:
        """The variant without its -mha suffix."""
        return self.variant[:-4] if self.variant.endswith("-mha") else self.variant

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def resolved_targets(self) -> tuple:
        """The projections that carry adapter blocks, in canonical order."""
        t = self.targets
        full = _ALL_TARGETS[self.base_variant]
        mha = self.variant.endswith("-mha") or t == "mha"
        if isinstance(t, str):
            t = full
        if mha:
            t = [p for p in t if p in ATTN or p == "head"]
        return tuple(p for p in ALL_NAMES if p in t)

    @property
    def writers(self) -> tuple:
        """zflora: the projections that add z' = A u to the stream."""
        return tuple(p for p in self.resolved_targets if p in ("o", "down"))

    @property
    def readers(self) -> tuple:
        """zflora: the projections that read the stream through B."""
        return tuple(p for p in self.resolved_targets if p not in ("o", "down"))

    def adapts_layer(self, layer: Optional[int]) -> bool:
        return layer is None or self.layers is None or layer in self.layers

    # -- validation --------------------------------------------------------
    def _check_targets(self, targets):
        base = self.base_variant
        if isinstance(targets, str):
            if targets not in ("all", "mha"):
                raise ValueError(f"AdapterConfig.targets: must be 'all', 'mha' or a list of "
                                 f"projection names, got {targets!r}")
            if targets == "mha" and base == "zflora-minimal":
                raise ValueError("AdapterConfig.targets: zflora-minimal writes only from down, "
                                 "so it has no attention-only ('mha') form")
            result = targets
        else:
            if not isinstance(targets, (list, tuple)) or not all(isinstance(p, str) for p in targets):
                raise TypeError(f"AdapterConfig.targets: expected 'all', 'mha' or a list of "
                                f"projection names, got {targets!r}")
            # transformers' module names too (q_proj, gate_proj, lm_head), as PEFT's target_modules
            targets = ["head" if p == "lm_head" else p[:-len("_proj")] if p.endswith("_proj") else p
                       for p in targets]
            allowed = _ALL_TARGETS[base]
            if self.variant.endswith("-mha"):
                allowed = tuple(p for p in allowed if p in ATTN or p == "head")
            bad = [p for p in targets if p not in allowed]
            if bad:
                raise ValueError(f"AdapterConfig.targets: variant {self.variant} cannot use "
                                 f"{bad}; allowed: {list(allowed)}")
            if len(set(targets)) != len(targets):
                raise ValueError(f"AdapterConfig.targets: duplicate names in {list(targets)}")
            if not targets:
                raise ValueError("AdapterConfig.targets: empty list")
            result = tuple(p for p in ALL_NAMES if p in targets)
        self.targets = result
        self._check_pairs()
        return result

    def _check_pairs(self):
        """Variants whose A and B sit in different sub-blocks need both ends."""
        base, t = self.base_variant, self.resolved_targets
        if base in FFBA_FAMILY:
            for ins, out in ((("q", "k", "v"), "o"), (("gate", "up"), "down")):
                has_in = any(p in t for p in ins)
                if has_in != (out in t):
                    raise ValueError(
                        f"AdapterConfig.targets: {self.variant} puts A in {'/'.join(ins)} and "
                        f"B in {out}; give {out} together with at least one of {list(ins)}, "
                        f"got {list(t)}")
        if base in ZFLORA_FAMILY:
            if not self.writers or not self.readers:
                raise ValueError(
                    f"AdapterConfig.targets: {self.variant} needs at least one writer (o, down) "
                    f"and one reader (q, k, v, gate, up, head), got {list(t)}")

    @staticmethod
    def _check_layers(layers):
        if layers is None:
            return None
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"AdapterConfig.layers: expected None or a list of layer indices, "
                            f"got {layers!r}")
        layers = list(layers)
        if not layers:
            raise ValueError("AdapterConfig.layers: empty list (use None for every layer)")
        for i in layers:
            if not _is_int(i) or i < 0:
                raise ValueError(f"AdapterConfig.layers: indices must be integers >= 0, got {i!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"AdapterConfig.layers: duplicate indices in {layers}")
        return tuple(sorted(layers))

    def repeat_rank(self, p: str) -> int:
        """State width tiled over projection p's output by repeat-add (0: none)."""
        base, t = self.base_variant, self.resolved_targets
        if p not in t:
            return 0
        if base == "ffa" and p in PROJECTIONS:
            return 2 * self.rank
        if base == "ffba-qg-add" and p in ("q", "gate"):
            return self.rank
        return 0

    def check_width(self, p: str, width: int) -> None:
        rc = self.repeat_rank(p)
        if rc and width % rc:
            raise ValueError(
                f"AdapterConfig.rank: {self.variant} repeat-adds a state of width {rc} onto "
                f"projection {p} (width {width}), which needs {width} % {rc} == 0")

    def validate_for(self, shapes) -> "AdapterConfig":
        """Check against the model's widths (anything ``as_arch`` takes)."""
        shapes = as_arch(shapes, "validate_for")
        for p in self.resolved_targets:
            self.check_width(p, shapes.out_width(p))
        if self.layers is not None and self.layers[-1] >= shapes.num_hidden_layers:
            raise ValueError(f"AdapterConfig.layers: index {self.layers[-1]} out of range for a "
                             f"model with {shapes.num_hidden_layers} layers")
        return self

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict:
        return {"variant": self.variant, "rank": self.rank, "alpha": self.alpha,
                "dropout": self.dropout,
                "targets": self.targets if isinstance(self.targets, str) else list(self.targets),
                "layers": None if self.layers is None else list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        if not isinstance(d, dict):
            raise TypeError(f"AdapterConfig.from_dict: expected a dict, got {type(d).__name__}")
        fields = ("variant", "rank", "alpha", "dropout", "targets", "layers")
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"AdapterConfig.from_dict: unknown keys {unknown}")
        # alpha stays required here: to_dict always writes it, and a saved adapter
        # without one has lost its scale (2 x rank would be a guess)
        missing = [k for k in ("variant", "rank", "alpha") if d.get(k) is None]
        if missing:
            raise ValueError(f"AdapterConfig.from_dict: missing keys {missing}")
        return cls(**d)

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """The config as JSON; with ``path``, also written there atomically."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"AdapterConfig.from_json: not valid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "AdapterConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"AdapterConfig.load: no such file {os.fspath(path)!r}")
        with open(path) as f:
            return cls.from_json(f.read())

    def __eq__(self, other) -> bool:
        return isinstance(other, AdapterConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"AdapterConfig({args})"
