"""The adapter registry of a FusedLlama: named adapters kept on the model's
device, switching between them, several side by side for mixed batches
(stack_adapters), enable/disable, fold/unfold, merge, save.

A mixin: it needs ``adapter_modules()``, ``arch``, ``device``,
``_rebuild(cfg)`` and the ``_adapter_config`` / ``_adapters`` / ``_stack``
state from the model it is mixed into.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import adapter_io
from .config import AdapterConfig

MERGEABLE = ("lora", "pf-lora")
UNSTACKABLE = ("ffa", "ffba-qg-add")  # repeat-add: the state reaches y inside the GEMM


class AdapterRegistry:
    @property
    def adapter_config(self) -> Optional[AdapterConfig]:
        """The current adapter's config (while stacked, the stack's); None without adapters.
        Read-only, as the config itself: the modules' tensors and scale follow it
        (load_adapter / add_adapter + set_adapter give the model another)."""
        return self._adapter_config

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

    def read_adapter(self, path) -> adapter_io.AdapterFiles:
        """A flora or PEFT LoRA adapter dir, read and validated against this base but not
        loaded: ``load_adapter(files, name)`` then only copies its tensors to the model
        (read elsewhere first, e.g. by a server outside the thread that runs its batches)."""
        return adapter_io.read_adapter(path, self.arch)

    def load_adapter(self, path, name: str = "default", activate: bool = True) -> None:
        """Load a flora or PEFT LoRA adapter dir (or one :meth:`read_adapter` read) under
        ``name`` (validated against this base)."""
        self._add("load_adapter", name, path, activate)

    def add_adapter(self, name: str, config: AdapterConfig, activate: bool = True) -> None:
        """A fresh adapter of ``config`` under ``name``, initialised as
        ``from_pretrained(adapter=config)`` initialises one (PEFT's LoRA init:
        A kaiming-uniform, B zero), e.g. to train a second task's adapter on the
        same loaded base. Its structure must be the model's adapters' (if any)."""
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"add_adapter: config must be an AdapterConfig, got {type(config).__name__}")
        if name in self._adapters:
            raise ValueError(f"add_adapter: an adapter named {name!r} is loaded already "
                             f"(delete_adapter({name!r}) first, or load_adapter to replace its tensors)")
        self._add("add_adapter", name, config, activate)

    def _add(self, what: str, name: str, source, activate: bool) -> None:
        self._check_single(what)
        self._check_unmerged(what)
        if not isinstance(name, str) or not name:  # None means the base model (adapters=[...], active_adapter)
            raise TypeError(f"{what}: name must be a non-empty string, got {name!r}")
        cfg, sd = adapter_io.resolve_adapter(source, self.arch)
        if self.adapter_config is not None and not _same_structure(cfg, self.adapter_config):
            raise ValueError(
                f"adapter {name!r} ({describe(cfg)}) does not have the structure of this model's "
                f"adapters ({describe(self.adapter_config)}); adapters sharing one FusedLlama must have "
                f"the same variant, rank, targets and layers. Load it into a new FusedLlama instead")
        # (its tensors were checked when read: a refused adapter leaves the model as it was)
        if self.adapter_config is None:  # the structure, none current: the base model until set_adapter
            self._rebuild(cfg)
        if sd is None:  # fresh: as the modules' construction initialises them
            sd = {f"{prefix}.{k}": t for prefix, m in self.adapter_modules()
                  for k, t in m.fresh_adapter_state_dict().items()}
        if name == self.active_adapter:  # its modules take the new tensors, not keep their old ones
            self.active_adapter, activate = None, True
        self._store_adapter(name, cfg, sd)
        if activate:
            self.set_adapter(name)

    def delete_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (not the active one: switch away first, to another or None)."""
        self._check_single("delete_adapter")
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self._adapters)}")
        if name == self.active_adapter:
            raise ValueError(f"delete_adapter: {name!r} is the active adapter; set_adapter() another (or None) "
                             f"first")
        del self._adapters[name]

    def set_adapter(self, name: Optional[str]) -> None:
        """Make adapter ``name`` current: copies only its tensors into the modules.
        None: no adapter current, the model computes the base model (the structure
        stays, as after ``load_adapter(..., activate=False)``), and any adapter can
        then be deleted.

        Adapters take turns in the same Parameters (the ones ``model.parameters()``
        gives): to train this one, make a new optimizer after switching (one made
        before keeps the previous adapter's moments, e.g. Adam's, for them)."""
        if name is not None and name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self._adapters)}")
        self._check_single("set_adapter")
        self._check_unmerged("set_adapter")
        # keep the current adapter's (possibly trained) tensors: switching away or setting it again
        if self.active_adapter is not None:
            cur_cfg, _ = self._adapters[self.active_adapter]
            self._store_adapter(self.active_adapter, cur_cfg, self.adapter_state_dict())
        if name is None:  # the modules keep their tensors (and fold), switched off
            self.active_adapter = None
            self._sync_enabled()
            return
        cfg, sd = self._adapters[name]
        was_folded = self._folded
        if was_folded:
            self.unfold()
        if sd is not None:
            self._load_adapter_tensors(sd)
        # same structure, but its own alpha and dropout (the folded B's carry the scale)
        self._adapter_config = cfg
        for _, m in self.adapter_modules():
            m.set_config(cfg)
        self.active_adapter = name
        self._sync_enabled()
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

    def _sync_enabled(self) -> None:
        """The one rule for the modules' adapter switch: on where an adapter is current (or
        several stacked), off in the base model and inside :meth:`disable_adapter`."""
        on = (self.active_adapter is not None or self._stack is not None) and not self._disabled
        for _, m in self.adapter_modules():
            m.set_adapter_enabled(on)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block the model computes exactly the base model, whatever the
        block loads, switches or stacks."""
        if self._merged:  # turning the adapter off would still run W + s B A
            raise ValueError("disable_adapter: an adapter was merged into the base weights, so the base "
                             "model is gone; load the model again for it (merged_state_dict() and "
                             "save_merged() merge without changing the model)")
        self._disabled += 1
        self._sync_enabled()
        try:
            yield self
        finally:
            self._disabled -= 1
            self._sync_enabled()

    def adapter_active(self) -> bool:
        return self.adapter_config is not None and any(m.adapter_enabled for _, m in self.adapter_modules())

    def fold(self) -> None:
        """Inference folding (one op per projection); undone by :meth:`unfold`."""
        if self.adapter_config is not None and not self._folded:
            for _, m in self.adapter_modules():
                m.fold()
            self._folded = True

    def refresh_fold(self) -> None:
        """Folded: fold again each module whose adapter tensors were written in place
        since (an optimizer step or copy_ while folded would leave stale copies)."""
        if self._folded:
            for _, m in self.adapter_modules():
                m.refold_if_stale()

    def unfold(self) -> None:
        if self._folded:
            for _, m in self.adapter_modules():
                m.unfold()
            self._folded = False

    def _check_unmerged(self, what: str) -> None:
        if self._merged:
            raise ValueError(f"{what}: an adapter was merged into the base weights; adapters can no longer be "
                             f"loaded, switched or stacked on this model (load the model again)")

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
        self._check_current("merge_into_base")
        if self._disabled:  # the block would run W + s B A from here on
            raise ValueError("merge_into_base: inside disable_adapter() the model computes the base; "
                             "merge after the block")
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
        No adapter current, or one already merged: the base weights as they are."""
        self._check_single("merged_state_dict")
        sd = self.base_state_dict()
        if self.active_adapter is None or self.merged:
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
        converter load as a plain Llama. Written atomically; over an earlier
        export, its weights and tokenizer are replaced as a whole (without
        ``tokenizer`` the old one is removed, not kept). This model is
        unchanged. Only lora / pf-lora adapters have a merged form."""
        from .checkpoint import save_checkpoint

        sd = self.merged_state_dict()
        save_checkpoint(path, self.arch, sd, eos_token_id=self.generation_eos_token_id, tokenizer=tokenizer,
                        generation_config=generation_config)

    def save_adapter(self, path) -> None:
        self._check_current("save_adapter")
        adapter_io.save_adapter(self, path)

    def export_peft(self, path, base_model_name_or_path: Optional[str] = None) -> None:
        self._check_current("export_peft")
        adapter_io.export_peft(self, path, base_model_name_or_path=base_model_name_or_path)

    # ------------------------------------------------- several adapters at once
    @property
    def stacked(self) -> Optional[list]:
        """The adapters held side by side (:meth:`stack_adapters`), in slot
        order; None while the model holds one adapter at a time."""
        return None if self._stack is None else list(self._stack)

    def _check_single(self, what: str) -> None:
        if self._stack is not None:
            raise ValueError(f"{what}: the model holds the adapters {self._stack} side by side "
                             f"(stack_adapters); call unstack_adapters() first")

    def _check_current(self, what: str) -> None:
        """One adapter current: not several stacked, nor the structure with none set (its
        modules then hold fresh tensors, or those of one switched off by set_adapter(None))."""
        self._check_single(what)
        if self.adapter_config is not None and self.active_adapter is None:
            raise ValueError(f"{what}: no adapter is current (loaded: {sorted(self._adapters)}); "
                             f"set_adapter(name) first")

    def stack_adapters(self, names) -> None:
        """Hold the loaded adapters ``names`` side by side, so that each row of
        one batch runs its own adapter: ``model(ids, adapters=[...])`` and
        ``model.generate(ids, adapters=[...])`` then take one name per row
        (None: the base model).

        The fused storage is rebuilt once with rank n*r (slot i holds
        ``names[i]``; each adapter keeps its own alpha). Every projection still
        runs one GEMM, n*r instead of r rows or columns wider, and each B / C
        product reads only its row's slot of the adapter state (one masking op
        before it). For inference: training, saving, merging, loading and
        set_adapter need :meth:`unstack_adapters` first. Not for ffa and
        ffba-qg-add, whose repeat-add adds the state inside the GEMM, where no
        row's slot can be picked."""
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise ValueError(f"stack_adapters: expected a non-empty list of adapter names, got {names!r}")
        names = list(names)
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise KeyError(f"stack_adapters: no adapter named {unknown[0]!r}; loaded: {sorted(self._adapters)}")
        if len(set(names)) != len(names):
            raise ValueError(f"stack_adapters: names repeat in {names}")
        self._check_unmerged("stack_adapters")
        cfgs = [self._adapters[n][0] for n in names]
        if cfgs[0].base_variant in UNSTACKABLE:
            raise ValueError(f"stack_adapters: {cfgs[0].variant} adds its adapter state to the output "
                             f"inside the GEMM (repeat-add), where no row can pick its own adapter; "
                             f"variants other than {', '.join(UNSTACKABLE)} can be stacked")
        if self._stack == names:
            return
        self.unstack_adapters()
        if self.active_adapter is not None:  # keep what training did to it
            self._store_adapter(self.active_adapter, self.adapter_config, self.adapter_state_dict())
        c0, n = cfgs[0], len(names)
        # rank n*r at adapter 0's scale: alpha n*alpha_0; the others' B's carry alpha_i / alpha_0
        stacked = c0.replace(rank=c0.rank * n, alpha=c0.alpha * n, dropout=0.0)
        # what unstack_adapters gives back: the config, an optimizer's Parameters, the fold
        unstacked = (self.adapter_config, dict(self.named_parameters()), self._folded)
        try:
            self._rebuild(stacked)
        except BaseException:
            self._reuse_parameters(unstacked[1])  # the rebuild restored the old structure with new ones
            raise
        self._unstacked = unstacked
        sds = [{k: (t * (c.alpha / c0.alpha) if k.rpartition(".")[2].startswith("B_") else t)
                for k, t in self._adapters[name][1].items()} for name, c in zip(names, cfgs)]
        self._load_adapter_tensors(stack_state_dicts(sds, self.adapter_state_dict()))
        self._stack = names
        self._sync_enabled()
        self.fold()

    def unstack_adapters(self) -> None:
        """Back from :meth:`stack_adapters` to one adapter at a time, as the
        model was before: the same adapter current (or none), folded or not."""
        if self._stack is None:
            return
        cfg, params, folded = self._unstacked
        name = self.active_adapter
        self._rebuild(cfg)
        self._reuse_parameters(params)
        self._stack, self._unstacked, self.active_adapter = None, None, None
        if name is None:  # none was current: the base model
            self._sync_enabled()
        else:
            self.set_adapter(name)
        if folded:
            self.fold()

    def _reuse_parameters(self, params: dict) -> None:
        """Put back the adapter Parameters ``params`` (name -> Parameter) the model had before
        a rebuild, where they fit: an optimizer made before stack_adapters keeps training the
        model's own tensors after unstack_adapters (not orphans)."""
        for prefix, m in self.adapter_modules():
            for n in m._adapter_names:
                old, new = params.get(f"{prefix}.{n}"), getattr(m, n)
                if old is not None and (old.shape, old.dtype, old.device) == (new.shape, new.dtype, new.device):
                    with torch.no_grad():
                        old.copy_(new)
                    setattr(m, n, old)

    def adapter_rows(self, adapters, batch: int) -> Optional[torch.Tensor]:
        """Per-row adapter names (None: the base model) -> slot indices [batch]
        (-1: no adapter) on the model's device, for a stacked model; None for
        ``adapters=None`` on a model holding one adapter at a time."""
        if adapters is None:
            if self._stack is None:
                return None
            raise ValueError(f"this model holds the adapters {self._stack} side by side (stack_adapters): "
                             f"pass adapters=[one name or None per row]")
        if self._stack is None:
            raise ValueError("adapters=[...] picks one adapter per row of a model holding several "
                             "(stack_adapters); this one holds one at a time (set_adapter switches it)")
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or len(adapters) != batch:
            raise ValueError(f"adapters: expected a list of {batch} names (one per row, None for the "
                             f"base model), got {adapters!r}")
        bad = [a for a in adapters if a is not None and a not in self._stack]
        if bad:
            raise KeyError(f"adapters: {bad[0]!r} is not among the stacked adapters {self._stack}")
        return torch.tensor([-1 if a is None else self._stack.index(a) for a in adapters],
                            dtype=torch.long, device=self.device)


def stack_state_dicts(sds: list, like: dict) -> dict:
    """Same-structure adapter state dicts side by side, shaped as ``like`` (the
    stacked model's own tensors): a dimension n times as wide is the rank, so
    the tensors are concatenated along it (A's rows, B's columns, slot i
    first-to-last) and block-diagonal where both are (C: each slot's C maps
    its own state)."""
    n, out = len(sds), {}
    for k, want in like.items():
        parts = [sd[k] for sd in sds]
        wide = [d for d in range(want.dim()) if want.shape[d] != parts[0].shape[d]]
        if any(want.shape[d] != n * parts[0].shape[d] for d in wide) or len(wide) > 2:
            raise ValueError(f"stack_state_dicts: {k} has shape {list(parts[0].shape)}, "
                             f"which does not stack {n} times into {list(want.shape)}")
        out[k] = (parts[0] if not wide else torch.cat(parts, wide[0]) if len(wide) == 1
                  else torch.block_diag(*parts))
    return out


def _structure(cfg) -> tuple:
    """What decides the modules' tensors and storage (alpha and dropout do not)."""
    return cfg.variant, cfg.rank, cfg.resolved_targets, cfg.layers


def _same_structure(a, b) -> bool:
    return _structure(a) == _structure(b)


def describe(cfg) -> str:
    if cfg is None:
        return "none"
    return f"{cfg.variant}, rank {cfg.rank}"
