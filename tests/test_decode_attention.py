"""flora.ops.decode_attention: a decode step's attention over the KV-cache
window, split over the keys (flash-decoding). The op against the reference
written out in float64 (error at most 2x SDPA's own on the same operands),
for every split count, masks as the decoder makes them (left padding, slots
not yet written, whole chunks masked), cache views; the fallback for what the
kernels do not take; checks, schema and fake; the model's decode on it. The
CUDA kernel's own tests are in test_cuda_kernels.py."""
import pytest
import torch
from torch.library import opcheck

from flora import _ext, layers, ops
from flora.layers import attention

compiled = pytest.mark.skipif(_ext.C is None, reason=f"extension not built: {_ext.ERROR}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG = float("-inf")
# the CPU kernel's bodies: scalar (aten), AVX2 and AVX-512 vector bodies, as this CPU has them
# ("avx512_bf16" scores bf16 by VDPBF16PS; "avx512" runs the plain AVX-512 body, bf16 included)
ORDER = ["aten", "avx2", "avx512", "avx512_bf16"]
ISAS = ORDER[: ORDER.index(_ext.C.detected_cpu_isa()) + 1] if _ext.C is not None else []


@pytest.fixture(params=ISAS)
def isa(request):
    old = _ext.C.cpu_isa()
    _ext.C.set_cpu_isa(request.param)
    yield request.param
    _ext.C.set_cpu_isa(old)


def attention_case(dtype, device="cpu", B=2, nq=8, nkv=2, hd=64, L=300, seed=0, pad=True):
    """q as rope_cache_ returns it; k, v the first L slots of wider caches
    (the decoder's window views); the additive mask a view of [B, 1, 1, L']:
    row b left-padded by 37 b slots, the last 3 slots not yet written."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = r(B, nq, hd)
    kc, vc = r(B, nkv, L + 24, hd), r(B, nkv, L + 24, hd)
    full = torch.zeros(B, 1, 1, L + 16, dtype=dtype, device=device)
    if pad:
        for b in range(B):
            full[b, 0, 0, : min(37 * b, L - 1)] = NEG
        full[:, 0, 0, max(1, L - 3):L] = NEG
    return q, kc[:, :, :L], vc[:, :, :L], full[:, 0, 0, :L]


def _err(out, ref):
    return (out.double() - ref).abs().max().item() if out.numel() else 0.0


def _check(out, q, k, v, mask, what):
    ref = ops.decode_attention_reference(q.double(), k.double(), v.double(), mask.double())
    own = _err(ops.grouped_sdpa(q, k, v, mask), ref)  # torch's own error on these operands
    # a few ulps of the output's scale: fp32 sums of hundreds of weights
    floor = 4 * torch.finfo(q.dtype).eps * max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
    err = _err(out, ref)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert err <= 2 * max(own, floor), f"{what}: error {err:.3g} > 2 x SDPA's {own:.3g}"


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 9, 3, 64, 100), (2, 32, 8, 64, 500), (3, 4, 4, 128, 300),
                                   (2, 24, 8, 128, 129), (1, 8, 1, 64, 5), (2, 16, 2, 16, 260)])
@pytest.mark.parametrize("splits", [0, 1, 2, 3, 100])
def test_op_matches_reference(dtype, shape, splits):
    """Every split count gives the same attention (3 splits of 500 keys: chunks
    of 256, 256 and the rest; 100 requested: one per 128-key tile). An
    explicit count runs the kernel at any window; 0 lets the CPU pick the
    count (the kernel at any window with AVX2) or SDPA (the scalar body's
    CPU)."""
    B, nq, nkv, hd, L = shape
    q, k, v, mask = attention_case(dtype, B=B, nq=nq, nkv=nkv, hd=hd, L=L)
    with torch.no_grad():
        out = torch.ops.flora.decode_attention(q, k, v, mask, splits)
    _check(out, q, k, v, mask, f"{dtype} {shape} splits={splits}")


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    # (B, nq, nkv, hd, L): query heads per kv head 1-8 (head blocks of 4: 5 = 4 + 1,
    # 6 = 4 + 2, 7 = 4 + 3), head_dim 8 / 16 / 64 / 72 (a multiple of 8, not 16:
    # AVX-512 takes AVX2's body) / 96 (bf16 pairs: 3 steps of 32) / 128 / 256, windows
    # not a multiple of the tile nor of the 2-16-key score blocks
    (1, 1, 1, 8, 3), (2, 2, 1, 16, 131), (1, 3, 1, 64, 257), (2, 5, 1, 64, 77),
    (1, 6, 1, 72, 300), (2, 8, 2, 96, 150), (1, 7, 1, 128, 255), (2, 16, 2, 256, 140),
    (1, 12, 3, 64, 1000)])
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_kernel_bodies_at_their_edges(isa, dtype, shape, splits):
    """Each body of the CPU kernel (scalar, AVX2, AVX-512, and AVX-512 with bf16
    scores by VDPBF16PS on a CPU with avx512_bf16) against the fp64 reference where
    its register blocks do not divide the work: the kv
    head's query heads in blocks of up to 4, the listed keys in score blocks
    (the last padded), head_dim in P x V blocks, masked keys scattered so
    blocks list from 0 to all of their keys, finite mask values, a row with
    a single unmasked key."""
    B, nq, nkv, hd, L = shape
    q, k, v, _ = attention_case(dtype, B=B, nq=nq, nkv=nkv, hd=hd, L=L, pad=False)
    g = torch.Generator().manual_seed(L)
    mask = torch.randn(B, L, generator=g).clamp(-2, 2)
    mask[torch.rand(B, L, generator=g) < 0.3] = NEG      # scattered masked keys
    mask[0, : L // 2] = NEG                              # whole blocks masked
    if L > 130:
        mask[0, 128:131] = torch.tensor([0.0, NEG, 1.0])  # a block listing 2 of its first 3 keys
    if B > 1:
        mask[1] = NEG
        mask[1, L // 3] = 0.5                            # one key only
    mask = mask.to(dtype)
    with torch.no_grad():
        out = torch.ops.flora.decode_attention(q, k, v, mask, splits)
    _check(out, q, k, v, mask, f"{isa} {dtype} {shape} splits={splits}")


@compiled
@pytest.mark.parametrize("splits", [64, 100])
def test_combine_of_many_splits(splits):
    """The CPU combine weighs each split once per row (up to 64 splits) and
    falls back to the shared per-element combine beyond: 64 and 66 chunks of
    a window of 66 tiles."""
    q, k, v, mask = attention_case(torch.float32, B=1, nq=4, nkv=2, hd=16, L=65 * 128 + 3, pad=False)
    mask[0, 1000:2000] = NEG
    with torch.no_grad():
        _check(torch.ops.flora.decode_attention(q, k, v, mask, splits), q, k, v, mask, f"splits={splits}")


@compiled
def test_masked_keys_are_not_read(isa):
    """A masked slot's K and V are never read: NaN there (a slot not yet
    written) leaves the kernel's output finite, where SDPA's is NaN. At 1500
    keys the vector bodies take the call by default; the scalar body's CPU
    leaves it to SDPA."""
    q, k, v, mask = attention_case(torch.float32, B=2, nq=8, nkv=2, L=1500, pad=False)
    mask[:, :10] = NEG
    mask[1, 700:900] = NEG
    k[:, :, 3] = v[:, :, 3] = k[1, :, 800] = v[1, :, 800] = float("nan")
    with torch.no_grad():
        assert not torch.ops.flora.decode_attention(q, k, v, mask, 2).isnan().any()
        by_default = torch.ops.flora.decode_attention(q, k, v, mask)
    assert by_default.isnan().any() == (isa == "aten")


@compiled
@pytest.mark.parametrize("splits", [1, 4])
def test_masked_chunks_and_rows(splits):
    """A chunk whose keys are all masked contributes nothing (its partial has
    no weight); a row with no unmasked key is 0, not NaN (SDPA gives NaN)."""
    q, k, v, mask = attention_case(torch.float32, B=3, nq=4, nkv=2, L=512, pad=False)
    mask[0, :300] = NEG          # row 0: only the last chunks
    mask[1, 130:] = NEG          # row 1: only the first chunk and 2 keys of the second
    mask[2] = NEG                # row 2: nothing
    with torch.no_grad():
        out = torch.ops.flora.decode_attention(q, k, v, mask, splits)
    ref = ops.decode_attention_reference(q.double(), k.double(), v.double(), mask.double())
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(ref[2], torch.zeros_like(ref[2]).double())
    torch.testing.assert_close(out[:2].double(), ref[:2], rtol=0, atol=1e-5)


@compiled
def test_mask_values_are_added():
    """The mask is additive (any finite value biases the scores), not a
    boolean read of 0 / -inf."""
    q, k, v, mask = attention_case(torch.float32, B=2, nq=4, nkv=2, L=200)
    mask = mask + torch.linspace(-3, 2, 200)  # -inf stays -inf
    with torch.no_grad():
        _check(torch.ops.flora.decode_attention(q, k, v, mask), q, k, v, mask, "biased mask")


@compiled
def test_empty_window_and_batch():
    q, k, v, mask = attention_case(torch.float32, B=2, nq=4, nkv=2, L=0, pad=False)
    with torch.no_grad():
        assert torch.equal(torch.ops.flora.decode_attention(q, k, v, mask), torch.zeros(2, 4 * 64))
        q0, k0, v0, m0 = attention_case(torch.float32, B=0, nq=4, nkv=2, L=10, pad=False)
        assert torch.ops.flora.decode_attention(q0, k0, v0, m0).shape == (0, 256)


@compiled
@pytest.mark.parametrize("case", ["fp64", "head_dim_12", "group_16", "scalar_body", "strided_q"])
def test_shapes_the_kernel_does_not_take_fall_back(case):
    """fp64, a head_dim not a multiple of 8, more than 8 query heads per kv
    head, the scalar body's CPU (no AVX2, or FLORA_CPU_ISA=aten: SDPA's
    kernel is faster than one key at a time), a q with a non-unit last
    stride: SDPA over the grouped heads, the same result."""
    kw = {"fp64": dict(), "head_dim_12": dict(hd=12), "group_16": dict(nq=32, nkv=2),
          "scalar_body": dict(L=100), "strided_q": dict()}[case]
    q, k, v, mask = attention_case(torch.float64 if case == "fp64" else torch.float32, **kw)
    if case == "strided_q":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    old = _ext.C.cpu_isa()
    if case == "scalar_body":
        _ext.C.set_cpu_isa("aten")
    try:
        with torch.no_grad():
            _check(torch.ops.flora.decode_attention(q, k, v, mask), q, k, v, mask, case)
    finally:
        _ext.C.set_cpu_isa(old)


@pytest.mark.parametrize("bad,exc,msg", [
    (lambda q, k, v, m: (q[0], k, v, m), ValueError, "expected q \\[B, nq, hd\\]"),
    (lambda q, k, v, m: (q[:, :7], k, v, m), ValueError, "nq a multiple of nkv"),
    (lambda q, k, v, m: (q, k, v[:, :, :5], m), ValueError, "k and v"),
    (lambda q, k, v, m: (q, k, v, m[:, :5]), ValueError, "mask \\[B, L\\]"),
    (lambda q, k, v, m: (q, k, v, m != 0), TypeError, "one floating dtype"),
    (lambda q, k, v, m: (q, k.double(), v, m), TypeError, "one floating dtype"),
])
def test_bad_operands_name_the_problem(bad, exc, msg):
    args = bad(*attention_case(torch.float32, L=20))
    for fn in (torch.ops.flora.decode_attention, ops.REFERENCES["decode_attention"]):
        with pytest.raises(exc, match=msg):
            fn(*args)


def test_refused_where_autograd_records_and_the_wrapper_takes_sdpa():
    q, k, v, mask = attention_case(torch.float32, L=40)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="for inference"):
        torch.ops.flora.decode_attention(q, k, v, mask)
    out = ops.decode_attention(q, k, v, mask)  # the composite, with a gradient
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@compiled
def test_opcheck_and_compile():
    """Schema, fake and dispatch agree (opcheck); the op compiles (fullgraph)
    to the same result."""
    q, k, v, mask = attention_case(torch.float32, L=150)
    with torch.no_grad():
        opcheck(torch.ops.flora.decode_attention.default, (q, k, v, mask, 2),
                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
        eager = ops.decode_attention(q, k, v, mask)
        got = torch.compile(ops.decode_attention, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    torch.testing.assert_close(got, eager)


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_at_one_query_row_takes_the_op(monkeypatch, dtype):
    """flora.layers.attention at T = 1 with the decoder's additive mask goes
    through ops.decode_attention and equals the grouped SDPA call it replaced."""
    q, k, v, mask = attention_case(dtype, B=2, nq=8, nkv=2, L=90)
    seen = []
    real = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a: seen.append(1) or real(*a))
    with torch.no_grad():
        got = attention(q.view(2, 1, 8, 64), k, v, mask[:, None, None, :])
        want = ops.grouped_sdpa(q, k, v, mask)
    assert seen
    _check(got, q, k, v, mask, "layers.attention")
    assert got.shape == want.shape


def _sdpa_ran(fn) -> bool:
    """Did ``fn()`` reach SDPA (the op's fallback; the kernel never calls it)?"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any("scaled_dot_product" in e.name for e in prof.events())


@compiled
@pytest.mark.parametrize("case", [(torch.float32, 64, 4, 90), (torch.bfloat16, 64, 3, 300),
                                  (torch.float16, 128, 8, 33), (torch.float32, 12, 4, 90),
                                  (torch.float32, 264, 1, 20), (torch.float32, 16, 16, 40),
                                  (torch.float64, 64, 4, 90)])
def test_kernel_rule_is_what_the_op_runs(isa, case):
    """flora._C.cpu_decode_attention_takes (what the compiled decode step asks)
    says True exactly where the op runs flora's kernel, at each ISA level: the
    op's own rule, one definition in csrc/cpu/register.cpp."""
    dtype, hd, G, L = case
    q, k, v, mask = attention_case(dtype, B=2, nq=2 * G, nkv=2, hd=hd, L=L)
    takes = layers.cpu_decode_kernel_takes(dtype, hd, G, L)
    with torch.no_grad():
        assert _sdpa_ran(lambda: torch.ops.flora.decode_attention(q, k, v, mask)) == (not takes)
    assert takes == (isa != "aten" and dtype != torch.float64 and hd % 8 == 0 and hd <= 256 and G <= 8)


_ENV_RULE = """
import torch
from flora import _ext, layers
from test_decode_attention import _sdpa_ran, attention_case
q, k, v, mask = attention_case(torch.float32, B=1, nq=9, nkv=3, hd=64, L=70)
with torch.no_grad():
    ran = _sdpa_ran(lambda: torch.ops.flora.decode_attention(q, k, v, mask))
print(_ext.C.cpu_isa(), layers.cpu_decode_kernel_takes(torch.float32, 64, 3, 70), ran)
"""


@compiled
@pytest.mark.parametrize("env", [{"FLORA_CPU_ISA": "aten"}, {"FLORA_CPU_ISA": "avx2"},
                                 {"FLORA_CPU_ATTENTION_MAX_KEYS": "64"}])
def test_kernel_rule_sees_the_environment(env):
    """FLORA_CPU_ISA (read once, at the extension's first use) and the window
    cap FLORA_CPU_ATTENTION_MAX_KEYS reach the rule as they reach the op: a
    fresh process each (SmolLM2's heads, 70 keys)."""
    import os
    import subprocess
    import sys

    if env.get("FLORA_CPU_ISA", "aten") not in ISAS:
        pytest.skip(f"this CPU has no {env['FLORA_CPU_ISA']}")
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-c", _ENV_RULE], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env, "PYTHONPATH": path})
    assert p.returncode == 0, p.stderr
    isa, takes, sdpa = p.stdout.split()
    assert isa == env.get("FLORA_CPU_ISA", _ext.C.cpu_isa())
    assert takes == str(isa != "aten" and "FLORA_CPU_ATTENTION_MAX_KEYS" not in env)
    assert sdpa == str(takes == "False")


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [64, 12])
@pytest.mark.parametrize("cpu_isa", ["default", "aten"])
def test_compiled_attention_at_one_query_row(dtype, hd, cpu_isa):
    """Under torch.compile (fullgraph) on the CPU, attention at T = 1 with the
    decoder's additive mask calls the op where the kernel rule, asked outside
    the trace, says the kernel runs (Inductor calls the kernel: faster than
    the written-out form) and writes it out where it does not (head_dim 12,
    or the aten ISA: the op would run SDPA); either matches the reference."""
    if cpu_isa == "aten" and hd == 12:
        pytest.skip("the same as the default ISA's")
    q, k, v, mask = attention_case(dtype, B=2, nq=8, nkv=2, hd=hd, L=90)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    old = _ext.C.cpu_isa()
    if cpu_isa == "aten":
        _ext.C.set_cpu_isa("aten")
    try:
        takes = layers.cpu_decode_kernel_takes(dtype, hd, 4, 90)
        with torch.no_grad():
            got = torch.compile(attention, fullgraph=True, backend=backend)(
                q.view(2, 1, 8, hd), k, v, mask[:, None, None, :], takes)
    finally:
        _ext.C.set_cpu_isa(old)
    op = (torch.ops.flora.decode_attention, torch.ops.flora.decode_attention.default)
    called = any(n.target in op for g in graphs for n in g.graph.nodes)
    assert takes == (hd == 64 and cpu_isa == "default")
    assert called == takes
    _check(got, q, k, v, mask, f"compiled layers.attention hd={hd} isa={cpu_isa}")


def rope_attention_case(dtype, B=2, nq=9, nkv=3, hd=64, L_max=96, L=70, adjacent=True, seed=0):
    """The eager decode step's operands of flora::rope_cache_attention_: q, k, v
    as column blocks of one fused output row (k right after q where
    ``adjacent``, else apart), the RoPE tables, full-length caches, the slot
    (the window's last) and the key mask of the window: row b left-padded by
    5 b slots."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    gap = 0 if adjacent else 8
    out = r(B, (nq + 2 * nkv) * hd + gap)
    q, k, v = out[:, :nq * hd], out[:, nq * hd + gap:(nq + nkv) * hd + gap], out[:, (nq + nkv) * hd + gap:]
    kc, vc = r(B, nkv, L_max, hd), r(B, nkv, L_max, hd)
    mask = torch.zeros(B, L, dtype=dtype)
    for b in range(B):
        mask[b, :5 * b] = NEG
    return q, k, v, r(B, 1, 1, hd), r(B, 1, 1, hd), kc, vc, torch.tensor([L - 1]), mask


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adjacent", [True, False])
@pytest.mark.parametrize("shape", [(2, 9, 3, 64, 96, 70), (1, 8, 2, 128, 64, 64), (3, 4, 4, 16, 300, 129)])
def test_rope_cache_attention_is_its_two_ops(dtype, adjacent, shape):
    """flora::rope_cache_attention_ (the eager decode step's RoPE, cache write
    and attention in one call) gives what rope_cache_ then decode_attention
    give, bitwise (the same kernels), and writes the caches as they do: k and
    v at the slot only; q|k as one view where k follows q, else copied."""
    B, nq, nkv, hd, L_max, L = shape
    q, k, v, cos, sin, kc, vc, slot, mask = rope_attention_case(dtype, B, nq, nkv, hd, L_max, L, adjacent)
    kc2, vc2, before, ref_kc, ref_vc = kc.clone(), vc.clone(), kc.clone(), kc.clone(), vc.clone()
    with torch.no_grad():
        got = torch.ops.flora.rope_cache_attention_(q, k, v, cos, sin, kc, vc, slot, mask)
        qk = torch.cat([q, k], 1).view(B, 1, nq + nkv, hd)
        qr = torch.ops.flora.rope_cache_(qk, v.reshape(B, 1, nkv, hd), cos, sin, kc2, vc2, slot)
        want = torch.ops.flora.decode_attention(qr[:, 0], kc2[:, :, :L], vc2[:, :, :L], mask)
    assert torch.equal(got, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    keep = torch.ones(L_max, dtype=torch.bool)
    keep[slot] = False
    assert torch.equal(kc[:, :, keep], before[:, :, keep])
    # the pure-PyTorch reference: the same cache writes, and both within the error bound of
    # the fp64 attention over the rotated q
    ref = ops.rope_cache_attention_reference(q, k, v, cos, sin, ref_kc, ref_vc, slot, mask)
    assert torch.equal(ref_kc, kc) and torch.equal(ref_vc, vc)
    for out in (got, ref):
        _check(out, qr[:, 0], kc[:, :, :L], vc[:, :, :L], mask, f"{dtype} {shape} adjacent={adjacent}")


@compiled
def test_rope_cache_attention_checks_opcheck_and_wrapper():
    """Schema (two mutated caches), fake and dispatch agree (opcheck); shapes that
    do not fit name the op; where autograd records the wrapper runs the two
    ops' wrappers (SDPA and the RoPE composite), to the same result."""
    args = rope_attention_case(torch.float32)
    with torch.no_grad():
        opcheck(torch.ops.flora.rope_cache_attention_.default, tuple(a.clone() for a in args),
                test_utils=("test_schema", "test_faketensor"))
    q, k, v, cos, sin, kc, vc, slot, mask = args
    for fn in (torch.ops.flora.rope_cache_attention_, ops.REFERENCES["rope_cache_attention_"]):
        with pytest.raises(ValueError, match="rope_cache_attention_: expected q"):
            fn(q, k, v, cos, sin, kc, vc, slot, torch.zeros(2, 200))  # a window past the caches
        with pytest.raises(ValueError, match="rope_cache_attention_: expected q"):
            fn(q, k[:, :8], v, cos, sin, kc, vc, slot, mask)
    with torch.no_grad():
        want = ops.rope_cache_attention(q, k, v, cos, sin, kc.clone(), vc.clone(), slot, mask)
    qg = q.clone().requires_grad_(True)
    got = ops.rope_cache_attention(qg, k, v, cos, sin, kc.clone(), vc.clone(), slot, mask)
    got.sum().backward()
    assert qg.grad is not None
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)


@compiled
def test_eager_decode_step_runs_one_attention_op_per_layer():
    """The eager decode step calls flora::rope_cache_attention_ once a layer
    (RoPE, the cache write and the attention in one crossing into C++), and
    its logits are those of the same step with the ops called one by one."""
    from flora import generation
    from llama_fixtures import llama_model, random_ids
    from flora.model import FusedLlama

    m = FusedLlama.from_pretrained(llama_model(heads=8, kv_heads=2, layers=3))
    ids = random_ids(2, 6)
    with generation.inference_mode(m):
        dec = generation.Decoder(m, 2, 16, use_cuda_graph=False)
        tok = dec.prefill(ids, torch.ones_like(ids, dtype=torch.bool)).argmax(-1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = dec.step(tok)
        names = [e.name for e in prof.events()]
        assert names.count("flora::rope_cache_attention_") == 3
        dec2 = generation.Decoder(m, 2, 16, use_cuda_graph=False)
        dec2.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
        dec2.cache.attend = lambda *a: None  # the pieces: update_rotated, then layers.attention
        want = dec2.step(tok)
    assert torch.equal(got, want)
