"""Tiny random Llama models for the FusedLlama / checkpoint / adapter tests.

Built with transformers itself (the independent reference), saved with
save_pretrained. Vocabulary 1003 is deliberately not a multiple of 64.
"""
from __future__ import annotations

import torch

VOCAB = 1003


def llama_config(hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=VOCAB, tied=False,
                 rope_scaling=False, **kw):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if rope_scaling:
        # short original context so the scaling bands fall inside head_dim's frequencies
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                       tie_word_embeddings=tied, rope_parameters=rope, rms_norm_eps=1e-5,
                       max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       attn_implementation="sdpa", **kw)


def llama_model(seed=0, dtype=torch.float32, **kw):
    """A random LlamaForCausalLM; norms perturbed so they are not all ones."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama_config(**kw)
    m = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0.0, 0.08)  # larger than init so the layers matter
    return m


def save_model(model, path, shard=None):
    kw = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(path, **kw)
    return path


def random_ids(batch, seq, seed=1, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)
