"""The model runner: the model, the slot KV cache it fills, and the sampling of each row's next token.

The engine core tells it which slots feed which tokens; the runner builds the forward's inputs
(positions and masks from the cache's plan), runs it and samples. It places each new request in a
slot, and a prompt that begins like one the cache holds (a shared system prompt, the earlier turns
of a conversation) skips the prefill of that prefix (``place``). Preemption is its job too: with
``on_layer`` set, a decode or packed forward calls it between two layers (forward hooks on the
decoder layers, so the model knows nothing of serving); whatever forwards ``on_layer`` runs there,
the paused forward then goes on with its own cache plan.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ...infer.sampling import SamplingParams, sample_each
from ...model.glm import use_decode_layout
from .cache import SlotKVCache, SlotLatentKVCache


class SamplingState(Protocol):
    """What sampling reads of a request: its parameters, its generator and its tokens so far."""

    params: SamplingParams
    generator: torch.Generator | None
    ids: list[int]  # prompt, then generated tokens
    logprobs: int | None  # top alternatives to return with each token (None: no logprobs)


class Resident(Protocol):
    """What a slot's keys are of: a request's tokens, the first ``cached`` of them in the cache."""

    ids: list[int]
    cache_scope: str | None  # prefixes are shared between requests of the same scope only

    @property
    def cached(self) -> int: ...


def _common_prefix(a: list[int], n: int, b: list[int]) -> int:
    """How many of the first ``n`` tokens of ``a`` begin ``b`` too."""
    n = min(n, len(b))
    if not n or a[0] != b[0]:  # the usual case for unrelated prompts: no lists copied
        return 0
    if a[:n] == b[:n]:  # compared in C
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


Sampled = tuple[int, float | None, list[tuple[int, float]] | None]  # (token, its logprob, top alternatives)


class ModelRunner:
    """Runs ``model`` over ``max_batch_size`` cache slots of ``max_seq_len`` positions each."""

    def __init__(self, model, max_batch_size: int, max_seq_len: int):
        config = model.config
        use_decode_layout(model)  # as generate() does: same values, faster few-row products
        weight = model.model.norm.weight  # never quantized: the cache's dtype and device
        self.model, self.device = model, weight.device
        if config.kv_lora_rank:
            self.cache = SlotLatentKVCache(config.num_layers, max_batch_size, max_seq_len, config.kv_cache_width,
                                           config.index_layers, config.index_head_dim, dtype=weight.dtype,
                                           device=weight.device)
        else:
            self.cache = SlotKVCache(config.num_layers, max_batch_size, config.num_kv_heads, max_seq_len,
                                     config.head_dim, dtype=weight.dtype, device=weight.device)
        self._rows: list[Resident | None] = [None] * max_batch_size  # each slot's last request
        self._placements = itertools.count(1)
        self._placed = [0] * max_batch_size  # when each slot was last given a request
        self.on_layer: Callable[[], None] | None = None  # called between two layers of a decode/packed forward
        self._pausing = False  # inside on_layer: the forwards it runs are not paused in turn
        self._planned = 0  # forwards planned on the cache so far

    def place(self, request: Resident, free: list[int]) -> tuple[int, int]:
        """Give ``request`` (its ``ids`` the prompt) one of the ``free`` slots, with the longest prefix of
        its prompt that some slot holds already (a shared system prompt, an earlier turn) for a request
        of the same ``cache_scope``: that slot if it is free, else a copy of it. Returns (slot, prompt
        tokens cached).

        What a slot holds is read off its last request, running or ended: the first ``cached`` of its
        ``ids``. One prompt token at least is left to feed, for the logits of the first new token.
        """
        prompt, limit, scope = request.ids, len(request.ids) - 1, request.cache_scope
        source, best = None, 0
        for slot, row in enumerate(self._rows):
            if row is None or row.cache_scope != scope:
                continue
            if (n := _common_prefix(row.ids, min(row.cached, limit), prompt)) > best:
                source, best = slot, n
        if source in free:
            slot = source
        else:  # an unused slot, else the one whose last request came longest ago
            slot = min(free, key=lambda s: self._placed[s])
        self.cache.keep(slot, best, source)
        self._rows[slot] = request
        self._placed[slot] = next(self._placements)
        return slot, best

    def prefill(self, slots: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """Feed ``chunks[i]`` to slot ``slots[i]`` in one left-padded forward; logits ``[B', V]`` of each
        row's last token."""
        T = max(map(len, chunks))
        # Left padding repeats a row's first new token: padding keys are never written anyway.
        ids = torch.tensor([c[:1] * (T - len(c)) + c for c in chunks], device=self.device)  # (B', T)
        pos, mask = self._prepare(slots, [len(c) for c in chunks])
        return self.model(ids, pos, mask, self.cache, logits_to_keep=1)[:, -1]

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One token per slot in one batched forward; logits ``[B', V]``."""
        self._planned += 1
        pos, mask = self.cache.prepare_decode(slots)
        h = self._layers(torch.tensor(tokens, device=self.device)[:, None], pos, mask[:, None])  # (B', 1, C)
        return self.model.lm_head(h[:, -1])

    def packed(self, slots: list[int], chunks: list[list[int]], keep: list[int]) -> torch.Tensor:
        """Feed ``chunks[i]`` to slot ``slots[i]``, all in one row with no padding; logits ``[len(keep), V]``
        of the last tokens of the chunks ``keep`` names."""
        counts = [len(c) for c in chunks]
        pos, mask = self._prepare(slots, counts, packed=True)
        ids = torch.tensor([[t for c in chunks for t in c]], device=self.device)  # (1, N)
        h = self._layers(ids, pos, mask[:, None])  # (1, N, C)
        ends = torch.tensor(counts).cumsum(0) - 1  # each chunk's last token
        return self.model.lm_head(h[0, ends[keep]])

    def _prepare(self, slots: list[int], counts: list[int], packed: bool = False):
        self._planned += 1
        return (self.cache.prepare_packed if packed else self.cache.prepare)(slots, counts)

    def _layers(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B', T, C]``, calling ``on_layer`` after each decoder layer if it is set."""
        if self.on_layer is None or self._pausing:
            return self.model.model(ids, pos, mask, self.cache)
        hooks = [layer.register_forward_hook(self._between_layers) for layer in self.model.model.layers]
        try:
            return self.model.model(ids, pos, mask, self.cache)
        finally:
            for hook in hooks:
                hook.remove()

    def _between_layers(self, *_) -> None:
        if self._pausing:  # a layer of a forward that on_layer itself runs
            return
        plan, planned, self._pausing = self.cache.plan, self._planned, True
        try:
            self.on_layer()
        finally:
            self._pausing = False
            if self._planned != planned:  # on_layer ran forwards of its own: back to this one's plan
                self.cache.plan = plan

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingState]) -> list[Sampled]:
        """The next token of each row of ``logits [B', V]``, with its own parameters and generator (rows
        sharing their settings in one call); with their logprobs where a row asks for them."""
        tokens = sample_each(logits, [r.params for r in rows], [r.generator for r in rows], [r.ids for r in rows])
        asking = [i for i, r in enumerate(rows) if r.logprobs is not None]
        if not asking:
            return [(t, None, None) for t in tokens]
        out: list[Sampled] = [(t, None, None) for t in tokens]
        logprobs = logits[asking].float().log_softmax(-1)  # (R, V)
        k = max(rows[i].logprobs for i in asking)
        top = logprobs.topk(k) if k else None
        for j, i in enumerate(asking):
            n = rows[i].logprobs
            alternatives = list(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist())) if n else []
            out[i] = (tokens[i], float(logprobs[j, tokens[i]]), alternatives)
        return out
