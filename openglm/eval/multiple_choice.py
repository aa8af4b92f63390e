"""Zero-shot multiple choice by log-likelihood: which continuation of the context is most likely.

Items are JSON lines ``{"context": str, "choices": [str, ...], "label": int}``. Each choice is
scored as the summed log-probability of its tokens after the context, the context and the choice
tokenized separately and joined (so every choice sees the same context tokens). A space joins them
unless the context already ends in whitespace or in CJK / full-width punctuation. ``acc`` picks the
highest sum, ``acc_norm`` the highest sum per character of the choice (lm-eval-harness's
normalisation), which does not favour short answers.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import OpenGLMError
from .perplexity import score_windows


@dataclass
class MCResult:
    items: int = 0
    correct: int = 0
    correct_norm: int = 0

    @property
    def acc(self) -> float:
        return self.correct / max(self.items, 1)

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / max(self.items, 1)

    def as_dict(self) -> dict:
        lo, hi = wilson_interval(self.correct, self.items)
        return {"items": self.items, "acc": self.acc, "acc_norm": self.acc_norm, "acc_ci95": [lo, hi]}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for ``k`` successes in ``n`` trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def delimiter(context: str) -> str:
    if not context or context[-1].isspace():
        return ""
    last = context[-1]
    wide = unicodedata.east_asian_width(last) in ("W", "F")
    return "" if wide else " "


def read_items(path: str | Path) -> Iterator[dict]:
    """Items of a JSONL (optionally .xz/.gz) multiple-choice file, checked, with file:line errors."""
    path = Path(path)
    if not path.is_file():
        raise OpenGLMError(f"no multiple-choice file at {str(path)!r}")
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _item(line, path, lineno)
    except (UnicodeDecodeError, lzma.LZMAError, EOFError, gzip.BadGzipFile) as e:
        raise OpenGLMError(f"{path}: cannot read: {e}") from None


def _item(line: str, path: Path, lineno: int) -> dict:
    try:
        item = json.loads(line)
        ok = (isinstance(item["context"], str) and isinstance(item["choices"], list) and len(item["choices"]) >= 2
              and all(isinstance(c, str) for c in item["choices"])
              and isinstance(item["label"], int) and 0 <= item["label"] < len(item["choices"]))
    except (json.JSONDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise OpenGLMError(f'{path}:{lineno}: not a multiple-choice item ({{"context": str, "choices": [str, ...], "label": index}})')
    return item


def multiple_choice(model, tokenizer, items: Iterable[dict], batch_size: int = 8, bar=None) -> MCResult:
    """Accuracy of ``model`` on ``items``; all choices of an item go through the model in one batch."""
    bos = [tokenizer.eos_id] if "<|endoftext|>" in tokenizer.special_ids else []
    result = MCResult()
    for item in items:
        ctx = bos + tokenizer.encode(item["context"])
        sep = delimiter(item["context"])
        rows = [(ctx + tokenizer.encode(sep + c), len(ctx)) for c in item["choices"]]
        limit = model.config.max_position_embeddings
        rows = [(ids[-limit:], max(1, first - max(0, len(ids) - limit))) for ids, first in rows]
        nll = []
        for i in range(0, len(rows), batch_size):
            nll += score_windows(model, rows[i:i + batch_size])
        per_char = [n / max(len(c), 1) for n, c in zip(nll, item["choices"])]
        result.items += 1
        result.correct += min(range(len(nll)), key=nll.__getitem__) == item["label"]
        result.correct_norm += min(range(len(per_char)), key=per_char.__getitem__) == item["label"]
        if bar is not None:
            bar.update(1)
    return result
