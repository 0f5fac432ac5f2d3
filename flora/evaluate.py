"""Evaluation: token-weighted eval loss and exact-match accuracy.

Exact match is computed teacher-forced in one forward pass: an example counts
as correct when the argmax prediction at every completion position (EOS
included) equals the reference token. For greedy decoding this is the same
event as "greedy generation from the prompt yields exactly the completion and
then stops": if every argmax along the gold prefix is right, greedy decoding
walks the gold path; at the first wrong argmax it leaves it.
"""
from __future__ import annotations

import contextlib

import torch

from .data import IGNORE_INDEX, TokenizedDataset, collate, pad_id_of
from .model import FusedLlama


def _batches(ds, batch_size, pad_id, indices):
    for i in range(0, len(indices), batch_size):
        yield collate([ds[j] for j in indices[i:i + batch_size]], pad_id)


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(vals, device):
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    if _dist()[1] > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _target_stats(model, batch, autocast):
    """(nll, hit) [B, T-1] of the targets labels[:, 1:]: FusedLlama's
    ``forward(target_stats=True)`` (no [tokens, vocab] logits held), or any
    causal LM's full logits."""
    with autocast():
        if isinstance(model, FusedLlama):  # through forward: FSDP's hooks gather the adapter
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], target_stats=True)
            return out.target_nll, out.target_hit
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tgt = batch["labels"][:, 1:]
    valid = tgt != IGNORE_INDEX
    logits = logits.float()[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt.clamp_min(0).reshape(-1), reduction="none").view_as(tgt)
    return nll * valid, (logits.argmax(-1) == tgt) | ~valid


def eval_stats(model, dataset: TokenizedDataset, tokenizer=None, batch_size: int = 32,
               autocast=contextlib.nullcontext, pad_id: int | None = None) -> dict:
    """``{"loss", "exact_match", "n", "tokens"}`` over ``dataset`` (sharded over
    ranks under torch.distributed, reduced to the global value on every rank)."""
    if pad_id is None:
        pad_id = pad_id_of(tokenizer) if tokenizer is not None else 0
    rank, world = _dist()
    device = model_device(model)
    idx = list(range(rank, len(dataset), world))
    loss_sum = tokens = correct = n = 0.0
    with _eval_mode(model):
        for b in _batches(dataset, batch_size, pad_id, idx):
            b = {k: v.to(device) for k, v in b.items()}
            nll, hit = _target_stats(model, b, autocast)
            loss_sum += float(nll.sum())
            tokens += float((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            correct += float(hit.all(dim=1).sum())
            n += hit.shape[0]
    loss_sum, tokens, correct, n = _all_reduce([loss_sum, tokens, correct, n], device)
    return {"loss": loss_sum / max(tokens, 1), "exact_match": correct / max(n, 1), "n": int(n),
            "tokens": int(tokens)}
