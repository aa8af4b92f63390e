"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import OpenGLMError


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already in the text
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise OpenGLMError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise OpenGLMError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OpenGLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OpenGLMError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise OpenGLMError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        self.stop_strings = [s for s in self.stop_strings if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: divide positive / multiply negative logits of tokens in ``seen [B, L]``."""
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to ``-inf``; ``logits [B, V]``."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` from ``logits [B, V]``; ``seen [B, L]`` feeds the repetition penalty."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    return _draw(logits, params, torch.rand(logits.shape[0], 1, generator=generator, device=logits.device))


def _draw(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: one uniform ``u [B, 1]`` per row searched in the cumulative distribution.
    Same distribution as torch.multinomial, ~10x cheaper on CPU for a 16k-150k vocabulary."""
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    cdf = logits.softmax(-1).cumsum(-1)  # [B, V]
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def sample_each(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                seen: list[list[int]]) -> list[int]:
    """One token per row of ``logits [B, V]``, row ``i`` with its own ``params[i]``, ``generators[i]``
    and tokens so far ``seen[i]``: exactly what ``sample(logits[i:i+1], ...)`` gives, but the whole
    batch in a few operations, whatever mix of settings it holds (a serving batch's requests each
    bring their own): per-row temperatures, top-k and top-p thresholds as tensors."""
    logits = logits.float()
    device = logits.device
    penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and seen[i]]
    if penalized:  # the penalty depends on the row's own text
        logits = logits.clone()
        for i in penalized:
            ids = torch.tensor([seen[i]], device=device)
            logits[i : i + 1] = apply_repetition_penalty(logits[i : i + 1], ids, params[i].repetition_penalty)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    # max(-1).indices is argmax (both give the first of tied maxima), ~2.5x faster on CPU for a [16, 16k] batch.
    if not drawn:
        return logits.max(-1).indices.tolist()
    tokens = logits.max(-1).indices.tolist() if len(drawn) < len(params) else [0] * len(params)
    rows = logits if len(drawn) == len(params) else logits[drawn]
    rows = rows / torch.tensor([params[i].temperature for i in drawn], device=device)[:, None]
    top_k = [params[i].top_k if 0 < params[i].top_k < rows.shape[-1] else 0 for i in drawn]
    if any(top_k):
        kth = rows.topk(max(top_k), dim=-1).values.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k],
                                                                           device=device)[:, None])
        kth[torch.tensor([k == 0 for k in top_k], device=device)] = float("-inf")  # rows without top-k
        rows = rows.masked_fill(rows < kth, float("-inf"))
    nucleus = [j for j, i in enumerate(drawn) if params[i].top_p < 1.0]
    if nucleus:
        part = rows[nucleus]
        sorted_logits, order = part.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        top_p = torch.tensor([params[drawn[j]].top_p for j in nucleus], device=device)[:, None]
        drop = (probs.cumsum(-1) - probs) >= top_p  # as filter_logits: the tokens before cover top_p
        rows[nucleus] = part.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # Each row's uniform from its own generator, as sample() draws it.
    u = torch.cat([torch.rand(1, 1, generator=generators[i], device=device) for i in drawn])
    cdf = rows.softmax(-1).cumsum(-1)  # [B', V]
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    for i, token in zip(drawn, picked.tolist()):
        tokens[i] = token
    return tokens
