"""A preallocated key/value cache: written in place, never grown, never saved."""

from __future__ import annotations

import torch
import torch.nn as nn


class KVCache(nn.Module):
    """Keys and values of every layer, ``[layers, B, K, max_length, D]``, filled up to ``length``.

    The buffers are non-persistent, so a cache never reaches a checkpoint. ``length`` is the
    number of positions written so far; the model advances it after each forward.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
                 dtype=torch.float32, device=None):
        super().__init__()
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v [B, K, T, D]`` at ``length`` and return the filled keys/values ``[B, K, length+T, D]``."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_length} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.length = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (e.g. after some sequences finished)."""
        self.k = self.k[:, rows].contiguous()
        self.v = self.v[:, rows].contiguous()


class StaticKVCache(KVCache):
    """A ``KVCache`` whose ``update`` keeps every shape fixed, so one compiled decode step serves all steps.

    Before each forward the caller sets ``slots``, the cache positions ``[T]`` (a long tensor) the new
    keys/values go to; ``update`` writes them there and returns all ``max_length`` slots. The
    attention mask must then cover all ``max_length`` keys and hide the slots not yet written.
    ``length`` keeps its meaning (the model's ``forward`` advances it; a caller that runs the
    decoder directly advances it itself).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
                 dtype=torch.float32, device=None):
        nn.Module.__init__(self)  # not KVCache's: no [layers, ...] buffers
        # One tensor per layer (not views of one buffer, which alias): a compiled step then writes
        # each in place, where a write into a slice of one [layers, ...] buffer made inductor copy
        # the whole buffer at every layer.
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.k_layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k = self.v = None
        self.length = 0
        self.slots = torch.zeros(1, dtype=torch.long, device=device)

    @property
    def max_length(self) -> int:
        return self.k_layers[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v [B, K, T, D]`` at ``slots`` and return all keys/values ``[B, K, max_length, D]``."""
        self.k_layers[layer].index_copy_(2, self.slots, k)
        self.v_layers[layer].index_copy_(2, self.slots, v)
        return self.k_layers[layer], self.v_layers[layer]


class LatentKVCache(nn.Module):
    """The cache of multi-head latent attention: per layer and token only the normalised key/value
    latent and the rotated rotary key, ``latent [layers, B, max_length, kv_lora_rank + qk_rope_head_dim]``
    (never the per-head keys and values, which decoding never rebuilds), plus, for sparse attention,
    the indexer's key of each layer that runs an indexer, ``index [full layers, B, max_length, index_head_dim]``.

    Non-persistent buffers, written in place at ``length``, which the model advances after each forward.
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, width: int, index_layers: list[int] = (),
                 index_width: int = 0, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("latent", torch.zeros(num_layers, batch_size, max_length, width, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("index", torch.zeros(len(index_layers), batch_size, max_length, index_width, dtype=dtype,
                                                  device=device), persistent=False)
        self.index_slot = {layer: i for i, layer in enumerate(index_layers)}
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.latent.shape[2]

    def _append(self, buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        start, end = self.length, self.length + x.shape[1]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_length} allocated")
        buffer[:, start:end] = x
        return buffer[:, :end]

    def update(self, layer: int, entry: torch.Tensor) -> torch.Tensor:
        """Write ``entry [B, T, width]`` at ``length``; return the layer's filled entries ``[B, length+T, width]``."""
        return self._append(self.latent[layer], entry)

    def update_index(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """The same for the indexer keys ``[B, T, index_head_dim]`` of ``layer``."""
        return self._append(self.index[self.index_slot[layer]], k)

    def reset(self) -> None:
        self.length = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (e.g. after some sequences finished)."""
        self.latent = self.latent[:, rows].contiguous()
        self.index = self.index[:, rows].contiguous()
