"""Fine-tuning data: JSONL records -> token ids with completion-only labels -> padded batches.

Records are ``{"prompt": str, "completion": str}`` (loss on the completion and
the EOS token only) or ``{"text": str}`` (loss on every token). Labels follow
the transformers convention: aligned with ``input_ids`` (the model shifts),
``-100`` where no loss is taken (prompt and padding).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

IGNORE_INDEX = -100


def _jsonl_objects(path):
    """(``path:line``, parsed object) for each non-blank line of a UTF-8 JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:  # decoded line by line, so an encoding error names its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: "
                                 f"{raw[e.start:e.start + 1]!r}); save the data file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def load_jsonl(path) -> list[dict]:
    """Reads and validates a JSONL file of prompt/completion or text records."""
    records = [validate_record(rec, where=where) for where, rec in _jsonl_objects(path)]
    if not records:
        raise ValueError(f"{path}: no records (empty file)")
    return records


def load_prompts(path) -> list[dict]:
    """Reads a JSONL file of ``{"prompt"}`` records for generation; a record's
    ``completion``, when present, is kept as the reference answer (a training
    file works as is)."""
    records = []
    for where, rec in _jsonl_objects(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise ValueError(f"{where}: expected an object with a string 'prompt', got {got}")
        ref = rec.get("completion")
        if ref is not None and not isinstance(ref, str):
            raise ValueError(f"{where}: 'completion' must be a string, got {type(ref).__name__}")
        records.append({"prompt": rec["prompt"], "completion": ref})
    if not records:
        raise ValueError(f"{path}: no records (empty file)")
    return records


def validate_record(rec, where: str = "record") -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "prompt" in rec or "completion" in rec:
        for k in ("prompt", "completion"):
            if not isinstance(rec.get(k), str):
                raise ValueError(f"{where}: a prompt/completion record needs string fields "
                                 f"'prompt' and 'completion' ({k!r} is {type(rec.get(k)).__name__})")
        if not rec["completion"]:
            raise ValueError(f"{where}: empty 'completion' (nothing to learn from)")
        return {"prompt": rec["prompt"], "completion": rec["completion"]}
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        return {"text": rec["text"]}
    raise ValueError(f"{where}: expected keys 'prompt' and 'completion', or 'text'; got {sorted(rec)}")


def load_tokenizer(model_dir):
    """The checkpoint's own tokenizer, from local files only (never the network)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if model_dir.is_file() and model_dir.suffix == ".gguf":  # a GGUF file carries its tokenizer
        from .gguf import load_gguf_tokenizer
        return load_gguf_tokenizer(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {model_dir}")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {model_dir}: {e}") from None
    return tok


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    if special and isinstance(bos, str) and bos and text.startswith(bos):
        special = False  # the text carries its BOS already (a chat template's): not a second one
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids as training sees them (with the tokenizer's special tokens,
    e.g. BOS), so generation continues exactly where training's labels start."""
    return _ids(tokenizer, prompt, True)


def tokenize_record(rec: dict, tokenizer, seq_len: int) -> dict:
    """``{"input_ids", "labels"}`` lists for one record. Prompt and completion
    are tokenized separately (prompt with the tokenizer's special tokens, e.g.
    BOS; completion without) and EOS is appended, so the label boundary is
    exact. Over-long examples lose prompt tokens from the left (after any BOS)
    first, then completion tokens from the right. Returns ``truncated``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in rec:
        ids = _ids(tokenizer, rec["text"], True) + eos
        truncated = len(ids) > seq_len
        ids = ids[:seq_len]
        return {"input_ids": ids, "labels": list(ids), "truncated": truncated}
    prompt = prompt_ids(tokenizer, rec["prompt"])
    comp = _ids(tokenizer, rec["completion"], False) + eos
    truncated = len(prompt) + len(comp) > seq_len
    if truncated:
        bos = prompt[:1] if prompt and prompt[0] == tokenizer.bos_token_id else []
        body = prompt[len(bos):]
        comp = comp[: seq_len - len(bos) - (1 if body else 0)]  # keep >= 1 prompt token when there is one
        keep = seq_len - len(bos) - len(comp)
        prompt = bos + (body[len(body) - keep:] if keep > 0 else [])
    ids = prompt + comp
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + comp, "truncated": truncated}


class TokenizedDataset(torch.utils.data.Dataset):
    """Records tokenized once up front (the synthetic and typical SFT sets are small)."""

    def __init__(self, records, tokenizer, seq_len: int):
        self.items = []
        n_trunc = 0
        for i, rec in enumerate(records):
            t = tokenize_record(validate_record(rec, where=f"record {i}"), tokenizer, seq_len)
            n_trunc += t.pop("truncated")
            if all(l == IGNORE_INDEX for l in t["labels"][1:]):
                raise ValueError(f"record {i}: no target tokens left after truncation to seq_len={seq_len}")
            self.items.append(t)
        if n_trunc:
            warnings.warn(f"{n_trunc} of {len(self.items)} examples were longer than seq_len={seq_len} "
                          "and were truncated", stacklevel=2)
        self.n_target_tokens = sum(sum(1 for l in t["labels"][1:] if l != IGNORE_INDEX) for t in self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def collate(items, pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pads a list of tokenized items to the longest (rounded up to a
    multiple); padding has attention_mask 0 and label -100."""
    n = max(len(it["input_ids"]) for it in items)
    n = int(math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, it in enumerate(items):
        k = len(it["input_ids"])
        ids[i, :k] = torch.tensor(it["input_ids"])
        labels[i, :k] = torch.tensor(it["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_target_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the model's one-position shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
