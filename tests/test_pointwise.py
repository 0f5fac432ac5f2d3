"""The pointwise ops of the Llama step (flora.ops.rms_norm, rope, silu_mul):
one-pass kernels against the composites they replace (the references, with
transformers' roundings) and against float64, their schema / fake / autograd
registrations, and when the model's wrappers run them."""
import pytest
import torch
from torch.library import opcheck

from flora import _ext, ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
compiled = pytest.mark.skipif(_ext.C is None, reason=f"extension not built: {_ext.ERROR}")


def cases(dtype, device="cpu"):
    """Operands as the model hands them over: row-strided views of fused outputs."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x = r(5, 300)[:, 7:263]                          # a normed stream: [M, d] with a row stride
    qk = r(2, 3, 14, 80)[:, :, 1:13, 8:72]           # q|k heads of a fused qkv output
    cos, sin = r(2, 3, 1, 64), r(2, 3, 1, 64)
    gu = r(4, 2 * 96 + 8)
    return {"rms_norm": (x, r(256), 1e-5), "rope": (qk, cos, sin), "silu_mul": (gu[:, :96], gu[:, 96:192])}


def exact(op, args):
    """The op in float64 with the reference's rounding points kept in the
    storage dtype: what a correctly rounded one-pass kernel can reach."""
    dt = args[0].dtype
    a64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    if op == "rms_norm":
        x, w, eps = a64
        n = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        return n * w if dt == torch.float32 else n.to(dt).double() * w
    if op == "rope":
        x, c, s = a64
        return (x * c).to(dt).double() + (x.roll(x.shape[-1] // 2, -1) * s).to(dt).double()
    g, u = a64
    return torch.nn.functional.silu(g).to(dt).double() * u


@compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("op", ops.POINTWISE)
def test_op_against_its_composite(op, dtype, device):
    """RoPE is bitwise the composite (the same three roundings); RMSNorm and
    SiLU x up may differ by the last bit of a sum or an exp, so they are held
    to the composite's own distance from float64."""
    args = cases(dtype, device)[op]
    got = getattr(torch.ops.flora, op)(*args)
    ref = ops.REFERENCES[op](*args)
    assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
    if op == "rope" or dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        return
    want = exact(op, args)
    own = (ref.double() - want).abs().max().item()
    ulp = torch.finfo(dtype).eps * want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 2 * own + ulp


@compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ops.POINTWISE)
def test_opcheck(op, device):
    args = cases(torch.float32, device)[op]
    opcheck(getattr(torch.ops.flora, op).default, args)
    grads = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    opcheck(getattr(torch.ops.flora, op).default, grads)


@pytest.mark.parametrize("op", ops.POINTWISE)
def test_gradcheck_float64(op):
    args = cases(torch.float64)[op]
    ts = [a.detach().clone().requires_grad_(True) for a in args if isinstance(a, torch.Tensor)]
    rest = [a for a in args if not isinstance(a, torch.Tensor)]
    assert torch.autograd.gradcheck(lambda *t: getattr(torch.ops.flora, op)(*t, *rest), ts)


@pytest.mark.parametrize("op,bad,exc,msg", [
    ("rms_norm", lambda: (torch.randn(2, 8), torch.randn(9), 1e-5), ValueError, "flora.rms_norm: expected"),
    ("rms_norm", lambda: (torch.randn(2, 8), torch.randn(2, 8), 1e-5), ValueError, "flora.rms_norm: expected"),
    ("rms_norm", lambda: (torch.randn(2, 8), torch.randn(8).double(), 1e-5), TypeError, "weight must match"),
    ("rope", lambda: (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)), ValueError,
     "flora.rope: expected"),
    ("rope", lambda: (torch.randn(1, 2, 3, 7), torch.randn(1, 2, 1, 7), torch.randn(1, 2, 1, 7)), ValueError,
     "head_dim even"),
    ("rope", lambda: (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 1, 8).half(), torch.randn(1, 2, 1, 8).half()),
     TypeError, "cos and sin must be"),
    ("silu_mul", lambda: (torch.randn(2, 8), torch.randn(2, 9)), ValueError, "flora.silu_mul: expected"),
    ("silu_mul", lambda: (torch.randn(2, 8), torch.randn(2, 8).half()), TypeError, "u must be"),
])
def test_bad_operands(op, bad, exc, msg):
    """The compiled op and the reference reject the same operands with the same error."""
    for fn in (getattr(torch.ops.flora, op), ops.REFERENCES[op]):
        with pytest.raises(exc, match=msg):
            fn(*bad())


def stream(dtype, device="cpu", M=5, d=256, r=8):
    """zflora's stream [h | z] as the model hands it to the norm: a row-strided
    view of a writer's output, d columns normalised and r handed through."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, d + r + 40, generator=g)[:, 7:7 + d + r].to(device=device, dtype=dtype)
    return x, torch.randn(d, generator=g).to(device=device, dtype=dtype), 1e-5


@compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_rms_norm_hands_the_stream_through(dtype, device):
    """x [M, d + r], weight [d]: the first d columns are the RMSNorm of x's
    first d columns (bitwise the plain call on that view), the last r are x's
    own, unchanged; the reference (the composite with a concatenation) agrees."""
    x, w, eps = stream(dtype, device)
    d = w.shape[0]
    got = torch.ops.flora.rms_norm(x, w, eps)
    assert got.shape == x.shape and got.is_contiguous()
    assert torch.equal(got[:, d:], x[:, d:])
    assert torch.equal(got[:, :d], torch.ops.flora.rms_norm(x[:, :d], w, eps))
    ref = ops.rms_norm_reference(x, w, eps)
    assert torch.equal(ref[:, d:], x[:, d:])
    want = exact("rms_norm", (x[:, :d], w, eps))
    own = (ref[:, :d].double() - want).abs().max().item()
    ulp = torch.finfo(dtype).eps * want.abs().max().item()
    assert (got[:, :d].double() - want).abs().max().item() <= 2 * own + ulp


@compiled
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_stream_opcheck_and_gradients(device):
    """Schema, fake and autograd of the handed-through form; z's gradient
    passes straight through and h's is the norm's (float64 gradcheck)."""
    x, w, eps = stream(torch.float32, device)
    opcheck(torch.ops.flora.rms_norm.default, (x, w, eps))
    opcheck(torch.ops.flora.rms_norm.default, (x.detach().clone().requires_grad_(True), w.clone().requires_grad_(True), eps))
    x, w, eps = stream(torch.float64, device, M=3, d=16, r=4)
    xs, ws = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.flora.rms_norm(a, b, eps), (xs, ws))


@compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_over_u(dtype, device):
    """flora::silu_mul_ writes the product over u (u's place in the gate/up
    output), bitwise what flora::silu_mul returns, and leaves the columns
    around u alone; opcheck covers its mutation annotation and fake."""
    gu = torch.randn(4, 2 * 96 + 8, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    g, u = gu[:, :96], gu[:, 96:192]
    want, before = torch.ops.flora.silu_mul(g, u), gu.clone()
    torch.ops.flora.silu_mul_(g, u)
    assert torch.equal(u, want)
    assert torch.equal(gu[:, :96], before[:, :96]) and torch.equal(gu[:, 192:], before[:, 192:])
    opcheck(torch.ops.flora.silu_mul_.default, (g, gu.clone()[:, 96:192]))


def test_silu_mul_over_u_only_for_inference():
    """Where autograd records, the in-place op refuses with a clear error and
    the wrapper hands back a new tensor (the composite) instead."""
    g, u = torch.randn(2, 8), torch.randn(2, 8, requires_grad=True)
    for fn in (torch.ops.flora.silu_mul_, ops.REFERENCES["silu_mul_"]):
        with pytest.raises(ValueError, match="for inference"):
            fn(g, u)
    out = ops.silu_mul(g, u, over_u=True)
    assert out is not u and out.requires_grad
    with torch.no_grad():
        u2 = u.detach().clone()
        assert ops.silu_mul(g, u2, over_u=True) is u2


def decode_qkv(dtype, device="cpu", B=2, T=1, nq=8, nkv=2, hd=64, L=12):
    """A decode step's operands of flora::rope_cache_: q|k and v as views of
    the fused qkv output, the RoPE tables, the two caches and the slot."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    qkv = r(B, T, nq + 2 * nkv + 1, hd)[:, :, 1:]  # strided, as the qkv GEMM's output viewed
    caches = r(B, nkv, L, hd), r(B, nkv, L, hd)
    slot = torch.arange(L - 1 - T, L - 1, device=device)
    return qkv[:, :, :nq + nkv], qkv[:, :, nq + nkv:], r(B, T, 1, hd), r(B, T, 1, hd), *caches, slot


@compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("T", [1, 3, 70])
def test_rope_cache_against_its_composite(T, dtype, device):
    """q rotated, k rotated and v written into the caches at slot: bitwise
    what RoPE then two index_copy_ give (the same roundings), every other
    cache slot untouched; T = 70 takes the composite on the CPU (above
    4096 elements)."""
    qk, v, cos, sin, kc, vc, slot = decode_qkv(dtype, device, T=T, L=80)
    kc2, vc2, before = kc.clone(), vc.clone(), kc.clone()
    q = torch.ops.flora.rope_cache_(qk, v, cos, sin, kc, vc, slot)
    q2 = ops.rope_cache_reference(qk, v, cos, sin, kc2, vc2, slot)
    assert q.shape == q2.shape and torch.equal(q, q2)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    keep = torch.ones(kc.shape[2], dtype=torch.bool, device=device)
    keep[slot] = False
    assert torch.equal(kc[:, :, keep], before[:, :, keep])


@compiled
def test_rope_cache_checks_and_opcheck():
    """Schema (two mutated caches), fake and the errors: slot out of range,
    shapes that do not fit, autograd recording."""
    args = decode_qkv(torch.float32)
    opcheck(torch.ops.flora.rope_cache_.default, tuple(a.clone() for a in args))
    qk, v, cos, sin, kc, vc, slot = args
    for fn in (torch.ops.flora.rope_cache_, ops.REFERENCES["rope_cache_"]):
        with pytest.raises(ValueError, match="slot values must be in"):
            fn(qk, v, cos, sin, kc, vc, torch.tensor([12]))
        with pytest.raises(ValueError, match="expected qk"):
            fn(qk, v[:, :, :1], cos, sin, kc, vc, slot)
        with pytest.raises(ValueError, match="for inference"):
            fn(qk.clone().requires_grad_(True), v, cos, sin, kc, vc, slot)


def _calls(fn):
    from torch.profiler import profile

    with profile() as p:
        fn()
    return {e.name for e in p.events() if e.name.startswith("flora::")}


def test_wrappers_run_the_kernels_for_inference_only():
    """The model's wrappers: the one-pass op in inference; the composite where
    autograd records (training), under autocast, and with mixed dtypes."""
    x, w, eps = cases(torch.float32)["rms_norm"]
    with torch.no_grad():
        assert _calls(lambda: ops.rms_norm(x, w, eps)) == {"flora::rms_norm"}
        assert _calls(lambda: ops.rms_norm(x, w.double(), eps)) == set()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _calls(lambda: ops.rms_norm(x, w, eps)) == set()
    wg = w.clone().requires_grad_(True)
    assert _calls(lambda: ops.rms_norm(x, wg, eps).sum().backward()) == set()
    g, u = cases(torch.bfloat16)["silu_mul"]
    with torch.inference_mode():
        assert _calls(lambda: ops.silu_mul(g, u)) == {"flora::silu_mul"}
        assert _calls(lambda: ops.rope(*cases(torch.bfloat16)["rope"])) == {"flora::rope"}
        torch.testing.assert_close(ops.silu_mul(g, u), ops.silu_mul_reference(g, u), rtol=0, atol=0)


def test_compiled_function_uses_the_composite():
    """Under torch.compile the wrappers hand Inductor the composite to fuse."""
    x, w, eps = cases(torch.float32)["rms_norm"]
    f = torch.compile(lambda x, w: ops.rms_norm(x, w, eps) * 2, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert _calls(lambda: f(x, w)) == set()
        torch.testing.assert_close(f(x, w), 2 * ops.rms_norm_reference(x, w, eps))
