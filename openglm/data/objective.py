"""GLM's pretraining objective, autoregressive blank infilling (Du et al., ACL 2022), as pure functions.

One document of ``n`` tokens becomes one ``GLMSample``:

- Part A: the text with each sampled span replaced by ONE mask token (``[MASK]`` for token-level
  spans, ``[sMASK]`` for whole sentences, ``[gMASK]`` for the document's tail);
- Part B: the spans in shuffled order, each fed as ``<sop>`` + span and predicted up to ``<eop>``.

Part A attends to itself bidirectionally; Part B attends to Part A and to the Part B tokens before
it (``openglm.model.masks.packed_mask`` builds that from ``segment_ids``/``prefix_end``). Every
random choice comes from the ``numpy.random.Generator`` passed in, so a seed fixes the output.

Length budget: a chunk of ``n`` tokens with ``k`` spans becomes ``n + 2k`` tokens (one mask per span
in Part A, one ``<sop>`` per span in Part B). Span sampling stops as soon as ``ratio * n`` tokens are
covered and every span has at least one token, so ``k <= ceil(ratio * n)``; ``[gMASK]`` adds 2 and
causal LM adds 0. Documents are therefore split by ``chunk_document`` BEFORE corruption, into chunks
of at most ``max_chunk_tokens(seq_len, ratio)`` tokens, and every corrupted chunk fits ``seq_len``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Collection, Mapping, Sequence

import numpy as np

from openglm.errors import OpenGLMError

IGNORE_INDEX = -100  # targets at positions without a loss (Part A, padding)

_SPECIAL_TOKENS = {"mask": "[MASK]", "smask": "[sMASK]", "gmask": "[gMASK]",
                   "sop": "<sop>", "eop": "<eop>", "eos": "<|endoftext|>"}

OBJECTIVES = ("token", "sentence", "document", "causal")
GLM_10B_WEIGHTS = MappingProxyType({"token": 0.5, "sentence": 0.3, "document": 0.2, "causal": 0.0})


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens the objective writes; ``pad`` is the ``<|endoftext|>`` id."""

    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        """Look every special token up by name with ``tok.token_id(name)``."""
        ids = {field: int(tok.token_id(name)) for field, name in _SPECIAL_TOKENS.items()}
        return cls(**ids, pad=ids["eos"])


@dataclass
class GLMSample:
    """One corrupted document; every array is ``int64`` numpy, ``T = len(Part A) + len(Part B)``.

    input_ids ``[T]``: Part A then Part B.
    position_ids ``[2, T]``: row 0 is the position in Part A (a Part B token takes its span's mask
    position); row 1 is 0 in Part A and 1..len(span)+1 in Part B (``<sop>`` gets 1).
    targets ``[T]``: the next token inside each Part B span, ``<eop>`` after its last token,
    ``IGNORE_INDEX`` in Part A.
    prefix_len: ``len(Part A)``; 0 for causal LM.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    targets: np.ndarray
    prefix_len: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedRow:
    """Several samples laid end to end in one row of ``seq_len`` tokens, then padding.

    input_ids, targets, segment_ids, prefix_end ``[T]``; position_ids ``[2, T]``. ``segment_ids``
    numbers the samples 0, 1, ... and gives padding the next id; ``prefix_end`` is the absolute
    index where each token's sample's Part A ends, as ``packed_mask`` takes it.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    prefix_end: np.ndarray


def _truncated_poisson(lam: float, max_len: int) -> np.ndarray:
    """``[max_len]``: Poisson(lam) probabilities of lengths 1..max_len, renormalised."""
    k = np.arange(1, max_len + 1)
    log_pmf = k * math.log(lam) - lam - np.array([math.lgamma(i + 1) for i in k])
    pmf = np.exp(log_pmf)
    return pmf / pmf.sum()


def sample_span_lengths(num_tokens: int, rng: np.random.Generator, mask_ratio: float = 0.15,
                        lam: float = 3.0, max_len: int = 39) -> list[int]:
    """Span lengths drawn from Poisson(lam) over 1..max_len until they cover ``mask_ratio * num_tokens``.

    Lengths are capped at ``num_tokens``. A draw whose spans cannot be placed with one unmasked
    token between neighbours is thrown away and redrawn (GLM dropped such samples).
    """
    if num_tokens < 1:
        raise ValueError("cannot mask spans in an empty document")
    if not 0.0 < mask_ratio <= 0.5:  # above 0.5 a fitting draw may not exist
        raise ValueError(f"mask_ratio must be in (0, 0.5], got {mask_ratio}")
    max_len = min(max_len, num_tokens)
    pmf = _truncated_poisson(lam, max_len)
    while True:
        lengths: list[int] = []
        while sum(lengths) < mask_ratio * num_tokens:
            lengths.append(int(rng.choice(max_len, p=pmf)) + 1)
        if sum(lengths) + len(lengths) - 1 <= num_tokens:
            return lengths


def place_spans(num_tokens: int, lengths: Sequence[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random non-overlapping ``[start, end)`` spans of the given lengths, in that order along the text.

    Neighbouring spans keep at least one unmasked token between them; the remaining unmasked tokens
    are spread over the gaps by drawing one gap offset per span and sorting (GLM's method).
    """
    free = num_tokens - sum(lengths) - (len(lengths) - 1)  # unmasked tokens beyond the separators
    if lengths and free < 0:
        raise ValueError(f"spans of lengths {list(lengths)} do not fit in {num_tokens} tokens")
    offsets = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    spans, start = [], 0
    for offset, length in zip(offsets, lengths):
        spans.append((start + int(offset), start + int(offset) + length))
        start += length + 1
    return spans


def blank_infill(tokens: Sequence[int], spans: Sequence[tuple[int, int]], mask_id: int,
                 order: Sequence[int], special: SpecialIds) -> GLMSample:
    """Assemble Part A and Part B for sorted, non-overlapping ``spans``; Part B lists ``spans[order[0]]`` first."""
    tokens = np.asarray(tokens, dtype=np.int64)
    part_a: list[int] = []
    mask_pos = []  # where each span's mask token lands in Part A
    last = 0
    for start, end in spans:
        part_a.extend(tokens[last:start])
        mask_pos.append(len(part_a))
        part_a.append(mask_id)
        last = end
    part_a.extend(tokens[last:])
    a = len(part_a)
    ids, pos, block, targets = [part_a], [np.arange(a)], [np.zeros(a)], [np.full(a, IGNORE_INDEX)]
    for k in order:
        start, end = spans[k]
        span = tokens[start:end]
        ids.append(np.concatenate([[special.sop], span]))
        targets.append(np.concatenate([span, [special.eop]]))
        pos.append(np.full(len(span) + 1, mask_pos[k]))
        block.append(np.arange(1, len(span) + 2))

    def cat(parts):
        return np.concatenate(parts).astype(np.int64)

    return GLMSample(cat(ids), np.stack([cat(pos), cat(block)]), cat(targets), a)


def token_infill(tokens: Sequence[int], rng: np.random.Generator, special: SpecialIds,
                 mask_ratio: float = 0.15, lam: float = 3.0, max_len: int = 39) -> GLMSample:
    """Token-level blanks: Poisson-length spans covering >= ``mask_ratio`` of the text, each a ``[MASK]``."""
    lengths = sample_span_lengths(len(tokens), rng, mask_ratio, lam, max_len)
    spans = place_spans(len(tokens), lengths, rng)
    return blank_infill(tokens, spans, special.mask, rng.permutation(len(spans)), special)


def sentence_infill(tokens: Sequence[int], rng: np.random.Generator, special: SpecialIds,
                    sentence_end_ids: Collection[int], ratio: float = 0.15) -> GLMSample:
    """Sentence-level blanks: random whole sentences covering >= ``ratio`` of the text, each a ``[sMASK]``.

    A sentence ends at (and includes) each token whose id is in ``sentence_end_ids``; text after
    the last such token is one more sentence.
    """
    n = len(tokens)
    if n < 1:
        raise ValueError("cannot mask sentences in an empty document")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    ends = set(sentence_end_ids)
    sentences, start = [], 0
    for i, token in enumerate(tokens):
        if token in ends:
            sentences.append((start, i + 1))
            start = i + 1
    if start < n:
        sentences.append((start, n))
    chosen, covered = [], 0
    for k in rng.permutation(len(sentences)):
        chosen.append(sentences[k])
        covered += sentences[k][1] - sentences[k][0]
        if covered >= ratio * n:
            break
    return blank_infill(tokens, sorted(chosen), special.smask, rng.permutation(len(chosen)), special)


def document_infill(tokens: Sequence[int], rng: np.random.Generator, special: SpecialIds,
                    min_ratio: float = 0.5, max_ratio: float = 1.0) -> GLMSample:
    """Document-level blank: the tail, of a length uniform over [min_ratio*n, max_ratio*n], becomes one ``[gMASK]``."""
    n = len(tokens)
    if n < 1:
        raise ValueError("cannot mask the tail of an empty document")
    if not 0.0 <= min_ratio <= max_ratio <= 1.0:
        raise ValueError(f"need 0 <= min_ratio <= max_ratio <= 1, got {min_ratio}, {max_ratio}")
    low = max(1, math.ceil(min_ratio * n))
    high = max(low, math.floor(max_ratio * n))
    tail = int(rng.integers(low, high + 1))
    return blank_infill(tokens, [(n - tail, n)], special.gmask, [0], special)


def causal_lm(tokens: Sequence[int], special: SpecialIds) -> GLMSample:
    """Plain left-to-right LM in the same format: no Part A, row 0 = 0..T-1, row 1 = 0.

    ``special`` is unused and kept so that all objectives share one call shape.
    """
    ids = np.asarray(tokens, dtype=np.int64)
    targets = np.concatenate([ids[1:], [IGNORE_INDEX]]).astype(np.int64)  # the last token has no next
    position_ids = np.stack([np.arange(len(ids)), np.zeros(len(ids))]).astype(np.int64)
    return GLMSample(ids, position_ids, targets, 0)


def mixture(tokens: Sequence[int], rng: np.random.Generator, special: SpecialIds,
            weights: Mapping[str, float] = GLM_10B_WEIGHTS, *, sentence_end_ids: Collection[int] = (),
            mask_ratio: float = 0.15, min_ratio: float = 0.5, max_ratio: float = 1.0) -> GLMSample:
    """Corrupt one document with one objective picked by ``weights`` (keys from ``OBJECTIVES``).

    ``mask_ratio`` is used by both token- and sentence-level blanks; ``min_ratio``/``max_ratio``
    by the document-level one. The default weights are GLM-10B's 0.5/0.3/0.2.
    """
    unknown = set(weights) - set(OBJECTIVES)
    if unknown:
        raise OpenGLMError(f"unknown objectives {sorted(unknown)}; choose from {list(OBJECTIVES)}")
    names = list(weights)
    p = np.array([weights[name] for name in names], dtype=np.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise OpenGLMError(f"objective weights must be >= 0 with a positive sum, got {dict(weights)}")
    if weights.get("sentence", 0) > 0 and not sentence_end_ids:
        raise OpenGLMError("sentence-level blanks need sentence_end_ids (ids of '.', '?', '\\n', ...)")
    name = names[rng.choice(len(names), p=p / p.sum())]
    if name == "token":
        return token_infill(tokens, rng, special, mask_ratio)
    if name == "sentence":
        return sentence_infill(tokens, rng, special, sentence_end_ids, mask_ratio)
    if name == "document":
        return document_infill(tokens, rng, special, min_ratio, max_ratio)
    return causal_lm(tokens, special)


def reconstruct(sample: GLMSample) -> np.ndarray:
    """The original text, rebuilt from Part A and Part B (Part B spans are found by ``<sop>`` at block position 1)."""
    if sample.prefix_len == 0:
        return sample.input_ids.copy()
    part_a = sample.input_ids[: sample.prefix_len]
    spans: dict[int, np.ndarray] = {}  # mask position in Part A -> span tokens
    starts = np.flatnonzero(sample.position_ids[1] == 1)
    for start, end in zip(starts, list(starts[1:]) + [len(sample)]):
        spans[int(sample.position_ids[0, start])] = sample.input_ids[start + 1 : end]
    pieces = [spans[i] if i in spans else part_a[i : i + 1] for i in range(len(part_a))]
    return np.concatenate(pieces).astype(np.int64)


def max_chunk_tokens(seq_len: int, mask_ratio: float = 0.15) -> int:
    """Largest chunk whose corrupted sample, at most ``n + 2 * ceil(mask_ratio * n)`` tokens, fits ``seq_len``."""
    n = int(seq_len / (1 + 2 * mask_ratio))
    while n > 0 and n + 2 * max(1, math.ceil(mask_ratio * n)) > seq_len:
        n -= 1
    if n < 1:
        raise OpenGLMError(f"seq_len={seq_len} is too short for blank infilling")
    return n


def chunk_document(tokens: Sequence[int], max_tokens: int) -> list[np.ndarray]:
    """Split a document into the fewest near-equal chunks of at most ``max_tokens`` (none very short)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) == 0:
        return []
    return list(np.array_split(tokens, math.ceil(len(tokens) / max_tokens)))


def pack(samples: Sequence[GLMSample], seq_len: int, pad_id: int) -> PackedRow:
    """Lay ``samples`` end to end in one row and pad it to ``seq_len``.

    Padding gets ``pad_id``, position 0, target ``IGNORE_INDEX`` and its own segment id, so no
    document ever sees it.
    """
    total = sum(len(s) for s in samples)
    if total > seq_len:
        raise OpenGLMError(f"samples of {total} tokens do not fit a row of {seq_len}; "
                           f"chunk documents to max_chunk_tokens({seq_len}) before corrupting them")
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    position_ids = np.zeros((2, seq_len), dtype=np.int64)
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    segment_ids = np.full(seq_len, len(samples), dtype=np.int64)
    prefix_end = np.full(seq_len, total, dtype=np.int64)  # padding: starts at `total`, no prefix
    start = 0
    for segment, sample in enumerate(samples):
        end = start + len(sample)
        input_ids[start:end] = sample.input_ids
        position_ids[:, start:end] = sample.position_ids
        targets[start:end] = sample.targets
        segment_ids[start:end] = segment
        prefix_end[start:end] = start + sample.prefix_len
        start = end
    return PackedRow(input_ids, position_ids, targets, segment_ids, prefix_end)


def collate(rows: Sequence[PackedRow]) -> dict:
    """Stack packed rows into torch tensors for the model.

    Returns ``input_ids [B, T]``, ``position_ids [B, 2, T]``, ``position_ids_1d [B, T]`` (row 0 +
    row 1: a Part B token sits at its mask's position plus its offset in the span, so 1D-rotary
    models still never see a span's length), ``targets [B, T]`` and ``attention_mask [B, T, T]``
    (bool, True = may attend).
    """
    import torch

    from openglm.model.masks import packed_mask

    def stack(name):
        return torch.from_numpy(np.stack([getattr(row, name) for row in rows]))

    position_ids = stack("position_ids")
    return {
        "input_ids": stack("input_ids"),
        "position_ids": position_ids,
        "position_ids_1d": position_ids.sum(dim=1),
        "targets": stack("targets"),
        "attention_mask": packed_mask(stack("segment_ids"), stack("prefix_end")),
    }
