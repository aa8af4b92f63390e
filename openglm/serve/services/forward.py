"""Chat and text completions forwarded to upstream servers and billed here: the gateway's services.

The gateway (``openglm serve --upstream URL ...``) has no model of its own. Each request is checked
as the embedded server checks it (key, model, chat size, limits and balance), reserved at its worst
case, forwarded to an upstream through the pool (``openglm.serve.upstream``), and settled with the
upstream's ``usage``. The request sent upstream is the client's own body, with
``stream_options.include_usage`` asked for (and dropped again from the answer if the client did not
ask), and Zhipu's fields turned into OpenAI's.

The worst case needs the prompt's tokens before any upstream has seen it. For a model of ours (a
bundled name or a checkpoint directory the gateway can read) the gateway tokenizes the prompt
itself, exactly; for any other model it bounds it: a byte-level tokenizer never makes more tokens
than the text has UTF-8 bytes, plus ``TEMPLATE_TOKENS`` per message for a chat template's markup.

Billing: the upstream's ``usage`` where it sends one (never more than was reserved). A stream cut
mid-way has none: it is billed for what its client received, its completion tokens counted with the
model's tokenizer when the model is ours, else as the number of chunks with text (one token each
from openglm, vLLM and llama-server, which send a token per chunk), and its prompt as reserved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from anyio import CapacityLimiter, to_thread
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..errors import APIError, ClientGone
from ..upstream import StreamCut, UpstreamError, UpstreamPool, UpstreamStream
from .billing import Billing
from .generation import cache_scope
from .tokens import RENDER_THREADS, check_chat_size

log = logging.getLogger("openglm.serve")

DEFAULT_CONTEXT = 4096  # an upstream's context length where its /v1/models card gives none
TEMPLATE_TOKENS = 16  # a chat template's tokens around one message (GLM-4's: 1-3), at most
PROMPT_TOKENS = 16  # tokens a server may add around a text prompt (BOS, GLM's [gMASK]<sop>), at most
DISCONNECT_POLL = 0.2  # seconds between two checks that the client of a non-streamed request is still there


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def chat_prompt_bound(messages: list[dict], tools: list[dict] | None) -> int:
    """At most how many tokens any byte-level tokenizer and chat template make of this chat."""
    size = sum(_utf8_len(m["content"]) + sum(_utf8_len(json.dumps(c, ensure_ascii=False))
                                            for c in m.get("tool_calls", ())) + TEMPLATE_TOKENS for m in messages)
    return size + TEMPLATE_TOKENS + (_utf8_len(json.dumps(tools, ensure_ascii=False)) if tools else 0)


def _error(e: UpstreamError) -> APIError:
    headers = {"retry-after": str(e.retry_after)} if e.retry_after else None
    zhipu = {400: "1210", 404: "1211"}.get(e.status) if e.code != "context_length_exceeded" else "1261"
    return APIError(e.status, e.message, e.type, e.code, e.param, zhipu=zhipu, headers=headers)


class Forwarder:
    """Billed requests on the upstreams of ``pool``, accounts and ledger in ``store``; ``metrics`` is
    the app's ``Metrics``."""

    def __init__(self, pool: UpstreamPool, store, metrics):
        self.pool, self.store, self.metrics = pool, store, metrics
        self.billings: dict[str, Billing] = {}
        self.tokenizers: dict[str, object] = {}  # model -> its tokenizer, or None where the model is not ours
        self.threads = CapacityLimiter(RENDER_THREADS)
        self.settling: set[asyncio.Task] = set()

    # ---------------------------------------------------------------------------- checks

    def billing(self, model: str) -> Billing:
        if model not in self.billings:
            self.billings[model] = Billing(self.store, model)
        return self.billings[model]

    def check_model(self, model: str) -> None:
        if not self.pool.known(model):
            self.ready()  # no upstream has answered yet: what they serve is not known
            served = ", ".join(repr(m) for m in sorted(self.pool.model_cards())) or "none now"
            raise APIError(404, f"the model {model!r} does not exist; the models served are {served}",
                           "invalid_request_error", "model_not_found", "model", zhipu="1211", zhipu_status=400)

    def ready(self) -> None:
        if not any(u.healthy for u in self.pool.upstreams):
            raise APIError(503, "no upstream server answers now; retry shortly", "server_error", "overloaded",
                           headers={"retry-after": "2"})

    def health(self) -> dict:
        """``/health``'s answer: 200 while an upstream is in (how many are), else 503."""
        self.ready()
        up = sum(u.healthy for u in self.pool.upstreams)
        return {"status": "ok", "models": self.model_names(), "upstreams": up,
                "upstreams_out": len(self.pool.upstreams) - up}

    def model_names(self) -> list[str]:
        return sorted(self.pool.model_cards())

    async def tokenizer(self, model: str):
        """The tokenizer of ``model`` where it names a checkpoint of ours (bundled or a directory here);
        None for any other model."""
        if model not in self.tokenizers:
            self.tokenizers[model] = await to_thread.run_sync(_our_tokenizer, model, limiter=self.threads)
        return self.tokenizers[model]

    def _budget(self, model: str, prompt_tokens: int, exact: bool, max_tokens: int | None) -> tuple[int, bool]:
        """(completion tokens one choice may use, whether the upstream must be told that limit)."""
        context = self.pool.context_length(model)
        room = (context or DEFAULT_CONTEXT) - (prompt_tokens if exact else 0)
        if exact and (room <= 0 or (max_tokens is not None and max_tokens > room)):
            asked = f" + max_tokens ({max_tokens})" if max_tokens is not None else ""
            raise APIError(400, f"prompt ({prompt_tokens} tokens){asked} exceeds the model's context of "
                           f"{context or DEFAULT_CONTEXT} tokens", code="context_length_exceeded",
                           param="messages", zhipu="1261")
        if max_tokens is not None:
            return max_tokens, False
        # Unasked, an upstream generates to the end of its context: within the reservation when we know
        # that context, else it is told the reservation's limit.
        return max(room, 1), context is None

    # ---------------------------------------------------------------------------- the two APIs

    async def chat(self, request: Request, key, body, opts) -> Response:
        """``POST /v1/chat/completions`` and Zhipu's chat (``opts``: the route's ``ChatOptions``)."""
        arrived = time.monotonic()
        model = body.model
        self.check_model(model)
        tools = [t.model_dump(exclude_none=True) for t in opts.tools] if opts.tools else None
        messages = [m.to_template() for m in body.messages]
        check_chat_size(messages, tools)
        billing = self.billing(model)
        tokenizer = await self.tokenizer(model)
        if tokenizer is not None:
            from ...data.chat import render_prompt

            # Rendering costs time in the chat's size: only for a key that may run the request at all.
            await billing.check(key, opts.request_id, 1, (opts.max_tokens or 1) * opts.n)
            ids = await to_thread.run_sync(render_prompt, tokenizer, messages, tools, limiter=self.threads)
            prompt_tokens = len(ids)
        else:
            prompt_tokens = chat_prompt_bound(messages, tools)
        budget, tell = self._budget(model, prompt_tokens, tokenizer is not None, opts.max_tokens)
        upstream = await request.json()
        if opts.zhipu:  # Zhipu's own fields: the request id is ours to keep, do_sample false is greedy
            for name in ("request_id", "user_id", "do_sample"):
                upstream.pop(name, None)
            upstream["temperature"] = opts.temperature
        if tell:
            upstream["max_tokens"] = budget
        head = {"model": model, "id_prefix": "chatcmpl-"}
        return await self._run(request, key, billing, "/v1/chat/completions", upstream, model, head, prompt_tokens, budget * opts.n, opts.request_id, body.stream,
                               opts.zhipu or body.include_usage, tokenizer, arrived, zhipu=opts.zhipu)

    async def completions(self, request: Request, key, body) -> Response:
        """``POST /v1/completions``."""
        arrived = time.monotonic()
        model = body.model
        self.check_model(model)
        billing = self.billing(model)
        prompts = body.prompts
        tokenizer = await self.tokenizer(model)
        texts = [p for p in prompts if isinstance(p, str)]
        if tokenizer is not None and texts:
            least = (1 if body.max_tokens is None else body.max_tokens) * body.n * len(prompts)
            await billing.check(key, None, 1, least)  # before tokenizing, as the chat checks before rendering
            counted = iter(await to_thread.run_sync(
                lambda: [len(tokenizer.encode(t)) for t in texts], limiter=self.threads))
            lengths = [next(counted) if isinstance(p, str) else len(p) for p in prompts]
        else:
            lengths = [_utf8_len(p) + PROMPT_TOKENS if isinstance(p, str) else len(p) for p in prompts]
        exact = tokenizer is not None or not texts
        budget, tell = self._budget(model, max(lengths), exact, body.max_tokens)
        upstream = await request.json()
        if tell:
            upstream["max_tokens"] = budget
        return await self._run(request, key, billing, "/v1/completions", upstream, model,
                               {"model": model, "id_prefix": "cmpl-"}, sum(lengths), budget * body.n * len(prompts), None, body.stream, body.include_usage,
                               tokenizer, arrived, zhipu=False)

    async def embeddings(self, key, body) -> tuple[dict, dict[str, str]]:
        """``POST /v1/embeddings``, billed as prompt tokens: the answer and the key's rate-limit headers."""
        arrived = time.monotonic()
        model = body.model
        self.check_model(model)
        billing = self.billing(model)
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]
        tokenizer = await self.tokenizer(model)
        texts = [t for t in inputs if isinstance(t, str)]
        if tokenizer is not None and texts:
            await billing.check(key, None, 1, 0)
            prompt_tokens = sum(await to_thread.run_sync(lambda: [len(tokenizer.encode(t)) for t in texts],
                                                         limiter=self.threads))
        else:
            prompt_tokens = sum(_utf8_len(t) + PROMPT_TOKENS for t in texts)
        prompt_tokens += sum(len(t) for t in inputs if not isinstance(t, str))
        reservation = await billing.reserve(key, None, prompt_tokens, 0, False)
        return await self._whole(None, key, billing, reservation, "/v1/embeddings", body.model_dump(exclude_unset=True),
                                 model, {"model": model}, tokenizer, arrived)

    # ---------------------------------------------------------------------------- forwarding and billing

    async def _run(self, request: Request, key, billing: Billing, path: str, upstream: dict, model: str, head: dict,
                   prompt_tokens: int, max_tokens: int, request_id: str | None, stream: bool,
                   include_usage: bool, tokenizer, arrived: float, *, zhipu: bool) -> Response:
        """Reserve, forward, settle: the answer to a chat or completion request."""
        reservation = await billing.reserve(key, request_id, prompt_tokens, max_tokens, stream)
        # The upstream sees every tenant under one key: the salt keeps cached prefixes per account
        # (on an openglm worker, on vLLM; other servers ignore it).
        upstream["cache_salt"] = cache_scope(key, upstream.get("cache_salt"))
        head["id"] = f"{head.pop('id_prefix')}{reservation.request_id}"
        if zhipu:
            head["request_id"] = request_id or reservation.request_id
        if not stream:
            answer, headers = await self._whole(request, key, billing, reservation, path, upstream, model, head,
                                                tokenizer, arrived)
            return Response(json.dumps(answer, ensure_ascii=False), media_type="application/json", headers=headers)
        upstream["stream_options"] = {**(upstream.get("stream_options") or {}), "include_usage": True}
        chunks = self.pool.stream(path, upstream, model)
        events = chunks.__aiter__()
        try:
            headers = await billing.rate_limit_headers(key)
            first = await anext(events)  # retried inside until an upstream sends a token: errors are ours still
        except BaseException as e:
            await asyncio.shield(billing.release(reservation))
            if isinstance(e, UpstreamError):
                raise _error(e) from None
            if isinstance(e, StopAsyncIteration):
                raise APIError(502, "the upstream's stream ended before any token", "server_error",
                               "upstream_error") from None
            raise
        self.metrics.ttft.observe(time.monotonic() - arrived)
        return StreamingResponse(
            self._relay(chunks, events, first, billing, reservation, head, include_usage, tokenizer, arrived,
                        request.url.path),
            media_type="text/event-stream", headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _whole(self, request: Request | None, key, billing: Billing, reservation, path: str, upstream: dict,
                     model: str, head: dict, tokenizer, arrived: float) -> tuple[dict, dict[str, str]]:
        """A request answered whole, reserved already: (the answer, the key's rate-limit headers)."""
        try:
            headers = await billing.rate_limit_headers(key)
            answer = await self._complete(request, path, upstream, model)
        except BaseException as e:
            await asyncio.shield(billing.release(reservation))
            if isinstance(e, UpstreamError):
                raise _error(e) from None
            raise
        usage = self._usage(answer.get("usage"), reservation, None, tokenizer)
        reasons = sorted({str(c.get("finish_reason")) for c in answer.get("choices") or ()})
        self._settle(billing, reservation, usage, ",".join(reasons) or "stop", arrived)
        answer.update(head, usage=usage)
        return answer, headers

    async def _complete(self, request: Request | None, path: str, upstream: dict, model: str) -> dict:
        """The upstream's whole answer; a client of ``request`` that disconnects meanwhile cancels it
        (``ClientGone``)."""
        forward = asyncio.ensure_future(self.pool.complete(path, upstream, model))
        try:
            while not forward.done():
                await asyncio.wait({forward}, timeout=DISCONNECT_POLL)
                if not forward.done() and request is not None and await request.is_disconnected():
                    raise ClientGone()
            return forward.result()
        finally:
            forward.cancel()

    async def _relay(self, chunks: UpstreamStream, events, first: dict, billing: Billing, reservation, head: dict,
                     include_usage: bool, tokenizer, arrived: float, path: str):
        """The client's server-sent events: the upstream's chunks under this gateway's id and model, its
        usage replaced by the billed one (or dropped if the client did not ask for it); then
        ``[DONE]``, or, if the upstream broke, the usage billed and an error event."""
        sent, usage, reasons, error, ended = 0, None, set(), None, False
        chunk = first
        try:
            while True:
                if "usage" in chunk:
                    usage = self._usage(chunk.pop("usage"), reservation, None, tokenizer)
                    if include_usage:
                        chunk["usage"] = usage
                for choice in chunk.get("choices") or ():
                    if choice.get("finish_reason"):
                        reasons.add(choice["finish_reason"])
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        sent += 1
                        await billing.deliveries.sent(reservation, sent)
                if chunk.get("choices") or "usage" in chunk:
                    chunk.update(head)
                    yield f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
                try:
                    chunk = await anext(events)
                except StopAsyncIteration:
                    ended = True
                    break
        except StreamCut as e:
            error = e
        finally:
            if usage is None:  # cut, client gone, or an upstream that sends no usage: what the client received
                usage = self._usage(None, reservation, chunks, tokenizer)
            reason = "error" if error is not None else ",".join(sorted(reasons)) if ended else "cancelled"
            self._settle(billing, reservation, usage, reason or "stop", arrived)
            await events.aclose()  # a client gone: the upstream's connection closes, and it stops generating
        if error is not None:
            self.metrics.errors.labels(str(error.status)).inc()
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            yield f"data: {_error(error).body(path).model_dump_json()}\n\n"
            return
        yield "data: [DONE]\n\n"

    def _usage(self, reported: dict | None, reservation, chunks: UpstreamStream | None, tokenizer) -> dict:
        """The usage to bill: the upstream's ``reported`` one, else what ``chunks`` sent the client;
        never above the reservation."""
        if isinstance(reported, dict) and isinstance(reported.get("prompt_tokens"), int):
            prompt = reported["prompt_tokens"]
            completion = reported.get("completion_tokens") or 0  # (none: embeddings)
        else:
            prompt = reservation.prompt_tokens
            completion = 0
            if chunks is not None:
                completion = sum(len(tokenizer.encode("".join(t))) for t in chunks.texts.values()) \
                    if tokenizer is not None else chunks.token_chunks
        if prompt > reservation.prompt_tokens or completion > reservation.max_tokens:
            log.warning("request %s: the upstream counted %d + %d tokens, more than the %d + %d reserved; "
                        "billed the reserved", reservation.request_id, prompt, completion,
                        reservation.prompt_tokens, reservation.max_tokens)
        prompt, completion = max(0, min(prompt, reservation.prompt_tokens)), \
            max(0, min(completion, reservation.max_tokens))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _settle(self, billing: Billing, reservation, usage: dict, finish_reason: str, arrived: float) -> None:
        """Settle in a task of its own: a response cancelled meanwhile (client gone) cannot stop it."""
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        self.metrics.generation_tokens.inc(usage["completion_tokens"])
        self.metrics.e2e.observe(time.monotonic() - arrived)
        self.metrics.requests.labels(finish_reason).inc()

        async def settle():
            try:
                await billing.settle(reservation, usage["prompt_tokens"], usage["completion_tokens"], finish_reason,
                                     int((time.monotonic() - arrived) * 1000))
            except Exception:  # the database failed: the reservation stays open until recover()
                log.exception("settling request %s failed", reservation.request_id)

        task = asyncio.get_running_loop().create_task(settle())
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    async def wait_settled(self, timeout: float) -> None:
        if self.settling:
            await asyncio.wait(set(self.settling), timeout=timeout)

    def close(self) -> None:
        for billing in self.billings.values():
            billing.close()


def _our_tokenizer(model: str):
    from ...data.tokenizer import load_tokenizer
    from ...errors import OpenGLMError
    from ...model.checkpoint import checkpoint_dir

    try:
        directory = checkpoint_dir(model)
    except OpenGLMError:
        return None
    try:
        return load_tokenizer(directory)
    except Exception as e:  # a folder of that name that holds no tokenizer of ours: the model is not ours
        log.info("model %r: %s is no checkpoint of ours (%s); its prompts are bounded, not counted", model,
                 directory, e)
        return None
