"""flora.layers.attention's call forms: a causal prompt as SDPA's is_causal, a
padded one with its mask (kv heads expanded on CUDA), against masked
attention written out in fp64; and on CUDA, that no form falls to SDPA's math
kernel (fp32 scores [B, heads, T, L] in memory)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flora import AdapterConfig
from flora.layers import attention, attention_mask_4d, causal_lm_loss, expand_kv, expands_kv, prompt_mask
from flora.model import FusedLlama
from llama_fixtures import llama_model, random_ids

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def written_out(q, k, v, mask):
    """Masked softmax attention in fp64, kv heads repeated: [B * T, heads * hd]."""
    B, T, nh, hd = q.shape
    g = nh // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double().transpose(1, 2) @ kk.transpose(-1, -2) * hd ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2).reshape(B * T, nh * hd)


def operands(B, T, nh, nkv, dtype, device, hd=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in ((B, T, nh, hd), (B, nkv, T, hd), (B, nkv, T, hd)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def tolerance(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_forms_equal_written_out(device, dtype, nh, nkv, padded):
    B, T = 3, 37
    q, k, v = operands(B, T, nh, nkv, dtype, device)
    key_valid = torch.ones(B, T, dtype=torch.bool, device=device)
    if padded:
        key_valid[0, :5] = False
        key_valid[2, :1] = False
    mask = prompt_mask(key_valid)
    assert (mask is None) == (not padded)  # left padding: the mask
    full = attention_mask_4d(key_valid, torch.arange(T, device=device), torch.arange(T, device=device))
    ref = written_out(q, k, v, full)
    got = attention(q, k, v, mask)
    # padded query rows see only their own slot; compare the real ones
    real = key_valid.reshape(-1)
    err = (got.double() - ref)[real].abs().max() / ref[real].abs().max()
    assert err <= tolerance(dtype)
    if not padded:  # the causal form is the mask's form
        assert torch.allclose(got.float(), attention(q, k, v, full).float(), rtol=0, atol=tolerance(dtype))


def test_expand_kv_pairs_heads_as_enable_gqa_does():
    k = torch.randn(2, 3, 5, 4)
    assert torch.equal(expand_kv(k, 4), k.repeat_interleave(4, 1))
    q, v = torch.randn(2, 12, 5, 4), torch.randn(2, 3, 5, 4)
    assert torch.allclose(F.scaled_dot_product_attention(q, expand_kv(k, 4), expand_kv(v, 4), is_causal=True),
                          F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), atol=1e-6)


def test_kv_heads_expand_only_where_cuda_would_fall_to_math():
    """Flash takes grouped heads but no mask and no fp32; memory-efficient takes
    masks and fp32 but no grouped heads: expanded exactly where flash cannot run."""
    table = {(dev, dt, masked): expands_kv(dev, dt, masked) for dev in ("cuda", "cpu")
             for dt in (torch.bfloat16, torch.float16, torch.float32) for masked in (False, True)}
    assert {k for k, v in table.items() if v} == {
        ("cuda", torch.bfloat16, True), ("cuda", torch.float16, True),
        ("cuda", torch.float32, False), ("cuda", torch.float32, True)}


@pytest.mark.parametrize("masked", [False, True])
def test_expanded_form_equals_the_grouped_one(masked, monkeypatch):
    """The CUDA-only expanded call, run on the CPU (the decision forced), equals the grouped one."""
    import flora.layers as layers

    q, k, v = operands(2, 23, 8, 2, torch.float32, "cpu")
    kv = torch.ones(2, 23, dtype=torch.bool)
    kv[0, :3] = False
    mask = attention_mask_4d(kv, torch.arange(23), torch.arange(23)) if masked else None
    grouped = attention(q, k, v, mask)
    monkeypatch.setattr(layers, "expands_kv", lambda *a: True)
    assert torch.allclose(layers.attention(q, k, v, mask), grouped, atol=1e-6)


def test_prompt_mask_reads_a_host_mask():
    kv = torch.ones(2, 5, dtype=torch.bool)
    assert prompt_mask(kv) is None
    kv[1, 0] = False
    m = prompt_mask(kv)
    assert m.shape == (2, 1, 5, 5) and torch.equal(m, attention_mask_4d(kv, torch.arange(5), torch.arange(5)))


def test_all_ones_mask_is_the_unmasked_forward():
    m = FusedLlama.from_pretrained(llama_model(hidden=64, heads=8, kv_heads=2))
    ids = random_ids(2, 24)
    with torch.no_grad():
        a = m(ids).logits
        b = m(ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_attention_never_takes_the_math_kernel(dtype, padded):
    B, T, nh, nkv = 2, 300, 8, 2
    q, k, v = operands(B, T, nh, nkv, dtype, "cuda", hd=64)
    key_valid = torch.ones(B, T, dtype=torch.bool, device="cuda")
    if padded:
        key_valid[1, :40] = False
    mask = prompt_mask(key_valid)
    if mask is not None:
        mask = torch.zeros(mask.shape, dtype=dtype, device="cuda").masked_fill_(~mask, float("-inf"))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        got = attention(q, k, v, mask)  # raises "No available kernel" where only math would do
    full = attention_mask_4d(key_valid, torch.arange(T, device="cuda"), torch.arange(T, device="cuda"))
    ref, real = written_out(q, k, v, full), key_valid.reshape(-1)
    assert (got.double() - ref)[real].abs().max() / ref[real].abs().max() <= tolerance(dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_training_step_without_the_math_kernel(padded):
    m = FusedLlama.from_pretrained(llama_model(hidden=128, heads=8, kv_heads=2), adapter=AdapterConfig("ffba", rank=4, alpha=8.0)).cuda()
    ids = random_ids(2, 64).cuda()
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :9] = 0
    m.train()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), \
            torch.autocast("cuda", torch.bfloat16):
        loss = m(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)


def test_attention_bench_compares_the_two_forms(tmp_path, capsys):
    """bench/attention.py: both forms per case, the same numbers (fp64 reference above),
    the ratio on the flora row, JSON written."""
    import json

    from _bench_scripts import load_bench_script

    ab = load_bench_script("attention")
    q, k, v = operands(2, 19, 6, 2, torch.float32, "cpu")
    kv = torch.ones(2, 19, dtype=torch.bool)
    kv[1, :4] = False
    real = kv.reshape(-1)
    assert torch.allclose(ab.flora_form(q, k, v, kv)[real], ab.former(q, k, v, kv)[real], atol=1e-6)
    out = tmp_path / "a.json"
    ab.main(["--device", "cpu", "--shapes", "smollm2", "--batch", "1", "--seq", "32", "--reps", "1",
             "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and {r["form"] for r in rows} == {"flora", "mask+gqa"}
    assert all(r["ms"] > 0 for r in rows) and sum("x" in r for r in rows) == 4
    assert "| smollm2 | 1 | 32 | yes | fwd+bwd | flora |" in capsys.readouterr().out


def test_attention_bench_packed_rows(tmp_path, capsys):
    """bench/attention.py --packed: the packed call's output is each sequence's causal
    attention alone (the reference: one call per sequence); rows for both forms."""
    import json

    from _bench_scripts import load_bench_script

    from flora.layers import additive_mask, attention, packed_mask

    ab = load_bench_script("attention")
    pos = ab.packed_positions(2, 19, 3, "cpu")
    assert pos[0].tolist() == list(range(7)) + list(range(6)) + list(range(6))
    q, k, v = operands(2, 19, 6, 2, torch.float32, "cpu")
    got = attention(q, k, v, additive_mask(packed_mask(pos), q.dtype)).view(2, 19, -1)
    for a, b in ((0, 7), (7, 13), (13, 19)):
        alone = attention(q[:, a:b], k[:, :, a:b], v[:, :, a:b], None).view(2, b - a, -1)
        assert torch.allclose(got[:, a:b], alone, atol=1e-6)
    out = tmp_path / "a.json"
    ab.main(["--device", "cpu", "--shapes", "smollm2", "--batch", "1", "--seq", "32", "--reps", "1",
             "--no-padded", "--packed", "4", "--json", str(out)])
    rows = [r for r in json.loads(out.read_text())["rows"] if r["packed"]]
    assert len(rows) == 6 and {r["form"] for r in rows} == {"per-sequence", "mask", "causal"}
    assert sum("x" in r for r in rows) == 2 and all(r["picks"] == "mask" for r in rows)  # 4 x 8 tokens: the mask
    assert "| smollm2 | 1 | 32 | packed 4 | fwd | per-sequence |" in capsys.readouterr().out


def test_end_padded_training_batch_runs_causal(monkeypatch):
    """flora's training batches are padded at their end, labels -100 there: the loss
    runs causal attention (no mask), exact at every real position, the masked form's
    loss. Where padded positions are read (logits returned, or labels there) the mask
    stays: logits returned are the masked form's."""
    import flora.model

    hf = llama_model(hidden=64, heads=8, kv_heads=2)
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffba", rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = random_ids(3, 20)
    mask = torch.ones_like(ids)
    mask[0, 13:] = 0
    mask[2, 17:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    assert prompt_mask(mask.bool()) is not None and prompt_mask(mask.bool(), end_padding_unread=True) is None
    assert prompt_mask(torch.tensor([[0, 1, 1]]).bool(), end_padding_unread=True) is not None  # left padding

    causal = []
    real_attention = flora.model.attention
    monkeypatch.setattr(flora.model, "attention", lambda q, k, v, mk, *rest: causal.append(mk is None)
                        or real_attention(q, k, v, mk, *rest))
    with torch.no_grad():
        logits = m(ids, attention_mask=mask).logits  # logits returned: masked
    assert not any(causal)
    m.train()
    causal.clear()
    loss = m(ids, attention_mask=mask, labels=labels).loss
    assert causal and all(causal)
    causal.clear()
    m(ids, attention_mask=mask, labels=ids).loss  # labels at the padding: masked
    assert not any(causal)
    assert torch.allclose(loss, causal_lm_loss(logits, labels), rtol=1e-5)
    with torch.no_grad(), m.disable_adapter():
        base = m.eval()(ids, attention_mask=mask).logits
        ref = hf(ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions are never read (their RoPE positions differ from transformers')
    assert ((base - ref)[real].abs().max() / ref[real].abs().max()) <= 1e-5


def test_attention_bench_decode_rows(tmp_path, capsys):
    """bench/attention.py --decode: per case the op's row and the SDPA row, the
    op's ratio to SDPA, GB/s and x floor against the copy bandwidth, JSON;
    --cold on the CPU too."""
    import json

    from _bench_scripts import load_bench_script

    ab = load_bench_script("attention")
    out = tmp_path / "d.json"
    ab.main(["--device", "cpu", "--decode", "--shapes", "smollm2", "--batch", "1", "2", "--context", "64", "--reps",
             "1", "--json", str(out)])
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["copy_gbps"] > 0 and len(rows) == 8  # 2 batches x padded or not x 2 forms
    assert {r["form"] for r in rows} == {"flora", "sdpa (before)"}
    assert all(r["us"] > 0 and r["gbps"] > 0 and r["x_floor"] > 0 for r in rows)
    assert sum("x" in r for r in rows) == 4
    assert "| smollm2 | 2 | 64 | yes | flora |" in capsys.readouterr().out
    # --cold: the same rows over rotated cache copies (each call's window from memory)
    ab.main(["--device", "cpu", "--decode", "--shapes", "smollm2", "--batch", "1", "--context", "64", "--reps", "1",
             "--no-padded", "--cold", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["us"] > 0 for r in rows)
