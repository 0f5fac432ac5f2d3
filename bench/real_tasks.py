"""Fine-tuning tasks built from real text on the machine (no download).

- ``mansum`` (summary-like): the opening of a man page's DESCRIPTION section
  -> the one-line summary of its NAME line (``ls \\- list directory contents``).
  Pages come from /usr/share/man/man1 (section 1 only, the gcloud pages left
  out; sorted, so every machine with the same pages builds the same set). Metric: ROUGE-L F1 of the greedy
  generation against the reference line.
- ``arith`` (reasoning-like): generated multi-step arithmetic word problems
  whose answer is a short worked solution ("3*5=15, 12+15=27, 27-7=20",
  the last number answering). Metric: exact match of the whole solution (teacher-forced,
  which equals greedy generation reproducing it and stopping).

Records are ``{"prompt", "completion"}``; the split is by a hash of the page
name (mansum) or the RNG seed (arith), so train and eval never share an item.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import random
import re

MAN_DIR = "/usr/share/man/man1"
TASK_KIND = {"mansum": "summary-like (man page description -> NAME line), ROUGE-L",
             "arith": "reasoning-like (multi-step arithmetic word problem -> worked answer), exact match"}
MAN_PROMPT = "Summarize in one short line what this command does.\n\n{name}: {desc}"

_FONT = re.compile(r"\\f(\(..|\[[^\]]*\]|.)")
_ESC = [(r"\-", "-"), (r"\(em", "-"), (r"\(en", "-"), (r"\(aq", "'"), (r"\(dq", '"'), (r"\(lq", '"'),
        (r"\(rq", '"'), (r"\(bu", "*"), (r"\e", "\\"), (r"\&", ""), (r"\|", ""), (r"\^", ""),
        (r"\ ", " "), (r"\~", " "), (r"\:", ""), (r"\%", "")]


def _plain(line: str) -> str:
    """One groff line as plain text (fonts and common escapes removed)."""
    line = _FONT.sub("", line)
    for a, b in _ESC:
        line = line.replace(a, b)
    line = re.sub(r"\\\*?\(..|\\\*\[[^\]]*\]|\\[a-zA-Z]", "", line)  # leftover escapes
    return line.replace('"', "").strip() if line.startswith(".") else line.strip()


def parse_man(text: str):
    """(names, summary, description words) of a man(7) page, or None."""
    sections, cur = {}, None
    for raw in text.splitlines():
        if raw.startswith(".SH"):
            cur = raw[3:].strip().strip('"').upper()
            sections.setdefault(cur, [])
            continue
        if cur is None or raw.startswith(('.\\"', "'\\\"")):
            continue
        if raw.startswith("."):
            m = re.match(r"\.(B|I|BR|IR|RB|RI|BI|IB|SM|SB)\s+(.*)", raw)
            if not m:
                continue  # layout macros (.PP, .TP, .sp, ...)
            raw = m.group(2)
        sections[cur].append(_plain(raw))
    name = " ".join(sections.get("NAME", [])).strip()
    m = re.match(r"(.+?)\s+-+\s+(.+)", name)
    if not m:
        return None
    desc = " ".join(" ".join(sections.get("DESCRIPTION", [])).split())
    return m.group(1).strip(), m.group(2).strip(), desc.split()


def _split_of(key: str, eval_frac: float) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if h < eval_frac else "train"


def man_records(man_dir: str = MAN_DIR, desc_words: int = 24, eval_frac: float = 0.15,
                limit: int | None = None) -> dict:
    """{"train": [...], "eval": [...]} from man pages with a usable NAME line
    (3-14 words) and DESCRIPTION (>= 12 words); one record per summary."""
    out = {"train": [], "eval": []}
    seen = set()
    # the thousands of near-identical "gcloud ..." pages would dominate; leave them out
    files = sorted(f for f in os.listdir(man_dir) if f.endswith(".gz") and not f.startswith("gcloud")) \
        if os.path.isdir(man_dir) else []
    for f in files:
        try:
            with gzip.open(os.path.join(man_dir, f), "rt", encoding="utf-8", errors="replace") as fh:
                text = fh.read(200_000)
        except (OSError, EOFError):
            continue
        if text.lstrip().startswith(".so"):
            continue  # a link to another page
        p = parse_man(text)
        if p is None:
            continue
        names, summary, words = p
        if not 3 <= len(summary.split()) <= 14 or len(words) < 12 or summary.lower() in seen:
            continue
        if not summary.isascii() or not all(w.isascii() for w in words[:desc_words]):
            continue
        seen.add(summary.lower())
        name = names.split(",")[0].strip()
        rec = {"prompt": MAN_PROMPT.format(name=name, desc=" ".join(words[:desc_words])),
               "completion": summary, "id": name}
        out[_split_of(name, eval_frac)].append(rec)
        if limit and len(out["train"]) + len(out["eval"]) >= limit:
            break
    return out


_ITEMS = ["apples", "books", "coins", "marbles", "stamps", "pencils", "cards", "shells", "eggs", "boxes"]
_NAMES = ["Tom", "Ana", "Lee", "Maya", "Omar", "Sara", "Ivan", "Nina", "Ravi", "Zoe"]


def arith_problem(rng: random.Random) -> dict:
    """A three-step word problem and its worked answer."""
    who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, n, k = rng.randint(5, 40), rng.randint(2, 6), rng.randint(2, 9)
    total = a + n * k
    c = rng.randint(1, total - 1)
    q = (f"{who} has {a} {item}. {who} buys {n} packs with {k} {item} each, "
         f"then gives away {c}. How many {item} does {who} have now?")
    ans = f"{n}*{k}={n * k}, {a}+{n * k}={total}, {total}-{c}={total - c}"  # the last number answers
    return {"prompt": q, "completion": ans}


def arith_records(n_train: int, n_eval: int, seed: int = 0) -> dict:
    """Train and eval problems from disjoint RNG streams (eval never seen in training)."""
    tr, ev = random.Random(f"arith-train-{seed}"), random.Random("arith-eval")
    eval_set = [arith_problem(ev) for _ in range(n_eval)]
    held = {r["prompt"] for r in eval_set}
    train = []
    while len(train) < n_train:
        r = arith_problem(tr)
        if r["prompt"] not in held:
            train.append(r)
    return {"train": train, "eval": eval_set}


def lcs(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 on lowercased word tokens (punctuation split off)."""
    tok = lambda s: re.findall(r"[a-z0-9]+", s.lower())  # noqa: E731
    p, r = tok(pred), tok(ref)
    if not p or not r:
        return 0.0
    n = lcs(p, r)
    if n == 0:
        return 0.0
    prec, rec = n / len(p), n / len(r)
    return 2 * prec * rec / (prec + rec)
