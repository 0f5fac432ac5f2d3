"""The Llama layers without weights of their own, shared by the model, generation
and training: RMSNorm, RoPE, attention masks, RoPE positions, the LM loss and
its output type."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import LlamaArch


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


def positions_from_mask(key_valid: Tensor) -> Tensor:
    """RoPE positions for (left-)padded rows: count of real tokens before each slot."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)
