"""Generation smoke test for a device: the same greedy tokens eager, under
CUDA graphs and from transformers, on a random-weight Llama.

    python bench/generate_smoke.py --device cuda [--json out.json]

A small random LlamaForCausalLM (transformers' LlamaConfig; 4 layers,
512 wide, GQA 8/2, llama3 RoPE) generates --tokens greedy tokens from a
left-padded batch: transformers, flora eager and flora with a CUDA graph
(cuda only), for the base model in fp32 and bf16, and for ffba and zflora
adapters (random, non-zero) eager vs graph. fp32 must agree token for token
everywhere; in bf16 eager and graph must agree (same kernels), and against
transformers the first divergence, if any, is reported with the logit gap
of the two candidates there (bf16 rounding ties). Exit status 1 on a
required mismatch; the JSON holds every comparison.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def random_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=1408, vocab_size=4096, tie_word_embeddings=True,
                      rope_parameters=rope, rms_norm_eps=1e-5, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)  # larger than init so the layers matter
    return m.to(dtype)


def prompt(device, batch=3, seq=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 4096, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def first_divergence(a, b):
    diff = (a != b).any(0).nonzero()
    return None if diff.numel() == 0 else int(diff[0])


def logit_gap(hf, seq, mask, pos, a, b):
    """|logit(a) - logit(b)| at generated position pos (per row, max)."""
    with torch.no_grad():
        logits = hf(seq[:, :pos], attention_mask=mask[:, :pos]).logits[:, -1].float()
    return float((logits.gather(1, a[:, pos:pos + 1]) - logits.gather(1, b[:, pos:pos + 1])).abs().max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from flora import AdapterConfig
    from flora.model import FusedLlama

    dev = torch.device(a.device)
    graphs = dev.type == "cuda"
    results, ok = [], True
    kw = dict(max_new_tokens=a.tokens)

    def record(case, required, equal, **extra):
        nonlocal ok
        ok &= equal or not required
        row = dict(case=case, equal=bool(equal), required=required, **extra)
        results.append(row)
        print(f"{'ok  ' if equal else ('FAIL' if required else 'diff')}  {case}"
              + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)
        if a.json:  # after every comparison: a later hang keeps what was seen
            from flora.fileio import atomic_write_json

            atomic_write_json(a.json, dict(device=str(dev), tokens=a.tokens, ok=ok, results=results))

    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).replace("torch.", "")
        hf = random_llama(dtype).to(dev)
        ids, mask = prompt(dev)
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
        for variant in (None, "ffba", "zflora"):
            cfg = None if variant is None else AdapterConfig(variant, rank=8, alpha=16)
            m = FusedLlama.from_pretrained(hf, adapter=cfg, device=dev, dtype=dtype)
            if cfg is not None:
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for q in m.parameters():
                        if q.requires_grad:
                            q.copy_(torch.randn(q.shape, generator=g) * 0.05)
            name = f"{dn} {variant or 'base'}"
            t0 = time.perf_counter()
            e = m.generate(ids, attention_mask=mask, use_cuda_graph=False, **kw)
            te = time.perf_counter() - t0
            if graphs:
                m.generate(ids, attention_mask=mask, use_cuda_graph=True, **kw)  # capture
                t0 = time.perf_counter()
                gr = m.generate(ids, attention_mask=mask, use_cuda_graph=True, **kw)
                tg = time.perf_counter() - t0
                record(f"{name}: graph == eager", True, torch.equal(gr, e),
                       eager_s=round(te, 3), graph_s=round(tg, 3))
            if variant is None:
                pos = first_divergence(e, ref)
                extra = {}
                if pos is not None:
                    extra = dict(first_divergence=pos - ids.shape[1],
                                 logit_gap=round(logit_gap(hf, e, torch.cat(
                                     [mask, torch.ones_like(e[:, ids.shape[1]:])], 1), pos, e, ref), 4))
                record(f"{name}: eager == transformers", dtype == torch.float32, pos is None, **extra)
            del m
        del hf
        if graphs:
            torch.cuda.empty_cache()
    print("generation smoke:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
