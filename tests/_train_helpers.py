"""Tiny checkpoints and data for the training tests (also run by the DDP worker)."""
from __future__ import annotations

import torch

from flora import synthetic as syn


def tiny_checkpoint(path, seed=0, tied=False):
    """A random small Llama with the synthetic tokenizer, saved like a HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(syn.VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init, so a frozen head can express confident predictions
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if ("embed" in name or "lm_head" in name) else 0.1)
    m.save_pretrained(str(path))
    syn.build_tokenizer(path)
    return path


def records(task="between", n=64, seed=0, split="train"):
    return syn.finetune_data(task, n, seed=seed, split=split)


# A chat template over the synthetic vocabulary: a role's initial, its content, "</s>" (EOS)
# ending each turn; the generation prompt is the assistant's "a :".
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}a : {% endif %}")


def served_checkpoint(d):
    """(checkpoint with CHAT_TEMPLATE, a saved ffba adapter with random tensors) under
    ``d``: what the server tests serve."""
    from flora import AdapterConfig, FusedLlama
    from flora.bench.latency import randomize_adapter

    ckpt = with_chat_template(tiny_checkpoint(d / "plain-ckpt", seed=5), d / "ckpt")
    m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("ffba", 4, 8))
    randomize_adapter(m, seed=0)
    m.save_adapter(d / "ffba")
    return ckpt, d / "ffba"


def with_chat_template(ckpt, dest):
    """A copy of checkpoint ``ckpt`` at ``dest`` whose tokenizer has CHAT_TEMPLATE."""
    import shutil

    from flora.data import load_tokenizer

    shutil.copytree(ckpt, dest)
    tok = load_tokenizer(dest)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(dest))
    return dest

