"""Where generations run: the ``GenerationBackend`` protocol the HTTP side calls, and ``EngineBackend``,
the local engine (in this process or its own).

This is the seam for another backend (another server, say): token ids in, a ``Handle`` of
``TokenEvent``s out, with its token counts for the bill; refusals are ``APIError``s. Everything
above it (checks, billing, answers, streaming) runs unchanged on any backend.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from ...infer.sampling import SamplingParams
from ..engine import EngineFull, EngineRequest, PromptTooLong, TokenEvent
from ..errors import APIError, overloaded


class Handle(Protocol):
    """One submitted generation: ``async for`` yields its ``TokenEvent``s. ``finish_reason`` is set by
    the time iteration ends; the counts are what is billed."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    queue_time: float | None  # seconds waiting for a batch slot, if known

    def cancel(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...


class GenerationBackend(Protocol):
    """Where generations run. Refusals are ``APIError``s (503 while not ready or overloaded, 400 for a
    request it can never run)."""

    def start(self) -> None:
        """Called as the app starts."""

    def stop(self) -> None:
        """Called as the app shuts down: generations still running end."""

    def ready(self) -> None:
        """Raise ``APIError`` 503 unless requests can run now."""

    @property
    def max_seq_len(self) -> int: ...

    @property
    def max_queue(self) -> int: ...

    @property
    def num_running(self) -> int:
        """Generations running now (a metric)."""

    @property
    def num_waiting(self) -> int:
        """Generations queued for a slot (a metric)."""

    def submit(self, prompt: list[int], params: SamplingParams, logprobs: int | None,
               cache_scope: str | None = None) -> Handle:
        """Start one generation of ``prompt``'s continuation (``logprobs``: None, or k alternatives);
        it reuses cached prompt prefixes of generations with the same ``cache_scope`` only."""

    async def run_on_model(self, fn, *args, with_tokenizer: bool = False) -> Any:
        """``fn(model, *args)``, or ``fn(model, tokenizer, *args)``, where the model is, between
        generation steps (``fn`` a module-level function: it may run in another process)."""


class EngineBackend:
    """The local engine (an ``Engine`` or an ``EngineProcess``); None until the model is loaded."""

    def __init__(self, engine=None):
        self.engine = engine

    def ready(self):
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", "server_error", "loading",
                           headers={"retry-after": "2"})
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", "server_error", "engine_stopped")
        return self.engine

    @property
    def max_seq_len(self) -> int:
        return self.ready().max_seq_len

    @property
    def max_queue(self) -> int:
        return self.ready().max_queue

    @property
    def num_running(self) -> int:
        return getattr(self.engine, "num_running", 0)

    @property
    def num_waiting(self) -> int:
        return getattr(self.engine, "num_waiting", 0)

    def submit(self, prompt: list[int], params: SamplingParams, logprobs: int | None,
               cache_scope: str | None = None):
        # The engine request's id is its own (EngineRequest makes one), never the client's request_id:
        # that one is unique per account only.
        try:
            return self.ready().submit(EngineRequest(prompt, params, logprobs, cache_scope=cache_scope))
        except PromptTooLong as e:
            raise APIError(400, str(e), code="context_length_exceeded", zhipu="1261") from None
        except EngineFull as e:
            raise overloaded(e) from None

    async def run_on_model(self, fn, *args, with_tokenizer: bool = False):
        engine = self.ready()
        own = (engine.model, engine.tokenizer) if with_tokenizer else (engine.model,)
        try:
            return await engine.run_exclusive(fn, *own, *args)
        except EngineFull as e:
            raise overloaded(e) from None

    def start(self) -> None:
        if self.engine is not None:
            self.engine.start()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
