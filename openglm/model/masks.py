"""Attention masks as pure functions. ``True`` means "may attend"; shapes are ``[..., T_query, T_key]``.

GLM's blank infilling needs three shapes of visibility, all expressed by ``packed_mask``:
- causal LM: each token sees the tokens before it and itself;
- prefix LM (Part A / Part B): tokens of Part A see all of Part A, tokens of Part B see Part A and
  the Part B tokens before them, nothing sees ahead into Part B;
- packing: several documents share one row and never attend to each other.
"""

from __future__ import annotations

import torch


def causal_mask(T: int, device=None) -> torch.Tensor:
    """``[T, T]`` lower-triangular visibility."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def prefix_lm_mask(prefix_len: int, T: int, device=None) -> torch.Tensor:
    """``[T, T]``: bidirectional over the first ``prefix_len`` tokens (Part A), causal after."""
    mask = causal_mask(T, device)
    mask[:, :prefix_len] = True
    mask[:prefix_len, prefix_len:] = False
    return mask


def packed_mask(segment_ids: torch.Tensor, prefix_end: torch.Tensor) -> torch.Tensor:
    """Visibility for packed rows.

    segment_ids: ``[..., T]`` which document each token belongs to.
    prefix_end: ``[..., T]`` for each token, the absolute index where its document's Part A ends
    (the document's start index for plain causal text). Token ``i`` sees token ``j`` when both are
    in the same document and ``j <= i`` or ``j < prefix_end[i]``. Every token sees itself, so a
    padding row never has an empty softmax.
    """
    T = segment_ids.shape[-1]
    idx = torch.arange(T, device=segment_ids.device)
    same = segment_ids[..., :, None] == segment_ids[..., None, :]
    visible = (idx[None, :] <= idx[:, None]) | (idx[None, :] < prefix_end[..., :, None])
    return (same & visible) | torch.eye(T, dtype=torch.bool, device=segment_ids.device)


def padding_causal_mask(key_padding: torch.Tensor, T: int, offset: int = 0) -> torch.Tensor:
    """``[B, T, S]`` for ``T`` queries at absolute positions ``offset..offset+T-1`` over ``S`` keys.

    key_padding: ``[B, S]`` with 1 (or True) for real tokens, 0 for padding. A query sees real keys
    at or before its own position; padding queries see themselves only.
    """
    S = key_padding.shape[-1]
    q = torch.arange(offset, offset + T, device=key_padding.device)
    k = torch.arange(S, device=key_padding.device)
    mask = (k[None, :] <= q[:, None])[None] & key_padding.bool()[:, None, :]
    return mask | (k[None, :] == q[:, None])[None]
