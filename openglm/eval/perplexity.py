"""Perplexity of a model on documents, per language: per token and in bits per character.

Each document is scored on its own, starting from ``<|endoftext|>`` (when the tokenizer has it) so
that its first token is predicted too: the NLL then covers every character of the document, which
makes bits per character honest and comparable across tokenizers. A document longer than the
window is scored in windows of ``seq_len`` tokens advancing by ``stride``; each token is scored once,
with at least ``seq_len - stride`` tokens of context once the document is that long.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PerplexityStats:
    documents: int = 0
    tokens: int = 0  # tokens predicted
    chars: int = 0
    nll: float = 0.0  # summed negative log-likelihood, nats

    @property
    def nll_per_token(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def bits_per_char(self) -> float:
        return self.nll / math.log(2) / max(self.chars, 1)

    def add(self, other: "PerplexityStats") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.chars += other.chars
        self.nll += other.nll

    def as_dict(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "chars": self.chars, "nll_per_token": self.nll_per_token,
                "perplexity": self.perplexity, "bits_per_char": self.bits_per_char}


def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, first_scored, end)`` spans covering targets ``1..n-1`` of an ``n``-token sequence.

    The window ``ids[begin:end]`` predicts ``ids[first_scored:end]``; every target appears once.
    """
    out, pos = [], 1
    while pos < n:
        end = min(pos + stride, n)
        begin = max(0, end - seq_len)
        out.append((begin, pos, end))
        pos = end
    return out


@torch.inference_mode()
def score_windows(model, batch: list[tuple[list[int], int]]) -> list[float]:
    """Summed NLL for each ``(ids, first_scored)``: tokens ``ids[first_scored:]`` given what precedes them."""
    device = model.lm_head.weight.device
    T = max(len(ids) for ids, _ in batch)
    x = torch.zeros(len(batch), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(batch), T, dtype=torch.long, device=device)
    for i, (ids, _) in enumerate(batch):
        x[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1  # right padding: positions of real tokens stay 0..len-1
    logp = F.log_softmax(model(x, attention_mask=mask).float(), dim=-1)  # (B, T, V)
    out = []
    for i, (ids, first) in enumerate(batch):
        targets = torch.tensor(ids[first:], device=device)
        out.append(-float(logp[i, first - 1 : len(ids) - 1].gather(-1, targets[:, None]).sum()))
    return out


def perplexity(model, tokenizer, documents: Iterable[tuple[str, str]], seq_len: int = 512, stride: int | None = None,
               batch_size: int = 8, bar=None) -> dict[str, PerplexityStats]:
    """Stats per language tag (and ``"all"``) over ``documents``, an iterable of ``(text, lang)``."""
    stride = stride or seq_len // 2
    if not 0 < stride <= seq_len - 1:
        raise ValueError(f"stride must be in 1..seq_len-1, got {stride}")
    bos = [tokenizer.eos_id] if "<|endoftext|>" in tokenizer.special_ids else []
    stats: dict[str, PerplexityStats] = {"all": PerplexityStats()}
    pending: list[tuple[list[int], int, str]] = []

    def flush():
        for (_, _, lang), nll in zip(pending, score_windows(model, [(ids, f) for ids, f, _ in pending])):
            stats[lang].nll += nll
        pending.clear()

    for text, lang in documents:
        ids = bos + tokenizer.encode(text)
        lang = lang or "untagged"
        doc = stats.setdefault(lang, PerplexityStats())
        doc.documents += 1
        doc.chars += len(text)
        doc.tokens += len(ids) - 1
        for begin, first, end in windows(len(ids), seq_len, stride):
            pending.append((ids[begin:end], first - begin, lang))
            if len(pending) == batch_size:
                flush()
        if bar is not None:
            bar.update(1)
    if pending:
        flush()
    for lang, s in list(stats.items()):
        if lang != "all":
            stats["all"].add(s)
    return stats
