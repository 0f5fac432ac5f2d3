"""A synthetic world for proving that adapters learn, with no download.

* A word-level vocabulary and tokenizer (built with `tokenizers`, saved as a
  transformers ``PreTrainedTokenizerFast`` so ``AutoTokenizer`` loads it offline).
* A pretraining corpus: templated language and small algorithmic tasks
  (copy, reverse, sort, count, max, compare) as ``{"text"}`` records.
* Held-out fine-tuning tasks of a different kind, as ``{"prompt", "completion"}``
  records scored by exact match: ``topic`` (classification: the category of a
  sentence's subject, 3 labels), ``between`` (generation: the letters strictly
  between two given ones) and ``shift`` (generation: every letter replaced by
  the next one; hard for the small base, whose copy skill is weak).
* ``build_base_model``: pretrains a small ``LlamaForCausalLM`` on the corpus
  (a few minutes on 2 CPU cores) and saves it with ``save_pretrained``,
  cached by a hash of everything that determines it.

Used by ``bench/learning.py`` and ``flora demo``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import string
import tempfile
from pathlib import Path

from .fileio import atomic_write_text

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
DIGITS = list(string.digits)
LETTERS = list(string.ascii_lowercase)
SYMBOLS = [":", "=", "->", ".", "?"]
ADJECTIVES = ["big", "small", "red", "blue", "green", "old", "young", "happy", "sad"]
VERBS = ["sees", "likes", "chases", "follows", "finds"]
CATEGORIES = {
    "animal": ["cat", "dog", "bird", "fish", "horse", "cow"],
    "vehicle": ["car", "bus", "truck", "boat", "bike", "train"],
    "food": ["apple", "bread", "cake", "rice", "soup", "egg"],
}
NOUNS = [n for ns in CATEGORIES.values() for n in ns] + list(CATEGORIES)  # category words are nouns too
TASK_WORDS = ["copy", "reverse", "sort", "count", "from", "to", "max", "is", "less", "than",
              "yes", "no", "the", "and"]
FINETUNE_WORDS = ["topic", "shift", "between"]  # only ever seen when fine-tuning
VOCAB = SPECIALS + DIGITS + LETTERS + SYMBOLS + ADJECTIVES + VERBS + NOUNS + TASK_WORDS + FINETUNE_WORDS
assert len(set(VOCAB)) == len(VOCAB), "duplicate word in the synthetic vocabulary"


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------
def build_tokenizer(save_dir=None):
    """The word-level tokenizer of the synthetic language (whitespace-split
    words, BOS added, EOS/PAD defined). Saved to ``save_dir`` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


# --------------------------------------------------------------------------
# Pretraining corpus
# --------------------------------------------------------------------------
def _seq(rng, pool, lo, hi):
    return [rng.choice(pool) for _ in range(rng.randint(lo, hi))]


def _noun_phrase(rng, noun=None):
    adjs = rng.sample(ADJECTIVES, rng.randint(0, 2))
    return ["the", *adjs, noun or rng.choice(NOUNS)]


def _sentence(rng, subject=None, obj=None):
    return [*_noun_phrase(rng, subject), rng.choice(VERBS), *_noun_phrase(rng, obj)]


def _pre_copy(rng):
    s = _seq(rng, LETTERS + DIGITS, 2, 8)
    return ["copy", ":", *s, "=", *s]


def _pre_reverse(rng):
    s = _seq(rng, LETTERS + DIGITS, 2, 8)
    return ["reverse", ":", *s, "=", *s[::-1]]


def _pre_sort(rng):
    s = _seq(rng, DIGITS, 2, 8)
    return ["sort", ":", *s, "=", *sorted(s)]


def _pre_count(rng):
    pool = rng.choice([LETTERS, DIGITS])
    i = rng.randrange(len(pool) - 1)
    j = rng.randint(i + 1, min(len(pool) - 1, i + 7))
    return ["count", "from", pool[i], "to", pool[j], ":", *pool[i : j + 1]]


def _pre_max(rng):
    s = _seq(rng, DIGITS, 2, 6)
    return ["max", ":", *s, "=", max(s)]


def _pre_compare(rng):
    a, b = rng.sample(DIGITS, 2)
    return ["is", a, "less", "than", b, "?", "yes" if a < b else "no"]


def _pre_language(rng):
    words = _sentence(rng) + ["."]
    if rng.random() < 0.5:
        words += ["the", rng.choice(NOUNS), "is", rng.choice(ADJECTIVES), "."]
    return words


PRETRAIN_TASKS = {
    "copy": _pre_copy, "reverse": _pre_reverse, "sort": _pre_sort, "count": _pre_count,
    "max": _pre_max, "compare": _pre_compare, "language": _pre_language,
}


def pretraining_corpus(n: int, seed: int = 0) -> list[dict]:
    """``n`` ``{"text"}`` records, tasks mixed uniformly, deterministic in ``seed``."""
    rng = random.Random(f"pretrain-{seed}")
    fns = list(PRETRAIN_TASKS.values())
    return [{"text": " ".join(rng.choice(fns)(rng))} for _ in range(n)]


# --------------------------------------------------------------------------
# Held-out fine-tuning tasks (prompt -> completion, exact-match scored)
# --------------------------------------------------------------------------
def _ft_topic(rng, split):
    # The label is the category of the SUBJECT; the object is of another category,
    # so the model has to find the subject, not just spot a known noun.
    cat, other = rng.sample(sorted(CATEGORIES), 2)
    words = _sentence(rng, rng.choice(CATEGORIES[cat]), rng.choice(CATEGORIES[other]))
    return {"prompt": " ".join(["topic", ":", *words, "->"]), "completion": cat}


def _ft_shift(rng, split):
    s = _seq(rng, LETTERS[:-1], 3, 5)  # no 'z': it has no successor
    nxt = [LETTERS[LETTERS.index(c) + 1] for c in s]
    return {"prompt": " ".join(["shift", ":", *s, "->"]), "completion": " ".join(nxt)}


def _ft_between(rng, split):
    # The letters strictly between two endpoints: the pretraining's "count from x to y"
    # skill in a new format with exclusive ends. There are only ~110 (start, end)
    # pairs, so a fifth of them (i + j divisible by 5) is kept out of training and
    # only those are evaluated: eval measures generalisation, not recall.
    while True:
        i = rng.randrange(len(LETTERS) - 3)
        j = rng.randint(i + 3, min(len(LETTERS) - 1, i + 7))
        if ((i + j) % 5 == 0) == (split != "train"):
            break
    return {"prompt": " ".join(["between", LETTERS[i], "and", LETTERS[j], "->"]),
            "completion": " ".join(LETTERS[i + 1:j])}


FINETUNE_TASKS = {"topic": _ft_topic, "shift": _ft_shift, "between": _ft_between}
TASK_KIND = {"topic": "classification (3 labels)", "shift": "generation (3-5 letters)",
             "between": "generation (2-6 letters)"}


def finetune_data(task: str, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` ``{"prompt", "completion"}`` records of a held-out task. ``split``
    ("train" or anything else for evaluation) seeds a separate stream. ``topic``
    and ``shift`` have many thousands of instances, so train and eval are drawn
    independently; ``between`` has ~110, so its eval split uses only letter
    pairs that the train split never contains."""
    if task not in FINETUNE_TASKS:
        raise ValueError(f"unknown fine-tuning task {task!r}; choose from {sorted(FINETUNE_TASKS)}")
    rng = random.Random(f"finetune-{task}-{split}-{seed}")
    return [FINETUNE_TASKS[task](rng, split) for _ in range(n)]


def write_jsonl(records, path) -> Path:
    """Writes records as JSON lines, atomically (temp file + rename)."""
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------
# The pretrained base model
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """Everything that determines the pretrained synthetic base model."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 64
    tie_word_embeddings: bool = True
    corpus_size: int = 40000
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        """Cache key: hash of this config, the vocabulary and the corpus recipe version."""
        blob = json.dumps({"cfg": dataclasses.asdict(self), "vocab": VOCAB, "corpus": CORPUS_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(VOCAB), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=VOCAB.index("<s>"), eos_token_id=VOCAB.index("</s>"),
            pad_token_id=VOCAB.index("<pad>"),
        )


CORPUS_VERSION = 1  # bump when the corpus or tokenizer recipe changes (invalidates caches)
DEFAULT_BASE = BaseModelConfig()
QUICK_BASE = BaseModelConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             corpus_size=8000, steps=300, lr=4e-3)


def default_cache_dir() -> Path:
    root = os.environ.get("FLORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flora")
    return Path(root) / "synthetic"


def build_base_model(cfg: BaseModelConfig = DEFAULT_BASE, cache_dir=None, progress: bool = True,
                     log=print) -> Path:
    """Returns a checkpoint directory (config.json, model.safetensors, tokenizer)
    with a small Llama pretrained on the synthetic corpus; trains it on first
    use (CPU, minutes) and reuses the cached copy afterwards. The directory is
    built under a temporary name and renamed into place, so an interrupted
    build never leaves a half-written cache entry."""
    import torch
    from transformers import LlamaForCausalLM

    from .train import TrainConfig, train

    out = Path(cache_dir or default_cache_dir()) / f"llama-{cfg.key()}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        tokenizer = build_tokenizer(tmp)
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(cfg.llama_config())
        n_params = sum(p.numel() for p in model.parameters())
        if log:
            log(f"pretraining a {n_params / 1e6:.2f}M-parameter Llama on the synthetic corpus "
                f"({cfg.steps} steps, cached at {out})")
        corpus = pretraining_corpus(cfg.corpus_size, seed=cfg.seed)
        tc = TrainConfig(lr=cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.max_position_embeddings,
                         warmup_steps=max(1, cfg.steps // 20), weight_decay=0.01, seed=cfg.seed,
                         progress=progress, desc="pretrain")
        result = train(model, tokenizer, corpus, config=tc)
        model.config.flora_synthetic = {"key": cfg.key(), "final_train_loss": result.final_train_loss}
        model.save_pretrained(str(tmp), safe_serialization=True)
        with open(tmp / "synthetic_config.json", "w") as f:
            json.dump({**dataclasses.asdict(cfg), "key": cfg.key(), "corpus_version": CORPUS_VERSION,
                       "final_train_loss": result.final_train_loss}, f, indent=2)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep theirs
            if not (out / "model.safetensors").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
