"""flora.modules against an independent plain-PyTorch reading of
shared/spec/ADAPTERS.md (written here, not imported from the modules).

Whole chains are tested: per layer attention projections -> a stand-in
attention (a fixed linear map of q, k, v) -> o -> MLP, with the carried
state, and the LM head at the end.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import flora
from flora import AdapterConfig
from flora.config import VARIANTS, LlamaArch
from flora.modules.groups import _Group
from flora.modules import (FBL, FFBL, FFL, FusedAttentionProjections, FusedLMHead, FusedMLP,
                           FusedOutputProjection, count_parameters, initial_carry)

D, DQ, DKV, DFF, VOCAB, L, R, M = 16, 16, 8, 32, 24, 3, 4, 5
SHAPES = LlamaArch(hidden_size=D, num_hidden_layers=L, num_attention_heads=DQ // 8, num_key_value_heads=DKV // 8,
                   head_dim=8, intermediate_size=DFF, vocab_size=VOCAB)
OUT = {"q": DQ, "k": DKV, "v": DKV, "o": D, "gate": DFF, "up": DFF, "down": D, "head": VOCAB}
IN = {"o": DQ, "down": DFF}

# a few explicit target / layer choices on top of every preset
EXTRA = [
    dict(variant="lora", targets=["q", "v", "down"]),
    dict(variant="pf-lora", targets=["k", "v", "up"], layers=[0, 2]),
    dict(variant="ffa", targets=["k", "down"]),
    dict(variant="ffba", targets=["v", "o"], layers=[1]),
    dict(variant="ffba-ab", layers=[0, 2]),
    dict(variant="ffba-qg-add", targets=["k", "o", "gate", "up", "down"]),
    dict(variant="zflora", targets=["v", "o", "up", "head"], layers=[1, 2]),
    dict(variant="zflora", targets=["q", "o", "gate", "down"]),
]
CASES = [dict(variant=v) for v in VARIANTS] + EXTRA
IDS = [c["variant"] + ("" if len(c) == 1 else f"-case{i}") for i, c in enumerate(CASES)]


def make_cfg(case, **kw):
    return AdapterConfig(rank=R, alpha=2.0 * R, **{**case, **kw})


def rms(h):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class Chain:
    """A small Llama-shaped stack built from the flora modules."""

    def __init__(self, cfg, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[-1])).to(dtype)
        self.W = [{p: rnd(OUT[p], IN.get(p, D)) for p in ("q", "k", "v", "o", "gate", "up", "down")}
                  for _ in range(L)]
        self.Wh = rnd(VOCAB, D)
        self.Pk, self.Pv = rnd(DKV, DQ) * 3, rnd(DKV, DQ) * 3
        self.cfg, self.dtype = cfg, dtype
        torch.manual_seed(seed + 1)
        kw = dict(num_layers=L)
        self.attn = [FusedAttentionProjections(w["q"], w["k"], w["v"], cfg, i, **kw) for i, w in enumerate(self.W)]
        self.o = [FusedOutputProjection(w["o"], cfg, i, **kw) for i, w in enumerate(self.W)]
        self.mlp = [FusedMLP(w["gate"], w["up"], w["down"], cfg, i, **kw) for i, w in enumerate(self.W)]
        self.head = FusedLMHead(self.Wh, cfg)

    def modules(self):
        return self.attn + self.o + self.mlp + [self.head]

    def params(self):
        return [p for m in self.modules() for p in m.trainable_parameters()]

    def layer_params(self, i):
        P = {}
        for m in (self.attn[i], self.o[i], self.mlp[i]):
            P.update({n: getattr(m, n) for n in m._adapter_names})
        return P

    def __call__(self, h, in_place=False):
        carry = initial_carry(self.cfg, h.shape[0], h.dtype)
        if in_place and carry is not None:  # zflora's stream as FusedLlama keeps it: one buffer
            hz = torch.cat([h, carry], 1)
            h, carry = hz[:, :D], hz[:, D:]
        for i in range(L):
            q, k, v, state = self.attn[i](rms(h), carry)
            a = q + k @ self.Pk + v @ self.Pv
            h, carry = self.o[i](a, state, residual=h, carry=carry, in_place=in_place)
            h, carry = self.mlp[i](rms(h), residual=h, carry=carry, in_place=in_place)
        return self.head(rms(h), carry)


def tile(z, n):
    return z.repeat(1, n // z.shape[1])


def reference(ch, h):
    """The spec's formulas, variant by variant, on the chain's tensors."""
    cfg = ch.cfg
    base, s = (None, 0.0) if cfg is None else (cfg.base_variant, cfg.scale)
    zfl = base in ("zflora", "zflora-minimal")
    c = torch.zeros(h.shape[0], R, dtype=h.dtype) if zfl else None

    def sub_block(u_in, names, W, P, c):
        """The input group: returns outputs and the state for the writer."""
        y = {p: u_in @ W[p].T for p in names}
        z = None
        for p in names:
            if base in ("lora", "pf-lora") and f"A_{p}" in P:
                y[p] = y[p] + s * (u_in @ P[f"A_{p}"].T) @ P[f"B_{p}"].T
            if base == "ffa" and f"A_{p}" in P:
                y[p] = y[p] + s * tile(u_in @ P[f"A_{p}"].T, OUT[p])
            if zfl and f"B_{p}" in P:
                y[p] = y[p] + s * c @ P[f"B_{p}"].T
        if base in ("fpa", "ffba", "ffba-ab", "ffba-relu", "ffba-qg-add"):
            As = [P[f"A_{p}"] for p in names if f"A_{p}" in P]
            if As:
                z = sum(u_in @ A.T for A in As)
                if base == "ffba-ab" and c is not None:
                    z = z + c
                if base == "ffba-qg-add" and f"A_{names[0]}" in P:
                    y[names[0]] = y[names[0]] + s * tile(u_in @ P[f"A_{names[0]}"].T, OUT[names[0]])
        return y, z

    def writer(p, u, z, W, P, c):
        out = u @ W[p].T
        if base in ("lora", "pf-lora") and f"A_{p}" in P:
            out = out + s * (u @ P[f"A_{p}"].T) @ P[f"B_{p}"].T
        if base == "ffa" and f"A_{p}" in P:
            out = out + s * tile(u @ P[f"A_{p}"].T, OUT[p])
        if z is not None and f"B_{p}" in P:
            f = torch.relu(z) if base in ("fpa", "ffba-relu") else z
            out = out + s * f @ P[f"B_{p}"].T
            if base == "ffba-ab":  # hand z' on; the last writer has no A/C: dropped
                c = u @ P[f"A_{p}"].T + z @ P[f"C_{p}"].T if f"A_{p}" in P else None
        if zfl and f"A_{p}" in P:
            c = c + u @ P[f"A_{p}"].T
        return out, c

    for i in range(L):
        W, P = ch.W[i], ch.layer_params(i)
        y, z = sub_block(rms(h), ("q", "k", "v"), W, P, c)
        a = y["q"] + y["k"] @ ch.Pk + y["v"] @ ch.Pv
        o, c = writer("o", a, z, W, P, c)
        h = h + o
        y, z = sub_block(rms(h), ("gate", "up"), W, P, c)
        d, c = writer("down", F.silu(y["gate"]) * y["up"], z, W, P, c)
        h = h + d
    logits = rms(h) @ ch.Wh.T
    if zfl and hasattr(ch.head, "B_head"):
        logits = logits + s * c @ ch.head.B_head.T
    return logits


def randomise(ch, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ch.params():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)


TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_equals_base_at_init(case):
    h = torch.randn(M, D, dtype=torch.float64)
    base = Chain(None, torch.float64)(h)
    ch = Chain(make_cfg(case), torch.float64)
    assert ch.params(), "variant built no adapter tensors"
    torch.testing.assert_close(ch(h), base, **TOL[torch.float64])
    # also with dropout on: it acts on the adapter state only
    ch_d = Chain(make_cfg(case, dropout=0.5), torch.float64)
    for m in ch_d.modules():
        m.train()
    torch.testing.assert_close(ch_d(h), base, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference_forward_and_grad(case, dtype):
    ch = Chain(make_cfg(case), dtype)
    randomise(ch)
    h = torch.randn(M, D, dtype=dtype, requires_grad=True)
    R_out = torch.randn(M, VOCAB, dtype=dtype)
    params = ch.params() + [h]
    out = ch(h)
    ref = reference(ch, h)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert (out - rms(h) @ ch.Wh.T).abs().max() > 1e-3  # the adapter really changes the output
    g_mod = torch.autograd.grad((out * R_out).sum(), params)
    g_ref = torch.autograd.grad((ref * R_out).sum(), params)
    for p, a, b in zip(params, g_mod, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_adapter_tensor_gets_gradient_within_two_steps(case):
    ch = Chain(make_cfg(case), torch.float64)
    params = ch.params()
    names = [f"{type(m).__name__}[{getattr(m, 'layer', None)}].{n}"
             for m in ch.modules() for n in m._adapter_names]
    opt = torch.optim.SGD(params, lr=0.5)
    seen = [False] * len(params)
    h = torch.randn(M, D, dtype=torch.float64)
    target = torch.randn(M, VOCAB, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        ((ch(h) - target) ** 2).sum().backward()
        for j, p in enumerate(params):
            seen[j] |= p.grad is not None and bool(p.grad.abs().max() > 0)
        opt.step()
    dead = [n for n, ok in zip(names, seen) if not ok]
    assert not dead, f"no gradient in two steps: {dead}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pf_lora_equals_lora(dtype):
    lora, pf = Chain(make_cfg(dict(variant="lora")), dtype), Chain(make_cfg(dict(variant="pf-lora")), dtype)
    randomise(lora)
    for a, b in zip(lora.modules(), pf.modules()):
        b.load_adapter_state_dict(a.adapter_state_dict())
    h = torch.randn(M, D, dtype=dtype)
    torch.testing.assert_close(pf(h), lora(h), **TOL[dtype])
    for m in pf.modules():
        m.fold()
    torch.testing.assert_close(pf(h), lora(h), **TOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_in_place_residual_adds(case):
    """in_place=True (FusedLlama's call): the writers add onto the residual
    they are given (flora::fbl_) wherever autograd records nothing (in
    training too, in a layer without trainable tensors), with the values a
    new output has, folded or not; gradients as without it."""
    dtype = torch.float32
    ch = Chain(make_cfg(case), dtype)
    randomise(ch)
    h = torch.randn(M, D, dtype=dtype)
    want = ch(h)
    got = ch(h.clone(), in_place=True)  # h is given up: a copy each time
    torch.testing.assert_close(got, want, **TOL[dtype])
    g1 = torch.autograd.grad(want.sum(), ch.params(), allow_unused=True)
    g2 = torch.autograd.grad(got.sum(), ch.params(), allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, **TOL[dtype])
    with torch.no_grad():
        torch.testing.assert_close(ch(h.clone(), in_place=True), want, **TOL[dtype])
        for m in ch.modules():
            m.fold()
        torch.testing.assert_close(ch(h.clone(), in_place=True), want, **TOL[dtype])


def test_output_projection_writes_over_the_residual_only_when_given_up():
    o = FusedOutputProjection(torch.randn(D, DQ), None)
    a, r = torch.randn(M, DQ), torch.randn(M, D)
    want, r0 = r + a @ o.weight.T, r.clone()
    with torch.no_grad():
        out, _ = o(a, residual=r)
        assert out is not r and torch.equal(r, r0)
        r2 = r.clone()
        out, _ = o(a, residual=r2, in_place=True)
        assert out is r2
        torch.testing.assert_close(out, want)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fold_unfold_and_disable(case):
    dtype = torch.float32
    ch = Chain(make_cfg(case), dtype)
    randomise(ch)
    h = torch.randn(M, D, dtype=dtype)
    base = Chain(None, dtype)(h)
    trained = ch(h)
    for m in ch.modules():
        m.fold()
    with torch.no_grad():
        torch.testing.assert_close(ch(h), trained, **TOL[dtype])
    for m in ch.modules():
        m.unfold()
    torch.testing.assert_close(ch(h), trained, rtol=0, atol=0)
    for m in ch.modules():
        m.set_adapter_enabled(False)
    assert torch.equal(ch(h), base)
    for m in ch.modules():
        m.fold()  # folded and disabled: still the base
    assert torch.equal(ch(h), base)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fused_storage_rows_are_16_byte_aligned(case):
    """Rank 4 beside K = 16 / 32 (K = 10, rank 3 in the blocks): every fused
    storage pads its rows to a multiple of 8 elements, so W and the slots
    start every row 16-byte aligned (what the CUDA kernels need); no view
    includes the pad and it stays zero after fold."""
    ch = Chain(make_cfg(case), torch.bfloat16)
    randomise(ch)
    blocks = [FFL(torch.randn(12, 10), 3), FBL(torch.randn(12, 10), 3), FFBL(torch.randn(12, 10), 3)]
    fused = []  # (storage, W, B slot, width the views cover)
    for m in list(ch.modules()) + blocks:
        m.fold()
        if isinstance(m, (FFL, FBL, FFBL)):
            W, _, B, _ = m.views()
            fused.append((m.storage, W, B, m.K + m.cols))
        for g in vars(m).values():
            if isinstance(g, _Group) and (g.rows or g.cols):
                fused.append((g.storage(m), g.W(m), g.slot_B(m), g.K + g.cols))
    assert fused
    for st, W, B, width in fused:
        assert st.stride(0) % 8 == 0 and W.stride(0) == B.stride(0) == st.stride(0)
        assert B.shape[1] == width - W.shape[1] and W.data_ptr() == st.data_ptr()
        assert not st[:, width:].any()


def test_fold_runs_one_op_per_projection(monkeypatch):
    """Folded ffba / zflora: every projection group is one op call."""
    calls = []
    for op in ("ffl", "fbl", "ffbl"):
        real = getattr(flora.ops, op)
        monkeypatch.setattr(flora.ops, op, lambda *a, _r=real, _n=op, **k: calls.append(_n) or _r(*a, **k))
    for v, expected in (("ffba", ["ffl", "fbl", "ffl", "fbl"]), ("zflora", ["fbl", "ffl", "fbl", "ffl"]),
                        ("ffba-ab", ["ffl", "ffbl", "ffl", "ffbl"]), ("ffa", ["ffl"] * 4),
                        ("pf-lora", ["ffl", "fbl"] * 4)):
        ch = Chain(make_cfg(dict(variant=v)), torch.float32)
        for m in ch.modules():
            m.fold()
        calls.clear()
        ch.attn[1](torch.randn(M, D), torch.zeros(M, R))
        ch.o[1](torch.randn(M, DQ), torch.randn(M, R), residual=torch.randn(M, D), carry=torch.zeros(M, R))
        ch.mlp[1](torch.randn(M, D), residual=torch.randn(M, D), carry=torch.zeros(M, R))
        assert calls == expected, (v, calls)


@pytest.mark.parametrize("variant", ["lora", "pf-lora"])
def test_merge_into_base(variant):
    dtype = torch.float64
    ch = Chain(make_cfg(dict(variant=variant)), dtype)
    randomise(ch)
    h = torch.randn(M, D, dtype=dtype)
    adapted = ch(h)
    for m in ch.modules():
        m.merge_into_base()
    torch.testing.assert_close(ch(h), adapted, **TOL[dtype])
    merged_base = ch.attn[0].base_weight("q").clone()
    A, B = ch.attn[0].A_q.detach(), ch.attn[0].B_q.detach()
    torch.testing.assert_close(merged_base, ch.W[0]["q"] + ch.cfg.scale * B @ A)
    for m in ch.modules():
        m.unmerge_from_base()
    torch.testing.assert_close(ch.attn[0].base_weight("q"), ch.W[0]["q"])


@pytest.mark.parametrize("variant", ["ffba", "zflora", "ffa"])
def test_merge_rejected_for_fused_variants(variant):
    ch = Chain(make_cfg(dict(variant=variant)), torch.float32)
    with pytest.raises(ValueError, match="lora"):
        ch.o[1].merge_into_base()


def test_structure_of_stream_variants():
    # zflora: layer 0's q/k/v read a stream nothing has written yet: no B there
    ch = Chain(make_cfg(dict(variant="zflora")), torch.float32)
    assert ch.attn[0]._adapter_names == []
    assert sorted(ch.attn[1]._adapter_names) == ["B_k", "B_q", "B_v"]
    assert ch.o[0]._adapter_names == ["A_o"] and ch.head._adapter_names == ["B_head"]
    assert initial_carry(ch.cfg, 3, torch.float32).shape == (3, R)
    assert initial_carry(make_cfg(dict(variant="ffba")), 3) is None
    # ffba-ab: the last down's z' is dropped, so it is an FBL (no A, C)
    ab = Chain(make_cfg(dict(variant="ffba-ab")), torch.float32)
    assert sorted(ab.mlp[L - 1]._adapter_names) == ["A_gate", "A_up", "B_down"]
    assert sorted(ab.mlp[0]._adapter_names) == ["A_down", "A_gate", "A_up", "B_down", "C_down"]
    # layers=[1]: other layers hold no adapter; zflora passes the carry through
    one = Chain(make_cfg(dict(variant="zflora-mha", layers=[1])), torch.float64)
    assert all(not m.trainable_parameters() for m in (one.attn[0], one.o[0], one.mlp[0], one.mlp[1]))
    c = torch.randn(M, R, dtype=torch.float64)
    h = torch.randn(M, D, dtype=torch.float64)
    assert one.mlp[1](torch.randn(M, D, dtype=torch.float64), residual=h, carry=c)[1] is c


def test_parameter_counts_match_module_tensors():
    for case in CASES:
        cfg = make_cfg(case)
        ch = Chain(cfg, torch.float32)
        n = sum(p.numel() for p in ch.params())
        assert count_parameters(cfg, SHAPES) == n, case


def _formula(v, d, dq, dkv, dff, vocab, Lr, r):
    """The spec's counts, written out per variant (r = rank)."""
    attn_in, mlp_in = 3 * d, 2 * d  # K of each q,k,v / gate,up
    lora_attn = r * ((d + dq) + 2 * (d + dkv) + (dq + d))
    lora_mlp = r * (2 * (d + dff) + (dff + d))
    mha = v.endswith("-mha")
    b = v[:-4] if mha else v
    if b in ("lora", "pf-lora"):
        return Lr * (lora_attn + (0 if mha else lora_mlp))
    if b == "ffa":
        return Lr * 2 * r * (attn_in + dq + (0 if mha else mlp_in + dff))
    if b == "fpa":
        return Lr * r * (2 * d + (0 if mha else 2 * d))
    if b in ("ffba", "ffba-relu", "ffba-qg-add"):
        return Lr * r * (attn_in + d + (0 if mha else mlp_in + d))
    if b == "ffba-ab":
        per = r * (attn_in + d + dq + r) + (0 if mha else r * (mlp_in + d + dff + r))
        last = r * dq + r * r if mha else r * dff + r * r  # the last writer has no A, C
        return Lr * per - last
    reads_qkv = r * (dq + 2 * dkv)
    if b == "zflora":
        if mha:
            return Lr * (reads_qkv + r * dq) - reads_qkv + vocab * r
        return Lr * (reads_qkv + r * dq + 2 * r * dff + r * dff) - reads_qkv + vocab * r
    if b == "zflora-minimal":
        return Lr * (reads_qkv + r * dff) - reads_qkv + vocab * r
    raise AssertionError(v)


@pytest.mark.parametrize("name,shape,heads", [
    ("llama-3.2-1b", (2048, 32 * 64, 8 * 64, 8192, 128256, 16), (32, 8)),
    ("llama-3.2-3b", (3072, 24 * 128, 8 * 128, 8192, 128256, 28), (24, 8)),
])
@pytest.mark.parametrize("r", [8, 16, 64])
def test_parameter_counts_llama_shapes(name, shape, heads, r):
    d, _, _, dff, vocab, layers = shape  # head_dim = d / heads in both
    sh = LlamaArch(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads[0],
                   num_key_value_heads=heads[1], intermediate_size=dff, vocab_size=vocab)
    for v in VARIANTS:
        cfg = AdapterConfig(v, r, 2 * r)
        assert count_parameters(cfg, sh) == _formula(v, *shape, r), (name, v)
    # lora r=16 on the 1B model: well-known PEFT count (all 7 projections)
    if name == "llama-3.2-1b" and r == 16:
        assert count_parameters(AdapterConfig("lora", 16, 32), sh) == 11_272_192


# --- building blocks --------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_match_formulas(dtype):
    torch.manual_seed(0)
    W = torch.randn(12, 10, dtype=dtype)
    u, z, res = torch.randn(M, 10, dtype=dtype), torch.randn(M, 3, dtype=dtype), torch.randn(M, 12, dtype=dtype)
    ffl = FFL(W, 3, 0.5)
    y, zo = ffl(u)
    torch.testing.assert_close(y, u @ W.T, **TOL[dtype])
    torch.testing.assert_close(zo, u @ ffl.A.detach().T, **TOL[dtype])
    ffl_r = FFL(W, 3, 0.5, repeat_add=True)
    with torch.no_grad():
        ffl_r.A.normal_()
    torch.testing.assert_close(ffl_r(u)[0], u @ W.T + 0.5 * tile(u @ ffl_r.A.T, 12), **TOL[dtype])
    fbl = FBL(W, 3, 0.5, relu=True)
    with torch.no_grad():
        fbl.B.normal_()
    torch.testing.assert_close(fbl(u, z, res), u @ W.T + 0.5 * torch.relu(z) @ fbl.B.T + res, **TOL[dtype])
    ffbl = FFBL(W, 3, 0.5, rank_out=2)
    with torch.no_grad():
        ffbl.B.normal_(), ffbl.C.normal_()
    y, z2 = ffbl(u, z, res)
    torch.testing.assert_close(y, u @ W.T + 0.5 * z @ ffbl.B.T + res, **TOL[dtype])
    torch.testing.assert_close(z2, u @ ffbl.A.T + z @ ffbl.C.T, **TOL[dtype])
    for blk, args in ((ffl_r, (u,)), (fbl, (u, z, res)), (ffbl, (u, z, res))):
        before = blk(*args)
        blk.fold()
        after = blk(*args)
        for a, b in zip(before if isinstance(before, tuple) else (before,),
                        after if isinstance(after, tuple) else (after,)):
            torch.testing.assert_close(a.detach(), b.detach(), **TOL[dtype])
        blk.set_adapter_enabled(False)
        first = blk(*args)
        first = first[0] if isinstance(first, tuple) else first
        expect = u @ W.T + (res if blk is not ffl_r else 0)
        torch.testing.assert_close(first, expect, **TOL[dtype])


def test_from_linear_shares_storage_and_rejects_bias():
    lin = torch.nn.Linear(10, 12, bias=False)
    w0 = lin.weight.detach().clone()
    blk = FFL.from_linear(lin, 4)
    assert lin.weight.data_ptr() == blk.storage.data_ptr()  # no second copy of W
    torch.testing.assert_close(blk.weight, w0, rtol=0, atol=0)
    assert not blk.storage.requires_grad and [n for n, _ in blk.named_parameters()] == ["A"]
    with pytest.raises(ValueError, match="bias"):
        FBL.from_linear(torch.nn.Linear(10, 12), 4)
    q, k, v = (torch.nn.Linear(D, n, bias=False) for n in (DQ, DKV, DKV))
    attn = FusedAttentionProjections.from_linear(q, k, v, make_cfg(dict(variant="ffba")), 0)
    x = torch.randn(M, D)
    torch.testing.assert_close(attn(x)[1], k(x))
    assert k.weight.data_ptr() == attn.w_qkv.data_ptr() + DQ * D * 4
    with pytest.raises(ValueError, match="bias"):
        FusedOutputProjection.from_linear(torch.nn.Linear(D, D), None)


def test_adapter_state_dict_roundtrip_and_errors():
    ch = Chain(make_cfg(dict(variant="ffba-ab")), torch.float32)
    randomise(ch)
    sd = ch.mlp[0].adapter_state_dict()
    assert set(sd) == {"A_gate", "A_up", "B_down", "A_down", "C_down"}
    assert sd["C_down"].shape == (R, R) and sd["A_down"].shape == (R, DFF)
    other = Chain(make_cfg(dict(variant="ffba-ab")), torch.float32)
    other.mlp[0].load_adapter_state_dict(sd)
    for n, t in other.mlp[0].adapter_state_dict().items():
        assert torch.equal(t, sd[n])
    with pytest.raises(KeyError, match="C_down"):
        other.mlp[0].load_adapter_state_dict({k: v for k, v in sd.items() if k != "C_down"})
    with pytest.raises(ValueError, match="shape"):
        other.mlp[0].load_adapter_state_dict({**sd, "C_down": torch.zeros(R + 1, R)})


def test_mixed_dtype_adapters_on_bf16_base():
    cfg = make_cfg(dict(variant="zflora"))
    ch = Chain(cfg, torch.bfloat16)
    w = ch.W[1]
    attn = FusedAttentionProjections(w["q"], w["k"], w["v"], cfg, 1, adapter_dtype=torch.float32)
    assert attn.B_q.dtype == torch.float32 and attn.w_qkv.dtype == torch.bfloat16
    with torch.no_grad():
        attn.B_q.normal_()
    x, c = torch.randn(M, D, dtype=torch.bfloat16), torch.randn(M, R, dtype=torch.bfloat16)
    q = attn(x, c)[0]
    assert q.dtype == torch.bfloat16
    ref = x.float() @ w["q"].float().T + cfg.scale * c.float() @ attn.B_q.detach().bfloat16().float().T
    torch.testing.assert_close(q.float(), ref, rtol=2e-2, atol=5e-2)
    q.float().sum().backward()
    assert attn.B_q.grad is not None and attn.B_q.grad.dtype == torch.float32


def test_module_errors():
    w = torch.randn(DQ, D)
    with pytest.raises(ValueError, match="input width"):
        FusedAttentionProjections(w, torch.randn(DKV, D + 1), torch.randn(DKV, D))
    with pytest.raises(ValueError, match="rank"):
        # ffa repeat-adds 2r = 6 wide state onto widths 16 / 8: not a multiple
        FusedAttentionProjections(w, torch.randn(DKV, D), torch.randn(DKV, D),
                                  AdapterConfig("ffa", 3, 6), 0)
    with pytest.raises(ValueError, match="layer"):
        FusedOutputProjection(torch.randn(D, DQ), None, 5, num_layers=3)
    with pytest.raises(ValueError, match="2-D"):
        FusedLMHead(torch.randn(3))
