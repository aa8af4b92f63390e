"""The serving KV cache: one row per batch slot, each filled to its own length."""

from __future__ import annotations

import torch

from ...model.kv_cache import KVCache, LatentKVCache


class SlotKVCache(KVCache):
    """A KV cache whose rows are independent slots, each filled to its own length.

    Before each forward, ``prepare(rows, counts)`` names the slots the forward runs on (its batch
    rows, in order) and how many new tokens each adds, and returns their position ids and attention
    mask; the model's ``update`` calls then write each row's new keys/values at that row's own
    length. The base class's single ``length`` counter, which the model sets after each forward,
    plays no part.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths = [0] * self.k.shape[1]  # positions filled per slot, kept on the host
        # The planned forward: which of its [B', T] queries are real tokens (None: all, T = 1), and
        # their slots and positions [N].
        self._write: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None
        self._read: slice | torch.Tensor = slice(0)  # the forward's slots: a slice (a view) when consecutive
        self._keys = 0  # S: keys returned per row, the longest planned row
        # Made once, not at every layer of every step: each layer's buffers, and as
        # [slots, max_length, K, D] views whose (slot, position) pairs index_put_ writes directly.
        self._layers = [(self.k[i], self.v[i], self.k[i].transpose(1, 2), self.v[i].transpose(1, 2))
                        for i in range(self.k.shape[0])]
        self._arange = torch.arange(self.max_length, device=self.device)
        self._rows: list[int] = []  # the last decode's slots, and their tensor
        self._slots = torch.zeros(0, dtype=torch.long, device=self.device)

    def prepare(self, rows: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan a forward adding ``counts[i]`` tokens to slot ``rows[i]``, and count them as filled.

        The forward's input is ``[B', T]`` with ``T = max(counts)``, each row's tokens at its end
        (left padding). Returns ``position_ids [B', T]`` (each row continues from its own length)
        and the bool ``attention_mask [B', T, S]``: a query at position ``p`` sees its row's keys
        ``0..p``, so keys past a shorter row's end, which hold stale values, stay hidden. Padding
        queries take earlier positions; their keys and values are never written.
        """
        device = self.device
        T = max(counts)
        starts = torch.tensor([self.lengths[r] for r in rows], device=device)[:, None]  # (B', 1)
        pads = torch.tensor([T - n for n in counts], device=device)[:, None]
        pos = starts - pads + torch.arange(T, device=device)  # (B', T)
        real = pos >= starts
        pos = pos.clamp(min=0)  # a padding query sees at least key 0, so its softmax is never empty
        self._keys = max(self.lengths[r] + n for r, n in zip(rows, counts))
        mask = torch.arange(self._keys, device=device) <= pos[..., None]  # (B', T, S)
        slots = torch.tensor(rows, device=device)
        self._write = (real, slots[:, None].expand_as(pos)[real], pos[real])
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self._read = slice(rows[0], rows[0] + len(rows)) if consecutive else slots
        for r, n in zip(rows, counts):
            self.lengths[r] += n
        return pos, mask

    def prepare_decode(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prepare(rows, [1] * len(rows))`` for a decode step, in a few operations: returns
        ``position_ids [B', 1]`` and ``attention_mask [B', 1, S]``, the same values ``prepare`` gives."""
        if rows != self._rows:  # the batch changed: its slots as a tensor, kept for the next steps
            self._rows, self._slots = list(rows), torch.tensor(rows, device=self.device)
        lengths = self.lengths
        starts = [lengths[r] for r in rows]
        pos = torch.tensor(starts, device=self.device)  # (B',)
        self._keys = max(starts) + 1
        mask = self._arange[: self._keys] <= pos[:, None]  # (B', S)
        self._write = (None, self._slots, pos)
        consecutive = rows[-1] - rows[0] == len(rows) - 1 and rows == list(range(rows[0], rows[-1] + 1))
        self._read = slice(rows[0], rows[0] + len(rows)) if consecutive else self._slots
        for r in rows:
            lengths[r] += 1
        return pos[:, None], mask[:, None]

    def prepare_packed(self, rows: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan a forward of one packed row: ``counts[i]`` tokens for slot ``rows[i]``, one slot after
        the other, no padding (decode steps and short prompt chunks together).

        Returns ``position_ids [1, N]`` and the bool ``attention_mask [1, N, S]`` over the keys of
        all those slots laid end to end (``S`` = the sum of their new lengths): a token sees its own
        slot's keys up to its position, nothing of the others.
        """
        device = self.device
        starts = [self.lengths[r] for r in rows]
        ends = [start + n for start, n in zip(starts, counts)]
        count_t, end_t = torch.tensor(counts, device=device), torch.tensor(ends, device=device)
        owner = torch.arange(len(rows), device=device)
        token_owner, key_owner = owner.repeat_interleave(count_t), owner.repeat_interleave(end_t)
        # position of each token / key within its own slot
        first_token = torch.cumsum(count_t, 0) - count_t
        token_pos = torch.arange(len(token_owner), device=device) - first_token[token_owner] + torch.tensor(
            starts, device=device)[token_owner]
        first_key = torch.cumsum(end_t, 0) - end_t
        key_pos = torch.arange(len(key_owner), device=device) - first_key[key_owner]
        slots = torch.tensor(rows, device=device)
        mask = (token_owner[:, None] == key_owner) & (key_pos <= token_pos[:, None])  # (N, S)
        self._write = (torch.ones(1, len(token_owner), dtype=torch.bool, device=device), slots[token_owner], token_pos)
        self._read = (slots[key_owner], key_pos)
        for r, n in zip(rows, counts):
            self.lengths[r] += n
        return token_pos[None], mask[None]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the real tokens of ``k, v [B', K, T, D]`` at their planned positions; return the
        planned rows' keys/values ``[B', K, S, D]`` (packed: ``[1, K, S, D]``, the slots end to end)."""
        real, slots, pos = self._write
        k_all, v_all, k_rows, v_rows = self._layers[layer]
        # (slot, position) pairs index [slots, max_length, K, D] to (N, K, D), as k.transpose(1, 2)[real] is.
        if real is None:  # a decode step: one real token per row
            k_rows.index_put_((slots, pos), k[:, :, 0])
            v_rows.index_put_((slots, pos), v[:, :, 0])
        else:
            k_rows.index_put_((slots, pos), k.transpose(1, 2)[real])
            v_rows.index_put_((slots, pos), v.transpose(1, 2)[real])
        if isinstance(self._read, tuple):  # packed: gather each slot's keys, (S, K, D) -> (1, K, S, D)
            key_slots, key_pos = self._read
            return (k_all[key_slots, :, key_pos].transpose(0, 1)[None],
                    v_all[key_slots, :, key_pos].transpose(0, 1)[None])
        return k_all[self._read, :, : self._keys], v_all[self._read, :, : self._keys]

    @property
    def plan(self) -> tuple:
        """The planned forward (what ``prepare``/``prepare_packed`` set): save it before planning
        another forward in the middle of this one, and set it back to go on with this one."""
        return self._write, self._read, self._keys

    @plan.setter
    def plan(self, plan: tuple) -> None:
        self._write, self._read, self._keys = plan

    def keep(self, slot: int, n: int, source: int | None = None) -> None:
        """Start ``slot`` over with its first ``n`` positions kept (those of slot ``source``, copied, if
        given): a new request whose prompt begins with those tokens is filled to ``n`` already. The
        keys past ``n`` stay in memory but are never visible again."""
        if source is not None and source != slot and n:
            self._copy(source, slot, n)
        self.lengths[slot] = n

    def _copy(self, source: int, slot: int, n: int) -> None:
        self.k[:, slot, :, :n] = self.k[:, source, :, :n]  # (layers, K, n, D)
        self.v[:, slot, :, :n] = self.v[:, source, :, :n]


class SlotLatentKVCache(SlotKVCache, LatentKVCache):
    """``SlotKVCache``'s slots and planning over a ``LatentKVCache``'s buffers (latent-attention models): each
    slot keeps per token the latent and the rotary key (and, for sparse attention, the indexer keys)."""

    max_length = LatentKVCache.max_length

    def __init__(self, *args, **kwargs):
        LatentKVCache.__init__(self, *args, **kwargs)  # its buffers, not KVCache's
        self.lengths = [0] * self.latent.shape[1]
        self._write, self._read, self._keys = None, slice(0), 0
        self._arange = torch.arange(self.max_length, device=self.device)
        self._rows, self._slots = [], torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.latent.device

    def _planned(self, buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Write the real tokens of ``x [B', T, W]`` into ``buffer [slots, max_length, W]`` at their planned
        positions; return the planned rows' entries ``[B', S, W]`` (packed: ``[1, S, W]``, the slots end to end)."""
        real, slots, pos = self._write
        buffer.index_put_((slots, pos), x[:, 0] if real is None else x[real])
        if isinstance(self._read, tuple):
            key_slots, key_pos = self._read
            return buffer[key_slots, key_pos][None]
        return buffer[self._read, : self._keys]

    def _copy(self, source: int, slot: int, n: int) -> None:
        self.latent[:, slot, :n] = self.latent[:, source, :n]  # (layers, n, width)
        self.index[:, slot, :n] = self.index[:, source, :n]

    def update(self, layer: int, entry: torch.Tensor) -> torch.Tensor:
        return self._planned(self.latent[layer], entry)

    def update_index(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        return self._planned(self.index[self.index_slot[layer]], k)
