"""Continuous batching: one thread owns the model, and requests join and leave the batch at every step.

The engine keeps a KV cache of ``max_batch_size`` slots, each filled to its own length. Every step
it (1) runs the callables queued by ``run_exclusive``, (2) ends cancelled and timed-out requests,
(3) admits waiting requests into free slots, (4) prefills admitted prompts in one batched forward of
at most ``prefill_chunk`` token slots per step, so that a long prompt never stalls the running
requests for long, (5) runs one batched decode step for every request past its prompt, and (6) samples each
row with its request's own parameters and random generator, so a seeded request gives the same
tokens whatever else shares the batch. When the prompt chunks are short, (4) and (5) are one
forward over all the step's tokens packed into one row (each sees only its own slot's keys), so
a step reads the weights once.

Short prompts go first: waiting prompts that fit in ``preempt_tokens`` (padded, together) are
prefilled in a forward of their own before the step's decode, and their first tokens sent at once;
one that arrives while a step's forward runs does not wait for its end: between two layers of that
forward the engine prefills it, sends its first token, and goes on with the paused forward. So
under load the time to first token is about one prefill instead of up to two steps, and the
requests already generating wait that prefill longer for their next token. A step is paused once
at most (prompts arriving later go first in the next step), which bounds that wait.

The asyncio side never calls the model: ``submit`` only queues the request, and the engine thread
hands each step's events back to the request's event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import uuid4

import torch

from ..errors import OpenGLMError
from ..infer.generate import _Detokenizer, _stop_ids
from ..infer.sampling import SamplingParams, sample_each
from ..model.glm import use_decode_layout
from ..model.kv_cache import KVCache, LatentKVCache

log = logging.getLogger(__name__)


@dataclass
class EngineRequest:
    """One completion to generate: token ids in, tokens out."""

    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob and the top-k alternatives
    timeout: float | None = None  # seconds from submit; on expiry the request ends with finish_reason "timeout"
    request_id: str = field(default_factory=lambda: uuid4().hex)


@dataclass
class TokenEvent:
    """One generated token of one request."""

    token: int
    text: str  # new printable text this token completes (may be "")
    logprob: float | None = None  # log-softmax of the model's logits (before temperature and penalties)
    top_logprobs: list[tuple[int, float]] | None = None  # (token, logprob), most likely first
    finish_reason: str | None = None  # on the request's last token only: "stop" | "length" | "timeout"


class EngineFull(OpenGLMError):
    """The waiting queue is full, or the engine is not running: try again later."""


class PromptTooLong(OpenGLMError):
    """Prompt plus ``max_new_tokens`` does not fit in the engine's ``max_seq_len``."""


def check_request(request: EngineRequest, vocab_size: int, max_seq_len: int) -> None:
    """Raise ``OpenGLMError`` (``PromptTooLong`` for the length) for a request no engine can run."""
    ids, params = request.prompt_ids, request.params
    if not ids:
        raise OpenGLMError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in ids):
        raise OpenGLMError(f"prompt token ids must be in 0..{vocab_size - 1}")
    if params.max_new_tokens < 1:
        raise OpenGLMError("max_new_tokens must be >= 1")
    if request.logprobs is not None and not 0 <= request.logprobs <= vocab_size:
        raise OpenGLMError(f"logprobs must be in 0..{vocab_size}, got {request.logprobs}")
    if request.timeout is not None and request.timeout <= 0:
        raise OpenGLMError(f"timeout must be > 0 seconds, got {request.timeout}")
    if len(ids) + params.max_new_tokens > max_seq_len:
        raise PromptTooLong(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"engine's {max_seq_len} positions"
        )


class SlotKVCache(KVCache):
    """A KV cache whose rows are independent slots, each filled to its own length.

    Before each forward, ``prepare(rows, counts)`` names the slots the forward runs on (its batch
    rows, in order) and how many new tokens each adds, and returns their position ids and attention
    mask; the model's ``update`` calls then write each row's new keys/values at that row's own
    length. The base class's single ``length`` counter, which the model sets after each forward,
    plays no part.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths = [0] * self.k.shape[1]  # positions filled per slot, kept on the host
        # The planned forward: which of its [B', T] queries are real tokens, and their slots and positions [N].
        self._write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._read: slice | torch.Tensor = slice(0)  # the forward's slots: a slice (a view) when consecutive
        self._keys = 0  # S: keys returned per row, the longest planned row

    def prepare(self, rows: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan a forward adding ``counts[i]`` tokens to slot ``rows[i]``, and count them as filled.

        The forward's input is ``[B', T]`` with ``T = max(counts)``, each row's tokens at its end
        (left padding). Returns ``position_ids [B', T]`` (each row continues from its own length)
        and the bool ``attention_mask [B', T, S]``: a query at position ``p`` sees its row's keys
        ``0..p``, so keys past a shorter row's end, which hold stale values, stay hidden. Padding
        queries take earlier positions; their keys and values are never written.
        """
        device = self.device
        T = max(counts)
        starts = torch.tensor([self.lengths[r] for r in rows], device=device)[:, None]  # (B', 1)
        pads = torch.tensor([T - n for n in counts], device=device)[:, None]
        pos = starts - pads + torch.arange(T, device=device)  # (B', T)
        real = pos >= starts
        pos = pos.clamp(min=0)  # a padding query sees at least key 0, so its softmax is never empty
        self._keys = max(self.lengths[r] + n for r, n in zip(rows, counts))
        mask = torch.arange(self._keys, device=device) <= pos[..., None]  # (B', T, S)
        slots = torch.tensor(rows, device=device)
        self._write = (real, slots[:, None].expand_as(pos)[real], pos[real])
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self._read = slice(rows[0], rows[0] + len(rows)) if consecutive else slots
        for r, n in zip(rows, counts):
            self.lengths[r] += n
        return pos, mask

    def prepare_packed(self, rows: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan a forward of one packed row: ``counts[i]`` tokens for slot ``rows[i]``, one slot after
        the other, no padding (decode steps and short prompt chunks together).

        Returns ``position_ids [1, N]`` and the bool ``attention_mask [1, N, S]`` over the keys of
        all those slots laid end to end (``S`` = the sum of their new lengths): a token sees its own
        slot's keys up to its position, nothing of the others.
        """
        device = self.device
        starts = [self.lengths[r] for r in rows]
        ends = [start + n for start, n in zip(starts, counts)]
        count_t, end_t = torch.tensor(counts, device=device), torch.tensor(ends, device=device)
        owner = torch.arange(len(rows), device=device)
        token_owner, key_owner = owner.repeat_interleave(count_t), owner.repeat_interleave(end_t)
        # position of each token / key within its own slot
        first_token = torch.cumsum(count_t, 0) - count_t
        token_pos = torch.arange(len(token_owner), device=device) - first_token[token_owner] + torch.tensor(
            starts, device=device)[token_owner]
        first_key = torch.cumsum(end_t, 0) - end_t
        key_pos = torch.arange(len(key_owner), device=device) - first_key[key_owner]
        slots = torch.tensor(rows, device=device)
        mask = (token_owner[:, None] == key_owner) & (key_pos <= token_pos[:, None])  # (N, S)
        self._write = (torch.ones(1, len(token_owner), dtype=torch.bool, device=device), slots[token_owner], token_pos)
        self._read = (slots[key_owner], key_pos)
        for r, n in zip(rows, counts):
            self.lengths[r] += n
        return token_pos[None], mask[None]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the real tokens of ``k, v [B', K, T, D]`` at their planned positions; return the
        planned rows' keys/values ``[B', K, S, D]`` (packed: ``[1, K, S, D]``, the slots end to end)."""
        real, slots, pos = self._write
        # Indices on dims 0 and 2 of [slots, K, max_length, D] select (N, K, D), as k.transpose(1, 2)[real] is.
        self.k[layer][slots, :, pos] = k.transpose(1, 2)[real]
        self.v[layer][slots, :, pos] = v.transpose(1, 2)[real]
        if isinstance(self._read, tuple):  # packed: gather each slot's keys, (S, K, D) -> (1, K, S, D)
            key_slots, key_pos = self._read
            return (self.k[layer][key_slots, :, key_pos].transpose(0, 1)[None],
                    self.v[layer][key_slots, :, key_pos].transpose(0, 1)[None])
        return self.k[layer][self._read, :, : self._keys], self.v[layer][self._read, :, : self._keys]

    @property
    def plan(self) -> tuple:
        """The planned forward (what ``prepare``/``prepare_packed`` set): save it before planning
        another forward in the middle of this one, and set it back to go on with this one."""
        return self._write, self._read, self._keys

    @plan.setter
    def plan(self, plan: tuple) -> None:
        self._write, self._read, self._keys = plan

    def free(self, slot: int) -> None:
        """Mark ``slot`` empty; its old keys stay in memory but are never visible again."""
        self.lengths[slot] = 0


class SlotLatentKVCache(SlotKVCache, LatentKVCache):
    """``SlotKVCache``'s slots and planning over a ``LatentKVCache``'s buffers (latent-attention models): each
    slot keeps per token the latent and the rotary key (and, for sparse attention, the indexer keys)."""

    max_length = LatentKVCache.max_length

    def __init__(self, *args, **kwargs):
        LatentKVCache.__init__(self, *args, **kwargs)  # its buffers, not KVCache's
        self.lengths = [0] * self.latent.shape[1]
        self._write, self._read, self._keys = None, slice(0), 0

    @property
    def device(self) -> torch.device:
        return self.latent.device

    def _planned(self, buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Write the real tokens of ``x [B', T, W]`` into ``buffer [slots, max_length, W]`` at their planned
        positions; return the planned rows' entries ``[B', S, W]`` (packed: ``[1, S, W]``, the slots end to end)."""
        real, slots, pos = self._write
        buffer[slots, pos] = x[real]
        if isinstance(self._read, tuple):
            key_slots, key_pos = self._read
            return buffer[key_slots, key_pos][None]
        return buffer[self._read, : self._keys]

    def update(self, layer: int, entry: torch.Tensor) -> torch.Tensor:
        return self._planned(self.latent[layer], entry)

    def update_index(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        return self._planned(self.index[self.index_slot[layer]], k)


_END = object()  # queued after a request's last event


class RequestHandle:
    """A submitted request, seen from the asyncio side.

    ``async for event in handle`` yields each ``TokenEvent`` as it is generated and ends when the
    request ends. A request that ends on a generated token ("stop", "length", or "timeout" while
    generating) carries the reason on that last event; one ended without a new token (cancelled,
    engine stopped, timed out while queued or prefilling, or "error" if a model step failed) just
    ends the iteration. ``finish_reason`` is set in every case by the time iteration ends.

    ``completion_tokens`` and ``finish_reason`` change on the event loop's thread as events are
    handed over; the timings (seconds) are written by the engine thread.
    """

    def __init__(self, request: EngineRequest, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.request_id = request.request_id
        self.prompt_tokens = len(request.prompt_ids)
        self.completion_tokens = 0  # tokens handed to this handle so far: what is billed if the stream is cut
        self.finish_reason: str | None = None
        self.queue_time: float | None = None  # submit -> admitted into a batch slot
        self.first_token_time: float | None = None  # submit -> first token
        self.inter_token_latencies: list[float] = []  # between consecutive tokens
        self._engine, self._loop = engine, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = False
        self._done = False

    def cancel(self) -> None:
        """Stop generating: the engine ends the request within one step and frees its slot (thread-safe)."""
        self._cancelled = True
        self._engine._cancel(self)

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
        if item is _END:
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
            self._queue.put_nowait(_END)


def _deliver(items: list[tuple[RequestHandle, TokenEvent | None, str | None]]) -> None:
    for handle, event, finish_reason in items:
        handle._deliver(event, finish_reason)


@dataclass(eq=False)
class _Sequence:
    """The engine thread's state of one request."""

    request: EngineRequest
    handle: RequestHandle
    stop_ids: set[int]
    detokenizer: _Detokenizer
    generator: torch.Generator | None
    submitted: float  # time.monotonic()
    ids: list[int]  # the prompt, then each generated token
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    last_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    def end_reason(self, now: float) -> str | None:
        if self.handle._cancelled:
            return "cancelled"
        if self.request.timeout is not None and now >= self.submitted + self.request.timeout:
            return "timeout"
        return None


class Engine:
    """Serves one causal (1D-position) model to many concurrent requests by continuous batching.

    ``max_seq_len`` bounds prompt + ``max_new_tokens`` of every request (default: the model's
    positions, capped at 4096); the cache holds ``max_batch_size`` rows of that many positions.
    ``prefill_chunk`` bounds the prompt tokens (padding included) prefilled per step. Waiting prompts
    that fit in ``preempt_tokens`` (padding included; 0: none) are prefilled ahead of the decode,
    pausing a running forward between two layers if need be (see the module's notes). ``model_name``
    defaults to the path or name the model was loaded from, else its config's name.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 256,
                 max_seq_len: int | None = None, *, prefill_chunk: int = 256, preempt_tokens: int = 64,
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
        if max_batch_size < 1 or max_queue < 0 or prefill_chunk < 1 or preempt_tokens < 0:
            raise OpenGLMError("max_batch_size and prefill_chunk must be >= 1, max_queue and preempt_tokens >= 0")
        use_decode_layout(model)  # as generate() does: same values, faster few-row products
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.max_seq_len = max_batch_size, max_queue, max_seq_len
        self.prefill_chunk = prefill_chunk
        self.preempt_tokens = min(preempt_tokens, prefill_chunk)
        self.model_name = model_name or getattr(model, "name_or_path", None) or config.name
        self.steps = 0  # engine steps run so far
        self.packed_steps = 0  # of which decoded and prefilled in one packed forward
        self.preemptions = 0  # forwards paused between two layers to prefill prompts that arrived meanwhile
        weight = model.model.norm.weight  # never quantized: the cache's dtype and device
        self._device = weight.device
        if config.kv_lora_rank:
            self._cache = SlotLatentKVCache(config.num_layers, max_batch_size, max_seq_len, config.kv_cache_width,
                                            config.index_layers, config.index_head_dim, dtype=weight.dtype,
                                            device=weight.device)
        else:
            self._cache = SlotKVCache(config.num_layers, max_batch_size, config.num_kv_heads, max_seq_len,
                                      config.head_dim, dtype=weight.dtype, device=weight.device)
        self._slots: list[_Sequence | None] = [None] * max_batch_size
        self._waiting: deque[_Sequence] = deque()
        self._calls: deque[tuple[concurrent.futures.Future, Callable, tuple, dict]] = deque()
        self._outbox: list[tuple[RequestHandle, TokenEvent | None, str | None]] = []
        self._cond = threading.Condition()  # guards _waiting, _calls, _thread, _stopping
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._paused = False  # this step's forward was paused once already for new prompts

    @property
    def num_running(self) -> int:
        """Requests holding a batch slot (prefilling or generating)."""
        return sum(s is not None for s in self._slots)

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (started and not stopping)."""
        return self._thread is not None and not self._stopping

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    # -- the asyncio side -----------------------------------------------------------------------

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

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue ``request`` and return its handle at once; call from inside a running event loop.

        Raises ``PromptTooLong`` when prompt + ``max_new_tokens`` exceeds ``max_seq_len``,
        ``EngineFull`` when ``max_queue`` requests are already waiting or the engine is not running,
        and ``OpenGLMError`` for an invalid request.
        """
        return self._enqueue(request, asyncio.get_running_loop())

    def _enqueue(self, request: EngineRequest, loop) -> RequestHandle:
        """``submit``, the handle's events going to ``loop`` (anything with ``call_soon_threadsafe``)."""
        check_request(request, self.model.config.vocab_size, self.max_seq_len)
        params = request.params
        handle = RequestHandle(request, self, loop)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(params.seed)
        seq = _Sequence(request, handle, _stop_ids(self.model, self.tokenizer, params),
                        _Detokenizer(self.tokenizer, params.stop_strings), generator, time.monotonic(),
                        list(request.prompt_ids))
        with self._cond:
            if self._thread is None or self._stopping:
                raise EngineFull("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(f"the engine's queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(seq)
            self._cond.notify()
        return handle

    async def run_exclusive(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` run on the engine thread between two steps (under
        ``torch.inference_mode``); returns its result or raises its exception."""
        return await asyncio.wrap_future(self._call(fn, args, kwargs))

    def _call(self, fn: Callable, args, kwargs) -> concurrent.futures.Future:
        """Queue ``fn(*args, **kwargs)`` for the engine thread (any thread may call); its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._thread is None or self._stopping:
                raise EngineFull("the engine is not running")
            self._calls.append((future, fn, args, kwargs))
            self._cond.notify()
        return future

    def _cancel(self, handle: RequestHandle) -> None:  # the handle is marked; wake an idle engine to end it
        with self._cond:
            self._cond.notify()

    # -- the engine thread ----------------------------------------------------------------------

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
        self._admit(now)
        decoding = [s for s in self._slots if s is not None and s.prefilled == s.prompt_len]
        batch, counts = self._prefill_plan()
        if batch and decoding and self._packable(decoding, batch, counts):
            self._packed(decoding, batch, counts)  # one forward: its weights are read once, not twice
        else:
            if batch:
                self._prefill(batch, counts)
                if self._outbox:  # first tokens go out now, not after the batch's decode forward
                    self._flush()
            self._decode()
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
                reason = seq.end_reason(now)
                if reason:
                    self._finish(seq, reason)
                else:
                    self._waiting.append(seq)
        for seq in self._slots:
            reason = seq.end_reason(now) if seq is not None else None
            # A generating request that timed out gets this step's token, marked "timeout", in _emit.
            if reason == "cancelled" or (reason == "timeout" and seq.prefilled < seq.prompt_len):
                self._finish(seq, reason)

    def _admit(self, now: float, budget: int | None = None) -> list[_Sequence]:
        """Move the oldest waiting requests into free slots and return them. With a ``budget``, only
        while their whole prompts, left-padded to the longest, fit in that many tokens."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        admitted: list[_Sequence] = []
        with self._cond:
            while self._waiting and len(admitted) < len(free):
                seq = self._waiting[0]
                if budget is not None and (seq.end_reason(now) or max(
                        [seq.prompt_len] + [s.prompt_len for s in admitted]) * (len(admitted) + 1) > budget):
                    break  # (a cancelled or expired request is ended by the next step's _reap)
                admitted.append(self._waiting.popleft())
        admitted_at = time.monotonic()  # not ``now``: a request may have come after it was taken
        for slot, seq in zip(free, admitted):
            seq.slot = slot
            self._slots[slot] = seq
            self._cache.free(slot)
            seq.handle.queue_time = admitted_at - seq.submitted
        return admitted

    def _prefill_first(self, now: float) -> bool:
        """Admit the oldest waiting prompts that fit in ``preempt_tokens``, prefill them in one
        forward and send their first tokens now; whether there were any."""
        if not (self.preempt_tokens and self._waiting and None in self._slots):
            return False
        admitted = self._admit(now, self.preempt_tokens)
        if admitted:
            self._prefill(admitted, [s.prompt_len for s in admitted])
            self._flush()
        return bool(admitted)

    def _between_layers(self) -> None:
        """Called by a decode forward after each layer: prefill the short prompts that arrived since
        it began (``_prefill_first``), then go on with it where it paused; once per step at most."""
        if self._waiting and not self._paused and None in self._slots:  # cheap checks: runs after every layer
            plan = self._cache.plan
            if self._prefill_first(time.monotonic()):
                self.preemptions += 1
                self._paused = True
            self._cache.plan = plan

    def _prefill_plan(self) -> tuple[list[_Sequence], list[int]]:
        """The prompts to feed this step, oldest first, in at most ``prefill_chunk`` token slots.

        The oldest prompt sets the chunk length T (what it still needs, at most ``prefill_chunk``);
        the next oldest join with up to T tokens each while rows x T stays within the budget.
        Returns the sequences and how many prompt tokens each feeds.
        """
        prefilling = [s for s in self._slots if s is not None and s.prefilled < s.prompt_len]
        if not prefilling:
            return [], []
        prefilling.sort(key=lambda s: s.submitted)
        T = min(prefilling[0].prompt_len - prefilling[0].prefilled, self.prefill_chunk)
        batch = prefilling[: self.prefill_chunk // T]
        return batch, [min(s.prompt_len - s.prefilled, T) for s in batch]

    def _prefill(self, batch: list[_Sequence], counts: list[int]) -> None:
        """Feed the planned prompt chunks in one left-padded forward; prompts that end emit their first token."""
        T = max(counts)
        # Left padding repeats a row's first new token: padding keys are never written anyway.
        chunks = [s.ids[s.prefilled : s.prefilled + n] for s, n in zip(batch, counts)]
        ids = torch.tensor([c[:1] * (T - len(c)) + c for c in chunks], device=self._device)  # (B', T)
        pos, mask = self._cache.prepare([s.slot for s in batch], counts)
        logits = self.model(ids, pos, mask, self._cache, logits_to_keep=1)[:, -1]  # (B', V): each row's last token
        done = self._fed(batch, counts)
        if done:
            self._emit([batch[i] for i in done], logits if len(done) == len(batch) else logits[done])

    @staticmethod
    def _fed(batch: list[_Sequence], counts: list[int]) -> list[int]:
        """Count the prompt chunks just fed as prefilled; the indices of the prompts that are now complete."""
        done = []
        for i, (seq, n) in enumerate(zip(batch, counts)):
            seq.prefilled += n
            if seq.prefilled == seq.prompt_len:
                done.append(i)
        return done

    # A packed forward gathers its slots' keys (S of them) and scores every token against all of
    # them: worth it while both stay small next to the weights a separate forward reads again.
    PACK_MAX_TOKENS, PACK_MAX_KEYS = 64, 4096

    def _packable(self, decoding: list[_Sequence], batch: list[_Sequence], counts: list[int]) -> bool:
        tokens = len(decoding) + sum(counts)
        keys = sum(self._cache.lengths[s.slot] + 1 for s in decoding) + sum(
            self._cache.lengths[s.slot] + n for s, n in zip(batch, counts))
        return tokens <= self.PACK_MAX_TOKENS and keys <= self.PACK_MAX_KEYS

    def _packed(self, decoding: list[_Sequence], batch: list[_Sequence], counts: list[int]) -> None:
        """One token for every generating request and the planned prompt chunks, in one packed forward."""
        rows, all_counts = decoding + batch, [1] * len(decoding) + counts
        ids = [s.ids[-1] for s in decoding]
        for seq, n in zip(batch, counts):
            ids += seq.ids[seq.prefilled : seq.prefilled + n]
        pos, mask = self._cache.prepare_packed([s.slot for s in rows], all_counts)
        h = self.model.model(torch.tensor([ids], device=self._device), pos, mask[:, None], self._cache,
                             self._layer_hook())  # (1, N, C)
        ends = torch.tensor(all_counts).cumsum(0) - 1  # each row's last token
        done = self._fed(batch, counts)
        keep = list(range(len(decoding))) + [len(decoding) + i for i in done]
        logits = self.model.lm_head(h[0, ends[keep]])  # (R, V)
        self._emit(decoding + [batch[i] for i in done], logits)
        self.packed_steps += 1

    def _decode(self) -> None:
        """One token for every request past its prompt, in one batched forward."""
        rows = [s for s in self._slots if s is not None and s.prefilled == s.prompt_len]
        if not rows:
            return
        pos, mask = self._cache.prepare([s.slot for s in rows], [1] * len(rows))
        last = torch.tensor([[s.ids[-1]] for s in rows], device=self._device)  # (B', 1)
        h = self.model.model(last, pos, mask[:, None], self._cache, self._layer_hook())  # (B', 1, C)
        self._emit(rows, self.model.lm_head(h[:, -1]))  # logits (B', V)

    def _layer_hook(self) -> Callable[[], None] | None:
        return self._between_layers if self.preempt_tokens else None

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample each sequence's next token from its row of ``logits [B', V]`` (rows sharing their
        sampling settings in one call), queue the events, end the requests that are done."""
        tokens = sample_each(logits, [s.request.params for s in seqs], [s.generator for s in seqs],
                             [s.ids for s in seqs])
        for seq, row, token in zip(seqs, logits, tokens):
            self._emit_one(seq, row, token)

    def _emit_one(self, seq: _Sequence, logits: torch.Tensor, token: int) -> None:
        if seq.handle._cancelled:  # cancelled during this step's forward: hand out nothing more
            self._finish(seq, "cancelled")
            return
        params, handle = seq.request.params, seq.handle
        event = TokenEvent(token, "")
        if seq.request.logprobs is not None:
            logprobs = logits.float().log_softmax(-1)
            top = logprobs.topk(seq.request.logprobs)
            event.logprob = float(logprobs[token])
            event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        seq.ids.append(token)

        now = time.monotonic()
        if seq.last_token_at is None:
            handle.first_token_time = now - seq.submitted
        else:
            handle.inter_token_latencies.append(now - seq.last_token_at)
        seq.last_token_at = now

        if token in seq.stop_ids:
            event.text, event.finish_reason = seq.detokenizer.flush(), "stop"
        else:
            event.text, hit = seq.detokenizer.push(token)
            if hit:
                event.finish_reason = "stop"
            elif len(seq.ids) - seq.prompt_len == params.max_new_tokens:
                event.finish_reason = "length"
            elif seq.end_reason(now) == "timeout":
                event.finish_reason = "timeout"
            if event.finish_reason in ("length", "timeout"):
                event.text += seq.detokenizer.flush()
        if event.finish_reason:
            self._finish(seq, event.finish_reason, event)
        else:
            self._outbox.append((handle, event, None))

    def _finish(self, seq: _Sequence, reason: str, event: TokenEvent | None = None) -> None:
        if seq.slot is not None:
            self._slots[seq.slot] = None
            seq.slot = None
        self._outbox.append((seq.handle, event, reason))

    def _flush(self) -> None:
        """Hand this step's events to their event loops, one call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in self._outbox:
            by_loop.setdefault(item[0]._loop, []).append(item)
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is waiting for these events any more
                pass
