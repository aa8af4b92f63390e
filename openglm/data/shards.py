"""Read the token shards written by ``openglm data prepare``: memory-mapped, read-only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import OpenGLMError


class TokenShards:
    """The documents of one split of a prepared data directory.

    Documents are numbered ``0..num_documents-1`` in input order; each is a read-only ``uint32`` view
    into a memory-mapped shard, without EOS (see ``openglm.data.prepare``).
    """

    def __init__(self, directory: str | Path, split: str = "train"):
        directory = Path(directory)
        path = directory / "manifest.json"
        if not path.is_file():
            raise OpenGLMError(f"{directory} is not a prepared data directory (no manifest.json)")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        state = manifest["splits"].get(split)
        if state is None:
            raise OpenGLMError(f"{directory} has no split {split!r} (it has: {', '.join(manifest['splits'])})")
        if not state["complete"]:
            raise OpenGLMError(f"split {split!r} of {directory} is incomplete: re-run `openglm data prepare`")
        self.directory = directory
        self.tokenizer_dir = directory / Path(manifest["tokenizer"]["path"]).parent
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.eos_id: int = manifest["tokenizer"]["eos_id"]
        self._langs: list[str] = manifest["langs"]
        self._tokens, self._offsets, self._lang_ids = [], [], []
        for shard in state["shards"]:
            base = directory / split / shard["name"]
            self._tokens.append(_open(base.with_suffix(".bin"), np.uint32, shard["tokens"]))
            self._offsets.append(_open(base.with_suffix(".idx"), np.int64, shard["documents"] + 1))
            self._lang_ids.append(_open(base.with_suffix(".lang"), np.uint16, shard["documents"]))
        # first[s] = global index of shard s's first document; first[-1] = num_documents.
        self._first = np.cumsum([0] + [s["documents"] for s in state["shards"]])
        self.num_documents = int(self._first[-1])
        self.num_tokens: int = state["tokens"]

    def max_token_id(self) -> int:
        """The largest token id in the split (-1 when it has none)."""
        return max((int(t.max()) for t in self._tokens if len(t)), default=-1)

    def __len__(self) -> int:
        """Number of tokens."""
        return self.num_tokens

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range (0..{self.num_documents - 1})")
        s = int(np.searchsorted(self._first, i, side="right")) - 1
        return s, i - int(self._first[s])

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``."""
        s, j = self._locate(i)
        return self._tokens[s][self._offsets[s][j] : self._offsets[s][j + 1]]

    def lang(self, i: int) -> str:
        """The ``"lang"`` tag of document ``i`` (``""`` when its input had none)."""
        s, j = self._locate(i)
        return self._langs[self._lang_ids[s][j]]

    def documents(self) -> Iterator[np.ndarray]:
        """All documents in input order."""
        for tokens, offsets in zip(self._tokens, self._offsets):
            for start, end in zip(offsets[:-1], offsets[1:]):
                yield tokens[start:end]

    def iter_documents(self, seed: int, start: int = 0) -> Iterator[np.ndarray]:
        """One epoch of documents in an order shuffled by ``seed``, beginning at position ``start``.

        To resume, store the number of documents consumed and pass it back as ``start`` with the same
        seed. Use a different seed per epoch (e.g. ``seed + epoch``) for a new order.
        """
        order = np.random.default_rng(seed).permutation(self.num_documents)
        for i in order[start:]:
            yield self.document(int(i))


def _open(path: Path, dtype, count: int) -> np.ndarray:
    """Memory-map ``count`` items of ``dtype`` from ``path``, checking the file has exactly that size."""
    size = path.stat().st_size if path.is_file() else -1
    if size != count * np.dtype(dtype).itemsize:
        raise OpenGLMError(f"{path} is missing or has the wrong size for {count} items: re-run `openglm data prepare`")
    if count == 0:  # a file of zero bytes cannot be mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
