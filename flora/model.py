"""FusedLlama: a Llama decoder whose projections are flora's fused modules.

The whole forward is in :meth:`FusedLlama._run_layers` (embedding, RMSNorm,
RoPE, grouped-query attention, SwiGLU MLP, head), so a reader can check it
against the Llama paper in one screen. The adapter "carry" (zFLoRA's extra
residual-stream channels, or ffba-ab's handed-on state) travels next to the
hidden state ``h`` as a separate tensor: RMSNorm, RoPE and attention never see
it, exactly as the spec says.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nvtx
from .checkpoint import (CheckpointError, LlamaArch, load_checkpoint,
                         state_dict_from_hf_model)

MERGEABLE = ("lora", "pf-lora")


# --------------------------------------------------------------------------
# Llama pieces (written to match transformers' rounding: norm in fp32, cast
# back, then scale; RoPE tables in fp32 cast to the activation dtype)
# --------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(arch: LlamaArch) -> Tensor:
    """Inverse RoPE frequencies, with Llama-3 (or linear) scaling when configured."""
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = arch.rope_scaling
    if sc is None:
        return inv
    if sc["rope_type"] == "linear":
        return inv / sc["factor"]
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype):
    """cos, sin [B, 1, T, head_dim] for integer positions [B, T]."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_mask_4d(key_valid: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Boolean SDPA mask [B, 1, Tq, Tk]: causal over slots, padding keys hidden.

    ``q_pos``/``k_pos`` are slot indices (not RoPE positions). A query row that
    would see nothing (a left-pad token) is allowed to see its own slot, so
    SDPA never yields NaN; those rows are padding and never read.
    """
    causal = k_pos[None, :] <= q_pos[:, None]  # [Tq, Tk]
    mask = causal[None] & key_valid[:, None, :]  # [B, Tq, Tk]
    empty = ~mask.any(-1, keepdim=True)
    mask = mask | (empty & (k_pos[None, :] == q_pos[:, None])[None])
    return mask[:, None]


class CausalLMOutput(dict):
    """``.logits`` and ``.loss`` (None without labels); dict- and tuple-indexable
    like transformers' ModelOutput, which is what ``Trainer`` reads."""

    def __init__(self, logits: Tensor, loss: Optional[Tensor] = None):
        super().__init__()
        if loss is not None:
            self["loss"] = loss
        self["logits"] = logits

    @property
    def logits(self) -> Tensor:
        return dict.__getitem__(self, "logits")

    @property
    def loss(self) -> Optional[Tensor]:
        return self.get("loss")

    def __getitem__(self, k):
        if isinstance(k, (int, slice)):
            return self.to_tuple()[k]
        return dict.__getitem__(self, k)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch=None) -> Tensor:
    """Next-token cross entropy in fp32; label -100 is ignored."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _modules():
    from . import modules
    return modules


class FusedLlamaLayer(nn.Module):
    """One decoder layer's weights; the computation lives in FusedLlama._run_layers."""

    def __init__(self, sd: dict, i: int, cfg, mod, n_layers: int, adapter_dtype=None):
        super().__init__()
        p = f"model.layers.{i}."
        kw = dict(config=cfg, layer=i, num_layers=n_layers, adapter_dtype=adapter_dtype)
        self.register_buffer("input_norm", sd[p + "input_layernorm.weight"], persistent=False)
        self.register_buffer("post_norm", sd[p + "post_attention_layernorm.weight"], persistent=False)
        self.attn = mod.FusedAttentionProjections(
            sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"],
            sd[p + "self_attn.v_proj.weight"], **kw)
        self.o = mod.FusedOutputProjection(sd[p + "self_attn.o_proj.weight"], **kw)
        self.mlp = mod.FusedMLP(sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"],
                                sd[p + "mlp.down_proj.weight"], **kw)


class FusedLlama(nn.Module):
    """A Llama causal LM with flora adapters fused into its projection GEMMs.

    Build it with :meth:`from_pretrained`. Base weights are frozen buffers;
    only adapter tensors are trainable Parameters (so ``state_dict()`` holds
    just the adapter).
    """

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch

    def __init__(self, arch: LlamaArch, sd: dict, adapter_config=None, adapter_dtype=None):
        super().__init__()
        self.arch = arch
        mod = _modules()
        self.adapter_config = adapter_config
        self.adapter_dtype = adapter_dtype
        n = arch.num_hidden_layers
        self.register_buffer("embed", sd["model.embed_tokens.weight"], persistent=False)
        self.layers = nn.ModuleList(FusedLlamaLayer(sd, i, adapter_config, mod, n, adapter_dtype)
                                    for i in range(n))
        self.register_buffer("final_norm", sd["model.norm.weight"], persistent=False)
        w_head = self.embed if arch.tie_word_embeddings else sd["lm_head.weight"]
        self.head = mod.FusedLMHead(w_head, config=adapter_config, adapter_dtype=adapter_dtype)
        if arch.tie_word_embeddings:
            self.embed = self.head.weight  # one tensor for both (a view when the head is fused)
        self.register_buffer("inv_freq", rope_inv_freq(arch).to(self.embed.device), persistent=False)
        self._adapters: dict = {}  # name -> (AdapterConfig, adapter state dict)
        self.active_adapter: Optional[str] = None
        self._folded = False
        self._merged = False
        self.gradient_checkpointing = False
        self.config = _HFConfigView(arch)

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(cls, source, adapter=None, dtype=None, device=None,
                        adapter_dtype=None) -> "FusedLlama":
        """Load a local HF Llama checkpoint dir (or an in-memory LlamaForCausalLM).

        ``adapter``: an ``AdapterConfig`` (fresh adapter), a flora adapter dir,
        or a PEFT LoRA adapter dir (loaded as ``pf-lora``). ``adapter_dtype``:
        dtype of the adapter tensors (default: the base dtype; e.g. fp32 adapters
        on a bf16 base for training). Both dtypes: a torch dtype or its name
        ("bfloat16", "bf16", "float16", ...; ``dtype="auto"``: the checkpoint's).
        Never touches the network.
        """
        from .config import parse_dtype

        # names users write ("bf16", "float16"); int / fp8 refused here, not deep in a kernel
        dtype = None if isinstance(dtype, str) and dtype.strip().lower() == "auto" else parse_dtype(dtype, "dtype")
        adapter_dtype = parse_dtype(adapter_dtype, "adapter_dtype")
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isfile(path):
                raise CheckpointError(
                    f"{path} is a file; FusedLlama.from_pretrained expects a checkpoint directory "
                    f"(config.json + *.safetensors)")
            if not os.path.isdir(path):
                raise FileNotFoundError(
                    f"{path!r} is not a local directory. flora loads checkpoints from local "
                    f"directories only and never downloads (no network access is attempted); "
                    f"download the model first and pass its directory")
            arch, sd = load_checkpoint(path)
            copy = False
        elif hasattr(source, "config") and hasattr(source, "state_dict"):
            if getattr(source.config, "model_type", None) != "llama":
                raise CheckpointError(
                    f"{type(source).__name__}: model_type is {getattr(source.config, 'model_type', None)!r}; "
                    f"FusedLlama needs a Llama model")
            arch, sd = state_dict_from_hf_model(source)
            copy = True  # never alias the caller's model: merge_into_base writes in place
        else:
            raise TypeError(
                f"source must be a checkpoint directory or a transformers LlamaForCausalLM, "
                f"got {type(source).__name__}")
        if dtype is None:
            dtype = sd["model.embed_tokens.weight"].dtype
        if device is None:  # files load to CPU; an in-memory model stays where it is
            device = sd["model.embed_tokens.weight"].device
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"the checkpoint's dtype is {dtype}; pass dtype= float16, bfloat16, float32 or float64")
        sd = {k: v.to(device=device, dtype=dtype, copy=copy) for k, v in sd.items()}

        from . import adapter_io
        cfg, adapter_sd, name = None, None, None
        if adapter is not None:
            cfg, adapter_sd = adapter_io.resolve_adapter(adapter, arch)
            name = "default"
        with torch.no_grad():
            model = cls(arch, sd, cfg, adapter_dtype)
        del sd
        if adapter_sd is not None:
            adapter_io.check_adapter_state_dict(model.arch, cfg, adapter_sd, where=str(adapter))
            model._store_adapter(name, cfg, adapter_sd)
            model.set_adapter(name)
        elif cfg is not None:
            model._adapters[name] = (cfg, None)  # fresh init lives in the modules
            model.active_adapter = name
        return model

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def adapter_modules(self):
        """(prefix, module) for every flora module, in a fixed order."""
        for i, layer in enumerate(self.layers):
            yield f"layers.{i}.attn", layer.attn
            yield f"layers.{i}.o", layer.o
            yield f"layers.{i}.mlp", layer.mlp
        yield "head", self.head

    # --------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                num_items_in_batch=None) -> CausalLMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        B, T = input_ids.shape
        dev = self.device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            key_valid = torch.ones(B, T, dtype=torch.bool, device=dev)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {list(attention_mask.shape)} != input_ids "
                                 f"shape {list(input_ids.shape)}")
            key_valid = attention_mask.to(dev).bool()
        if position_ids is None:
            position_ids = positions_from_mask(key_valid)
        slots = torch.arange(T, device=dev)
        mask = attention_mask_4d(key_valid, slots, slots)
        logits = self._run_layers(input_ids, position_ids.to(dev), mask)
        loss = None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch)
        return CausalLMOutput(logits=logits, loss=loss)

    def _run_layers(self, input_ids: Tensor, positions: Tensor, mask: Tensor,
                    cache=None, last_only: bool = False) -> Tensor:
        """The Llama forward. input_ids/positions [B, T]; mask bool [B, 1, T, K]."""
        a = self.arch
        B, T = input_ids.shape
        M, dt = B * T, self.dtype
        h = F.embedding(input_ids, self.embed).reshape(M, a.hidden_size)
        carry = _modules().initial_carry(self.adapter_config, M, dt, h.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, dt)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint
                h, carry = checkpoint(self._layer, layer, i, h, carry, B, T, cos, sin, mask, cache,
                                      use_reentrant=False)
            else:
                h, carry = self._layer(layer, i, h, carry, B, T, cos, sin, mask, cache)
        if last_only:  # generation needs only the last position's logits
            h = h.view(B, T, -1)[:, -1]
            carry = None if carry is None else carry.view(B, T, -1)[:, -1]
            T = 1
        n = rms_norm(h, self.final_norm, a.rms_norm_eps)
        return self.head(n, carry).view(B, T, -1)

    def _layer(self, layer, i, h, carry, B, T, cos, sin, mask, cache):
        a = self.arch
        hd, nh, nkv = a.head_dim, a.num_attention_heads, a.num_key_value_heads
        # attention sub-block: x = RMSNorm(h); q, k, v (+ adapter state for o)
        with nvtx.range("attn", i):  # NVTX ranges: no-ops unless flora.nvtx.enable()
            x = rms_norm(h, layer.input_norm, a.rms_norm_eps)
            q, k, v, state = layer.attn(x, carry)
            q = q.view(B, T, nh, hd).transpose(1, 2)
            k = k.view(B, T, nkv, hd).transpose(1, 2)
            v = v.view(B, T, nkv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.update(i, k, v)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nh != nkv)
            att = att.transpose(1, 2).reshape(B * T, nh * hd)
            h, carry = layer.o(att, state, residual=h, carry=carry)
        # MLP sub-block: SwiGLU with the residual add inside the module
        with nvtx.range("mlp", i):
            x2 = rms_norm(h, layer.post_norm, a.rms_norm_eps)
            h, carry = layer.mlp(x2, residual=h, carry=carry)
        return h, carry

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    # ------------------------------------------------------------ generation
    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id=None, attention_mask: Optional[Tensor] = None,
                 pad_token_id: Optional[int] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, streamer=None,
                 use_cuda_graph: Optional[bool] = None) -> Tensor:
        """Prompt + generated tokens [B, T + n]; see flora.generation.generate."""
        from .generation import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, eos_token_id=eos_token_id, attention_mask=attention_mask,
                        pad_token_id=pad_token_id, seed=seed, generator=generator,
                        streamer=streamer, use_cuda_graph=use_cuda_graph)

    def measure_latency(self, batch: int, prompt_len: int, new_tokens: int,
                        use_cuda_graph: Optional[bool] = None, repeats: int = 5, warmup: int = 1) -> dict:
        """Median TTFT and TPOT in seconds (see flora.generation.measure_latency)."""
        from .generation import measure_latency
        return measure_latency(self, batch, prompt_len, new_tokens, use_cuda_graph=use_cuda_graph,
                               repeats=repeats, warmup=warmup)

    # -------------------------------------------------------------- adapters
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
        from . import adapter_io
        cfg, sd = adapter_io.resolve_adapter(path, self.arch)
        if self.adapter_config is None:
            self._rebuild(cfg)
        elif not _same_structure(cfg, self.adapter_config):
            raise ValueError(
                f"adapter {name!r} ({_describe(cfg)}) does not have the structure of this model's "
                f"adapters ({_describe(self.adapter_config)}); adapters sharing one FusedLlama must have "
                f"the same variant, rank, targets and layers. Load it into a new FusedLlama instead")
        adapter_io.check_adapter_state_dict(self.arch, cfg, sd, where=str(path))
        self._store_adapter(name, cfg, sd)
        if activate:
            self.set_adapter(name)

    def add_adapter(self, name: str, sd: Optional[dict] = None) -> None:
        """Register the current adapter tensors (or ``sd``) under ``name``."""
        if self.adapter_config is None:
            raise ValueError("this FusedLlama has no adapter structure; load it with adapter=AdapterConfig(...)")
        self._store_adapter(name, self.adapter_config, sd if sd is not None else self.adapter_state_dict())

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

    def merge_into_base(self) -> None:
        """W += s B A for lora / pf-lora; other variants cannot be merged."""
        cfg = self.adapter_config
        if cfg is None:
            raise ValueError("no adapter to merge")
        if cfg.variant not in MERGEABLE:
            raise ValueError(
                f"variant {cfg.variant!r} cannot be merged into the base weights (only "
                f"{', '.join(MERGEABLE)} can); it already runs inside the base GEMMs")
        self.unfold()
        with torch.no_grad():
            for _, m in self.adapter_modules():
                m.merge_into_base()
        self._merged = True

    def save_adapter(self, path) -> None:
        from .adapter_io import save_adapter
        save_adapter(self, path)

    def export_peft(self, path, base_model_name_or_path: Optional[str] = None) -> None:
        from .adapter_io import export_peft
        export_peft(self, path, base_model_name_or_path=base_model_name_or_path)

    def _rebuild(self, cfg) -> None:
        """Give an adapter-less model an adapter structure (rebuilds fused storage once)."""
        sd = self.base_state_dict()
        with torch.no_grad():
            fresh = FusedLlama(self.arch, sd, cfg, self.adapter_dtype)
        self.layers, self.head, self.adapter_config = fresh.layers, fresh.head, cfg
        if self.arch.tie_word_embeddings:
            self.embed = fresh.embed
        self._folded = False

    def base_state_dict(self) -> dict:
        """The base weights under their HF names (views of the fused storage)."""
        sd = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.final_norm}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            sd.update({p + "input_layernorm.weight": layer.input_norm,
                       p + "post_attention_layernorm.weight": layer.post_norm,
                       p + "self_attn.o_proj.weight": layer.o.base_weight("o")})
            for proj in ("q", "k", "v"):
                sd[p + f"self_attn.{proj}_proj.weight"] = layer.attn.base_weight(proj)
            for proj in ("gate", "up", "down"):
                sd[p + f"mlp.{proj}_proj.weight"] = layer.mlp.base_weight(proj)
        if not self.arch.tie_word_embeddings:
            sd["lm_head.weight"] = self.head.weight
        return sd

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Like transformers' num_parameters: base weights (frozen buffers) + adapter."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)
        if not only_trainable:
            sd = self.base_state_dict()
            if exclude_embeddings:
                sd.pop("model.embed_tokens.weight")
            n += sum(t.numel() for t in sd.values())
        return n

    def extra_repr(self) -> str:
        a = self.arch
        return (f"layers={a.num_hidden_layers}, d={a.hidden_size}, heads={a.num_attention_heads}/"
                f"{a.num_key_value_heads}, d_ff={a.intermediate_size}, vocab={a.vocab_size}, "
                f"adapter={_describe(self.adapter_config)}")


def positions_from_mask(key_valid: Tensor) -> Tensor:
    """RoPE positions for (left-)padded rows: count of real tokens before each slot."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)


def _structure(cfg) -> tuple:
    """What decides the modules' tensors and storage (alpha and dropout do not)."""
    return (cfg.variant, cfg.rank, cfg.resolved_targets, None if cfg.layers is None else tuple(cfg.layers))


def _same_structure(a, b) -> bool:
    return _structure(a) == _structure(b)


def _describe(cfg) -> str:
    if cfg is None:
        return "none"
    return f"{cfg.variant}, rank {cfg.rank}"


class _HFConfigView:
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
        import json
        return json.dumps(self.to_dict(), indent=2)
