"""The HTTP API: OpenAI-compatible routes, Zhipu's chat route, GLM infilling, usage, admin, metrics, a chat page.

Every generation request goes: body checks (pydantic) -> key (``Store.authenticate``) -> model name ->
prompt tokens and length checks -> ``Store.reserve`` (worst case: prompt + max tokens) -> the engine ->
``Store.settle`` with the engine's own token counts. Nothing reaches the model before all checks pass.
Rendering a chat and tokenizing text cost time in their size: a chat is bounded (``MAX_CHAT_MESSAGES``,
``MAX_CHAT_CHARS``), and the key's limits and balance are checked (``Store.check``) before either
runs, on a worker thread.
Store calls are blocking database transactions, so they run in worker threads; the engine is async.

Each generation runs as a ``_Job``: a task of its own that drains the engine handles and settles the
bill whatever happens to the HTTP response. A client that goes away cancels the engine requests, and
the job then bills exactly the tokens the engine generated.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import re
import time
from datetime import date, datetime
from pathlib import Path

from anyio import CapacityLimiter, to_thread
from typing import Annotated

from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import OpenGLMError
from ..infer.sampling import SamplingParams
from . import schemas as S
from .metrics import Metrics
from .store import AuthError, InsufficientBalance, RateLimited, RequestTooLarge, StoreError

log = logging.getLogger("openglm.serve")

STATIC_DIR = Path(__file__).parent / "static"
ZHIPU_PREFIX = "/api/paas/"
# Zhipu's code for each HTTP status where a request has no more specific one (1210: bad parameters,
# 1222: no such API).
_ZHIPU_BY_STATUS = {400: "1210", 401: "1000", 403: "1220", 404: "1222", 413: "1210", 429: "1302",
                    500: "500", 503: "1305"}
# The HTTP status Zhipu sends where it differs from OpenAI's: Zhipu answers 434 for "no permission to
# this API" and 400 for every bad parameter (its clients have error classes for 400/401/429/500/503).
_ZHIPU_STATUS = {403: 434, 413: 400}
_FINISH = {"timeout": "length", "cancelled": "abort"}  # engine reasons that OpenAI has no word for
KEY_CACHE_SECONDS = 5.0
MAX_CHAT_MESSAGES = 2048  # OpenAI's own limit
MAX_CHAT_CHARS = 1_000_000  # text of one chat: far more than any context this server serves holds
RENDER_THREADS = 4  # chats rendered at once: long ones never take all the threads the database calls need
RECORD_TOKENS = 16  # a stream's count of tokens sent is written once this many are unrecorded,
RECORD_SECONDS = 1.0  # or this long after the last write, whichever comes first (see _Deliveries)
RECORD_LAG = 2 * RECORD_TOKENS  # the most tokens a stream runs ahead of its record: what a crash leaves unbilled
_Id = Annotated[int, PathParam(ge=1, lt=S.MAX_UNITS)]
_IdQuery = Annotated[int | None, Query(ge=1, lt=S.MAX_UNITS)]


class APIError(Exception):
    """An error answer: HTTP ``status``, OpenAI's ``type``/``code``/``param``, and Zhipu's ``zhipu`` code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, zhipu: str | None = None, headers: dict[str, str] | None = None,
                 zhipu_status: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.zhipu = zhipu or _ZHIPU_BY_STATUS.get(status, str(status))
        self.zhipu_status = zhipu_status or _ZHIPU_STATUS.get(status, status)
        self.headers = headers or {}

    def status_for(self, path: str) -> int:
        return self.zhipu_status if path.startswith(ZHIPU_PREFIX) else self.status


def _store_error(e: StoreError) -> APIError:
    if isinstance(e, AuthError) and e.http_status == 403:
        return APIError(403, str(e), "permission_error", "model_not_allowed", "model", zhipu="1220")
    if isinstance(e, AuthError):
        return APIError(401, str(e), "invalid_request_error", "invalid_api_key", zhipu=e.code)
    if isinstance(e, InsufficientBalance):
        # OpenAI's own clients retry a 429 unless told not to: topping up takes a person.
        return APIError(429, str(e), "insufficient_quota", "insufficient_quota", zhipu=e.code,
                        headers={"x-should-retry": "false"})
    if isinstance(e, RequestTooLarge):
        return APIError(400, str(e), code="request_too_large", param="max_tokens", zhipu=e.code)
    if isinstance(e, RateLimited):
        return APIError(429, str(e), e.kind, "rate_limit_exceeded", zhipu=e.code,
                        headers={"retry-after": str(max(1, math.ceil(e.retry_after)))})
    return APIError(e.http_status, str(e), "invalid_request_error", "duplicate_request_id"
                    if e.code == "1231" else None, zhipu=e.code)


def _error_body(path: str, err: APIError) -> dict:
    if path.startswith(ZHIPU_PREFIX):
        return {"error": {"code": err.zhipu, "message": err.message}}
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def _error_response(request: Request, err: APIError, metrics: Metrics | None = None) -> JSONResponse:
    if metrics is not None:
        metrics.errors.labels(str(err.status)).inc()
    path = request.url.path
    return JSONResponse(_error_body(path, err), status_code=err.status_for(path), headers=err.headers)


class _BodyLimit:
    """ASGI middleware: answer 413 to a body over ``max_bytes`` before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"0")
        too_large = APIError(413, f"request body is larger than {self.max_bytes} bytes", code="body_too_large")
        if not declared.isdigit():
            return await self._reply(scope, receive, send, APIError(400, "invalid Content-Length header"))
        if int(declared) > self.max_bytes:
            return await self._reply(scope, receive, send, too_large)
        body, more = bytearray(), True
        while more:  # a chunked body has no Content-Length: count as it comes
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._reply(scope, receive, send, too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # later calls wait for the client to go away, as the server's own receive does
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _reply(self, scope, receive, send, err: APIError):
        path = scope.get("path", "")
        response = JSONResponse(_error_body(path, err), status_code=err.status_for(path),
                                headers={"connection": "close"})
        await response(scope, receive, send)


class _ClientGone(Exception):
    """The client disconnected before its (non-streamed) answer was ready."""


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Deliveries:
    """Writes how many tokens each stream has sent into its reservation (``Store.record_delivered``),
    so that a server killed mid-stream bills them at its next start (``Store.recover``).

    One task writes the counts of all streams in one transaction: as soon as one of them has
    ``RECORD_TOKENS`` tokens unrecorded, else ``RECORD_SECONDS`` after its last write. A stream that
    gets ``RECORD_LAG`` tokens ahead of its record waits for the next write before it sends more, so
    however slow the database, a crash leaves at most ``RECORD_LAG`` tokens of a request unbilled.
    """

    def __init__(self, store):
        self.store = store
        self.pending: dict[_Job, int] = {}  # counts not yet written
        self.due = asyncio.Event()
        self.written = asyncio.Event()  # set (and replaced) after each write
        self.task: asyncio.Task | None = None

    async def sent(self, job: _Job, count: int) -> None:
        """The stream of ``job`` is about to send its ``count``-th token: note it, waiting first while
        that would put it more than ``RECORD_LAG`` tokens ahead of its record."""
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        while count - job.recorded > RECORD_LAG:
            self.due.set()
            await self.written.wait()
        self.pending[job] = count
        if count - job.recorded >= RECORD_TOKENS:
            self.due.set()

    def forget(self, job: _Job) -> None:
        """The job settles: its count needs no writing any more."""
        self.pending.pop(job, None)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.due.wait(), RECORD_SECONDS)
            except TimeoutError:
                pass
            self.due.clear()
            batch, self.pending = self.pending, {}
            if not batch:
                continue
            try:
                await to_thread.run_sync(self.store.record_delivered,
                                         {job.reservation.id: n for job, n in batch.items()})
            except Exception:  # the database failed: keep the counts for the next try; streams wait meanwhile
                log.exception("recording the tokens streams sent failed; retrying")
                for job, n in batch.items():
                    self.pending[job] = max(n, self.pending.get(job, 0))
                await asyncio.sleep(RECORD_SECONDS)
                continue
            for job, n in batch.items():
                job.recorded = max(job.recorded, n)
            self.written.set()
            self.written = asyncio.Event()


class _Job:
    """One HTTP generation request inside the engine: its handles, its reservation, its settlement.

    A task of its own drains every handle into ``events`` ((choice index, TokenEvent) pairs, then
    None), then settles the reservation with the handles' token counts, so the bill is right even if
    the HTTP response is cancelled or never sent. ``usage`` is what was billed, set before the None.
    A stream's tokens are recorded in its reservation as they go (``_Deliveries``), for a crash.
    """

    def __init__(self, server: _Server, handles: list, reservation, prompt_tokens: int, arrived: float):
        self.server, self.handles, self.reservation = server, handles, reservation
        self.prompt_tokens, self.arrived = prompt_tokens, arrived
        self.sent = self.recorded = 0  # a stream's tokens handed on to the response / written to the database
        self.events: asyncio.Queue = asyncio.Queue()
        self.usage: S.Usage | None = None
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run())
        server.jobs.add(self.task)  # a strong reference until it ends (the loop only keeps weak ones)
        self.task.add_done_callback(server.jobs.discard)

    def stop(self) -> None:
        """Cancel the engine requests still running (the client is gone); the job then settles."""
        for handle in self.handles:
            if handle.finish_reason is None:
                handle.cancel()

    async def _run(self) -> None:
        try:
            await asyncio.gather(*(self._pump(i, h) for i, h in enumerate(self.handles)))
        except Exception as e:  # an engine failure: stop the other choices, bill what was generated
            log.exception("generation failed")
            self.error = e
            self.stop()
        finally:
            try:
                await self._settle()
            except Exception as e:  # the database failed: the reservation stays open until recover()
                log.exception("settling request %s failed", self.reservation.request_id)
                self.error = self.error or e
            await self.events.put(None)

    async def _pump(self, index: int, handle) -> None:
        from .engine import TokenEvent

        m, last, ended = self.server.metrics, None, False
        async for event in handle:  # a cancelled consumer cancels the engine request (RequestHandle does)
            now = time.monotonic()
            if last is None:
                m.ttft.observe(now - self.arrived)
            else:
                m.itl.observe(now - last)
            last, ended = now, event.finish_reason is not None
            if self.reservation.stream:
                self.sent += 1
                await self.server.deliveries.sent(self, self.sent)
            await self.events.put((index, event))
        if not ended:  # ended without a new token (cancelled, engine stopped): say so with an empty event
            await self.events.put((index, TokenEvent(-1, "", finish_reason=handle.finish_reason or "abort")))
        if handle.queue_time is not None:
            m.queue.observe(handle.queue_time)
        m.e2e.observe(time.monotonic() - self.arrived)
        m.requests.labels(handle.finish_reason or "unknown").inc()

    async def _settle(self) -> None:
        self.server.deliveries.forget(self)
        completion = sum(h.completion_tokens for h in self.handles)
        reasons = sorted({h.finish_reason or "error" for h in self.handles})
        m = self.server.metrics
        m.prompt_tokens.inc(sum(h.prompt_tokens for h in self.handles))
        m.generation_tokens.inc(completion)
        latency_ms = int((time.monotonic() - self.arrived) * 1000)
        await to_thread.run_sync(self.server.store.settle, self.reservation, self.prompt_tokens, completion,
                                 ",".join(reasons), latency_ms)
        self.usage = S.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                             total_tokens=self.prompt_tokens + completion)

    async def __aiter__(self):
        while (item := await self.events.get()) is not None:
            yield item
        if self.error is not None:
            raise APIError(500, f"generation failed: {self.error}", "server_error")


class _SSEResponse(StreamingResponse):
    """A server-sent-event stream that stops its job when the response ends in any way (client gone)."""

    def __init__(self, job: _Job, content, headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.stop()


class _Choice:
    """Accumulates one choice's text, logprobs and finish reason from its TokenEvents."""

    def __init__(self):
        self.parts: list[str] = []
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.finish_reason: str | None = None

    def add(self, event) -> None:
        self.parts.append(event.text)
        if event.logprob is not None:
            self.logprobs.append((event.token, event.logprob, event.top_logprobs or []))
        if event.finish_reason is not None:
            self.finish_reason = _FINISH.get(event.finish_reason, event.finish_reason)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class _Server:
    """What the routes share: the engine (None while the model loads), the store, the tokenizer."""

    def __init__(self, engine, store, model_name: str, tokenizer, admin_key: str | None):
        self.engine, self.store, self.model_name, self.tokenizer = engine, store, model_name, tokenizer
        self.admin_key = admin_key
        self.metrics = Metrics(lambda: self.engine)
        self.created = int(time.time())
        self.jobs: set[asyncio.Task] = set()
        self.keys: dict[str, tuple] = {}  # secret -> (KeyInfo, monotonic expiry): see authenticate
        self.render_threads = CapacityLimiter(RENDER_THREADS)
        self.deliveries = _Deliveries(store)

    # ---------------------------------------------------------------------------- checks

    async def authenticate(self, request: Request):
        return await self._key(request, cached=False)

    async def authenticate_billed(self, request: Request):
        return await self._key(request, cached=True)

    async def _key(self, request: Request, cached: bool):
        """The request's key. ``cached``: may reuse a check up to ``KEY_CACHE_SECONDS`` old, for routes
        where ``Store.reserve`` checks the key again (revoked, expired, model) in its transaction."""
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip() if scheme.lower() == "bearer" else header.strip()
        now = time.monotonic()
        if cached and (hit := self.keys.get(secret)) and hit[1] > now:
            return hit[0]
        try:
            key = await to_thread.run_sync(self.store.authenticate, secret)
        except StoreError as e:
            raise _store_error(e) from None
        if len(self.keys) > 10_000:  # bounded: drop the lot rather than track ages
            self.keys.clear()
        self.keys[secret] = (key, now + KEY_CACHE_SECONDS)
        return key

    async def authenticate_admin(self, request: Request):
        header = request.headers.get("authorization", "")
        secret = header.partition(" ")[2].strip()
        if self.admin_key and secret and hmac.compare_digest(secret.encode(), self.admin_key.encode()):
            return None
        key = await self.authenticate(request)
        if not key.admin:
            raise APIError(403, "this endpoint needs an admin key", "permission_error", "admin_required")
        return key

    async def rate_limit_headers(self, key) -> dict[str, str]:
        if key.rpm is None and key.tpm is None:  # nothing to report: spare the database a transaction
            return {}
        return await to_thread.run_sync(self.store.rate_limit_headers, key)

    def ready(self):
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", "server_error", "loading",
                           headers={"retry-after": "2"})
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", "server_error", "engine_stopped")
        return self.engine

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "invalid_request_error", "model_not_found", "model", zhipu="1211", zhipu_status=400)

    def max_seq_len(self) -> int:
        return self.ready().max_seq_len

    def budget(self, prompt_len: int, max_tokens: int | None) -> int:
        """The completion tokens one choice may use; 400 if the prompt leaves no room for them."""
        room = self.max_seq_len() - prompt_len
        if max_tokens is None and room > 0:
            return room
        if max_tokens is None or max_tokens > room:
            asked = f" + max_tokens ({max_tokens})" if max_tokens is not None else ""
            raise APIError(400, f"prompt ({prompt_len} tokens){asked} exceeds the model's context of "
                           f"{self.max_seq_len()} tokens", code="context_length_exceeded",
                           param="messages", zhipu="1261")
        return max_tokens

    def check_fits(self, count: int) -> None:
        """400 for a request of ``count`` engine requests (prompts x n) that the engine's queue can never
        hold at once: a 503 would have clients retry it forever."""
        if count > self.engine.max_queue:
            raise APIError(400, f"this request needs {count} generations (prompts x n), more than the server "
                           f"queues at once ({self.engine.max_queue}); send fewer prompts or a smaller n",
                           code="request_too_large", param="n")

    async def reserve(self, key, request_id: str | None, prompt_tokens: int, max_tokens: int, stream: bool):
        return await self._billing(self.store.reserve, key, self.model_name, request_id, prompt_tokens, max_tokens,
                                   stream)

    async def check(self, key, request_id: str | None, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse now what ``reserve`` would refuse for a request of at least this size (``Store.check``)."""
        await self._billing(self.store.check, key, self.model_name, request_id, prompt_tokens, max_tokens)

    def check_max_tokens(self, max_tokens: int | None) -> None:
        """400 for a ``max_tokens`` that leaves no room for a prompt (of one token at least) in the context."""
        if max_tokens is not None and max_tokens >= self.max_seq_len():
            raise APIError(400, f"max_tokens ({max_tokens}) leaves no room for a prompt in the model's context "
                           f"of {self.max_seq_len()} tokens", code="context_length_exceeded", param="max_tokens",
                           zhipu="1261")

    async def tokenize(self, key, prompts: list, request_id: str | None, max_tokens: int) -> list[list[int]]:
        """Token ids of each prompt: a text, or token ids already. Tokenizing costs time in the text's
        length, so it runs only for a key that ``check`` lets run a request of one prompt token and
        ``max_tokens``, and on a worker thread, never on the event loop."""
        texts = [p for p in prompts if isinstance(p, str)]
        if not texts:
            return [list(p) for p in prompts]
        await self.check(key, request_id, 1, max_tokens)
        ids = iter(await to_thread.run_sync(_encode, self.tokenizer, texts, limiter=self.render_threads))
        return [next(ids) if isinstance(p, str) else list(p) for p in prompts]

    async def _billing(self, fn, key, *args):
        try:
            return await to_thread.run_sync(fn, key, *args)
        except StoreError as e:
            err = _store_error(e)
            if e.http_status == 429:
                err.headers.update(await self.rate_limit_headers(key))
            raise err from None

    # ---------------------------------------------------------------------------- generation

    async def start_job(self, key, prompts: list[list[int]], n: int, params: SamplingParams, logprobs: int | None,
                        request_id: str | None, stream: bool, arrived: float) -> tuple[_Job, dict[str, str]]:
        """Reserve, then submit ``n`` engine requests per prompt (choice ``p * n + j``)."""
        from .engine import EngineFull, EngineRequest, PromptTooLong

        engine = self.ready()
        self.check_fits(len(prompts) * n)
        prompt_tokens = sum(len(p) for p in prompts)
        reservation = await self.reserve(key, request_id, prompt_tokens,
                                         params.max_new_tokens * n * len(prompts), stream)
        handles = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(n):
                    seed = None if params.seed is None else params.seed + j  # n samples, not n copies
                    choice = SamplingParams(**{**vars(params), "seed": seed})
                    # The engine request's id is its own (EngineRequest makes one), never the client's
                    # request_id: that one is unique per account only.
                    handles.append(engine.submit(EngineRequest(ids, choice, logprobs)))
        except (EngineFull, PromptTooLong) as e:
            for handle in handles:
                handle.cancel()
            await to_thread.run_sync(self.store.release, reservation)
            if isinstance(e, PromptTooLong):
                raise APIError(400, str(e), code="context_length_exceeded", zhipu="1261") from None
            raise APIError(503, f"the server is overloaded: {e}", "server_error", "overloaded",
                           headers={"retry-after": "1"}) from None
        except BaseException:
            await to_thread.run_sync(self.store.release, reservation)
            raise
        headers = await self.rate_limit_headers(key)
        return _Job(self, handles, reservation, prompt_tokens, arrived), headers

    async def collect(self, request: Request, job: _Job, count: int) -> list[_Choice]:
        """Run a non-streamed job to the end; a client that disconnects meanwhile stops it."""
        choices = [_Choice() for _ in range(count)]

        async def drain():
            async for index, event in job:
                choices[index].add(event)

        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)

        drainer, watcher = asyncio.ensure_future(drain()), asyncio.ensure_future(watch())
        try:
            await asyncio.wait({drainer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not drainer.done():  # the client left: stop generating, let the job settle on its own
                job.stop()
                drainer.cancel()
        if not drainer.done() or drainer.cancelled():  # (a task just cancelled ends at the loop's next turn)
            raise _ClientGone()
        drainer.result()  # raises the job's APIError, if any
        return choices

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def chat_logprobs(self, entries) -> dict:
        def one(token, lp):
            text = self.token_text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top]}
                            for t, lp, top in entries]}

    def completion_logprobs(self, entries, start: int) -> dict:
        """OpenAI's completion ``logprobs`` of (token, logprob, top) entries, text offsets from ``start``;
        an echoed prompt's first token has logprob and top None (nothing predicts it)."""
        tokens, offsets, offset = [], [], start
        for t, _, _ in entries:
            tokens.append(self.token_text(t))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {self.token_text(a): alp for a, alp in top}
                                 for _, _, top in entries],
                "text_offset": offsets}

    def check_vocab(self, batch: list[list[int]], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        for ids in batch:
            if ids and max(ids) >= vocab:
                raise APIError(400, f"token id {max(ids)} is outside the vocabulary ({vocab})", param=param)

    async def prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[list[tuple]]:
        """Each prompt's (token, logprob, top ``k``) entries from a forward over it on the engine (unbilled:
        the caller bills the prompt)."""
        from .engine import EngineFull

        engine = self.ready()
        try:
            entries, _ = await engine.run_exclusive(_prompt_logprobs, engine.model, prompts, k)
        except EngineFull as e:
            raise APIError(503, f"the server is overloaded: {e}", "server_error", "overloaded",
                           headers={"retry-after": "1"}) from None
        return entries


def _check_chat_size(messages: list[dict], tools: list[dict] | None) -> None:
    """400 for a chat over ``MAX_CHAT_MESSAGES`` messages or ``MAX_CHAT_CHARS`` characters of text."""
    if len(messages) > MAX_CHAT_MESSAGES:
        raise APIError(400, f"messages: {len(messages)} messages, more than the {MAX_CHAT_MESSAGES} a chat may have",
                       param="messages", code="too_many_messages")
    chars = sum(len(m["content"]) + sum(len(json.dumps(c, ensure_ascii=False)) for c in m.get("tool_calls", ()))
                for m in messages) + (len(json.dumps(tools, ensure_ascii=False)) if tools else 0)
    if chars > MAX_CHAT_CHARS:
        raise APIError(400, f"messages: {chars} characters of text, more than the {MAX_CHAT_CHARS} a chat may have",
                       param="messages", code="chat_too_long")


def _chat_params(tokenizer, body, max_new_tokens: int, temperature: float) -> SamplingParams:
    from ..data.chat import end_of_turn_ids

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=body.top_p, seed=body.seed,
                          stop_token_ids=end_of_turn_ids(tokenizer), stop_strings=body.stop_strings)


def create_app(engine, store, model_name: str, tokenizer, *, admin_key: str | None = None,
               max_body_bytes: int = 1 << 20, public_metrics: bool = False, docs: bool = False) -> FastAPI:
    """The HTTP API over ``engine`` (an ``openglm.serve.engine.Engine``) and ``store`` (a ``Store``).

    ``engine`` may be None while the model loads (``/health`` and the generation routes answer 503)
    and be given later with ``attach_model``. The app starts the engine when it starts and stops it
    when it shuts down. ``admin_key``: a secret for the admin routes besides store keys marked admin.
    ``max_body_bytes``: larger request bodies get 413 before they are parsed.

    Every API route needs a key. ``/metrics`` and ``/openapi.json`` answer an admin key only, unless
    ``public_metrics`` / ``docs`` open them to anyone; ``docs`` also serves Swagger UI at ``/docs``
    from the ``swagger-ui-bundle`` package's files, so the page loads nothing from the network.
    """
    srv = _Server(engine, store, model_name, tokenizer, admin_key)
    swagger_dir = _swagger_ui_dir() if docs else None  # fails now, not at the first visit

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if srv.engine is not None:
            srv.engine.start()
        yield
        if srv.engine is not None:
            srv.engine.stop()
        if srv.jobs:  # let the cancelled jobs settle their bills
            await asyncio.wait(set(srv.jobs), timeout=10)
        srv.deliveries.close()

    app = FastAPI(title="OpenGLM", version=_version(), lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None,
                  description="OpenAI-compatible and Zhipu-compatible API for GLM models, with GLM blank infilling.",
                  responses={k: {"model": S.ErrorResponse} for k in (400, 401, 403, 404, 413, 429, 503)})
    app.state.server = srv
    _declare_errors_as_sent(app)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(request, e, srv.metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        # A value that fails every branch of a union (content: str | list[TextPart]) has an error per
        # branch: the one that is not "wrong type" says what is wrong with the value given.
        first = next((x for x in errors if not x.get("type", "").endswith(("_type", "_parsing"))),
                     errors[0] if errors else {})
        if first.get("type") == "json_invalid":
            err = APIError(400, "the request body is not valid JSON")
        else:  # 400 invalid_request_error naming the parameter, as OpenAI answers (its clients: BadRequestError)
            loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_branch(p)]
            kind = first.get("type", "")
            code = "missing_required_parameter" if kind == "missing" else \
                "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
            err = APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
                           + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""),
                           param=".".join(loc) or None, code=code, zhipu="1214" if loc else "1210")
        return _error_response(request, err, srv.metrics)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        message = e.detail if isinstance(e.detail, str) else "invalid request"
        if e.status_code == 400:  # Starlette's own: a body it could not read (e.g. not UTF-8)
            message = f"the request body could not be read: {message}"
        return _error_response(request, APIError(e.status_code, message, headers=dict(e.headers or {})),
                               srv.metrics)

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, e: _ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(OpenGLMError)
    async def _openglm(request: Request, e: OpenGLMError):  # a message our own code raised about the input
        return _error_response(request, APIError(400, str(e)), srv.metrics)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(request, APIError(500, "internal server error", "server_error"), srv.metrics)

    auth = Depends(srv.authenticate_billed)  # generation routes: Store.reserve checks the key again
    admin = Depends(srv.authenticate_admin)

    # ------------------------------------------------------------------------ public routes

    from .webapp import add_webapp

    add_webapp(app, srv, STATIC_DIR, APIError)  # the chat app's page at / and its self-service routes

    @app.get("/health", responses={503: {"model": S.ErrorResponse}})
    async def health():
        """200 once the model is loaded and the engine runs; 503 while it loads or if its engine stopped."""
        srv.ready()
        return {"status": "ok", "model": srv.model_name}

    @app.get("/metrics", include_in_schema=False, dependencies=[] if public_metrics else [admin])
    async def metrics():
        return Response(srv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json", include_in_schema=False, dependencies=[] if docs else [admin])
    async def openapi():
        return JSONResponse(app.openapi())

    if swagger_dir is not None:
        from fastapi.openapi.docs import get_swagger_ui_html
        from fastapi.staticfiles import StaticFiles

        app.mount("/docs/assets", StaticFiles(directory=swagger_dir), name="swagger-ui")

        @app.get("/docs", include_in_schema=False)
        async def swagger_ui():
            # Relative URLs: the page works behind a proxy that mounts the server under a prefix.
            # No validatorUrl: Swagger UI would otherwise send the spec to validator.swagger.io.
            return get_swagger_ui_html(openapi_url="openapi.json", title="OpenGLM API",
                                       swagger_js_url="docs/assets/swagger-ui-bundle.js",
                                       swagger_css_url="docs/assets/swagger-ui.css",
                                       swagger_favicon_url="docs/assets/favicon-32x32.png",
                                       swagger_ui_parameters={"validatorUrl": None})

    @app.get("/v1/models", response_model=S.ModelList)
    async def list_models(key=Depends(srv.authenticate)):
        """The models this key may use."""
        allowed = [S.ModelCard(id=srv.model_name, created=srv.created)] if key.allows(srv.model_name) else []
        return S.ModelList(data=allowed)

    @app.get("/v1/models/{model}", response_model=S.ModelCard)
    async def get_model(model: str, key=Depends(srv.authenticate)):
        srv.check_model(model)
        if not key.allows(model):  # as OpenAI answers: what a key may not use, it does not see
            raise APIError(404, f"the model {model!r} does not exist or this key may not use it",
                           code="model_not_found", param="model")
        return S.ModelCard(id=srv.model_name, created=srv.created)

    # ------------------------------------------------------------------------ chat

    async def chat(request: Request, key, body, *, tools, max_tokens, temperature, logprobs, n, request_id,
                   zhipu: bool):
        from ..data.chat import parse_assistant, render_prompt

        arrived = time.monotonic()
        srv.check_model(body.model)
        srv.ready()
        tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        messages = [m.to_template() for m in body.messages]
        _check_chat_size(messages, tool_dicts)
        srv.check_max_tokens(max_tokens)
        # Rendering costs time in the chat's size: only for a key that may run the request (at its
        # smallest: one prompt token), and on a thread of its own, never on the event loop.
        await srv.check(key, request_id, 1, (max_tokens or 1) * n)
        ids = await to_thread.run_sync(render_prompt, srv.tokenizer, messages, tool_dicts, limiter=srv.render_threads)
        params = _chat_params(srv.tokenizer, body, srv.budget(len(ids), max_tokens), temperature)
        job, headers = await srv.start_job(key, [ids], n, params, logprobs, request_id, body.stream, arrived)
        rid = job.reservation.request_id
        cid, created = f"chatcmpl-{rid}", int(time.time())
        extra = {"request_id": request_id or rid} if zhipu else {}

        def message(choice: _Choice) -> tuple[dict, str]:
            if tool_dicts:
                parsed = parse_assistant(choice.text, tool_dicts)
                if parsed.get("tool_calls"):
                    return parsed, "tool_calls"
            return {"role": "assistant", "content": choice.text.removeprefix("\n")}, choice.finish_reason

        if not body.stream:
            choices = await srv.collect(request, job, n)
            out = []
            for i, c in enumerate(choices):
                msg, reason = message(c)
                out.append({"index": i, "message": msg, "finish_reason": reason,
                            "logprobs": srv.chat_logprobs(c.logprobs) if logprobs is not None else None})
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": srv.model_name,
                                 "choices": out, "usage": job.usage.model_dump(), **extra}, headers=headers)

        include_usage = zhipu or body.include_usage

        def chunk(choices: list[dict], usage=None) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": srv.model_name,
                    "choices": choices, **extra}
            if usage is not None:
                data["usage"] = usage
            return _sse(data)

        async def events():
            choices = [_Choice() for _ in range(n)]
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            try:
                async for i, event in job:
                    c = choices[i]
                    c.add(event)
                    if tool_dicts:  # a tool call is only recognisable whole: send the message at the end
                        if c.finish_reason is not None:
                            msg, reason = message(c)
                            delta = {k: v for k, v in msg.items() if k in ("content", "tool_calls")}
                            if delta.get("tool_calls"):
                                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(msg["tool_calls"])]
                            yield chunk([{"index": i, "delta": delta, "finish_reason": None}])
                            yield chunk([{"index": i, "delta": {}, "finish_reason": reason}])
                        continue
                    text = event.text
                    if c.text == text:  # the first text of the reply: GLM-4 opens it with "\n", not content
                        text = text.removeprefix("\n")
                    if text or (logprobs is not None and event.logprob is not None):
                        lp = srv.chat_logprobs(c.logprobs[-1:]) if logprobs is not None and event.logprob is not None \
                            else None
                        yield chunk([{"index": i, "delta": {"content": text}, "logprobs": lp,
                                      "finish_reason": None}])
                    if c.finish_reason is not None:
                        yield chunk([{"index": i, "delta": {}, "finish_reason": c.finish_reason}])
            except APIError as e:
                yield _sse(_error_body(request.url.path, e))
                return
            if include_usage:
                yield chunk([], job.usage.model_dump())
            yield "data: [DONE]\n\n"

        return _SSEResponse(job, events(), headers)

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(request: Request, body: S.ChatCompletionRequest, key=auth):
        """OpenAI chat completions; ``stream: true`` answers with server-sent events ending ``data: [DONE]``."""
        tools = body.tools if body.tool_choice != "none" else None
        return await chat(request, key, body, tools=tools, max_tokens=body.token_limit,
                          temperature=body.temperature, logprobs=body.logprobs_k, n=body.n, request_id=None,
                          zhipu=False)

    @app.post("/api/paas/v4/chat/completions", response_model=S.ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}, 434: {"model": S.ErrorResponse}})
    async def zhipu_chat(request: Request, body: S.ZhipuChatRequest, key=auth):
        """Zhipu open-platform chat: ``request_id`` (never billed twice), ``do_sample: false`` for greedy."""
        return await chat(request, key, body, tools=body.tools, max_tokens=body.max_tokens,
                          temperature=body.temperature if body.do_sample else 0.0, logprobs=None, n=1,
                          request_id=body.request_id, zhipu=True)

    # ------------------------------------------------------------------------ completions

    @app.post("/v1/completions", response_model=S.Completion, responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(request: Request, response: Response, body: S.CompletionRequest, key=auth):
        """OpenAI (legacy) text completions of a prompt or a list of prompts (texts or token ids).

        ``echo`` returns each prompt before its completion; with ``logprobs`` too, the prompt tokens'
        logprobs come first (from a forward over the prompt), so ``echo`` + ``logprobs`` + ``max_tokens: 0``
        scores a text: what log-likelihood evaluation (lm-evaluation-harness) asks for.
        """
        arrived = time.monotonic()
        srv.check_model(body.model)
        srv.ready()
        srv.check_max_tokens(body.max_tokens)
        least = (1 if body.max_tokens is None else body.max_tokens) * body.n * len(body.prompts)
        prompts = await srv.tokenize(key, body.prompts, None, least)
        if not all(prompts):
            raise APIError(400, "every prompt needs at least one token", param="prompt")
        srv.check_vocab(prompts, "prompt")
        max_new = min(srv.budget(len(p), body.max_tokens) for p in prompts)
        count = len(prompts) * body.n
        echoed = [(p if isinstance(p, str) else srv.tokenizer.decode(ids)) if body.echo else ""
                  for p, ids in zip(body.prompts, prompts)]
        scored = body.echo and body.logprobs is not None
        prefixes: list[list[tuple]] = [[] for _ in prompts]  # each prompt's scored tokens, when echoed with logprobs
        created = int(time.time())

        def logprobs(p: int, entries: list[tuple]) -> dict | None:
            """A choice of prompt ``p``: its echoed prompt's logprobs, then those of ``entries`` (generated)."""
            if body.logprobs is None:
                return None
            head, tail = srv.completion_logprobs(prefixes[p], 0), srv.completion_logprobs(entries, len(echoed[p]))
            return {k: head[k] + tail[k] for k in head}

        def chunk(cid: str, choices: list[dict], usage=None) -> str:
            data = {"id": cid, "object": "text_completion", "created": created, "model": srv.model_name,
                    "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return _sse(data)

        if max_new == 0:  # nothing to generate: the prompts (scored if asked), billed as prompt tokens
            entries, usage, rid = await exclusive(response, key, sum(map(len, prompts)), 0, None, _prompt_logprobs,
                                                  srv.engine.model, prompts if scored else [], body.logprobs or 0)
            headers = dict(response.headers)  # the key's rate-limit headers
            if scored:
                prefixes = entries
            out = [{"index": i, "text": echoed[i // body.n], "finish_reason": "length",
                    "logprobs": logprobs(i // body.n, [])} for i in range(count)]
            if not body.stream:
                return JSONResponse({"id": f"cmpl-{rid}", "object": "text_completion", "created": created,
                                     "model": srv.model_name, "choices": out, "usage": usage.model_dump()},
                                    headers=headers)

            def replay():
                for choice in out:
                    yield chunk(f"cmpl-{rid}", [choice])
                if body.include_usage:
                    yield chunk(f"cmpl-{rid}", [], usage.model_dump())
                yield "data: [DONE]\n\n"

            return StreamingResponse(replay(), media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})

        params = SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop_strings=body.stop_strings)
        job, headers = await srv.start_job(key, prompts, body.n, params, body.logprobs, None, body.stream, arrived)
        cid = f"cmpl-{job.reservation.request_id}"
        if scored:  # the prompts are billed by the job; scoring them is a forward of its own
            try:
                prefixes = await srv.prompt_logprobs(prompts, body.logprobs)
            except BaseException:
                job.stop()
                raise

        if not body.stream:
            choices = await srv.collect(request, job, count)
            out = [{"index": i, "text": echoed[i // body.n] + c.text, "finish_reason": c.finish_reason,
                    "logprobs": logprobs(i // body.n, c.logprobs)} for i, c in enumerate(choices)]
            return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": srv.model_name,
                                 "choices": out, "usage": job.usage.model_dump()}, headers=headers)

        async def events():
            offsets = [len(echoed[i // body.n]) for i in range(count)]
            if body.echo:
                for i in range(count):
                    p = i // body.n
                    yield chunk(cid, [{"index": i, "text": echoed[p], "logprobs": logprobs(p, []),
                                       "finish_reason": None}])
            try:
                async for i, event in job:
                    lp = None
                    if body.logprobs is not None and event.logprob is not None:
                        lp = srv.completion_logprobs([(event.token, event.logprob, event.top_logprobs or [])],
                                                     offsets[i])
                    offsets[i] += len(event.text)
                    reason = _FINISH.get(event.finish_reason, event.finish_reason)
                    if event.text or lp or reason:
                        yield chunk(cid, [{"index": i, "text": event.text, "logprobs": lp, "finish_reason": reason}])
            except APIError as e:
                yield _sse(_error_body(request.url.path, e))
                return
            if body.include_usage:
                yield chunk(cid, [], job.usage.model_dump())
            yield "data: [DONE]\n\n"

        return _SSEResponse(job, events(), headers)

    # ------------------------------------------------------------------------ embeddings and infilling

    async def exclusive(response: Response, key, prompt_tokens: int, max_tokens: int, request_id: str | None,
                        fn, *args):
        """Run ``fn`` (returning (result, generated tokens)) on the engine thread between steps, billed like
        a generation; returns (result, usage, request id) and puts the key's rate-limit headers on
        ``response``. A failure releases the reservation unbilled."""
        from .engine import EngineFull

        engine = srv.ready()
        arrived = time.monotonic()
        reservation = await srv.reserve(key, request_id, prompt_tokens, max_tokens, False)
        try:
            result, completion = await engine.run_exclusive(fn, *args)
        except BaseException as e:
            await asyncio.shield(to_thread.run_sync(srv.store.release, reservation))
            if isinstance(e, EngineFull):
                raise APIError(503, f"the server is overloaded: {e}", "server_error", "overloaded",
                               headers={"retry-after": "1"}) from None
            raise
        latency_ms = int((time.monotonic() - arrived) * 1000)
        await asyncio.shield(to_thread.run_sync(srv.store.settle, reservation, prompt_tokens, completion, "stop",
                                                latency_ms))
        srv.metrics.prompt_tokens.inc(prompt_tokens)
        srv.metrics.generation_tokens.inc(completion)
        srv.metrics.e2e.observe(time.monotonic() - arrived)
        response.headers.update(await srv.rate_limit_headers(key))
        return result, S.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                               total_tokens=prompt_tokens + completion), reservation.request_id

    @app.post("/v1/embeddings", response_model=S.EmbeddingList)
    async def embeddings(response: Response, body: S.EmbeddingRequest, key=auth):
        """Mean-pooled final hidden states of each input, L2-normalised (cosine similarity = dot product)."""
        srv.check_model(body.model)
        srv.ready()
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]
        batch = await srv.tokenize(key, inputs, None, 0)
        srv.check_vocab(batch, "input")
        for ids in batch:
            if not ids:
                raise APIError(400, "every input needs at least one token", param="input")
            if len(ids) > srv.max_seq_len():
                raise APIError(400, f"an input has {len(ids)} tokens, more than the model's context of "
                               f"{srv.max_seq_len()}", code="context_length_exceeded", param="input")
        vectors, usage, _ = await exclusive(response, key, sum(map(len, batch)), 0, None, _embed, srv.engine.model,
                                            batch)
        data = []
        for i, v in enumerate(vectors):
            value = base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                else v.tolist()
            data.append(S.Embedding(index=i, embedding=value))
        return S.EmbeddingList(data=data, model=srv.model_name,
                               usage=S.Usage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.prompt_tokens))

    @app.post("/v1/infill", response_model=S.Infill)
    async def infill(response: Response, body: S.InfillRequest, key=auth):
        """GLM blank infilling: each ``[MASK]`` (short span), ``[sMASK]`` (sentence) or ``[gMASK]`` (to the
        end) in ``prompt`` is filled, the text around it read in both directions. ``max_tokens`` is per blank."""
        from ..infer.generate import MASK_TOKENS

        srv.check_model(body.model)
        srv.ready()
        pieces = re.split("(" + "|".join(re.escape(m) for m in MASK_TOKENS) + ")", body.prompt)
        blanks = sum(p in MASK_TOKENS for p in pieces)
        if not blanks:
            raise APIError(400, "no blank to fill: put [MASK], [sMASK] or [gMASK] in the prompt", param="prompt")
        # Part A, then each blank's <sop> + span: the same bound infill() checks, checked before billing
        # (first with the blanks alone for the prompt, then with its text's tokens).
        prompt_tokens = blanks
        if prompt_tokens + blanks * (body.max_tokens + 1) <= srv.max_seq_len():
            texts = [p for p in pieces if p and p not in MASK_TOKENS]
            prompt_tokens += sum(map(len, await srv.tokenize(key, texts, body.request_id, blanks * body.max_tokens)))
        if prompt_tokens + blanks * (body.max_tokens + 1) > srv.max_seq_len():
            raise APIError(400, f"prompt ({prompt_tokens} tokens) + {blanks} blanks x max_tokens ({body.max_tokens}) "
                           f"exceeds the model's context of {srv.max_seq_len()}", code="context_length_exceeded",
                           param="max_tokens", zhipu="1261")
        params = SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed)
        (text, spans), usage, rid = await exclusive(response, key, prompt_tokens, blanks * body.max_tokens,
                                                    body.request_id, _infill, srv.engine.model, srv.engine.tokenizer,
                                                    body.prompt, params)
        return S.Infill(id=f"infill-{rid}", created=int(time.time()), model=srv.model_name, text=text, spans=spans,
                        usage=usage)

    # ------------------------------------------------------------------------ usage and admin

    @app.get("/v1/usage", response_model=S.UsageReport)
    async def usage(key=Depends(srv.authenticate), since: date | None = None, until: date | None = None):
        """The key's account: balance (units of 1e-6) and settled usage by day and model."""
        rows = await to_thread.run_sync(srv.store.usage, key.account_id, since, until)
        account = await to_thread.run_sync(srv.store.get_account, key.account_id)
        return S.UsageReport(account_id=account.id, balance=account.balance, usage=rows)

    @app.get("/admin/accounts", dependencies=[admin])
    async def admin_accounts():
        return jsonable_encoder(await to_thread.run_sync(srv.store.list_accounts))

    @app.post("/admin/accounts", dependencies=[admin], status_code=201)
    async def admin_create_account(body: S.NewAccount):
        return jsonable_encoder(await to_thread.run_sync(srv.store.create_account, body.name, body.balance))

    @app.get("/admin/accounts/{account_id}", dependencies=[admin])
    async def admin_account(account_id: _Id):
        return jsonable_encoder(await _admin_call(srv.store.get_account, account_id))

    @app.post("/admin/accounts/{account_id}/top-up", dependencies=[admin])
    async def admin_top_up(account_id: _Id, body: S.TopUp):
        return {"account_id": account_id, "balance": await _admin_call(srv.store.top_up, account_id, body.amount)}

    @app.get("/admin/keys", dependencies=[admin])
    async def admin_keys(account_id: _IdQuery = None):
        return jsonable_encoder(await to_thread.run_sync(srv.store.list_keys, account_id))

    @app.post("/admin/keys", dependencies=[admin], status_code=201)
    async def admin_create_key(body: S.NewKey):
        expires = None
        if body.expires_at is not None:
            try:
                expires = datetime.fromisoformat(body.expires_at)
            except ValueError:
                raise APIError(400, "expires_at: not an ISO 8601 time", param="expires_at",
                               code="invalid_value") from None
        info, secret = await _admin_call(srv.store.create_key, body.account_id, body.name, expires, body.models,
                                         body.rpm, body.tpm, body.max_concurrency, body.admin)
        return {**jsonable_encoder(info), "secret": secret}

    @app.delete("/admin/keys/{key_id}", dependencies=[admin])
    async def admin_revoke_key(key_id: _Id):
        await _admin_call(srv.store.revoke_key, key_id)
        return {"id": key_id, "revoked": True}

    @app.put("/admin/prices/{model}", dependencies=[admin])
    async def admin_set_price(model: str, body: S.Price):
        await _admin_call(srv.store.set_price, model, body.input_per_million, body.output_per_million)
        return {"model": model, **body.model_dump()}

    @app.get("/admin/prices/{model}", dependencies=[admin])
    async def admin_price(model: str):
        price = await to_thread.run_sync(srv.store.get_price, model)
        return {"model": model, "input_per_million": price[0], "output_per_million": price[1]}

    @app.get("/admin/ledger", dependencies=[admin])
    async def admin_ledger(account_id: _IdQuery = None):
        """Ledger sums (prompt_tokens, completion_tokens, cost, requests), for one account or all."""
        return await to_thread.run_sync(srv.store.ledger_totals, account_id)

    return app


def _union_branch(part) -> bool:
    """Whether a pydantic error location part names a union's branch ("str", "list[TextPart]"), not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))


def _swagger_ui_dir() -> str:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        raise OpenGLMError("serving /docs needs the swagger-ui-bundle package: pip install 'openglm[serve]'") from None
    return swagger_ui_path


def _declare_errors_as_sent(app: FastAPI) -> None:
    """Drop the 422 "Validation Error" that FastAPI adds to every route's spec: bad input is a 400 here."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


async def _admin_call(fn, *args):
    """A store call whose OpenGLMError means "no such account/key" or a bad value: 404 or 400."""
    try:
        return await to_thread.run_sync(fn, *args)
    except OpenGLMError as e:
        raise APIError(404 if str(e).startswith("no ") else 400, str(e)) from None


def attach_model(app: FastAPI, engine, tokenizer) -> None:
    """Give an app created with ``engine=None`` its loaded engine: ``/health`` turns 200."""
    srv: _Server = app.state.server
    engine.start()
    srv.tokenizer = tokenizer
    srv.engine = engine


def _version() -> str:
    from .. import __version__

    return __version__


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(t) for t in texts]


def _embed(model, batch: list[list[int]]):
    """Mean of the final hidden states of each token list, L2-normalised: a float32 array ``[len(batch), C]``."""
    import torch

    device = model.lm_head.weight.device
    with torch.inference_mode():
        pooled = [model.hidden_states(torch.tensor([ids], device=device))[0].float().mean(0) for ids in batch]  # (C,)
        vectors = torch.nn.functional.normalize(torch.stack(pooled), dim=-1)  # (len(batch), C)
    return vectors.cpu().numpy(), 0


SCORE_ROWS = 128  # positions per output-layer product when scoring a prompt: bounds the [rows, vocab] logits


def _prompt_logprobs(model, batch: list[list[int]], k: int):
    """Each prompt token's logprob given the tokens before it, and the ``k`` most likely tokens at its
    position, from one forward over the prompt: per prompt a list of (token, logprob, [(token, logprob)]),
    the first token's logprob and alternatives None (nothing predicts it). Returns (that, 0 generated tokens)."""
    import torch

    device = model.lm_head.weight.device
    out = []
    with torch.inference_mode():
        for ids in batch:
            h = model.hidden_states(torch.tensor([ids], device=device))[0]  # (T, C)
            targets = torch.tensor(ids[1:], device=device)  # (T-1,): what positions 0..T-2 predict
            entries = [(ids[0], None, None)]
            for start in range(0, len(ids) - 1, SCORE_ROWS):
                rows = slice(start, min(start + SCORE_ROWS, len(ids) - 1))
                logprobs = model.lm_head(h[rows]).float().log_softmax(-1)  # (R, V)
                chosen = logprobs.gather(1, targets[rows, None])[:, 0].tolist()
                top = logprobs.topk(k, dim=-1)
                alternatives = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
                entries += zip(ids[rows.start + 1 : rows.stop + 1], chosen, alternatives)
            out.append(entries)
    return out, 0


class _SpanRecorder:
    """A tokenizer that remembers the token lists ``infill`` decodes: one per blank, the generated spans."""

    def __init__(self, tokenizer):
        self._tokenizer, self.spans = tokenizer, []

    def decode(self, ids, *args, **kwargs):
        self.spans.append(list(ids))
        return self._tokenizer.decode(ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _infill(model, tokenizer, text: str, params: SamplingParams):
    """``infill`` on the engine thread; returns ((filled text, spans), generated token count)."""
    from ..infer.generate import infill

    recorder = _SpanRecorder(tokenizer)
    filled = infill(model, text, tokenizer=recorder, params=params)
    return (filled, [tokenizer.decode(s) for s in recorder.spans]), sum(len(s) for s in recorder.spans)
