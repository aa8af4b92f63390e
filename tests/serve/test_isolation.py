"""One client against the others: no account sees another's tokens, and no request stalls the server."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from functools import partial

import httpx
import pytest
from live_server import serving

ZHIPU = "/api/paas/v4/chat/completions"
# /health answers in tens of milliseconds beside a long request (it waited seconds to minutes before);
# the margin is for a machine whose cores are busy with other work.
SLOWEST_HEALTH = 1.0
ENGINES = pytest.mark.parametrize("engine_process", [True, False], ids=["engine process", "engine in process"])


def wait_settled(store, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while store.open_reservations():
        assert time.monotonic() < deadline, "a reservation was left open"
        time.sleep(0.05)


async def _zhipu(url: str, secret: str, body: dict) -> tuple[str, dict]:
    """(the reply's text, its usage) of a Zhipu chat request, streamed or not."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {secret}"}, timeout=30) as c:
        if not body.get("stream"):
            r = await c.post(url + ZHIPU, json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"], r.json()["usage"]
        text, usage = [], None
        async with c.stream("POST", url + ZHIPU, json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                usage = chunk.get("usage") or usage
                text += [c["delta"].get("content") or "" for c in chunk["choices"]]
        return "".join(text), usage


@ENGINES
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_two_accounts_sending_the_same_request_id_get_their_own_answers(tiny_checkpoint, tmp_path, engine_process,
                                                                         stream):
    # Zhipu's request_id is the client's text, unique per account only: two accounts may well send the same one.
    with serving(tiny_checkpoint, f"sqlite:///{tmp_path / 'two.db'}", engine_process=engine_process) as (
            server, store, secret_a, account_a):
        account_b = store.create_account("other", 10**9).id
        _, secret_b = store.create_key(account_b)
        bodies = [{"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 48,
                   "do_sample": False, "stream": stream}
                  for content in ("The General Language Model", "通用语言模型")]
        secrets = [secret_a, secret_b]

        async def scenario():
            alone = [await _zhipu(server.url, s, {**b, "request_id": f"alone-{i}-request"})
                     for i, (s, b) in enumerate(zip(secrets, bodies))]
            together = await asyncio.gather(*(_zhipu(server.url, s, {**b, "request_id": "same-request-id"})
                                              for s, b in zip(secrets, bodies)))
            return alone, together

        alone, together = asyncio.run(scenario())
        assert alone[0][0] != alone[1][0]  # the two answers differ, so a mix-up shows
        assert together == alone  # same text, same usage
        wait_settled(store)
        for account, (_, usage) in zip((account_a, account_b), alone):
            assert store.get_account(account).reserved == 0
            # each account paid for its own two answers, and only for those
            assert store.ledger_totals(account)["completion_tokens"] == 2 * usage["completion_tokens"]


def health_during(url: str, request) -> tuple[httpx.Response, list[float]]:
    """``request()``'s response, and the latencies of /health polled from another client meanwhile."""
    latencies, done = [], threading.Event()

    def poll():
        with httpx.Client(base_url=url, timeout=5) as c:
            while not done.is_set():
                started = time.monotonic()
                assert c.get("/health").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        response = request()
    finally:
        time.sleep(0.05)
        done.set()
        poller.join()
    return response, latencies


def _long_chat(messages: int, chars: int) -> dict:
    return {"model": "tiny", "max_tokens": 4, "messages": [
        {"role": ("user", "assistant")[i % 2], "content": f"{i} " + "x" * (chars - 1 - len(str(i)))}
        for i in range(messages)]}


def test_a_long_chat_never_stalls_the_server(tiny_checkpoint, tmp_path):
    # 2048 messages (the most a chat may have), 800 KB of text: once rendered in time quadratic in the
    # message count, on the event loop, which froze every route for the while.
    body = _long_chat(2048, 400)
    with serving(tiny_checkpoint, f"sqlite:///{tmp_path / 'long.db'}", engine_process=False) as (
            server, store, secret, _):
        r, latencies = health_during(server.url, partial(
            httpx.post, server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"},
            timeout=60))
    # Rendered and counted (then refused: it does not fit the test model's context of 256 tokens).
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert len(latencies) > 3 and max(latencies) < SLOWEST_HEALTH, latencies
    print(f"/health during the long chat: {len(latencies)} calls, slowest {max(latencies) * 1000:.0f} ms")


def test_a_refused_key_is_refused_before_its_chat_is_rendered(tiny_checkpoint, tmp_path, monkeypatch):
    from openglm.data import chat

    rendered = []
    render = chat.render_prompt
    monkeypatch.setattr(chat, "render_prompt", lambda *a, **k: rendered.append(1) or render(*a, **k))
    body = _long_chat(2048, 40)
    with serving(tiny_checkpoint, f"sqlite:///{tmp_path / 'refused.db'}", engine_process=False, rpm=1) as (
            server, store, secret, _):
        _, broke = store.create_key(store.create_account("broke", 0).id)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            def post(secret: str, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
                return c.post(path, json=body, headers={"Authorization": f"Bearer {secret}"})

            no_money = post(broke, body)
            zhipu_no_money = post(broke, body, ZHIPU)
            assert post(secret, {**body, "messages": body["messages"][:1]}).status_code == 200  # the minute's one
            assert len(rendered) == 1
            over_rpm = post(secret, body)
            too_many = post(secret, _long_chat(2049, 2))
            too_long = post(secret, _long_chat(2, 500_001))
            zhipu_too_many = post(secret, _long_chat(10_000, 2), ZHIPU)
    assert no_money.status_code == 429 and no_money.json()["error"]["code"] == "insufficient_quota"
    assert zhipu_no_money.status_code == 429 and zhipu_no_money.json()["error"]["code"] == "1113"
    assert over_rpm.status_code == 429 and over_rpm.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" in over_rpm.headers
    for r, what in ((too_many, "2049 messages"), (too_long, "1000002 characters")):
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert what in r.json()["error"]["message"]
    assert zhipu_too_many.status_code == 400 and zhipu_too_many.json()["error"]["code"] == "1210"
    assert len(rendered) == 1  # only the request that ran was rendered


def _words(chars: int, seed: int) -> str:
    """About ``chars`` characters of words never seen before (the tokenizer caches the words it has split)."""
    import random

    rng = random.Random(seed)
    return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 12)))
                    for _ in range(chars // 8))


@pytest.mark.parametrize("funded", [False, True], ids=["no balance", "funded"])
def test_long_prompts_are_tokenized_off_the_event_loop_and_only_for_a_key_that_may_run_them(tiny_checkpoint,
                                                                                           tmp_path, funded):
    with serving(tiny_checkpoint, f"sqlite:///{tmp_path / 'prompts.db'}", engine_process=False) as (
            server, store, secret, _):
        if not funded:
            _, secret = store.create_key(store.create_account("broke", 0).id)
        # 900 KB of text each: a prompt, an embedding input, an infilling prompt
        bodies = {"/v1/completions": {"model": "tiny", "prompt": _words(900_000, 1)},
                  "/v1/embeddings": {"model": "tiny", "input": _words(900_000, 2)},
                  "/v1/infill": {"model": "tiny", "prompt": _words(900_000, 3) + " [MASK]", "max_tokens": 2}}

        for path, body in bodies.items():
            started = time.monotonic()
            r, latencies = health_during(server.url, partial(
                httpx.post, server.url + path, json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=60))
            took = time.monotonic() - started
            if funded:  # tokenized (then refused: longer than the test model's context)
                assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            else:  # refused before any tokenizing
                assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota", r.text
            assert max(latencies) < SLOWEST_HEALTH, (path, latencies)
            print(f"{path}: {r.status_code} in {took:.2f} s; /health at most {max(latencies) * 1000:.0f} ms")


def test_accounts_do_not_share_cached_prompt_prefixes(tiny_checkpoint, tmp_path):
    # A prompt another account sent is prefilled again: a faster first token would tell that it was
    # sent. The same account's own earlier prompt is not.
    with serving(tiny_checkpoint, f"sqlite:///{tmp_path / 'prefix.db'}", engine_process=False) as (
            server, store, secret_a, _):
        _, secret_b = store.create_key(store.create_account("other", 10**9).id)
        engine = server.server.config.app.state.services.backend.engine
        body = {"model": "tiny", "prompt": "The General Language Model fills in blanks", "max_tokens": 2}
        reused = []
        for secret in (secret_a, secret_b, secret_a):
            r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {secret}"},
                           timeout=60)
            assert r.status_code == 200, r.text
            reused.append(engine.core.prefix_tokens)
    assert reused[0] == reused[1] == 0 < reused[2]
