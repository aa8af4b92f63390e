"""Faults and load: clients that leave, many clients on one budget, replicas on one database, kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from live_server import ServerProcess, serving

PROMPT = "The General Language Model"


def wait_settled(store, account_id, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while store.open_reservations(account_id):
        assert time.monotonic() < deadline, "a reservation was left open"
        time.sleep(0.05)


def metric(server_url: str, name: str) -> float:
    for line in httpx.get(server_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_client_disconnect_bills_the_tokens_generated(tiny_checkpoint, tmp_path, capfd):
    with serving(tiny_checkpoint, f"sqlite:///{tmp_path / 'cut.db'}", max_seq_len=320,
                 app_options={"public_metrics": True}) as (server, store, secret, aid):
        auth = {"Authorization": f"Bearer {secret}"}
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 300, "temperature": 0}
        durations = []
        for _ in range(2):  # the faster of two: a slow first run would put the timeout below past the end
            started = time.monotonic()
            full = httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=120).json()["usage"]
            durations.append(time.monotonic() - started)
        whole = min(durations)
        before = store.ledger_totals(aid)
        generated = metric(server.url, "openglm_generation_tokens_total")
        received = 0
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=auth,
                          timeout=60) as r:
            for line in r.iter_lines():
                received += line.startswith("data: ")
                if received == 3:
                    break  # leaving the block closes the connection mid-stream
        wait_settled(store, aid)
        billed = store.ledger_totals(aid)["completion_tokens"] - before["completion_tokens"]
        # Billed: what the engine generated before it saw the cancel; fewer than the whole answer.
        assert 3 <= billed < full["completion_tokens"]
        assert metric(server.url, "openglm_generation_tokens_total") - generated == billed
        assert metric(server.url, "openglm_num_requests_running") == 0  # the slot is free

        # A non-streamed request whose client gives up is stopped and billed the same way.
        before = store.ledger_totals(aid)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=whole / 4)  # mid-generation
        wait_settled(store, aid)
        assert 0 < store.ledger_totals(aid)["completion_tokens"] - before["completion_tokens"] < full["completion_tokens"]
        assert store.get_account(aid).reserved == 0
    assert "Traceback" not in capfd.readouterr().err  # a client that leaves is no server error


async def _clients(urls: list[str], secret: str, clients: int, requests: int, body: dict) -> list[httpx.Response]:
    """``clients`` concurrent clients, each sending ``requests`` requests in turn (client i to ``urls[i % len]``)."""
    async def one(i: int, c: httpx.AsyncClient) -> list[httpx.Response]:
        url = urls[i % len(urls)] + "/v1/chat/completions"
        return [await c.post(url, json={**body, "seed": i * requests + k}) for k in range(requests)]

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {secret}"}, timeout=300, limits=limits) as c:
        results = await asyncio.gather(*(one(i, c) for i in range(clients)))
    return [r for rs in results for r in rs]


def check_books(responses, store, account_id: int, balance: int) -> list[httpx.Response]:
    """Every answer is a success or a 429; the ledger holds exactly the usage the clients got; returns the successes."""
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert all(r.status_code == 429 for r in refused), {r.status_code: r.text for r in refused}
    assert {r.json()["error"]["code"] for r in refused} <= {"insufficient_quota", "rate_limit_exceeded"}
    totals = store.ledger_totals(account_id)
    assert totals["requests"] == len(ok)
    assert totals["prompt_tokens"] == sum(r.json()["usage"]["prompt_tokens"] for r in ok)
    assert totals["completion_tokens"] == sum(r.json()["usage"]["completion_tokens"] for r in ok)
    account = store.get_account(account_id)
    assert account.reserved == 0 and store.open_reservations(account_id) == []
    assert account.balance == balance - totals["cost"] >= 0
    print(f"{len(responses)} requests: {len(ok)} answered, {len(refused)} refused with 429; ledger "
          f"{totals['requests']} requests, {totals['prompt_tokens']} + {totals['completion_tokens']} tokens = the "
          f"clients' usage; cost {totals['cost']} of {balance}, balance {account.balance}, reserved {account.reserved}")
    return ok


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["engine in the server's process", "engine in its own process"])
def test_32_clients_on_one_budget(tiny_checkpoint, db_url, engine):
    # Each request costs about 15 units: the budget runs out after ~80, the rate limit after 100.
    balance = 1200
    with serving(tiny_checkpoint, db_url, max_batch_size=16, balance=balance, rpm=100,
                 engine_process="own" in engine) as (server, store, secret, aid):
        responses = asyncio.run(_clients([server.url], secret, 32, 10, CHAT))
        ok = check_books(responses, store, aid, balance)
    assert 0 < len(ok) <= 100
    assert any(r.json()["error"]["code"] == "insufficient_quota" for r in responses if r.status_code == 429)


@pytest.mark.slow
def test_two_servers_on_one_postgres_never_overspend(tiny_checkpoint, postgres_url):
    from openglm.serve.store import Store

    balance = 600
    with Store(postgres_url) as store:
        store.set_price("tiny", 1_000_000, 2_000_000)
        account = store.create_account("shared", balance)
        _, secret = store.create_key(account.id)
        servers = [ServerProcess(tiny_checkpoint, postgres_url, "--max-batch-size", "8") for _ in range(2)]
        try:
            for s in servers:
                s.wait_ready()
            responses = asyncio.run(_clients([s.url for s in servers], secret, 16, 5, CHAT))
        finally:
            for s in servers:
                s.stop()
        ok = check_books(responses, store, account.id, balance)
    assert ok and len(ok) < len(responses)  # the budget ran out, and no replica went past it


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["engine in its own process", "engine in the server's process"])
def test_kill_9_under_load_then_restart_bills_what_was_sent(tiny_checkpoint, tmp_path, engine):
    import sqlalchemy

    from openglm.serve.services.billing import RECORD_LAG
    from openglm.serve.db import usage
    from openglm.serve.store import Store

    url = f"sqlite:///{tmp_path / 'kill.db'}"
    balance, clients, max_tokens = 10**9, 8, 400
    with Store(url) as store:
        store.set_price("tiny", 1_000_000, 2_000_000)
        account = store.create_account("load", balance)
        _, secret = store.create_key(account.id)
    args = ["--engine-in-process"] if "server's" in engine else []
    sent = [0] * clients  # tokens each client received before the kill
    ids = [None] * clients  # each request's id, as its response names it

    async def load(server_url: str) -> None:
        async def one(i: int, c: httpx.AsyncClient) -> None:
            # logprobs: one event per token, so the client counts every token it was sent
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "logprobs": 0}
            try:
                async with c.stream("POST", server_url + "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            ids[i] = chunk["id"].removeprefix("cmpl-")
                            sent[i] += sum(len(c["logprobs"]["tokens"]) for c in chunk["choices"] if c["logprobs"])
            except httpx.HTTPError:  # the server died under us
                pass

        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {secret}"}, timeout=60) as c:
            await asyncio.gather(*(one(i, c) for i in range(clients)))

    server = ServerProcess(tiny_checkpoint, url, *args)

    async def kill_mid_load():
        task = asyncio.create_task(load(server.url))
        deadline = time.monotonic() + 120  # every client well past what may go unrecorded, then kill
        while min(sent) < RECORD_LAG + 16 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        server.kill()
        await task

    try:
        server.wait_ready()
        engines = server.children()  # the engine's process (and multiprocessing's resource tracker)
        if not args:
            assert server.engine_pid() in engines
        asyncio.run(kill_mid_load())
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert min(sent) >= RECORD_LAG + 16 and max(sent) < max_tokens, sent  # killed mid-stream, every one
    deadline = time.monotonic() + 30  # the orphaned engine sees its pipe close and exits
    while any(_running(pid) for pid in engines) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in engines)
    with Store(url) as store:
        hanging = store.open_reservations(account.id)
        assert len(hanging) == clients  # left hanging by the dead server
    restarted = ServerProcess(tiny_checkpoint, url, *args)
    try:
        restarted.wait_ready()
        r = httpx.post(restarted.url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3},
                       headers={"Authorization": f"Bearer {secret}"}, timeout=60)
        assert r.status_code == 200
    finally:
        log = restarted.stop()
    assert f"recovered the requests of a server that stopped: {clients} billed" in log, log
    db = sqlalchemy.create_engine(url)
    with db.connect() as conn:
        billed = dict(conn.execute(sqlalchemy.select(usage.c.request_id, usage.c.completion_tokens)
                                   .where(usage.c.finish_reason == "interrupted")).all())
    db.dispose()
    # Each request is billed for what its client was sent, less at most RECORD_LAG tokens not yet
    # recorded, and never for more than its reservation held.
    pairs = [(billed.get(rid, 0), n) for rid, n in zip(ids, sent)]
    assert all(n - RECORD_LAG <= b <= max_tokens for b, n in pairs), pairs
    with Store(url) as store:
        account_now = store.get_account(account.id)
        assert store.open_reservations(account.id) == [] and account_now.reserved == 0
        assert account_now.balance == balance - store.ledger_totals(account.id)["cost"]
    print(f"{engine}: killed with {len(hanging)} streams open; (billed, sent) tokens per request after the "
          f"restart: {pairs}; sent - billed at most {max(n - b for b, n in pairs)} (bound {RECORD_LAG})")


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped has exited)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_dead_engine_process_stops_the_server_with_an_error(tiny_checkpoint, tmp_path):
    server = ServerProcess(tiny_checkpoint, f"sqlite:///{tmp_path / 'engine.db'}")
    try:
        server.wait_ready()
        os.kill(server.engine_pid(), signal.SIGKILL)
        code = server.proc.wait(60)
    finally:
        if server.proc.poll() is None:
            server.kill()
    out = server.proc.stdout.read()
    assert code != 0 and "the engine process exited unexpectedly (exit code -9)" in out
    assert "Traceback" not in out
