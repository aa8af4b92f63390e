"""Chat completions, for OpenAI's route and Zhipu's: a chat rendered, generated, answered whole or streamed."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from ...infer.sampling import SamplingParams
from .. import schemas as S
from ..errors import APIError
from .billing import Billing
from .generation import Choice, Generations, Job
from .sse import SSEResponse, json_response, sse
from .tokens import Tokens, check_chat_size


@dataclass
class ChatOptions:
    """What the two chat APIs ask of a chat, read from their different request bodies."""

    tools: list[S.Tool] | None
    max_tokens: int | None
    temperature: float
    logprobs: int | None  # None: no logprobs; k: the chosen token's and the top k
    n: int
    request_id: str | None  # the client's, billed once (Zhipu's)
    zhipu: bool  # echo request_id in each body, and always end a stream with usage


class Chat:
    """``POST /v1/chat/completions`` and ``POST /api/paas/v4/chat/completions``."""

    def __init__(self, generations: Generations, billing: Billing, tokens: Tokens):
        self.generations, self.billing, self.tokens = generations, billing, tokens

    async def create(self, request: Request, key, body: S.ChatCompletionRequest | S.ZhipuChatRequest,
                     opts: ChatOptions) -> Response:
        arrived = time.monotonic()
        gen = self.generations
        gen.check_model(body.model)
        gen.ready()
        tools = [t.model_dump(exclude_none=True) for t in opts.tools] if opts.tools else None
        messages = [m.to_template() for m in body.messages]
        check_chat_size(messages, tools)
        gen.check_max_tokens(opts.max_tokens)
        # Rendering costs time in the chat's size: only for a key that may run the request (at its
        # smallest: one prompt token), and on a thread of its own, never on the event loop.
        await self.billing.check(key, opts.request_id, 1, (opts.max_tokens or 1) * opts.n)
        ids = await self.tokens.render_chat(messages, tools)
        params = SamplingParams(max_new_tokens=gen.budget(len(ids), opts.max_tokens), temperature=opts.temperature,
                                top_p=body.top_p, seed=body.seed, stop_token_ids=self.tokens.end_of_turn_ids(),
                                stop_strings=body.stop_strings)
        job, headers = await gen.start(key, [ids], opts.n, params, opts.logprobs, opts.request_id, body.stream,
                                       arrived, body.cache_salt)
        answer = _Answer(self, job, opts, tools)
        if not body.stream:
            choices = await gen.collect(request, job, opts.n)
            return json_response(answer.completion(choices), headers)
        include_usage = opts.zhipu or body.include_usage
        return SSEResponse(job, answer.events(request.url.path, include_usage), headers)


class _Answer:
    """The answer to one chat request, whole or as stream chunks."""

    def __init__(self, chat: Chat, job: Job, opts: ChatOptions, tools: list[dict] | None):
        self.job, self.opts, self.tools, self.tokens = job, opts, tools, chat.tokens
        self.head = {"id": f"chatcmpl-{job.request_id}", "created": int(time.time()),
                     "model": chat.generations.model_name}
        if opts.zhipu:
            self.head["request_id"] = opts.request_id or job.request_id

    def message(self, choice: Choice) -> tuple[S.AssistantMessage, str]:
        if self.tools:
            from ...data.chat import parse_assistant

            parsed = parse_assistant(choice.text, self.tools)
            if parsed.get("tool_calls"):
                return S.AssistantMessage(content=parsed["content"], tool_calls=parsed["tool_calls"]), "tool_calls"
        return S.AssistantMessage(content=choice.text.removeprefix("\n")), choice.finish_reason

    def logprobs(self, entries: list) -> S.ChoiceLogprobs | None:
        return self.tokens.chat_logprobs(entries) if self.opts.logprobs is not None else None

    def completion(self, choices: list[Choice]) -> S.ChatCompletion:
        out = []
        for i, c in enumerate(choices):
            message, reason = self.message(c)
            out.append(S.ChatChoice(index=i, message=message, finish_reason=reason, logprobs=self.logprobs(c.logprobs)))
        return S.ChatCompletion(**self.head, choices=out, usage=self.job.usage)

    def chunk(self, choices: list[S.ChatChunkChoice], **usage) -> str:
        return sse(S.ChatCompletionChunk(**self.head, choices=choices, **usage))

    async def events(self, path: str, include_usage: bool):
        n, job = self.opts.n, self.job
        choices = [Choice() for _ in range(n)]
        for i in range(n):
            yield self.chunk([S.ChatChunkChoice(index=i, delta=S.ChatDelta(role="assistant", content=""),
                                                finish_reason=None)])
        try:
            async for i, event in job:
                c = choices[i]
                c.add(event)
                if self.tools:  # a tool call is only recognisable whole: send the message at the end
                    if c.finish_reason is not None:
                        message, reason = self.message(c)
                        yield self.chunk([S.ChatChunkChoice(index=i, delta=_delta(message), finish_reason=None)])
                        yield self.chunk([S.ChatChunkChoice(index=i, delta=S.ChatDelta(), finish_reason=reason)])
                    continue
                text = event.text
                if c.text == text:  # the first text of the reply: GLM-4 opens it with "\n", not content
                    text = text.removeprefix("\n")
                scored = self.opts.logprobs is not None and event.logprob is not None
                if text or scored:
                    yield self.chunk([S.ChatChunkChoice(index=i, delta=S.ChatDelta(content=text),
                                                        logprobs=self.logprobs(c.logprobs[-1:]) if scored else None,
                                                        finish_reason=None)])
                if c.finish_reason is not None:
                    yield self.chunk([S.ChatChunkChoice(index=i, delta=S.ChatDelta(), finish_reason=c.finish_reason)])
        except APIError as e:
            yield sse(e.body(path))
            return
        if include_usage:
            yield self.chunk([], usage=job.usage)
        yield "data: [DONE]\n\n"


def _delta(message: S.AssistantMessage) -> S.ChatDelta:
    """A whole message as one stream chunk's delta."""
    if not message.tool_calls:
        return S.ChatDelta(content=message.content)
    calls = [S.ChunkToolCall(index=k, **call.model_dump()) for k, call in enumerate(message.tool_calls)]
    return S.ChatDelta(content=message.content, tool_calls=calls)
