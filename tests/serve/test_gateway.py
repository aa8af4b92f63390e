"""Scale-out serving: ``openglm worker``, the upstream pool, and the gateway (``openglm serve --upstream``),
on loopback with real servers: workers, a server that breaks its answers on purpose, llama.cpp's
``llama-server`` where one is built."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from live_server import LiveServer

WORKER_KEY = "worker-secret"


def worker_app(checkpoint, key: str | None = WORKER_KEY, name: str = "tiny", max_batch_size: int = 4):
    """An ``openglm worker``'s app over an engine in this process."""
    from openglm import load_model, load_tokenizer
    from openglm.serve.engine import Engine
    from openglm.serve.worker import create_worker_app

    tokenizer = load_tokenizer(checkpoint)
    engine = Engine(load_model(checkpoint), tokenizer, max_batch_size=max_batch_size, max_seq_len=256)
    return create_worker_app(engine, tokenizer, name, worker_key=key)


class PortServer(LiveServer):
    """A ``LiveServer`` on a port of our choosing, so that a stopped server can come back at the same URL."""

    def __init__(self, app, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)


def broken_upstream(tokens_before_break: int, status: int = 200, model: str = "tiny"):
    """A real HTTP server that looks healthy (``/health``, ``/v1/models`` serving ``model``, many free
    slots, so that it is picked first) and breaks every generation: answers ``status`` if it is not
    200, else streams the role chunk and ``tokens_before_break`` token chunks, then drops the connection."""
    served = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return

        async def reply(code: int, body: dict) -> None:
            await send({"type": "http.response.start", "status": code,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})

        if scope["path"] == "/health":
            return await reply(200, {"status": "ok", "running": 0, "waiting": 0, "free_slots": 64})
        if scope["path"] == "/v1/models":
            return await reply(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
        served.append(scope["path"])
        if status != 200:
            return await reply(status, {"error": {"message": "the engine is not running", "type": "server_error"}})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
        chunks += [{"choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
                   for i in range(tokens_before_break)]
        for chunk in chunks:
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
        raise ConnectionAbortedError("the upstream broke mid-answer")  # uvicorn drops the connection

    app.served = served
    return app


def chat_body(stream: bool, max_tokens: int = 8) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "The General Language Model"}],
            "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


# ------------------------------------------------------------------------------------------------ worker

def test_worker_serves_the_openai_routes_behind_its_key(tiny_checkpoint):
    from openai import AuthenticationError, OpenAI

    with LiveServer(worker_app(tiny_checkpoint)) as server:
        health = httpx.get(server.url + "/health")  # no key needed: a load balancer's probe
        assert health.status_code == 200
        assert health.json() | {"running": 0, "waiting": 0, "free_slots": 4} == health.json()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()
        client = OpenAI(base_url=server.url + "/v1", api_key=WORKER_KEY)
        [card] = client.models.list().data
        assert card.id == "tiny" and card.model_extra["max_model_len"] == 256
        whole = client.chat.completions.create(**chat_body(stream=False))
        assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(**chat_body(stream=True)))
        assert chunks[-1].usage.completion_tokens == 8
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            whole.choices[0].message.content
        text = client.completions.create(model="tiny", prompt="The General", max_tokens=4, temperature=0)
        assert text.usage.completion_tokens == 4
        # no accounts, billing or chat app on a worker
        for path in ("/", "/v1/usage", "/admin/accounts", "/v1/conversations"):
            assert httpx.get(server.url + path, headers={"authorization": f"Bearer {WORKER_KEY}"}).status_code == 404


def test_worker_health_reports_its_load(tiny_checkpoint):
    with LiveServer(worker_app(tiny_checkpoint, max_batch_size=2)) as server:
        headers = {"authorization": f"Bearer {WORKER_KEY}"}

        async def load_during_requests() -> list[dict]:
            async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as c:
                requests = [asyncio.create_task(c.post("/v1/completions", json={
                    "model": "tiny", "prompt": "The General Language Model", "max_tokens": 200, "temperature": 0}))
                    for _ in range(3)]
                seen = []
                while not all(r.done() for r in requests):
                    seen.append((await c.get("/health")).json())
                    await asyncio.sleep(0.02)
                assert all(r.result().status_code == 200 for r in requests)
                return seen

        seen = asyncio.run(load_during_requests())
        # two requests in the batch (no free slot) and one waiting, at some point
        assert {"running": 2, "waiting": 1, "free_slots": 0} in [
            {k: h[k] for k in ("running", "waiting", "free_slots")} for h in seen]


# ------------------------------------------------------------------------------------------------ the pool

def run_pool(urls: list[str], scenario, key: str | None = WORKER_KEY, interval: float = 0.1):
    """``await scenario(pool)`` with an ``UpstreamPool`` over ``urls``, started and closed around it."""
    from openglm.serve.upstream import UpstreamPool

    async def main():
        pool = UpstreamPool(urls, key, interval=interval)
        await pool.start()
        try:
            return await scenario(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


async def streamed(pool, body: dict) -> tuple[str, dict | None, object]:
    """(text, usage, upstream) of a chat streamed through ``pool``."""
    stream = pool.stream("/v1/chat/completions", body, "tiny")
    parts = [c["choices"][0]["delta"].get("content") or "" async for c in stream if c["choices"]]
    return "".join(parts), stream.usage, stream.upstream


def test_pool_learns_the_models_and_spreads_requests_over_the_least_loaded(tiny_checkpoint):
    with LiveServer(worker_app(tiny_checkpoint)) as a, LiveServer(worker_app(tiny_checkpoint)) as b:
        async def scenario(pool):
            assert pool.model_cards().keys() == {"tiny"} and pool.context_length("tiny") == 256
            assert all(u.healthy for u in pool.upstreams)
            results = await asyncio.gather(*(streamed(pool, chat_body(True, 16)) for _ in range(8)))
            whole = await pool.complete("/v1/chat/completions", chat_body(False, 16), "tiny")
            return results, whole, [u.picked for u in pool.upstreams]

        results, whole, picked = run_pool([a.url, b.url], scenario)
        assert picked[0] + picked[1] == 9 and abs(picked[0] - picked[1]) <= 1  # 4 or 5 each: in flight counts
        assert {u.url for _, _, u in results} == {a.url, b.url}
        for text, usage, _ in results:  # greedy on the same weights: one answer whichever worker ran it
            assert text == whole["choices"][0]["message"]["content"] and usage["completion_tokens"] == 16


def test_pool_takes_a_dead_upstream_out_and_back_when_it_returns(tiny_checkpoint):
    with LiveServer(worker_app(tiny_checkpoint)) as b:
        first = PortServer(worker_app(tiny_checkpoint))
        port = first.port

        async def scenario(pool):
            a_up, b_up = pool.upstreams
            assert a_up.healthy and b_up.healthy
            first.__exit__(None, None, None)  # worker a stops
            outs = [await streamed(pool, chat_body(True)) for _ in range(4)]  # none fails: b answers
            assert {u.url for _, _, u in outs} == {b.url}
            await pool.check_all()
            assert not a_up.healthy and "connect" in a_up.error.lower()
            with PortServer(worker_app(tiny_checkpoint), port):  # a comes back on the same port
                deadline = time.monotonic() + 10
                while not a_up.healthy:
                    assert time.monotonic() < deadline, "the upstream that came back was never taken back in"
                    await asyncio.sleep(0.05)
                ups = {(await streamed(pool, chat_body(True)))[2].url for _ in range(4)}
            return ups

        with first:
            ups = run_pool([first.url, b.url], scenario)
        assert first.url in ups  # used again


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("failure", ["breaks before a token", "answers 500"])
def test_a_request_that_sent_nothing_yet_is_retried_on_another_upstream(tiny_checkpoint, stream, failure):
    broken = broken_upstream(0, 200 if failure == "breaks before a token" else 500)
    with PortServer(broken) as bad, LiveServer(worker_app(tiny_checkpoint)) as good:
        async def scenario(pool):
            if stream:
                text, usage, upstream = await streamed(pool, chat_body(True))
                chunks_from = upstream.url
            else:
                answer = await pool.complete("/v1/chat/completions", chat_body(False), "tiny")
                text, usage, chunks_from = answer["choices"][0]["message"]["content"], answer["usage"], None
            return text, usage, chunks_from, pool.upstreams[0].healthy

        # No background check during the request: its /health answers, so a check would put it back
        # before the assertion under load.
        text, usage, chunks_from, bad_healthy = run_pool([bad.url, good.url], scenario, interval=600)
        assert broken.served  # it was tried first
        assert usage["completion_tokens"] == 8 and text and "t0" not in text
        assert chunks_from in (None, good.url)
        assert not bad_healthy  # and taken out


def test_a_stream_cut_after_its_first_tokens_raises_with_what_was_sent(tiny_checkpoint):
    from openglm.serve.upstream import StreamCut

    broken = broken_upstream(3)
    with PortServer(broken) as bad, LiveServer(worker_app(tiny_checkpoint)) as good:
        async def scenario(pool):
            stream = pool.stream("/v1/chat/completions", chat_body(True), "tiny")
            got = []
            with pytest.raises(StreamCut):
                async for chunk in stream:
                    got.append(chunk)
            return got, stream

        got, stream = run_pool([bad.url, good.url], scenario)
        assert len(got) == 4  # the role chunk, then three tokens; never a retry once tokens went out
        assert stream.token_chunks == 3 and "".join(stream.texts[0]) == "t0 t1 t2 " and stream.usage is None


def test_no_upstream_for_a_model_is_a_503(tiny_checkpoint):
    from openglm.serve.upstream import UpstreamError

    with LiveServer(worker_app(tiny_checkpoint)) as a:
        async def scenario(pool):
            with pytest.raises(UpstreamError) as unknown:
                await pool.complete("/v1/chat/completions", {**chat_body(False), "model": "other"}, "other")
            return unknown.value

        error = run_pool([a.url], scenario)
        assert error.status == 503 and error.retry_after == 1
        # a pool whose upstream rejects its key takes it out, saying why
        wrong = run_pool([a.url], lambda pool: asyncio.sleep(0, pool.upstreams[0]), key="wrong")
        assert not wrong.healthy and "401" in wrong.error and "--upstream-key" in wrong.error


# ------------------------------------------------------------------------------------------------ the gateway

ADMIN_KEY = "admin-secret"
ZHIPU = "/api/paas/v4/chat/completions"


def gateway_app(urls: list[str], store):
    """``openglm serve --upstream``'s app over ``urls``, accounts in ``store``."""
    from openglm.serve.gateway import create_gateway_app
    from openglm.serve.upstream import UpstreamPool

    return create_gateway_app(UpstreamPool(urls, WORKER_KEY, interval=0.2), store, admin_key=ADMIN_KEY)


def new_key(store, balance: int = 10**9, **limits) -> tuple[int, str]:
    account = store.create_account(f"acct-{time.monotonic_ns()}", balance)
    return account.id, store.create_key(account.id, **limits)[1]


def wait_settled(store, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while store.open_reservations():
        assert time.monotonic() < deadline, "a reservation was left open"
        time.sleep(0.05)


def test_gateway_answers_and_bills_like_the_embedded_server(tiny_checkpoint, tmp_path):
    from openai import NotFoundError, OpenAI, RateLimitError
    from openglm.serve.store import Store

    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    store.set_price("tiny", 1_000_000, 2_000_000)
    account, secret = new_key(store)
    with LiveServer(worker_app(tiny_checkpoint)) as a, LiveServer(worker_app(tiny_checkpoint)) as b, \
            LiveServer(gateway_app([a.url, b.url], store)) as gw:
        assert httpx.get(gw.url + "/health").json() | {"upstreams": 2, "upstreams_out": 0} == \
            httpx.get(gw.url + "/health").json()
        client = OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        direct = OpenAI(base_url=a.url + "/v1", api_key=WORKER_KEY).chat.completions.create(**chat_body(False))
        whole = client.chat.completions.create(**chat_body(False))
        assert whole.choices[0].message.content == direct.choices[0].message.content
        assert whole.usage == direct.usage and whole.model == "tiny" and whole.id.startswith("chatcmpl-")
        chunks = list(client.chat.completions.create(**chat_body(True)))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            direct.choices[0].message.content
        assert chunks[-1].usage == direct.usage and len({c.id for c in chunks}) == 1
        unasked = list(client.chat.completions.create(**{**chat_body(True), "stream_options": None}))
        assert all(c.usage is None for c in unasked)  # asked upstream for the bill, not passed on
        text = client.completions.create(model="tiny", prompt="The General", max_tokens=5, temperature=0)
        assert text.usage.completion_tokens == 5
        vectors = client.embeddings.create(model="tiny", input=["The General", "Language"])
        assert len(vectors.data) == 2 and vectors.usage.prompt_tokens > 0
        with pytest.raises(NotFoundError):
            client.chat.completions.create(**{**chat_body(False), "model": "nope"})
        # Zhipu's route: its errors, request_id billed once
        zhipu = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                 "do_sample": False, "request_id": "zhipu-once"}
        headers = {"authorization": f"Bearer {secret}"}
        first = httpx.post(gw.url + ZHIPU, json=zhipu, headers=headers, timeout=30)
        assert first.status_code == 200 and first.json()["request_id"] == "zhipu-once"
        again = httpx.post(gw.url + ZHIPU, json=zhipu, headers=headers, timeout=30)
        assert again.status_code == 400 and again.json()["error"]["code"] == "1231"
        with httpx.stream("POST", gw.url + ZHIPU, json={**zhipu, "request_id": "zhipu-streamed", "stream": True},
                          headers=headers, timeout=30) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert {e["request_id"] for e in events} == {"zhipu-streamed"}
        assert events[-1]["usage"]["completion_tokens"] == 4  # Zhipu's streams always end with usage
        unknown = httpx.post(gw.url + ZHIPU, json={**zhipu, "model": "nope", "request_id": "zhipu-unknown-model"}, headers=headers)
        assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "1211"
        # no balance: 429 insufficient_quota before anything reaches an upstream
        _, poor = new_key(store, balance=0)
        with pytest.raises(RateLimitError) as refused:
            OpenAI(base_url=gw.url + "/v1", api_key=poor, max_retries=0).chat.completions.create(**chat_body(False))
        assert refused.value.code == "insufficient_quota"
        upstreams = httpx.get(gw.url + "/admin/upstreams", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
        assert sum(u["requests"] for u in upstreams["data"]) == 7 and all(u["healthy"] for u in upstreams["data"])
        wait_settled(store)
        totals = store.ledger_totals(account)
        billed = [whole.usage, chunks[-1].usage, text.usage, first.json()["usage"], events[-1]["usage"]]
        completion = sum(u["completion_tokens"] if isinstance(u, dict) else u.completion_tokens for u in billed)
        assert totals["requests"] == 7  # the five above, the unasked-usage stream and the embeddings
        assert totals["completion_tokens"] == completion + 8  # + the unasked-usage stream's 8
        metrics = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
        assert f"openglm_generation_tokens_total {float(completion + 8)}" in metrics
    store.close()


# ------------------------------------------------------------------------------------------------ real processes

class Process:
    """An ``openglm`` command in a subprocess on ``port`` (a free one by default), until healthy."""

    def __init__(self, *args: str, port: int | None = None):
        import os
        import subprocess
        import sys

        from live_server import free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "openglm", *args, "--port", str(self.port),
                                      "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait_healthy(self, timeout: float = 90) -> Process:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the process exited: {self.proc.stdout.read()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.url} did not become healthy")

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.kill()


def worker_process(checkpoint, port: int | None = None) -> Process:
    # An engine in the worker's process: a kill -9 then leaves no orphan engine process behind.
    return Process("worker", "--model", str(checkpoint), "--served-model-name", "tiny", "--worker-key", WORKER_KEY,
                   "--threads", "1", "--max-batch-size", "8", "--max-seq-len", "256", "--engine-in-process",
                   port=port)


async def one_client(client, i: int, events: dict) -> tuple[str, dict | None]:
    """("ok" or "error: ...", the usage the client received) of one request; every fourth one whole."""
    from openai import APIError

    body = {**chat_body(i % 4 != 0, 64), "messages": [{"role": "user", "content": f"request {i}: tell me more"}]}
    usage = None
    try:
        if not body.get("stream"):
            answer = await client.chat.completions.create(**body)
            return "ok", answer.usage.model_dump()
        async for chunk in await client.chat.completions.create(**body):
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
            elif chunk.choices and chunk.choices[0].delta.content:
                events["streaming"] += 1
                if events["streaming"] == events["kill_at"]:
                    events["kill"]()
        return "ok", usage
    except APIError as e:  # a clean error: an error status, or an error event after the usage billed
        return f"error: {type(e).__name__}: {e.message}", usage


@pytest.mark.slow
def test_gateway_over_two_workers_and_a_llama_server_survives_a_kill_9_mid_load(tiny_checkpoint, tmp_path):
    from openai import AsyncOpenAI
    from openglm.serve.store import Store

    llama, llama_url = start_llama_server(tiny_checkpoint, tmp_path, slots=8, context=4096)
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    store = Store(db)
    store.set_price("tiny", 1_000_000, 2_000_000)
    account, secret = new_key(store)
    a, b = worker_process(tiny_checkpoint), worker_process(tiny_checkpoint)
    gateway = None
    try:
        a.wait_healthy(), b.wait_healthy()
        gateway = Process("serve", "--upstream", a.url, "--upstream", b.url, "--upstream", llama_url,
                          "--upstream-key", WORKER_KEY, "--db", db, "--admin-key", ADMIN_KEY).wait_healthy()
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}

        def upstreams() -> dict:
            return {u["url"]: u for u in httpx.get(gateway.url + "/admin/upstreams", headers=admin).json()["data"]}

        async def load(n: int, kill=None) -> list[tuple[str, dict | None]]:
            events = {"streaming": 0, "kill_at": 40 if kill else -1, "kill": kill}
            async with AsyncOpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0, timeout=60) as c:
                return await asyncio.gather(*(one_client(c, i, events) for i in range(n)))

        killed_with = []

        def kill():
            killed_with.append(upstreams()[a.url]["in_flight"])
            a.kill()

        during = asyncio.run(load(32, kill=kill))
        assert a.proc.poll() is not None, "worker a was never killed: the load ended before 40 tokens streamed"
        assert killed_with[0] > 0, "worker a was killed with no request of the load on it"
        errors = [outcome for outcome, _ in during if outcome != "ok"]
        # Streams that were sending on worker a when it died end with an error event; every other
        # request (whole ones, streams that had sent nothing yet) was retried on worker b or llama-server.
        assert all("upstream failed mid-stream" in e for e in errors), errors
        assert len(errors) < 32
        after = asyncio.run(load(16))
        assert [outcome for outcome, _ in after] == ["ok"] * 16  # all on the survivors
        assert not upstreams()[a.url]["healthy"]
        assert all(upstreams()[url]["requests"] > 0 for url in (b.url, llama_url))
        wait_settled(store)
        received = [usage for _, usage in during + after if usage is not None]
        assert len(received) == 48  # cut streams too got the usage billed before their error event
        totals = store.ledger_totals(account)
        assert totals["requests"] == 48
        assert totals["completion_tokens"] == sum(u["completion_tokens"] for u in received)
        assert totals["prompt_tokens"] == sum(u["prompt_tokens"] for u in received)

        a = worker_process(tiny_checkpoint, port=a.port).wait_healthy()  # back, at the same address
        deadline = time.monotonic() + 10
        while not upstreams()[a.url]["healthy"]:
            assert time.monotonic() < deadline, "the worker that came back was never taken back in"
            time.sleep(0.1)
        before = upstreams()[a.url]["requests"]
        assert [outcome for outcome, _ in asyncio.run(load(8))] == ["ok"] * 8
        assert upstreams()[a.url]["requests"] > before  # used again
    finally:
        for process in (gateway, a, b):
            if process is not None:
                process.stop()
        llama.terminate()
        llama.wait(30)
        store.close()


def test_two_gateways_on_one_postgresql_keep_one_ledger_and_one_set_of_limits(tiny_checkpoint, postgres_server):
    from openai import AsyncOpenAI, RateLimitError
    from openglm.serve.store import Store

    url = postgres_server.new_database()
    stores = [Store(url), Store(url)]
    stores[0].set_price("tiny", 1_000_000, 2_000_000)
    balance = 10**7
    account, secret = new_key(stores[0], balance=balance, max_concurrency=3)
    with LiveServer(worker_app(tiny_checkpoint)) as a, LiveServer(worker_app(tiny_checkpoint)) as b, \
            LiveServer(gateway_app([a.url, b.url], stores[0])) as g1, \
            LiveServer(gateway_app([b.url, a.url], stores[1])) as g2:

        async def one(url: str, i: int):
            async with AsyncOpenAI(base_url=url + "/v1", api_key=secret, max_retries=0, timeout=60) as client:
                try:
                    chunks = [c async for c in await client.chat.completions.create(**chat_body(True, 32))]
                except RateLimitError as e:
                    return e.code
                return chunks[-1].usage

        async def scenario():
            return await asyncio.gather(*(one((g1, g2)[i % 2].url, i) for i in range(12)))

        outcomes = asyncio.run(scenario())
        usages = [o for o in outcomes if not isinstance(o, str)]
        # the key's three concurrent requests hold across both gateways: 12 at once cannot all run
        assert usages and "rate_limit_exceeded" in outcomes
        assert set(o for o in outcomes if isinstance(o, str)) == {"rate_limit_exceeded"}
        wait_settled(stores[1])
        totals = stores[1].ledger_totals(account)
        assert totals["requests"] == len(usages)
        assert totals["completion_tokens"] == sum(u.completion_tokens for u in usages) == 32 * len(usages)
        cost = sum(-(-(u.prompt_tokens * 1_000_000 + u.completion_tokens * 2_000_000) // 1_000_000) for u in usages)
        acct = stores[0].get_account(account)
        assert acct.reserved == 0 and acct.balance == balance - cost
    for store in stores:
        store.close()


def llama_server() -> str | None:
    """llama.cpp's ``llama-server``: in ``$LLAMA_CPP_BIN`` (a folder), on PATH, or built in the cache
    (``python bench/llama_cpp_tools.py`` builds it there)."""
    import glob
    import os
    import shutil
    from pathlib import Path

    folder = os.environ.get("LLAMA_CPP_BIN")
    if folder and os.access(Path(folder) / "llama-server", os.X_OK):
        return str(Path(folder) / "llama-server")
    if found := shutil.which("llama-server"):
        return found
    cache = Path(os.environ.get("OPENGLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "openglm")
    built = sorted(glob.glob(str(cache / "llama-cpp" / "src-*" / "build" / "bin" / "llama-server")))
    return built[-1] if built else None


def start_llama_server(checkpoint, tmp_path, slots: int = 4, context: int = 1024):
    """(process, url) of llama.cpp's ``llama-server`` on ``checkpoint`` exported to GGUF, healthy, behind
    the worker key; skips (fails under ``OPENGLM_REQUIRE_LLAMA_SERVER=1``, as in CI) where none is built."""
    import os
    import subprocess
    import sys

    from live_server import free_port

    binary = llama_server()
    if binary is None:
        message = ("no llama-server: set $LLAMA_CPP_BIN to a folder holding llama.cpp's tools, or build them "
                   "with `python bench/llama_cpp_tools.py` (as .ci/run does)")
        if os.environ.get("OPENGLM_REQUIRE_LLAMA_SERVER") == "1":
            pytest.fail(message + ", and OPENGLM_REQUIRE_LLAMA_SERVER=1")
        pytest.skip(message)
    gguf = tmp_path / "tiny.gguf"
    subprocess.run([sys.executable, "-m", "openglm", "convert", str(checkpoint), "--to", "gguf", "--gguf-type",
                    "f32", "-o", str(gguf)], check=True, capture_output=True)
    port = free_port()
    llama = subprocess.Popen([binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", "tiny",
                              "-t", "1", "-np", str(slots), "-c", str(context), "--api-key", WORKER_KEY],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if llama.poll() is not None or time.monotonic() > deadline:
            llama.kill()
            pytest.fail("llama-server did not start")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return llama, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


@pytest.mark.slow
def test_gateway_over_a_worker_and_a_llama_server(tiny_checkpoint, tmp_path):
    from openai import AsyncOpenAI
    from openglm.serve.store import Store

    llama, llama_url = start_llama_server(tiny_checkpoint, tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    store.set_price("tiny", 1_000_000, 2_000_000)
    account, secret = new_key(store)
    try:
        with LiveServer(worker_app(tiny_checkpoint)) as worker, \
                LiveServer(gateway_app([llama_url, worker.url], store)) as gw:

            async def one(client, i: int):
                if i % 3 == 0:
                    answer = await client.completions.create(model="tiny", prompt=f"The General {i}", max_tokens=16,
                                                             temperature=0)
                    return answer.choices[0].text, answer.usage
                if i % 3 == 1:
                    answer = await client.chat.completions.create(**chat_body(False, 16))
                    return answer.choices[0].message.content, answer.usage
                chunks = [c async for c in await client.chat.completions.create(**chat_body(True, 16))]
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

            async def scenario():
                async with AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=60) as c:
                    return await asyncio.gather(*(one(c, i) for i in range(12)))

            results = asyncio.run(scenario())
            served = {u["url"]: u["requests"] for u in httpx.get(
                gw.url + "/admin/upstreams", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]}
        assert served[llama_url] > 0 and served[worker.url] > 0 and sum(served.values()) == 12
        assert all(text and usage.completion_tokens == 16 for text, usage in results)
        wait_settled(store)
        totals = store.ledger_totals(account)
        assert totals["requests"] == 12
        assert totals["completion_tokens"] == 12 * 16
        assert totals["prompt_tokens"] == sum(usage.prompt_tokens for _, usage in results)
    finally:
        llama.terminate()
        llama.wait(30)
        store.close()


def test_gateway_bills_a_cut_stream_for_what_its_client_received(tmp_path):
    from openai import APIError, OpenAI
    from openglm.serve.store import Store

    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    account, secret = new_key(store)
    with PortServer(broken_upstream(3)) as bad, LiveServer(gateway_app([bad.url], store)) as gw:
        got = []
        with pytest.raises(APIError, match="upstream failed mid-stream"):
            for chunk in OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0).chat.completions.create(
                    **chat_body(True)):
                got.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "t0 t1 t2 "
    usage = got[-1].usage  # sent before the error event: what the request is billed
    assert usage.completion_tokens == 3  # no usage upstream, no tokenizer here for "tiny": a token per chunk
    wait_settled(store)
    totals = store.ledger_totals(account)
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == \
        (1, usage.prompt_tokens, 3)
    store.close()


def test_openglm_serve_upstream_starts_a_gateway_with_a_demo_key(tiny_checkpoint, tmp_path):
    import re

    from openai import OpenAI

    for bad, message in ((["--upstream", "localhost:8001"], "not an http:// or https:// URL"),
                         (["--upstream", "http://127.0.0.1:9", "--model", "glm-tiny"], "do not go with --upstream")):
        done = Process("serve", *bad, "--db", f"sqlite:///{tmp_path / 'bad.db'}")
        assert done.proc.wait(60) == 1
        output = done.proc.stdout.read()
        assert output.startswith("openglm: error: ") and message in output and "Traceback" not in output
    with LiveServer(worker_app(tiny_checkpoint)) as worker:
        gateway = Process("serve", "--upstream", worker.url, "--upstream-key", WORKER_KEY, "--db",
                          f"sqlite:///{tmp_path / 'gw.db'}")
        try:
            key = None
            for line in gateway.proc.stdout:  # an empty database: the demo account, priced for the upstream's model
                if m := re.match(r"API key: (\S+)", line):
                    key = m.group(1)
                    break
            assert key, "the gateway printed no demo key"
            gateway.wait_healthy()
            answer = OpenAI(base_url=gateway.url + "/v1", api_key=key).chat.completions.create(**chat_body(False))
            assert answer.usage.completion_tokens == 8
        finally:
            gateway.stop()


def test_gateway_counts_tokens_itself_where_the_model_is_ours(tmp_path):
    from openai import APIError, BadRequestError, OpenAI
    from openglm import load_tokenizer
    from openglm.model.checkpoint import checkpoint_dir
    from openglm.serve.store import Store

    ours = "glm-tiny-chat"  # a bundled checkpoint: the gateway reads its tokenizer
    tokenizer = load_tokenizer(checkpoint_dir(ours))
    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    account, secret = new_key(store)
    body = {**chat_body(True), "model": ours}
    with LiveServer(worker_app(checkpoint_dir(ours), name=ours)) as worker, \
            LiveServer(gateway_app([worker.url], store)) as gw:
        client = OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
        # the prompt is counted exactly: one that leaves no room in the worker's 256 positions is refused here
        with pytest.raises(BadRequestError, match="exceeds the model's context of 256"):
            client.chat.completions.create(**{**body, "stream": False, "max_tokens": 250})
        upstreams = httpx.get(gw.url + "/admin/upstreams", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
        assert upstreams["data"][0]["requests"] == 0  # never forwarded
        usage = list(client.chat.completions.create(**body))[-1].usage
        wait_settled(store)
        assert store.ledger_totals(account)["prompt_tokens"] == usage.prompt_tokens
    # a stream cut without usage: its completion counted with the model's tokenizer, not per chunk
    store.close()
    store = Store(f"sqlite:///{tmp_path / 'cut.db'}")
    account, secret = new_key(store)
    with PortServer(broken_upstream(3, model=ours)) as bad, LiveServer(gateway_app([bad.url], store)) as gw:
        got = []
        with pytest.raises(APIError):
            for chunk in OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0).chat.completions.create(
                    **body):
                got.append(chunk)
    assert got[-1].usage.completion_tokens == len(tokenizer.encode("t0 t1 t2 ")) != 3
    wait_settled(store)
    assert store.ledger_totals(account)["completion_tokens"] == got[-1].usage.completion_tokens
    store.close()


def test_tenants_behind_a_gateway_do_not_share_cached_prompt_prefixes(tiny_checkpoint, tmp_path):
    # Every request reaches the worker under its one key; the gateway's cache_salt keeps another
    # account's prompt from being served faster from the cache (a timing side channel).
    from openglm.serve.store import Store

    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    _, secret_a = new_key(store)
    _, secret_b = new_key(store)
    app = worker_app(tiny_checkpoint)
    with LiveServer(app) as worker, LiveServer(gateway_app([worker.url], store)) as gw:
        engine = app.state.services.backend.engine
        body = {"model": "tiny", "prompt": "The General Language Model fills in blanks", "max_tokens": 2}
        reused = []
        for secret in (secret_a, secret_b, secret_a):
            r = httpx.post(gw.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {secret}"},
                           timeout=60)
            assert r.status_code == 200, r.text
            reused.append(engine.core.prefix_tokens)
        salted = httpx.post(gw.url + "/v1/completions", json=body | {"cache_salt": "mine"},
                            headers={"Authorization": f"Bearer {secret_a}"}, timeout=60)
        assert salted.status_code == 200, salted.text
    assert reused[0] == reused[1] == 0 < reused[2]
    assert engine.core.prefix_tokens == reused[2]  # a salt of its own: the account's cache is not used
