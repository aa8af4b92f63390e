"""Perplexity of a model on documents, per language: per token and in bits per character.

Each document is scored on its own (no context carried over from the previous one), starting from
``<|endoftext|>`` when the tokenizer has it, so that the document's first token is predicted too:
the summed NLL then covers every character of the document, which makes bits per character honest
and comparable across tokenizers. Without that token the first token of each document is not
predicted (nor counted in ``tokens``) while its characters still count, so bits per character come
out slightly low.

A document longer than the window is scored in windows of ``seq_len`` tokens advancing by
``stride``: each token is predicted exactly once, with at least ``seq_len - stride`` tokens of
context once the document is that long.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import OpenGLMError

BOS = "<|endoftext|>"


@dataclass
class PerplexityStats:
    """Totals over a set of documents; the rates are derived from them."""

    documents: int = 0
    tokens: int = 0  # tokens predicted
    chars: int = 0  # characters of the documents
    nll: float = 0.0  # summed negative log-likelihood of the predicted tokens, nats

    @property
    def nll_per_token(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def bits_per_char(self) -> float:
        return self.nll / math.log(2) / max(self.chars, 1)

    def add(self, other: PerplexityStats) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.chars += other.chars
        self.nll += other.nll

    def as_dict(self) -> dict:
        return {**asdict(self), "nll_per_token": self.nll_per_token, "perplexity": self.perplexity,
                "bits_per_char": self.bits_per_char}


def bos_ids(tokenizer) -> list[int]:
    """``[id of <|endoftext|>]`` to start each scored text with, or ``[]`` if the tokenizer has none."""
    return [tokenizer.token_id(BOS)] if BOS in tokenizer.special_ids else []


def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, first_scored, end)`` spans covering targets ``1..n-1`` of an ``n``-token sequence.

    The window ``ids[begin:end]`` (at most ``seq_len`` tokens) predicts ``ids[first_scored:end]``;
    every target appears in exactly one window.
    """
    out, pos = [], 1
    while pos < n:
        end = min(pos + stride, n)
        begin = max(0, end - seq_len)
        out.append((begin, pos, end))
        pos = end
    return out


@torch.inference_mode()
def _score_batch(model, batch: list[tuple[list[int], int]]) -> list[float]:
    device = model.lm_head.weight.device
    lengths = [len(ids) for ids, _ in batch]
    B, T = len(batch), max(lengths)
    x = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)  # -100: position not scored (context, padding)
    for i, (ids, first) in enumerate(batch):
        x[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1  # right padding: real tokens keep positions 0..len-1
        targets[i, first - 1 : len(ids) - 1] = torch.tensor(ids[first:])  # logits at t predict token t+1
    # Equal lengths need no padding mask, which lets attention use its fused causal path.
    attention_mask = None if min(lengths) == T else mask.to(device)
    h = model.hidden_states(x.to(device), attention_mask=attention_mask)  # (B, T, C)
    targets = targets.to(device)
    scored = targets != -100  # (B, T)
    logits = model.lm_head(h[scored])  # (N, V): the output layer only where a token is scored
    nll = F.cross_entropy(logits.float(), targets[scored], reduction="none")  # (N,)
    rows = scored.nonzero()[:, 0]  # (N,) the row of each scored position
    return torch.zeros(B, device=device).index_add_(0, rows, nll).tolist()


def score(model, rows: list[tuple[list[int], int]], batch_size: int = 8) -> list[float]:
    """Summed NLL (nats) of ``ids[first:]`` given ``ids[:first]``, for each ``(ids, first)`` in ``rows``.

    ``first >= 1``. Rows are batched by similar length (less padding); results keep the input order.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out = [0.0] * len(rows)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        for i, nll in zip(chunk, _score_batch(model, [rows[i] for i in chunk])):
            out[i] = nll
    return out


def perplexity(model, tokenizer, documents: Iterable[tuple[str, str]], seq_len: int = 512, stride: int | None = None,
               batch_size: int = 8, max_tokens: int | None = None, bar=None) -> dict[str, PerplexityStats]:
    """Stats per language tag and over ``"all"`` documents; ``documents`` yields ``(text, lang)``.

    Untagged documents (``lang == ""``) count in ``"all"`` only. ``seq_len`` is capped at the
    model's context; ``stride`` defaults to half of it. ``max_tokens`` stops after the document
    that brings the predicted tokens to that many (whole documents, so characters and tokens stay
    paired). ``bar`` (a ``tqdm``) advances by the tokens scored.
    """
    seq_len = min(seq_len, model.config.max_position_embeddings)
    stride = stride or max(seq_len // 2, 1)
    if not 0 < stride < seq_len:
        raise OpenGLMError(f"stride must be in 1..{seq_len - 1} (below the window of {seq_len} tokens), got {stride}")
    bos = bos_ids(tokenizer)
    stats: dict[str, PerplexityStats] = {"all": PerplexityStats()}
    pending: list[tuple[list[int], int, str]] = []  # windows waiting for a batch: (ids, first_scored, lang)

    def flush():
        for (ids, first, lang), nll in zip(pending, score(model, [(ids, f) for ids, f, _ in pending], batch_size)):
            stats["all"].nll += nll
            if lang:
                stats[lang].nll += nll
            if bar is not None:
                bar.update(len(ids) - first)
        pending.clear()

    total = 0
    for text, lang in documents:
        if max_tokens is not None and total >= max_tokens:
            break
        ids = bos + tokenizer.encode(text)
        doc = PerplexityStats(documents=1, tokens=len(ids) - 1, chars=len(text))
        total += doc.tokens
        for key in ("all", lang) if lang else ("all",):
            stats.setdefault(key, PerplexityStats()).add(doc)
        for begin, first, end in windows(len(ids), seq_len, stride):
            pending.append((ids[begin:end], first - begin, lang))
        if len(pending) >= 8 * batch_size:  # a pool large enough to sort into batches of similar length
            flush()
    flush()
    return stats
