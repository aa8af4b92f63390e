"""The gateway's upstreams: a pool of OpenAI-compatible servers, and requests forwarded to them.

An upstream is any server with OpenAI's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` and a ``/health`` route: an ``openglm worker``, llama.cpp's
``llama-server``, vLLM, SGLang. ``UpstreamPool`` checks each one in the background (``/health``, then
``/v1/models`` for the models it serves) and keeps its load: an ``openglm worker`` reports the
requests it runs and queues and its free batch slots; of any other, only liveness is known. A
request goes to the least-loaded healthy upstream that serves its model (its requests in flight from
this gateway, plus those the upstream last reported beyond them). An upstream that refuses
connections, breaks a response or answers 5xx is taken out at once; the background check puts it back
when it answers again.

A request that has sent its client nothing yet is retried on another upstream (each at most once):
a refused connection, an error status, or a stream that breaks before its first token. A stream
holds back its token-less chunks (the role chunk of a chat) until its first token arrives, so that a
retry never repeats them. Once a token has gone out, a broken stream raises ``StreamCut``: what was
sent stays sent, and ``UpstreamStream`` knows what that was (chunks, text) for the bill.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

log = logging.getLogger("openglm.serve.upstream")

CHECK_INTERVAL = 1.0  # seconds between two health checks of an upstream
CHECK_TIMEOUT = 2.0  # an upstream that takes longer to answer /health is out
CONNECT_TIMEOUT = 2.0
# Statuses after which another upstream may well answer: overloaded, failing, or not (or no longer)
# serving the model or taking our key. Any other error status is the request's own fault: the
# client gets it as it is.
_RETRYABLE = {401, 403, 404, 408, 409, 429}


class UpstreamError(Exception):
    """An error answer for the client: HTTP ``status``, OpenAI's ``type``/``code``/``param``."""

    def __init__(self, status: int, message: str, type: str = "server_error", code: str | None = None,
                 param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.retry_after = retry_after


class StreamCut(UpstreamError):
    """The upstream's stream broke after some of it went to the client: the request cannot be retried."""

    def __init__(self, message: str):
        super().__init__(502, message, "server_error", "upstream_error")


@dataclass(eq=False)
class Upstream:
    """One upstream server and what the pool knows of it."""

    url: str
    models: dict[str, dict] = field(default_factory=dict)  # model id -> its /v1/models card
    healthy: bool = False
    error: str | None = None  # why it is out
    in_flight: int = 0  # requests of this gateway it is answering now
    others: int = 0  # requests it reported running or waiting beyond ours, at its last check
    free_slots: int | None = None  # batch slots it reported free (openglm workers)
    picked: int = 0  # requests sent to it: the tie-break between equally loaded upstreams

    @property
    def load(self) -> int:
        return self.in_flight + self.others


def _card_context(card: dict) -> int | None:
    """The context length a /v1/models card gives: vLLM's and our workers' ``max_model_len``, else
    llama-server's ``meta.n_ctx`` (a slot's) or ``meta.n_ctx_train``."""
    meta = card.get("meta") or {}
    n = card.get("max_model_len") or meta.get("n_ctx") or meta.get("n_ctx_train")
    return n if isinstance(n, int) and n > 0 else None


def _error_of(status: int, content: bytes) -> UpstreamError:
    """The upstream's error answer as ours: OpenAI's ``{"error": {...}}`` (llama-server's too, whose
    ``code`` is the status) or vLLM's older top-level ``{"object": "error", "message": ...}``."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    error = data.get("error", data) if isinstance(data, dict) else None
    if not isinstance(error, dict):
        error = {"message": content.decode("utf-8", "replace")[:500] or f"HTTP {status}"}
    code = error.get("code")
    return UpstreamError(status, str(error.get("message") or f"HTTP {status}"),
                         str(error.get("type") or ("server_error" if status >= 500 else "invalid_request_error")),
                         code if isinstance(code, str) else None, error.get("param"))


def _has_tokens(chunk: dict) -> bool:
    """Whether a stream chunk carries generated output (text, a tool call, a finish reason, usage),
    not only the opening role of a chat."""
    if chunk.get("usage"):
        return True
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
    return False


class UpstreamPool:
    """Upstream servers for the gateway, checked in the background; ``key`` is sent to each as bearer.

    ``start()`` checks every upstream once (an upstream that is down then is taken in when it comes
    up) and starts the checks; ``close()`` stops them and closes the connections. ``timeout``: seconds
    an upstream may go without sending anything before its request fails.
    """

    def __init__(self, urls: list[str], key: str | None = None, *, interval: float = CHECK_INTERVAL,
                 timeout: float = 600.0):
        if not urls:
            raise ValueError("an upstream pool needs at least one upstream URL")
        self.upstreams = [Upstream(url.rstrip("/")) for url in urls]
        self.interval = interval
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.timeout = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)
        self.client: httpx.AsyncClient | None = None
        self._watcher: asyncio.Task | None = None
        self._checks: set[asyncio.Task] = set()

    @property
    def num_running(self) -> int:
        """Requests of this gateway on its upstreams now (a metric's gauge)."""
        return sum(u.in_flight for u in self.upstreams)

    num_waiting = 0  # the gateway queues no request: an upstream does, or it answers 503

    async def start(self) -> None:
        # No limit on connections: the gateway's own limits (keys, the upstreams' queues) bound them.
        self.client = httpx.AsyncClient(headers=self.headers, timeout=self.timeout, trust_env=False,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        await self.check_all()
        self._watcher = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    # ---------------------------------------------------------------------------- health

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams))

    async def check(self, u: Upstream) -> None:
        """Ask ``u`` its health, load and models; take it out or back in accordingly."""
        try:
            in_flight = u.in_flight  # ours when it counted its load
            r = await self.client.get(u.url + "/health", timeout=CHECK_TIMEOUT)
            if r.status_code != 200:
                raise UpstreamError(r.status_code, f"/health answered {r.status_code}")
            try:
                info = r.json()
            except ValueError:  # vLLM answers an empty 200
                info = None
            info = info if isinstance(info, dict) else {}
            running, waiting = info.get("running"), info.get("waiting")
            r = await self.client.get(u.url + "/v1/models", timeout=CHECK_TIMEOUT)
            if r.status_code != 200:
                raise UpstreamError(r.status_code, f"/v1/models answered {r.status_code}"
                                    + (" (does it take the --upstream-key?)" if r.status_code == 401 else ""))
            cards = r.json().get("data")
            models = {c["id"]: c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)}
        except (httpx.HTTPError, UpstreamError, ValueError, AttributeError, TypeError) as e:
            self.take_out(u, str(e) or type(e).__name__)
            return
        u.models = models
        u.free_slots = info.get("free_slots") if isinstance(info.get("free_slots"), int) else None
        reported = sum(n for n in (running, waiting) if isinstance(n, int))
        u.others = max(0, reported - in_flight)
        if not u.healthy:
            log.warning("upstream %s is in, serving %s", u.url, ", ".join(sorted(models)) or "no model")
        u.healthy, u.error = True, None

    def take_out(self, u: Upstream, reason: str) -> None:
        """Route no request to ``u`` until a check finds it well again."""
        if u.healthy or u.error is None:
            log.warning("upstream %s is out: %s", u.url, reason)
        u.healthy, u.error = False, reason

    # ---------------------------------------------------------------------------- models and routing

    def known(self, model: str) -> bool:
        """Whether some upstream, up or down, serves ``model``."""
        return any(model in u.models for u in self.upstreams)

    def model_cards(self) -> dict[str, dict]:
        """Every model an upstream serves (or served before it went out): id -> card."""
        cards = {}
        for u in self.upstreams:
            for name, card in u.models.items():
                cards.setdefault(name, card)
        return cards

    def context_length(self, model: str) -> int | None:
        """The smallest context length the healthy upstreams of ``model`` report (None: none reports one)."""
        lengths = [n for u in self.upstreams if u.healthy and model in u.models
                   if (n := _card_context(u.models[model])) is not None]
        return min(lengths) if lengths else None

    def pick(self, model: str, tried: set[Upstream] = frozenset()) -> Upstream:
        """The least-loaded healthy upstream of ``model`` not in ``tried``; 503 if there is none."""
        best = None
        for u in self.upstreams:
            if u.healthy and model in u.models and u not in tried:
                if best is None or (u.load, -(u.free_slots or 0), u.picked) < \
                        (best.load, -(best.free_slots or 0), best.picked):
                    best = u
        if best is None:
            what = "is answering" if tried else "serves"
            raise UpstreamError(503, f"no upstream {what} the model {model!r} now; retry shortly", code="overloaded",
                                retry_after=1)
        best.picked += 1
        return best

    # ---------------------------------------------------------------------------- forwarding

    def _failed(self, u: Upstream, error: UpstreamError) -> bool:
        """Whether another upstream may answer a request ``u`` answered with ``error``; takes ``u`` out
        if it is failing, rather than only busy or refusing this request."""
        if error.status in (401, 403) or (error.status >= 500 and error.status != 503):
            self.take_out(u, f"answered {error.status}: {error.message}")
        elif error.status == 404:  # its models changed: check it again now
            task = asyncio.get_running_loop().create_task(self.check(u))
            self._checks.add(task)  # a strong reference until it ends (the loop keeps weak ones)
            task.add_done_callback(self._checks.discard)
        return error.status >= 500 or error.status in _RETRYABLE

    async def complete(self, path: str, body: dict, model: str) -> dict:
        """POST ``body`` to ``path`` of an upstream of ``model`` and return its JSON answer, trying the
        others in turn while one fails; raises the error of the last (or 503 if none serves it)."""
        tried: set[Upstream] = set()
        last: UpstreamError | None = None
        while True:
            try:
                u = self.pick(model, tried)
            except UpstreamError:
                raise last or UpstreamError(503, f"no upstream serves the model {model!r} now; retry shortly",
                                            code="overloaded", retry_after=1) from None
            tried.add(u)
            u.in_flight += 1
            try:
                r = await self.client.post(u.url + path, json=body)
                if r.status_code == 200:
                    return r.json()
                last = _error_of(r.status_code, r.content)
                if not self._failed(u, last):
                    raise last
            except (httpx.HTTPError, ValueError) as e:  # refused, reset, timed out, or not JSON
                self.take_out(u, str(e) or type(e).__name__)
                last = UpstreamError(502, f"the upstream failed: {str(e) or type(e).__name__}", code="upstream_error")
            finally:
                u.in_flight -= 1

    def stream(self, path: str, body: dict, model: str) -> UpstreamStream:
        """A streamed request (``body`` with ``stream: true``): iterate the returned object for its chunks."""
        return UpstreamStream(self, path, body, model)


class UpstreamStream:
    """One streamed request through the pool: ``async for chunk in stream`` yields the upstream's
    chunks (dicts) up to ``data: [DONE]``; raises ``UpstreamError`` if no upstream could answer and
    ``StreamCut`` if the answer broke after its first token was yielded.

    Meanwhile it keeps ``usage`` (the upstream's, from its last chunk), ``texts`` (per choice index,
    the text yielded: chat content or completion text) and ``token_chunks`` (chunks yielded with text
    in them): what the client received, for a bill without the upstream's usage.
    """

    def __init__(self, pool: UpstreamPool, path: str, body: dict, model: str):
        self.pool, self.path, self.body, self.model = pool, path, body, model
        self.usage: dict | None = None
        self.texts: dict[int, list[str]] = {}
        self.token_chunks = 0
        self.upstream: Upstream | None = None

    def _note(self, chunk: dict) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                self.texts.setdefault(choice.get("index", 0), []).append(text)
                self.token_chunks += 1

    async def __aiter__(self) -> AsyncIterator[dict]:
        pool, tried, last = self.pool, set(), None
        while True:
            try:
                u = pool.pick(self.model, tried)
            except UpstreamError:
                raise last or UpstreamError(503, f"no upstream serves the model {self.model!r} now; retry shortly",
                                            code="overloaded", retry_after=1) from None
            tried.add(u)
            self.upstream, held, started = u, [], False
            u.in_flight += 1
            try:
                async with pool.client.stream("POST", u.url + self.path, json=self.body) as r:
                    if r.status_code != 200:
                        last = _error_of(r.status_code, await r.aread())
                        if pool._failed(u, last):
                            continue
                        raise last
                    done = False
                    async for line in r.aiter_lines():
                        # Read on to the end of the body past [DONE] (nothing, normally): a response
                        # left unread would close its connection instead of keeping it for the next.
                        if done or not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            continue
                        chunk = json.loads(data)
                        if not isinstance(chunk, dict):
                            raise ValueError(f"a stream chunk that is not an object: {data[:100]}")
                        if "error" in chunk:  # the upstream's generation failed
                            error = _error_of(500, data.encode())
                            raise httpx.RemoteProtocolError(f"the upstream's stream failed: {error.message}")
                        if not started and not _has_tokens(chunk):
                            held.append(chunk)
                            continue
                        if not started:
                            started = True
                            for h in held:
                                yield h
                        self._note(chunk)
                        yield chunk
                    if not done:
                        raise httpx.RemoteProtocolError("the upstream's stream ended before data: [DONE]")
                    return
            except (httpx.HTTPError, ValueError) as e:
                reason = str(e) or type(e).__name__
                pool.take_out(u, reason)
                if started:
                    raise StreamCut(f"the upstream failed mid-stream: {reason}") from None
                last = UpstreamError(502, f"the upstream failed: {reason}", code="upstream_error")
            finally:
                u.in_flight -= 1
