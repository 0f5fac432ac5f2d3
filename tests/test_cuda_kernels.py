"""The CUDA kernels (csrc/cuda/kernels): dispatch table and padding on any
machine; the kernels themselves on a device (marked `cuda`).

Device tests force the not-yet-verified kernels on (FLORA_CUDA_KERNELS=1),
check through flora._C.cuda_last_dispatch that the kernel meant ran (not the
cuBLAS fallback), and compare with an fp64 reference: the error may be at
most 2x torch's own (the cuBLAS path in the same dtype, same inputs).
Outputs land in poisoned (NaN-filled) memory, operands are strided views of
wider fused buffers, every epilogue is covered, and autograd runs through.
"""
from __future__ import annotations

import pytest
import torch

from flora import _ext, ops
from flora.info import cuda_kernels, format_info

C = _ext.C
needs_ext = pytest.mark.skipif(C is None, reason="flora._C not built")


# ---------------------------------------------------------------------------
# Dispatch table (plain code: runs on CPU-only builds)
# ---------------------------------------------------------------------------
def dispatch(**kw):
    base = dict(op="fbl", dtype="bf16", arch=90, M=1, N=2048, K=2048, R=32, R2=32,
                compiled=True, kernels="all")
    base.update(kw)
    return C.cuda_dispatch(**base)


@needs_ext
@pytest.mark.parametrize("M,arch,dtype,want", [
    (1, 90, "bf16", "decode_bf16"), (16, 80, "fp16", "decode_fp16"),
    (17, 90, "bf16", "gemm_sm90_bf16"), (1000, 89, "fp16", "gemm_sm80_fp16"),
    (512, 100, "bf16", "cublas"), (1, 75, "bf16", "cublas"), (1, 90, "fp32", "cublas"),
])
def test_dispatch_table(M, arch, dtype, want):
    kernel, planned, reason = dispatch(M=M, arch=arch, dtype=dtype)
    assert kernel == want
    assert (reason == "") == (kernel != "cublas")


@needs_ext
def test_dispatch_gate_and_reasons(monkeypatch):
    # Not verified on a device -> cuBLAS, and it says so.
    k, planned, reason = dispatch(kernels="default")
    assert (k, planned) == ("cublas", "decode_bf16") and "not verified on a device" in reason
    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")
    assert C.cuda_dispatch("fbl", "bf16", 90, 1, 64, 64, compiled=True)[0] == "decode_bf16"
    monkeypatch.setenv("FLORA_CUDA_KERNELS", "0")  # off: cuBLAS even where a kernel is verified and faster
    k, _, reason = C.cuda_dispatch("fbl", "bf16", 90, 1, 64, 64, compiled=True, assume_verified=True)
    assert k == "cublas" and "FLORA_CUDA_KERNELS=0" in reason
    monkeypatch.delenv("FLORA_CUDA_KERNELS")
    assert C.cuda_dispatch("fbl", "bf16", 90, 1, 64, 64, compiled=True, assume_verified=True)[0] == "decode_bf16"
    with pytest.raises(ValueError, match="kernels: 'default'"):
        dispatch(kernels="on")
    assert "not compiled" in dispatch(compiled=False)[2]
    assert "makes R a multiple of 8" in dispatch(M=512, all_aligned=False)[2]
    # sm_90 FBL with s != 1, relu or split operands: the two-range instance.
    assert dispatch(M=512, one_k_range=False)[0] == "gemm_sm90_2k_bf16"
    assert dispatch(M=512, one_k_range=False, weights_t=True)[0] == "gemm_sm90_2k_t_bf16"
    assert "16-byte aligned" in dispatch(M=2, vec_aligned=False)[2]
    assert "more than 8 repeat-add" in dispatch(op="ffl", M=512, repeat_groups=9)[2]
    # res on an FFL's y: the decode kernel and the plain GEMMs add it, the repeat-add GEMMs do not
    assert dispatch(op="ffl", M=512, ffl_res=True)[0] == "gemm_sm90_bf16"
    assert dispatch(op="ffl", M=4, repeat_groups=2, ffl_res=True)[0] == "decode_bf16"
    k, planned, reason = dispatch(op="ffl", M=512, repeat_groups=2, ffl_res=True)
    assert (k, planned) == ("cublas", "gemm_sm90_rep_bf16") and "add no residual" in reason
    # FFL has no K range to join: the sm_90 kernel takes it either way.
    assert dispatch(op="ffl", M=512, one_k_range=False)[0] == "gemm_sm90_bf16"


@needs_ext
def test_verified_kernels_run_only_where_they_beat_cublas():
    """Default dispatch of a verified kernel follows what the H200 run measured
    (bench/RESULTS.md): the decode kernel for FBL / FFBL at M = 1 only; FFL,
    M > 1 and the GEMMs stay on cuBLAS. FLORA_CUDA_KERNELS=1 runs them all."""
    def default(**kw):
        return dispatch(kernels="default", assume_verified=True, **kw)

    for op in ("fbl", "ffbl"):
        assert default(op=op, M=1)[0] == "decode_bf16"
        assert default(op=op, M=1, dtype="fp16", arch=80)[0] == "decode_fp16"
    for kw in (dict(op="ffl", M=1), dict(M=4), dict(M=16), dict(M=512), dict(op="ffl", M=512, repeat_groups=2)):
        k, planned, reason = default(**kw)
        assert k == "cublas" and planned != "" and "as fast or faster" in reason, (kw, reason)
        assert dispatch(kernels="all", **kw)[0] == planned  # forced: the kernel runs
    # not verified (the table is empty until a device run fills it): cuBLAS, whatever the shape
    assert "not verified" in dispatch(kernels="default", M=1)[2]


@needs_ext
def test_device_run_can_time_kernels_as_if_verified(monkeypatch):
    """FLORA_CUDA_ASSUME_VERIFIED (the device script, after a kernel passed its
    tests and sanitizers): default dispatch as once listed in kVerified."""
    monkeypatch.setenv("FLORA_CUDA_ASSUME_VERIFIED", "decode_bf16")
    assert dispatch(kernels="default", M=1)[0] == "decode_bf16"
    assert "as fast or faster" in dispatch(kernels="default", M=4)[2]   # measured_faster still decides
    assert "not verified" in dispatch(kernels="default", M=1, dtype="fp16")[2]
    monkeypatch.setenv("FLORA_CUDA_ASSUME_VERIFIED", "all")
    assert dispatch(kernels="default", M=1, dtype="fp16")[0] == "decode_fp16"
    verified = {name: where for name, _, _, where, _ in C.cuda_kernels()}
    assert "FLORA_CUDA_ASSUME_VERIFIED" in verified["pointwise"]


@needs_ext
@pytest.mark.parametrize("arch,dtype,want", [
    (90, "bf16", "gemm_sm90_rep_bf16"), (80, "fp16", "gemm_sm80_rep_fp16"),
    (89, "bf16", "gemm_sm80_rep_bf16"),
])
def test_dispatch_repeat_add_gemm(arch, dtype, want):
    """FFL with repeat-add at M > 16 runs the repeat-add GEMM (z first through
    the plain one); while unverified the reason names the kernel."""
    assert dispatch(op="ffl", M=512, arch=arch, dtype=dtype, repeat_groups=2)[0] == want
    k, planned, reason = dispatch(op="ffl", M=512, arch=arch, dtype=dtype, repeat_groups=2,
                                  kernels="default")
    assert (k, planned) == ("cublas", want) and f"{want} compiled, not verified" in reason


@needs_ext
def test_dispatch_transposed_weights():
    """Backward dx (FBL over W^T, A^T) runs the [K, n]-weight GEMMs at M > 16
    (sm_90: the two-range instance when dy, dz are not one range)."""
    assert dispatch(M=512, weights_t=True)[0] == "gemm_sm90_t_bf16"
    assert dispatch(M=512, weights_t=True, one_k_range=False)[0] == "gemm_sm90_2k_t_bf16"
    assert dispatch(M=512, arch=86, dtype="fp16", weights_t=True)[0] == "gemm_sm80_t_fp16"
    assert "GEMM kernels only" in dispatch(M=4, weights_t=True)[2]


@needs_ext
def test_flora_info_lists_kernel_state():
    rows = cuda_kernels()
    names = {r["name"] for r in rows}
    assert {"decode_bf16", "gemm_sm80_bf16", "gemm_sm90_bf16", "gemm_sm80_rep_bf16",
            "gemm_sm90_rep_fp16", "gemm_sm80_t_bf16", "gemm_sm90_t_fp16",
            "gemm_sm90_2k_bf16", "gemm_sm90_2k_t_fp16", "pointwise"} <= names
    for r in rows:
        assert r["status"].startswith(("not compiled", "compiled, not verified", "verified on"))
    text = format_info()
    assert "cuda kernels:" in text and "decode_bf16" in text
    # cuda_archs is the union of the compiled kernels' archs ("" on a CPU build),
    # what `flora info` and the device script's build check read.
    from flora._ext import C

    built = {a.strip() for _, arch, _, _, b in C.cuda_kernels() if b for a in arch.split(",")}
    archs = C.cuda_archs()
    if C.cuda_kernels_compiled():
        assert archs and set(archs.split(", ")) == built, (archs, built)
    else:
        assert archs in ("", "cuBLAS only (no flora kernels)") and not built


# ---------------------------------------------------------------------------
# Padding R to a multiple of 8 (what TMA / cp.async need) changes nothing
# ---------------------------------------------------------------------------
def _pad_rows(t, to):
    return torch.cat([t, t.new_zeros(to - t.shape[0], t.shape[1])])


def _pad_cols(t, to):
    return torch.cat([t, t.new_zeros(t.shape[0], to - t.shape[1])], dim=1)


@pytest.mark.parametrize("R", [1, 7, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_R_to_8_is_exact(R, dtype):
    """Zero rows of A / columns of B, C and z (R -> multiple of 8) leave every
    output bit unchanged, in the reference and in the compiled CPU op.
    Small-integer data: every sum is exact in fp32, whatever the blocking."""
    M, K, N = 5, 24, 16
    Rp = (R + 7) // 8 * 8

    def r(*shape):
        return torch.randint(-4, 5, shape).to(dtype)

    x, W, A, B, Cm, z, res = r(M, K), r(N, K), r(R, K), r(N, R), r(R, R), r(M, R), r(M, N)
    for ffl in (ops.ffl_reference, torch.ops.flora.ffl):
        out, outp = ffl(x, W, A, 0.5), ffl(x, W, _pad_rows(A, Rp), 0.5)
        assert torch.equal(outp[:, :N + R], out) and not outp[:, N + R:].any()
    for fbl in (ops.fbl_reference, torch.ops.flora.fbl):
        want = fbl(x, z, W, B, 0.5, res, True)
        assert torch.equal(fbl(x, _pad_cols(z, Rp), W, _pad_cols(B, Rp), 0.5, res, True), want)
    Cp = _pad_cols(_pad_rows(Cm, Rp), Rp)
    for ffbl in (ops.ffbl_reference, torch.ops.flora.ffbl):
        want = ffbl(x, z, W, B, A, Cm, 0.5, res, False)
        got = ffbl(x, _pad_cols(z, Rp), W, _pad_cols(B, Rp), _pad_rows(A, Rp), Cp, 0.5, res, False)
        assert torch.equal(got[:, :N + R], want) and not got[:, N + R:].any()


# ---------------------------------------------------------------------------
# On a device: every kernel, every epilogue
# ---------------------------------------------------------------------------
DTYPES = [torch.bfloat16, torch.float16]
M_DECODE = [1, 3, 16]
M_GEMM = [17, 256, 1000]


def _arch():
    p = torch.cuda.get_device_properties(0)
    return p.major * 10 + p.minor


def _expected_kernel(M, dtype, gemm_ok=True, rep=False, wt=False, two=False):
    """two: FBL / FFBL operands that are not one K range (sm_90's 2k instance)."""
    arch = _arch()
    kind = "rep_" if rep else ("2k_" if two and arch == 90 else "") + ("t_" if wt else "")
    dt = "bf16" if dtype == torch.bfloat16 else "fp16"
    if M <= 16:
        return f"decode_{dt}"
    if not gemm_ok:
        return None
    return f"gemm_sm90_{kind}{dt}" if arch == 90 else f"gemm_sm80_{kind}{dt}" if 80 <= arch < 90 else None


def _poison(nbytes):
    """Leave NaN-filled blocks in the caching allocator so a fresh output
    starts as NaN: an element the kernel does not write shows up."""
    junk = [torch.full((nbytes // 2 + 64,), float("nan"), dtype=torch.float16, device="cuda")
            for _ in range(4)]
    del junk


def _fused(rows, cols, dtype):
    """A row-major block inside a wider buffer (16-byte row stride, wider
    than the block: a strided view)."""
    buf = torch.randn(rows, (cols + 7) // 8 * 8 + 8, dtype=dtype, device="cuda")
    return buf[:, :cols]


def _check(got, want64, torch_out, dtype, what):
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) outputs"
    err = (got.double() - want64).abs().max().item()
    own = (torch_out.double() - want64).abs().max().item()
    floor = torch.finfo(dtype).eps * want64.abs().max().item()
    assert err <= 2 * max(own, floor), f"{what}: error {err:.3g} > 2 x torch's {own:.3g}"


def _run_both(monkeypatch, fn, want_kernel):
    """(kernel result, cuBLAS result in the same dtype)."""
    monkeypatch.setenv("FLORA_CUDA_KERNELS", "0")
    base = fn()
    assert C.cuda_last_dispatch().startswith("cublas")
    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")
    _poison(base.numel() * base.element_size())
    got = fn()
    if want_kernel is not None:
        assert C.cuda_last_dispatch() == want_kernel, C.cuda_last_dispatch()
    return got, base


def _d(t):
    return None if t is None else t.double()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", M_DECODE + M_GEMM)
@pytest.mark.parametrize("R", [1, 8, 32, 256])
@pytest.mark.parametrize("z_in,res", [(False, False), (True, False), (False, True), (True, True)])
def test_ffl_kernel(monkeypatch, dtype, M, R, z_in, res):
    """res: a zflora / ffa writer's residual, in y's epilogue."""
    K, N = 1032, 520
    x = _fused(M, K, dtype)
    WA = _fused(N + R, K, dtype)  # fused [W; A] storage
    W, A = WA[:N], WA[N:]
    zi = _fused(M, R, dtype) if z_in else None
    h = _fused(M, N, dtype) if res else None
    aligned = R % 8 == 0
    got, base = _run_both(monkeypatch, lambda: torch.ops.flora.ffl(x, W, A, 1.0, [], 0, zi, h),
                          _expected_kernel(M, dtype, gemm_ok=aligned))
    want = ops.ffl_reference(_d(x), _d(W), _d(A), 1.0, (), 0, _d(zi), _d(h))
    _check(got, want, base, dtype, f"ffl M={M} R={R} z_in={z_in} res={res}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", M_DECODE + M_GEMM)
@pytest.mark.parametrize("repeat,rc", [([520], 8), ([256, 264], 8), ([512], 32),
                                       ([128, 64, 64, 256], 1), ([259], 7)])
def test_ffl_repeat_add(monkeypatch, dtype, M, repeat, rc):
    """Decode and GEMM repeat-add epilogues: segments that end inside a tile,
    a tail no segment covers (N = 520 > sum), rc = 1 and odd rc = 7."""
    K, N, R = 1024, 520, 32
    x, WA = _fused(M, K, dtype), _fused(N + R, K, dtype)
    W, A = WA[:N], WA[N:]
    zi = _fused(M, R, dtype)
    got, base = _run_both(monkeypatch, lambda: torch.ops.flora.ffl(x, W, A, 0.75, repeat, rc, zi),
                          _expected_kernel(M, dtype, rep=True))
    want = ops.ffl_reference(_d(x), _d(W), _d(A), 0.75, repeat, rc, _d(zi))
    _check(got, want, base, dtype, f"ffl repeat M={M} {repeat}/{rc}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", M_DECODE + M_GEMM)
def test_ffl_repeat_add_with_res(monkeypatch, dtype, M):
    """ffa's o / down: repeat-add and the residual on y. The decode kernel adds
    both; at GEMM sizes the call goes to cuBLAS (the repeat-add GEMMs add no C)."""
    K, N, R = 1024, 520, 32
    x, WA = _fused(M, K, dtype), _fused(N + R, K, dtype)
    W, A = WA[:N], WA[N:]
    h = _fused(M, N, dtype)
    got, base = _run_both(monkeypatch, lambda: torch.ops.flora.ffl(x, W, A, 0.75, [512], 32, None, h),
                          None)
    ran = C.cuda_last_dispatch()
    assert ran == (_expected_kernel(M, dtype) if M <= 16 else ran) and (M <= 16 or ran.startswith("cublas"))
    want = ops.ffl_reference(_d(x), _d(W), _d(A), 0.75, [512], 32, None, _d(h))
    _check(got, want, base, dtype, f"ffl repeat + res M={M}")


@pytest.mark.cuda
def test_ffl_repeat_add_gemm_under_autograd(monkeypatch):
    """ffa's shape (FFL with repeat-add on every target) at prefill size:
    forward through the repeat-add GEMM, gradients like the reference's."""
    dtype, M, K, N, R = torch.bfloat16, 64, 256, 128, 16
    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")
    x = torch.randn(M, K, dtype=dtype, device="cuda", requires_grad=True)
    W = torch.randn(N, K, dtype=dtype, device="cuda")
    A = torch.randn(R, K, dtype=dtype, device="cuda", requires_grad=True)
    out = ops.ffl(x, W, A, 0.5, repeat=[N], repeat_rank=R)
    assert C.cuda_last_dispatch() == _expected_kernel(M, dtype, rep=True), C.cuda_last_dispatch()
    torch.cat(out, 1).float().square().sum().backward()
    x64, A64 = x.detach().double().requires_grad_(), A.detach().double().requires_grad_()
    ops.ffl_reference(x64, W.double(), A64, 0.5, [N], R).square().sum().backward()
    for g, w in ((x.grad, x64.grad), (A.grad, A64.grad)):
        torch.testing.assert_close(g.double(), w, rtol=5e-2, atol=5e-2 * w.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", M_DECODE + M_GEMM)
@pytest.mark.parametrize("R", [1, 7, 32, 256])
@pytest.mark.parametrize("s,relu,res", [(1.0, False, False), (0.5, True, True), (2.0, False, True)])
@pytest.mark.parametrize("fused", [True, False])
def test_fbl_kernel(monkeypatch, dtype, M, R, s, relu, res, fused):
    K, N = 1024, 528
    if fused:  # [u | z] and [W | B] as one buffer each
        uz, WB = _fused(M, K + R, dtype), _fused(N, K + R, dtype)
        u, z, W, B = uz[:, :K], uz[:, K:], WB[:, :K], WB[:, K:]
    else:
        u, z, W, B = _fused(M, K, dtype), _fused(M, R, dtype), _fused(N, K, dtype), _fused(N, R, dtype)
    r = _fused(M, N, dtype) if res else None
    two = not (fused and s == 1.0 and not relu)
    got, base = _run_both(monkeypatch, lambda: torch.ops.flora.fbl(u, z, W, B, s, r, relu),
                          _expected_kernel(M, dtype, R % 8 == 0, two=two))
    want = ops.fbl_reference(_d(u), _d(z), _d(W), _d(B), s, _d(r), relu)
    _check(got, want, base, dtype, f"fbl M={M} R={R} s={s} relu={relu}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", M_DECODE + [64])
@pytest.mark.parametrize("R,s,relu", [(0, 1.0, False), (32, 1.0, False), (32, 0.5, True)])
def test_fbl_inplace_kernel(monkeypatch, dtype, M, R, s, relu):
    """flora::fbl_ (a writer adding onto the residual stream): the decode
    kernel writes y over res, a row-strided view whose neighbour columns
    keep their bits; above M = 16 cuBLAS adds onto res (beta = 1)."""
    K, N = 1024, 528
    uz, WB = _fused(M, K + R, dtype), _fused(N, K + R, dtype)
    u, z, W, B = uz[:, :K], uz[:, K:], WB[:, :K], WB[:, K:]
    stream = _fused(M, N + 8, dtype)

    def fn():
        buf = stream.clone()
        torch.ops.flora.fbl_(buf[:, :N], u, z, W, B, s, relu)
        return buf

    got, base = _run_both(monkeypatch, fn, "decode_" + ("bf16" if dtype == torch.bfloat16 else "fp16")
                          if M <= 16 else None)
    assert torch.equal(got[:, N:], stream[:, N:])
    want = ops.fbl_reference(_d(u), _d(z), _d(W), _d(B), s, _d(stream[:, :N]), relu)
    _check(got[:, :N], want, base[:, :N], dtype, f"fbl_ M={M} R={R} s={s} relu={relu}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", M_DECODE + M_GEMM)
@pytest.mark.parametrize("R", [8, 32])
@pytest.mark.parametrize("s,relu,res", [(1.0, False, False), (0.5, True, True)])
def test_ffbl_kernel(monkeypatch, dtype, M, R, s, relu, res):
    K, N = 1024, 512
    uz = _fused(M, K + R, dtype)
    store = _fused(N + R, K + R, dtype)  # [W, B; A, C]
    u, z = uz[:, :K], uz[:, K:]
    W, B, A, Cm = store[:N, :K], store[:N, K:], store[N:, :K], store[N:, K:]
    r = _fused(M, N, dtype) if res else None
    got, base = _run_both(monkeypatch, lambda: torch.ops.flora.ffbl(u, z, W, B, A, Cm, s, r, relu),
                          _expected_kernel(M, dtype, two=not (s == 1.0 and not relu)))
    want = ops.ffbl_reference(_d(u), _d(z), _d(W), _d(B), _d(A), _d(Cm), s, _d(r), relu)
    _check(got, want, base, dtype, f"ffbl M={M} R={R}")


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 64])
def test_kernels_under_autograd(monkeypatch, M):
    """Forward through the kernel, backward through ops.py's formulas: the
    gradients match the fp64 reference's like cuBLAS's do."""
    dtype, K, N, R = torch.bfloat16, 256, 128, 16
    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")

    def grads(fn, *ts):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        fn(*ts).float().square().sum().backward()
        return [t.grad.double() for t in ts]

    x, W, A = (torch.randn(M, K, dtype=dtype, device="cuda"), torch.randn(N, K, dtype=dtype, device="cuda"),
               torch.randn(R, K, dtype=dtype, device="cuda"))
    got = grads(lambda x, A: torch.cat(ops.ffl(x, W, A), 1), x, A)
    want = grads(lambda x, A: ops.ffl_reference(x, W.double(), A, 1.0), x.double(), A.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2 * w.abs().max().item())
    u, z, B = (torch.randn(M, K, dtype=dtype, device="cuda"), torch.randn(M, R, dtype=dtype, device="cuda"),
               torch.randn(N, R, dtype=dtype, device="cuda"))
    got = grads(lambda u, z, B: ops.fbl(u, z, W, B, 0.5, relu=True), u, z, B)
    want = grads(lambda u, z, B: ops.fbl_reference(u, z, W.double(), B, 0.5, None, True),
                 u.double(), z.double(), B.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2 * w.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", M_GEMM)
@pytest.mark.parametrize("R", [8, 32])
@pytest.mark.parametrize("contiguous", [True, False])
def test_backward_dx_kernel(monkeypatch, dtype, M, R, contiguous):
    """dx = dy W + dz A as FBL over the transposed views of the fused [W; A]
    storage: the [K, n]-weight GEMMs (sm_90: one K range when [dy | dz] is one
    buffer, else the two-range instance)."""
    K, N = 1032, 520
    WA = _fused(N + R, K, dtype)
    W, A = WA[:N], WA[N:]
    if contiguous:  # FFL's output gradient: one [M, N + R] buffer
        g = _fused(M, N + R, dtype)
        dy, dz = g[:, :N], g[:, N:]
    else:
        dy, dz = _fused(M, N, dtype), _fused(M, R, dtype)
    got, base = _run_both(monkeypatch, lambda: torch.ops.flora.fbl(dy, dz, W.t(), A.t(), 1.0, None, False),
                          _expected_kernel(M, dtype, wt=True, two=not contiguous))
    want = _d(dy) @ _d(W) + _d(dz) @ _d(A)
    _check(got, want, base, dtype, f"dx M={M} R={R} contiguous={contiguous}")


@pytest.mark.cuda
@pytest.mark.parametrize("repeat", [False, True])
def test_backward_dx_through_kernel_under_autograd(monkeypatch, repeat):
    """FFL's backward computes dx through the [K, n]-weight GEMM (the last
    flora op the backward calls) and matches the fp64 reference's gradient."""
    dtype, M, K, N, R = torch.bfloat16, 256, 512, 256, 16
    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")
    WA = torch.randn(N + R, K, dtype=dtype, device="cuda")
    W, A = WA[:N], WA[N:]
    x = torch.randn(M, K, dtype=dtype, device="cuda", requires_grad=True)
    kw = dict(repeat=[N], repeat_rank=R) if repeat else {}
    torch.cat(ops.ffl(x, W, A, 0.5, **kw), 1).float().square().sum().backward()
    # With repeat-add the adjoint clones dz: two K segments.
    want, last = _expected_kernel(M, dtype, wt=True, two=repeat), C.cuda_last_dispatch()
    assert last == want, last
    x64 = x.detach().double().requires_grad_()
    ops.ffl_reference(x64, W.double(), A.double(), 0.5, [N] if repeat else (),
                      R if repeat else 0).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=5e-2,
                               atol=5e-2 * x64.grad.abs().max().item())


@pytest.mark.cuda
def test_misaligned_layout_falls_back_with_reason(monkeypatch):
    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")
    dtype = torch.bfloat16
    buf = torch.randn(64, 1024 + 3, dtype=dtype, device="cuda")
    x = buf[:, :1024]  # row stride 1027: not 16-byte rows
    W = torch.randn(256, 1024, dtype=dtype, device="cuda")
    A = torch.randn(8, 1024, dtype=dtype, device="cuda")
    out = torch.ops.flora.ffl(x[:4], W, A)
    assert C.cuda_last_dispatch().startswith("cublas: x and the weight rows must be 16-byte aligned")
    want = ops.ffl_reference(_d(x[:4]), _d(W), _d(A))
    # cuBLAS in bf16 (reduced-precision reductions allowed): judged against fp64 on the output's scale
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-2 * want.abs().max().item())


# ---------------------------------------------------------------------------
# The pointwise kernels (RMSNorm, RoPE, SiLU x up): one launch against ATen's
# composite on the same operands, both against float64
# ---------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 3])
def test_rope_cache_kernel(monkeypatch, T, dtype):
    """flora::rope_cache_ (a decode step's RoPE and KV-cache write): the kernel
    gives q, and the caches at slot, bitwise what RoPE and two index_copy_
    give, and writes no other slot."""
    from test_pointwise import decode_qkv

    qk, v, cos, sin, kc, vc, slot = decode_qkv(dtype, "cuda", T=T)

    def fn():
        k2, v2 = kc.clone(), vc.clone()
        return torch.cat([torch.ops.flora.rope_cache_(qk, v, cos, sin, k2, v2, slot).flatten(),
                          k2.flatten(), v2.flatten()])

    got, base = _run_both(monkeypatch, fn, None)
    assert C.cuda_last_dispatch() == "pointwise"  # the op's own, before torch.cat's
    assert torch.equal(got, base)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_silu_mul_over_u_kernel(monkeypatch, dtype):
    """flora::silu_mul_ (ffba's MLP in inference): the kernel writes the
    product over u, a row-strided view inside the gate/up output, and nothing
    else: g and the state columns after u keep their bits."""
    from test_pointwise import exact

    gu = torch.randn(5, 2 * 96 + 8, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)

    def fn():
        buf = gu.clone()
        torch.ops.flora.silu_mul_(buf[:, :96], buf[:, 96:192])
        return buf

    got, base = _run_both(monkeypatch, fn, "pointwise")
    assert torch.equal(got[:, :96], gu[:, :96]) and torch.equal(got[:, 192:], gu[:, 192:])
    _check(got[:, 96:192], exact("silu_mul", (gu[:, :96], gu[:, 96:192])), base[:, 96:192], dtype,
           f"silu_mul_ {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("op", ["rms_norm", "rms_norm_stream", "rope", "silu_mul"])
def test_pointwise_kernel(monkeypatch, op, dtype):
    """rms_norm_stream: zflora's [h | z], z handed through bit for bit."""
    from test_pointwise import cases, exact, stream

    args = stream(dtype, "cuda") if op == "rms_norm_stream" else cases(dtype, "cuda")[op]
    fn = lambda: getattr(torch.ops.flora, op.replace("_stream", ""))(*args)  # noqa: E731
    got, base = _run_both(monkeypatch, fn, "pointwise")
    assert got.is_contiguous() and got.shape == base.shape
    if op == "rms_norm_stream":
        d = args[1].shape[0]
        assert torch.equal(got[:, d:], args[0][:, d:])
        _check(got[:, :d], exact("rms_norm", (args[0][:, :d], *args[1:])), base[:, :d], dtype, f"{op} {dtype}")
    elif op == "rope":  # the same three roundings as the composite: bitwise
        torch.testing.assert_close(got, base, rtol=0, atol=0)
    else:
        _check(got, exact(op, args), base, dtype, f"{op} {dtype}")


# ---------------------------------------------------------------------------
# Decode attention (attention.cu): the split kernel against SDPA over the
# grouped heads on the same operands, both against float64
# ---------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 32, 8, 64, 640), (8, 32, 8, 64, 1000), (1, 24, 8, 128, 4096),
                                   (3, 9, 3, 64, 100), (2, 8, 1, 128, 300), (2, 8, 8, 64, 129)])
@pytest.mark.parametrize("splits", [0, 1, 5])
def test_decode_attention_kernel(monkeypatch, dtype, shape, splits):
    """1B / 3B / SmolLM2 heads, batch 1 to 8, windows of one tile to 32;
    automatic, one and five splits; left padding and unwritten slots masked;
    outputs in poisoned memory."""
    from test_decode_attention import _check, attention_case

    B, nq, nkv, hd, L = shape
    q, k, v, mask = attention_case(dtype, "cuda", B=B, nq=nq, nkv=nkv, hd=hd, L=L)
    with torch.no_grad():
        got, _ = _run_both(monkeypatch, lambda: torch.ops.flora.decode_attention(q, k, v, mask, splits),
                           "decode_attention")
    _check(got, q, k, v, mask, f"decode_attention {dtype} {shape} splits={splits}")


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_kernel_masked_chunks(monkeypatch, splits):
    """A chunk with every key masked reads nothing and weighs nothing; a row
    with no unmasked key is 0 (SDPA: NaN)."""
    from test_decode_attention import attention_case

    q, k, v, mask = attention_case(torch.bfloat16, "cuda", B=3, nq=8, nkv=2, L=512, pad=False)
    mask[0, :300] = float("-inf")
    mask[1, 130:] = float("-inf")
    mask[2] = float("-inf")
    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")
    with torch.no_grad():
        out = torch.ops.flora.decode_attention(q, k, v, mask, splits)
    assert C.cuda_last_dispatch() == "decode_attention"
    ref = ops.decode_attention_reference(q.double(), k.double(), v.double(), mask.double())
    assert torch.equal(out[2].float(), torch.zeros_like(out[2].float()))
    torch.testing.assert_close(out[:2].double(), ref[:2], rtol=0, atol=2e-2)


@pytest.mark.cuda
def test_decode_attention_kernel_declines_with_reason(monkeypatch):
    """fp32, head_dim 80, 16 query heads per kv head, a cache row stride
    not a multiple of 8: SDPA, and the dispatch says why."""
    from test_decode_attention import _check, attention_case

    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")
    for kw, dt in [(dict(), torch.float32), (dict(hd=80), torch.bfloat16), (dict(nq=32, nkv=2), torch.bfloat16)]:
        q, k, v, mask = attention_case(dt, "cuda", L=200, **kw)
        with torch.no_grad():
            _check(torch.ops.flora.decode_attention(q, k, v, mask), q, k, v, mask, str(kw))
        assert C.cuda_last_dispatch().startswith("cublas: aten sdpa"), C.cuda_last_dispatch()
    q, k, v, mask = attention_case(torch.bfloat16, "cuda", L=200, hd=64)
    k = torch.randn(2, 2, 200, 68, device="cuda", dtype=torch.bfloat16)[..., :64]  # row stride 68
    with torch.no_grad():
        torch.ops.flora.decode_attention(q, k, v, mask)
    assert "16-byte aligned" in C.cuda_last_dispatch()


@pytest.mark.cuda
def test_decode_attention_kernel_in_a_cuda_graph(monkeypatch):
    """Captured once, replayed after the mask and the cache change in place:
    the decoder's use (splits' partials come from the graph's pool)."""
    from test_decode_attention import attention_case

    monkeypatch.setenv("FLORA_CUDA_KERNELS", "1")
    q, k, v, mask = attention_case(torch.bfloat16, "cuda", B=2, nq=32, nkv=8, L=1024)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch.ops.flora.decode_attention(q, k, v, mask)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = torch.ops.flora.decode_attention(q, k, v, mask)
        mask[:, 500:510] = 0.0
        k.mul_(0.5)
        g.replay()
        want = torch.ops.flora.decode_attention(q, k, v, mask)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
