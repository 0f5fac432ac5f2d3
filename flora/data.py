"""Fine-tuning data: JSONL records -> token ids with completion-only labels -> padded
(or packed) batches.

Records are ``{"prompt": str, "completion": str}`` (loss on the completion and
the EOS token only), ``{"text": str}`` (loss on every token) or
``{"messages": [{"role", "content"}, ...]}`` (a conversation through the
tokenizer's chat template; loss on the assistant turns only). Labels follow
the transformers convention: aligned with ``input_ids`` (the model shifts),
``-100`` where no loss is taken (prompt and padding).
"""
from __future__ import annotations

import bisect
import json
import math
import warnings
from pathlib import Path
from typing import Optional

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
    file works as is). A ``messages`` record gives ``{"messages", "completion"}``:
    the conversation up to its last assistant turn, whose content is the reference
    (a conversation that ends with another role is all prompt, without one)."""
    records = []
    for where, rec in _jsonl_objects(path):
        if isinstance(rec, dict) and "messages" in rec:
            msgs = check_messages(rec["messages"], where, need_answer=False)
            last = msgs[-1]["role"] == "assistant"
            records.append({"messages": msgs[:-1] if last else msgs,
                            "completion": msgs[-1]["content"] if last else None})
            continue
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


ROLES = ("system", "user", "assistant", "tool")


def check_messages(msgs, where: str, need_answer: bool = True) -> list[dict]:
    """A conversation's messages, checked: a non-empty list of ``{"role",
    "content"}`` objects (other keys go to the chat template as they are), no
    assistant turn first (a template renders what comes before it as the
    prompt), and with ``need_answer`` an assistant turn with content."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be an object with a 'role' ({', '.join(ROLES)}) "
                             f"and a string 'content', got {m!r:.80}")
    if msgs[0]["role"] == "assistant":
        raise ValueError(f"{where}: messages[0] is an assistant turn; a conversation starts with "
                         "a system or user message (its prompt)")
    if need_answer and not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise ValueError(f"{where}: no assistant message with content (nothing to learn from)")
    return [dict(m) for m in msgs]


def validate_record(rec, where: str = "record") -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        return {"messages": check_messages(rec["messages"], where)}
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
    raise ValueError(f"{where}: expected keys 'prompt' and 'completion', 'text', or 'messages'; got {sorted(rec)}")


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


def render_chat(tokenizer, messages: list, generation_prompt: bool, where: Optional[str] = None) -> str:
    """``messages`` through the tokenizer's chat template (text, not ids); a
    template's own refusal (jinja's ``raise_exception``) as a ValueError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja's errors name the template's rule
        raise ValueError(f"{where + ': ' if where else ''}the chat template rejects this conversation: {e}") from None


def chat_pieces(tokenizer, messages: list, where: str = "record") -> list[tuple[str, bool]]:
    """A conversation rendered by the tokenizer's chat template, as (text,
    is_target) pieces: each assistant turn's text (its content and the
    template's end of turn) a target, the rest not. The text before an
    assistant turn is the template's rendering of the turns before it with
    the generation prompt, exactly what generation is given; so the template
    must render a conversation turn by turn (each rendering extending the last),
    as chat templates that keep earlier turns do."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: a 'messages' record needs a tokenizer with a chat template; "
                         "this checkpoint's tokenizer has none (use prompt/completion records)")

    def render(msgs, gen):
        return render_chat(tokenizer, msgs, gen, where)

    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        pre, post = render(messages[:i], True), render(messages[:i + 1], False)
        if not (pre.startswith(done) and post.startswith(pre)):
            raise ValueError(f"{where}: the chat template does not render this conversation turn by turn "
                             f"(messages[{i}]'s rendering does not extend the earlier turns'), so its "
                             "prompts would differ from generation's")
        pieces += [(pre[len(done):], False), (post[len(pre):], True)]
        done = post
    full = render(messages, False)
    if not full.startswith(done):
        raise ValueError(f"{where}: the chat template does not render this conversation turn by turn")
    pieces.append((full[len(done):], False))
    return [(text, target) for text, target in pieces if text]


def _fit(head: list, head_labels: list, tail: list, tail_labels: list, seq_len: int, bos_id) -> tuple:
    """(ids, labels, truncated) of head + tail in at most ``seq_len`` tokens:
    the head (the prompt) loses tokens from the left, after any BOS, first;
    then the tail (the answer) from the right, one head token kept."""
    truncated = len(head) + len(tail) > seq_len
    if truncated:
        nb = 1 if head and head[0] == bos_id else 0
        body = len(head) - nb
        n_tail = min(len(tail), seq_len - nb - (1 if body else 0))
        keep = seq_len - nb - n_tail
        cut = nb + body - max(keep, 0)  # head tokens [nb, cut) go
        head, head_labels = head[:nb] + head[cut:], head_labels[:nb] + head_labels[cut:]
        tail, tail_labels = tail[:n_tail], tail_labels[:n_tail]
    return head + tail, head_labels + tail_labels, truncated


def tokenize_record(rec: dict, tokenizer, seq_len: int, where: str = "record") -> dict:
    """``{"input_ids", "labels"}`` lists for one record. Prompt and completion
    are tokenized separately (prompt with the tokenizer's special tokens, e.g.
    BOS; completion without) and EOS is appended, so the label boundary is
    exact. A conversation is tokenized piece by piece (:func:`chat_pieces`),
    each assistant turn a target; its last assistant turn and what follows are
    the completion, what comes before it the prompt. Over-long examples lose
    prompt tokens from the left (after any BOS) first, then completion tokens
    from the right. Returns ``truncated``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in rec:
        ids = _ids(tokenizer, rec["text"], True) + eos
        truncated = len(ids) > seq_len
        ids = ids[:seq_len]
        return {"input_ids": ids, "labels": list(ids), "truncated": truncated}
    if "messages" in rec:
        parts = []  # (ids, labels) per piece; the template's text brings its own special tokens
        for k, (text, target) in enumerate(chat_pieces(tokenizer, rec["messages"], where)):
            ids = _ids(tokenizer, text, k == 0)
            parts.append((ids, list(ids) if target else [IGNORE_INDEX] * len(ids)))
        last = max(k for k, (_, labels) in enumerate(parts) if labels and labels[0] != IGNORE_INDEX)
        head = [sum((p[j] for p in parts[:last]), []) for j in (0, 1)]
        tail = [sum((p[j] for p in parts[last:]), []) for j in (0, 1)]
    else:
        prompt = prompt_ids(tokenizer, rec["prompt"])
        comp = _ids(tokenizer, rec["completion"], False) + eos
        head, tail = (prompt, [IGNORE_INDEX] * len(prompt)), (comp, list(comp))
    ids, labels, truncated = _fit(*head, *tail, seq_len, tokenizer.bos_token_id)
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


class TokenizedDataset(torch.utils.data.Dataset):
    """Records tokenized once up front (the synthetic and typical SFT sets are small)."""

    def __init__(self, records, tokenizer, seq_len: int):
        self.items = []
        n_trunc = 0
        for i, rec in enumerate(records):
            where = f"record {i}"
            t = tokenize_record(validate_record(rec, where=where), tokenizer, seq_len, where=where)
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


def pack_rows(lengths: list, seq_len: int) -> list[list[int]]:
    """Example indices per packed row of at most ``seq_len`` tokens: best-fit
    decreasing (the longest example first, each into the fullest row it fits,
    else a new row), a pure function of ``lengths``. Each row's examples in
    index order, the rows in the order of their first example."""
    free, rows = [], []  # free: sorted (space left, row index) of rows that can take more
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if not 1 <= n <= seq_len:
            raise ValueError(f"example {i} has {n} tokens; packing takes 1 to seq_len={seq_len}")
        k = bisect.bisect_left(free, (n, -1))  # the smallest space that holds it
        if k == len(free):
            rows.append([i])
            space, r = seq_len - n, len(rows) - 1
        else:
            space, r = free.pop(k)
            rows[r].append(i)
            space -= n
        if space:
            bisect.insort(free, (space, r))
    return sorted(sorted(r) for r in rows)


def collate_packed(rows: list, pad_id: int) -> dict:
    """Packed rows (each a list of tokenized items, laid one after another) as a
    batch the model runs as the items apart: ``input_ids``, ``labels`` and
    ``position_ids`` [B, T] (T the longest row), positions restarting at 0 at
    each item (transformers' packed form: no attention mask; the model masks
    the other items' keys, flora.layers.packed_attention_mask). Labels as the items'
    own, and -100 at each item's first token, so no target crosses from one
    item into the next. A shorter row's padding is a sequence of its own
    (positions 0, 1, ...; labels -100) that no item reads. ``row_tokens`` [B]:
    each row's real (non-padding) tokens."""
    n = max(sum(len(it["input_ids"]) for it in row) for row in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), n), dtype=torch.long)
    real = torch.zeros(len(rows), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for it in row:
            k = len(it["input_ids"])
            ids[r, t:t + k] = torch.tensor(it["input_ids"])
            labels[r, t + 1:t + k] = torch.tensor(it["labels"][1:])
            pos[r, t:t + k] = torch.arange(k)
            t += k
        pos[r, t:] = torch.arange(n - t)
        real[r] = t
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "row_tokens": real}


def count_input_tokens(batch: dict) -> int:
    """A batch's real (non-padding) tokens, from :func:`collate` or :func:`collate_packed`."""
    return int(batch["row_tokens"].sum() if "row_tokens" in batch else batch["attention_mask"].sum())


def count_target_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the model's one-position shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
