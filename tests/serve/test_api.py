"""The HTTP API against a real server on loopback: OpenAI and Zhipu routes, billing, limits, admin, metrics."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest
from live_server import serving, sse_events


@pytest.fixture(scope="module")
def live(tiny_checkpoint, tmp_path_factory):
    """One server on SQLite for the tests that only read or use their own request ids."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'api.db'}"
    with serving(tiny_checkpoint, url, admin_key="admin-secret") as (server, store, secret, account_id):
        yield server, store, secret, account_id


def client(server, secret):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "The General Language Model"}],
        "max_tokens": 8, "temperature": 0}


def test_health_models_page_and_metrics(live):
    server, *_ = live
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/health").json() == {"status": "ok", "model": "tiny"}
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]
        assert c.get("/v1/models/other").status_code == 404
        page = c.get("/")
        # The chat page is self-contained: it streams from this server and loads nothing from elsewhere.
        assert page.status_code == 200 and "v1/chat/completions" in page.text and "://" not in page.text
        metrics = c.get("/metrics").text
        for name in ("openglm_num_requests_running", "openglm_num_requests_waiting", "openglm_prompt_tokens_total",
                     "openglm_generation_tokens_total", "openglm_time_to_first_token_seconds",
                     "openglm_inter_token_latency_seconds", "openglm_e2e_request_latency_seconds",
                     "openglm_request_queue_time_seconds"):
            assert name in metrics


def test_chat_bills_the_usage_it_reports(live):
    server, store, secret, account_id = live
    before_balance = store.get_account(account_id).balance
    before = store.ledger_totals(account_id)
    with client(server, secret) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    assert usage["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    after = store.ledger_totals(account_id)
    assert after["prompt_tokens"] - before["prompt_tokens"] == usage["prompt_tokens"]
    assert after["completion_tokens"] - before["completion_tokens"] == 8
    cost = -(-(usage["prompt_tokens"] * 1_000_000 + 8 * 2_000_000) // 1_000_000)
    assert before_balance - store.get_account(account_id).balance == cost == after["cost"] - before["cost"]
    assert store.open_reservations(account_id) == []


def test_stream_matches_non_stream_and_reports_usage(live):
    server, _, secret, _ = live
    with client(server, secret) as c:
        whole = c.post("/v1/chat/completions", json=CHAT).json()
        with c.stream("POST", "/v1/chat/completions",
                      json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk, _ = events
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_n_prompts_logprobs_and_stop(live):
    server, _, secret, _ = live
    with client(server, secret) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": ["The General", "It reads"], "n": 2,
                                            "max_tokens": 6, "temperature": 0.9, "seed": 3, "logprobs": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
        assert body["usage"]["completion_tokens"] == sum(len(ch["logprobs"]["tokens"]) for ch in body["choices"])
        first = body["choices"][0]["logprobs"]
        # top_logprobs maps text to logprob (OpenAI's shape): two tokens may decode to the same text
        assert all(lp <= 0 for lp in first["token_logprobs"]) and all(1 <= len(t) <= 2 for t in first["top_logprobs"])
        # Greedy text, then the same request stopped at a piece of it.
        greedy = c.post("/v1/completions", json={"model": "tiny", "prompt": "The General", "max_tokens": 12,
                                                 "temperature": 0}).json()["choices"][0]["text"]
        stop = greedy[len(greedy) // 2:][:3]
        cut = c.post("/v1/completions", json={"model": "tiny", "prompt": "The General", "max_tokens": 12,
                                              "temperature": 0, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == greedy[:greedy.index(stop)] and cut["finish_reason"] == "stop"


def test_embeddings_and_infill(live):
    server, _, secret, _ = live
    with client(server, secret) as c:
        floats = c.post("/v1/embeddings", json={"model": "tiny", "input": ["blank infilling", "text"]}).json()
        packed = c.post("/v1/embeddings", json={"model": "tiny", "input": "blank infilling",
                                                "encoding_format": "base64"}).json()
        filled = c.post("/v1/infill", json={"model": "tiny", "prompt": "The model fills [MASK] in text.",
                                            "max_tokens": 5, "temperature": 0})
    vectors = [d["embedding"] for d in floats["data"]]
    assert len(vectors) == 2 and abs(sum(x * x for x in vectors[0]) - 1) < 1e-4 and vectors[0] != vectors[1]
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vectors[0], abs=1e-5)
    assert floats["usage"]["prompt_tokens"] > packed["usage"]["prompt_tokens"] > 0
    assert filled.status_code == 200, filled.text
    body = filled.json()
    assert len(body["spans"]) == 1 and body["text"] == "The model fills " + body["spans"][0] + " in text."
    assert 0 < body["usage"]["completion_tokens"] <= 5


def test_zhipu_route_request_id_is_charged_once(live):
    server, store, secret, account_id = live
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "request_id": "zhipu-req-0001",
            "do_sample": False, "max_tokens": 4, "user_id": "user-123456"}
    with client(server, secret) as c:
        first = c.post("/api/paas/v4/chat/completions", json=body)
        requests = store.ledger_totals(account_id)["requests"]
        again = c.post("/api/paas/v4/chat/completions", json=body)
        unknown = c.post("/api/paas/v4/chat/completions", json={**body, "model": "glm-5", "request_id": "x" * 8})
        bad = c.post("/api/paas/v4/chat/completions", json={**body, "messages": []})
    assert first.status_code == 200 and first.json()["request_id"] == "zhipu-req-0001"
    assert again.status_code == 400 and again.json() == {"error": {"code": "1231", "message": again.json()["error"]
                                                                   ["message"]}}
    assert store.ledger_totals(account_id)["requests"] == requests
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "1211"
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "1210"


def test_errors_use_openai_objects_and_statuses(live):
    server, _, secret, _ = live
    with client(server, secret) as c:
        cases = {
            "no key": (httpx.post(server.url + "/v1/chat/completions", json=CHAT), 401, "invalid_api_key"),
            "bad key": (httpx.post(server.url + "/v1/chat/completions", json=CHAT,
                                   headers={"Authorization": "Bearer sk-glm-nope"}), 401, "invalid_api_key"),
            "unknown model": (c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "model_not_found"),
            "too long": (c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10**9}), 400,
                         "context_length_exceeded"),
            "wrong type": (c.post("/v1/chat/completions", json={**CHAT, "temperature": "hot"}), 422, "invalid_value"),
            "empty messages": (c.post("/v1/chat/completions", json={**CHAT, "messages": []}), 422, "invalid_value"),
            "bad role": (c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "x", "content": "a"}]}),
                         422, "invalid_value"),
            "malformed": (c.post("/v1/chat/completions", content=b'{"model": ', headers={
                "content-type": "application/json"}), 400, None),
            "not utf-8": (c.post("/v1/chat/completions", content=b'{"model": "\xff\xfe"}', headers={
                "content-type": "application/json"}), 400, None),
            "10 MB": (c.post("/v1/chat/completions", content=b" " * 10_000_000, headers={
                "content-type": "application/json"}), 413, "body_too_large"),
            "no route": (c.get("/v1/nothing"), 404, None),
        }
    for name, (r, status, code) in cases.items():
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], name
        assert error["code"] == code, name
    with client(server, secret) as c:  # the server is still fine
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_balance_rate_limits_and_headers(tiny_checkpoint, db_url):
    with serving(tiny_checkpoint, db_url, balance=60, rpm=2) as (server, store, secret, account_id):
        with client(server, secret) as c:
            ok = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
            assert ok.status_code == 200, ok.text
            assert ok.headers["x-ratelimit-limit-requests"] == "2"
            assert ok.headers["x-ratelimit-remaining-requests"] == "1"
            # Refused requests do not count against the rate limit. Worst case: prompt + 200 completion
            # tokens cost more than the balance left.
            broke = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 200})
            assert broke.status_code == 429 and broke.json()["error"]["type"] == "insufficient_quota"
            zhipu = c.post("/api/paas/v4/chat/completions", json={**CHAT, "max_tokens": 200})
            assert zhipu.status_code == 429 and zhipu.json()["error"]["code"] == "1113"
            assert c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4}).status_code == 200
            limited = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
            assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(limited.headers["retry-after"]) >= 1
            assert limited.headers["x-ratelimit-remaining-requests"] == "0"
            usage = c.get("/v1/usage").json()
        assert store.get_account(account_id).balance >= 0
        assert usage["balance"] == store.get_account(account_id).balance
        assert sum(row["requests"] for row in usage["usage"]) == 2
        assert sum(row["cost"] for row in usage["usage"]) == 60 - usage["balance"]


def test_admin_routes(live):
    server, store, secret, _ = live
    admin = {"Authorization": "Bearer admin-secret"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/admin/accounts").status_code == 401
        assert c.get("/admin/accounts", headers={"Authorization": f"Bearer {secret}"}).status_code == 403
        account = c.post("/admin/accounts", json={"name": "acme", "balance": 5}, headers=admin).json()
        assert c.post(f"/admin/accounts/{account['id']}/top-up", json={"amount": 10},
                      headers=admin).json()["balance"] == 15
        key = c.post("/admin/keys", json={"account_id": account["id"], "rpm": 5}, headers=admin).json()
        assert key["secret"].startswith("sk-glm-") and key["rpm"] == 5
        assert key["id"] in [k["id"] for k in c.get("/admin/keys", headers=admin).json()]
        assert c.put("/admin/prices/tiny2", json={"input_per_million": 3, "output_per_million": 4},
                     headers=admin).status_code == 200
        assert c.get("/admin/prices/tiny2", headers=admin).json()["output_per_million"] == 4
        assert c.get("/admin/ledger", headers=admin).json() == store.ledger_totals()
        assert c.get("/admin/accounts/999999", headers=admin).status_code == 404
        assert c.delete(f"/admin/keys/{key['id']}", headers=admin).status_code == 200
        revoked = c.get("/v1/usage", headers={"Authorization": f"Bearer {key['secret']}"})
        assert revoked.status_code == 401
