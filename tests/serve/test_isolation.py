"""One client against the others: no account sees another's tokens, and no request stalls the server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from live_server import serving

ZHIPU = "/api/paas/v4/chat/completions"
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
                   "do_sample": False, "stream": stream} for content in ("The General Language Model", "通用语言模型")]
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
