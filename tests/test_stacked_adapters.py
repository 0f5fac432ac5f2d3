"""Several adapters in one batch (FusedLlama.stack_adapters): each row runs its
own adapter (or none), and gets exactly what the model gives with that adapter
alone (set_adapter, or disable_adapter for None); the independent reference
is the same model run one row and one adapter at a time. (Compiled decode of a
mixed batch: tests/test_decode_step.py::test_compiled_decode_gives_eager_tokens.)"""
import copy
import gc
import weakref

import pytest
import torch

from flora import AdapterConfig, FusedLlama
from flora.adapters import UNSTACKABLE, stack_state_dicts
from flora.config import VARIANTS
from llama_fixtures import llama_model, random_ids

STACKABLE = [v for v in VARIANTS if v.removesuffix("-mha") not in UNSTACKABLE]
ALPHAS = (4, 8, 24)  # each adapter its own scale


@pytest.fixture(scope="module")
def hf():
    return llama_model()


def _adapters(hf, variant, tmp_path, n=3):
    """n saved adapters of ``variant`` with random (non-zero) tensors and their own alphas."""
    paths = []
    for j in range(n):
        m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig(variant, rank=4, alpha=ALPHAS[j]))
        g = torch.Generator().manual_seed(j)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        m.save_adapter(str(tmp_path / f"a{j}"))
        paths.append(str(tmp_path / f"a{j}"))
    return paths


def _loaded(hf, paths):
    m = FusedLlama.from_pretrained(hf, adapter=paths[0]).eval()
    for j, p in enumerate(paths[1:], 1):
        m.load_adapter(p, f"a{j}", activate=False)
    return m


def _one_at_a_time(m, fn, rows):
    """fn(row index, adapter name or None) for each row, on the unstacked model."""
    out = []
    for i, name in enumerate(rows):
        if name is None:
            with m.disable_adapter():
                out.append(fn(i))
        else:
            m.set_adapter(name)
            out.append(fn(i))
    return torch.cat(out)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("variant", STACKABLE)
def test_each_row_gets_its_own_adapter(hf, variant, tmp_path):
    m = _loaded(hf, _adapters(hf, variant, tmp_path))
    ids, rows = random_ids(5, 10), ["a1", None, "default", "a2", "a1"]
    with torch.no_grad():
        want = _one_at_a_time(m, lambda i: m(ids[i:i + 1]).logits, rows)
        m64 = copy.deepcopy(m).to(torch.float64)
        exact = _one_at_a_time(m64, lambda i: m64(ids[i:i + 1]).logits, rows)
        m.set_adapter("default")
        m64.set_adapter("default")
        # fp32's own error on the whole batch (other GEMM shapes than one row's round differently)
        batch_err = _rel(m(ids).logits.double(), m64(ids).logits)
        m.stack_adapters(["default", "a1", "a2"])
        assert m.stacked == ["default", "a1", "a2"] and m.adapter_config.rank == 12
        got = m(ids, adapters=rows).logits
        # within fp32's own error of the float64 answer (one row at a time, or the batch on one adapter),
        # times 10: the stacked GEMMs round in another order, and these random tensors (std 0.2, scale
        # up to 24 / 4) amplify it: 1.5e-5 apart on one CPU; on an Intel Xeon without AMX the stacked
        # lora's row of scale 6 is 5.5e-6 off where fp32 is 9.5e-7 (the stacked float64 model: exact)
        assert _rel(got.double(), exact) <= 10 * max(_rel(want.double(), exact), batch_err) + 1e-6
        # the routing is what makes it right: other adapters' rows differ
        other = m(ids, adapters=["a2", "a1", None, "default", "default"]).logits
        assert all(_rel(other[i], want[i]) > 1e-3 for i in range(5))
        m.unstack_adapters()
        assert m.stacked is None and m.adapter_config.rank == 4 and m.active_adapter == "default"
        assert _rel(m(ids[2:3]).logits, want[2:3]) < 1e-6


@pytest.mark.parametrize("variant", ["pf-lora", "zflora", "ffba-ab"])
def test_generate_mixed_batch_equals_one_adapter_at_a_time(hf, variant, tmp_path):
    m = _loaded(hf, _adapters(hf, variant, tmp_path, n=2))
    ids = random_ids(4, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    rows = ["a1", None, "default", "a1"]
    kw = dict(max_new_tokens=10, eos_token_id=[])
    parts = []
    for i, name in enumerate(rows):  # row by row (the padded one without its pad)
        p = ids[i:i + 1, 3:] if i == 1 else ids[i:i + 1]
        parts.append(_one_at_a_time(m, lambda _: m.generate(p, **kw), [name])[:, -10:])
    want = torch.cat(parts)
    m.stack_adapters(["default", "a1"])
    got = m.generate(ids, attention_mask=mask, adapters=rows, **kw)[:, -10:]
    assert torch.equal(got, want)
    # the decoder kept for this batch shape re-reads the rows: another routing, other tokens
    flipped = m.generate(ids.flip(0), attention_mask=mask.flip(0), adapters=rows[::-1], **kw)[:, -10:]
    assert torch.equal(flipped, want.flip(0))


def test_stack_state_dicts_concatenates_the_rank_and_block_diagonalises_c():
    a = {"A": torch.ones(2, 5), "B": torch.ones(7, 2), "C": torch.ones(2, 2), "n": torch.ones(3)}
    b = {k: 2 * v for k, v in a.items()}
    like = {"A": torch.empty(4, 5), "B": torch.empty(7, 4), "C": torch.empty(4, 4), "n": torch.empty(3)}
    out = stack_state_dicts([a, b], like)
    assert torch.equal(out["A"], torch.cat([a["A"], b["A"]])) and torch.equal(out["B"], torch.cat([a["B"], b["B"]], 1))
    assert torch.equal(out["C"], torch.block_diag(a["C"], b["C"])) and torch.equal(out["n"], a["n"])
    with pytest.raises(ValueError, match="does not stack 2 times"):
        stack_state_dicts([a, b], {"A": torch.empty(5, 5)})


def test_restacking_frees_the_old_storage_layer_by_layer(hf, tmp_path):
    m = _loaded(hf, _adapters(hf, "ffba", tmp_path, n=2))
    rows = m.layers[0].attn.w_qkv.shape[0]
    old = [weakref.ref(layer.attn.w_qkv) for layer in m.layers]
    m.stack_adapters(["default", "a1"])
    gc.collect()
    assert all(r() is None for r in old) and m.layers[0].attn.w_qkv.shape[0] == rows + 4  # r -> 2r A rows


def test_wrong_use_is_a_clear_error(hf, tmp_path):
    paths = _adapters(hf, "lora", tmp_path, n=2)
    m = _loaded(hf, paths)
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="holds one at a time"):
        m(ids, adapters=["default", None])
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        m.stack_adapters(["default", "nope"])
    with pytest.raises(ValueError, match="names repeat"):
        m.stack_adapters(["a1", "a1"])
    with pytest.raises(ValueError, match="non-empty list"):
        m.stack_adapters("a1")
    m.stack_adapters(["default", "a1"])
    with pytest.raises(ValueError, match=r"pass adapters=\[one name or None per row\]"):
        m(ids)
    with pytest.raises(ValueError, match=r"pass adapters=\[one name or None per row\]"):
        m.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="a list of 2 names"):
        m(ids, adapters=["default"])
    with pytest.raises(KeyError, match="'x' is not among the stacked adapters"):
        m(ids, adapters=["default", "x"])
    m.train()
    with pytest.raises(ValueError, match="is for inference"):
        m(ids, adapters=["default", None])
    m.eval()
    for call in (lambda: m.set_adapter("a1"), lambda: m.save_adapter(str(tmp_path / "s")),
                 lambda: m.load_adapter(paths[1], "again"), m.merge_into_base, m.merged_state_dict,
                 lambda: m.export_peft(str(tmp_path / "p"))):
        with pytest.raises(ValueError, match=r"side by side \(stack_adapters\); call unstack_adapters\(\) first"):
            call()
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists()
    m.unstack_adapters()
    m.set_adapter("a1")  # one at a time again
    ffa = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffa", rank=4, alpha=8))
    with pytest.raises(ValueError, match="repeat-add"):
        ffa.stack_adapters(["default"])


def test_mixed_adapters_bench_rows(tmp_path):
    """bench/mixed_adapters.py on the tiny shape: every run of each variant
    timed, ratios to the base in the same run, the bytes floor counted."""
    import json

    from _bench_scripts import load_bench_script

    bench = load_bench_script("mixed_adapters")
    bench.main(["--shape", "tiny", "--adapters", "2", "--variants", "zflora", "--rank", "4", "--prompt", "6",
                "--new", "3", "--repeats", "1", "--json", str(tmp_path / "m.json")])
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]["zflora"]
    assert list(rows) == ["base", "one adapter", "mixed", "switching"]
    assert rows["base"]["tpot_ratio"] == 1.0 and rows["base"]["floor"] == 1.0
    assert 1.0 < rows["one adapter"]["floor"] < rows["mixed"]["floor"]  # 2 adapters stream 2x the blocks
    assert all(r["tpot_s"] > 0 and r["ttft_s"] > 0 for r in rows.values())


def test_a_failure_half_way_through_stacking_leaves_the_model_as_it_was(hf, tmp_path, monkeypatch):
    """Out of memory while the fused storage is rebuilt (layer 0 already
    replaced, layer 1 fails): the old structure and its adapter come back, folded as before,
    and the error goes on; stacking works once memory allows."""
    import flora.model as fm

    m = _loaded(hf, _adapters(hf, "zflora", tmp_path))
    ids = random_ids(2, 7)
    m.fold()
    with torch.no_grad():
        want = m(ids).logits
    real = fm.FusedLlamaLayer

    def layer(sd, i, cfg, n, adapter_dtype=None):
        if cfg is not None and cfg.rank == 12 and i == 1:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(sd, i, cfg, n, adapter_dtype)

    monkeypatch.setattr(fm, "FusedLlamaLayer", layer)
    params = list(m.parameters())
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        m.stack_adapters(["default", "a1", "a2"])
    assert m.stacked is None and m.adapter_config.rank == 4 and m.active_adapter == "default" and m.folded
    assert all(p is q for p, q in zip(m.parameters(), params))  # an optimizer's tensors, still the model's
    with torch.no_grad():
        assert torch.equal(m(ids).logits, want)
    monkeypatch.setattr(fm, "FusedLlamaLayer", real)
    m.stack_adapters(["default", "a1", "a2"])
    with torch.no_grad():
        assert _rel(m(ids, adapters=["default", "default"]).logits, want) < 1e-5


def test_padded_prefill_of_a_stacked_batch_is_the_plain_one(hf, tmp_path):
    """A stacked batch's prefill padded to a graph's length (run eagerly here): each
    row's routing and tokens as the plain prefill's."""
    from flora.generation import Decoder, inference_mode

    m = _loaded(hf, _adapters(hf, "zflora", tmp_path, n=2))
    m.stack_adapters(["default", "a1"])
    ids = random_ids(3, 11, seed=9)
    rows = m.adapter_rows(["a1", None, "default"], 3)
    kv = torch.ones_like(ids, dtype=torch.bool)
    out = []
    with inference_mode(m):
        for pad in (False, True):
            dec = Decoder(m, 3, 80, use_cuda_graph=False)
            dec.pad_prefill = pad
            logits, toks = dec.prefill(ids, kv, rows), []
            for _ in range(8):
                toks.append(logits.argmax(-1))
                logits = dec.step(toks[-1])
            out.append(torch.stack(toks, 1))
            assert bool(dec.prefill_graphs) == pad
    assert torch.equal(out[0], out[1])


def test_an_optimizer_made_before_stacking_trains_the_model_after_unstacking(hf, tmp_path):
    """unstack_adapters rebuilt the model with new adapter Parameters: an optimizer made
    before stack_adapters went on stepping the orphaned old ones (the loss stayed flat)."""
    m = _loaded(hf, _adapters(hf, "ffba", tmp_path, n=2)).train()
    ids = random_ids(2, 7)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    m.eval()
    m.stack_adapters(["default", "a1"])
    m.unstack_adapters()
    m.train()
    assert [id(p) for p in m.parameters()] == [id(p) for p in params]
    before = {k: t.clone() for k, t in m.adapter_state_dict().items()}
    m(ids, labels=ids).loss.backward()
    opt.step()
    assert any(not torch.equal(t, before[k]) for k, t in m.adapter_state_dict().items())


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("current", ["a0", None])
def test_unstacking_gives_back_the_model_as_it_was(hf, tmp_path, folded, current):
    """unstack_adapters left the model unfolded whatever it was before stack_adapters (its
    forward back in the slower training form), and a base model whose adapters were loaded
    without activating came back with the first of the stack current and live."""
    paths = _adapters(hf, "ffba", tmp_path, n=2)
    m = FusedLlama.from_pretrained(hf)
    m.load_adapter(paths[0], "a0", activate=current is not None)
    m.load_adapter(paths[1], "a1", activate=False)
    if folded:
        m.fold()
    ids = random_ids(2, 7)
    with torch.no_grad():
        want = m(ids).logits
    before = (m.active_adapter, m.folded, m.adapter_active(), m.adapter_config)
    m.stack_adapters(["a1", "a0"])
    m.unstack_adapters()
    assert (m.active_adapter, m.folded, m.adapter_active(), m.adapter_config) == before
    with torch.no_grad():
        assert torch.equal(m(ids).logits, want)


def test_a_converted_model_restacks_in_its_adapters_dtype(hf, tmp_path):
    """model.to(dtype) converts the adapter Parameters, but the model kept building adapters
    in the adapter_dtype given at load: stack / unstack_adapters gave it adapters of the old
    dtype, new tensors an optimizer made before stacking no longer reached (training after
    unstacking silently stepped orphans)."""
    m = FusedLlama.from_pretrained(hf, adapter=_adapters(hf, "ffba", tmp_path, n=1)[0],
                                   adapter_dtype=torch.float32).to(torch.float64)
    m.add_adapter("b", AdapterConfig("ffba", rank=4), activate=False)
    params = list(m.parameters())
    m.stack_adapters(["default", "b"])
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    m.unstack_adapters()
    assert all(p is q for p, q in zip(m.parameters(), params)) and len(list(m.parameters())) == len(params)


def test_a_model_converted_while_stacked_unstacks_to_its_own_parameters(hf, tmp_path):
    """.to() while stacked converted the stacked tensors but not the Parameters set aside
    for unstack_adapters, which then no longer fitted: the model came back with new tensors
    and an optimizer made before stacking silently stepped orphans. The registry's adapters
    (kept on the model's device) follow a conversion too."""
    paths = _adapters(hf, "ffba", tmp_path, n=2)
    m = _loaded(hf, paths)
    params = list(m.parameters())
    for p in params:  # gradients left from training: converted with their Parameters
        p.grad = torch.ones_like(p)
    m.stack_adapters(["default", "a1"])
    m.to(torch.float64)
    m.unstack_adapters()
    assert all(p is q for p, q in zip(m.parameters(), params)) and len(list(m.parameters())) == len(params)
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert all(p.grad.dtype == torch.float64 and torch.all(p.grad == 1) for p in m.parameters())
    assert {t.dtype for t in m._adapters["a1"][1].values()} == {torch.float64}
    with torch.no_grad():
        m.set_adapter("a1")
        want = FusedLlama.from_pretrained(hf, adapter=paths[1], dtype=torch.float64)
        ids = random_ids(2, 7)
        assert torch.equal(m(ids).logits, want(ids).logits)
