"""The engine core: one thread owns the model, and requests join and leave the batch at every step.

Every step it (1) runs the callables queued by ``call``, (2) ends cancelled and timed-out requests,
(3) asks the scheduler (``scheduler.py``) for the step's plan: which waiting prompts go first,
which take free slots, which prompt chunks are fed and which requests decode, (4) has the model
runner (``runner.py``) run those forwards and sample each row with its request's own parameters and
random generator, so a seeded request gives the same tokens whatever else shares the batch, and
(5) hands the step's outputs, token ids and logprobs, to ``on_outputs``. Text is not made here:
the client that took the request detokenizes in the front end (``output.py``).

Short prompts go first: waiting prompts that fit in ``preempt_tokens`` are prefilled in a forward of
their own before the step's decode, and their first tokens sent at once; one that arrives while a
step's forward runs does not wait for its end: the runner calls back between two layers of that
forward, the core prefills it and sends its first token, and the paused forward goes on. A step is
paused once at most (prompts arriving later go first in the next step), which bounds how much longer
the requests already generating wait for their next token.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...errors import OpenGLMError
from ...infer.generate import _stop_ids
from ...infer.sampling import SamplingParams
from .request import EngineFull, EngineOutput, EngineRequest
from .runner import ModelRunner
from .scheduler import Budgets, first_prompts, schedule

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestState:
    """The core's state of one request (what the scheduler and the runner read of it)."""

    request: EngineRequest
    stop_ids: set[int]
    generator: torch.Generator | None
    submitted: float  # time.monotonic()
    ids: list[int]  # the prompt, then each generated token
    prompt_len: int
    deadline: float | None
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache
    cancelled: bool = False
    queue_time: float | None = None  # seconds from submit to a slot, once admitted
    last_token_at: float | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def logprobs(self) -> int | None:
        return self.request.logprobs

    @property
    def cache_scope(self) -> str | None:
        return self.request.cache_scope

    @property
    def cached(self) -> int:
        """Tokens of the row in the cache: the prompt fed so far, then every generated token but the last."""
        return self.prefilled if self.prefilled < self.prompt_len else len(self.ids) - 1


class EngineCore:
    """Serves one causal (1D-position) model to many concurrent requests by continuous batching.

    ``max_seq_len`` bounds prompt + ``max_new_tokens`` of every request (default: the model's
    positions, capped at 4096); the cache holds ``max_batch_size`` slots of that many positions.
    ``prefill_chunk`` bounds the prompt tokens (padding included) prefilled per step. Waiting prompts
    that fit in ``preempt_tokens`` (padding included; 0: none) are prefilled ahead of the decode,
    pausing a running forward between two layers if need be (see the module's notes). ``model_name``
    defaults to the path or name the model was loaded from, else its config's name. ``on_outputs``
    receives each step's outputs, on the engine thread.

    Requests come checked (``check_request``, by the client that took them); ``add`` and ``abort``
    may be called from any thread.
    """

    def __init__(self, model, tokenizer, on_outputs: Callable[[list[EngineOutput]], None], *,
                 max_batch_size: int = 16, max_seq_len: int | None = None, prefill_chunk: int = 256,
                 preempt_tokens: int = 64, pack_max_tokens: int = 64, pack_max_keys: int = 4096,
                 model_name: str | None = None):
        config = model.config
        if config.position_encoding_2d:
            raise OpenGLMError(
                "the serving engine runs causal (1D-position) models only; this model uses GLM's 2D "
                "positions for blank infilling (run openglm.infill through Engine.run_exclusive instead)"
            )
        limit = config.max_position_embeddings
        max_seq_len = max_seq_len or min(limit, 4096)
        if not 0 < max_seq_len <= limit:
            raise OpenGLMError(f"max_seq_len must be in 1..{limit} (the model's positions), got {max_seq_len}")
        if max_batch_size < 1 or prefill_chunk < 1 or preempt_tokens < 0:
            raise OpenGLMError("max_batch_size and prefill_chunk must be >= 1, preempt_tokens >= 0")
        self.model, self.tokenizer, self.on_outputs = model, tokenizer, on_outputs
        self.max_seq_len, self.vocab_size = max_seq_len, config.vocab_size
        self.model_name = model_name or getattr(model, "name_or_path", None) or config.name
        self.budgets = Budgets(max_batch_size, prefill_chunk, min(preempt_tokens, prefill_chunk), pack_max_tokens,
                               pack_max_keys)
        self.runner = ModelRunner(model, max_batch_size, max_seq_len)
        if self.budgets.preempt_tokens:
            self.runner.on_layer = self._between_layers
        self.steps = 0  # engine steps run so far
        self.packed_steps = 0  # of which decoded and prefilled in one packed forward
        self.preemptions = 0  # forwards paused between two layers to prefill prompts that arrived meanwhile
        self.prefix_tokens = 0  # prompt tokens not prefilled: their keys were in the cache already
        self._device = model.model.norm.weight.device
        self._slots: list[RequestState | None] = [None] * max_batch_size
        self._waiting: deque[RequestState] = deque()
        self._live: dict[str, RequestState] = {}  # waiting or running, by request id
        self._calls: deque[tuple[concurrent.futures.Future, Callable, tuple, dict]] = deque()
        self._outbox: list[EngineOutput] = []
        self._cond = threading.Condition()  # guards _waiting, _live, _calls, _thread, _stopping
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._paused = False  # this step's forward was paused once already for new prompts

    @property
    def max_batch_size(self) -> int:
        return self.budgets.max_batch_size

    @property
    def num_running(self) -> int:
        """Requests holding a batch slot (prefilling or generating)."""
        return sum(s is not None for s in self._slots)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (started and not stopping)."""
        return self._thread is not None and not self._stopping

    # -- any thread -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (nothing happens if it runs already)."""
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="openglm-engine", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop the engine thread, waiting for its current step to end; pending requests end with "cancelled"."""
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            self._cond.notify()
        thread.join()
        with self._cond:
            self._thread = None

    def add(self, request: EngineRequest, max_waiting: int | None = None) -> None:
        """Queue a checked ``request`` (its ``request_id`` unique among those not ended); raise
        ``EngineFull`` if the engine does not run or ``max_waiting`` requests wait already."""
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(params.seed)
        now = time.monotonic()
        seq = RequestState(request, _stop_ids(self.model, self.tokenizer, params), generator, now,
                       list(request.prompt_ids), len(request.prompt_ids),
                       None if request.timeout is None else now + request.timeout)
        with self._cond:
            if self._thread is None or self._stopping:
                raise EngineFull("the engine is not running")
            if max_waiting is not None and len(self._waiting) >= max_waiting:
                raise EngineFull(f"the engine's queue is full ({max_waiting} requests waiting); retry later")
            self._waiting.append(seq)
            self._live[request.request_id] = seq
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """End a request within one step (it ends "cancelled"); nothing happens if it has ended."""
        with self._cond:
            seq = self._live.get(request_id)
            if seq is not None:
                seq.cancelled = True
                self._cond.notify()

    def call(self, fn: Callable, args=(), kwargs=None) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` on the engine thread between two steps (under
        ``torch.inference_mode``); its future. Raises ``EngineFull`` if the engine does not run."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._thread is None or self._stopping:
                raise EngineFull("the engine is not running")
            self._calls.append((future, fn, args, kwargs or {}))
            self._cond.notify()
        return future

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._step()
                except Exception:
                    log.exception("engine step failed; ending the requests in the batch")
                    for seq in self._slots:
                        if seq is not None:
                            self._finish(seq, "error")
                self._flush()
        with self._cond:
            pending = [s for s in self._slots if s is not None] + list(self._waiting)
            calls = list(self._calls)
            self._waiting.clear()
            self._calls.clear()
        for seq in pending:
            self._finish(seq, "cancelled")
        for future, *_ in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineFull("the engine stopped"))
        self._flush()

    def _wait_for_work(self) -> bool:
        """Block while idle; False once the engine is stopping."""
        with self._cond:
            while not (self._stopping or self._waiting or self._calls or self.num_running):
                self._cond.wait()
            return not self._stopping

    def _step(self) -> None:
        self._run_calls()
        now = time.monotonic()
        self._reap(now)
        self._paused = False
        self._prefill_first(now)
        with self._cond:
            waiting = list(self._waiting)
        plan = schedule([s for s in self._slots if s is not None], waiting, self.budgets)
        if self._admit(plan.admit):  # planned again with the prompt prefixes the admitted found cached
            plan = schedule([s for s in self._slots if s is not None], [], self.budgets)
        if plan.packed:
            self._packed(plan.decode, plan.prefill)
        else:
            if plan.prefill:
                self._prefill(plan.prefill)
                if self._outbox:  # first tokens go out now, not after the batch's decode forward
                    self._flush()
            self._decode([s for s in plan.decode if s.slot is not None])
        self.steps += 1

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                future, fn, args, kwargs = self._calls.popleft()
            if future.set_running_or_notify_cancel():  # False: the caller gave up waiting
                try:
                    future.set_result(fn(*args, **kwargs))
                except Exception as e:
                    future.set_exception(e)

    def _reap(self, now: float) -> None:
        """End cancelled and timed-out requests, queued or in a slot."""
        with self._cond:
            waiting, self._waiting = self._waiting, deque()
            for seq in waiting:
                if seq.cancelled or (seq.deadline is not None and now >= seq.deadline):
                    self._finish(seq, "cancelled" if seq.cancelled else "timeout")
                else:
                    self._waiting.append(seq)
        for seq in self._slots:
            if seq is None:
                continue
            # A generating request that timed out gets this step's token, marked "timeout", in _emit.
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif seq.deadline is not None and now >= seq.deadline and seq.prefilled < seq.prompt_len:
                self._finish(seq, "timeout")

    def _admit(self, count: int) -> list[RequestState]:
        """Move the ``count`` oldest waiting requests into free slots and return them."""
        if not count:
            return []
        with self._cond:
            admitted = [self._waiting.popleft() for _ in range(count)]
        admitted_at = time.monotonic()
        for seq in admitted:
            seq.slot, seq.prefilled = self.runner.place(seq, [i for i, s in enumerate(self._slots) if s is None])
            self.prefix_tokens += seq.prefilled
            self._slots[seq.slot] = seq
            seq.queue_time = admitted_at - seq.submitted
        return admitted

    def _prefill_first(self, now: float) -> bool:
        """Admit the oldest waiting prompts that fit in ``preempt_tokens``, prefill them in one
        forward and send their first tokens now; whether there were any."""
        if not (self.budgets.preempt_tokens and self._waiting and None in self._slots):  # cheap: runs after every layer
            return False
        free = self._slots.count(None)
        with self._cond:
            waiting = list(itertools.islice(self._waiting, free))
        admitted = self._admit(first_prompts(waiting, free, self.budgets.preempt_tokens, now))
        if admitted:
            self._prefill([(s, s.prompt_len - s.prefilled) for s in admitted])
            self._flush()
        return bool(admitted)

    def _between_layers(self) -> None:
        """Called by the runner between two layers of a decode forward: prefill the short prompts that
        arrived since it began (``_prefill_first``), once per step at most."""
        if not self._paused and self._prefill_first(time.monotonic()):
            self.preemptions += 1
            self._paused = True

    def _prefill(self, batch: list[tuple[RequestState, int]]) -> None:
        """Feed the planned prompt chunks in one left-padded forward; prompts that end emit their first token."""
        chunks = [s.ids[s.prefilled : s.prefilled + n] for s, n in batch]
        logits = self.runner.prefill([s.slot for s, _ in batch], chunks)
        done = self._fed(batch)
        if done:
            self._emit([batch[i][0] for i in done], logits if len(done) == len(batch) else logits[done])

    @staticmethod
    def _fed(batch: list[tuple[RequestState, int]]) -> list[int]:
        """Count the prompt chunks just fed as prefilled; the indices of the prompts that are now complete."""
        done = []
        for i, (seq, n) in enumerate(batch):
            seq.prefilled += n
            if seq.prefilled == seq.prompt_len:
                done.append(i)
        return done

    def _packed(self, decoding: list[RequestState], batch: list[tuple[RequestState, int]]) -> None:
        """One token for every generating request and the planned prompt chunks, in one packed forward."""
        chunks = [[s.ids[-1]] for s in decoding] + [s.ids[s.prefilled : s.prefilled + n] for s, n in batch]
        completing = [i for i, (s, n) in enumerate(batch) if s.prefilled + n == s.prompt_len]
        keep = list(range(len(decoding))) + [len(decoding) + i for i in completing]
        logits = self.runner.packed([s.slot for s in decoding] + [s.slot for s, _ in batch], chunks, keep)
        done = self._fed(batch)
        self._emit(decoding + [batch[i][0] for i in done], logits)
        self.packed_steps += 1

    def _decode(self, rows: list[RequestState]) -> None:
        """One token for every request past its prompt, in one batched forward (in slot order)."""
        if not rows:
            return
        rows.sort(key=lambda s: s.slot)
        self._emit(rows, self.runner.decode([s.slot for s in rows], [s.ids[-1] for s in rows]))

    def _emit(self, seqs: list[RequestState], logits: torch.Tensor) -> None:
        """Sample each sequence's next token from its row of ``logits [B', V]``, queue the outputs, end
        the requests that are done."""
        for seq, (token, logprob, top) in zip(seqs, self.runner.sample(logits, seqs)):
            if seq.cancelled:  # cancelled during this step's forward: hand out nothing more
                self._finish(seq, "cancelled")
                continue
            out = EngineOutput(seq.request.request_id, token, None, logprob, top, seq.queue_time)
            seq.ids.append(token)
            now = time.monotonic()
            if seq.last_token_at is None:
                out.first_token_time = now - seq.submitted
            else:
                out.latency = now - seq.last_token_at
            seq.last_token_at = now
            if token in seq.stop_ids:
                reason = "stop"
            elif len(seq.ids) - seq.prompt_len == seq.request.params.max_new_tokens:
                reason = "length"
            elif seq.deadline is not None and now >= seq.deadline:
                reason = "timeout"
            else:
                self._outbox.append(out)
                continue
            self._finish(seq, reason, out)

    def _finish(self, seq: RequestState, reason: str, out: EngineOutput | None = None) -> None:
        if seq.slot is not None:
            self._slots[seq.slot] = None
            seq.slot = None
        self._live.pop(seq.request.request_id, None)
        out = out or EngineOutput(seq.request.request_id, None, queue_time=seq.queue_time)
        out.finish_reason = reason
        self._outbox.append(out)

    def _flush(self) -> None:
        """Hand this step's outputs on."""
        if not self._outbox:
            return
        outputs, self._outbox = self._outbox, []
        try:
            self.on_outputs(outputs)
        except Exception:  # a receiver's failure must not end the engine thread
            log.exception("could not hand out the engine's outputs")
