"""Generation smoke test for a device: the same greedy tokens eager, under
CUDA graphs and from transformers, on a random-weight or a real Llama.

    python bench/generate_smoke.py --device cuda [--json out.json]
    python bench/generate_smoke.py --device cuda --gguf model.gguf [--dtype bf16]

Random (default): a small random LlamaForCausalLM (transformers' LlamaConfig;
4 layers, 512 wide, GQA 8/2, llama3 RoPE) on a left-padded batch of random
ids, in fp32 and bf16. Real (--gguf): a Llama GGUF file read by flora.gguf
(any layer count, e.g. a truncated SmolLM2); transformers' LlamaForCausalLM
(config from flora's HFConfigView of the file's arch) and FusedLlama get the
same dequantized weights in --dtype (default bf16 on cuda, fp32 on cpu), and
PROMPTS go through the file's tokenizer and chat template, left-padded.

Either way --tokens greedy tokens (EOS off) come from transformers, flora
eager and flora with a CUDA graph (cuda only), for the base model and for
ffba and zflora adapters (random, non-zero; eager vs graph; zflora also as two
adapters side by side, each row routed to its own, stack_adapters). fp32 must agree
token for token everywhere; in bf16 eager and graph must agree (same
kernels), and against transformers the first divergence, if any, is
reported with the logit gap of the two candidates there (bf16 rounding
ties). Exit status 1 on a required mismatch; the JSON holds the mode
("random", or "real": file name, layers, sha256 of its first MiB) and every
comparison.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import torch

PROMPTS = ("What is the capital of France?", "Give me three tips for sleeping better.",
           "Write a haiku about the sea.")


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


def real_llama(path):
    """A Llama GGUF file as (fp32 LlamaForCausalLM, tokenizer, JSON record)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        sys.exit(f"generate_smoke: --gguf needs the 'gguf' Python package (pip install gguf): {path}")
    from transformers import LlamaConfig, LlamaForCausalLM

    from flora.gguf import load_gguf
    from flora.hf_compat import HFConfigView
    from flora.pretrained import load_tokenizer

    try:
        from transformers.initialization import no_init_weights  # the weights are loaded next
    except ImportError:
        from contextlib import nullcontext as no_init_weights

    arch, sd = load_gguf(path)  # flora's reader; both models get these weights
    with no_init_weights():
        hf = LlamaForCausalLM(LlamaConfig(**HFConfigView(arch).to_dict())).eval()
    missing = set(hf.load_state_dict(sd, strict=False).missing_keys) - {"lm_head.weight"}
    hf.tie_weights()  # no_init_weights skipped the tying
    if missing or not torch.equal(hf.lm_head.weight, sd.get("lm_head.weight", sd["model.embed_tokens.weight"])):
        sys.exit(f"generate_smoke: {path}: transformers' model did not take all the weights ({missing})")
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    info = dict(mode="real", real=os.path.basename(path), layers=arch.num_hidden_layers, sha256_first_mib=head)
    return hf, load_tokenizer(path), info


def chat_batch(tok, pad, device):
    """PROMPTS through the chat template, left-padded into one batch + mask."""
    from flora.generation import left_pad
    from flora.pretrained import chat_ids

    ids, mask = left_pad([chat_ids(tok, q)[0] for q in PROMPTS], pad)
    return ids.to(device), mask.to(device)


def mixed_case(m, ids, kw, name, record):
    """Two adapters side by side (stack_adapters), each row its own or none:
    the routed batch under a CUDA graph == eager."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        m.save_adapter(d)
        m.load_adapter(d, "second", activate=False)
    with torch.no_grad():  # the current adapter other than the saved one
        for q in m.parameters():
            if q.requires_grad:
                q.mul_(-1.5)
    m.stack_adapters(["default", "second"])
    rows = (["second", None, "default"] * ids.shape[0])[:ids.shape[0]]
    e = m.generate(ids, use_cuda_graph=False, eos_token_id=[], adapters=rows, **kw)
    m.generate(ids, use_cuda_graph=True, eos_token_id=[], adapters=rows, **kw)  # capture
    gr = m.generate(ids, use_cuda_graph=True, eos_token_id=[], adapters=rows, **kw)
    record(f"{name} + second adapter, rows {rows}: graph == eager", True, torch.equal(gr, e))
    m.unstack_adapters()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--gguf", default=None, help="a real Llama GGUF file (default: a random Llama)")
    p.add_argument("--dtype", default=None,
                   help="default: fp32 and bf16 (random); bf16 on cuda, fp32 on cpu (--gguf)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from flora import AdapterConfig
    from flora.config import parse_dtype
    from flora.model import FusedLlama

    dev = torch.device(a.device)
    graphs = dev.type == "cuda"
    dtype = parse_dtype(a.dtype)
    if a.gguf:
        if not os.path.isfile(a.gguf):
            sys.exit(f"generate_smoke: --gguf {a.gguf}: file not found")
        hf32, tok, mode = real_llama(a.gguf)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids, mask = chat_batch(tok, pad, dev)
        dtypes = [dtype or (torch.bfloat16 if graphs else torch.float32)]
        make_hf = lambda dt: hf32.to(device=dev, dtype=dt)  # noqa: E731 (one dtype: converted in place)
    else:
        mode, pad = dict(mode="random", layers=4), 0
        ids, mask = prompt(dev)
        dtypes = [dtype] if dtype else [torch.float32, torch.bfloat16]
        make_hf = lambda dt: random_llama(dt).to(dev)  # noqa: E731
    results, ok = [], True
    kw = dict(max_new_tokens=a.tokens, attention_mask=mask, pad_token_id=pad)

    def record(case, required, equal, **extra):
        nonlocal ok
        ok &= equal or not required
        row = dict(case=case, equal=bool(equal), required=required, **extra)
        results.append(row)
        print(f"{'ok  ' if equal else ('FAIL' if required else 'diff')}  {case}"
              + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)
        if a.json:  # after every comparison: a later hang keeps what was seen
            from flora.fileio import atomic_write_json

            atomic_write_json(a.json, dict(device=str(dev), tokens=a.tokens, ok=ok, **mode, results=results))

    for dtype in dtypes:
        dn = str(dtype).replace("torch.", "")
        hf = make_hf(dtype)
        hf.generation_config.eos_token_id = None  # both run the full --tokens: no early stop
        t0 = time.perf_counter()
        ref = hf.generate(ids, do_sample=False, **kw)
        th = time.perf_counter() - t0
        for variant in (None, "ffba", "zflora") if graphs else (None,):  # adapters: eager vs graph only
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
            e = m.generate(ids, use_cuda_graph=False, eos_token_id=[], **kw)
            te = time.perf_counter() - t0
            if graphs:
                m.generate(ids, use_cuda_graph=True, eos_token_id=[], **kw)  # capture
                t0 = time.perf_counter()
                gr = m.generate(ids, use_cuda_graph=True, eos_token_id=[], **kw)
                tg = time.perf_counter() - t0
                record(f"{name}: graph == eager", True, torch.equal(gr, e),
                       eager_s=round(te, 3), graph_s=round(tg, 3))
            if graphs and variant == "zflora":
                mixed_case(m, ids, kw, name, record)
            if variant is None:
                pos = first_divergence(e, ref)
                extra = dict(eager_s=round(te, 3), transformers_s=round(th, 3))
                if pos is not None:
                    extra.update(first_divergence=pos - ids.shape[1],
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
