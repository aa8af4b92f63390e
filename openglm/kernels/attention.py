"""Attention as the model's layers call it: our CPU decode kernel where it applies, else PyTorch's SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels  # looked up at each call, so the kernel can be switched off (tests do)


def _decode_kernel_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    """Whether a one-query attention runs on our CPU kernel (float32 inference, bool ``[B|1, 1, 1, S]`` mask)."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32 or q.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return False
    if isinstance(mask, torch.Tensor) and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1)):
        return False
    return k.stride(-1) == 1 and v.stride(-1) == 1 and kernels.cpp_operators_available()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """``q [B, H, T, D]`` over ``k, v [B, K, S, D]`` (query head ``h`` reads key/value head ``h // (H // K)``)
    -> ``[B, H, T, D]``, scaled by ``D ** -0.5``.

    ``mask`` is a bool ``[B|1, 1, T, S]`` visibility tensor (True = may attend), or True/False for
    SDPA's causal flag (False with ``T == 1``: a decode step that sees every key).
    """
    if q.shape[2] == 1 and mask is not True and _decode_kernel_fits(q, k, v, mask):
        return kernels.decode_attention(q, k, v, mask if isinstance(mask, torch.Tensor) else None, q.shape[-1] ** -0.5)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=mask, enable_gqa=True)
