"""GLM blank infilling: each ``[MASK]`` / ``[sMASK]`` / ``[gMASK]`` of a text filled, the text read both ways."""

from __future__ import annotations

import re
import time

from ...infer.generate import MASK_TOKENS
from ...infer.sampling import SamplingParams
from .. import engine_tasks
from .. import schemas as S
from ..errors import APIError
from .billing import Billing
from .generation import Generations
from .tokens import Tokens

_BLANK = re.compile("(" + "|".join(re.escape(m) for m in MASK_TOKENS) + ")")


class Infill:
    """``POST /v1/infill``."""

    def __init__(self, generations: Generations, billing: Billing, tokens: Tokens):
        self.generations, self.billing, self.tokens = generations, billing, tokens

    async def create(self, key, body: S.InfillRequest) -> tuple[S.Infill, dict[str, str]]:
        """The filled text and the key's rate-limit headers."""
        gen = self.generations
        gen.check_model(body.model)
        gen.ready()
        pieces = _BLANK.split(body.prompt)
        blanks = sum(p in MASK_TOKENS for p in pieces)
        if not blanks:
            raise APIError(400, "no blank to fill: put [MASK], [sMASK] or [gMASK] in the prompt", param="prompt")
        # Part A, then each blank's <sop> + span: the same bound infill() checks, checked before billing
        # (first with the blanks alone for the prompt, then with its text's tokens).
        prompt_tokens = blanks
        if prompt_tokens + blanks * (body.max_tokens + 1) <= gen.max_seq_len:
            texts = [p for p in pieces if p and p not in MASK_TOKENS]

            async def check():
                await self.billing.check(key, body.request_id, 1, blanks * body.max_tokens)

            prompt_tokens += sum(map(len, await self.tokens.encode_prompts(texts, check)))
        if prompt_tokens + blanks * (body.max_tokens + 1) > gen.max_seq_len:
            raise APIError(400, f"prompt ({prompt_tokens} tokens) + {blanks} blanks x max_tokens ({body.max_tokens}) "
                           f"exceeds the model's context of {gen.max_seq_len}", code="context_length_exceeded",
                           param="max_tokens", zhipu="1261")
        params = SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed)
        (text, spans), usage, rid, headers = await gen.exclusive(key, prompt_tokens, blanks * body.max_tokens,
                                                                 body.request_id, engine_tasks.infill, body.prompt,
                                                                 params, with_tokenizer=True)
        return S.Infill(id=f"infill-{rid}", created=int(time.time()), model=gen.model_name, text=text, spans=spans,
                        usage=usage), headers
