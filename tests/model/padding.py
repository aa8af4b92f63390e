"""Left-padded batches for the parity tests: the same logits from transformers and from us."""

from __future__ import annotations

import torch


def padded_logits(hf, ours, ids: torch.Tensor, pads: list[int]):
    """Run ``ids`` (B, T) with row i left-padded by ``pads[i]`` positions through both models, with the
    position ids a padded batch uses; returns (transformers' logits, ours (B, T, V), real positions (B, T))."""
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        logits = ours(ids, position_ids=pos, attention_mask=mask)
    return theirs, logits, mask.bool()
