"""The GLM network: GLM-4 dense (Hugging Face ``glm`` / ``glm4``) and the original GLM blank-infilling form.

One model class, set by ``Config``:
- ``post_norms``: GLM-4-0414 (``glm4``) adds a norm after attention and after the MLP, before each
  residual add;
- ``position_encoding_2d``: the original GLM's 2D positions. ``position_ids`` is then ``[B, 2, T]``
  and the second row (position inside a blank) rotates the ``rotary_dim`` head dims after those the
  first row rotates.

Module and parameter names are exactly those of ``transformers``' ``GlmForCausalLM``, so a
Hugging Face state dict loads with no renaming. Shapes: B batch, T new tokens, S keys (cache + new),
H query heads, K key/value heads, D head dim, C hidden size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..config import Config
from .kv_cache import KVCache, StaticKVCache
from .masks import padding_causal_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype, as GLM-4 does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """``position_ids [B, T]`` -> ``cos, sin [B, 1, T, rotary_dim // 2]``, one angle per rotated pair."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float) / rotary_dim))
    angles = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, rotary_dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, rotations: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Rotate consecutive blocks of head dims of ``x [B, H, T, D]``, one ``(cos, sin)`` per block.

    GLM rotates *interleaved* pairs ``(x[2i], x[2i+1])``; dims after the last block pass through.
    """
    out, start = [], 0
    for cos, sin in rotations:
        width = 2 * cos.shape[-1]
        pairs = x[..., start : start + width].unflatten(-1, (-1, 2))  # (B, H, T, width/2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out.append(torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2))
        start += width
    out.append(x[..., start:])
    return torch.cat(out, dim=-1)


def _decode_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    """Whether a one-query attention runs on our CPU kernel (float32 inference, bool ``[B|1, 1, 1, S]`` mask)."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32 or q.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return False
    if isinstance(mask, torch.Tensor) and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1)):
        return False
    return k.stride(-1) == 1 and v.stride(-1) == 1 and kernels.cpp_operators_available()


class Attention(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        C, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(C, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, C, bias=False)
        self.qkv = None  # the three projections as one call, where use_decode_layout found one

    def forward(self, x, rotations, mask, cache: KVCache | None):
        B, T, _ = x.shape
        if self.qkv is not None and self.qkv.layers == (self.q_proj, self.k_proj, self.v_proj):
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, rotations), apply_rotary(k, rotations)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        if T == 1 and mask is not True and _decode_kernel(q, k, v, mask):
            y = kernels.decode_attention(q, k, v, mask if isinstance(mask, torch.Tensor) else None, self.head_dim ** -0.5)
        elif isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:  # mask is a bool: causal or not (a single decode step sees every key)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(C, eps)
        self.post_attention_layernorm = RMSNorm(C, eps)
        self.post_norms = config.post_norms
        if config.post_norms:
            self.post_self_attn_layernorm = RMSNorm(C, eps)
            self.post_mlp_layernorm = RMSNorm(C, eps)

    def forward(self, x, rotations, mask, cache):
        h = self.self_attn(self.input_layernorm(x), rotations, mask, cache)
        if self.post_norms:
            h = self.post_self_attn_layernorm(h)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.post_norms:
            h = self.post_mlp_layernorm(h)
        return x + h


class GLMModel(nn.Module):
    """Embeddings, decoder layers and the final norm (``model.*`` in the checkpoint)."""

    def __init__(self, config: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.config = config

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask, cache: KVCache | None,
                between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, C]``, given explicit position ids and an already built mask.

        ``mask`` is a bool ``[B, 1, T, S]`` visibility tensor, or True/False for SDPA's causal flag.
        Unlike ``GLMForCausalLM.forward`` this never reads or advances ``cache.length``, so with a
        ``StaticKVCache`` every decode step has the same shapes and compiles to one graph.
        ``between_layers()``, if given, is called after each layer (the serving engine runs other
        forwards there).
        """
        cfg = self.config
        x = self.embed_tokens(input_ids)  # (B, T, C)
        rows = position_ids.unbind(1) if cfg.position_encoding_2d else (position_ids,)
        rotations = [rotary_cos_sin(p, cfg.rotary_dim, cfg.rope_theta, x.dtype) for p in rows]
        for layer in self.layers:
            x = layer(x, rotations, mask, cache)
            if between_layers is not None:
                between_layers()
        return self.norm(x)


class GLMForCausalLM(nn.Module):
    """``model(input_ids) -> logits [B, T, vocab]``; see ``forward`` for masks, positions and the cache."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = GLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_config(cls, config: Config, device="cpu", dtype=torch.float32, seed: int | None = None):
        """A freshly initialised model, built on the meta device then materialised once."""
        with torch.device("meta"):
            model = cls(config)
        if torch.device(device).type == "meta":  # shapes only, e.g. for counting or sharding plans
            return model
        model.to_empty(device=device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.init_weights(seed)
        return model.to(dtype)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        gen = torch.Generator(device=self.lm_head.weight.device)
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def positions(self, B: int, T: int, offset: int, device) -> torch.Tensor:
        """Default position ids: ``[B, T]``, or ``[B, 2, T]`` (span row zero) for 2D models."""
        pos = torch.arange(offset, offset + T, device=device).expand(B, T)
        if self.config.position_encoding_2d:
            pos = torch.stack((pos, torch.zeros_like(pos)), dim=1)
        return pos

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, C]``; arguments as in ``forward``."""
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = self.positions(B, T, offset, input_ids.device)
        mask = self._attention_mask(attention_mask, B, T, offset, input_ids.device)
        h = self.model(input_ids, position_ids, mask, cache)
        if cache is not None:
            cache.length = offset + T
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for ``input_ids [B, T]``.

        position_ids: ``[B, T]`` (``[B, 2, T]`` for 2D models); default counts on from the cache.
        attention_mask: ``None`` (causal); ``[B, S]`` with 1 for real tokens and 0 for padding over
            all keys (cache + new); or a bool ``[B, T, S]`` / ``[B, 1, T, S]`` visibility mask, True =
            may attend (GLM's prefix masks, packed documents).
        cache: a ``KVCache``; the new keys/values are written at ``cache.length``, which then advances.
        logits_to_keep: if > 0, only the last that many positions go through the output layer.
        """
        h = self.hidden_states(input_ids, position_ids, attention_mask, cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    @staticmethod
    def _attention_mask(attention_mask, B, T, offset, device):
        """A bool visibility tensor ``[B, 1, T, S]``, or True/False for SDPA's own causal flag."""
        if attention_mask is None:
            if offset == 0 or T == 1:
                return T > 1
            attention_mask = torch.ones(B, offset + T, dtype=torch.bool, device=device)
        if attention_mask.dim() == 2:
            attention_mask = padding_causal_mask(attention_mask.to(device), T, offset)
        if attention_mask.dim() == 3:
            attention_mask = attention_mask[:, None]
        return attention_mask.bool()

    def new_cache(self, batch_size: int, max_length: int, dtype=None, device=None, static: bool = False) -> KVCache:
        """A preallocated KV cache for ``batch_size`` rows of up to ``max_length`` tokens.

        ``static=True`` gives a ``StaticKVCache`` (fixed shapes, for a compiled decode step).
        """
        w = self.model.norm.weight  # never quantized: the activations' dtype and device
        c = self.config
        return (StaticKVCache if static else KVCache)(c.num_layers, batch_size, c.num_kv_heads, max_length, c.head_dim,
                                                      dtype=dtype or w.dtype, device=device or w.device)


@torch.no_grad()
def use_decode_layout(model: nn.Module) -> nn.Module:
    """Store the weight of each plain ``nn.Linear`` with ``out_features >= in_features`` as ``[in, out]`` in memory.

    ``weight`` keeps its shape ``[out, in]`` and its values (it becomes a transposed view of the
    re-laid storage), so ``state_dict()`` names, shapes and saved checkpoints are unchanged and there
    is still one copy. Why: a one-row ``F.linear`` then runs as ``x @ W_t`` over contiguous rows,
    measured on a 2-core AVX2 CPU at ~15-16 GB/s for the wide layers (``gate_up_proj``,
    ``lm_head``) against ~9-10 GB/s in the ``[out, in]`` layout; narrow layers were faster as they
    are. Only float32 weights: bfloat16 products in that layout were tens of times slower. Other
    layer types are left alone, but quantized q/k/v projections of an attention get one call for
    the three (``SharedInputProducts``). Idempotent; returns ``model``.
    """
    from ..quant.linear import SharedInputProducts

    for module in model.modules():
        if isinstance(module, Attention):
            module.qkv = SharedInputProducts.of([module.q_proj, module.k_proj, module.v_proj])
        if (type(module) is nn.Linear and module.out_features >= module.in_features and module.weight.is_contiguous()
                and module.weight.dtype == torch.float32):
            module.weight.data = module.weight.data.t().contiguous().t()
    return model
