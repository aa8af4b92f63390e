"""``EngineProcess``: the ``EngineClient`` over an engine core in a process of its own.

In one process the HTTP side (parsing, authentication, database transactions, a server-sent event
per token) and the engine's step loop share one interpreter lock: under load every step waited for
the event loop, and the event loop for the step. Here the child process loads the model and runs an
``EngineCore``; the server process tokenizes, checks, bills, detokenizes and streams. They talk over
a pipe in the messages below: requests, cancellations and ``run_exclusive`` calls one way; each
step's outputs (one message per step, token ids), call results and the core's counts the other.

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
from typing import Any, NamedTuple

from ...errors import OpenGLMError
from .output import OutputProcessor, RequestHandle
from .request import EngineFull, EngineOutput, EngineRequest, check_request

log = logging.getLogger(__name__)


# -- the messages ---------------------------------------------------------------------------------
# server -> engine process


class Submit(NamedTuple):
    request: EngineRequest  # checked, with an id the server made


class Cancel(NamedTuple):
    request_id: str


class Call(NamedTuple):
    call_id: int
    fn: Callable
    args: tuple
    kwargs: dict


class Stop(NamedTuple):
    pass


# engine process -> server


class Ready(NamedTuple):
    model_name: str
    max_seq_len: int
    vocab_size: int


class Failed(NamedTuple):
    message: str


class Outputs(NamedTuple):
    outputs: list[EngineOutput]
    num_running: int  # the core's counts after the step
    num_waiting: int


class Result(NamedTuple):
    call_id: int
    ok: bool
    value: Any  # the result, or the exception


class EngineObject:
    """Stands for the engine process's own model or tokenizer among ``run_exclusive``'s arguments."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<the engine process's {self.name}>"


class EngineProcess:
    """Serve ``model`` (a checkpoint directory or bundled name) from an engine core in a child process.

    ``engine_kw`` are ``Engine``'s keyword arguments (``max_batch_size``, ``max_queue``,
    ``max_seq_len``, ``prefill_chunk``, ``preempt_tokens``, ``model_name``); ``threads`` sets the
    child's torch threads; ``tokenizer`` (default: loaded from ``model``) detokenizes here.
    ``start()`` blocks until the model is loaded and raises ``OpenGLMError`` with the child's message
    if it could not be. ``model`` and ``tokenizer`` are ``EngineObject`` markers: passed to
    ``run_exclusive`` they become the child's own objects (there is no model in this process).
    ``on_exit(message)`` is called (on a thread of its own) if the child ends other than by ``stop()``.
    The child is spawned, not forked: a script that starts one needs the usual
    ``if __name__ == "__main__":`` guard of multiprocessing.
    """

    def __init__(self, model: str, *, device: str = "cpu", threads: int | None = None, tokenizer=None,
                 on_exit: Callable[[str], None] | None = None, **engine_kw):
        self.source, self.device, self.threads, self.engine_kw = str(model), device, threads, engine_kw
        self.on_exit = on_exit
        self.model, self.tokenizer = EngineObject("model"), EngineObject("tokenizer")
        self.max_batch_size = engine_kw.get("max_batch_size", 16)
        self.max_queue = engine_kw.get("max_queue", 256)
        self.model_name = self.max_seq_len = self.vocab_size = None  # from the child once it is ready
        self.num_running = self.num_waiting = 0  # the child's counts after its last step
        self.pid: int | None = None
        self._process = self._conn = self._reader = None
        self._send_lock = threading.Lock()
        self._outputs = OutputProcessor(tokenizer, self.cancel)
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._request_ids = itertools.count()
        self._alive = self._stopping = False

    @property
    def alive(self) -> bool:
        """Whether the engine process serves (started, not stopped, not dead)."""
        return self._alive

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - self.num_running

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the child and wait until it serves (nothing happens if it runs already)."""
        if self._process is not None:
            return
        if self._outputs.tokenizer is None:
            from ...data.tokenizer import load_tokenizer

            self._outputs.tokenizer = load_tokenizer(self.source)
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, name="openglm-engine",
                                    args=(child_conn, self.source, self.device, self.threads, self.engine_kw),
                                    daemon=True)
        self._process.start()
        child_conn.close()
        self.pid = self._process.pid
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            message = Failed(f"the engine process exited with code {self._process.exitcode}")
        if not isinstance(message, Ready):
            self._process.join(10)
            self._conn.close()
            self._process = self._conn = None
            raise OpenGLMError(message.message)
        self.model_name, self.max_seq_len, self.vocab_size = message
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
                self._send(Stop())
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
        """As ``Engine.submit``. Running requests fill the batch's slots, the rest wait: the server
        bounds the requests in flight by both, the same bound as ``Engine``'s queue."""
        loop = asyncio.get_running_loop()
        if not self._alive:
            raise EngineFull("the engine is not running")
        check_request(request, self.vocab_size, self.max_seq_len)
        if len(self._outputs) >= self.max_batch_size + self.max_queue:
            raise EngineFull(f"the engine's queue is full ({self.max_queue} requests waiting); retry later")
        request = dataclasses.replace(request, request_id=str(next(self._request_ids)))
        handle = RequestHandle(request.request_id, len(request.prompt_ids), loop, self.cancel)
        self._outputs.add(handle, request.params.stop_strings)
        try:
            self._send(Submit(request))
        except OSError:
            self._outputs.discard(request.request_id)
            raise EngineFull("the engine is not running") from None
        return handle

    def cancel(self, request_id: str) -> None:
        try:
            self._send(Cancel(request_id))
        except OSError:  # the child is gone: the reader ends every request anyway
            pass

    async def run_exclusive(self, fn, *args, **kwargs):
        """As ``Engine.run_exclusive``, in the child: ``fn`` and its arguments must pickle (a
        module-level function); ``self.model`` / ``self.tokenizer`` among them become the child's."""
        if not self._alive:
            raise EngineFull("the engine is not running")
        loop = asyncio.get_running_loop()
        call_id, future = next(self._call_ids), loop.create_future()
        self._calls[call_id] = (loop, future)
        try:
            self._send(Call(call_id, fn, args, kwargs))
        except BaseException:
            del self._calls[call_id]
            raise
        return await future

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
            if isinstance(message, Outputs):
                self.num_running, self.num_waiting = message.num_running, message.num_waiting
                self._outputs.dispatch(message.outputs)
            elif isinstance(message, Result):
                loop, future = self._calls.pop(message.call_id)
                _call_soon(loop, _resolve, future, message.ok, message.value)
        self._alive = False
        if not self._stopping:
            self._process.join(5)
            text = f"the engine process exited unexpectedly (exit code {self._process.exitcode})"
            log.error(text)
            if self.on_exit is not None:
                self.on_exit(text)
        self._outputs.dispatch([EngineOutput(request_id, None, "error") for request_id in self._outputs.request_ids()])
        for call_id, (loop, future) in list(self._calls.items()):
            self._calls.pop(call_id, None)
            _call_soon(loop, _resolve, future, False, EngineFull("the engine process stopped"))


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


def _child_main(conn, source: str, device: str, threads: int | None, engine_kw: dict) -> None:
    import signal

    import torch

    from ...data.tokenizer import load_tokenizer
    from ...model.checkpoint import load_model
    from .core import EngineCore

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    lock = threading.Lock()

    def send(message) -> None:
        try:
            with lock:
                conn.send(message)
        except OSError:  # the server is gone: the command loop sees the pipe close and stops
            pass

    core_kw = {k: v for k, v in engine_kw.items() if k != "max_queue"}  # the server bounds the queue
    try:
        if threads:
            torch.set_num_threads(threads)
        model = load_model(source, device=device)
        core = EngineCore(model, load_tokenizer(source), lambda outputs: send(
            Outputs(outputs, core.num_running, core.num_waiting)), **core_kw)
    except Exception as e:
        send(Failed(str(e) if isinstance(e, OpenGLMError) else f"{type(e).__name__}: {e}"))
        return
    core.start()
    send(Ready(core.model_name, core.max_seq_len, core.vocab_size))
    objects = {"model": core.model, "tokenizer": core.tokenizer}

    def call_done(call_id: int, future) -> None:
        error = future.exception()
        ok, value = (True, future.result()) if error is None else (False, error)
        try:
            with lock:
                conn.send(Result(call_id, ok, value))
        except OSError:
            pass
        except Exception as e:  # the result or the error does not pickle
            send(Result(call_id, False, OpenGLMError(f"{type(value).__name__} from the engine: {e}")))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server process is gone
            break
        except Exception:  # a message that does not unpickle here (e.g. a function this process cannot import)
            log.exception("the engine process could not read a message")
            continue
        if isinstance(message, Submit):
            try:
                core.add(message.request)
            except EngineFull as e:  # stopping: end it
                send(Outputs([EngineOutput(message.request.request_id, None, "error")], core.num_running,
                             core.num_waiting))
                log.warning("engine refused request %s: %s", message.request.request_id, e)
        elif isinstance(message, Cancel):
            core.abort(message.request_id)
        elif isinstance(message, Call):
            args = [objects[a.name] if isinstance(a, EngineObject) else a for a in message.args]
            try:
                future = core.call(message.fn, args, message.kwargs)
            except EngineFull as e:
                send(Result(message.call_id, False, e))
            else:
                future.add_done_callback(lambda f, call_id=message.call_id: call_done(call_id, f))
        elif isinstance(message, Stop):
            break
    core.stop()  # pending requests end "cancelled", their outputs still sent if the pipe is open


__all__ = ["EngineProcess"]
