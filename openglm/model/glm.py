"""The GLM network: GLM-4 dense (Hugging Face ``glm`` / ``glm4``), GLM-4.5+ mixture of experts
(``glm4_moe``) and the original GLM blank-infilling form.

One model class, set by ``Config``:
- ``post_norms``: GLM-4-0414 (``glm4``) adds a norm after attention and after the MLP, before each
  residual add;
- ``position_encoding_2d``: the original GLM's 2D positions. ``position_ids`` is then ``[B, 2, T]``
  and the second row (position inside a blank) rotates the ``rotary_dim`` head dims after those the
  first row rotates;
- ``num_experts``: GLM-4.5/4.6/4.7 (``glm4_moe``). Layers from ``first_k_dense_replace`` on replace the
  MLP by a ``MoE`` block (sigmoid router, routed experts stored stacked ``[E, ...]``, shared experts);
  optional q/k norms; the rotary dims are rotated as two halves instead of interleaved pairs.

Module and parameter names are exactly those of ``transformers``' ``GlmForCausalLM``, so a dense
Hugging Face state dict loads with no renaming; MoE experts (one tensor per projection, as
``transformers`` 5 holds them) and fused gate/up projections are mapped from the per-expert names of
the published checkpoints by ``openglm.model.checkpoint``. Shapes: B batch, T new tokens, S keys
(cache + new), H query heads, K key/value heads, D head dim, C hidden size, N tokens (B*T), E
experts, k experts per token, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..errors import OpenGLMError
from ..kernels.attention import attention
from .kv_cache import KVCache, LatentKVCache, StaticKVCache
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


def apply_rotary(x: torch.Tensor, rotations: list[tuple[torch.Tensor, torch.Tensor]], interleaved: bool = True) -> torch.Tensor:
    """Rotate consecutive blocks of head dims of ``x [B, H, T, D]``, one ``(cos, sin)`` per block.

    GLM-4 dense rotates *interleaved* pairs ``(x[2i], x[2i+1])``; ``glm4_moe`` pairs ``x[i]`` with
    ``x[i + width/2]`` inside the block. Dims after the last block pass through.
    """
    out, start = [], 0
    for cos, sin in rotations:
        width = 2 * cos.shape[-1]
        block = x[..., start : start + width]
        if interleaved:
            pairs = block.unflatten(-1, (-1, 2))  # (B, H, T, width/2, 2)
            x0, x1 = pairs[..., 0], pairs[..., 1]
            out.append(torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2))
        else:
            x0, x1 = block.chunk(2, dim=-1)  # (B, H, T, width/2) each
            out.append(torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1))
        start += width
    out.append(x[..., start:])
    return torch.cat(out, dim=-1)


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
        self.use_qk_norm, self.rotary_interleaved = config.use_qk_norm, config.rotary_interleaved
        if config.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, rotations, mask, cache: KVCache | None):
        B, T, _ = x.shape
        if self.qkv is not None and self.qkv.layers == (self.q_proj, self.k_proj, self.v_proj):
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, K, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, rotations, self.rotary_interleaved), apply_rotary(k, rotations, self.rotary_interleaved)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        y = attention(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


def _pairs_first(x: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary pairs ``(x0, x1), (x2, x3), ...`` regrouped as evens then odds, so the half-split
    rotation of ``apply_rotary`` rotates each pair (the layout ``transformers`` gives MLA's rotary parts)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def _visibility(mask, T: int, S: int, device) -> torch.Tensor:
    """``mask`` as a bool ``[B|1, 1, T, S]`` tensor; a flag means causal over the last ``T`` of ``S`` keys (True) or all keys."""
    if isinstance(mask, torch.Tensor):
        return mask
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None] if mask else \
        torch.ones(1, 1, T, S, dtype=torch.bool, device=device)


class Indexer(nn.Module):
    """GLM-5's lightning indexer (``glm_moe_dsa``): scores every visible key for each query and keeps the
    ``index_topk`` best, the only keys the layer's attention then reads.

    score(t, s) = sum_h w_h(t) * relu(q_h(t) . k(s) / sqrt(D)), with ``index_n_heads`` small query heads
    from the query latent, one key per token (LayerNorm, cached) and per-query head weights. The first
    ``qk_rope_head_dim`` dims of each are rotated, interleaved.
    """

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim, self.rope_dim = config.index_n_heads, config.index_head_dim, config.qk_rope_head_dim
        self.topk = config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def _rotate(self, x: torch.Tensor, rotations) -> torch.Tensor:
        """Rotate the first ``rope_dim`` dims of ``x [B, H, T, D]``."""
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rotary(_pairs_first(rot), rotations, interleaved=False), rest), dim=-1)

    @torch.no_grad()
    def forward(self, x, q_latent, rotations, visible: torch.Tensor, cache: LatentKVCache | None) -> torch.Tensor:
        """Indices ``[B, T, k]`` of the keys each query keeps, ``k = min(index_topk, S)``."""
        B, T, _ = x.shape
        q = self._rotate(self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), rotations)
        k = self._rotate(self.k_norm(self.wk(x))[:, None], rotations)[:, 0]  # (B, T, D)
        if cache is not None:
            k = cache.update_index(self.layer_idx, k)  # (B, S, D)
        scores = torch.matmul(q.transpose(1, 2).float(), k.transpose(1, 2)[:, None].float())  # (B, T, Hi, S)
        scores = F.relu(scores * self.head_dim ** -0.5)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5  # (B, T, Hi)
        index = torch.matmul(w[:, :, None], scores)[:, :, 0]  # (B, T, S)
        index = index.masked_fill(~visible[:, 0], float("-inf"))
        # As transformers: topk over the row. relu makes exact ties (a key every head scores negative gets 0);
        # which of tied keys topk keeps is its own choice, and may differ between a full forward and a decode step.
        return index.topk(min(self.topk, index.shape[-1]), dim=-1).indices


class LatentAttention(nn.Module):
    """Multi-head latent attention as GLM-4.7-Flash (``glm4_moe_lite``) and GLM-5 (``glm_moe_dsa``) run it.

    Queries come through a low-rank latent (``q_lora_rank``, RMSNorm) or one projection. Keys and values
    share one latent ``c = RMSNorm(W_a x)[:kv_lora_rank]`` per token plus one rotary key of
    ``qk_rope_head_dim`` dims for all heads; ``kv_b_proj`` expands ``c`` into each head's key part
    (``qk_nope_head_dim``) and value (``v_head_dim``). The cache keeps ``c`` and the rotary key only.

    A prefill with nothing cached expands the new tokens' keys and values; a step over cached tokens
    never does: the key up-projection is absorbed into the query (``q_nope W_uk`` scores against ``c``
    directly) and the value up-projection is applied after attention, so each step reads the latent
    cache once. With sparse attention (``index_topk``) each query reads only the keys its indexer (or
    the last layer's, in a "shared" layer) chose.
    """

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        C, H, bias = config.hidden_size, config.num_heads, config.attention_bias
        self.num_heads, self.kv_lora_rank = H, config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.q_lora_rank, self.interleaved = config.q_lora_rank, config.rotary_interleaved
        qk = self.nope_dim + self.rope_dim
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(C, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)  # transformers' default eps for the latents' norms
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(C, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, C, bias=bias)
        self.scale = qk ** -0.5
        self.sparse = bool(config.index_topk)
        self.indexer = Indexer(config, layer_idx) if self.sparse and config.indexer_types[layer_idx] == "full" else None

    def _rotate(self, x: torch.Tensor, rotations) -> torch.Tensor:
        return apply_rotary(_pairs_first(x) if self.interleaved else x, rotations, interleaved=False)

    def forward(self, x, rotations, mask, cache: LatentKVCache | None, chosen: torch.Tensor | None = None):
        """``x [B, T, C]`` -> ``(y [B, T, C], chosen)``; ``chosen [B, T, k]`` are the keys sparse attention
        kept (this layer's indexer's, else the ``chosen`` passed in), None for dense attention."""
        B, T, _ = x.shape
        H, r = self.num_heads, self.kv_lora_rank
        q_latent = self.q_a_layernorm(self.q_a_proj(x)) if self.q_lora_rank else None  # (B, T, q_lora_rank)
        q = (self.q_b_proj(q_latent) if self.q_lora_rank else self.q_proj(x)).view(B, T, H, -1).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B, H, T, dn), (B, H, T, dr)
        q_rot = self._rotate(q_rot, rotations)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([r, self.rope_dim], dim=-1)  # (B, T, r), (B, T, dr)
        entry = torch.cat((self.kv_a_layernorm(latent), self._rotate(k_rot[:, None], rotations)[:, 0]), dim=-1)
        if cache is not None:
            entry = cache.update(self.layer_idx, entry)  # (B, S, r + dr)
        S = entry.shape[1]
        if self.sparse:
            visible = _visibility(mask, T, S, x.device)
            if self.indexer is not None:
                chosen = self.indexer(x, q_latent, rotations, visible, cache)
            if chosen.shape[-1] < S:
                return self._sparse(q_nope, q_rot, entry, visible, chosen), chosen
        if S == T:  # nothing cached: expand the new tokens' keys and values
            y = self._expanded(q_nope, q_rot, entry, mask)
        else:
            y = self._absorbed(q_nope, q_rot, entry[:, None], mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), chosen  # (B, T, C)

    def _expanded(self, q_nope, q_rot, entry, mask) -> torch.Tensor:
        """Attention over per-head keys and values built from ``entry [B, S, r + dr]`` -> ``[B, H, T, dv]``."""
        B, S, _ = entry.shape
        latent, k_rot = entry.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(B, S, self.num_heads, -1).transpose(1, 2)  # (B, H, S, dn + dv)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rot[:, None].expand(-1, self.num_heads, -1, -1)), dim=-1)  # (B, H, S, dn + dr)
        q = torch.cat((q_nope, q_rot), dim=-1)
        if isinstance(mask, torch.Tensor):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask, scale=self.scale)

    def _absorbed(self, q_nope, q_rot, entry, mask) -> torch.Tensor:
        """Attention straight over latent entries ``[B', 1, S, r + dr]`` -> ``[B', H, T', dv]``.

        q . k = (q_nope W_uk) . c + q_rot . k_rot and sum_s p_s W_uv c_s = W_uv (sum_s p_s c_s), with
        ``kv_b_proj.weight`` viewed as ``[H, dn + dv, r]`` = (W_uk, W_uv) per head. All heads share the
        entries, so they run as ``H * T'`` queries of one head: the cache is read once, never copied per head.
        """
        B, H, T, _ = q_nope.shape
        w = self.kv_b_proj.weight.unflatten(0, (H, -1))  # a view whatever the weight's memory layout
        w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # (H, dn, r), (H, dv, r)
        q = torch.cat((torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk), q_rot), dim=-1)  # (B', H, T', r + dr)
        q = q.reshape(B, 1, H * T, -1)  # (B', 1, H*T', r + dr)
        if isinstance(mask, torch.Tensor):
            mask = mask.expand(B, 1, T, -1)[:, :, None].expand(-1, -1, H, -1, -1).reshape(B, 1, H * T, -1)
        elif mask:  # causal over the last T' keys, for each head
            mask = _visibility(True, T, entry.shape[2], q.device).expand(B, 1, T, -1)[:, :, None].expand(
                -1, -1, H, -1, -1).reshape(B, 1, H * T, -1)
        v = entry[..., : self.kv_lora_rank]  # (B', 1, S, r): the latent is also the value
        y = F.scaled_dot_product_attention(q, entry, v, attn_mask=mask if isinstance(mask, torch.Tensor) else None,
                                           scale=self.scale)  # (B', 1, H*T', r)
        return torch.einsum("bhtr,hvr->bhtv", y.reshape(B, H, T, -1), w_uv)  # (B', H, T', dv)

    def _sparse(self, q_nope, q_rot, entry, visible, chosen) -> torch.Tensor:
        """Each query attends to its own ``k`` chosen entries only: cost ``O(k)``, not ``O(S)``, per query."""
        B, H, T, _ = q_nope.shape
        rows = torch.arange(B, device=entry.device)[:, None, None]
        picked = entry[rows, chosen].flatten(0, 1)[:, None]  # (B*T, 1, k, r + dr)
        # A query whose visible keys are fewer than k was given some it may not see (as transformers does): hide them.
        keep = visible[:, 0].expand(B, T, -1).gather(-1, chosen).flatten(0, 1)[:, None, None]  # (B*T, 1, 1, k)
        flat = lambda t: t.transpose(1, 2).flatten(0, 1)[:, :, None]  # (B, H, T, d) -> (B*T, H, 1, d)
        y = self._absorbed(flat(q_nope), flat(q_rot), picked, keep)  # (B*T, H, 1, dv)
        return self.o_proj(y.reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: Config, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Router(nn.Module):
    """Chooses ``num_experts_per_tok`` experts per token and their weights, as GLM-4.5 does.

    Scores are sigmoids of float32 logits. ``e_score_correction_bias`` (auxiliary-loss-free load
    balancing) is added only to *choose*: the experts' weights are their unbiased scores. With
    ``n_group > 1`` a token first keeps the ``topk_group`` groups whose two best biased scores sum
    highest and chooses among their experts only.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        self.expert_counts: torch.Tensor | None = None  # (E,) of the last forward in training mode
        # With keep_routing, training forwards also keep (scores [N, E], experts [N, k]) for an auxiliary loss.
        self.keep_routing = False
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, C]`` -> ``weights [N, k]`` (float32), ``experts [N, k]``."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))  # (N, G, E/G)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
            keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, best, True)  # (N, G)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        experts = choice.topk(self.top_k, dim=-1, sorted=False).indices  # (N, k)
        if self.training:  # tokens per expert, for load balancing between optimizer steps
            self.expert_counts = torch.bincount(experts.flatten(), minlength=self.weight.shape[0])
            if self.keep_routing:
                self.routing = (scores, experts)
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts


def _grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: inference only (its CPU backward fails on an expert
    with no tokens) and rows aligned to 16 bytes, as the kernel requires."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    if x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    n = x.element_size()
    if not all(d * n % 16 == 0 for d in w.shape[1:]):
        return False
    # A compiled graph has no data pointers to look at; its buffers and the parameters are aligned.
    return torch.compiler.is_compiling() or (x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def expert_products(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x [M, in]`` (rows grouped by expert: ``counts[e]`` rows for expert e, in order) times each
    group's ``w[e] [out, in]`` transposed -> ``[M, out]``.

    One matmul per expert that has tokens, never a loop over tokens; experts with none are not read,
    so a decode step reads only the chosen experts' weights.
    """
    if _grouped_mm_fits(x, w):
        return F.grouped_mm(x, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    hit = counts.nonzero().flatten()
    rows = x.split(counts[hit].tolist())
    return torch.cat([F.linear(r, w[e]) for r, e in zip(rows, hit.tolist())]) if rows else x.new_zeros(0, w.shape[1])


class Experts(nn.Module):
    """``num_experts`` SwiGLU MLPs stored stacked, one tensor per projection (as ``transformers`` 5):
    ``gate_up_proj [E, 2I, C]`` (gate rows first) and ``down_proj [E, C, I]``."""

    def __init__(self, config: Config):
        super().__init__()
        E, C, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``x [N, C]``, the router's ``weights, experts [N, k]`` -> weighted sum of the chosen experts ``[N, C]``."""
        N, k = experts.shape
        if torch.compiler.is_compiling():  # one graph of static shapes (the compiled decode step)
            flat = experts.flatten()  # (N*k,) one slot per (token, choice), token-major
            gate, up = self.slot_products(x.repeat_interleave(k, dim=0), "gate_up_proj", flat).chunk(2, dim=-1)
            y = self.slot_products(up * F.silu(gate), "down_proj", flat) * weights.flatten()[:, None]  # (N*k, C)
            return y.view(N, k, -1).sum(1).to(x.dtype)
        flat = experts.flatten()  # (N*k,) one slot per (token, choice)
        order = flat.argsort(stable=True)  # slots grouped by expert
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0])  # (E,)
        token = order // k  # (N*k,) the token of each grouped slot
        gate, up = self.products(x[token], "gate_up_proj", counts).chunk(2, dim=-1)  # (N*k, I) each
        y = self.products(up * F.silu(gate), "down_proj", counts)  # (N*k, C)
        y = (y * weights.flatten()[order, None]).to(x.dtype)  # float32 weights, as transformers multiplies
        return torch.zeros_like(x).index_add_(0, token, y)

    def products(self, x: torch.Tensor, projection: str, counts: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` grouped by expert times each expert's ``projection`` (quantized experts override this)."""
        return expert_products(x, getattr(self, projection), counts)

    def slot_products(self, x: torch.Tensor, projection: str, experts: torch.Tensor) -> torch.Tensor:
        """Row i of ``x`` times expert ``experts[i]``'s ``projection``, its weights gathered: no data-dependent
        shapes, for compiled graphs; only the chosen experts are read (quantized experts override this)."""
        return torch.bmm(getattr(self, projection)[experts], x[:, :, None]).squeeze(-1)


class MoE(nn.Module):
    """The routed experts plus the shared experts (one always-on MLP) of a GLM-4.5 layer."""

    def __init__(self, config: Config):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        shared = config.moe_intermediate_size * config.num_shared_experts
        self.shared_experts = MLP(config, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        weights, experts = self.gate(x)  # (N, k) each
        y = self.experts(x, weights, experts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, C)


class DecoderLayer(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = (LatentAttention if config.kv_lora_rank else Attention)(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)
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


class LatentDecoderLayer(DecoderLayer):
    """A decoder layer of multi-head latent attention; hands the keys sparse attention chose on to the next layer."""

    def forward(self, x, rotations, mask, cache, chosen=None):
        h, chosen = self.self_attn(self.input_layernorm(x), rotations, mask, cache, chosen)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), chosen


class GLMModel(nn.Module):
    """Embeddings, decoder layers and the final norm (``model.*`` in the checkpoint)."""

    def __init__(self, config: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layer = LatentDecoderLayer if config.kv_lora_rank else DecoderLayer
        self.layers = nn.ModuleList(layer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.config = config

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask, cache: KVCache | None) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, C]``, given explicit position ids and an already built mask.

        ``mask`` is a bool ``[B, 1, T, S]`` visibility tensor, or True/False for SDPA's causal flag.
        Unlike ``GLMForCausalLM.forward`` this never reads or advances ``cache.length``, so with a
        ``StaticKVCache`` every decode step has the same shapes and compiles to one graph.
        """
        cfg = self.config
        x = self.embed_tokens(input_ids)  # (B, T, C)
        rows = position_ids.unbind(1) if cfg.position_encoding_2d else (position_ids,)
        rotations = [rotary_cos_sin(p, cfg.rotary_dim, cfg.rope_theta, x.dtype) for p in rows]
        chosen = None  # sparse attention: the keys the last indexer chose
        for layer in self.layers:
            if cfg.kv_lora_rank:
                x, chosen = layer(x, rotations, mask, cache, chosen)
            else:
                x = layer(x, rotations, mask, cache)
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
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=gen)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                module.gate_up_proj.normal_(0.0, std, generator=gen)
                module.down_proj.normal_(0.0, std, generator=gen)

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

        ``static=True`` gives a ``StaticKVCache`` (fixed shapes, for a compiled decode step). Latent-attention
        models get a ``LatentKVCache`` (the latent and rotary key per token, not keys and values).
        """
        w = self.model.norm.weight  # never quantized: the activations' dtype and device
        c = self.config
        if c.kv_lora_rank:
            if static:
                raise OpenGLMError("latent-attention models have no static cache: run them without compile")
            index_layers = [i for i, t in enumerate(c.indexer_types or []) if t == "full"]
            return LatentKVCache(c.num_layers, batch_size, max_length, c.kv_cache_width, index_layers, c.index_head_dim,
                                 dtype=dtype or w.dtype, device=device or w.device)
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
