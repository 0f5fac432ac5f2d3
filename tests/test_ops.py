"""The op surface (issue 2): schemas, references, compiled implementations,
fake kernels, autograd, argument errors, and the no-extension fallback."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

from flora import _ext, ops

# "cuda" carries the `cuda` marker: skipped without a device (conftest), selected by `-m cuda`
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
compiled = pytest.mark.skipif(_ext.C is None, reason=f"extension not built: {_ext.ERROR}")


def rand(*shape, dtype=torch.float32, device="cpu", grad=False):
    t = torch.randn(*shape, dtype=dtype, device=device)
    return t.requires_grad_(grad)


def operands(op, M, K, N, R, dtype=torch.float32, device="cpu", fused=False, grad=False):
    """Random operands for `op`; with fused=True they are views into one
    storage, laid out the way folded adapters are (the one-matmul path)."""
    kw = dict(dtype=dtype, device=device)
    if op == "ffl":
        if fused:
            st = rand(N + R, K, **kw)
            W, A = st[:N], st[N:]
        else:
            W, A = rand(N, K, **kw), rand(R, K, **kw)
        x = rand(M, K + 5, **kw)[:, 2:K + 2]  # a row-strided view
        return dict(x=x, W=W, A=A.requires_grad_(grad) if not fused else A)
    if fused:
        buf = rand(M, K + R, **kw)
        u, z = buf[:, :K], buf[:, K:]
        st = rand(N + R, K + R, **kw)
        W, B, A, C = st[:N, :K], st[:N, K:], st[N:, :K], st[N:, K:]
    else:
        u, z = rand(M, K, **kw), rand(M, R, **kw)
        W, B, A, C = rand(N, K, **kw), rand(N, R, **kw), rand(R, K, **kw), rand(R, R, **kw)
    d = dict(u=u, z=z, W=W, B=B)
    if op == "ffbl":
        d.update(A=A, C=C)
    return d


def call_op(op, args, **kw):
    return getattr(torch.ops.flora, op)(*args.values(), **kw)


def call_ref(op, args, **kw):
    return ops.REFERENCES[op](*args.values(), **kw)


EPILOGUES = {
    "ffl": [dict(), dict(s=0.5, repeat=[12, 6], repeat_rank=3), dict(z_in=True), dict(s=2.0, repeat=[24], repeat_rank=6, z_in=True),
            dict(res=True), dict(s=0.5, repeat=[12, 6], repeat_rank=3, z_in=True, res=True)],
    "fbl": [dict(), dict(s=0.5), dict(res=True), dict(s=0.5, res=True, relu=True)],
    "ffbl": [dict(), dict(s=0.5, relu=True), dict(res=True), dict(s=0.25, res=True, relu=True)],
}


def materialise(op, kw, M, N, R, dtype, device):
    kw = dict(kw)
    if kw.get("z_in"):
        kw["z_in"] = rand(M, R, dtype=dtype, device=device)
    if kw.get("res"):
        kw["res"] = rand(M, N, dtype=dtype, device=device)
    return kw


def as64(d):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def test_schemas_match_compiled_library():
    if _ext.C is None:
        pytest.skip("extension not built")
    for name, schema in ops.SCHEMAS.items():
        got = str(getattr(torch.ops.flora, name).default._schema)
        assert got == str(torch._C.parse_schema("flora::" + schema))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("op", ["ffl", "fbl", "ffbl"])
def test_op_matches_float64_reference(op, fused, dtype, device):
    M, K, N, R = 5, 40, 24, 6
    args = operands(op, M, K, N, R, dtype=dtype, device=device, fused=fused)
    for kw in EPILOGUES[op]:
        kw = materialise(op, kw, M, N, R, dtype, device)
        got = call_op(op, args, **kw)
        want = call_ref(op, as64(args), **as64(kw))
        # Tolerance tied to the same computation done by torch in this dtype.
        same = call_ref(op, args, **kw)
        ulp = torch.finfo(dtype).eps
        tol = 2 * (same.double() - want).abs().max().item() + 8 * ulp * want.abs().max().item()
        assert got.shape == want.shape and got.dtype == dtype
        err = (got.double() - want).abs().max().item()
        assert err <= tol, (kw, err, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_wrappers_return_views_of_one_buffer(device):
    args = operands("ffl", 3, 16, 8, 4, device=device)
    y, z = ops.ffl(*args.values(), 0.5, repeat_add=True)
    assert y.shape == (3, 8) and z.shape == (3, 4)
    assert y.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    # The fused outputs feed the next op as strided views, without a copy.
    W2, B2 = rand(5, 8, device=device), rand(5, 4, device=device)
    out = ops.fbl(y, z, W2, B2, 0.5)
    ref = ops.fbl_reference(y.contiguous(), z.contiguous(), W2, B2, 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["ffl", "fbl", "ffbl"])
def test_opcheck(op, device):
    M, K, N, R = 4, 16, 12, 3
    for fused in (False, True):
        args = operands(op, M, K, N, R, device=device, fused=fused)
        for kw in EPILOGUES[op]:
            if op == "ffl" and kw.get("repeat"):
                kw = dict(kw, repeat=[6] if "z_in" not in kw else [12], repeat_rank=3)
            kw = materialise(op, kw, M, N, R, torch.float32, device)
            ordered = list(args.values())
            if op == "ffl":
                ordered += [kw.get("s", 1.0), kw.get("repeat", []), kw.get("repeat_rank", 0), kw.get("z_in"),
                            kw.get("res")]
            else:
                ordered += [kw.get("s", 1.0), kw.get("res"), kw.get("relu", False)]
            grads = [t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in ordered]
            opcheck(getattr(torch.ops.flora, op).default, tuple(grads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("op", ["ffl", "fbl", "ffbl"])
def test_backward_takes_a_broadcast_gradient(op, fused, device):
    """out.sum().backward() hands each op a gradient of strides (0, 0) (what
    opcheck's aot_dispatch check does). On CUDA, FFL's and FFBL's dx runs an
    fbl call over transposed weights, which rejects such operands: the
    backward takes the matmuls instead (an H200 run of opcheck crashed here)."""
    M, K, N, R = 4, 16, 12, 3
    args = operands(op, M, K, N, R, device=device, fused=fused)
    grads = {}
    for name, fn in (("op", call_op), ("ref", call_ref)):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
        fn(op, leaves, s=0.5).sum().backward()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    for k in args:
        torch.testing.assert_close(grads["op"][k], grads["ref"][k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "compiled"])
@pytest.mark.parametrize("op", ["ffl", "fbl", "ffbl"])
def test_gradcheck_float64(op, impl):
    if impl == "compiled" and _ext.C is None:
        pytest.skip("extension not built")
    M, K, N, R = 3, 7, 6, 4
    args = operands(op, M, K, N, R, dtype=torch.float64)
    for kw in EPILOGUES[op]:
        if op == "ffl" and kw.get("repeat"):
            kw = dict(kw, repeat=[4, 2], repeat_rank=2)
        kw = materialise(op, kw, M, N, R, torch.float64, "cpu")
        fn = call_ref if impl == "reference" else call_op
        names = list(args) + [k for k in ("z_in", "res") if k in kw]
        inputs = tuple(
            (args[k] if k in args else kw[k]).detach().clone().requires_grad_(True) for k in names
        )

        def f(*ts):
            d = dict(zip(names, ts))
            a = {k: d[k] for k in args}
            return fn(op, a, **{k: (d[k] if k in d else v) for k, v in kw.items()})

        assert torch.autograd.gradcheck(f, inputs)


def test_autograd_matches_reference_fp32():
    M, K, N, R = 6, 20, 12, 4
    args = operands("ffbl", M, K, N, R)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
    res = rand(M, N)
    out = torch.ops.flora.ffbl(*leaves.values(), 0.5, res, True)
    g = torch.randn_like(out)
    out.backward(g)
    leaves64 = {k: v.detach().double().requires_grad_(True) for k, v in args.items()}
    ops.ffbl_reference(*leaves64.values(), 0.5, res.double(), True).backward(g.double())
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad.double(), leaves64[k].grad, rtol=1e-4, atol=1e-4)


def test_empty_shapes():
    x, W = rand(0, 8), rand(4, 8)
    y, z = ops.ffl(x, W, rand(2, 8))
    assert y.shape == (0, 4) and z.shape == (0, 2)
    x = rand(3, 8)
    y, z = ops.ffl(x, W, rand(0, 8))
    assert z.shape == (3, 0)
    torch.testing.assert_close(y, x @ W.T)
    y = ops.fbl(x, rand(3, 0), W, rand(4, 0), 0.5, res=rand(3, 4))
    assert y.shape == (3, 4)
    y, z2 = ops.ffbl(x, rand(3, 0), W, rand(4, 0), rand(0, 8), rand(0, 0))
    assert z2.shape == (3, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(), dict(s=0.5), dict(s=0.5, res=True), dict(res=True, relu=True)],
                         ids=["plain", "s", "s-res", "res-relu"])
@pytest.mark.parametrize("M", [1, 40])
def test_fbl_without_u(M, kw, device):
    """fbl(empty, z, empty, B, s, res) is how lora / pf-lora add s B z to the base
    output (one addmm on the aten path): every dtype against the float64 formula."""
    for dtype in (torch.float32, torch.bfloat16):
        u, W = rand(M, 0, dtype=dtype, device=device), rand(12, 0, dtype=dtype, device=device)
        z, B = rand(M, 5, dtype=dtype, device=device), rand(12, 5, dtype=dtype, device=device)
        res = rand(M, 12, dtype=dtype, device=device) if kw.get("res") else None
        s, relu = kw.get("s", 1.0), kw.get("relu", False)
        got = ops.fbl(u, z, W, B, s, res=res, relu=relu)
        zz = z.double().relu() if relu else z.double()
        want = s * zz @ B.double().T + (res.double() if res is not None else 0)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("M", [1, 40])
def test_ffl_writer_on_one_stream(M, dtype, device, request):
    """zflora's writer: [h' | z'] = [h | z] + u [W; A]^T with the residual h
    and the carry z the two halves of one stream buffer. Against float64; on
    the ATen path (M = 40 > the decode kernels' M, pinned at 16 on the CPU, and
    fp64) it is one addmm, not a product and two adds."""
    from torch.profiler import profile

    if device == "cpu":
        request.getfixturevalue("gemv_max_m")(16)  # a machine's rule may take M = 40 (fp32: 128 without AMX)

    K, N, R = 24, 16, 4
    st, hz = rand(N + R, K, dtype=dtype, device=device), rand(M, N + R + 3, dtype=dtype, device=device)
    W, A, h, z = st[:N], st[N:], hz[:, :N], hz[:, N:N + R]  # the stream: a row-strided view
    u = rand(M, K, dtype=dtype, device=device)
    with profile() as p:
        got = torch.ops.flora.ffl(u, W, A, 1.0, [], 0, z, h)
    want = u.double() @ st.double().T + hz[:, :N + R].double()
    assert got.shape == (M, N + R)
    bound = (u.double().abs() @ st.double().abs().T + hz[:, :N + R].double().abs()).max().item()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=4 * torch.finfo(dtype).eps * bound)
    inside = [e.name for e in p.events() if e.name.startswith("aten::") and e.cpu_parent is not None
              and e.cpu_parent.name == "flora::ffl"]
    if device == "cpu" and (M == 40 or dtype == torch.float64) and _ext.C is not None:
        assert "aten::addmm" in inside and "aten::add_" not in inside, inside


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("M", [1, 40])
@pytest.mark.parametrize("kw", [dict(), dict(s=0.5, relu=True), dict(K=0), dict(fused=True)],
                         ids=["plain", "s-relu", "no-u", "one-k-range"])
def test_fbl_inplace(kw, M, dtype, device):
    """flora::fbl_: res += u W^T + s f(z) B^T written over res (a row-strided
    view: the writer adding onto the residual stream, or the B product onto
    the output an FFL just wrote, z next to it in the same buffer). Against
    float64 and against fbl with res; the columns around res keep their bits."""
    K, N, R = kw.get("K", 24), 16, 4
    s, relu = kw.get("s", 1.0), kw.get("relu", False)
    buf = rand(M, N + R + 3, dtype=dtype, device=device)  # [res | z | 3 more]
    z = buf[:, N:N + R]
    if kw.get("fused"):
        uz, WB = rand(M, K + R, dtype=dtype, device=device), rand(N, K + R, dtype=dtype, device=device)
        u, z, W, B = uz[:, :K], uz[:, K:], WB[:, :K], WB[:, K:]
    else:
        u, W, B = rand(M, K, dtype=dtype, device=device), rand(N, K, dtype=dtype, device=device), \
            rand(N, R, dtype=dtype, device=device)
    before = buf.clone()
    want = torch.ops.flora.fbl(u, z, W, B, s, before[:, :N], relu)
    want64 = ops.fbl_reference(u.double(), z.double(), W.double(), B.double(), s, before[:, :N].double(), relu)
    torch.ops.flora.fbl_(buf[:, :N], u, z, W, B, s, relu)
    assert torch.equal(buf[:, N:], before[:, N:])
    got = buf[:, :N]
    own = (want.double() - want64).abs().max().item()
    floor = torch.finfo(dtype).eps * want64.abs().max().item()
    assert (got.double() - want64).abs().max().item() <= 2 * max(own, floor)


@compiled
def test_fbl_inplace_checks_and_wrapper():
    """fbl_ refuses where autograd records and an res that is one of its
    operands; opcheck covers its schema (mutation) and fake. The wrapper's
    into_res writes over res in inference and returns it, and returns a new
    tensor where autograd records."""
    u, z, W, B = rand(3, 8), rand(3, 2), rand(8, 8), rand(8, 2)
    res = rand(3, 8)
    opcheck(torch.ops.flora.fbl_.default, (res.clone(), u, z, W, B, 0.5, True))
    for fn in (torch.ops.flora.fbl_, ops.REFERENCES["fbl_"]):
        with pytest.raises(ValueError, match="for inference"):
            fn(res, u, z, W.clone().requires_grad_(True), B)
        with pytest.raises(ValueError, match="res overlaps u"):
            fn(u, u, z, W, B)
    Wg = W.clone().requires_grad_(True)
    y = ops.fbl(u, z, Wg, B, res=res, into_res=True)
    assert y is not res and y.requires_grad
    with torch.no_grad():
        r2 = res.clone()
        assert ops.fbl(u, z, W, B, res=r2, into_res=True) is r2
        torch.testing.assert_close(r2, ops.fbl(u, z, W, B, res=res), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("M", [1, 3, 40])
def test_fbl_takes_transposed_weights(fused, M):
    """dx = dy W + dz A (FFL's input gradient) as fbl over W^T, A^T views of the
    fused [W; A] storage: every implementation agrees with the float64 sum."""
    WA = rand(24 + 8, 40)
    W, A = (WA[:24], WA[24:]) if fused else (rand(24, 40), rand(8, 40))
    g = rand(M, 32)
    dy, dz = g[:, :24], g[:, 24:]
    want = dy.double() @ W.double() + dz.double() @ A.double()
    for fbl in (ops.fbl_reference, torch.ops.flora.fbl):
        got = fbl(dy, dz, W.t(), A.t(), 1.0, None, False)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="unit stride"):  # only the weights may be transposed
        torch.ops.flora.fbl(rand(24, 3).t(), rand(3, 8), W.t(), A.t())


# -- bad calls: the same clear error from every implementation -------------
def _impls():
    impls = {"reference": lambda op, *a, **k: ops.REFERENCES[op](*a, **k)}
    if _ext.C is not None:
        impls["compiled"] = lambda op, *a, **k: getattr(torch.ops.flora, op)(*a, **k)

    def fake(op, *a, **k):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            return getattr(torch.ops.flora, op)(*a, **k)

    impls["fake"] = fake
    return impls


BAD = [
    ("K mismatch", "ffl", lambda: (rand(2, 8), rand(4, 9), rand(2, 8)), {}, ValueError, "K mismatch"),
    ("A K mismatch", "ffl", lambda: (rand(2, 8), rand(4, 8), rand(2, 7)), {}, ValueError, "K mismatch"),
    ("N mismatch", "fbl", lambda: (rand(2, 8), rand(2, 3), rand(4, 8), rand(5, 3)), {}, ValueError, "N mismatch"),
    ("R mismatch", "fbl", lambda: (rand(2, 8), rand(2, 3), rand(4, 8), rand(4, 2)), {}, ValueError, "R mismatch"),
    ("R' mismatch", "ffbl", lambda: (rand(2, 8), rand(2, 3), rand(4, 8), rand(4, 3), rand(2, 8), rand(3, 3)), {}, ValueError, "R' mismatch"),
    ("M mismatch", "fbl", lambda: (rand(2, 8), rand(3, 3), rand(4, 8), rand(4, 3)), {}, ValueError, "M mismatch"),
    ("mixed dtypes", "ffl", lambda: (rand(2, 8), rand(4, 8, dtype=torch.float64), rand(2, 8)), {}, TypeError, "dtype mismatch"),
    ("int dtype", "ffl", lambda: (torch.ones(2, 8, dtype=torch.int32), rand(4, 8), rand(2, 8)), {}, TypeError, "dtype"),
    ("3-D input", "ffl", lambda: (rand(2, 2, 8), rand(4, 8), rand(2, 8)), {}, ValueError, "must be 2-D"),
    ("1-D weight", "fbl", lambda: (rand(2, 8), rand(2, 3), rand(8), rand(4, 3)), {}, ValueError, "must be 2-D"),
    ("transposed weight", "ffl", lambda: (rand(2, 8), rand(8, 4).T, rand(2, 8)), {}, ValueError, "unit stride"),
    ("column-strided input", "fbl", lambda: (rand(2, 16)[:, ::2], rand(2, 3), rand(4, 8), rand(4, 3)), {}, ValueError, "unit stride"),
    ("repeat not multiple", "ffl", lambda: (rand(2, 8), rand(6, 8), rand(4, 8)), dict(repeat=[6], repeat_rank=4), ValueError, "multiple"),
    ("repeat too wide", "ffl", lambda: (rand(2, 8), rand(4, 8), rand(4, 8)), dict(repeat=[4, 4], repeat_rank=2), ValueError, "cover"),
    ("repeat rank", "ffl", lambda: (rand(2, 8), rand(4, 8), rand(2, 8)), dict(repeat=[4], repeat_rank=0), ValueError, "repeat_rank"),
    ("res shape", "fbl", lambda: (rand(2, 8), rand(2, 3), rand(4, 8), rand(4, 3)), dict(res=rand(2, 5)), ValueError, "N mismatch"),
    ("z_in shape", "ffl", lambda: (rand(2, 8), rand(4, 8), rand(2, 8)), dict(z_in=rand(2, 3)), ValueError, "R mismatch"),
]


@pytest.mark.parametrize("impl", ["reference", "compiled", "fake"])
@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_calls_raise_clear_errors(case, impl):
    impls = _impls()
    if impl not in impls:
        pytest.skip("extension not built")
    _, op, make, kw, exc, words = case
    with pytest.raises(exc, match=words):
        impls[impl](op, *make(), **kw)


@pytest.mark.cuda
def test_device_mismatch():
    for impl in _impls().values():
        with pytest.raises(ValueError, match="device mismatch"):
            impl("ffl", rand(2, 8), rand(4, 8, device="cuda"), rand(2, 8))


def test_device_mismatch_meta():
    # Without a GPU, a meta tensor stands in for "another device".
    for name, impl in _impls().items():
        if name == "fake":
            continue
        with pytest.raises((ValueError, RuntimeError), match="device"):
            impl("ffl", rand(2, 8), torch.empty(4, 8, device="meta"), rand(2, 8))


def test_torch_compile_fullgraph():
    args = operands("fbl", 4, 16, 8, 4)

    def f(u, z, W, B):
        y = ops.fbl(u, z, W, B, 0.5, relu=True)
        return torch.ops.flora.ffl(y, W[:, :8], W[:2, 8:], 2.0, [], 0, None).sum()

    leaves = [t.detach().clone().requires_grad_(True) for t in args.values()]
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    cf(*leaves).backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    f(*leaves).backward()
    for a, b in zip(got, leaves):
        torch.testing.assert_close(a, b.grad)


def _run(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_reference_fallback_without_extension():
    code = (
        "import json, torch, flora\n"
        "from flora import ops\n"
        "x, W, A = torch.randn(3, 8), torch.randn(6, 8), torch.randn(3, 8)\n"
        "y, z = ops.ffl(x, W, A, 0.5, repeat_add=True)\n"
        "ok = torch.allclose(torch.cat([y, z], 1), ops.ffl_reference(x, W, A, 0.5, [6], 3))\n"
        "print(json.dumps({'ok': ok, 'info': flora.info()}))\n"
    )
    p = _run(code, FLORA_NO_EXTENSION="1")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ok"]
    assert out["info"]["extension"].startswith("missing")
    impls = {(k["op"], k["device"]): k["impl"] for k in out["info"]["kernels"]}
    assert impls[("ffl", "cpu")].startswith("python reference")


@compiled
def test_info_command_reports_compiled_ops():
    p = subprocess.run([sys.executable, "-m", "flora", "info", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["extension"] == "compiled"
    assert d["cpu_isa"] in ("avx512_bf16", "avx512", "avx2", "aten")
    cpu = {k["op"] for k in d["kernels"] if k["device"] == "cpu" and "reference" not in k["impl"]}
    assert cpu == set(ops.SCHEMAS)  # the three blocks and the pointwise ops


def test_info_into_a_closed_pipe_is_no_error():
    """`flora info | head -n 4`: a reader that stops early ends the command quietly
    (exit 0, no traceback), as a shell pipeline under pipefail needs."""
    p = subprocess.Popen([sys.executable, "-m", "flora", "info"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before the child has written anything: its first write fails
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()


@compiled
@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_compiled_and_reference_say_the_same(case):
    _, op, make, kw, exc, _ = case
    args = make()
    msgs = []
    for impl in ("reference", "compiled"):
        with pytest.raises(exc) as info:
            _impls()[impl](op, *args, **kw)
        msgs.append(str(info.value).splitlines()[0])
    assert msgs[0] == msgs[1]


# -- autograd and autocast live in C++ (csrc/common/autograd.cpp, autocast.cpp)
@compiled
def test_autograd_and_autocast_kernels_are_compiled():
    for op in ops.OPS:
        name = f"flora::{op}"
        for key in ("Autograd", "AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)
        dump = torch._C._dispatch_dump(name)
        assert "autograd.cpp" in dump and "autocast.cpp" in dump, dump


@pytest.mark.parametrize("op", ["ffl", "fbl", "ffbl"])
def test_no_grad_records_nothing_and_partial_grads(op):
    M, K, N, R = 3, 8, 6, 2
    args = operands(op, M, K, N, R, dtype=torch.float64)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
    with torch.no_grad():
        out = call_op(op, leaves)
    assert out.grad_fn is None and not out.requires_grad
    # only the adapter-side tensor requires grad: only it gets one, and it matches float64 autograd
    # through the reference
    trainable = "A" if op == "ffl" else "B"
    part = {k: (v.detach().clone().requires_grad_(k == trainable)) for k, v in args.items()}
    call_op(op, part).sum().backward()
    ref = {k: v.detach().clone().requires_grad_(k == trainable) for k, v in args.items()}
    call_ref(op, ref).sum().backward()
    for k in part:
        assert (part[k].grad is None) == (k != trainable)
    torch.testing.assert_close(part[trainable].grad, ref[trainable].grad)


@pytest.mark.parametrize("op", ["ffl", "fbl", "ffbl"])
def test_double_backward_matches_reference(op):
    # the backward is built from differentiable ATen ops, so it differentiates again
    M, K, N, R = 3, 5, 4, 2
    args = operands(op, M, K, N, R, dtype=torch.float64)
    kw = dict(ffl=dict(s=0.5, repeat=[4], repeat_rank=2), fbl=dict(s=0.5, relu=False),
              ffbl=dict(s=0.5, relu=False))[op]
    inputs = tuple(v.detach().clone().requires_grad_(True) for v in args.values())

    def f(*ts):
        return call_op(op, dict(zip(args, ts)), **kw)

    assert torch.autograd.gradgradcheck(f, inputs)


def test_adjacent():
    """[a | b] as one tensor when b's columns follow a's in one buffer: the
    buffer itself for its two halves (zflora's stream), a view for two column
    blocks inside it (q | k of the fused qkv output), None otherwise."""
    hz = torch.randn(3, 10)
    assert ops.adjacent(hz[:, :7], hz[:, 7:]) is hz
    qkv = torch.randn(3, 20)
    qk = ops.adjacent(qkv[:, 2:5], qkv[:, 5:9])
    assert torch.equal(qk, qkv[:, 2:9]) and qk.data_ptr() == qkv[:, 2:].data_ptr()
    assert ops.adjacent(qkv[:, 2:5], qkv[:, 6:9]) is None  # a gap
    t = torch.randn(10, 3).t()  # column-major: the columns are not side by side in memory
    assert ops.adjacent(t[:, :7], t[:, 7:]) is None
    assert ops.adjacent(hz[:, :7].clone().requires_grad_(True), hz[:, 7:]) is None
