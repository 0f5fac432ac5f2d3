"""FusedLlama: a Llama decoder whose projections are flora's fused modules.

The whole forward is in :meth:`FusedLlama.run_layers` (embedding, RMSNorm,
RoPE, grouped-query attention, SwiGLU MLP, head), so a reader can check it
against the Llama paper in one screen. The adapter "carry" (zFLoRA's extra
residual-stream channels, or ffba-ab's handed-on state) travels next to the
hidden state ``h``: RoPE and attention never see it and RMSNorm hands it
through unchanged, exactly as the spec says. For zFLoRA, h and the carry are
the two halves of one stream buffer [h | z], so each reader and each writer is
one GEMM on any backend (no concatenation, no separate adds).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import adapter_io, nvtx, ops
from .adapters import AdapterRegistry, describe
from .layers import (CausalLMOutput, additive_mask, apply_rope, attention, causal_lm_loss, check_id_dtype,
                     check_token_ids, chunked_lm_loss, chunked_target_stats, packed_attention_mask, positions_from_mask,
                     prompt_mask, rope_cos_sin, rope_inv_freq)
from .checkpoint import CheckpointError, load_checkpoint, state_dict_from_hf_model
from .config import ZFLORA_FAMILY, LlamaArch
from .generation import generate
from .hf_compat import HFCompat, HFConfigView
from .modules import (FusedAttentionProjections, FusedLMHead, FusedMLP, FusedOutputProjection,
                      initial_carry)


def _halves(t: Tensor, d: int) -> tuple:
    return t.split_with_sizes([d, t.shape[1] - d], 1)  # one call, not two slices


def _norm(h: Tensor, carry: Optional[Tensor], weight: Tensor, eps: float, stream: bool) -> tuple:
    """(h, carry, RMSNorm(h), the carry as readers take it).

    zflora (``stream``): where h and its carry z are one buffer [h | z] (the
    embedding's, then each projection's output written over it in place),
    the norm hands z through next to n(h) (ADAPTERS.md: "RMSNorm normalises
    h only and hands z through"), so a reader's GEMM reads [n(h) | z] as one
    operand and the sub-block's writer adds onto [h | z] in one GEMM.
    Compiled, the two are concatenated: the copy fuses into the norm's
    kernel. Where they are apart (training: no in-place writes) they stay
    apart: a copy would cost the decode kernels, which take them apart, one
    launch more."""
    if stream and carry is not None:
        d = h.shape[1]
        if torch.compiler.is_compiling():
            hz = torch.cat([h, carry], 1)
            return (*_halves(hz, d), *_halves(ops.rms_norm(hz, weight, eps), d))
        hz = ops.adjacent(h, carry)
        if hz is not None:  # h and carry are its halves already
            return (h, carry, *_halves(ops.rms_norm(hz, weight, eps), d))
    return h, carry, ops.rms_norm(h, weight, eps), carry  # h is [M, d]: no reshape (layers.rms_norm)


def _sharded(module) -> bool:
    """FSDP2 shards ``module``'s tensors (DTensors) and swaps in gathered ones for each
    call, out of reach of the chunked loss's own gradients: such a head computes the
    whole logits instead."""
    return any(hasattr(p, "full_tensor") for p in module.parameters())


class _Converted(dict):
    """A checkpoint's tensors, each converted (``Tensor.to``) on its one read."""

    def __init__(self, sd: dict, **to):
        super().__init__(sd)
        self._to = to

    def __getitem__(self, key: str) -> Tensor:
        return self.pop(key).to(**self._to)


class FusedLlamaLayer(nn.Module):
    """One decoder layer's weights; the computation lives in FusedLlama.run_layers."""

    def __init__(self, sd: dict, i: int, cfg, n_layers: int, adapter_dtype=None):
        super().__init__()
        p = f"model.layers.{i}."
        kw = dict(config=cfg, layer=i, num_layers=n_layers, adapter_dtype=adapter_dtype)
        self.register_buffer("input_norm", sd[p + "input_layernorm.weight"], persistent=False)
        self.register_buffer("post_norm", sd[p + "post_attention_layernorm.weight"], persistent=False)
        self.attn = FusedAttentionProjections(
            sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"],
            sd[p + "self_attn.v_proj.weight"], **kw)
        self.o = FusedOutputProjection(sd[p + "self_attn.o_proj.weight"], **kw)
        self.mlp = FusedMLP(sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"],
                                sd[p + "mlp.down_proj.weight"], **kw)

    def parts(self) -> tuple:
        """(input_norm, attn, o, post_norm, mlp): read from nn.Module's dicts in one
        call, where each attribute read goes through nn.Module.__getattr__ (~1 us
        each, five a layer in a decode step)."""
        b, m = self._buffers, self._modules
        return b["input_norm"], m["attn"], m["o"], b["post_norm"], m["mlp"]


class FusedLlama(AdapterRegistry, HFCompat, nn.Module):
    """A Llama causal LM with flora adapters fused into its projection GEMMs.

    Build it with :meth:`from_pretrained`. Base weights are frozen buffers;
    only adapter tensors are trainable Parameters (so ``state_dict()`` holds
    just the adapter).

    In training mode with ``labels`` (and gradients on), ``forward`` returns the
    loss alone (``logits`` None, as Liger's fused cross entropy does): the head
    runs over the positions that have a target, in chunks whose logits never
    outlive their own loss and gradients (flora.layers.chunked_lm_loss).
    ``chunked_loss = False`` brings the full logits back.
    """

    chunked_loss = True
    takes_packed_rows = True  # forward: position_ids restarting at 0 mark packed sequences (train pack=True)

    def __init__(self, arch: LlamaArch, sd: dict, adapter_config=None, adapter_dtype=None):
        super().__init__()
        self.arch = arch
        self._adapter_config = adapter_config
        self.adapter_dtype = adapter_dtype
        n = arch.num_hidden_layers
        self.register_buffer("embed", sd["model.embed_tokens.weight"], persistent=False)
        self.layers = nn.ModuleList(FusedLlamaLayer(sd, i, adapter_config, n, adapter_dtype)
                                    for i in range(n))
        self.register_buffer("final_norm", sd["model.norm.weight"], persistent=False)
        w_head = self.embed if arch.tie_word_embeddings else sd["lm_head.weight"]
        self.head = FusedLMHead(w_head, config=adapter_config, adapter_dtype=adapter_dtype)
        if arch.tie_word_embeddings:
            self.embed = self.head.weight  # one tensor for both (a view when the head is fused)
        self.register_buffer("inv_freq", rope_inv_freq(arch).to(self.embed.device), persistent=False)
        self._adapters: dict = {}  # name -> (AdapterConfig, adapter state dict; None: the modules' own)
        self._stack: Optional[list] = None  # adapter names side by side (stack_adapters)
        self._unstacked: Optional[tuple] = None  # (config, Parameters, folded) from before stack_adapters
        self.active_adapter: Optional[str] = None
        if adapter_config is not None:  # the modules' fresh adapter, current under the default name
            self._adapters["default"], self.active_adapter = (adapter_config, None), "default"
        self._folded = False
        self._merged = False
        self._disabled = 0  # disable_adapter() blocks entered
        self.gradient_checkpointing = False
        self.config = HFConfigView(arch)
        self.generation_eos_token_id = arch.eos_token_id
        self._unsaved_storage()

    def _unsaved_storage(self) -> None:
        """Keep the fused storage out of state_dict(), as the other base buffers: it holds
        just the adapter, so a saved one never carries the base weights, nor a merge's
        W + s B A to add twice (the modules alone, as in flora.patch, keep theirs)."""
        for _, m in self.adapter_modules():
            for g in m._groups:
                name = f"w_{g.gname}"
                m.register_buffer(name, m._buffers[name], persistent=False)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() convert buffers one by one, which would give the tied
        # embedding a copy of its own: convert the head alone and tie again. RoPE's
        # frequencies stay fp32 whatever the weights' dtype.
        tied = self.arch.tie_word_embeddings
        if tied:
            self._buffers["embed"] = None
        try:
            super()._apply(fn, recurse)
        finally:  # also when the conversion failed (.cuda() without CUDA): never left without embed
            if tied:
                self.embed = self.head.weight
            self.inv_freq = rope_inv_freq(self.arch).to(self.embed.device)
        p = next(self.parameters(), None)
        if p is not None:  # adapters built later (stack_adapters) in the dtype .to() gave these
            self.adapter_dtype = p.dtype
        # the model's tensors outside its modules too: the registry's adapters (kept on its
        # device) and the Parameters stack_adapters set aside (an optimizer's, converted in place)
        with torch.no_grad():
            self._adapters = {n: (c, None if sd is None else {k: fn(t) for k, t in sd.items()})
                              for n, (c, sd) in self._adapters.items()}
            if self._unstacked is not None:
                for q in self._unstacked[1].values():
                    q.data = fn(q)
                    if q.grad is not None:  # a gradient left from training, as Module._apply converts one
                        q.grad = fn(q.grad)
        return self

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(cls, source, adapter=None, dtype=None, device=None,
                        adapter_dtype=None) -> "FusedLlama":
        """Load a local HF Llama checkpoint dir, a Llama GGUF file (dequantized;
        needs the ``gguf`` extra) or an in-memory LlamaForCausalLM.

        ``adapter``: an ``AdapterConfig`` (fresh adapter), a flora adapter dir,
        or a PEFT LoRA adapter dir (loaded as ``pf-lora``). ``adapter_dtype``:
        dtype of the adapter tensors (default: the base dtype; e.g. fp32 adapters
        on a bf16 base for training). Both dtypes: a torch dtype or its name
        ("bfloat16", "bf16", "float16", ...; ``dtype="auto"``: the checkpoint's).
        Never touches the network. The model comes back in eval mode, as from
        transformers' ``from_pretrained``: call ``train()`` to train it.
        """
        from .config import parse_dtype

        # names users write ("bf16", "float16"); int / fp8 refused here, not deep in a kernel
        dtype = None if isinstance(dtype, str) and dtype.strip().lower() == "auto" else parse_dtype(dtype, "dtype")
        adapter_dtype = parse_dtype(adapter_dtype, "adapter_dtype")
        if device is not None:  # before anything loads: "cuda" on a CPU-only torch names itself
            from .devices import resolve_device
            device = resolve_device(str(device) if isinstance(device, torch.device) else device)
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            from . import gguf, pretrained
            if os.path.isfile(path) and gguf.is_gguf(path):
                arch, sd = gguf.load_gguf(path)  # dequantized to fp32
            elif os.path.isfile(path):
                raise CheckpointError(
                    f"{path} is a file but not a GGUF file; FusedLlama.from_pretrained expects a "
                    f"checkpoint directory (config.json + *.safetensors) or a Llama .gguf file")
            elif not os.path.isdir(path):
                raise FileNotFoundError(
                    f"{path!r} is not a local directory or file. flora loads checkpoints from local "
                    f"directories only and never downloads (no network access is attempted); "
                    f"download the model first and pass its directory")
            else:
                arch, sd = load_checkpoint(path)
            eos = pretrained.generation_eos(path, arch)
            copy = False
        elif hasattr(source, "config") and hasattr(source, "state_dict"):
            if getattr(source.config, "model_type", None) != "llama":
                raise CheckpointError(
                    f"{type(source).__name__}: model_type is {getattr(source.config, 'model_type', None)!r}; "
                    f"FusedLlama needs a Llama model")
            arch, sd = state_dict_from_hf_model(source)
            gen = getattr(source, "generation_config", None)
            eos = getattr(gen, "eos_token_id", None) if gen is not None else arch.eos_token_id
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
        # each tensor is moved / cast when the model reads it and dropped once copied into its
        # fused storage, so a dtype or device change never holds a second copy of the model
        sd = _Converted(sd, device=device, dtype=dtype, copy=copy)

        cfg, adapter_sd = None, None
        if adapter is not None:
            cfg, adapter_sd = adapter_io.resolve_adapter(adapter, arch)  # its tensors checked
        with torch.no_grad():
            model = cls(arch, sd, cfg, adapter_dtype)
        del sd
        model.generation_eos_token_id = eos  # generate()'s default stop tokens
        if adapter_sd is not None:  # into the current adapter, "default"
            model._load_adapter_tensors(adapter_sd)
        # as transformers': an adapter's dropout must not perturb the logits of a model loaded
        # to score or generate; training calls train() (flora.train does)
        return model.eval()

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
                num_items_in_batch=None, target_stats: bool = False, adapters=None) -> CausalLMOutput:
        """``.logits`` [B, T, V] and, with ``labels``, ``.loss`` (training with
        labels: the loss alone, see the class). ``target_stats=True`` (with
        labels, no gradients): ``.target_nll`` and ``.target_hit`` [B, T-1] of
        the targets labels[:, 1:] instead of logits (evaluation without the
        [tokens, vocab] logits: flora.layers.chunked_target_stats).
        ``adapters``: one adapter name (None: the base model) per row, for a
        model holding several (:meth:`stack_adapters`); inference only.
        Packed rows (several sequences one after another in a row, ``flora
        train --pack``): ``position_ids`` restarting at 0 at each sequence and
        no ``attention_mask``, as transformers takes them; each sequence then
        runs as if alone (its RoPE positions, attention within itself)."""
        if input_ids.dim() != 2 or not input_ids.numel():
            raise ValueError(f"input_ids must be [batch, seq] with batch, seq >= 1, got shape {list(input_ids.shape)}")
        check_id_dtype(input_ids, "input_ids")
        if labels is not None:
            check_id_dtype(labels, "labels")
            labels = labels.long()  # int32 labels (a tokenizer's numpy ids): the loss takes int64
        B, T = input_ids.shape
        dev = self.device
        rows = self.adapter_rows(adapters, B)
        if rows is not None and (target_stats or (self.training and torch.is_grad_enabled())):
            raise ValueError("adapters=[...] (several adapters in one batch) is for inference: "
                             "eval() and no gradients, without target_stats; unstack_adapters() to train")
        if self._folded and self.training and torch.is_grad_enabled():
            # the folded copies in the storage carry no gradient to the adapter Parameters
            raise ValueError("the adapters are folded (inference form), which cannot train: "
                             "unfold() before training, or eval() / torch.no_grad() for inference")
        if self._folded:
            self.refresh_fold()
        context = self.arch.max_position_embeddings
        if T > context:  # RoPE would run past the positions the model was trained on
            raise ValueError(f"a sequence of {T} tokens exceeds the model's context ({context} positions); "
                             f"shorten it (training: a --seq-len of at most {context})")
        if labels is not None and tuple(labels.shape) != (B, T):
            raise ValueError(f"labels shape {list(labels.shape)} != input_ids shape {list(input_ids.shape)}")
        if input_ids.device.type == "cpu":  # where a tokenizer or DataLoader left them: no device sync
            check_token_ids(input_ids, self.arch.vocab_size)
        input_ids = input_ids.to(dev)
        if target_stats and labels is None:
            raise ValueError("target_stats=True needs labels")
        # training: the loss alone, the head run in chunks (no [tokens, vocab] logits held)
        loss_only = target_stats or (labels is not None and self.chunked_loss and self.training
                                     and torch.is_grad_enabled() and not _sharded(self.head))
        if position_ids is not None:  # transformers' own are [1, T]: one row for the whole batch
            if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != T or (
                    position_ids.dim() == 2 and position_ids.shape[0] not in (1, B)):
                raise ValueError(f"position_ids shape {list(position_ids.shape)} does not fit input_ids "
                                 f"shape {list(input_ids.shape)}; expected [{B}, {T}], [1, {T}] or [{T}]")
            position_ids = position_ids.expand(B, T)
        if attention_mask is None:
            key_valid = torch.ones(B, T, dtype=torch.bool, device=dev)
            # packed rows (transformers' convention without an attention mask, as
            # DataCollatorWithFlattening gives them): position_ids that restart begin the
            # next sequence, which attends only within itself
            mask = None if position_ids is None else packed_attention_mask(position_ids, dev)
            mask = mask.to(dev) if isinstance(mask, Tensor) else mask
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {list(attention_mask.shape)} != input_ids "
                                 f"shape {list(input_ids.shape)}")
            # read where the caller keeps it (no sync on the host); padding at the end runs
            # causal when nothing reads its positions: no logits returned, its labels ignored
            pad = ~attention_mask.bool()
            unread = loss_only and labels.shape == pad.shape and bool((labels[pad.to(labels.device)] == -100).all())
            mask = prompt_mask(~pad, end_padding_unread=unread)
            key_valid = attention_mask.to(dev).bool()
            mask = None if mask is None else mask.to(dev)
        if position_ids is None:
            position_ids = positions_from_mask(key_valid)
        if loss_only:
            n, carry = self.run_layers(input_ids, position_ids.to(dev), mask, head=False)
            if target_stats:
                nll, hit = chunked_target_stats(self.head, n, carry, labels)
                return CausalLMOutput(logits=None, target_nll=nll, target_hit=hit)
            return CausalLMOutput(logits=None, loss=chunked_lm_loss(self.head, n, carry, labels, num_items_in_batch))
        logits = self.run_layers(input_ids, position_ids.to(dev), mask, rows=rows)
        loss = None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch)
        return CausalLMOutput(logits=logits, loss=loss)

    def run_layers(self, input_ids: Tensor, positions: Tensor, mask: Optional[Tensor],
                   cache=None, last_only: bool = False, head: bool = True, rows: Optional[Tensor] = None,
                   last: Optional[Tensor] = None):
        """The Llama forward: logits [B, T (1 if last_only), V]. input_ids/positions
        [B, T]; mask [B, 1, T, K], boolean or additive, or None: causal over
        slots 0 .. T-1 (flora.layers.prompt_mask); ``cache`` (generation)
        has update(layer, k, v) -> keys/values [B, kv_heads, K, head_dim] and
        update_rotated(layer, qk, v, cos, sin) -> (q, keys, values) or None
        (generation.StaticKVCache).
        The mask and the RoPE tables are built once here, not per layer.
        ``head=False``: the head's input instead, (final-norm output [B*T, d], carry).
        ``rows`` [B]: each row's adapter slot (-1: none) in a stacked model.
        ``last`` [1] (with ``last_only``): the position whose logits to return,
        as a device tensor (a prompt padded at its end to a CUDA graph's length);
        default the last."""
        a = self.arch
        B, T = input_ids.shape
        M, dt = B * T, self.dtype
        h = F.embedding(input_ids, self.embed).reshape(M, a.hidden_size)
        carry = initial_carry(self.adapter_config, M, dt, h.device)
        if carry is not None:  # zflora's stream [h | z]: one buffer from here on
            h, carry = _halves(torch.cat([h, carry], 1), a.hidden_size)
        cos, sin = rope_cos_sin(self.inv_freq, positions, dt)
        if isinstance(mask, Tensor) and mask.dtype == torch.bool:  # (not layers.PackedSequences)
            mask = additive_mask(mask, dt)
        off = None if rows is None else self._route_off(rows, B, T)
        try:
            self._route(off)
            for i, layer in enumerate(self.layers):
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    h, carry = checkpoint(self._layer, layer, i, h, carry, B, T, cos, sin, mask, cache,
                                          use_reentrant=False)
                else:
                    h, carry = self._layer(layer, i, h, carry, B, T, cos, sin, mask, cache)
            if last_only:  # generation needs only the last position's logits
                pick = (lambda t: t.view(B, T, -1)[:, -1]) if last is None else \
                    (lambda t: t.view(B, T, -1).index_select(1, last).view(B, -1))
                h = pick(h)
                carry = None if carry is None else pick(carry)
                self.head.route_off = None if off is None else pick(off)
                T = 1
            _, _, n, carry = _norm(h, carry, self.final_norm, a.rms_norm_eps, self._streams())
            if not head:
                return n, carry
            return self.head(n, carry).view(B, T, -1)
        finally:
            self._route(None)

    def run_head(self, n: Tensor, carry: Optional[Tensor] = None, rows: Optional[Tensor] = None) -> Tensor:
        """The head on final-norm outputs (``run_layers(head=False)``'s, any subset of
        their rows): n [M, d], carry [M, t] or None -> logits [M, V]. ``rows`` [M]:
        each row's adapter slot in a stacked model (as run_layers', per token)."""
        self.head.route_off = None if rows is None else self._route_off(rows, rows.shape[0], 1)
        try:
            return self.head(n, carry)
        finally:
            self.head.route_off = None

    def _route_off(self, rows: Tensor, B: int, T: int) -> Tensor:
        """[B*T, R]: True where an adapter-state column is not the token's row's
        adapter (slot i owns columns i*r ... (i+1)*r - 1)."""
        R = self.adapter_config.rank
        slot = torch.arange(R, device=rows.device) // (R // len(self._stack))
        return rows.view(B, 1, 1).expand(B, T, 1).reshape(B * T, 1) != slot

    def _route(self, off: Optional[Tensor]) -> None:
        if off is None and self._stack is None:
            return
        for _, m in self.adapter_modules():
            m.route_off = off

    def _streams(self) -> bool:
        """zflora family: the carry is the residual stream's extra channels."""
        return self.adapter_config is not None and self.adapter_config.base_variant in ZFLORA_FAMILY

    def _layer(self, layer, i, h, carry, B, T, cos, sin, mask, cache):
        a = self.arch
        stream = self._streams()
        # h is ours to write over, but not where autograd records: a checkpointed
        # layer recomputes from its saved input h, which must stay as it was
        own = not torch.is_grad_enabled()
        input_norm, attn, o, post_norm, mlp = layer.parts()
        # attention sub-block: x = RMSNorm(h); q, k, v (+ adapter state for o)
        with nvtx.range("attn", i):  # NVTX ranges: no-ops unless flora.nvtx.enable()
            h, carry, x, xc = _norm(h, carry, input_norm, a.rms_norm_eps, stream)
            q, k, v, state = attn(x, xc)
            # an eager decode step: RoPE, the cache write and the attention in one op
            att = None if cache is None else cache.attend(i, q, k, v, cos, sin)
            if att is None:
                att = self._attention(i, q, k, v, B, T, cos, sin, mask, cache)
            h, carry = o(att, state, h, carry, own)  # (positional: a keyword costs the call more)
        # MLP sub-block: SwiGLU with the residual add inside the module
        with nvtx.range("mlp", i):
            h, carry, x2, xc = _norm(h, carry, post_norm, a.rms_norm_eps, stream)
            h, carry = mlp(x2, h, carry, xc, own)
        return h, carry

    def _attention(self, i, q, k, v, B, T, cos, sin, mask, cache):
        """Attention from the projections q, k, v [M, width] where
        StaticKVCache.attend does not take the step: RoPE, the cache's update,
        layers.attention."""
        a = self.arch
        hd, nh, nkv = a.head_dim, a.num_attention_heads, a.num_key_value_heads
        # q and k side by side in the fused output: rotated at once (a decode step: in
        # one pass that also writes k and v into the cache)
        qk, v = ops.adjacent(q, k), v.view(B, T, nkv, hd)
        qk = None if qk is None else qk.view(B, T, nh + nkv, hd)
        qkv = None if qk is None or cache is None else cache.update_rotated(i, qk, v, cos, sin)
        if qkv is not None:
            q, k, v = qkv
        else:
            if qk is not None:
                qk = apply_rope(qk, cos, sin)
                q, k = qk[:, :, :nh], qk[:, :, nh:]
            else:
                q, k = apply_rope(q.view(B, T, nh, hd), cos, sin), apply_rope(k.view(B, T, nkv, hd), cos, sin)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(i, k, v)
        return attention(q, k, v, mask, None if cache is None else cache.decode_kernel)

    # ------------------------------------------------------------ generation
    def generate(self, input_ids: Tensor, *args, **kwargs) -> Tensor:
        """Prompt + generated tokens [B, T + n]; the arguments and sampling settings
        (temperature, top_p, top_k, min_p, penalties, logit_bias, ...) are
        flora.generation.generate's."""
        return generate(self, input_ids, *args, **kwargs)

    def _rebuild(self, cfg) -> None:
        """Give the model another adapter structure (none -> one adapter, one ->
        several side by side and back): the fused storage is rebuilt layer by
        layer, each old layer freed as its replacement takes its weights, so the
        peak is one layer more, not a second model. A failure half-way (out of
        memory) leaves layers of both structures: the old one is rebuilt, with
        its adapter tensors, before the error goes on."""
        old, tensors, folded = self.adapter_config, self.adapter_state_dict(), self._folded
        try:
            self._restructure(cfg)
        except BaseException as e:
            try:
                self._restructure(old)
                self._load_adapter_tensors(tensors)
                if folded:
                    self.fold()
            except BaseException as again:
                raise RuntimeError(f"flora: changing the adapter structure failed ({type(e).__name__}: {e}) "
                                   f"and so did restoring the old one ({type(again).__name__}: {again}); "
                                   f"this model is unusable: load it again") from e
            raise

    def _restructure(self, cfg) -> None:
        sd = _Converted(self.base_state_dict())  # each view dropped once read
        n, tied = self.arch.num_hidden_layers, self.arch.tie_word_embeddings
        with torch.no_grad():
            for i in range(n):
                self.layers[i] = FusedLlamaLayer(sd, i, cfg, n, self.adapter_dtype)
            w_head = sd["model.embed_tokens.weight"] if tied else sd["lm_head.weight"]
            self.head = FusedLMHead(w_head, config=cfg, adapter_dtype=self.adapter_dtype)
        if tied:
            self.embed = self.head.weight
        self._adapter_config, self._folded = cfg, False
        self._unsaved_storage()
        self.train(self.training)  # the new modules in the model's mode, their adapter switched as its
        self._sync_enabled()

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

    def extra_repr(self) -> str:
        a = self.arch
        return (f"layers={a.num_hidden_layers}, d={a.hidden_size}, heads={a.num_attention_heads}/"
                f"{a.num_key_value_heads}, d_ff={a.intermediate_size}, vocab={a.vocab_size}, "
                f"adapter={describe(self.adapter_config)}")
