"""What transformers utilities (Trainer, PEFT helpers) look up on a model:
``model.config``, gradient checkpointing switches, ``num_parameters``."""
from __future__ import annotations

import json

from .config import LlamaArch


class HFCompat:
    """Mixin for FusedLlama; needs ``parameters()`` and ``base_state_dict()``."""

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Like transformers' num_parameters: base weights (frozen buffers) + adapter."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)
        if not only_trainable:
            sd = self.base_state_dict()
            if exclude_embeddings:
                sd.pop("model.embed_tokens.weight")
            n += sum(t.numel() for t in sd.values())
        return n


class HFConfigView:
    """The few ``model.config`` attributes transformers utilities look up."""

    model_type = "llama"

    def __init__(self, arch: LlamaArch):
        self.arch = arch
        for k, v in arch.to_dict().items():
            setattr(self, k, v)
        self.use_cache = False

    def to_dict(self) -> dict:
        return {"model_type": "llama", **self.arch.to_dict()}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
