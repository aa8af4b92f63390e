"""The engine in a process of its own, behind the same asyncio-side interface as ``Engine``.

In one process the HTTP side (parsing, authentication, database transactions, a server-sent event
per token) and the engine's step loop share one interpreter lock: under load every step waited for
the event loop, and the event loop for the step. Here the child process loads the model and runs an
``Engine``; the server process only tokenizes, checks, bills and streams. They talk over a pipe:
requests, cancellations and ``run_exclusive`` calls one way; each step's token events (one message
per step), results and the engine's counts the other.

If the child dies, its requests end with ``finish_reason == "error"`` and later submits raise
``EngineFull``; if the server process dies (even by SIGKILL), the child sees the pipe close and exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable

from ..errors import OpenGLMError
from .engine import EngineFull, EngineRequest, RequestHandle, TokenEvent, check_request

log = logging.getLogger(__name__)


class _InEngine:
    """Stands for the engine process's own model or tokenizer among ``run_exclusive``'s arguments."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<the engine process's {self.name}>"


class EngineProcess:
    """Serve ``model`` (a checkpoint directory or bundled name) from an ``Engine`` in a child process.

    ``engine_kw`` are ``Engine``'s keyword arguments (``max_batch_size``, ``max_queue``,
    ``max_seq_len``, ``prefill_chunk``, ``preempt_tokens``, ``model_name``); ``threads`` sets the
    child's torch threads. ``start()`` blocks until the model is loaded and raises ``OpenGLMError``
    with the child's message if it could not be. ``model`` and ``tokenizer`` are stand-ins: passed
    to ``run_exclusive`` they become the child's own objects (there is no model in this process).
    ``on_exit(message)`` is called (on a thread of its own) if the child ends other than by ``stop()``.
    The child is spawned, not forked: a script that starts one needs the usual
    ``if __name__ == "__main__":`` guard of multiprocessing.
    """

    def __init__(self, model: str, *, device: str = "cpu", threads: int | None = None,
                 on_exit: Callable[[str], None] | None = None, **engine_kw):
        self.source, self.device, self.threads, self.engine_kw = str(model), device, threads, engine_kw
        self.on_exit = on_exit
        self.model, self.tokenizer = _InEngine("model"), _InEngine("tokenizer")
        self.max_batch_size = engine_kw.get("max_batch_size", 16)
        self.max_queue = engine_kw.get("max_queue", 256)
        self.model_name = self.max_seq_len = self.vocab_size = None  # from the child once it is ready
        self.num_running = self.num_waiting = 0  # the child's counts after its last step
        self.pid: int | None = None
        self._process = self._conn = self._reader = None
        self._send_lock = threading.Lock()
        self._handles: dict[str, RequestHandle] = {}  # submitted and not ended, by the id this process gave
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._request_ids = itertools.count()
        self._alive = self._stopping = False

    @property
    def alive(self) -> bool:
        """Whether the engine process serves (started, not stopped, not dead)."""
        return self._alive

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the child and wait until it serves (nothing happens if it runs already)."""
        if self._process is not None:
            return
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, name="openglm-engine",
                                    args=(child_conn, self.source, self.device, self.threads, self.engine_kw),
                                    daemon=True)
        self._process.start()
        child_conn.close()
        self.pid = self._process.pid
        try:
            kind, info = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            kind, info = "failed", f"the engine process exited with code {self._process.exitcode}"
        if kind != "ready":
            self._process.join(10)
            self._conn.close()
            self._process = self._conn = None
            raise OpenGLMError(info)
        self.model_name, self.max_seq_len, self.vocab_size = info["model_name"], info["max_seq_len"], info["vocab_size"]
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="openglm-engine-reader", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        """Stop the child, waiting for its current step; pending requests end with "cancelled"."""
        if self._process is None:
            return
        self._stopping, was_alive, self._alive = True, self._alive, False  # new submits are refused now
        if was_alive:
            try:
                self._send(("stop",))
            except OSError:
                pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._reader is not None:
            self._reader.join(10)
        self._conn.close()
        self._process = self._reader = None
        self._alive = self._stopping = False

    # -- the asyncio side -------------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> RequestHandle:
        """As ``Engine.submit``: queue ``request`` and return its handle at once, or raise
        ``PromptTooLong`` / ``OpenGLMError`` for a request the engine cannot run and ``EngineFull``
        when its queue is full or it does not run. The handle's ``request_id`` is one this object makes."""
        loop = asyncio.get_running_loop()
        if not self._alive:
            raise EngineFull("the engine is not running")
        check_request(request, self.vocab_size, self.max_seq_len)
        # Running requests fill the batch's slots, the rest wait: the same bound as Engine's queue.
        if len(self._handles) >= self.max_batch_size + self.max_queue:
            raise EngineFull(f"the engine's queue is full ({self.max_queue} requests waiting); retry later")
        # Keyed by an id of our own, whatever the caller's request_id: two requests with the same
        # one (say, a client's text) would otherwise get each other's events.
        request = dataclasses.replace(request, request_id=str(next(self._request_ids)))
        handle = RequestHandle(request, self, loop)
        self._handles[request.request_id] = handle
        try:
            self._send(("submit", request))
        except OSError:
            del self._handles[request.request_id]
            raise EngineFull("the engine is not running") from None
        return handle

    async def run_exclusive(self, fn, *args, **kwargs):
        """As ``Engine.run_exclusive``, in the child: ``fn`` and its arguments must pickle (a
        module-level function); ``self.model`` / ``self.tokenizer`` among them become the child's."""
        if not self._alive:
            raise EngineFull("the engine is not running")
        loop = asyncio.get_running_loop()
        call_id, future = next(self._ids), loop.create_future()
        self._calls[call_id] = (loop, future)
        try:
            self._send(("call", call_id, fn, args, kwargs))
        except BaseException:
            del self._calls[call_id]
            raise
        return await future

    def _cancel(self, handle: RequestHandle) -> None:
        try:
            self._send(("cancel", handle.request_id))
        except OSError:  # the child is gone: the reader ends every request anyway
            pass

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    # -- the reader thread ------------------------------------------------------------------------

    def _read(self) -> None:
        """Hand the child's messages to the event loops they belong to, until the pipe closes."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a result that does not unpickle here: its caller waits until the engine stops
                log.exception("could not read a message of the engine process")
                continue
            if message[0] == "events":
                _, items, self.num_running, self.num_waiting = message
                self._hand_out([(self._handles.get(item[0]), *item[1:]) for item in items])
            elif message[0] == "result":
                _, call_id, ok, value = message
                loop, future = self._calls.pop(call_id)
                _call_soon(loop, _resolve, future, ok, value)
        self._alive = False
        if not self._stopping:
            self._process.join(5)
            message = f"the engine process exited unexpectedly (exit code {self._process.exitcode})"
            log.error(message)
            if self.on_exit is not None:
                self.on_exit(message)
        self._hand_out([(h, None, "error", None, None) for h in list(self._handles.values())])
        for call_id, (loop, future) in list(self._calls.items()):
            self._calls.pop(call_id, None)
            _call_soon(loop, _resolve, future, False, EngineFull("the engine process stopped"))

    def _hand_out(self, items: list) -> None:
        """(handle, event, finish reason, queue time, first token time) items to their handles' loops."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in items:
            if item[0] is not None:  # None: a request this process no longer knows
                by_loop.setdefault(item[0]._loop, []).append(item)
        for loop, batch in by_loop.items():
            _call_soon(loop, self._deliver, batch)

    def _deliver(self, items: list) -> None:  # on the handles' event loop
        for handle, event, finish_reason, queue_time, first_token_time in items:
            if handle.finish_reason is not None:  # ended already (the child died meanwhile)
                continue
            if queue_time is not None:
                handle.queue_time = queue_time
            if first_token_time is not None:
                handle.first_token_time = first_token_time
            handle._deliver(event, finish_reason)
            if finish_reason is not None:
                self._handles.pop(handle.request_id, None)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody waits for this any more
        pass


def _resolve(future: asyncio.Future, ok: bool, value) -> None:
    if not future.done():
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


# -- the child process ----------------------------------------------------------------------------


class _Outbox:
    """Stands for the event loop of the child's handles: each step's events become one message."""

    def __init__(self, conn, engine, lock: threading.Lock, handles: dict):
        self.conn, self.engine, self.lock, self.handles = conn, engine, lock, handles

    def call_soon_threadsafe(self, _deliver, items: list) -> None:
        out = []
        for handle, event, finish_reason in items:
            out.append((handle.request_id, event, finish_reason, handle.queue_time, handle.first_token_time))
            if finish_reason is not None:
                self.handles.pop(handle.request_id, None)
        self.send(("events", out, self.engine.num_running, self.engine.num_waiting))

    def send(self, message) -> None:
        try:
            with self.lock:
                self.conn.send(message)
        except OSError:  # the server is gone: the command loop sees the pipe close and stops
            pass


def _child_main(conn, source: str, device: str, threads: int | None, engine_kw: dict) -> None:
    import concurrent.futures
    import signal

    import torch

    from ..data.tokenizer import load_tokenizer
    from ..model.checkpoint import load_model
    from .engine import Engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    try:
        if threads:
            torch.set_num_threads(threads)
        model = load_model(source, device=device)
        # The server bounds the requests in flight (slots + queue); arrivals may reach this queue
        # before the engine fills its free slots, so its own bound is that total.
        queue = engine_kw.get("max_queue", 256) + engine_kw.get("max_batch_size", 16)
        engine = Engine(model, load_tokenizer(source), **{**engine_kw, "max_queue": queue})
    except Exception as e:
        conn.send(("failed", str(e) if isinstance(e, OpenGLMError) else f"{type(e).__name__}: {e}"))
        return
    engine.start()
    handles: dict[str, RequestHandle] = {}
    outbox = _Outbox(conn, engine, threading.Lock(), handles)
    outbox.send(("ready", {"model_name": engine.model_name, "max_seq_len": engine.max_seq_len,
                           "vocab_size": model.config.vocab_size}))
    stand_ins = {"model": engine.model, "tokenizer": engine.tokenizer}

    def call_done(call_id: int, future: concurrent.futures.Future) -> None:
        error = future.exception()
        ok, value = (True, future.result()) if error is None else (False, error)
        try:
            outbox.send(("result", call_id, ok, value))
        except Exception as e:  # the result or the error does not pickle
            outbox.send(("result", call_id, False, OpenGLMError(f"{type(value).__name__} from the engine: {e}")))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server process is gone
            break
        except Exception:  # a message that does not unpickle here (e.g. a function this process cannot import)
            log.exception("the engine process could not read a message")
            continue
        kind = message[0]
        if kind == "submit":
            request = message[1]
            try:
                handles[request.request_id] = engine._enqueue(request, outbox)
            except Exception as e:  # refused here although the server checked it: end it
                log.warning("engine refused request %s: %s", request.request_id, e)
                outbox.send(("events", [(request.request_id, None, "error", None, None)], engine.num_running,
                             engine.num_waiting))
        elif kind == "cancel":
            if (handle := handles.get(message[1])) is not None:
                handle.cancel()
        elif kind == "call":
            _, call_id, fn, args, kwargs = message
            args = [stand_ins[a.name] if isinstance(a, _InEngine) else a for a in args]
            try:
                future = engine._call(fn, args, kwargs)
            except EngineFull as e:
                outbox.send(("result", call_id, False, e))
            else:
                future.add_done_callback(lambda f, call_id=call_id: call_done(call_id, f))
        elif kind == "stop":
            break
    engine.stop()  # pending requests end "cancelled", their events still sent if the pipe is open


__all__ = ["EngineProcess", "TokenEvent"]
