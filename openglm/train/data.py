"""Pretraining batches: token shards -> GLM objective -> greedy packing -> tensors, resumable exactly.

Each document is read from ``TokenShards`` in a seeded shuffled order (a new order each epoch),
optionally ends with ``<|endoftext|>``, is split by ``chunk_document`` so that every corrupted chunk
fits a row, and each chunk is corrupted by ``mixture`` with the loader's own
``numpy.random.Generator``. Samples fill a row of ``seq_len`` tokens in order until the next one does
not fit; the row is then padded and a new one starts with that sample.

The whole state (epoch, documents consumed, RNG state, samples already corrupted but not yet in an
emitted row) is a plain JSON-able dict: ``state_dict()`` / ``load_state_dict()`` restore the stream
exactly. Every data-parallel rank runs the same stream and keeps the rows ``rank::world_size`` of each
global batch, so that N processes x B/N rows see exactly the batch one process x B sees.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping

import numpy as np

from ..data.objective import (
    GLM_10B_WEIGHTS,
    IGNORE_INDEX,
    OBJECTIVES,
    GLMSample,
    PackedRow,
    SpecialIds,
    chunk_document,
    collate,
    max_chunk_tokens,
    mixture,
    pack,
)
from ..errors import OpenGLMError

SENTENCE_ENDS = ("。", "！", "？", ".", "!", "?", "\n")


def parse_objective(text: str) -> dict[str, float]:
    """``"token=0.5,sentence=0.3,document=0.2,causal=0"`` -> weights; names left out weigh 0."""
    weights = dict.fromkeys(OBJECTIVES, 0.0)
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in OBJECTIVES:
            raise OpenGLMError(f"bad objective {item!r}: expected NAME=WEIGHT with NAME in {', '.join(OBJECTIVES)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise OpenGLMError(f"bad objective weight {value!r} for {name!r}") from None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise OpenGLMError(f"objective weights must be >= 0 with a positive sum, got {text!r}")
    return weights


def sentence_end_ids(tok) -> list[int]:
    """Ids of the sentence-ending marks in ``SENTENCE_ENDS`` that the tokenizer holds as single tokens."""
    ids = []
    for mark in SENTENCE_ENDS:
        encoded = tok.encode(mark)
        if len(encoded) == 1:
            ids.append(encoded[0])
    return ids


class PackedBatches:
    """An endless, exactly resumable stream of packed GLM rows from one split of token shards.

    shards: a ``TokenShards``; special: ``SpecialIds``; weights: objective weights (see ``mixture``).
    append_eos: end every document with ``<|endoftext|>`` before chunking.
    """

    def __init__(self, shards, seq_len: int, special: SpecialIds, seed: int,
                 weights: Mapping[str, float] = GLM_10B_WEIGHTS, sentence_end_ids=(),
                 mask_ratio: float = 0.15, append_eos: bool = True):
        if shards.num_documents == 0:
            raise OpenGLMError(f"{shards.directory} has no documents")
        self.shards, self.seq_len, self.special, self.seed = shards, seq_len, special, seed
        self.weights, self.sentence_end_ids = dict(weights), list(sentence_end_ids)
        self.mask_ratio, self.append_eos = mask_ratio, append_eos
        self.chunk_tokens = max_chunk_tokens(seq_len, mask_ratio)
        self.rng = np.random.default_rng(seed)
        self.epoch, self.position = 0, 0  # documents consumed in this epoch
        self.row: list[GLMSample] = []  # samples of the row being filled
        self.queue: deque[GLMSample] = deque()  # corrupted samples not yet placed
        self._documents: Iterator[np.ndarray] | None = None

    def _next_document(self) -> np.ndarray:
        if self._documents is None:
            # One seed per epoch: a new order each pass over the data.
            self._documents = self.shards.iter_documents(self.seed + self.epoch, start=self.position)
        for doc in self._documents:
            self.position += 1
            return doc
        self.epoch, self.position, self._documents = self.epoch + 1, 0, None
        return self._next_document()

    def _refill(self) -> None:
        while not self.queue:
            doc = self._next_document().astype(np.int64)
            if self.append_eos:
                doc = np.append(doc, self.special.eos)
            for chunk in chunk_document(doc, self.chunk_tokens):
                self.queue.append(mixture(chunk, self.rng, self.special, self.weights,
                                          sentence_end_ids=self.sentence_end_ids, mask_ratio=self.mask_ratio))

    def next_row(self) -> PackedRow:
        """The next row of ``seq_len`` tokens: whole samples laid end to end, then padding."""
        while True:
            if not self.queue:
                self._refill()
            used = sum(len(s) for s in self.row)
            if self.row and used + len(self.queue[0]) > self.seq_len:
                row, self.row = self.row, []
                return pack(row, self.seq_len, self.special.pad)
            self.row.append(self.queue.popleft())

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[dict, int]:
        """``(collate of this rank's rows rank::world_size, targets in all batch_size rows)``.

        The count covers every rank's rows, so each rank knows the global loss denominator.
        """
        rows = [self.next_row() for _ in range(batch_size)]
        num_targets = sum(int((row.targets != IGNORE_INDEX).sum()) for row in rows)
        return collate(rows[rank::world_size]), num_targets

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly, as JSON-able Python values."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "rng": self.rng.bit_generator.state,
            "row": [_sample_to_dict(s) for s in self.row],
            "queue": [_sample_to_dict(s) for s in self.queue],
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.rng.bit_generator.state = state["rng"]
        self.row = [_sample_from_dict(s) for s in state["row"]]
        self.queue = deque(_sample_from_dict(s) for s in state["queue"])
        self._documents = None


def _sample_to_dict(s: GLMSample) -> dict:
    return {"input_ids": s.input_ids.tolist(), "position_ids": s.position_ids.tolist(),
            "targets": s.targets.tolist(), "prefix_len": int(s.prefix_len)}


def _sample_from_dict(d: dict) -> GLMSample:
    return GLMSample(np.asarray(d["input_ids"], dtype=np.int64), np.asarray(d["position_ids"], dtype=np.int64),
                     np.asarray(d["targets"], dtype=np.int64), d["prefix_len"])
