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


def broken_upstream(tokens_before_break: int, status: int = 200):
    """A real HTTP server that looks healthy (``/health``, ``/v1/models`` serving "tiny", many free
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
            return await reply(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
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

        text, usage, chunks_from, bad_healthy = run_pool([bad.url, good.url], scenario)
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
