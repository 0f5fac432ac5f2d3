"""flora.patch (this module: flora.hf_patch): put flora modules inside a transformers LlamaForCausalLM, in place.

Each decoder layer's ``self_attn`` and ``mlp`` are replaced by modules with
the same call signature whose projections are flora's fused ones (built once
from the layer's own weights; the old Linear weights then point into the
fused storage). Everything else (RoPE, the KV cache, masks, the attention
backend, generate(), Trainer) stays transformers' own.

Only variants whose adapter state stays inside one sub-block can live in an
unmodified transformers layer: lora, pf-lora, ffa, fpa, ffba, ffba-relu,
ffba-qg-add (and their -mha forms). ffba-ab hands state from sub-block to
sub-block and zflora widens the residual stream; both need FusedLlama.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .adapter_io import resolve_adapter
from .checkpoint import arch_from_hf_config
from .modules import FusedAttentionProjections, FusedMLP, FusedOutputProjection

PATCHABLE = ("lora", "pf-lora", "ffa", "fpa", "ffba", "ffba-relu", "ffba-qg-add")


class FloraLlamaAttention(nn.Module):
    """Drop-in for LlamaAttention: q/k/v in one fused flora op, o with its adapter."""

    def __init__(self, attn, config, layer: int, num_layers: int, adapter_dtype=None):
        super().__init__()
        # the attributes transformers' attention backends read from the module
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.num_key_value_groups = attn.head_dim, attn.num_key_value_groups
        self.scaling, self.attention_dropout, self.is_causal = attn.scaling, attn.attention_dropout, True
        kw = dict(config=config, layer=layer, num_layers=num_layers, adapter_dtype=adapter_dtype)
        self.qkv = FusedAttentionProjections.from_linear(attn.q_proj, attn.k_proj, attn.v_proj, **kw)
        self.o = FusedOutputProjection.from_linear(attn.o_proj, **kw)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        from transformers.models.llama.modeling_llama import (ALL_ATTENTION_FUNCTIONS,
                                                              apply_rotary_pos_emb,
                                                              eager_attention_forward)

        B, T, d = hidden_states.shape
        self.qkv.refold_if_stale()  # folded by the user, then written in place
        self.o.refold_if_stale()
        q, k, v, state = self.qkv(hidden_states.reshape(B * T, d))
        q = q.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # the cache arrives as `cache` (transformers >= 5.24), `past_key_values` (5.0 - 5.23) or
        # `past_key_value` (4.x); it must not reach the attention function. update(k, v, layer,
        # cache_kwargs) is the call every version accepts: 5.0's and 4.x's static caches need
        # cache_position from it, later versions ignore it.
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_value", None)
        cache = cache if cache is not None else past_key_values if past_key_values is not None else legacy
        if cache is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            k, v = cache.update(k, v, self.layer_idx, cache_kwargs)
        impl = self.config._attn_implementation
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        else:  # transformers before get_interface: what its own LlamaAttention does there
            attend = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        out, weights = attend(self, q, k, v, attention_mask,
                              dropout=0.0 if not self.training else self.attention_dropout,
                              scaling=self.scaling, **kwargs)
        h, _ = self.o(out.reshape(B * T, -1), state)
        return h.view(B, T, d), weights


class FloraLlamaMLP(nn.Module):
    """Drop-in for LlamaMLP: gate/up in one fused op, down with its adapter."""

    def __init__(self, mlp, config, layer: int, num_layers: int, adapter_dtype=None):
        super().__init__()
        self.mlp = FusedMLP.from_linear(mlp.gate_proj, mlp.up_proj, mlp.down_proj, config=config,
                                        layer=layer, num_layers=num_layers, adapter_dtype=adapter_dtype)

    def forward(self, x):
        B, T, d = x.shape
        self.mlp.refold_if_stale()
        h, _ = self.mlp(x.reshape(B * T, d))
        return h.view(B, T, d)


def patch(hf_model, config, adapter_dtype: Optional[torch.dtype] = None):
    """Swap ``hf_model``'s attention and MLP projections for flora modules, in place.

    ``config``: an ``AdapterConfig`` (fresh adapter) or a flora / PEFT LoRA
    adapter directory (its tensors are loaded). Base weights are frozen; the
    adapter tensors are the only trainable parameters. Returns ``hf_model``.
    """
    if not hasattr(hf_model, "model") or not hasattr(hf_model.model, "layers"):
        raise TypeError(f"flora.patch expects a transformers LlamaForCausalLM, got {type(hf_model).__name__}")
    arch = arch_from_hf_config(hf_model.config)  # Llama, no biases, supported RoPE
    cfg, sd = resolve_adapter(config, arch)  # validated against this model's shapes, its tensors checked
    if cfg.base_variant not in PATCHABLE:
        raise ValueError(
            f"flora.patch cannot put variant {cfg.variant!r} into a transformers model: its adapter "
            f"state crosses sub-blocks (ffba-ab) or widens the residual stream (zflora), which an "
            f"unmodified transformers layer cannot carry. Use flora.FusedLlama.from_pretrained(model, "
            f"adapter=...) instead. Patchable: {', '.join(PATCHABLE)}")
    if any(isinstance(layer.self_attn, FloraLlamaAttention) for layer in hf_model.model.layers):
        raise ValueError("this model is already patched by flora")
    hf_model.requires_grad_(False)
    n = len(hf_model.model.layers)
    for i, layer in enumerate(hf_model.model.layers):
        layer.self_attn = FloraLlamaAttention(layer.self_attn, cfg, i, n, adapter_dtype)
        layer.mlp = FloraLlamaMLP(layer.mlp, cfg, i, n, adapter_dtype)
    if sd is not None:
        groups = {}
        for k, t in sd.items():
            prefix, _, name = k.rpartition(".")
            groups.setdefault(prefix, {})[name] = t
        for i, layer in enumerate(hf_model.model.layers):
            for prefix, mod in ((f"layers.{i}.attn", layer.self_attn.qkv), (f"layers.{i}.o", layer.self_attn.o),
                                (f"layers.{i}.mlp", layer.mlp.mlp)):
                mod.load_adapter_state_dict(groups.get(prefix, {}), strict=True)
    hf_model.flora_adapter_config = cfg
    return hf_model


def flora_modules(hf_model):
    """The flora modules of a patched model (for enabling/disabling, folding)."""
    for layer in hf_model.model.layers:
        if isinstance(layer.self_attn, FloraLlamaAttention):
            yield layer.self_attn.qkv
            yield layer.self_attn.o
        if isinstance(layer.mlp, FloraLlamaMLP):
            yield layer.mlp.mlp
