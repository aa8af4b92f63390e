"""Generation jobs: token ids in, events out, billed whatever happens to the HTTP response.

``Generations`` checks a request against the backend's limits (``backend.GenerationBackend``),
reserves, submits, and hands back a ``Job`` that settles the bill when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import Request

from ...infer.sampling import SamplingParams
from .. import schemas as S
from ..engine import TokenEvent
from ..errors import APIError, ClientGone
from ..metrics import Metrics
from .backend import GenerationBackend, Handle
from .billing import Billing

log = logging.getLogger("openglm.serve")

_FINISH = {"timeout": "length", "cancelled": "abort"}  # engine reasons that OpenAI has no word for


class Choice:
    """Accumulates one choice's text, logprobs and finish reason from its TokenEvents."""

    def __init__(self):
        self.parts: list[str] = []
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.finish_reason: str | None = None

    def add(self, event: TokenEvent) -> None:
        self.parts.append(event.text)
        if event.logprob is not None:
            self.logprobs.append((event.token, event.logprob, event.top_logprobs or []))
        if event.finish_reason is not None:
            self.finish_reason = finish_reason(event.finish_reason)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def cache_scope(key, salt: str | None) -> str:
    """Who may reuse whose cached prompt prefixes: one account (a faster first token would tell one
    tenant what another sent), narrowed further by the request's ``cache_salt``. Behind a gateway
    every request reaches the worker under its one key; the gateway's salt names the account."""
    return f"{key.account_id}" if salt is None else f"{key.account_id}:{salt}"


def finish_reason(engine_reason: str | None) -> str | None:
    """OpenAI's finish reason for the engine's."""
    return _FINISH.get(engine_reason, engine_reason)


class Job:
    """One HTTP generation request on the backend: its handles, its reservation, its settlement.

    A task of its own drains every handle into ``events`` ((choice index, TokenEvent) pairs, then
    None), then settles the reservation with the handles' token counts, so the bill is right even if
    the HTTP response is cancelled or never sent. ``usage`` is what was billed, set before the None.
    A stream's tokens are recorded in its reservation as they go (``Deliveries``), for a crash.
    """

    def __init__(self, generations: Generations, handles: list[Handle], reservation, prompt_tokens: int,
                 arrived: float):
        self.billing, self.metrics = generations.billing, generations.metrics
        self.handles, self.reservation = handles, reservation
        self.prompt_tokens, self.arrived = prompt_tokens, arrived
        self.sent = 0  # a stream's tokens handed on to the response
        self.events: asyncio.Queue = asyncio.Queue()
        self.usage: S.Usage | None = None
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run())
        generations.jobs.add(self.task)  # a strong reference until it ends (the loop only keeps weak ones)
        self.task.add_done_callback(generations.jobs.discard)

    @property
    def request_id(self) -> str:
        return self.reservation.request_id

    def stop(self) -> None:
        """Cancel the generations still running (the client is gone); the job then settles."""
        for handle in self.handles:
            if handle.finish_reason is None:
                handle.cancel()

    async def _run(self) -> None:
        try:
            await asyncio.gather(*(self._pump(i, h) for i, h in enumerate(self.handles)))
        except Exception as e:  # a backend failure: stop the other choices, bill what was generated
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

    async def _pump(self, index: int, handle: Handle) -> None:
        m, last, ended = self.metrics, None, False
        async for event in handle:  # a cancelled consumer cancels the generation (the handle does)
            now = time.monotonic()
            if last is None:
                m.ttft.observe(now - self.arrived)
            else:
                m.itl.observe(now - last)
            last, ended = now, event.finish_reason is not None
            if self.reservation.stream:
                self.sent += 1
                await self.billing.deliveries.sent(self.reservation, self.sent)
            await self.events.put((index, event))
        if not ended:  # ended without a new token (cancelled, engine stopped): say so with an empty event
            await self.events.put((index, TokenEvent(-1, "", finish_reason=handle.finish_reason or "abort")))
        if handle.queue_time is not None:
            m.queue.observe(handle.queue_time)
        m.e2e.observe(time.monotonic() - self.arrived)
        m.requests.labels(handle.finish_reason or "unknown").inc()

    async def _settle(self) -> None:
        completion = sum(h.completion_tokens for h in self.handles)
        reasons = sorted({h.finish_reason or "error" for h in self.handles})
        self.metrics.prompt_tokens.inc(sum(h.prompt_tokens for h in self.handles))
        self.metrics.generation_tokens.inc(completion)
        latency_ms = int((time.monotonic() - self.arrived) * 1000)
        await self.billing.settle(self.reservation, self.prompt_tokens, completion, ",".join(reasons), latency_ms)
        self.usage = S.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                             total_tokens=self.prompt_tokens + completion)

    async def __aiter__(self):
        while (item := await self.events.get()) is not None:
            yield item
        if self.error is not None:
            raise APIError(500, f"generation failed: {self.error}", "server_error")


class Generations:
    """Runs billed requests for the model ``model_name`` on ``backend``."""

    def __init__(self, backend: GenerationBackend, billing: Billing, metrics: Metrics, model_name: str):
        self.backend, self.billing, self.metrics, self.model_name = backend, billing, metrics, model_name
        self.jobs: set[asyncio.Task] = set()

    # ---------------------------------------------------------------------------- checks

    def ready(self) -> None:
        self.backend.ready()

    def health(self) -> S.Health:
        """``/health``'s answer; 503 (``APIError``) unless requests can run now."""
        self.backend.ready()
        return S.Health(model=self.model_name)

    def model_names(self) -> list[str]:
        return [self.model_name]

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "invalid_request_error", "model_not_found", "model", zhipu="1211", zhipu_status=400)

    @property
    def max_seq_len(self) -> int:
        return self.backend.max_seq_len

    def check_max_tokens(self, max_tokens: int | None) -> None:
        """400 for a ``max_tokens`` that leaves no room for a prompt (of one token at least) in the context."""
        if max_tokens is not None and max_tokens >= self.max_seq_len:
            raise APIError(400, f"max_tokens ({max_tokens}) leaves no room for a prompt in the model's context "
                           f"of {self.max_seq_len} tokens", code="context_length_exceeded", param="max_tokens",
                           zhipu="1261")

    def budget(self, prompt_len: int, max_tokens: int | None) -> int:
        """The completion tokens one choice may use; 400 if the prompt leaves no room for them."""
        room = self.max_seq_len - prompt_len
        if max_tokens is None and room > 0:
            return room
        if max_tokens is None or max_tokens > room:
            asked = f" + max_tokens ({max_tokens})" if max_tokens is not None else ""
            raise APIError(400, f"prompt ({prompt_len} tokens){asked} exceeds the model's context of "
                           f"{self.max_seq_len} tokens", code="context_length_exceeded",
                           param="messages", zhipu="1261")
        return max_tokens

    def _check_fits(self, count: int) -> None:
        """400 for a request of ``count`` generations (prompts x n) that the backend's queue can never
        hold at once: a 503 would have clients retry it forever."""
        if count > self.backend.max_queue:
            raise APIError(400, f"this request needs {count} generations (prompts x n), more than the server "
                           f"queues at once ({self.backend.max_queue}); send fewer prompts or a smaller n",
                           code="request_too_large", param="n")

    # ---------------------------------------------------------------------------- running

    async def start(self, key, prompts: list[list[int]], n: int, params: SamplingParams, logprobs: int | None,
                    request_id: str | None, stream: bool, arrived: float,
                    cache_salt: str | None = None) -> tuple[Job, dict[str, str]]:
        """Reserve, then submit ``n`` generations per prompt (choice ``p * n + j``); returns the job and
        the key's rate-limit headers."""
        self.backend.ready()
        self._check_fits(len(prompts) * n)
        prompt_tokens = sum(len(p) for p in prompts)
        reservation = await self.billing.reserve(key, request_id, prompt_tokens,
                                                 params.max_new_tokens * n * len(prompts), stream)
        scope = cache_scope(key, cache_salt)
        handles = []
        try:
            for ids in prompts:
                for j in range(n):
                    seed = None if params.seed is None else params.seed + j  # n samples, not n copies
                    # An account reuses its own cached prompt prefixes only (no timing side channel).
                    handles.append(self.backend.submit(ids, SamplingParams(**{**vars(params), "seed": seed}),
                                                       logprobs, cache_scope=scope))
        except BaseException:
            for handle in handles:
                handle.cancel()
            await self.billing.release(reservation)
            raise
        headers = await self.billing.rate_limit_headers(key)
        return Job(self, handles, reservation, prompt_tokens, arrived), headers

    async def collect(self, request: Request, job: Job, count: int) -> list[Choice]:
        """Run a non-streamed job to the end; a client that disconnects meanwhile stops it."""
        choices = [Choice() for _ in range(count)]

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
            raise ClientGone()
        drainer.result()  # raises the job's APIError, if any
        return choices

    async def exclusive(self, key, prompt_tokens: int, max_tokens: int, request_id: str | None, fn, *args,
                        with_tokenizer: bool = False):
        """``fn`` on the model (``GenerationBackend.run_on_model``; it returns (result, generated tokens)),
        billed like a generation; returns (result, usage, request id, the key's rate-limit headers).
        A failure releases the reservation unbilled."""
        self.backend.ready()
        arrived = time.monotonic()
        reservation = await self.billing.reserve(key, request_id, prompt_tokens, max_tokens, False)
        try:
            result, completion = await self.backend.run_on_model(fn, *args, with_tokenizer=with_tokenizer)
        except BaseException:
            await asyncio.shield(self.billing.release(reservation))
            raise
        latency_ms = int((time.monotonic() - arrived) * 1000)
        await asyncio.shield(self.billing.settle(reservation, prompt_tokens, completion, "stop", latency_ms))
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(completion)
        self.metrics.e2e.observe(time.monotonic() - arrived)
        usage = S.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                        total_tokens=prompt_tokens + completion)
        return result, usage, reservation.request_id, await self.billing.rate_limit_headers(key)

    async def wait_for_jobs(self, timeout: float) -> None:
        """Let the jobs still running (cancelled at shutdown) settle their bills."""
        if self.jobs:
            await asyncio.wait(set(self.jobs), timeout=timeout)
