"""FusedLlama against transformers' LlamaForCausalLM on the same weights."""
import os

import pytest
import torch

from flora import AdapterConfig
from flora.checkpoint import CheckpointError
from flora.config import VARIANTS
from flora.model import FusedLlama
from llama_fixtures import llama_model, random_ids, save_model


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def randomize_adapter(model, std=0.1, seed=0):
    """Non-zero adapter tensors (B and C start at zero), so adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


CONFIGS = {  # heads 8, head_dim 8: GQA ratios 1, 4, 8
    "untied-mha": dict(hidden=64, heads=8, kv_heads=8, tied=False, rope_scaling=False),
    "tied-gqa4-llama3": dict(hidden=64, heads=8, kv_heads=2, tied=True, rope_scaling=True),
    "untied-gqa8-llama3": dict(hidden=64, heads=8, kv_heads=1, tied=False, rope_scaling=True),
    "tied-gqa4": dict(hidden=64, heads=8, kv_heads=2, tied=True, rope_scaling=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_fp32(name, tmp_path):
    hf = llama_model(**CONFIGS[name])
    path = save_model(hf, str(tmp_path / name), shard="60KB" if name == "untied-mha" else None)
    m = FusedLlama.from_pretrained(path)
    ids = random_ids(2, 48)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    with torch.no_grad():
        assert rel_err(m(ids).logits, hf(ids).logits) <= 1e-5
        ours, ref = m(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    assert rel_err(ours[1], ref[1]) <= 1e-5
    assert rel_err(ours[0, 7:], ref[0, 7:]) <= 1e-5  # padded positions are never read


def test_scaling_changes_logits():
    """The llama3 rope-scaling path is exercised (differs from plain RoPE)."""
    a = FusedLlama.from_pretrained(llama_model(rope_scaling=True))
    b = FusedLlama.from_pretrained(llama_model(rope_scaling=False))
    ids = random_ids(1, 64)
    with torch.no_grad():
        assert rel_err(a(ids).logits, b(ids).logits) > 1e-3


@pytest.mark.parametrize("name", ["tied-gqa4-llama3", "untied-gqa8-llama3"])
def test_logits_bf16_within_2x_of_transformers(name):
    hf = llama_model(**CONFIGS[name])
    ids = random_ids(2, 32)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = FusedLlama.from_pretrained(hf, dtype=torch.bfloat16)(ids).logits
        theirs = llama_model(**CONFIGS[name]).to(torch.bfloat16)(ids).logits
    assert ours.dtype == torch.bfloat16
    err_hf = (theirs.float() - ref).abs().max().item()
    err_ours = (ours.float() - ref).abs().max().item()
    assert err_ours <= 2 * err_hf, (err_ours, err_hf)


def test_loss_equals_transformers():
    hf = llama_model()
    m = FusedLlama.from_pretrained(hf)
    ids = random_ids(2, 20)
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        assert abs(m(ids, labels=labels).loss.item() - hf(ids, labels=labels).loss.item()) < 1e-5
        out = m(ids, labels=labels, num_items_in_batch=torch.tensor(10))
    n = (labels[:, 1:] != -100).sum()
    assert abs(out.loss.item() - hf(ids, labels=labels).loss.item() * n.item() / 10) < 1e-4
    assert out["loss"] is out.loss and out[1] is out.logits and out.to_tuple()[0] is out.loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_forward_backward_generate(variant):
    hf = llama_model(tied=variant.startswith("zflora"))
    ids = random_ids(2, 10)
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig(variant, rank=4, alpha=8))
    with torch.no_grad():  # at init the adapter computes exactly the base model
        assert rel_err(m(ids).logits, hf(ids).logits) <= 1e-5
    randomize_adapter(m)
    out = m(ids, labels=ids)
    out.loss.backward()
    params = [p for p in m.parameters() if p.requires_grad]
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        adapted = m(ids).logits
        assert rel_err(adapted, hf(ids).logits) > 1e-3
        with m.disable_adapter():
            assert rel_err(m(ids).logits, hf(ids).logits) <= 1e-5
        assert torch.equal(m(ids).logits, adapted)
    gen = m.generate(ids, max_new_tokens=4)
    # greedy through the cache (folded) == argmax of a full forward of the unfolded model
    with torch.no_grad():
        full = m(gen).logits[:, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(gen[:, ids.shape[1]:], full)


def test_gradient_checkpointing_same_grads():
    hf = llama_model()
    ids = random_ids(2, 10)
    grads = []
    for ckpt in (False, True):
        m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffba-ab", rank=4, alpha=4))
        randomize_adapter(m)
        if ckpt:
            m.gradient_checkpointing_enable()
        m.train()
        m(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_multiple_adapters_switch_and_merge(tmp_path):
    hf = llama_model()
    ids = random_ids(1, 12)
    cfg = AdapterConfig("pf-lora", rank=4, alpha=12)
    m = FusedLlama.from_pretrained(hf, adapter=cfg)
    randomize_adapter(m, seed=1)
    m.save_adapter(str(tmp_path / "a1"))
    randomize_adapter(m, seed=2)
    m.save_adapter(str(tmp_path / "a2"))
    m2 = FusedLlama.from_pretrained(hf)  # adapter-less model gains the structure on first load
    m2.load_adapter(str(tmp_path / "a1"), "one")
    m2.load_adapter(str(tmp_path / "a2"), "two")
    with torch.no_grad():
        two = m2(ids).logits
        assert torch.equal(two, m(ids).logits)
        m2.set_adapter("one")
        one = m2(ids).logits
        assert rel_err(one, two) > 1e-3
        m2.set_adapter("two")
        assert torch.equal(m2(ids).logits, two)
        with m2.disable_adapter():
            assert rel_err(m2(ids).logits, hf(ids).logits) <= 1e-5
    # switching copies adapter tensors only: base storage is untouched
    base_ptr = m2.layers[0].attn.base_weight("q").data_ptr()
    m2.set_adapter("one")
    assert m2.layers[0].attn.base_weight("q").data_ptr() == base_ptr
    assert m2.adapter_names == ["one", "two"]
    with pytest.raises(KeyError, match="no adapter named 'three'"):
        m2.set_adapter("three")
    other = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffba", rank=4, alpha=4))
    other.save_adapter(str(tmp_path / "ffba"))
    with pytest.raises(ValueError, match="same variant, rank"):
        m2.load_adapter(str(tmp_path / "ffba"), "three")
    # merge: lora / pf-lora only
    m2.merge_into_base()
    with torch.no_grad():
        assert rel_err(m2(ids).logits, one) <= 1e-5
    with pytest.raises(ValueError, match="cannot be merged"):
        other.merge_into_base()
    # the base model is gone: disabling the adapter would still run W + s B A
    with pytest.raises(ValueError, match="disable_adapter: an adapter was merged"):
        with m2.disable_adapter():
            pass


@pytest.mark.parametrize("variant", ["ffba", "zflora"])
def test_switched_adapter_keeps_its_own_alpha_and_dropout(variant, tmp_path):
    """Adapters share a model when their structure matches; the scale and the
    dropout are each adapter's own (one with alpha 32 after one with alpha 4
    gives what it gives alone), folded or not, and a save keeps them."""
    hf, ids = llama_model(), random_ids(2, 12)
    small = FusedLlama.from_pretrained(hf, adapter=AdapterConfig(variant, rank=4, alpha=4))
    randomize_adapter(small, seed=3)
    small.save_adapter(str(tmp_path / "a4"))
    big = FusedLlama.from_pretrained(hf, adapter=AdapterConfig(variant, rank=4, alpha=32, dropout=0.25))
    big._load_adapter_tensors(small.adapter_state_dict())
    big.save_adapter(str(tmp_path / "a32"))
    alone = FusedLlama.from_pretrained(hf, adapter=str(tmp_path / "a32")).eval()
    both = FusedLlama.from_pretrained(hf, adapter=str(tmp_path / "a4")).eval()
    both.load_adapter(str(tmp_path / "a32"), "big")
    with torch.no_grad():
        assert torch.equal(both(ids).logits, alone(ids).logits)
        both.fold(), alone.fold(), small.eval().fold()  # folded: the scale lives in the B slots
        want = alone(ids).logits
        assert torch.equal(both(ids).logits, want)
        both.set_adapter("default")
        assert torch.equal(both(ids).logits, small(ids).logits)
        both.set_adapter("big")
        assert torch.equal(both(ids).logits, want)
    assert both.adapter_config.alpha == 32 and both.layers[0].attn.dropout.p == 0.25
    both.save_adapter(str(tmp_path / "again"))
    assert FusedLlama.from_pretrained(hf, adapter=str(tmp_path / "again")).adapter_config.alpha == 32


def test_hub_id_is_not_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="no network access is attempted"):
        FusedLlama.from_pretrained("meta-llama/Llama-3.2-1B")
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expects a checkpoint directory"):
        FusedLlama.from_pretrained(str(f))
    with pytest.raises(TypeError):
        FusedLlama.from_pretrained(42)


def test_non_llama_in_memory():
    from transformers import MistralConfig, MistralForCausalLM

    mis = MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=64, vocab_size=100))
    with pytest.raises(CheckpointError, match="model_type is 'mistral'"):
        FusedLlama.from_pretrained(mis)


def test_from_pretrained_dtype_and_memory(tmp_path):
    hf = llama_model(tied=True)
    path = save_model(hf, str(tmp_path / "m"))
    m = FusedLlama.from_pretrained(path, dtype=torch.bfloat16,
                                   adapter=AdapterConfig("ffba", rank=4, alpha=4), adapter_dtype=torch.float32)
    assert m.dtype == torch.bfloat16
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    # tied head: the embedding is the head's weight, stored once
    assert m.embed.data_ptr() == m.head.weight.data_ptr()
    # the in-memory source is never aliased (merge writes in place)
    m2 = FusedLlama.from_pretrained(hf)
    assert all(t.data_ptr() != hf.model.embed_tokens.weight.data_ptr() for t in m2.base_state_dict().values())
    assert not os.path.exists(os.path.join(path, "adapter_config.json"))


@pytest.mark.parametrize("tied", [True, False])
def test_to_keeps_tied_head_and_fp32_rope(tied, tmp_path):
    """.to() converts buffers one by one: the tied embedding must stay the head's
    weight (stored once, as users expect of ``.cuda()`` / ``.half()``) and RoPE's
    frequencies fp32, so a cast model computes exactly what one loaded in that dtype does."""
    path = save_model(llama_model(tied=tied, rope_scaling=True), str(tmp_path / "m"))
    m = FusedLlama.from_pretrained(path, adapter=AdapterConfig("zflora", rank=4, alpha=8))
    randomize_adapter(m)
    m.save_adapter(str(tmp_path / "a"))
    assert m.to(torch.bfloat16) is m
    ref = FusedLlama.from_pretrained(path, dtype=torch.bfloat16, adapter=str(tmp_path / "a"))
    assert m.inv_freq.dtype == torch.float32
    shared = m.embed.untyped_storage().data_ptr() == m.head.weight.untyped_storage().data_ptr()
    assert shared == tied
    assert torch.equal(m.embed, ref.embed)
    ids = random_ids(2, 40)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)
        m.half()  # and another cast after that
        assert m.embed.dtype == torch.float16 and m.inv_freq.dtype == torch.float32
        assert (m.embed.untyped_storage().data_ptr() == m.head.weight.untyped_storage().data_ptr()) == tied
        assert torch.isfinite(m(ids).logits).all()


def test_from_pretrained_converts_tensor_by_tensor():
    """A dtype (or device) change converts each source tensor when the model reads
    it, and the converted copy of a projection is gone once its fused storage holds
    it: at most one group's weights (q, k, v) exist converted at any time, never
    the whole model beside its fused storage."""
    import weakref

    hf = llama_model(tied=False)
    vocab = hf.config.vocab_size
    live, most = [], [0]
    real_to = torch.Tensor.to

    def spy(t, *a, **kw):
        out = real_to(t, *a, **kw)
        if out is not t and out.dim() == 2 and vocab not in out.shape:  # a projection's weight
            live.append(weakref.ref(out))
            most[0] = max(most[0], sum(r() is not None for r in live))
        return out

    torch.Tensor.to = spy
    try:
        FusedLlama.from_pretrained(hf, dtype=torch.float64)
    finally:
        torch.Tensor.to = real_to
    assert len(live) == 7 * hf.config.num_hidden_layers  # every projection converted once
    assert most[0] <= 3


def test_load_memory_bench_runs():
    """bench/load_memory.py prints a row per target dtype (the figures are for bench/RESULTS.md)."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "bench", "load_memory.py")
    out = subprocess.run([sys.executable, script, "--shape", "tiny", "--dtypes", "float32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[2].strip() for r in rows] == ["bf16 -> float32"]
    assert all(r.rstrip(" |").endswith("x") for r in rows)


def test_from_pretrained_returns_eval_mode_as_transformers(tmp_path):
    """from_pretrained returned the model in train mode (transformers' returns eval mode): an
    adapter with dropout then perturbed model(ids).logits at random, silently wrong scores.
    Adding, loading or switching adapters keeps the mode either way; built directly, the
    model is in train mode (an nn.Module's default, as LlamaForCausalLM(config)); train()
    brings back dropout and the loss alone, as the README's example trains."""
    from flora.checkpoint import state_dict_from_hf_model

    hf, ids = llama_model(), random_ids(2, 12)
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffba", rank=4, dropout=0.3))
    randomize_adapter(m)
    m.save_adapter(str(tmp_path / "a"))
    assert not any(mod.training for mod in m.modules())
    with torch.no_grad():
        want = m(ids).logits
        assert torch.equal(m(ids).logits, want)
    for mode in (False, True):
        b = FusedLlama.from_pretrained(hf).train(mode)
        b.add_adapter("x", AdapterConfig("ffba", rank=4, dropout=0.1))  # the structure is built anew
        b.load_adapter(str(tmp_path / "a"), "a")
        b.set_adapter("x")
        assert all(mod.training == mode for mod in b.modules())
    assert FusedLlama(*state_dict_from_hf_model(hf)).training
    m.train()
    assert m(ids, labels=ids).logits is None
    with torch.no_grad():
        assert not torch.equal(m(ids).logits, want)  # dropout acts


def test_trainer_drives_fused_llama(tmp_path):
    """A few steps of transformers.Trainer on the adapter parameters only."""
    from transformers import Trainer, TrainingArguments

    hf = llama_model()
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffba", rank=4, alpha=8))
    ids = random_ids(8, 12, seed=3)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids[i]}
            for i in range(8)]
    base = {k: v.clone() for k, v in m.base_state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    before = m.adapter_state_dict()
    before = {k: v.clone() for k, v in before.items()}
    modes = []  # Trainer puts the loaded (eval-mode) model in train mode itself
    m.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    Trainer(model=m, args=args, train_dataset=data).train()
    assert modes and all(modes)
    after = m.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for k, v in m.base_state_dict().items():
        assert torch.equal(v, base[k]), k


def test_inputs_past_the_context_or_mismatched_labels_are_refused(tmp_path):
    """A sequence longer than max_position_embeddings (256 here) and labels
    not of input_ids' shape: a ValueError naming both, never a loss or logits
    computed from them (in training, where the chunked loss runs, too)."""
    m = FusedLlama.from_pretrained(save_model(llama_model(), tmp_path / "m"))
    ids = random_ids(2, 8)
    for train in (False, True):
        m.train(train)
        for bad in (ids[:, :3], ids[:1], ids.reshape(4, 4)):
            with pytest.raises(ValueError, match=r"labels shape \[.*\] != input_ids shape \[2, 8\]"):
                m(ids, labels=bad)
        with pytest.raises(ValueError, match="257 tokens exceeds the model's context \\(256 positions\\)"):
            m(random_ids(1, 257))
    m.eval()
    assert m(random_ids(1, 256)).logits.shape == (1, 256, m.arch.vocab_size)  # the whole context is fine


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    """An id >= vocab or < 0: a ValueError naming the range, from forward and
    generate (not the embedding's IndexError, or on a GPU a device assert)."""
    m = FusedLlama.from_pretrained(save_model(llama_model(), tmp_path / "m"))
    V = m.arch.vocab_size
    for bad in (V, -1):
        ids = random_ids(1, 6)
        ids[0, 2] = bad
        with pytest.raises(ValueError, match=rf"token ids must be in \[0, {V}\)"):
            m(ids)
        with pytest.raises(ValueError, match=rf"token ids must be in \[0, {V}\)"):
            m.generate(ids, max_new_tokens=2)


def test_empty_or_non_integer_inputs_are_refused_by_name(tmp_path):
    m = FusedLlama.from_pretrained(save_model(llama_model(), tmp_path / "m"))
    ids = random_ids(2, 6)
    for empty in (ids[:0], ids[:, :0]):
        with pytest.raises(ValueError, match="batch, seq >= 1"):
            m(empty)
        with pytest.raises(ValueError, match="batch, seq >= 1"):
            m.generate(empty, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be integer token ids, got dtype torch.float32"):
        m(ids.float())
    with pytest.raises(ValueError, match="input_ids must be integer token ids, got dtype torch.bool"):
        m.generate(ids.bool(), max_new_tokens=2)
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        m(ids, labels=ids.float())
    with pytest.raises(ValueError, match="give seed or generator, not both"):
        m.generate(ids, max_new_tokens=2, temperature=1.0, seed=1, generator=torch.Generator())
    m(ids.int(), labels=ids.int())  # int32 ids and labels are ids too


@pytest.mark.parametrize("variant", ["ffba", "pf-lora", "zflora"])
def test_load_state_dict_into_a_folded_model(variant):
    """model.load_state_dict() on a folded model folds the loaded adapter again (the
    fused storage's folded slots held the old adapter: silently wrong logits)."""
    hf, ids, cfg = llama_model(), random_ids(2, 12), AdapterConfig(variant, rank=4, alpha=8)
    src = FusedLlama.from_pretrained(hf, adapter=cfg).eval()
    randomize_adapter(src, seed=3)
    dst = FusedLlama.from_pretrained(hf, adapter=cfg).eval()
    dst.fold()
    dst.load_state_dict(src.state_dict())
    assert dst.folded
    with torch.no_grad():
        assert rel_err(dst(ids).logits, src(ids).logits) <= 1e-5


@pytest.mark.parametrize("variant", ["ffba", "pf-lora", "zflora", "lora"])
def test_in_place_writes_to_a_folded_adapter_are_folded_again(variant):
    """Writes into the adapter Parameters of a folded model (an optimizer step, a copy_
    under no_grad) reach forward and generate: the folded copies were stale, so the model
    silently ran the old adapter. Reference: the same adapter in a model never folded."""
    hf, ids, cfg = llama_model(), random_ids(2, 12), AdapterConfig(variant, rank=4, alpha=8)
    ref = FusedLlama.from_pretrained(hf, adapter=cfg).eval()
    m = FusedLlama.from_pretrained(hf, adapter=cfg).eval()
    randomize_adapter(m, seed=5)
    m.fold()
    randomize_adapter(m, seed=6)  # in place, while folded
    randomize_adapter(ref, seed=6)
    with torch.no_grad():
        assert m.folded
        assert rel_err(m(ids).logits, ref(ids).logits) <= 1e-5
        p = next(p for p in m.parameters() if p.requires_grad)
        p.mul_(3.0)  # one tensor of one module, then generate on the folded model
        next(p for p in ref.parameters() if p.requires_grad).mul_(3.0)
        out = m.generate(ids, max_new_tokens=6, eos_token_id=[])
        assert torch.equal(out, ref.generate(ids, max_new_tokens=6, eos_token_id=[]))
        assert rel_err(m(ids).logits, ref(ids).logits) <= 1e-5


def test_state_dict_holds_only_the_adapter():
    """state_dict() is the adapter alone (the class says so): the fused storage's base
    weights were in it, so a merged model's state dict loaded into a fresh model
    applied the adapter twice (W + s B A from the storage, + the live adapter)."""
    hf, ids, cfg = llama_model(), random_ids(2, 12), AdapterConfig("lora", rank=4, alpha=8)
    src = FusedLlama.from_pretrained(hf, adapter=cfg).eval()
    randomize_adapter(src, seed=4)
    assert set(src.state_dict()) == set(src.adapter_state_dict())
    src.merge_into_base()
    dst = FusedLlama.from_pretrained(hf, adapter=cfg).eval()
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        assert rel_err(dst(ids).logits, src(ids).logits) <= 1e-5


@pytest.mark.parametrize("variant", ["ffba", "pf-lora"])
def test_training_a_folded_model_is_refused_by_name(variant):
    """A folded model's forward reads the storage's folded copies, which carry no
    gradient: backward failed with "element 0 of tensors does not require grad"."""
    m = FusedLlama.from_pretrained(llama_model(), adapter=AdapterConfig(variant, rank=4, alpha=8)).train()
    ids = random_ids(2, 12)
    m.fold()
    with pytest.raises(ValueError, match=r"folded.*unfold\(\) before training"):
        m(ids, labels=ids)
    with torch.no_grad():
        m(ids, labels=ids)  # inference stays open
    m.unfold()
    m(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_reloading_the_active_adapter_without_activating_keeps_the_new_tensors(tmp_path):
    """load_adapter(path, <the active name>, activate=False) replaced the registry's copy
    only: the next set_adapter stored the modules' old tensors over the loaded ones."""
    hf, ids, cfg = llama_model(), random_ids(1, 12), AdapterConfig("ffba", rank=4, alpha=8)
    m = FusedLlama.from_pretrained(hf, adapter=cfg).eval()
    randomize_adapter(m, seed=1)
    m.save_adapter(str(tmp_path / "a1"))
    randomize_adapter(m, seed=2)
    m.save_adapter(str(tmp_path / "a2"))
    with torch.no_grad():
        two = m(ids).logits
    m2 = FusedLlama.from_pretrained(hf, adapter=str(tmp_path / "a1")).eval()
    m2.load_adapter(str(tmp_path / "a1"), "other", activate=False)
    m2.load_adapter(str(tmp_path / "a2"), "default", activate=False)
    assert m2.active_adapter == "default"
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, two)
        m2.set_adapter("other")
        m2.set_adapter("default")
        assert torch.equal(m2(ids).logits, two)


def test_position_ids_of_one_row_serve_the_batch():
    """position_ids [1, T] (transformers' own form) or [T] apply to every row; they failed
    deep in RoPE ("flora.rope: expected x [B, T, heads, head_dim] ...")."""
    hf, ids = llama_model(), random_ids(2, 12)
    m = FusedLlama.from_pretrained(hf).eval()
    pos = torch.arange(3, 15)
    with torch.no_grad():
        ref = hf(ids, position_ids=pos.expand(2, 12)).logits
        for p in (pos, pos[None], pos.expand(2, 12)):
            assert rel_err(m(ids, position_ids=p).logits, ref) <= 1e-5
        with pytest.raises(ValueError, match=r"position_ids shape \[3, 12\] does not fit"):
            m(ids, position_ids=pos.expand(3, 12))


def test_a_failed_conversion_keeps_the_tied_embedding():
    """A .to() / .cuda() that fails (no CUDA, out of memory) left a tied model without
    its embedding: every later call failed with "'FusedLlama' object has no attribute 'device'"."""
    hf, ids = llama_model(tied=True), random_ids(2, 12)
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffba", rank=4, alpha=8)).eval()

    def fail(t):
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        m._apply(fail)  # what .to() / .cuda() call
    assert m.embed is not None and m.device.type == "cpu"
    with torch.no_grad():
        assert rel_err(m(ids).logits, hf(ids).logits) <= 1e-5


def test_adapter_names_must_be_strings(tmp_path):
    """load_adapter(path, None) stored an adapter that set_adapter made active as None (no
    adapter: its trained tensors were dropped on the next switch), and adapter_names
    then failed sorting None among the strings."""
    m = FusedLlama.from_pretrained(llama_model(), adapter=AdapterConfig("ffba", rank=4, alpha=8))
    m.save_adapter(str(tmp_path / "a"))
    for name in (None, 3, ""):
        with pytest.raises(TypeError, match="name must be a non-empty string"):
            m.load_adapter(str(tmp_path / "a"), name)
    assert m.adapter_names == ["default"] and m.active_adapter == "default"


@pytest.mark.parametrize("variant", VARIANTS)
def test_add_adapter_is_a_fresh_one_beside_the_trained(variant):
    """add_adapter: a second task's adapter on the same loaded base, initialised as
    from_pretrained(adapter=config) initialises one (zero where it is zero, A drawn
    where it is drawn: at init the model computes the base), the first one kept."""
    hf = llama_model(tied=variant.startswith("zflora"))
    ids = random_ids(2, 10)
    cfg = AdapterConfig(variant, rank=4)
    m = FusedLlama.from_pretrained(hf, adapter=cfg)
    fresh = m.adapter_state_dict()
    randomize_adapter(m)
    with torch.no_grad():
        trained = m(ids).logits
    m.add_adapter("second", cfg)
    assert m.active_adapter == "second" and m.adapter_names == ["default", "second"]
    new = m.adapter_state_dict()
    assert new.keys() == fresh.keys()
    for k, t in new.items():
        assert t.shape == fresh[k].shape and t.dtype == fresh[k].dtype
        assert bool((t == 0).all()) == bool((fresh[k] == 0).all()), k  # same init, tensor by tensor
    with torch.no_grad():
        assert rel_err(m(ids).logits, hf(ids).logits) <= 1e-5
        m.set_adapter("default")
        assert torch.equal(m(ids).logits, trained)
    with pytest.raises(ValueError, match="is loaded already"):
        m.add_adapter("second", cfg)
    with pytest.raises(ValueError, match="does not have the structure"):
        m.add_adapter("third", AdapterConfig(variant, rank=8))
    with pytest.raises(TypeError, match="must be an AdapterConfig"):
        m.add_adapter("third", "ffba")


@pytest.mark.parametrize("how", ["add", "load"])
def test_an_adapter_not_activated_leaves_a_base_model_the_base(how, tmp_path):
    """A base model gaining the adapter structure from add_adapter / load_adapter with
    activate=False stays the base model (no nameless adapter live and training) until
    set_adapter makes the named one current."""
    hf = llama_model()
    ids = random_ids(1, 8)
    src = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffba", rank=4))
    randomize_adapter(src)
    src.save_adapter(tmp_path / "a")
    with torch.no_grad():
        adapted = src(ids).logits
    m = FusedLlama.from_pretrained(hf)
    if how == "add":
        m.add_adapter("x", AdapterConfig("ffba", rank=4), activate=False)
    else:
        m.load_adapter(str(tmp_path / "a"), "x", activate=False)
    assert m.active_adapter is None and not m.adapter_active()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, FusedLlama.from_pretrained(hf)(ids).logits)
        m.set_adapter("x")
        assert m.adapter_active()
        if how == "load":
            assert torch.equal(m(ids).logits, adapted)


def test_add_adapter_to_a_base_model_and_delete_adapter():
    hf = llama_model()
    ids = random_ids(1, 8)
    m = FusedLlama.from_pretrained(hf)
    m.add_adapter("task", AdapterConfig("ffba", rank=4), activate=False)
    m.add_adapter("other", AdapterConfig("ffba", rank=4))
    params = [p for p in m.parameters() if p.requires_grad]
    assert params and m.active_adapter == "other"
    m(ids, labels=ids).loss.backward()  # trainable
    assert all(p.grad is not None for p in params)
    with pytest.raises(ValueError, match="is the active adapter"):
        m.delete_adapter("other")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        m.delete_adapter("nope")
    m.delete_adapter("task")
    assert m.adapter_names == ["other"]
    with pytest.raises(KeyError):
        m.set_adapter("task")


def test_set_adapter_none_switches_the_adapter_off_so_it_can_be_deleted():
    """set_adapter(None): the structure stays, the model computes the base (what flora
    serve does before unloading the adapter the modules hold)."""
    hf = llama_model()
    ids = random_ids(1, 8)
    m = FusedLlama.from_pretrained(hf).eval()
    m.add_adapter("task", AdapterConfig("ffba", rank=4), activate=False)
    m.add_adapter("other", AdapterConfig("ffba", rank=4))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # B is zero at init: the adapter would change nothing
        adapted = m(ids).logits
        with m.disable_adapter():
            base = m(ids).logits
        assert not torch.equal(adapted, base)
        m.set_adapter(None)
        assert m.active_adapter is None and m.adapter_config is not None
        assert torch.equal(m(ids).logits, base)
        m.delete_adapter("other")
        assert m.adapter_names == ["task"]
        m.set_adapter("task")  # and back to one
        assert m.active_adapter == "task"


def test_setting_the_current_adapter_again_keeps_what_training_did(tmp_path):
    """set_adapter(<the current name>) copied the registry's copy (as added or loaded) over
    the modules' trained tensors: a training run's progress silently undone. Loading over the
    current name still replaces its tensors."""
    hf, ids = llama_model(), random_ids(2, 10)
    m = FusedLlama.from_pretrained(hf)
    m.add_adapter("task", AdapterConfig("ffba", rank=4))
    randomize_adapter(m)  # what training does to it
    with torch.no_grad():
        trained = m(ids).logits
        m.set_adapter("task")
        assert torch.equal(m(ids).logits, trained)
    m.save_adapter(str(tmp_path / "trained"))
    m.add_adapter("other", AdapterConfig("ffba", rank=4))
    m.load_adapter(str(tmp_path / "trained"), "other", activate=False)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, trained)


def test_disable_adapter_holds_whatever_the_block_loads_or_switches(tmp_path):
    """Inside disable_adapter() the model computes the base: set_adapter, load_adapter,
    add_adapter and stack / unstack_adapters in the block turned an adapter back on (and
    modules rebuilt there were on), so the block silently ran an adapter. Nested blocks
    and the adapter after the block are as before."""
    hf, ids = llama_model(), random_ids(2, 10)
    src = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("ffba", rank=4))
    randomize_adapter(src)
    src.save_adapter(str(tmp_path / "a"))
    with torch.no_grad():
        base, adapted = FusedLlama.from_pretrained(hf)(ids).logits, src(ids).logits
        m = FusedLlama.from_pretrained(hf)
        with m.disable_adapter():
            m.load_adapter(str(tmp_path / "a"), "a")  # the structure built in the block
            assert torch.equal(m(ids).logits, base)
            m.add_adapter("b", AdapterConfig("ffba", rank=4, alpha=2))
            m.set_adapter("a")
            with m.disable_adapter():
                assert torch.equal(m(ids).logits, base)
            assert torch.equal(m(ids).logits, base)
            m.stack_adapters(["b", "a"])
            assert torch.equal(m(ids, adapters=["a", "b"]).logits, base)
            m.unstack_adapters()
            assert torch.equal(m(ids).logits, base) and not m.adapter_active()
        assert torch.equal(m(ids).logits, adapted) and m.adapter_active()


def test_a_model_built_directly_holds_its_adapter_as_from_pretrained_does(tmp_path):
    """FusedLlama(arch, sd, config) computed with an adapter no name held (active_adapter
    None): switching to another adapter stored nothing, so the first one's trained tensors
    were silently lost, and save_adapter took it for the structure with none current. It is
    "default", current, as from_pretrained(adapter=config) makes it."""
    from flora.checkpoint import state_dict_from_hf_model

    hf, ids = llama_model(), random_ids(2, 10)
    m = FusedLlama(*state_dict_from_hf_model(hf), AdapterConfig("ffba", rank=4)).eval()
    assert m.active_adapter == "default" and m.adapter_names == ["default"]
    randomize_adapter(m)
    with torch.no_grad():
        trained = m(ids).logits
        m.add_adapter("b", AdapterConfig("ffba", rank=4))
        m.set_adapter("default")
        assert torch.equal(m(ids).logits, trained)
    m.save_adapter(str(tmp_path / "a"))


def test_with_no_adapter_current_there_is_none_to_save_export_or_merge(tmp_path):
    """A base model given adapters without activating them holds the structure's fresh
    tensors, none of the named adapters: save_adapter and export_peft wrote those (an
    untrained adapter under the loaded one's config) and merge_into_base merged them,
    leaving a model that could no longer switch. Each now names the problem;
    merged_state_dict is the base weights, which the model computes."""
    hf, ids = llama_model(), random_ids(2, 10)
    src = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("lora", rank=4))
    randomize_adapter(src)
    src.save_adapter(str(tmp_path / "a"))
    m = FusedLlama.from_pretrained(hf)
    m.load_adapter(str(tmp_path / "a"), "x", activate=False)
    for call in (lambda: m.save_adapter(str(tmp_path / "s")), lambda: m.export_peft(str(tmp_path / "p")),
                 m.merge_into_base):
        with pytest.raises(ValueError, match=r"no adapter is current \(loaded: \['x'\]\); set_adapter"):
            call()
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists() and not m.merged
    base = FusedLlama.from_pretrained(hf).base_state_dict()
    assert all(torch.equal(t, base[k]) for k, t in m.merged_state_dict().items())
    m.set_adapter("x")
    m.save_adapter(str(tmp_path / "s"))
    with torch.no_grad():
        assert torch.equal(FusedLlama.from_pretrained(hf, adapter=str(tmp_path / "s"))(ids).logits, src(ids).logits)


def test_after_a_merge_no_adapter_is_loaded_switched_or_stacked(tmp_path):
    """load_adapter / add_adapter into a merged model registered the adapter, then failed
    switching to it: the error said the model was unchanged, the adapter list said not.
    Each call is refused by name before anything changes."""
    hf = llama_model()
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("lora", rank=4))
    m.save_adapter(str(tmp_path / "a"))
    m.merge_into_base()
    for what, call in (("load_adapter", lambda: m.load_adapter(str(tmp_path / "a"), "b", activate=False)),
                       ("add_adapter", lambda: m.add_adapter("c", AdapterConfig("lora", rank=4))),
                       ("set_adapter", lambda: m.set_adapter("default")),
                       ("stack_adapters", lambda: m.stack_adapters(["default"]))):
        with pytest.raises(ValueError, match=f"{what}: an adapter was merged into the base weights"):
            call()
    assert m.adapter_names == ["default"] and m.active_adapter == "default" and m.merged


def test_merging_inside_disable_adapter_is_refused(tmp_path):
    """merge_into_base inside disable_adapter() wrote W + s B A into the base weights, so the
    rest of the block, meant to run the base, silently ran the adapter."""
    hf, ids = llama_model(), random_ids(2, 10)
    m = FusedLlama.from_pretrained(hf, adapter=AdapterConfig("lora", rank=4))
    randomize_adapter(m)
    with m.disable_adapter():
        with pytest.raises(ValueError, match=r"merge_into_base: inside disable_adapter\(\)"):
            m.merge_into_base()
        with torch.no_grad():
            assert rel_err(m(ids).logits, hf(ids).logits) <= 1e-5
    assert not m.merged


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python example, up to its PEFT part, on a tiny checkpoint: its training
    lines train (train mode, the loss alone; from_pretrained returns eval mode), and each
    later call works in the order it is written (it stacked an adapter it had deleted)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Python\n\n```python\n(.*?)```", text, re.S).group(1)
    code = code.split("# PEFT LoRA adapters")[0].replace("path/to/llama", str(tmp_path / "llama"))
    save_model(llama_model(), str(tmp_path / "llama"))
    monkeypatch.chdir(tmp_path)
    other = FusedLlama.from_pretrained(str(tmp_path / "llama"), adapter=AdapterConfig("ffba", rank=32))
    other.save_adapter("out/other-adapter")  # the example's second adapter
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: calls.append((mod.training, out.logits is None)) if isinstance(mod, FusedLlama) else None)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        hook.remove()
    assert calls[0] == (True, True)
