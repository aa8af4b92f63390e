"""The front end's half of generation: token ids from the engine become each request's text events.

The engine core only knows token ids; here, in the process and on the event loop that serve the
HTTP side, each request's tokens are detokenized incrementally (half-decoded UTF-8 and text that may
begin a stop string held back), stop strings end the request (the engine, which still runs it, is
told to abort it), and the events are handed to the request's ``RequestHandle``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...infer.generate import _Detokenizer
from .request import EngineOutput, TokenEvent


class RequestHandle:
    """A submitted request, seen from the asyncio side.

    ``async for event in handle`` yields each ``TokenEvent`` as it is generated and ends when the
    request ends. A request that ends on a generated token ("stop", "length", or "timeout" while
    generating) carries the reason on that last event; one ended without a new token (cancelled,
    engine stopped, timed out while queued or prefilling, or "error" if a model step failed) just
    ends the iteration. ``finish_reason`` is set in every case by the time iteration ends.

    ``completion_tokens`` (what is billed if the stream is cut), ``finish_reason`` and the timings
    (seconds) change on the event loop's thread as the engine's outputs are handed over.
    """

    def __init__(self, request_id: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop,
                 cancel: Callable[[str], None]):
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self.completion_tokens = 0  # tokens handed to this handle so far
        self.finish_reason: str | None = None
        self.queue_time: float | None = None  # submit -> admitted into a batch slot
        self.first_token_time: float | None = None  # submit -> first token
        self.inter_token_latencies: list[float] = []  # between consecutive tokens
        self._loop, self._cancel = loop, cancel
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = False
        self._done = False

    def cancel(self) -> None:
        """Stop generating: the engine ends the request within one step and frees its slot (thread-safe)."""
        self._cancelled = True
        self._cancel(self.request_id)

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:  # the consuming task was cancelled (e.g. the client went away)
            self.cancel()
            raise
        if item is None:
            self._done = True
            raise StopAsyncIteration
        return item

    async def result(self) -> tuple[list[TokenEvent], str]:
        """Wait for the end: all (remaining) events and the finish reason."""
        events = [event async for event in self]
        return events, self.finish_reason

    def _deliver(self, event: TokenEvent | None, finish_reason: str | None) -> None:
        if event is not None:
            self.completion_tokens += 1
            self._queue.put_nowait(event)
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self._queue.put_nowait(None)


@dataclass(eq=False)
class _Tracked:
    handle: RequestHandle
    detokenizer: _Detokenizer


class OutputProcessor:
    """Each request's detokenizer and stop strings, and the delivery of its events to its handle.

    ``abort(request_id)`` is called for a request that a stop string ended here while the engine
    still runs it. ``dispatch`` may be called from any thread; the rest runs on the handles' loops.
    """

    def __init__(self, tokenizer, abort: Callable[[str], None]):
        self.tokenizer, self.abort = tokenizer, abort
        self._requests: dict[str, _Tracked] = {}

    def __len__(self) -> int:
        """Requests not ended yet."""
        return len(self._requests)

    def add(self, handle: RequestHandle, stop_strings: Sequence[str]) -> None:
        self._requests[handle.request_id] = _Tracked(handle, _Detokenizer(self.tokenizer, stop_strings))

    def discard(self, request_id: str) -> None:
        """Forget a request the engine never took."""
        self._requests.pop(request_id, None)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def dispatch(self, outputs: list[EngineOutput]) -> None:
        """Hand ``outputs`` to their requests' event loops, one call per loop (any thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[EngineOutput]] = {}
        for out in outputs:
            tracked = self._requests.get(out.request_id)
            if tracked is not None:  # None: ended here already (a stop string), or never known
                by_loop.setdefault(tracked.handle._loop, []).append(out)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self.process, items)
            except RuntimeError:  # the loop is closed: nobody is waiting for these events any more
                pass

    def process(self, outputs: list[EngineOutput]) -> None:
        """Turn ``outputs`` into events on their handles (on the handles' event loop)."""
        for out in outputs:
            tracked = self._requests.get(out.request_id)
            if tracked is None:
                continue
            handle = tracked.handle
            if out.queue_time is not None:
                handle.queue_time = out.queue_time
            if out.first_token_time is not None:
                handle.first_token_time = out.first_token_time
            if out.latency is not None:
                handle.inter_token_latencies.append(out.latency)
            event, reason = self._event(tracked.detokenizer, out)
            if reason is not None:
                del self._requests[out.request_id]
                if out.finish_reason is None:  # a stop string: the engine would go on generating
                    self.abort(out.request_id)
            handle._deliver(event, reason)

    @staticmethod
    def _event(detokenizer: _Detokenizer, out: EngineOutput) -> tuple[TokenEvent | None, str | None]:
        """The event for one output, and the request's finish reason if it ends here."""
        if out.token is None:
            return None, out.finish_reason
        event = TokenEvent(out.token, "", out.logprob, out.top_logprobs)
        if out.finish_reason == "stop":  # a stop token: its own text is not shown
            event.text, event.finish_reason = detokenizer.flush(), "stop"
            return event, "stop"
        event.text, hit = detokenizer.push(out.token)
        if hit:
            event.finish_reason = "stop"
        elif out.finish_reason is not None:  # "length" or "timeout"
            event.text += detokenizer.flush()
            event.finish_reason = out.finish_reason
        return event, event.finish_reason
