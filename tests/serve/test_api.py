"""The HTTP API against a real server on loopback: OpenAI and Zhipu routes, billing, limits, admin, metrics."""

from __future__ import annotations

import base64
import json
import re
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


METRICS = ("openglm_num_requests_running", "openglm_num_requests_waiting", "openglm_prompt_tokens_total",
           "openglm_generation_tokens_total", "openglm_time_to_first_token_seconds",
           "openglm_inter_token_latency_seconds", "openglm_e2e_request_latency_seconds",
           "openglm_request_queue_time_seconds")


def test_every_api_route_needs_a_key_and_metrics_and_spec_an_admin_key(live):
    server, store, secret, account_id = live
    _, narrow = store.create_key(account_id, models=["other"])
    with httpx.Client(base_url=server.url) as c:
        # Public: liveness and the chat page (which loads nothing from elsewhere: it streams from this server).
        assert c.get("/health").json() == {"status": "ok", "model": "tiny"}
        page = c.get("/")
        assert page.status_code == 200 and "static/app.js" in page.text and "://" not in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert "v1/chat/completions" in c.get("/static/app.js").text
        for path in ("/v1/models", "/v1/models/tiny", "/v1/usage"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        user, admin = {"Authorization": f"Bearer {secret}"}, {"Authorization": "Bearer admin-secret"}
        assert [m["id"] for m in c.get("/v1/models", headers=user).json()["data"]] == ["tiny"]
        assert c.get("/v1/models/tiny", headers=user).json()["id"] == "tiny"
        assert c.get("/v1/models/other", headers=user).status_code == 404
        # A key limited to other models neither lists nor finds this one.
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {narrow}"}).json()["data"] == []
        assert c.get("/v1/models/tiny", headers={"Authorization": f"Bearer {narrow}"}).status_code == 404
        # Metrics and the spec: the admin key only; no docs page, no ReDoc.
        for path in ("/metrics", "/openapi.json"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=user).status_code == 403, path
        assert all(name in c.get("/metrics", headers=admin).text for name in METRICS)
        assert "/v1/chat/completions" in c.get("/openapi.json", headers=admin).json()["paths"]
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert c.get(path, headers=admin).status_code == 404, path


def test_public_metrics_and_docs_load_nothing_from_the_network(tiny_checkpoint, tmp_path):
    with serving(tiny_checkpoint, f"sqlite:///{tmp_path / 'docs.db'}", engine_process=False,
                 app_options={"public_metrics": True, "docs": True}) as (server, *_):
        with httpx.Client(base_url=server.url) as c:
            assert all(name in c.get("/metrics").text for name in METRICS)
            spec = c.get("/openapi.json").json()
            docs = c.get("/docs")
            assets = re.findall(r'(?:href|src)="([^"]+)"', docs.text)
            fetched = {a: c.get("/" + a) for a in assets}
    assert docs.status_code == 200 and "://" not in docs.text
    # Swagger UI's own files, served from here; and no spec validator call to validator.swagger.io.
    assert sorted(assets) == ["docs/assets/favicon-32x32.png", "docs/assets/swagger-ui-bundle.js",
                              "docs/assets/swagger-ui.css"]
    assert all(r.status_code == 200 and r.content for r in fetched.values())
    assert '"validatorUrl": null' in docs.text and "url: 'openapi.json'" in docs.text
    # The spec declares the 400 that bad input gets, not FastAPI's 422.
    responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "400" in responses and "422" not in responses and "HTTPValidationError" not in spec["components"]["schemas"]


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
        huge = c.post("/api/paas/v4/chat/completions", content=b" " * 2_000_000,
                      headers={"content-type": "application/json"})
    assert first.status_code == 200 and first.json()["request_id"] == "zhipu-req-0001"
    assert again.status_code == 400 and again.json() == {"error": {"code": "1231", "message": again.json()["error"]
                                                                   ["message"]}}
    assert store.ledger_totals(account_id)["requests"] == requests
    # Zhipu's statuses: an unknown model and a bad parameter are both 400, with Zhipu's codes.
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "1211"
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "1214"
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "1210"  # Zhipu has no 413 for a body


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
            # Validation errors are 400 invalid_request_error naming the parameter, as OpenAI sends them.
            "wrong type": (c.post("/v1/chat/completions", json={**CHAT, "temperature": "hot"}), 400, "invalid_type"),
            "empty messages": (c.post("/v1/chat/completions", json={**CHAT, "messages": []}), 400, "invalid_value"),
            "bad role": (c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "x", "content": "a"}]}),
                         400, "invalid_value"),
            "no model": (c.post("/v1/chat/completions", json={"messages": CHAT["messages"]}), 400,
                         "missing_required_parameter"),
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
        if status == 400 and code:
            assert error["type"] == "invalid_request_error", name
    assert cases["wrong type"][0].json()["error"]["param"] == "temperature"
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


def _local_port(response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_unpaired_surrogates_are_400_and_keep_the_connection(live):
    """"\\udc80" is valid JSON but not text: every text field answers 400 naming it, on a connection that stays."""
    server, store, secret, account_id = live
    bad = "a\udc80b"
    requests = [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": bad}]}, "messages.0.content"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": bad}]}]},
         "messages.0.content"),
        ("/v1/chat/completions", {**CHAT, "stop": [bad]}, "stop"),
        ("/v1/chat/completions", {**CHAT, "model": bad}, "model"),
        ("/v1/completions", {"model": "tiny", "prompt": bad, "max_tokens": 2}, "prompt"),
        ("/v1/embeddings", {"model": "tiny", "input": [bad]}, "input"),
        ("/v1/infill", {"model": "tiny", "prompt": bad + " [MASK]"}, "prompt"),
        ("/api/paas/v4/chat/completions", {**CHAT, "request_id": bad * 4}, "request_id"),
        ("/api/paas/v4/chat/completions", {**CHAT, "messages": [{"role": "user", "content": bad}]},
         "messages.0.content"),
    ]
    before = store.ledger_totals(account_id)
    with client(server, secret) as c:
        port = _local_port(c.get("/health"))
        for path, body, param in requests:
            # escaped as \udc80, as Python's json.dumps and JavaScript's JSON.stringify send it
            r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert "surrogate" in error["message"] or "unicode" in error["message"], (path, error)
            if path.startswith("/v1/"):
                assert error["param"].startswith(param) and error["type"] == "invalid_request_error", (path, error)
            else:
                assert error["code"] == "1214", error
            assert _local_port(r) == port, path  # the keep-alive connection was not dropped
        # A paired surrogate (an emoji outside the BMP, escaped as \\ud83d\\ude00) is text.
        assert c.post("/v1/chat/completions", json={**CHAT, "messages": [
            {"role": "user", "content": "\U0001f600"}]}).status_code == 200
    assert store.ledger_totals(account_id)["requests"] == before["requests"] + 1


def test_rate_limit_headers_on_every_billed_route(live):
    server, store, _, account_id = live
    _, secret = store.create_key(account_id, rpm=100, tpm=100_000)
    routes = [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 2}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 2, "stream": True}),
        ("/api/paas/v4/chat/completions", {**CHAT, "max_tokens": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": "It reads", "max_tokens": 2}),
        ("/v1/embeddings", {"model": "tiny", "input": "blank infilling"}),
        ("/v1/infill", {"model": "tiny", "prompt": "The model fills [MASK] in text.", "max_tokens": 2}),
    ]
    with client(server, secret) as c:
        for i, (path, body) in enumerate(routes):
            r = c.post(path, json=body)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["x-ratelimit-limit-requests"] == "100", path
            assert r.headers["x-ratelimit-remaining-requests"] == str(100 - i - 1), path
            assert r.headers["x-ratelimit-limit-tokens"] == "100000", path
            assert int(r.headers["x-ratelimit-remaining-tokens"]) < 100_000, path
            assert r.headers["x-ratelimit-reset-requests"].endswith("s"), path
