"""Text completions (OpenAI's legacy ``/v1/completions``): prompts of text or token ids, echo, logprobs, scoring."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response

from ...infer.sampling import SamplingParams
from .. import engine_tasks
from .. import schemas as S
from ..errors import APIError
from .billing import Billing
from .generation import Generations, finish_reason
from .sse import SSEResponse, json_response, sse
from .tokens import Tokens


class Completions:
    """``POST /v1/completions``."""

    def __init__(self, generations: Generations, billing: Billing, tokens: Tokens):
        self.generations, self.billing, self.tokens = generations, billing, tokens

    async def create(self, request: Request, key, body: S.CompletionRequest) -> Response:
        arrived = time.monotonic()
        gen = self.generations
        gen.check_model(body.model)
        gen.ready()
        gen.check_max_tokens(body.max_tokens)
        least = (1 if body.max_tokens is None else body.max_tokens) * body.n * len(body.prompts)
        prompts = await self.tokens.encode_prompts(body.prompts, lambda: self.billing.check(key, None, 1, least))
        if not all(prompts):
            raise APIError(400, "every prompt needs at least one token", param="prompt")
        self.tokens.check_vocab(prompts, "prompt")
        max_new = min(gen.budget(len(p), body.max_tokens) for p in prompts)
        answer = _Answer(self, body, prompts)
        if max_new == 0:  # nothing to generate: the prompts (scored if asked), billed as prompt tokens
            return await self._prompts_only(key, body, prompts, answer)

        params = SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop_strings=body.stop_strings)
        job, headers = await gen.start(key, prompts, body.n, params, body.logprobs, None, body.stream, arrived,
                                       body.cache_salt)
        answer.id = f"cmpl-{job.request_id}"
        if answer.scored:  # the prompts are billed by the job; scoring them is a forward of its own
            try:
                answer.prefixes, _ = await gen.backend.run_on_model(engine_tasks.prompt_logprobs, prompts,
                                                                    body.logprobs)
            except BaseException:
                job.stop()
                raise
        if not body.stream:
            choices = await gen.collect(request, job, answer.count)
            out = [S.CompletionChoice(index=i, text=answer.echoed[i // body.n] + c.text, finish_reason=c.finish_reason,
                                      logprobs=answer.logprobs(i // body.n, c.logprobs))
                   for i, c in enumerate(choices)]
            return json_response(answer.completion(out, job.usage), headers)
        return SSEResponse(job, answer.events(request.url.path, job), headers)

    async def _prompts_only(self, key, body: S.CompletionRequest, prompts: list[list[int]], answer: _Answer):
        entries, usage, rid, headers = await self.generations.exclusive(
            key, sum(map(len, prompts)), 0, None, engine_tasks.prompt_logprobs, prompts if answer.scored else [],
            body.logprobs or 0)
        answer.id = f"cmpl-{rid}"
        if answer.scored:
            answer.prefixes = entries
        out = [S.CompletionChoice(index=i, text=answer.echoed[i // body.n], finish_reason="length",
                                  logprobs=answer.logprobs(i // body.n, [])) for i in range(answer.count)]
        if not body.stream:
            return json_response(answer.completion(out, usage), headers)

        def replay():
            for choice in out:
                yield answer.chunk([S.CompletionChunkChoice(**choice.model_dump(exclude_unset=True))])
            if body.include_usage:
                yield answer.chunk([], usage=usage)
            yield "data: [DONE]\n\n"

        return SSEResponse(None, replay(), headers)


class _Answer:
    """The answer to one completion request, whole or as stream chunks."""

    def __init__(self, completions: Completions, body: S.CompletionRequest, prompts: list[list[int]]):
        self.body, self.tokens = body, completions.tokens
        self.model, self.created, self.id = completions.generations.model_name, int(time.time()), ""
        self.count = len(prompts) * body.n
        self.echoed = [(p if isinstance(p, str) else self.tokens.decode(ids)) if body.echo else ""
                       for p, ids in zip(body.prompts, prompts)]
        self.scored = body.echo and body.logprobs is not None
        self.prefixes: list[list[tuple]] = [[] for _ in prompts]  # each prompt's scored tokens, when scored

    def logprobs(self, p: int, entries: list[tuple]) -> S.CompletionLogprobs | None:
        """A choice of prompt ``p``: its echoed prompt's logprobs, then those of ``entries`` (generated)."""
        if self.body.logprobs is None:
            return None
        return self.tokens.completion_logprobs((self.prefixes[p], 0), (entries, len(self.echoed[p])))

    def completion(self, choices: list[S.CompletionChoice], usage: S.Usage) -> S.Completion:
        return S.Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def chunk(self, choices: list[S.CompletionChunkChoice], **usage) -> str:
        return sse(S.CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, **usage))

    async def events(self, path: str, job):
        n = self.body.n
        offsets = [len(self.echoed[i // n]) for i in range(self.count)]
        if self.body.echo:
            for i in range(self.count):
                p = i // n
                yield self.chunk([S.CompletionChunkChoice(index=i, text=self.echoed[p], logprobs=self.logprobs(p, []),
                                                          finish_reason=None)])
        try:
            async for i, event in job:
                lp = None
                if self.body.logprobs is not None and event.logprob is not None:
                    lp = self.tokens.completion_logprobs(([(event.token, event.logprob, event.top_logprobs or [])],
                                                          offsets[i]))
                offsets[i] += len(event.text)
                reason = finish_reason(event.finish_reason)
                if event.text or lp or reason:
                    yield self.chunk([S.CompletionChunkChoice(index=i, text=event.text, logprobs=lp,
                                                              finish_reason=reason)])
        except APIError as e:
            yield sse(e.body(path))
            return
        if self.body.include_usage:
            yield self.chunk([], usage=job.usage)
        yield "data: [DONE]\n\n"
