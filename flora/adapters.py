"""The adapter registry of a FusedLlama: named adapters kept on the model's
device, switching between them, enable/disable, fold/unfold, merge, save.

A mixin: it needs ``adapter_modules()``, ``adapter_config``, ``arch``,
``device`` and ``_rebuild(cfg)`` from the model it is mixed into.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import adapter_io

MERGEABLE = ("lora", "pf-lora")


class AdapterRegistry:
    def adapter_state_dict(self) -> dict:
        """Current adapter tensors, keyed ``<module path>.<A_p|B_p|C_p>`` (detached)."""
        out = {}
        for prefix, m in self.adapter_modules():
            for k, t in m.adapter_state_dict().items():
                out[f"{prefix}.{k}"] = t
        return out

    def _load_adapter_tensors(self, sd: dict) -> None:
        groups: dict = {prefix: {} for prefix, _ in self.adapter_modules()}
        for k, t in sd.items():
            prefix, _, name = k.rpartition(".")
            if prefix not in groups:
                raise KeyError(f"adapter tensor {k!r} belongs to no flora module of this model")
            groups[prefix][name] = t
        with torch.no_grad():
            for prefix, m in self.adapter_modules():
                m.load_adapter_state_dict(groups[prefix], strict=True)

    def _store_adapter(self, name: str, cfg, sd: dict) -> None:
        # adapters kept on the model's device so switching is a device-side copy
        # copies: never alias the live Parameters (or the caller's tensors)
        self._adapters[name] = (cfg, {k: v.detach().to(self.device, copy=True) for k, v in sd.items()})

    def load_adapter(self, path, name: str = "default", activate: bool = True) -> None:
        """Load a flora or PEFT LoRA adapter dir under ``name`` (validated against this base)."""
        cfg, sd = adapter_io.resolve_adapter(path, self.arch)
        if self.adapter_config is None:
            self._rebuild(cfg)
        elif not _same_structure(cfg, self.adapter_config):
            raise ValueError(
                f"adapter {name!r} ({describe(cfg)}) does not have the structure of this model's "
                f"adapters ({describe(self.adapter_config)}); adapters sharing one FusedLlama must have "
                f"the same variant, rank, targets and layers. Load it into a new FusedLlama instead")
        adapter_io.check_adapter_state_dict(self.arch, cfg, sd, where=str(path))
        self._store_adapter(name, cfg, sd)
        if activate:
            self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        """Make adapter ``name`` current: copies only its tensors into the modules."""
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self._adapters)}")
        if self._merged:
            raise ValueError("an adapter was merged into the base weights; switching is no longer possible")
        # save the current adapter's (possibly trained) tensors before switching away
        if self.active_adapter is not None and self.active_adapter != name:
            cur_cfg, _ = self._adapters[self.active_adapter]
            self._store_adapter(self.active_adapter, cur_cfg, self.adapter_state_dict())
        cfg, sd = self._adapters[name]
        was_folded = self._folded
        if was_folded:
            self.unfold()
        if sd is not None:
            self._load_adapter_tensors(sd)
        self.active_adapter = name
        self._set_enabled(True)
        if was_folded:
            self.fold()

    @property
    def folded(self) -> bool:
        """Adapters folded into the fused storage (inference form)."""
        return self._folded

    @property
    def merged(self) -> bool:
        """An adapter was merged into the base weights."""
        return self._merged

    @property
    def adapter_names(self) -> list:
        return sorted(self._adapters)

    def _set_enabled(self, flag: bool) -> None:
        for _, m in self.adapter_modules():
            m.set_adapter_enabled(flag)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block the model computes exactly the base model."""
        states = [(m, m.adapter_enabled) for _, m in self.adapter_modules()]
        try:
            for m, _ in states:
                m.set_adapter_enabled(False)
            yield self
        finally:
            for m, flag in states:
                m.set_adapter_enabled(flag)

    def adapter_active(self) -> bool:
        return self.adapter_config is not None and any(m.adapter_enabled for _, m in self.adapter_modules())

    def fold(self) -> None:
        """Inference folding (one op per projection); undone by :meth:`unfold`."""
        if self.adapter_config is not None and not self._folded:
            for _, m in self.adapter_modules():
                m.fold()
            self._folded = True

    def unfold(self) -> None:
        if self._folded:
            for _, m in self.adapter_modules():
                m.unfold()
            self._folded = False

    def _check_mergeable(self) -> None:
        cfg = self.adapter_config
        if cfg is None:
            raise ValueError("no adapter to merge")
        if cfg.base_variant not in MERGEABLE:
            raise ValueError(
                f"variant {cfg.variant!r} cannot be merged into the base weights (only "
                f"{', '.join(MERGEABLE)} and their -mha forms can); it already runs inside the base GEMMs")

    def merge_into_base(self) -> None:
        """W += s B A for lora / pf-lora; other variants cannot be merged."""
        self._check_mergeable()
        self.unfold()
        with torch.no_grad():
            for _, m in self.adapter_modules():
                m.merge_into_base()
        self._merged = True

    def merged_state_dict(self) -> dict:
        """The base weights under their HF names with the lora / pf-lora adapter
        added (W + s B A in float64, rounded once to W's dtype, as
        :meth:`merge_into_base`), as new tensors: the model is left as it is.
        No adapter, or one already merged: the base weights as they are."""
        sd = self.base_state_dict()
        if self.adapter_config is None or self.merged:
            return sd
        self._check_mergeable()
        s = self.adapter_config.scale
        for module, A, B in adapter_io.lora_factors(self.adapter_state_dict()):
            w = sd[module + ".weight"]
            sd[module + ".weight"] = (w.double() + s * (B.double() @ A.double())).to(w.dtype)
        return sd

    def save_merged(self, path, tokenizer=None, generation_config: Optional[dict] = None) -> None:
        """Write an HF Llama checkpoint directory (config.json, safetensors,
        generation_config.json (``generation_config``: e.g. the source's, so its
        sampling defaults and stop tokens come along), and the tokenizer's files
        when given) holding
        :meth:`merged_state_dict`: what transformers, vLLM or llama.cpp's
        converter load as a plain Llama. Written atomically; this model is
        unchanged. Only lora / pf-lora adapters have a merged form."""
        from .checkpoint import save_checkpoint

        sd = self.merged_state_dict()
        save_checkpoint(path, self.arch, sd, eos_token_id=self.generation_eos_token_id, tokenizer=tokenizer,
                        generation_config=generation_config)

    def save_adapter(self, path) -> None:
        adapter_io.save_adapter(self, path)

    def export_peft(self, path, base_model_name_or_path: Optional[str] = None) -> None:
        adapter_io.export_peft(self, path, base_model_name_or_path=base_model_name_or_path)


def _structure(cfg) -> tuple:
    """What decides the modules' tensors and storage (alpha and dropout do not)."""
    return (cfg.variant, cfg.rank, cfg.resolved_targets, None if cfg.layers is None else tuple(cfg.layers))


def _same_structure(a, b) -> bool:
    return _structure(a) == _structure(b)


def describe(cfg) -> str:
    if cfg is None:
        return "none"
    return f"{cfg.variant}, rank {cfg.rank}"
