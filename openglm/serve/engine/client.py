"""What the HTTP side calls: the ``EngineClient`` protocol, and ``Engine``, its implementation with
the engine core on a thread of this process (``EngineProcess`` in ``process.py`` runs it in a
process of its own).

A client checks each request once (``check_request``), gives it an id of its own (two callers may
name theirs alike), tracks its ``RequestHandle`` and detokenizes its outputs in the front end
(``OutputProcessor``). The asyncio side never calls the model: ``submit`` only queues the request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ...errors import OpenGLMError
from .core import EngineCore
from .output import OutputProcessor, RequestHandle
from .request import EngineRequest, check_request


@runtime_checkable
class EngineClient(Protocol):
    """An engine as the HTTP side sees it.

    Limits: ``max_batch_size`` (requests generating at once), ``max_queue`` (requests waiting for a
    slot), ``max_seq_len`` (prompt + generated tokens), ``vocab_size``; ``model_name``. Health:
    ``alive``, ``num_running``, ``num_waiting``, ``free_slots``. ``model`` and ``tokenizer`` are what
    a ``run_exclusive`` callable is given to reach the engine's own (in another process, markers that
    become the objects there).
    """

    model_name: str
    max_batch_size: int
    max_queue: int
    max_seq_len: int
    vocab_size: int
    model: Any
    tokenizer: Any

    @property
    def alive(self) -> bool: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    def start(self) -> None:
        """Start serving (blocks until the model is ready); nothing happens if it serves already."""

    def stop(self) -> None:
        """Stop serving; requests not ended end with "cancelled"."""

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue ``request`` and return its handle at once (from inside a running event loop).

        Raises ``PromptTooLong`` when prompt + ``max_new_tokens`` exceeds ``max_seq_len``,
        ``EngineFull`` when the queue is full or the engine is not running, and ``OpenGLMError`` for
        an invalid request.
        """

    def cancel(self, request_id: str) -> None:
        """End a submitted request within one step (thread-safe); ``RequestHandle.cancel`` calls this."""

    async def run_exclusive(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` run on the engine's thread between two steps (under
        ``torch.inference_mode``); returns its result or raises its exception."""


class Engine:
    """The ``EngineClient`` over an ``EngineCore`` on a thread of this process.

    Arguments as ``EngineCore``'s, plus ``max_queue``: requests that may wait for a slot before
    ``submit`` raises ``EngineFull``.
    """

    # A packed forward gathers its slots' keys (S of them) and scores every token against all of
    # them: worth it while both stay small next to the weights a separate forward reads again.
    PACK_MAX_TOKENS, PACK_MAX_KEYS = 64, 4096

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 256,
                 max_seq_len: int | None = None, *, prefill_chunk: int = 256, preempt_tokens: int = 64,
                 model_name: str | None = None):
        if max_queue < 0:
            raise OpenGLMError("max_batch_size and prefill_chunk must be >= 1, max_queue and preempt_tokens >= 0")
        self._outputs = OutputProcessor(tokenizer, self.cancel)
        self.core = EngineCore(model, tokenizer, self._outputs.dispatch, max_batch_size=max_batch_size,
                               max_seq_len=max_seq_len, prefill_chunk=prefill_chunk, preempt_tokens=preempt_tokens,
                               pack_max_tokens=self.PACK_MAX_TOKENS, pack_max_keys=self.PACK_MAX_KEYS,
                               model_name=model_name)
        self.model, self.tokenizer, self.model_name = model, tokenizer, self.core.model_name
        self.max_batch_size, self.max_queue, self.max_seq_len = max_batch_size, max_queue, self.core.max_seq_len
        self.vocab_size = self.core.vocab_size
        self._ids = itertools.count()

    @property
    def alive(self) -> bool:
        return self.core.alive

    @property
    def num_running(self) -> int:
        return self.core.num_running

    @property
    def num_waiting(self) -> int:
        return self.core.num_waiting

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - self.core.num_running

    @property
    def steps(self) -> int:
        return self.core.steps

    @property
    def packed_steps(self) -> int:
        return self.core.packed_steps

    @property
    def preemptions(self) -> int:
        return self.core.preemptions

    def start(self) -> None:
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    def submit(self, request: EngineRequest) -> RequestHandle:
        loop = asyncio.get_running_loop()
        check_request(request, self.vocab_size, self.max_seq_len)
        request = dataclasses.replace(request, request_id=str(next(self._ids)))
        handle = RequestHandle(request.request_id, len(request.prompt_ids), loop, self.cancel)
        self._outputs.add(handle, request.params.stop_strings)
        try:
            self.core.add(request, max_waiting=self.max_queue)
        except BaseException:
            self._outputs.discard(request.request_id)
            raise
        return handle

    def cancel(self, request_id: str) -> None:
        self.core.abort(request_id)

    async def run_exclusive(self, fn: Callable, *args, **kwargs):
        return await asyncio.wrap_future(self.core.call(fn, args, kwargs))
