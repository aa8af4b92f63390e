"""The serving cache's decode plan (``prepare_decode``) against the general one (``prepare``)."""

import pytest
import torch

from openglm.serve.engine.cache import SlotKVCache, SlotLatentKVCache


def _filled(cls, lengths):
    torch.manual_seed(0)
    if cls is SlotKVCache:
        cache = SlotKVCache(2, len(lengths), 2, 16, 4)  # layers, slots, K, max_length, D
        cache.k.normal_(), cache.v.normal_()
    else:
        cache = SlotLatentKVCache(2, len(lengths), 16, 6, [0, 1], 3)  # layers, slots, max_length, width, index layers, their width
        cache.latent.normal_(), cache.index.normal_()
    cache.lengths = list(lengths)
    return cache


def _step(cache, layer, rows, new):
    """Write ``new`` for ``rows`` at the planned positions; what the layer reads back."""
    if isinstance(cache, SlotLatentKVCache):
        return [cache.update(layer, new[0][:, 0]), cache.update_index(layer, new[1][:, 0])]
    return list(cache.update(layer, *new))


@pytest.mark.parametrize("cls", [SlotKVCache, SlotLatentKVCache])
@pytest.mark.parametrize("rows", [[1, 2, 3], [3, 0, 2], [2]])
def test_prepare_decode_plans_and_writes_as_prepare_does(cls, rows):
    lengths = [5, 0, 9, 2]
    general, decode = _filled(cls, lengths), _filled(cls, lengths)
    pos, mask = general.prepare(rows, [1] * len(rows))
    pos_d, mask_d = decode.prepare_decode(rows)
    assert torch.equal(pos, pos_d) and torch.equal(mask, mask_d)
    assert general.lengths == decode.lengths == [n + (i in rows) for i, n in enumerate(lengths)]
    B = len(rows)
    new = (torch.randn(B, 2, 1, 4), torch.randn(B, 2, 1, 4)) if cls is SlotKVCache else \
        (torch.randn(B, 1, 1, 6), torch.randn(B, 1, 1, 3))
    for layer in (0, 1):
        for a, b in zip(_step(general, layer, rows, new), _step(decode, layer, rows, new)):
            assert torch.equal(a, b)
    buffers = ("k", "v") if cls is SlotKVCache else ("latent", "index")
    for name in buffers:
        assert torch.equal(getattr(general, name), getattr(decode, name))
    # The next step over the same slots reuses their tensor and still plans the new positions.
    assert torch.equal(decode.prepare_decode(rows)[0], general.prepare(rows, [1] * B)[0])
