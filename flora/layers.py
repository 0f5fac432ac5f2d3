"""The Llama layers without weights of their own, shared by the model, generation
and training: RMSNorm, RoPE, attention masks, RoPE positions, the LM loss and
its output type."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, ops
from .config import LlamaArch


# --------------------------------------------------------------------------
# Llama pieces (written to match transformers' rounding: norm in fp32, cast
# back, then scale; RoPE tables in fp32 cast to the activation dtype)
# --------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, as transformers' Llama rounds it (flora.ops.rms_norm)."""
    return ops.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)


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
    """cos, sin [B, T, 1, head_dim] for integer positions [B, T]; built once per
    forward. The sign of rotate-half is folded into sin's first half, so
    apply_rope needs no negation (exact: negation does not round)."""
    freqs = (positions[..., None].float() * inv_freq.float())[:, :, None]
    c, s = freqs.cos(), freqs.sin()
    return torch.cat((c, c), dim=-1).to(dtype), torch.cat((-s, s), dim=-1).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, heads, head_dim] rotated: x cos + rotate_half(x) sin (sin signed
    by rope_cos_sin, so rotate_half is a roll; flora.ops.rope)."""
    return ops.rope(x, cos, sin)


def check_id_dtype(t: Tensor, name: str) -> None:
    """Token ids (and labels) are integers: a float or bool tensor is a mix-up
    (an attention mask passed as ids), named here, not deep in the embedding."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer token ids, got dtype {t.dtype}")


def check_token_ids(ids: Tensor, vocab: int) -> None:
    """Token ids in [0, vocab): an id outside would index past the embedding
    (an IndexError on the CPU, a device-side assert that ends the CUDA
    context on a GPU)."""
    if not ids.numel():
        return
    lo, hi = (int(t) for t in torch.aminmax(ids))
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocabulary), got {lo} ... {hi}")


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask as the additive one SDPA builds from it (0 where
    allowed, -inf elsewhere), converted once instead of once per layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention(q: Tensor, k: Tensor, v: Tensor, mask,
              decode_kernel: Optional[bool] = None) -> Tensor:
    """Grouped-query attention: q [B, T, heads, hd], k/v [B, kv_heads, L, hd],
    mask [B, 1, T, L] (additive or boolean) or None: causal over slots
    0 .. T-1 with T == L (no padding, or padding at the end that nothing
    reads: :func:`prompt_mask`) -> [B * T, heads * hd]. Packed rows: their
    :func:`packed_mask`, or :class:`PackedSequences` (one causal call per
    sequence, :func:`packed_attention_mask` picks).

    Which SDPA kernel runs on CUDA decides the cost: flash takes no explicit
    mask, memory-efficient takes no grouped kv heads, and what neither takes
    falls to the math kernel (fp32 scores [B, heads, T, L] materialised).
    So a causal prompt goes as ``is_causal`` (flash, kv heads grouped), a
    left-padded one with its mask and the kv heads expanded (memory-efficient).

    One query token per row (decode): :func:`flora.ops.decode_attention`,
    flora's split-key kernel where it runs (under torch.compile too), else SDPA
    with the query heads sharing a kv head as that head's query rows ([B, kv,
    group, hd]): plain masked attention, never expanding the keys. Compiled on
    the CPU the op is called only where ``decode_kernel`` says flora's kernel
    runs (:func:`cpu_decode_kernel_takes`, asked by the caller outside the
    trace: a Python constant to dynamo); else, or when None, written out for
    Inductor."""
    if isinstance(mask, PackedSequences):
        return packed_sequence_attention(q, k, v, mask)
    B, T, nh, hd = q.shape
    nkv = k.shape[1]
    cpu_compiled = q.device.type == "cpu" and torch.compiler.is_compiling()
    if T == 1 and mask is not None and mask.dtype == q.dtype and (not cpu_compiled or decode_kernel):
        # the decoder's step: additive mask [B, 1, 1, L] over the cache window. Compiled
        # on the CPU too (Inductor calls the kernel): 0.34-0.59x the written-out form's
        # time in fp32, 0.05-0.39x in bf16, SmolLM2 / 1B / 3B heads at 64-4096 keys
        # (bench/RESULTS.md, "Decode attention", 2026-11-28 23:42)
        return ops.decode_attention(q.view(B, nh, hd), k, v, mask.view(B, mask.shape[-1]))
    if T == 1 and cpu_compiled:
        # Other compiled CPU decode: written out, Inductor fuses the mask, softmax
        # and scaling around two small bmms (fp32, like SDPA's CPU kernel);
        # SDPA's CPU kernel costs ~1.5x as much at one query row.
        return written_out_decode_attention(q.view(B, nh, hd), k, v, mask)
    if T == 1 and nh != nkv:
        return ops.grouped_sdpa(q.view(B, nh, hd), k, v, mask)
    gqa = nh != nkv
    if gqa and expands_kv(q.device.type, q.dtype, mask is not None):
        k, v = expand_kv(k, nh // nkv), expand_kv(v, nh // nkv)
        gqa = False
    if mask is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=T > 1, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(B * T, nh * hd)


def cpu_decode_kernel_takes(dtype: torch.dtype, head_dim: int, group: int, keys: int) -> bool:
    """Does ``flora::decode_attention`` on the CPU run flora's kernel (else
    SDPA) for operands of ``dtype``, ``head_dim``, ``group`` query heads per kv
    head and a window of ``keys`` keys, with the CPU ISA set now (FLORA_CPU_ISA,
    flora._C.set_cpu_isa)? The op's own rule, from the extension
    (csrc/cpu/register.cpp); False without it. Plain ints, asked outside a
    trace: under torch.compile dynamo may hand symbolic sizes, which the
    extension cannot take."""
    return _ext.C is not None and _ext.C.cpu_decode_attention_takes(dtype, head_dim, group, keys)


def written_out_decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """A decode step's attention written out for Inductor: q [B, nh, hd], k / v
    [B, nkv, L, hd], mask [B, 1, 1, L] (additive or boolean) or None ->
    [B, nh * hd]; two bmms around the mask, scaling and softmax, in fp32."""
    B, nh, hd = q.shape
    nkv = k.shape[1]
    qg = q.view(B, nkv, nh // nkv, hd).float()
    att = (qg @ k.float().transpose(-1, -2)) * hd ** -0.5
    if mask is not None:
        att = att + mask if mask.dtype != torch.bool else att.masked_fill(~mask, float("-inf"))
    out = att.softmax(-1) @ v.float()
    return out.to(q.dtype).reshape(B, nh * hd)


def expands_kv(device_type: str, dtype: torch.dtype, masked: bool) -> bool:
    """Does :func:`attention` expand grouped kv heads for SDPA? On CUDA where
    flash cannot run (an explicit mask; fp32, which flash lacks), so that the
    memory-efficient kernel, which takes no grouped heads, runs instead of the
    math kernel. The CPU's kernels take grouped heads and masks alike."""
    return device_type == "cuda" and (masked or dtype == torch.float32)


def expand_kv(t: Tensor, groups: int) -> Tensor:
    """kv heads [B, kv, L, hd] repeated to the query heads' [B, kv * groups, L, hd]
    (each kv head ``groups`` times in a row, as enable_gqa pairs them): a view,
    then one copy; no host sync, so a CUDA graph can capture it."""
    B, nkv, L, hd = t.shape
    return t[:, :, None].expand(B, nkv, groups, L, hd).reshape(B, nkv * groups, L, hd)


def causal_prompt(key_valid: Tensor, end_padding_unread: bool = False) -> bool:
    """Can a prompt [B, T] whose slots are 0 .. T-1 run causal attention with no
    mask (:func:`attention`'s fast form)? When no key is padding, or, with
    ``end_padding_unread``, when every row's padding is at its end (as flora's
    training batches are padded): causal order keeps that padding out of every
    real position's result, exactly, and only the padded positions' own
    outputs differ from the masked form's, so the caller must never read them
    (a loss whose labels there are all -100). Read on the host where the mask
    lives there; a device mask costs one sync. Under torch.compile, never."""
    if torch.compiler.is_compiling():
        return False
    ok = (key_valid[:, 1:] <= key_valid[:, :-1]).all() & key_valid[:, 0].all() if end_padding_unread \
        else key_valid.all()
    return bool(ok)


def slot_mask(key_valid: Tensor) -> Tensor:
    """:func:`attention_mask_4d` of a prompt [B, T] over its slots 0 .. T-1."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    return attention_mask_4d(key_valid, slots, slots)


def prompt_mask(key_valid: Tensor, end_padding_unread: bool = False) -> Optional[Tensor]:
    """A prompt's mask for :func:`attention`: None where :func:`causal_prompt`
    allows, else :func:`slot_mask`."""
    return None if causal_prompt(key_valid, end_padding_unread) else slot_mask(key_valid)


def packed_documents(position_ids: Tensor) -> Tensor:
    """[B, T] index of the sequence each slot belongs to in rows of several
    sequences packed together (transformers' rule, ``find_packed_sequence_indices``):
    a position that does not follow the one before by 1 starts the next sequence."""
    first = position_ids[:, :1] - 1  # the first slot starts sequence 0 whatever its position
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def packed_mask(position_ids: Tensor) -> Optional[Tensor]:
    """Boolean SDPA mask [B, 1, T, T] for packed rows (:func:`packed_documents`):
    causal, each slot seeing only its own sequence's keys (block-diagonal), or
    None when no row holds more than one sequence (plain causal attention,
    :func:`attention`'s fast form). Under torch.compile always the mask (no
    data-dependent branch)."""
    docs = packed_documents(position_ids)
    if not torch.compiler.is_compiling() and not bool(docs[:, -1].any()):
        return None
    slots = torch.arange(position_ids.shape[1], device=position_ids.device)
    causal = slots[None, :] <= slots[:, None]  # [Tq, Tk]
    return (causal[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]


class PackedSequences:
    """Packed rows for :func:`attention` as the lengths of their sequences (each
    row's, in order, summing to the row's T; a row's end padding is a sequence
    of its own): each sequence's queries attend causally within it, one SDPA
    call per sequence (:func:`packed_sequence_attention`) instead of the
    block-diagonal mask (:func:`packed_mask`). Built on the host by
    :func:`packed_attention_mask` where that form is the cheaper."""

    __slots__ = ("lengths",)

    def __init__(self, lengths):
        self.lengths = tuple(tuple(int(n) for n in row) for row in lengths)

    def __repr__(self):
        return f"PackedSequences({self.lengths})"


# The per-sequence form against the mask, CPU SDPA forward + backward (torch 2.13,
# 2-core Intel Xeon, SmolLM2's 9 / 3 heads of 64, fp32; bench/RESULTS.md "Sample packing"):
# the mask form costs about a T^2 of work a row (it scores every key of the row), a
# causal call of L tokens about L^2 of the same work (the CPU's causal kernel saves
# little over the full square: 512 tokens causal 20 ms, masked 14 ms) plus a fixed
# ~0.16 ms (the call, its backward, the split and concatenation), which is the work of
# PACKED_CALL_COST = 48^2 pairs. Measured ratios per-sequence / mask: T = 128: 2 x 64
# tokens 0.98, 8 x 16 1.33; T = 256: 16 x 16 0.82, 32 x 8 1.33; T = 512: 64 x 8 0.77,
# 128 x 4 1.28; T = 1024: 8 x 128 0.24, 128 x 8 0.43; the rule below picks the faster in
# each. bf16 (3x slower per score here) moves the crossover towards shorter sequences:
# the fp32 rule errs towards the mask there.
PACKED_CALL_COST = 48 * 48


def packed_lengths(position_ids: Tensor) -> list:
    """Each row's sequence lengths (:func:`packed_documents`), read on the host."""
    docs = packed_documents(position_ids).cpu()
    return [torch.unique_consecutive(d, return_counts=True)[1].tolist() for d in docs]


def per_sequence_pays(lengths, T: int) -> bool:
    """Is the per-sequence form (:class:`PackedSequences`) cheaper than the mask
    for rows of T slots holding sequences of these ``lengths`` (a list per row)?
    The CPU's cost model: sum(L^2 + PACKED_CALL_COST) against T^2 a row."""
    work = sum(n * n + PACKED_CALL_COST for row in lengths for n in row)
    return work < len(lengths) * T * T


def packed_attention_mask(position_ids: Tensor, device: torch.device):
    """What :func:`attention` takes for packed rows (positions restarting at 0
    at each sequence) run on ``device``: None when no row holds more than one
    sequence (plain causal), :class:`PackedSequences` where the per-sequence
    calls cost less than the mask (:func:`per_sequence_pays`: on the CPU,
    eager), else :func:`packed_mask`. On CUDA the mask stays (its
    memory-efficient kernel against a flash call per sequence, one launch
    each, is not measured: no GPU at hand); under torch.compile the mask too
    (no data-dependent branch, no host read)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return packed_mask(position_ids)
    lengths = packed_lengths(position_ids)
    if all(len(row) == 1 for row in lengths):
        return None
    if per_sequence_pays(lengths, position_ids.shape[1]):
        return PackedSequences(lengths)
    return packed_mask(position_ids)


def packed_sequence_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedSequences) -> Tensor:
    """:func:`attention` of packed rows, one causal SDPA call per sequence (its
    own queries and keys only: none of the masked-out blocks scored) -> [B * T,
    heads * hd], the pieces laid out in the rows' order. The operands are cut
    with one split each (slots of all rows in a row, [B * T, heads, hd]), whose
    backward is one concatenation: a slice per sequence would add each
    sequence's gradient into a zeroed tensor of the whole operand."""
    B, T, nh, hd = q.shape
    nkv = k.shape[1]
    sizes = [n for row in packed.lengths for n in row]
    if len(packed.lengths) != B or sum(sizes) != B * T or any(sum(row) != T for row in packed.lengths):
        raise ValueError(f"packed sequence lengths {list(map(list, packed.lengths))} do not fill {B} rows "
                         f"of {T} slots")
    qs = q.reshape(B * T, nh, hd).split(sizes)
    ks = k.transpose(1, 2).reshape(B * T, nkv, hd).split(sizes)
    vs = v.transpose(1, 2).reshape(B * T, nkv, hd).split(sizes)
    out = [F.scaled_dot_product_attention(qi.transpose(0, 1)[None], ki.transpose(0, 1)[None],
                                          vi.transpose(0, 1)[None], is_causal=qi.shape[0] > 1,
                                          enable_gqa=nh != nkv)[0].transpose(0, 1)
           for qi, ki, vi in zip(qs, ks, vs)]
    return torch.cat(out).view(B * T, nh * hd)


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

    def __init__(self, logits: Optional[Tensor], loss: Optional[Tensor] = None, **extra: Tensor):
        super().__init__()
        if loss is not None:
            self["loss"] = loss
        if logits is not None:  # None (training with labels: the loss only) is left out, as ModelOutput does
            self["logits"] = logits
        self.update(extra)

    def __getattr__(self, k):  # the extra entries (target_nll, ...) as attributes too
        try:
            return dict.__getitem__(self, k)
        except KeyError:
            raise AttributeError(k) from None

    @property
    def logits(self) -> Optional[Tensor]:
        return self.get("logits")

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


LOSS_CHUNK_LOGITS = 1 << 26  # logits alive at once in chunked_lm_loss: 256 MiB in fp32


def _shifted_targets(labels: Tensor) -> Tensor:
    """[B*T] target of each position: the next label, -100 where there is none."""
    tgt = labels.new_full(labels.shape, -100)
    tgt[:, :-1] = labels[:, 1:]
    return tgt.reshape(-1)


class _ChunkedLMLoss(torch.autograd.Function):
    """Sum of next-token cross entropy of ``head(n, carry)`` over the rows that
    have a target, a chunk of rows at a time. Each chunk's logits live only
    while its loss and its gradients (for n, carry and the head's trainable
    tensors) are computed, here in forward, so the [tokens, vocab] logits are
    never held and backward only scales the stored gradients (as Liger's fused
    linear cross entropy does, for any head, adapted or not)."""

    @staticmethod
    def forward(ctx, head, rows, targets, chunk, n, carry, *params):
        wants = [n.requires_grad, carry is not None and carry.requires_grad] + [p.requires_grad for p in params]
        grads = [torch.zeros_like(t) if w else None for t, w in zip([n, carry, *params], wants)]
        total = torch.zeros((), dtype=torch.float32, device=n.device)
        for s in range(0, rows.numel(), chunk):
            idx = rows[s:s + chunk]
            with torch.enable_grad():
                x = n[idx].detach().requires_grad_(wants[0])
                c = None if carry is None else carry[idx].detach().requires_grad_(wants[1])
                loss = F.cross_entropy(head(x, c).float(), targets[s:s + chunk], reduction="sum")
                inputs = [t for t, w in zip([x, c, *params], wants) if w]
                got = iter(torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else ())
            for i, w in enumerate(wants):
                g = next(got) if w else None
                if g is None:
                    continue
                if i < 2:
                    grads[i].index_add_(0, idx, g.to(grads[i].dtype))
                else:
                    grads[i] += g
            total += loss.detach()
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_total):
        out = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads]
        return (None, None, None, None, *out)  # ctx.grads stay for a retain_graph=True second pass


def _target_rows(head, labels: Tensor, device, chunk: Optional[int]) -> tuple:
    """(targets [B*T], rows with a target, rows per chunk) of the chunked head."""
    tgt = _shifted_targets(labels.to(device))
    if chunk is None:
        chunk = max(1, LOSS_CHUNK_LOGITS // head.weight.shape[0])
    return tgt, (tgt != -100).nonzero().squeeze(1), chunk


def chunked_lm_loss(head, n: Tensor, carry: Optional[Tensor], labels: Tensor,
                    num_items_in_batch=None, chunk: Optional[int] = None) -> Tensor:
    """:func:`causal_lm_loss` of ``head(n, carry)`` (n: the final-norm output
    [B*T, d], labels [B, T]) without the [B*T, vocab] logits: only positions with
    a target are projected, ``chunk`` rows at a time (default: LOSS_CHUNK_LOGITS
    logits). ``head`` must map rows independently (a projection)."""
    tgt, rows, chunk = _target_rows(head, labels, n.device, chunk)
    if rows.numel() == 0:  # no target anywhere: what causal_lm_loss gives (a NaN mean, or 0 over num_items)
        one = head(n[:1], None if carry is None else carry[:1]).float()
        return causal_lm_loss(one.view(1, 1, -1), labels.new_full((1, 1), -100), num_items_in_batch)
    params = [p for p in head.parameters() if p.requires_grad]
    total = _ChunkedLMLoss.apply(head, rows, tgt[rows], chunk, n, carry, *params)
    if num_items_in_batch is None:
        return total / rows.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_target_stats(head, n: Tensor, carry: Optional[Tensor], labels: Tensor,
                         chunk: Optional[int] = None) -> tuple:
    """Evaluation's view of ``head(n, carry)`` without the [B*T, vocab] logits:
    (nll, hit), each [B, T-1] for the targets ``labels[:, 1:]``: the next-token
    negative log-likelihood in fp32 and whether the argmax is the target (0 and
    True where the target is -100). Only positions with a target are projected,
    ``chunk`` rows at a time."""
    if torch.is_grad_enabled():
        raise ValueError("chunked_target_stats is for evaluation: call it under torch.no_grad()")
    B, T = labels.shape
    tgt, rows, chunk = _target_rows(head, labels, n.device, chunk)
    nll = torch.zeros(B * T, dtype=torch.float32, device=n.device)
    hit = torch.ones(B * T, dtype=torch.bool, device=n.device)
    for s in range(0, rows.numel(), chunk):
        idx = rows[s:s + chunk]
        logits = head(n[idx], None if carry is None else carry[idx]).float()
        nll[idx] = F.cross_entropy(logits, tgt[idx], reduction="none")
        hit[idx] = logits.argmax(-1) == tgt[idx]
    return nll.view(B, T)[:, :-1], hit.view(B, T)[:, :-1]


def positions_from_mask(key_valid: Tensor) -> Tensor:
    """RoPE positions for (left-)padded rows: count of real tokens before each slot."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)
