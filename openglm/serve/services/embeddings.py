"""Embeddings: mean-pooled final hidden states, L2-normalised."""

from __future__ import annotations

import base64

from .. import engine_tasks
from .. import schemas as S
from ..errors import APIError
from .billing import Billing
from .generation import Generations
from .tokens import Tokens


class Embeddings:
    """``POST /v1/embeddings``."""

    def __init__(self, generations: Generations, billing: Billing, tokens: Tokens):
        self.generations, self.billing, self.tokens = generations, billing, tokens

    async def create(self, key, body: S.EmbeddingRequest) -> tuple[S.EmbeddingList, dict[str, str]]:
        """The embeddings and the key's rate-limit headers."""
        gen = self.generations
        gen.check_model(body.model)
        gen.ready()
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]
        batch = await self.tokens.encode_prompts(inputs, lambda: self.billing.check(key, None, 1, 0))
        self.tokens.check_vocab(batch, "input")
        for ids in batch:
            if not ids:
                raise APIError(400, "every input needs at least one token", param="input")
            if len(ids) > gen.max_seq_len:
                raise APIError(400, f"an input has {len(ids)} tokens, more than the model's context of "
                               f"{gen.max_seq_len}", code="context_length_exceeded", param="input")
        vectors, usage, _, headers = await gen.exclusive(key, sum(map(len, batch)), 0, None, engine_tasks.embed, batch)
        data = []
        for i, v in enumerate(vectors):
            value = base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                else v.tolist()
            data.append(S.Embedding(index=i, embedding=value))
        usage = S.Usage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.prompt_tokens)
        return S.EmbeddingList(data=data, model=gen.model_name, usage=usage), headers
