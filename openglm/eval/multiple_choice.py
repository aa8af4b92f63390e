"""Zero-shot multiple choice by log-likelihood: which continuation of the context is most likely.

Items are JSON lines ``{"context": str, "choices": [str, ...], "label": int}`` (other fields are
ignored). Each choice becomes a continuation of the context as lm-eval-harness builds it: a space
joins them unless the context already ends in whitespace or in a CJK / full-width character, and
whitespace at the end of the context moves to the start of the continuation (so it merges with the
first word as in ordinary text). The text ``<|endoftext|>`` + context + continuation is tokenized
whole; the choice's tokens are those beyond the longest common prefix with the tokenized context,
so the tokenization is the one the model saw in training even where a token would straddle the
boundary. A choice's score is the summed log-probability of its tokens. ``acc`` picks the highest
score, ``acc_norm`` the highest score per character of the continuation (lm-eval-harness's
normalisation, which does not favour short answers).
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
from .perplexity import bos_ids, score


@dataclass
class MCResult:
    items: int = 0
    correct: int = 0
    correct_norm: int = 0
    chance_sum: float = 0.0  # sum over items of 1 / number of choices

    @property
    def acc(self) -> float:
        return self.correct / max(self.items, 1)

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / max(self.items, 1)

    def as_dict(self) -> dict:
        return {"items": self.items, "acc": self.acc, "acc_ci95": list(wilson_interval(self.correct, self.items)),
                "acc_norm": self.acc_norm, "acc_norm_ci95": list(wilson_interval(self.correct_norm, self.items)),
                "chance": self.chance_sum / max(self.items, 1)}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for the default ``z``) of a proportion with ``k`` successes in ``n`` trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def delimiter(context: str) -> str:
    """``" "`` to join a choice to ``context``, or ``""`` after whitespace or a wide (CJK) character."""
    if not context or context[-1].isspace():
        return ""
    return "" if unicodedata.east_asian_width(context[-1]) in ("W", "F") else " "


def split_pair(context: str, choice: str) -> tuple[str, str]:
    """``(context, continuation)`` with the delimiter added and trailing context whitespace moved over."""
    continuation = delimiter(context) + choice
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def read_items(path: str | Path) -> Iterator[dict]:
    """Items of a JSONL (optionally .xz/.gz) multiple-choice file, checked, with file:line errors."""
    path = Path(path)
    if not path.is_file():
        raise OpenGLMError(f"no multiple-choice file at {str(path)!r}")
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _item(line, path, lineno)
    except (UnicodeDecodeError, OSError, EOFError, lzma.LZMAError) as e:
        raise OpenGLMError(f"{path}: cannot read after line {lineno}: {e}") from None


def _item(line: str, path: Path, lineno: int) -> dict:
    try:
        item = json.loads(line)
        ok = (isinstance(item["context"], str) and isinstance(item["choices"], list) and len(item["choices"]) >= 2
              and all(isinstance(c, str) and c for c in item["choices"])
              and type(item["label"]) is int and 0 <= item["label"] < len(item["choices"]))
    except (json.JSONDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise OpenGLMError(f'{path}:{lineno}: not a multiple-choice item '
                           '({"context": str, "choices": [non-empty str, ...], "label": index of the answer})')
    return item


def _rows(tokenizer, item: dict, limit: int, bos: list[int]) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Scoring rows ``(ids, first_scored)`` and continuation lengths in characters, one per choice."""
    rows, chars = [], []
    for choice in item["choices"]:
        context, continuation = split_pair(item["context"], choice)
        ctx = bos + tokenizer.encode(context)
        whole = bos + tokenizer.encode(context + continuation)
        first = next((i for i, (a, b) in enumerate(zip(ctx, whole)) if a != b), len(ctx))
        first = max(first, 1)  # the first token has nothing before it to predict it from
        cut = max(0, len(whole) - limit)  # over the model's context: drop the oldest context tokens
        rows.append((whole[cut:], max(first - cut, 1)))
        chars.append(len(continuation))
    return rows, chars


def multiple_choice(model, tokenizer, items: Iterable[dict], batch_size: int = 8, bar=None) -> MCResult:
    """Accuracy of ``model`` on ``items``.

    Items are taken in groups of at least ``batch_size`` choices, whose rows go through the model
    ``batch_size`` at a time, batched by length. ``bar`` (a ``tqdm``) advances by items.
    """
    limit = model.config.max_position_embeddings
    bos = bos_ids(tokenizer)
    result = MCResult()
    group: list[dict] = []
    pending = 0  # choices in the group

    def flush():
        rows, chars = [], []
        for item in group:
            r, c = _rows(tokenizer, item, limit, bos)
            rows += r
            chars += c
        nll = score(model, rows, batch_size)
        start = 0
        for item in group:
            end = start + len(item["choices"])
            label = item["label"]
            # argmin of NLL = argmax of log-likelihood; ties go to the first choice.
            result.correct += min(range(start, end), key=lambda i: nll[i]) - start == label
            result.correct_norm += min(range(start, end), key=lambda i: nll[i] / chars[i]) - start == label
            result.chance_sum += 1 / len(item["choices"])
            start = end
        result.items += len(group)
        if bar is not None:
            bar.update(len(group))
        group.clear()

    for item in items:
        group.append(item)
        pending += len(item["choices"])
        if pending >= batch_size:
            flush()
            pending = 0
    if group:
        flush()
    return result
