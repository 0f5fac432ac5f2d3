"""The one Python surface over flora's ops: FFL, FBL and FFBL.

Every op is one matrix product over fused (or virtually concatenated)
operands; see docs/variants.md for the building blocks. For each op this
file holds:

* the public wrapper (``ffl``, ``fbl``, ``ffbl``) that everything calls;
* a pure-PyTorch reference (``ffl_reference`` ...): the test oracle, and the
  implementation that runs where no compiled kernel is registered;
* the fake (meta) implementation for torch.compile and CUDA-graph capture;
* the autograd formula (W frozen unless it requires grad) and the autocast
  rule. The compiled library registers both in C++ (csrc/common/autograd.cpp,
  autocast.cpp: a call that needs no gradient never enters Python); the
  Python forms below are registered only when it is missing.

The raw ops ``torch.ops.flora.*`` return the fused output buffer (``[y | z]``);
the wrappers hand back ``y`` and ``z`` as views into it, which the next op
accepts without a copy (any operand may be a row-strided view).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _ext

SCHEMAS = {
    "ffl": (
        "ffl(Tensor x, Tensor W, Tensor A, float s=1.0, int[] repeat=[], "
        "int repeat_rank=0, Tensor? z_in=None, Tensor? res=None) -> Tensor"
    ),
    "fbl": (
        "fbl(Tensor u, Tensor z, Tensor W, Tensor B, float s=1.0, "
        "Tensor? res=None, bool relu=False) -> Tensor"
    ),
    "ffbl": (
        "ffbl(Tensor u, Tensor z, Tensor W, Tensor B, Tensor A, Tensor C, "
        "float s=1.0, Tensor? res=None, bool relu=False) -> Tensor"
    ),
    # inference: res += u W^T + s f(z) B^T in place (no copy of res first)
    "fbl_": "fbl_(Tensor(a!) res, Tensor u, Tensor z, Tensor W, Tensor B, float s=1.0, bool relu=False) -> ()",
    # The Llama step's pointwise pieces, one pass each where eager runs several ops
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "rope": "rope(Tensor x, Tensor cos, Tensor sin) -> Tensor",
    # a decode step's RoPE over q|k writing k and v into the KV cache (inference)
    "rope_cache_": ("rope_cache_(Tensor qk, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
                    "Tensor(b!) v_cache, Tensor slot) -> Tensor"),
    "silu_mul": "silu_mul(Tensor g, Tensor u) -> Tensor",
    # inference: the product over u (ffba's down reads [mid | z] as one operand)
    "silu_mul_": "silu_mul_(Tensor g, Tensor(a!) u) -> ()",
    # a decode step's attention over its KV-cache window, split over the keys
    "decode_attention": "decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, int splits=0) -> Tensor",
    # the eager decode step's rope_cache_ then decode_attention in one call (one dispatch)
    "rope_cache_attention_": ("rope_cache_attention_(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, "
                              "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot, Tensor mask) -> Tensor"),
}
OPS = ("ffl", "fbl", "ffbl")  # the three blocks
POINTWISE = ("rms_norm", "rope", "silu_mul")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------
# Validation (same rules and messages as csrc/common/checks.cpp)
# --------------------------------------------------------------------------
class _Operands:
    def __init__(self, op: str, first: Tensor, name: str):
        self.op, self.first, self.first_name = op, first, name
        self.check(first, name)

    def check(self, t: Tensor, name: str, transposed: bool = False) -> None:
        op = self.op
        if not isinstance(t, Tensor):
            raise TypeError(f"flora.{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(
                f"flora.{op}: {name} must be 2-D, got a {t.dim()}-D tensor of shape {list(t.shape)}"
            )
        if t.dtype not in _FLOATS:
            raise TypeError(
                f"flora.{op}: {name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64"
            )
        if t.dtype != self.first.dtype:
            raise TypeError(
                f"flora.{op}: dtype mismatch: {self.first_name} is {self.first.dtype} but {name} is {t.dtype}"
            )
        if t.device != self.first.device:
            raise ValueError(
                f"flora.{op}: device mismatch: {self.first_name} is on {self.first.device} "
                f"but {name} is on {t.device}"
            )
        rows, cols = t.shape
        row_major = (cols <= 1 or t.stride(1) == 1) and (rows <= 1 or t.stride(0) >= cols)
        # fbl's weights may be transposed views (backward dx = dy W + dz A)
        t_view = transposed and (rows <= 1 or t.stride(0) == 1) and (cols <= 1 or t.stride(1) >= rows)
        if not (row_major or t_view):
            raise ValueError(
                f"flora.{op}: {name} must be row-major with unit stride along its last dimension "
                f"(row-strided views are fine), got shape {list(t.shape)} with strides "
                f"{list(t.stride())}; call .contiguous() first"
            )

    def dim(self, what, expected, got, ref, ref_name, t, name):
        if expected != got:
            raise ValueError(
                f"flora.{self.op}: {what} mismatch: {ref_name} has shape {list(ref.shape)} "
                f"but {name} has shape {list(t.shape)}"
            )


def _check_repeat(repeat: Sequence[int], rc: int, N: int, R: int) -> None:
    if not repeat:
        return
    G = len(repeat)
    if rc < 1 or G * rc > R:
        raise ValueError(
            f"flora.ffl: repeat_rank must be >= 1 and the {G} repeat segment(s) need "
            f"{G} x repeat_rank <= R = {R} state columns, got repeat_rank = {rc}"
        )
    for g, n in enumerate(repeat):
        if n < 0 or n % rc:
            raise ValueError(
                f"flora.ffl: repeat-add segment {g} has width {n}, which is not a multiple "
                f"of repeat_rank = {rc}"
            )
    if sum(repeat) > N:
        raise ValueError(
            f"flora.ffl: repeat-add segments cover {sum(repeat)} columns but y has only N = {N}"
        )


def check_ffl(x, W, A, repeat=(), repeat_rank=0, z_in=None, res=None):
    c = _Operands("ffl", x, "x")
    c.check(W, "W")
    c.check(A, "A")
    M, K = x.shape
    N, R = W.shape[0], A.shape[0]
    c.dim("K", K, W.shape[1], x, "x", W, "W")
    c.dim("K", K, A.shape[1], x, "x", A, "A")
    if z_in is not None:
        c.check(z_in, "z_in")
        c.dim("M", M, z_in.shape[0], x, "x", z_in, "z_in")
        c.dim("R", R, z_in.shape[1], A, "A", z_in, "z_in")
    if res is not None:
        c.check(res, "res")
        c.dim("M", M, res.shape[0], x, "x", res, "res")
        c.dim("N", N, res.shape[1], W, "W", res, "res")
    _check_repeat(list(repeat), repeat_rank, N, R)
    return M, K, N, R


def check_fbl(u, z, W, B, res=None):
    c = _Operands("fbl", u, "u")
    c.check(z, "z")
    c.check(W, "W", transposed=True)
    c.check(B, "B", transposed=True)
    M, K = u.shape
    N, R = W.shape[0], B.shape[1]
    c.dim("M", M, z.shape[0], u, "u", z, "z")
    c.dim("K", K, W.shape[1], u, "u", W, "W")
    c.dim("N", N, B.shape[0], W, "W", B, "B")
    c.dim("R", R, z.shape[1], B, "B", z, "z")
    if res is not None:
        c.check(res, "res")
        c.dim("M", M, res.shape[0], u, "u", res, "res")
        c.dim("N", N, res.shape[1], W, "W", res, "res")
    return M, K, N, R


def check_ffbl(u, z, W, B, A, C, res=None):
    c = _Operands("ffbl", u, "u")
    for t, name in ((z, "z"), (W, "W"), (B, "B"), (A, "A"), (C, "C")):
        c.check(t, name)
    M, K = u.shape
    N, R, R2 = W.shape[0], B.shape[1], A.shape[0]
    c.dim("M", M, z.shape[0], u, "u", z, "z")
    c.dim("K", K, W.shape[1], u, "u", W, "W")
    c.dim("K", K, A.shape[1], u, "u", A, "A")
    c.dim("N", N, B.shape[0], W, "W", B, "B")
    c.dim("R", R, z.shape[1], B, "B", z, "z")
    c.dim("R", R, C.shape[1], z, "z", C, "C")
    c.dim("R'", R2, C.shape[0], A, "A", C, "C")
    if res is not None:
        c.check(res, "res")
        c.dim("M", M, res.shape[0], u, "u", res, "res")
        c.dim("N", N, res.shape[1], W, "W", res, "res")
    return M, K, N, R, R2


# --------------------------------------------------------------------------
# Pure-PyTorch references: accumulate in fp32 (fp64 for fp64 inputs)
# --------------------------------------------------------------------------
def _acc(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t.double() if t.dtype == torch.float64 else t.float()


def _tile_add(y: Tensor, z: Tensor, s: float, repeat, rc: int) -> Tensor:
    """y[:, segment g] += s * z[:, chunk g] repeated across the segment."""
    parts, off = [], 0
    for g, n in enumerate(repeat):
        parts.append(y[:, off:off + n] + s * z[:, g * rc:(g + 1) * rc].repeat(1, n // rc))
        off += n
    parts.append(y[:, off:])
    return torch.cat(parts, dim=1)


def ffl_reference(x, W, A, s=1.0, repeat=(), repeat_rank=0, z_in=None, res=None):
    check_ffl(x, W, A, repeat, repeat_rank, z_in, res)
    xa = _acc(x)
    y = xa @ _acc(W).T
    z = xa @ _acc(A).T
    if z_in is not None:
        z = z + _acc(z_in)
    if res is not None:
        y = y + _acc(res)
    y = _tile_add(y, z, s, list(repeat), repeat_rank)
    return torch.cat([y, z], dim=1).to(x.dtype)


def fbl_reference(u, z, W, B, s=1.0, res=None, relu=False):
    check_fbl(u, z, W, B, res)
    fz = torch.relu(_acc(z)) if relu else _acc(z)
    y = _acc(u) @ _acc(W).T + s * (fz @ _acc(B).T)
    if res is not None:
        y = y + _acc(res)
    return y.to(u.dtype)


def check_fbl_inplace(res, u, z, W, B, memory=True):
    """memory=False: fake tensors, which have no addresses to compare."""
    check_fbl(u, z, W, B, res)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (res, u, z, W, B)):
        raise ValueError("flora.fbl_: writes over res, for inference; where autograd records, call "
                         "flora.fbl with res")
    for t, name in ((u, "u"), (z, "z"), (W, "W"), (B, "B")) if memory else ():
        if t.numel() and t.data_ptr() == res.data_ptr():
            raise ValueError(f"flora.fbl_: res overlaps {name} in memory; the op writes res while it reads {name}")


def fbl_inplace_reference(res, u, z, W, B, s=1.0, relu=False):
    check_fbl_inplace(res, u, z, W, B)
    res.copy_(fbl_reference(u, z, W, B, s, res, relu))


def ffbl_reference(u, z, W, B, A, C, s=1.0, res=None, relu=False):
    check_ffbl(u, z, W, B, A, C, res)
    ua = _acc(u)
    fz = torch.relu(_acc(z)) if relu else _acc(z)
    y = ua @ _acc(W).T + s * (fz @ _acc(B).T)
    if res is not None:
        y = y + _acc(res)
    z2 = ua @ _acc(A).T + fz @ _acc(C).T
    return torch.cat([y, z2], dim=1).to(u.dtype)


def check_rms_norm(x, weight):
    if x.dim() != 2 or weight.dim() != 1 or weight.shape[0] > x.shape[1]:
        raise ValueError(f"flora.rms_norm: expected x [M, d (+ t)] and weight [d], got {list(x.shape)} and "
                         f"{list(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"flora.rms_norm: weight must match x ({x.dtype} on {x.device}), got {weight.dtype} "
                        f"on {weight.device}")


def check_rope(x, cos, sin):
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.dim() != 4 or \
            cos.shape[2] != 1 or (cos.shape[0], cos.shape[1], cos.shape[3]) != (x.shape[0], x.shape[1], x.shape[3]):
        raise ValueError(f"flora.rope: expected x [B, T, heads, head_dim] (head_dim even) and cos, sin "
                         f"[B, T, 1, head_dim], got {list(x.shape)}, {list(cos.shape)}, {list(sin.shape)}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise TypeError(f"flora.rope: cos and sin must be {x.dtype} like x, got {cos.dtype}, {sin.dtype}")


def check_rope_cache(qk, v, cos, sin, k_cache, v_cache, slot, memory=True):
    """memory=False: fake tensors (slot's values unknown)."""
    check_rope(qk, cos, sin)
    if (k_cache.dim() != 4 or k_cache.shape != v_cache.shape or v.dim() != 4 or k_cache.shape[0] != qk.shape[0]
            or k_cache.shape[3] != qk.shape[3] or not k_cache.shape[1] < qk.shape[2]
            or tuple(v.shape) != (qk.shape[0], qk.shape[1], k_cache.shape[1], qk.shape[3])
            or slot.dim() != 1 or slot.shape[0] != qk.shape[1]):
        raise ValueError(f"flora.rope_cache_: expected qk [B, T, nq + nkv, hd], v [B, T, nkv, hd], k_cache and "
                         f"v_cache [B, nkv, L, hd] and slot [T], got {list(qk.shape)}, {list(v.shape)}, "
                         f"{list(k_cache.shape)}, {list(v_cache.shape)}, {list(slot.shape)}")
    if any(t.dtype != qk.dtype for t in (v, k_cache, v_cache)) or slot.dtype != torch.int64:
        raise TypeError(f"flora.rope_cache_: v and the caches must be {qk.dtype} like qk and slot int64, got "
                        f"{v.dtype}, {k_cache.dtype}, {v_cache.dtype}, {slot.dtype}")
    if any(t.device != qk.device for t in (v, k_cache, v_cache, slot)):
        raise ValueError(f"flora.rope_cache_: every operand must be on {qk.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qk, v, k_cache, v_cache)):
        raise ValueError("flora.rope_cache_: writes the KV cache, for inference; where autograd records, "
                         "call flora.rope")
    if memory and slot.device.type == "cpu" and slot.numel():
        lo, hi = int(slot.min()), int(slot.max())
        if lo < 0 or hi >= k_cache.shape[2]:
            raise ValueError(f"flora.rope_cache_: slot values must be in [0, {k_cache.shape[2]}), got {lo} ... {hi}")


def check_silu_mul(g, u):
    if g.dim() != 2 or g.shape != u.shape:
        raise ValueError(f"flora.silu_mul: expected g, u [M, n] of one shape, got {list(g.shape)}, "
                         f"{list(u.shape)}")
    if u.dtype != g.dtype:
        raise TypeError(f"flora.silu_mul: u must be {g.dtype} like g, got {u.dtype}")


# The pointwise references are the composites the model ran before the fused
# ops, in the same dtype and with the same roundings as transformers' Llama
# (RMSNorm: normalised in fp32, rounded, then times the weight; RoPE: two
# products and a sum, each rounded; SwiGLU: silu rounded, then the product).
def _rms_norm(x, weight, eps):
    d = weight.shape[-1]
    if x.shape[-1] > d:  # zflora's stream [h | z]: z handed through unchanged
        return torch.cat([_rms_norm(x[..., :d], weight, eps), x[..., d:]], -1)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.nn.functional.rms_norm(x, (d,), weight, eps)
    return weight * torch.nn.functional.rms_norm(x, (d,), None, eps)


def _rope(x, cos, sin):
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def _silu_mul(g, u):
    return torch.nn.functional.silu(g) * u


def rms_norm_reference(x, weight, eps):
    check_rms_norm(x, weight)
    return _rms_norm(x, weight, eps)


def rope_reference(x, cos, sin):
    """x cos + rotate_half(x) sin, the rotate-half sign folded into sin
    (flora.layers.rope_cos_sin), so rotate_half is a roll."""
    check_rope(x, cos, sin)
    return _rope(x, cos, sin)


def _rope_cache(qk, v, cos, sin, k_cache, v_cache, slot):
    rot = _rope(qk, cos, sin)
    nkv = k_cache.shape[1]
    nq = qk.shape[2] - nkv
    k_cache.index_copy_(2, slot, rot[:, :, nq:].transpose(1, 2))
    v_cache.index_copy_(2, slot, v.transpose(1, 2))
    return rot[:, :, :nq]


def rope_cache_reference(qk, v, cos, sin, k_cache, v_cache, slot):
    """RoPE over q|k, then k and v written into the caches at slot (index_copy_):
    the composite the decode step ran before (StaticKVCache.update)."""
    check_rope_cache(qk, v, cos, sin, k_cache, v_cache, slot)
    return _rope_cache(qk, v, cos, sin, k_cache, v_cache, slot)


def check_decode_attention(q, k, v, mask):
    if (q.dim() != 3 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]
            or k.shape[1] < 1 or q.shape[1] % k.shape[1] or mask.dim() != 2
            or tuple(mask.shape) != (q.shape[0], k.shape[2])):
        raise ValueError(f"flora.decode_attention: expected q [B, nq, hd], k and v [B, nkv, L, hd] with nq a "
                         f"multiple of nkv, and mask [B, L], got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}, {list(mask.shape)}")
    if not q.dtype.is_floating_point or any(t.dtype != q.dtype for t in (k, v, mask)):
        raise TypeError(f"flora.decode_attention: q, k, v and the (additive) mask must be one floating dtype, "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}, {mask.dtype}")
    if any(t.device != q.device for t in (k, v, mask)):
        raise ValueError(f"flora.decode_attention: every operand must be on {q.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, mask)):
        raise ValueError("flora.decode_attention: for inference; where autograd records, call "
                         "torch.nn.functional.scaled_dot_product_attention")


def grouped_sdpa(q, k, v, mask=None):
    """One query row per sequence, q [B, nq, hd], by SDPA over the query heads
    grouped per kv head ([B, nkv, G, hd]): plain masked attention, the keys
    never expanded. mask: [B, L] or [B, 1, 1, L] (additive or boolean) or
    None. -> [B, nq * hd]."""
    B, nq, hd = q.shape
    nkv, L = k.shape[1], k.shape[2]
    mask = None if mask is None else mask.view(B, 1, 1, L)
    out = torch.nn.functional.scaled_dot_product_attention(q.reshape(B, nkv, nq // nkv, hd), k, v, attn_mask=mask)
    return out.reshape(B, nq * hd)


def decode_attention_reference(q, k, v, mask, splits=0):
    """softmax(q k^T / sqrt(hd) + mask) v per query head, its kv head the
    h // (nq / nkv)-th, written out in fp32 (the kernels' accumulation);
    a row with no unmasked key is 0. ``splits`` changes only how the kernels
    divide the work. -> [B, nq * hd]."""
    check_decode_attention(q, k, v, mask)
    B, nq, hd = q.shape
    nkv = k.shape[1]
    qg = q.reshape(B, nkv, nq // nkv, hd).float()
    att = (qg @ k.float().transpose(-1, -2)) * hd ** -0.5 + mask.float()[:, None, None, :]
    seen = (mask != float("-inf")).any(-1)[:, None, None, None]
    p = torch.where(seen, att.softmax(-1), torch.zeros_like(att)) if att.shape[-1] else att
    return (p @ v.float()).to(q.dtype).reshape(B, nq * hd)


def check_rope_cache_attention(q, k, v, k_cache, mask):
    """rope_cache_attention_'s own shapes (its two ops check the rest)."""
    caches = k_cache.dim() == 4 and k_cache.shape[3] > 0
    kv = k_cache.shape[1] * k_cache.shape[3] if caches else -1
    if not (caches and q.dim() == 2 and k.dim() == 2 and v.dim() == 2 and k.shape[0] == q.shape[0]
            and v.shape[0] == q.shape[0] and q.shape[1] % k_cache.shape[3] == 0 and k.shape[1] == kv
            and v.shape[1] == kv and mask.dim() == 2 and mask.shape[0] == q.shape[0]
            and mask.shape[1] <= k_cache.shape[2]):
        raise ValueError(f"flora.rope_cache_attention_: expected q [B, nq * hd], k and v [B, nkv * hd] (one query "
                         f"row per sequence), caches [B, nkv, L_max, hd] and mask [B, L] with L <= L_max, got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}, caches {list(k_cache.shape)} and "
                         f"mask {list(mask.shape)}")


def _rope_cache_attention(rope_cache_fn, attention_fn, q, k, v, cos, sin, k_cache, v_cache, slot, mask):
    """rope_cache_attention_ from its two ops (given as functions: references,
    fakes or wrappers)."""
    check_rope_cache_attention(q, k, v, k_cache, mask)
    B, nkv, _, hd = k_cache.shape
    qk = torch.cat([q, k], 1).view(B, 1, -1, hd)
    qr = rope_cache_fn(qk, v.reshape(B, 1, nkv, hd), cos, sin, k_cache, v_cache, slot)
    L = mask.shape[1]
    return attention_fn(qr[:, 0], k_cache[:, :, :L], v_cache[:, :, :L], mask)


def rope_cache_attention_reference(q, k, v, cos, sin, k_cache, v_cache, slot, mask):
    """rope_cache_ over q|k [B, 1, nq + nkv, hd] and v [B, 1, nkv, hd] (the
    heads of q [B, nq * hd], k and v [B, nkv * hd]), then decode_attention of
    the rotated q over the caches' first L slots (L = the mask's width)
    -> [B, nq * hd]."""
    return _rope_cache_attention(rope_cache_reference, decode_attention_reference, q, k, v, cos, sin, k_cache,
                                 v_cache, slot, mask)


def silu_mul_reference(g, u):
    check_silu_mul(g, u)
    return _silu_mul(g, u)


def check_silu_mul_inplace(g, u):
    check_silu_mul(g, u)
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        raise ValueError("flora.silu_mul_: writes over u, for inference; where autograd records, call "
                         "flora.silu_mul")


def silu_mul_inplace_reference(g, u):
    check_silu_mul_inplace(g, u)
    u.copy_(_silu_mul(g, u))


REFERENCES = {"ffl": ffl_reference, "fbl": fbl_reference, "fbl_": fbl_inplace_reference, "ffbl": ffbl_reference,
              "rms_norm": rms_norm_reference, "rope": rope_reference, "rope_cache_": rope_cache_reference,
              "silu_mul": silu_mul_reference,
              "silu_mul_": silu_mul_inplace_reference, "decode_attention": decode_attention_reference,
              "rope_cache_attention_": rope_cache_attention_reference}


# --------------------------------------------------------------------------
# Registration: schemas (when the extension is missing), missing-device
# fallbacks, fake kernels, autograd and autocast (the last two only without
# the compiled library, whose C++ forms use the same formulas)
# --------------------------------------------------------------------------
_lib = None  # keeps Python registrations alive
REFERENCE_DEVICES: dict = {}  # op -> devices where the reference runs


def _register():
    global _lib
    compiled = _ext.compiled_devices()
    if _ext.C is None:
        _lib = torch.library.Library("flora", "DEF")
        for schema in SCHEMAS.values():
            _lib.define(schema)
    else:
        _lib = torch.library.Library("flora", "IMPL")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() or torch.version.cuda else [])
    for op in SCHEMAS:
        missing = [d for d in devices if d not in compiled]
        REFERENCE_DEVICES[op] = missing
        for d in missing:
            _lib.impl(op, REFERENCES[op], d.upper())


_register()
# Each op's one overload, looked up once: the wrappers run once per op call of a decode
# step, where torch.ops.flora.<op>(...) (the packet's overload resolution) costs ~0.2 us
# more. Eager calls take the overload's C++ callable itself (OpOverload.__call__ is a
# Python frame around it: ~0.7 us a call); dynamo traces the overload, so under
# torch.compile the wrappers call that (_ops()).
_OP = type("_Overloads", (), {name: getattr(torch.ops.flora, name).default for name in SCHEMAS})
_EAGER = type("_Callables", (), {name: staticmethod(getattr(getattr(_OP, name), "_op", getattr(_OP, name)))
                                  for name in SCHEMAS})


def _ops():
    return _OP if torch.compiler.is_compiling() else _EAGER


@torch.library.register_fake("flora::rms_norm")
def _rms_norm_fake(x, weight, eps):
    check_rms_norm(x, weight)
    return x.new_empty(x.shape)


@torch.library.register_fake("flora::rope")
def _rope_fake(x, cos, sin):
    check_rope(x, cos, sin)
    return x.new_empty(x.shape)


@torch.library.register_fake("flora::silu_mul")
def _silu_mul_fake(g, u):
    check_silu_mul(g, u)
    return g.new_empty(g.shape)


@torch.library.register_fake("flora::fbl_")
def _fbl_inplace_fake(res, u, z, W, B, s=1.0, relu=False):
    check_fbl_inplace(res, u, z, W, B, memory=False)


@torch.library.register_fake("flora::rope_cache_")
def _rope_cache_fake(qk, v, cos, sin, k_cache, v_cache, slot):
    check_rope_cache(qk, v, cos, sin, k_cache, v_cache, slot, memory=False)
    return qk.new_empty((qk.shape[0], qk.shape[1], qk.shape[2] - k_cache.shape[1], qk.shape[3]))


@torch.library.register_fake("flora::silu_mul_")
def _silu_mul_inplace_fake(g, u):
    check_silu_mul_inplace(g, u)


@torch.library.register_fake("flora::decode_attention")
def _decode_attention_fake(q, k, v, mask, splits=0):
    check_decode_attention(q, k, v, mask)
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


@torch.library.register_fake("flora::rope_cache_attention_")
def _rope_cache_attention_fake(q, k, v, cos, sin, k_cache, v_cache, slot, mask):
    return _rope_cache_attention(_rope_cache_fake, _decode_attention_fake, q, k, v, cos, sin, k_cache, v_cache,
                                 slot, mask)


@torch.library.register_fake("flora::ffl")
def _ffl_fake(x, W, A, s=1.0, repeat=(), repeat_rank=0, z_in=None, res=None):
    M, _, N, R = check_ffl(x, W, A, repeat, repeat_rank, z_in, res)
    return x.new_empty(M, N + R)


@torch.library.register_fake("flora::fbl")
def _fbl_fake(u, z, W, B, s=1.0, res=None, relu=False):
    M, _, N, _ = check_fbl(u, z, W, B, res)
    return u.new_empty(M, N)


@torch.library.register_fake("flora::ffbl")
def _ffbl_fake(u, z, W, B, A, C, s=1.0, res=None, relu=False):
    M, _, N, _, R2 = check_ffbl(u, z, W, B, A, C, res)
    return u.new_empty(M, N + R2)


def _needs(ctx, n: int) -> tuple:
    # Trailing defaulted arguments may be absent from needs_input_grad.
    need = tuple(ctx.needs_input_grad)
    return need + (False,) * (n - len(need))


def _mm(a: Tensor, b: Tensor) -> Tensor:
    return a @ b


def _untile(gy: Tensor, gz: Tensor, s: float, repeat, rc: int) -> Tensor:
    """Adjoint of the repeat-add: each state chunk collects s * the sum of
    the gradient over the tiles it was added to."""
    if not repeat:
        return gz
    gz = gz.clone()
    off = 0
    for g, n in enumerate(repeat):
        tiles = gy[:, off:off + n].reshape(gy.shape[0], n // rc, rc).sum(1)
        gz[:, g * rc:(g + 1) * rc] += s * tiles
        off += n
    return gz


def _ffl_setup(ctx, inputs, output):
    x, W, A, s, repeat, rc, z_in, res = inputs
    ctx.s, ctx.repeat, ctx.rc, ctx.N = s, list(repeat), rc, W.shape[0]
    ctx.save_for_backward(x, W, A)


def _ffl_backward(ctx, grad):
    x, W, A = ctx.saved_tensors
    gy, gz = grad[:, :ctx.N], grad[:, ctx.N:]
    gz = _untile(gy, gz, ctx.s, ctx.repeat, ctx.rc)
    need = _needs(ctx, 8)
    dx = _mm(gy, W) + _mm(gz, A) if need[0] else None  # the FBL-shaped product
    dW = _mm(gy.T, x) if need[1] else None
    dA = _mm(gz.T, x) if need[2] else None
    dz_in = gz if need[6] else None
    dres = gy if need[7] else None
    return dx, dW, dA, None, None, None, dz_in, dres


def _fbl_setup(ctx, inputs, output):
    u, z, W, B, s, res, relu = inputs
    ctx.s, ctx.relu = s, relu
    ctx.save_for_backward(u, z, W, B)


def _fbl_backward(ctx, gy):
    u, z, W, B = ctx.saved_tensors
    s, need = ctx.s, _needs(ctx, 7)
    fz = torch.relu(z) if ctx.relu else z
    du = _mm(gy, W) if need[0] else None
    dz = None
    if need[1]:
        dz = s * _mm(gy, B)
        if ctx.relu:
            dz = dz * (z > 0)
    dW = _mm(gy.T, u) if need[2] else None
    dB = s * _mm(gy.T, fz) if need[3] else None
    dres = gy if need[5] else None
    return du, dz, dW, dB, None, dres, None


def _ffbl_setup(ctx, inputs, output):
    u, z, W, B, A, C, s, res, relu = inputs
    ctx.s, ctx.relu, ctx.N = s, relu, W.shape[0]
    ctx.save_for_backward(u, z, W, B, A, C)


def _ffbl_backward(ctx, grad):
    u, z, W, B, A, C = ctx.saved_tensors
    s, need = ctx.s, _needs(ctx, 9)
    gy, gz2 = grad[:, :ctx.N], grad[:, ctx.N:]
    fz = torch.relu(z) if ctx.relu else z
    du = _mm(gy, W) + _mm(gz2, A) if need[0] else None
    dz = None
    if need[1]:
        dz = s * _mm(gy, B) + _mm(gz2, C)
        if ctx.relu:
            dz = dz * (z > 0)
    dW = _mm(gy.T, u) if need[2] else None
    dB = s * _mm(gy.T, fz) if need[3] else None
    dA = _mm(gz2.T, u) if need[4] else None
    dC = _mm(gz2.T, fz) if need[5] else None
    dres = gy if need[7] else None
    return du, dz, dW, dB, dA, dC, None, dres, None


def _autocast_kernel(op: str, device_type: str):
    """Autocast rule of the no-extension build, as csrc/common/autocast.cpp:
    floating operands other than fp64 are cast to the autocast dtype."""
    fn = getattr(torch.ops.flora, op).default
    keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, "Autocast" + device_type.upper()))

    def cast(a, dt):
        if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64 \
                and a.device.type == device_type:
            return a.to(dt)
        return a

    def kernel(*args, **kwargs):
        dt = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return fn(*(cast(a, dt) for a in args), **{k: cast(v, dt) for k, v in kwargs.items()})

    return kernel


if _ext.C is None:  # the compiled library registers autograd and autocast in C++
    torch.library.register_autograd("flora::ffl", _ffl_backward, setup_context=_ffl_setup)
    torch.library.register_autograd("flora::fbl", _fbl_backward, setup_context=_fbl_setup)
    torch.library.register_autograd("flora::ffbl", _ffbl_backward, setup_context=_ffbl_setup)
    for _op in OPS:
        for _dev in ("cpu", "cuda"):
            _lib.impl(_op, _autocast_kernel(_op, _dev), "Autocast" + _dev.upper())


def _pointwise_setup(ctx, inputs, output):
    ctx.save_for_backward(*(i for i in inputs if isinstance(i, Tensor)))
    ctx.rest = [i for i in inputs if not isinstance(i, Tensor)]


def _pointwise_backward(op):
    """The pointwise ops' backward: their reference recomputed under autograd
    (cheap elementwise work; the model's training path calls the reference
    itself, see ``_fused``)."""
    def backward(ctx, grad):
        ins = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            out = REFERENCES[op](*ins, *ctx.rest)
        want = [t for t in ins if t.requires_grad]
        got = iter(torch.autograd.grad(out, want, grad) if want else ())
        return tuple(next(got) if t.requires_grad else None for t in ins) + (None,) * len(ctx.rest)
    return backward


if _ext.C is None:  # the compiled library records the composites in C++ (csrc/common/autograd.cpp)
    for _op in POINTWISE:
        torch.library.register_autograd(f"flora::{_op}", _pointwise_backward(_op), setup_context=_pointwise_setup)


# --------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------
def ffl(
    x: Tensor,
    W: Tensor,
    A: Tensor,
    s: float = 1.0,
    *,
    repeat_add: bool = False,
    repeat: Optional[Sequence[int]] = None,
    repeat_rank: Optional[int] = None,
    z_in: Optional[Tensor] = None,
    res: Optional[Tensor] = None,
    split: Optional[Sequence[int]] = None,
):
    """Fused forward layer: ``[y | z] = x [W; A]^T`` in one product.

    x [M, K], W [N, K], A [R, K] -> y [M, N], z [M, R] (views of one buffer).
    ``split`` (widths summing to N): y's column blocks of those widths instead
    of y, then z (the fused q/k/v output as q, k, v, z), cut by one call.

    Epilogues: ``z_in`` [M, R] is added to z (summed adapter states, a
    zflora stream's carry), ``res`` [M, N] to y (the residual); the
    repeat-add adds ``s * z`` tiled across y: ``repeat_add=True`` tiles all of
    z over all of y (needs N % R == 0); ``repeat=[n_0, n_1, ...]`` with
    ``repeat_rank=rc`` adds z's chunk g (columns g*rc ... ) tiled over the
    g-th consecutive segment of y (width n_g), e.g. per projection of a fused
    q/k/v product.
    """
    if repeat_add:
        if repeat is not None:
            raise ValueError("flora.ffl: give either repeat_add=True or repeat=[...], not both")
        repeat, repeat_rank = [W.shape[0]], A.shape[0] if A.dim() == 2 else 0
    out = _ops().ffl(x, W, A, float(s), list(repeat) if repeat else [], int(repeat_rank or 0), z_in, res)
    N = W.shape[0]
    return out.split_with_sizes([*split, out.shape[1] - N] if split is not None else [N, out.shape[1] - N], 1)


def fbl(
    u: Tensor,
    z: Tensor,
    W: Tensor,
    B: Tensor,
    s: float = 1.0,
    *,
    res: Optional[Tensor] = None,
    relu: bool = False,
    into_res: bool = False,
) -> Tensor:
    """Fused backward layer: ``y = u W^T + s * f(z) B^T (+ res)`` in one product
    over ``[u | z]`` and ``[W | sB]``; f is ReLU when ``relu`` else identity.

    u [M, K], z [M, R], W [N, K], B [N, R], res [M, N] -> y [M, N]. W and B
    may also be transposed views (W = V.t() of a row-major V): the input
    gradient of FFL, dy V + dz A, is fbl(dy, dz, V.t(), A.t()).

    ``into_res``: the caller gives res up. In inference y is written over it
    (``flora::fbl_``) and res is returned: cuBLAS then adds onto res (beta =
    1) instead of copying it into a fresh output first. Where autograd
    records or under autocast, a new tensor as without it.
    """
    if into_res and res is not None and _inference(res, u, z, W, B):
        _ops().fbl_(res, u, z, W, B, float(s), relu)
        return res
    return _ops().fbl(u, z, W, B, float(s), res, relu)


def adjacent(a: Tensor, b: Tensor) -> Optional[Tensor]:
    """[a | b] as one view when b's columns follow a's in one buffer (the
    fused q/k/v output, zflora's stream [h | z]), else None. Under
    torch.compile (fake tensors have no addresses) and with autograd (an
    as_strided backward is slow) the two stay apart."""
    if torch.compiler.is_compiling() or a.requires_grad or b.requires_grad:
        return None
    base = a._base  # the buffer itself when a and b are its two halves (zflora's stream): no new view
    if base is not None and b._base is base and base.shape == (a.shape[0], a.shape[1] + b.shape[1]) \
            and a.stride() == b.stride() == base.stride() and a.storage_offset() == base.storage_offset() \
            and b.storage_offset() == a.storage_offset() + a.shape[1] * a.stride(1):
        return base
    if a.stride() != b.stride() or b.data_ptr() != a.data_ptr() + a.shape[1] * a.element_size():
        return None
    return a.as_strided((a.shape[0], a.shape[1] + b.shape[1]), a.stride())


# Both run once per op call in a decode step: plain loops, no device objects
# (a generator and Tensor.device cost ~0.8 us a call).
def _inference(*ts: Tensor) -> bool:
    """An in-place form may run: no autograd recording (it has no backward),
    no autocast (it would cast res). Under torch.compile too: Inductor
    re-inplaces a mutation of a buffer nothing reads later."""
    if torch.is_grad_enabled():
        for t in ts:
            if t.requires_grad:
                return False
    return not torch.is_autocast_enabled("cuda" if ts[0].is_cuda else "cpu")


def _fused(*ts: Tensor) -> bool:
    """Run a pointwise op's one-pass kernel (or its in-place form), or the
    composite it replaces: under torch.compile Inductor fuses the composite
    with its neighbours; training (autograd, autocast) keeps the composite's
    own backward; mixed dtypes keep its type promotion."""
    dt = ts[0].dtype
    for t in ts:
        if t.dtype != dt:
            return False
    return not torch.compiler.is_compiling() and _inference(*ts)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x [M, d] (rows may be strided) with weight [d], as
    transformers' Llama computes it: normalised in fp32, in bf16 / fp16
    rounded before the weight multiplies. One pass over x.

    x may be wider than the weight, [M, d + t] (zflora's stream [h | z]): its
    first d columns are normalised and the last t handed through unchanged,
    so a reader's GEMM takes [n(h) | z] as one operand (ADAPTERS.md)."""
    if _fused(x, weight):
        return _EAGER.rms_norm(x, weight, float(eps))
    return _rms_norm(x, weight, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [B, T, heads, head_dim] (a strided view is fine):
    x cos + rotate_half(x) sin with the sign of rotate_half folded into sin
    (cos, sin [B, T, 1, head_dim] from flora.layers.rope_cos_sin). One pass."""
    if _fused(x, cos, sin):
        return _EAGER.rope(x, cos, sin)
    return _rope(x, cos, sin)


def rope_cache(qk: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
               slot: Tensor) -> Tensor:
    """A decode step's RoPE over q|k (qk [B, T, nq + nkv, hd], the fused
    qkv output's view) with the KV-cache write: k rotated and v [B, T, nkv,
    hd] go into k_cache / v_cache [B, nkv, L, hd] at positions slot [T];
    returns q rotated [B, T, nq, hd]. One pass where RoPE and two
    index_copy_ ran three; the composite under torch.compile (Inductor
    fuses it) or where autograd records."""
    if _fused(qk, v, cos, sin, k_cache, v_cache):
        return _EAGER.rope_cache_(qk, v, cos, sin, k_cache, v_cache, slot)
    return _rope_cache(qk, v, cos, sin, k_cache, v_cache, slot)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """A decode step's attention: q [B, nq, hd] (one query row per sequence)
    over the KV-cache window k, v [B, nkv, L, hd] (views of the cache are
    fine), the additive key mask [B, L] (0: a real key, -inf: padding or a
    slot not yet written) -> [B, nq * hd]. Query head h reads kv head
    h // (nq / nkv).

    flora's kernel splits the keys into chunks and combines them
    (flash-decoding), reading each kv head once for its group of query heads
    and never a masked slot; SDPA over the grouped heads where it does not
    run (training, autocast, or a shape it does not take)."""
    if _inference(q, k, v, mask):
        return _ops().decode_attention(q, k, v, mask)
    return grouped_sdpa(q, k, v, mask)


def rope_cache_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                         v_cache: Tensor, slot: Tensor, mask: Tensor) -> Tensor:
    """A decode step's attention from the fused q/k/v output's blocks q [B, nq *
    hd], k and v [B, nkv * hd] (one query row per sequence): :func:`rope_cache`
    (q|k rotated, k and v written into k_cache / v_cache [B, nkv, L_max, hd] at
    slot [1]), then :func:`decode_attention` of the rotated q over the caches'
    first L slots, L the additive key mask's width ([B, L]) -> [B, nq * hd].
    In inference one op call (the eager step: one crossing into C++, which
    views the heads, q|k as one view where k follows q); else the two
    wrappers in turn."""
    if _fused(q, k, v, cos, sin, k_cache, v_cache, mask):
        return _EAGER.rope_cache_attention_(q, k, v, cos, sin, k_cache, v_cache, slot, mask)
    return _rope_cache_attention(rope_cache, decode_attention, q, k, v, cos, sin, k_cache, v_cache, slot, mask)


def silu_mul(g: Tensor, u: Tensor, *, over_u: bool = False) -> Tensor:
    """SwiGLU's silu(g) * u for g, u [M, n] (views of the fused gate/up
    output). One pass.

    ``over_u``: in inference (where the one-pass op runs) the product is
    written over u and u is returned, so it keeps u's place in the gate/up
    output: next to the ffba state that follows u there, the down
    projection's GEMM reads [mid | z] as one operand. Elsewhere a new tensor."""
    if _fused(g, u):
        if not over_u:
            return _EAGER.silu_mul(g, u)
        _EAGER.silu_mul_(g, u)
        return u
    return _silu_mul(g, u)


def ffbl(
    u: Tensor,
    z: Tensor,
    W: Tensor,
    B: Tensor,
    A: Tensor,
    C: Tensor,
    s: float = 1.0,
    *,
    res: Optional[Tensor] = None,
    relu: bool = False,
):
    """Fused forward-backward layer: ``[y | z'] = [u | f(z)] [W, sB; A, C]^T``.

    y = u W^T + s f(z) B^T (+ res), z' = u A^T + f(z) C^T.
    u [M, K], z [M, R], W [N, K], B [N, R], A [R', K], C [R', R]
    -> y [M, N], z' [M, R'] (views of one buffer).
    """
    out = _ops().ffbl(u, z, W, B, A, C, float(s), res, relu)
    N = W.shape[0]
    return out.split_with_sizes([N, out.shape[1] - N], 1)
