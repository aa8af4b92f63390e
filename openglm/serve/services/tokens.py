"""Tokenization for the HTTP side: prompts and chats to token ids, token ids to logprob answers.

Rendering a chat and tokenizing text cost time in their size: they run on worker threads (at most
``RENDER_THREADS`` at once, so long ones never take all the threads the database calls need), and
only after the caller's key was checked, never on the event loop.
"""

from __future__ import annotations

import json

from anyio import CapacityLimiter, to_thread

from .. import schemas as S
from ..errors import APIError

MAX_CHAT_MESSAGES = 2048  # OpenAI's own limit
MAX_CHAT_CHARS = 1_000_000  # text of one chat: far more than any context this server serves holds
RENDER_THREADS = 4

LogprobEntry = tuple  # (token, logprob, [(token, logprob)] alternatives); logprob and alternatives None if unknown


class Tokens:
    """The served model's tokenizer (None while the model loads)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.threads = CapacityLimiter(RENDER_THREADS)

    async def encode_prompts(self, prompts: list, check) -> list[list[int]]:
        """Token ids of each prompt: a text, or token ids already. ``check()`` (awaited) runs first when
        a prompt is text: it refuses a caller that may not run the request at all."""
        texts = [p for p in prompts if isinstance(p, str)]
        if not texts:
            return [list(p) for p in prompts]
        await check()
        ids = iter(await to_thread.run_sync(_encode, self.tokenizer, texts, limiter=self.threads))
        return [next(ids) if isinstance(p, str) else list(p) for p in prompts]

    async def render_chat(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """The prompt of a chat, as the model's template writes it."""
        from ...data.chat import render_prompt

        return await to_thread.run_sync(render_prompt, self.tokenizer, messages, tools, limiter=self.threads)

    def end_of_turn_ids(self) -> list[int]:
        from ...data.chat import end_of_turn_ids

        return end_of_turn_ids(self.tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def check_vocab(self, batch: list[list[int]], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        for ids in batch:
            if ids and max(ids) >= vocab:
                raise APIError(400, f"token id {max(ids)} is outside the vocabulary ({vocab})", param=param)

    def chat_logprobs(self, entries: list[LogprobEntry]) -> S.ChoiceLogprobs:
        def one(token: int, logprob: float) -> dict:
            text = self.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return S.ChoiceLogprobs(content=[S.TokenLogprob(**one(t, lp), top_logprobs=[one(a, alp) for a, alp in top])
                                         for t, lp, top in entries])

    def completion_logprobs(self, *runs: tuple[list[LogprobEntry], int]) -> S.CompletionLogprobs:
        """OpenAI's completion ``logprobs`` of runs of (entries, text offset of the first); an echoed
        prompt's first token has logprob and top None (nothing predicts it)."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for entries, offset in runs:
            for t, lp, top in entries:
                tokens.append(self.decode([t]))
                logprobs.append(lp)
                tops.append(None if top is None else {self.decode([a]): alp for a, alp in top})
                offsets.append(offset)
                offset += len(tokens[-1])
        return S.CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


def check_chat_size(messages: list[dict], tools: list[dict] | None) -> None:
    """400 for a chat over ``MAX_CHAT_MESSAGES`` messages or ``MAX_CHAT_CHARS`` characters of text."""
    if len(messages) > MAX_CHAT_MESSAGES:
        raise APIError(400, f"messages: {len(messages)} messages, more than the {MAX_CHAT_MESSAGES} a chat may have",
                       param="messages", code="too_many_messages")
    chars = sum(len(m["content"]) + sum(len(json.dumps(c, ensure_ascii=False)) for c in m.get("tool_calls", ()))
                for m in messages) + (len(json.dumps(tools, ensure_ascii=False)) if tools else 0)
    if chars > MAX_CHAT_CHARS:
        raise APIError(400, f"messages: {chars} characters of text, more than the {MAX_CHAT_CHARS} a chat may have",
                       param="messages", code="chat_too_long")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(t) for t in texts]
