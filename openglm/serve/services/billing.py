"""Billing of generation requests: check, reserve (worst case), settle (what was generated) or release.

Store calls are blocking database transactions: they run on worker threads, never on the event loop.
A stream's tokens are written into its reservation as they are sent (``Deliveries``), so that a
server killed mid-stream bills them at its next start (``Store.recover``).
"""

from __future__ import annotations

import asyncio
import logging

from anyio import to_thread

from ..errors import store_error
from ..store import StoreError

log = logging.getLogger("openglm.serve")

RECORD_TOKENS = 16  # a stream's count of tokens sent is written once this many are unrecorded,
RECORD_SECONDS = 1.0  # or this long after the last write, whichever comes first (see Deliveries)
RECORD_LAG = 2 * RECORD_TOKENS  # the most tokens a stream runs ahead of its record: what a crash leaves unbilled


class Billing:
    """The store's billing calls for requests to ``model_name``, as async calls that raise ``APIError``."""

    def __init__(self, store, model_name: str):
        self.store, self.model_name = store, model_name
        self.deliveries = Deliveries(store)

    async def check(self, key, request_id: str | None, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse now what ``reserve`` would refuse for a request of at least this size (``Store.check``)."""
        await self._call(self.store.check, key, self.model_name, request_id, prompt_tokens, max_tokens)

    async def reserve(self, key, request_id: str | None, prompt_tokens: int, max_tokens: int, stream: bool):
        """Hold the worst case (prompt + ``max_tokens``) of the key's balance and limits: a ``Reservation``."""
        return await self._call(self.store.reserve, key, self.model_name, request_id, prompt_tokens, max_tokens,
                                stream)

    async def release(self, reservation) -> None:
        """Give a reservation back unbilled (the request never ran)."""
        await to_thread.run_sync(self.store.release, reservation)

    async def settle(self, reservation, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                     latency_ms: int) -> None:
        """Bill what the request used and free the rest of its reservation."""
        self.deliveries.forget(reservation)
        await to_thread.run_sync(self.store.settle, reservation, prompt_tokens, completion_tokens, finish_reason,
                                 latency_ms)

    async def rate_limit_headers(self, key) -> dict[str, str]:
        """The key's ``x-ratelimit-*`` headers (none for a key without limits)."""
        if key.rpm is None and key.tpm is None:  # nothing to report: spare the database a transaction
            return {}
        return await to_thread.run_sync(self.store.rate_limit_headers, key)

    def close(self) -> None:
        self.deliveries.close()

    async def _call(self, fn, key, *args):
        try:
            return await to_thread.run_sync(fn, key, *args)
        except StoreError as e:
            err = store_error(e)
            if e.http_status == 429:
                err.headers.update(await self.rate_limit_headers(key))
            raise err from None


class Deliveries:
    """Writes how many tokens each stream has sent into its reservation (``Store.record_delivered``).

    One task writes the counts of all streams in one transaction: as soon as one of them has
    ``RECORD_TOKENS`` tokens unrecorded, else ``RECORD_SECONDS`` after its last write. A stream that
    gets ``RECORD_LAG`` tokens ahead of its record waits for the next write before it sends more, so
    however slow the database, a crash leaves at most ``RECORD_LAG`` tokens of a request unbilled.
    """

    def __init__(self, store):
        self.store = store
        self.pending: dict = {}  # reservation -> count not yet written
        self.recorded: dict = {}  # reservation -> count written, while its stream runs
        self.due = asyncio.Event()
        self.written = asyncio.Event()  # set (and replaced) after each write
        self.task: asyncio.Task | None = None

    async def sent(self, reservation, count: int) -> None:
        """The stream of ``reservation`` is about to send its ``count``-th token: note it, waiting first
        while that would put it more than ``RECORD_LAG`` tokens ahead of its record."""
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        self.recorded.setdefault(reservation, 0)
        while count - self.recorded.get(reservation, 0) > RECORD_LAG:
            self.due.set()
            await self.written.wait()
        self.pending[reservation] = count
        if count - self.recorded.get(reservation, 0) >= RECORD_TOKENS:
            self.due.set()

    def forget(self, reservation) -> None:
        """The request settles: its count needs no writing any more."""
        self.pending.pop(reservation, None)
        self.recorded.pop(reservation, None)

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
                await to_thread.run_sync(self.store.record_delivered, {r.id: n for r, n in batch.items()})
            except Exception:  # the database failed: keep the counts for the next try; streams wait meanwhile
                log.exception("recording the tokens streams sent failed; retrying")
                for r, n in batch.items():
                    self.pending[r] = max(n, self.pending.get(r, 0))
                await asyncio.sleep(RECORD_SECONDS)
                continue
            for r, n in batch.items():
                if r in self.recorded:  # (not settled meanwhile)
                    self.recorded[r] = max(self.recorded[r], n)
            self.written.set()
            self.written = asyncio.Event()
