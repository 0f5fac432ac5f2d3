"""flora.patch: flora modules inside transformers' own LlamaForCausalLM."""
import copy

import pytest
import torch

import flora
from flora import AdapterConfig
from flora.model import FusedLlama
from flora.hf_patch import PATCHABLE, flora_modules
from llama_fixtures import llama_model, random_ids
from test_model import randomize_adapter, rel_err

VARIANTS = list(PATCHABLE) + ["ffba-mha", "lora-mha"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_patched_equals_fused_llama(tmp_path, variant):
    """Same adapter tensors: patched transformers model == FusedLlama (independent forward)."""
    fused = FusedLlama.from_pretrained(llama_model(), adapter=AdapterConfig(variant, rank=4, alpha=8))
    randomize_adapter(fused)
    fused.save_adapter(str(tmp_path / "ad"))
    base = llama_model()
    ids = random_ids(2, 12)
    with torch.no_grad():
        ref_base = base(ids).logits
    hf = flora.patch(base, str(tmp_path / "ad"))
    with torch.no_grad():
        out = hf(ids).logits
        assert rel_err(out, ref_base) > 1e-3
        # both against float64: flora's fp32 forward is as exact as transformers' own
        # (its one-pass norm and SiLU round differently from torch's composites by an ulp)
        exact = copy.deepcopy(fused).double()(ids).logits
        e_hf = rel_err(out.double(), exact)
        assert e_hf <= 1e-4 and rel_err(fused(ids).logits.double(), exact) <= 4 * e_hf + 1e-6
    # transformers' generate (DynamicCache) through the patched layers
    gen = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(gen, fused.generate(ids, max_new_tokens=6))
    # disabled adapter: exactly the base model
    for m in flora_modules(hf):
        m.set_adapter_enabled(False)
    with torch.no_grad():
        assert rel_err(hf(ids).logits, ref_base) <= 1e-5


def test_patch_fresh_is_base_and_trains():
    base = llama_model()
    ids = random_ids(2, 10)
    with torch.no_grad():
        ref = base(ids).logits
    hf = flora.patch(base, AdapterConfig("ffba", rank=4, alpha=8))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, ref) <= 1e-5
    trainable = [n for n, p in hf.named_parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[-1][:2] in ("A_", "B_", "C_") for n in trainable)
    hf.train()
    for _ in range(2):  # B starts at zero: A gets a gradient from step 2
        loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.no_grad():
            for p in hf.parameters():
                if p.requires_grad:
                    p -= 0.1 * p.grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hf.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", ["ffba-ab", "zflora", "zflora-minimal", "zflora-mha"])
def test_unpatchable_variants(variant):
    base = llama_model()
    with pytest.raises(ValueError, match="FusedLlama"):
        flora.patch(base, AdapterConfig(variant, rank=4, alpha=4))
    assert type(base.model.layers[0].self_attn).__name__ == "LlamaAttention"  # untouched


def test_patch_twice_and_wrong_model():
    hf = flora.patch(llama_model(), AdapterConfig("lora", rank=4, alpha=4))
    with pytest.raises(ValueError, match="already patched"):
        flora.patch(hf, AdapterConfig("lora", rank=4, alpha=4))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        flora.patch(torch.nn.Linear(2, 2), AdapterConfig("lora", rank=4, alpha=4))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_patched_generate_follows_the_cache_interface(tmp_path, cache):
    """Every decode step (not only the first token) through transformers' own
    generate and cache equals FusedLlama: the cache reaches the patched
    attention under the name and with the call the installed transformers uses."""
    fused = FusedLlama.from_pretrained(llama_model(), adapter=AdapterConfig("ffba", rank=4, alpha=8))
    randomize_adapter(fused)
    fused.save_adapter(str(tmp_path / "ad"))
    hf = flora.patch(llama_model(), str(tmp_path / "ad"))
    ids = random_ids(2, 9)
    gen = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                      cache_implementation=cache)
    assert torch.equal(gen, fused.generate(ids, max_new_tokens=8))


def test_patched_folded_modules_follow_in_place_writes():
    """A patched model whose flora modules the user folded, then wrote in place (an
    optimizer step): each layer folds again (stale folded copies gave the old adapter)."""
    cfg = AdapterConfig("ffba", rank=4, alpha=8)
    ids = random_ids(2, 12)
    hf = flora.patch(llama_model(), cfg)
    ref = flora.patch(llama_model(), cfg)
    for m in flora_modules(hf):
        m.fold()
    randomize_adapter(hf, seed=2)
    randomize_adapter(ref, seed=2)
    with torch.no_grad():
        assert all(m.folded for m in flora_modules(hf))
        assert rel_err(hf(ids).logits, ref(ids).logits) <= 1e-5
