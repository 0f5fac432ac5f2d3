"""CPU decode kernels (csrc/cpu/kernels) against a float64 reference.

Every ISA path this CPU supports runs (avx512_bf16 / avx512 / avx2 / aten,
switched with flora._C.set_cpu_isa), for fp32 / bf16 / fp16, odd shapes, strided views and
every epilogue. The tolerance is tied to the error torch itself makes doing
the same computation in the same dtype: tol = 2 * max|torch - ref64| + tiny,
tiny = 2 ulps at the output's largest magnitude.
"""
import pytest
import torch

import flora
from flora import _ext, ops

C = _ext.C
pytestmark = pytest.mark.skipif(C is None, reason="flora extension not built")

ORDER = ["aten", "avx2", "avx512", "avx512_bf16"]
ISAS = ORDER[: ORDER.index(C.detected_cpu_isa()) + 1] if C else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=ISAS)
def isa(request):
    old = C.cpu_isa()
    C.set_cpu_isa(request.param)
    yield request.param
    C.set_cpu_isa(old)


def rand(*shape, dtype, gen, scale=1.0):
    """Fresh random non-zero values, exactly representable in `dtype`."""
    t = torch.randn(*shape, generator=gen) * scale
    t = torch.where(t.abs() < 1e-3, torch.full_like(t, 0.5), t)
    return t.to(dtype)


def view(rows, cols, dtype, gen, pad=5, col0=0):
    """[rows, cols] as a row-strided view into a wider buffer."""
    buf = rand(rows, cols + pad + col0, dtype=dtype, gen=gen)
    return buf[:, col0:col0 + cols]


def d64(args):
    return [a.double() if isinstance(a, torch.Tensor) else a for a in args]


def assert_close(out, same, ref64, dtype):
    """out, same (torch in dtype) vs ref64: |out - ref| <= 2 max|same - ref| + tiny."""
    ref = ref64.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    # a couple of ulps at the output's magnitude: rounding order differs
    tiny = 2 * torch.finfo(dtype).eps * scale + 1e-30
    tol = 2 * (same.double() - ref).abs().max().item() + tiny if ref.numel() else 0.0
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert out.dtype == dtype and out.shape == ref.shape
    assert err <= tol, f"max error {err:.3g} > tol {tol:.3g} (torch same-dtype error {(tol - tiny) / 2:.3g})"


# ---- the same computations done by torch in the operands' dtype ----------
def torch_ffl(x, W, A, s, repeat, rc, z_in, res=None):
    y, z = x @ W.T, x @ A.T
    if z_in is not None:
        z = z + z_in
    if res is not None:
        y = y + res
    off, parts = 0, []
    for g, n in enumerate(repeat):
        parts.append(y[:, off:off + n] + s * z[:, g * rc:(g + 1) * rc].repeat(1, n // rc))
        off += n
    y = torch.cat(parts + [y[:, off:]], 1)
    return torch.cat([y, z], 1)


def torch_fbl(u, z, W, B, s, res, relu):
    fz = torch.relu(z) if relu else z
    y = u @ W.T + s * (fz @ B.T)
    return y + res if res is not None else y


def torch_ffbl(u, z, W, B, A, C_, s, res, relu):
    fz = torch.relu(z) if relu else z
    return torch.cat([torch_fbl(u, z, W, B, s, res, relu), u @ A.T + fz @ C_.T], 1)


# ---- FFL -------------------------------------------------------------------
FFL_CASES = [  # M, K, N, R, layout, epilogue
    (1, 37, 53, 1, "adjacent", None),
    (3, 53, 37, 7, "separate", "z_in"),
    (1, 64, 48, 16, "adjacent", "repeat_add"),
    (5, 37, 42, 7, "strided", "segments"),
    (16, 70, 64, 64, "separate", "segments_zin"),
    (17, 37, 53, 7, "strided", "segments"),  # above the decode threshold: ATen
    (2, 0, 21, 3, "separate", "z_in"),       # K = 0
    (4, 29, 19, 0, "adjacent", None),        # R = 0
    # + res on y (a zflora / ffa writer's residual)
    (1, 64, 48, 8, "adjacent", "z_in_res"),
    (3, 40, 48, 16, "strided", "repeat_add_res"),
    (2, 0, 21, 3, "separate", "res"),
]


def ffl_operands(M, K, N, R, layout, epi, dtype, gen):
    if layout == "adjacent":  # [W; A] rows of one storage
        WA = rand(N + R, K, dtype=dtype, gen=gen)
        W, A = WA[:N], WA[N:]
    elif layout == "strided":  # both row-strided, in separate buffers
        W, A = view(N, K, dtype, gen, pad=3), view(R, K, dtype, gen, pad=9, col0=2)
    else:
        W, A = rand(N, K, dtype=dtype, gen=gen), rand(R, K, dtype=dtype, gen=gen)
    x = view(M, K, dtype, gen, pad=11)  # x as a view into a wider buffer
    kw = dict(s=0.75, repeat=[], rc=0, z_in=None, res=None)
    if epi and "z_in" in epi or epi == "segments_zin":
        kw["z_in"] = view(M, R, dtype, gen, pad=4, col0=1)
    if epi and epi.endswith("res"):
        kw["res"] = view(M, N, dtype, gen, pad=5, col0=3)
    if epi and epi.startswith("repeat_add"):
        kw.update(repeat=[N], rc=R)
    elif epi and epi.startswith("segments"):  # e.g. q/k/v: 3 segments, rc = R // 3
        rc = max(1, R // 3)
        widths = [rc * (N // (3 * rc))] * 2
        widths.append(rc * ((N - sum(widths)) // rc))
        kw.update(repeat=widths, rc=rc)
    return x, W, A, kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FFL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ffl(isa, dtype, case):
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    M, K, N, R, layout, epi = case
    x, W, A, kw = ffl_operands(*case, dtype, gen)
    if layout == "adjacent":
        assert W.untyped_storage().data_ptr() == A.untyped_storage().data_ptr()
    out = torch.ops.flora.ffl(x, W, A, kw["s"], kw["repeat"], kw["rc"], kw["z_in"], kw["res"])
    args = (x, W, A, kw["s"], kw["repeat"], kw["rc"], kw["z_in"], kw["res"])
    ref = ops.ffl_reference(*d64(args))
    assert_close(out, torch_ffl(*args), ref, dtype)
    y, z = flora.ops.ffl(x, W, A, kw["s"], repeat=kw["repeat"] or None,
                         repeat_rank=kw["rc"] or None, z_in=kw["z_in"], res=kw["res"])
    assert torch.equal(torch.cat([y, z], 1), out)  # deterministic, wrapper = raw op


# ---- FBL / FFBL -------------------------------------------------------------
FBL_CASES = [  # M, K, N, R, R2, layout, relu, res, s
    (1, 37, 53, 1, 1, "fused", False, False, 1.0),
    (3, 53, 37, 7, 7, "separate", True, True, 0.5),
    (1, 64, 40, 64, 16, "fused", True, False, 2.0),
    (8, 37, 53, 16, 5, "strided", False, True, 1.0),
    (16, 45, 33, 7, 64, "separate", True, True, 0.3),
    (17, 37, 53, 7, 7, "fused", True, True, 0.5),  # ATen
    (2, 0, 13, 5, 3, "separate", False, True, 1.5),  # K = 0
    (4, 29, 19, 0, 0, "separate", False, True, 1.0),  # R = 0
]


def fbl_operands(M, K, N, R, R2, layout, relu, res, s, dtype, gen):
    if layout == "fused":  # B as a column slice of [W | B] storage, [u | z] too
        WB = rand(N, K + R, dtype=dtype, gen=gen)
        W, B = WB[:, :K], WB[:, K:]
        uz = rand(M, K + R, dtype=dtype, gen=gen)
        u, z = uz[:, :K], uz[:, K:]
    elif layout == "strided":
        W, B = view(N, K, dtype, gen, pad=3), view(N, R, dtype, gen, pad=6, col0=2)
        u, z = view(M, K, dtype, gen, pad=2), view(M, R, dtype, gen, pad=5, col0=1)
    else:
        W, B = rand(N, K, dtype=dtype, gen=gen), rand(N, R, dtype=dtype, gen=gen)
        u, z = rand(M, K, dtype=dtype, gen=gen), rand(M, R, dtype=dtype, gen=gen)
    A, C_ = view(R2, K, dtype, gen, pad=4), view(R2, R, dtype, gen, pad=2)
    r = view(M, N, dtype, gen, pad=7) if res else None
    return u, z, W, B, A, C_, r


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FBL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fbl(isa, dtype, case):
    gen = torch.Generator().manual_seed(hash(case) % 2**31 + 1)
    u, z, W, B, A, C_, r = fbl_operands(*case, dtype, gen)
    relu, s = case[6], case[8]
    out = torch.ops.flora.fbl(u, z, W, B, s, r, relu)
    args = (u, z, W, B, s, r, relu)
    assert_close(out, torch_fbl(*args), ops.fbl_reference(*d64(args)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FBL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ffbl(isa, dtype, case):
    gen = torch.Generator().manual_seed(hash(case) % 2**31 + 2)
    u, z, W, B, A, C_, r = fbl_operands(*case, dtype, gen)
    relu, s = case[6], case[8]
    out = torch.ops.flora.ffbl(u, z, W, B, A, C_, s, r, relu)
    args = (u, z, W, B, A, C_, s, r, relu)
    assert_close(out, torch_ffbl(*args), ops.ffbl_reference(*d64(args)), dtype)


# ---- larger K: accumulation over many vector steps ---------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_k(isa, dtype):
    gen = torch.Generator().manual_seed(7)
    M, K, N, R = 2, 2085, 67, 16
    u, z = view(M, K, dtype, gen), view(M, R, dtype, gen)
    W, B = rand(N, K, dtype=dtype, gen=gen), rand(N, R, dtype=dtype, gen=gen)
    A, C_ = rand(R, K, dtype=dtype, gen=gen), rand(R, R, dtype=dtype, gen=gen)
    args = (u, z, W, B, A, C_, 0.5, None, True)
    out = torch.ops.flora.ffbl(*args)
    assert_close(out, torch_ffbl(*args), ops.ffbl_reference(*d64(args)), dtype)


# ---- gradients ---------------------------------------------------------------
def test_gradcheck_float64():
    """float64 always goes to ATen; backward is ops.py's formulas."""
    gen = torch.Generator().manual_seed(3)
    g = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
    x, W, A, zi = g(3, 7), g(6, 7), g(4, 7), g(3, 4)
    f = lambda x, A, zi: torch.ops.flora.ffl(x, W.detach(), A, 0.7, [4, 2], 2, zi)
    assert torch.autograd.gradcheck(f, (x, A, zi))
    u, z, B, C_, r = g(3, 7), g(3, 4), g(6, 4), g(5, 4), g(3, 6)
    A2 = g(5, 7)
    f = lambda u, z, B, A2, C_, r: torch.ops.flora.ffbl(u, z, W.detach(), B, A2, C_, 0.7, r, True)
    assert torch.autograd.gradcheck(f, (u, z, B, A2, C_, r))


def test_grad_fp32_kernel_path(isa):
    """fp32 forward through the decode kernel, grads vs float64 autograd."""
    gen = torch.Generator().manual_seed(4)
    M, K, N, R = 3, 37, 42, 7
    mk = lambda *s: torch.randn(*s, generator=gen)
    base = dict(x=mk(M, K), W=mk(N, K), A=mk(R, K), zi=mk(M, R), B=mk(N, R), C=mk(R, R),
                res=mk(M, N), gy=mk(M, N), gz=mk(M, R))

    def run(dtype, fn):
        t = {k: v.detach().clone().to(dtype).requires_grad_(k not in ("W", "gy", "gz"))
             for k, v in base.items()}
        y, z = fn(t)
        (y * t["gy"]).sum().add_((z * t["gz"]).sum()).backward()
        return {k: v.grad for k, v in t.items() if v.grad is not None}

    def ffl_then_ffbl(t):
        y, z = flora.ops.ffl(t["x"], t["W"][:, :K], t["A"], 0.5, repeat=[21, 21], repeat_rank=3,
                             z_in=t["zi"])
        return flora.ops.ffbl(y[:, :K], z, t["W"], t["B"], t["A"], t["C"], 0.5, res=t["res"],
                              relu=True)

    g32, g64 = run(torch.float32, ffl_then_ffbl), run(torch.float64, ffl_then_ffbl)
    assert set(g32) == set(g64) and len(g32) == 6
    for k in g32:
        torch.testing.assert_close(g32[k].double(), g64[k], rtol=1e-4, atol=1e-4 * g64[k].abs().max().item())


# ---- dispatch, validation and info -------------------------------------------
def test_errors_same_as_reference(isa):
    x, W, A = torch.randn(2, 8), torch.randn(5, 8), torch.randn(3, 8).double()
    with pytest.raises(TypeError, match="flora.ffl: dtype mismatch: x is"):
        torch.ops.flora.ffl(x, W, A)
    with pytest.raises(ValueError, match="K mismatch"):
        torch.ops.flora.fbl(x, torch.randn(2, 3), torch.randn(5, 7), torch.randn(5, 3))
    with pytest.raises(ValueError, match="unit stride"):
        torch.ops.flora.fbl(x, torch.randn(3, 2).T, W, torch.randn(5, 2))


def test_set_isa_rejects_unknown():
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        C.set_cpu_isa("sse9")


def test_info_lists_cpu_dispatch(isa):
    rows = [k for k in flora.info()["kernels"] if k["device"] == "cpu"]
    impls = " | ".join(f"{k['impl']} [{k['when']}]" for k in rows)
    assert "aten matmul on fused storage" in impls and "backward" in impls
    if isa != "aten":
        assert isa.split("_")[0] in impls and "gemv decode kernel" in impls
        cut = {n: C.cpu_gemv_max_m(dt) for n, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                                                     ("fp16", torch.float16))}
        assert ", ".join(f"{n} M <= {m}" for n, m in cut.items()) in impls  # the cutoffs that run
        # the bf16 dot products (gemv and attention scores) at avx512_bf16 only
        assert ("bf16 dot" in impls and "bf16 scores" in impls) == (isa == "avx512_bf16")
    else:
        assert "gemv" not in impls


# ---- the M cutoff: the machine's rule, and the kernels over every M a rule may give ----
# Largest M on the decode kernels (register.cpp, measured with bench/kernels.py --aten-too,
# bench/RESULTS.md): with AMX bf16 (oneDNN's AMX GEMM takes over early) and without it.
# Keyed (AMX, Intel): MKL's sgemm is fast on Intel CPUs only.
# (AMX bf16, Intel, avx512_bf16): the rule's cutoffs (csrc/cpu/register.cpp)
RULE = {(False, True, True): {torch.float32: 16, torch.bfloat16: 16, torch.float16: 512},
        (False, False, True): {torch.float32: 128, torch.bfloat16: 16, torch.float16: 512},
        (False, True, False): {torch.float32: 16, torch.bfloat16: 512, torch.float16: 512},
        (False, False, False): {torch.float32: 128, torch.bfloat16: 512, torch.float16: 512}}
for _k in [(False, i, b) for i in (True, False) for b in (True, False)]:
    RULE[(True,) + _k[1:]] = {torch.float32: 16, torch.bfloat16: 4, torch.float16: 8}
MACHINE = (C.has_amx_bf16(), C.cpu_is_intel(), C.has_avx512_bf16()) if C is not None else None
RULE_MAX = max(m for r in RULE.values() for m in r.values())


@pytest.mark.skipif(bool(__import__("os").environ.get("FLORA_CPU_GEMV_MAX_M")),
                    reason="FLORA_CPU_GEMV_MAX_M overrides the rule")
def test_gemv_max_m_rule(gemv_max_m):
    want = RULE[MACHINE]
    assert {dt: C.cpu_gemv_max_m(dt) for dt in want} == want
    assert C.cpu_gemv_max_m(torch.float64) == 0  # fp64: always ATen
    basis = "a CPU with AMX" if MACHINE[0] else (("an Intel CPU" if MACHINE[1] else "a CPU")
                                                 + " without AMX" + ("" if MACHINE[2] else " or avx512_bf16"))
    when = lambda: " | ".join(k["when"] for k in flora.info()["kernels"] if "gemv" in k["impl"])
    if C.cpu_isa() != "aten":
        assert f"cutoffs for {basis})" in when()
    gemv_max_m(7)
    assert [C.cpu_gemv_max_m(dt) for dt in DTYPES] == [7, 7, 7]
    if C.cpu_isa() != "aten":
        assert "fp32 M <= 7, bf16 M <= 7, fp16 M <= 7" in when() and "overridden" in when()
    gemv_max_m(-1)
    assert {dt: C.cpu_gemv_max_m(dt) for dt in want} == want


# M on both sides of each rule's cutoffs; K, N, R off the vector widths (tails)
CUTOFF_MS = [5, 6, 8, 9, 12, 13, 16, 17, 24, 32, 128, 129, 512, 513]


@pytest.mark.parametrize("route", ["rule", "kernel"])
@pytest.mark.parametrize("M", CUTOFF_MS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_across_cutoffs(isa, dtype, M, route, gemv_max_m):
    """ffl (segments, z_in, res), fbl, fbl_ and ffbl at M around every cutoff a rule may
    give: as this machine dispatches them ("rule") and on the decode kernels at every M
    ("kernel": the override at the largest cutoff any rule gives), against float64."""
    if route == "kernel":
        gemv_max_m(RULE_MAX + 1)
    gen = torch.Generator().manual_seed(M * 7 + DTYPES.index(dtype))
    K, N, R = 83, 45, 9
    x, W, A, kw = ffl_operands(M, K, N, R, "strided", "segments_zin", dtype, gen)
    kw["res"] = view(M, N, dtype, gen, pad=5, col0=3)
    args = (x, W, A, kw["s"], kw["repeat"], kw["rc"], kw["z_in"], kw["res"])
    out = torch.ops.flora.ffl(*args)
    assert_close(out, torch_ffl(*args), ops.ffl_reference(*d64(args)), dtype)
    u, z, W, B, A, C_, r = fbl_operands(M, K, N, R, 7, "fused", True, True, 0.5, dtype, gen)
    args = (u, z, W, B, 0.5, r, True)
    ref = ops.fbl_reference(*d64(args))
    assert_close(torch.ops.flora.fbl(*args), torch_fbl(*args), ref, dtype)
    acc = r.clone()
    torch.ops.flora.fbl_(acc, u, z, W, B, 0.5, True)  # y over the residual
    assert_close(acc, torch_fbl(*args), ref, dtype)
    args = (u, z, W, B, A, C_, 0.5, r, True)
    assert_close(torch.ops.flora.ffbl(*args), torch_ffbl(*args), ops.ffbl_reference(*d64(args)), dtype)
