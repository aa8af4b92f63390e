"""The chat app's API on a live server: conversations (per account, bounded), account, recent requests, own keys."""

from __future__ import annotations

import httpx
import pytest
from live_server import serving


def client(server, secret):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60)


def error_of(response, status) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.fixture
def live(tiny_checkpoint, db_url):
    with serving(tiny_checkpoint, db_url, engine_process=False) as (server, store, secret, account_id):
        yield server, store, secret, account_id


def test_conversations_create_list_get_append_rename_search_delete(live):
    server, store, secret, _ = live
    with client(server, secret) as c:
        made = c.post("/v1/conversations", json={"model": "tiny", "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is  GLM\n infilling?"}]})
        assert made.status_code == 201
        conv = made.json()
        # Untitled: named after the first user message, whitespace folded.
        assert conv["title"] == "What is GLM infilling?" and conv["model"] == "tiny"
        assert [m["role"] for m in conv["messages"]] == ["system", "user"]
        other = c.post("/v1/conversations", json={"title": "100% _literal_"}).json()
        assert other["title"] == "100% _literal_" and other["messages"] == []

        calls = [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]
        after = c.post(f"/v1/conversations/{conv['id']}/messages", json={"messages": [
            {"role": "assistant", "content": "", "tool_calls": calls}, {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "It fills blanks."}]}).json()
        assert [m["role"] for m in after["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
        assert after["messages"][2]["tool_calls"] == calls
        # keep: an edited question replaces everything from its position on.
        edited = c.post(f"/v1/conversations/{conv['id']}/messages", json={
            "keep": 1, "messages": [{"role": "user", "content": "Edited question"}]}).json()
        assert [m["content"] for m in edited["messages"]] == ["Be brief.", "Edited question"]
        assert c.get(f"/v1/conversations/{conv['id']}").json() == edited

        # Newest first: the appended-to conversation was updated last.
        assert [x["id"] for x in c.get("/v1/conversations").json()["data"]] == [conv["id"], other["id"]]
        renamed = c.patch(f"/v1/conversations/{conv['id']}", json={"title": "Blanks"}).json()
        assert renamed["title"] == "Blanks"

        def search(q):
            return [x["id"] for x in c.get("/v1/conversations", params={"q": q}).json()["data"]]

        assert search("edited QUESTION") == [conv["id"]]  # in a message, any case
        assert search("blank") == [conv["id"]]  # in the title
        assert search("100%") == [other["id"]] and search("0% _l") == [other["id"]]
        assert search("%") == [other["id"]] and search("_") == [other["id"]]  # wildcards are literal
        assert search("nowhere") == []

        deleted = c.delete(f"/v1/conversations/{conv['id']}")
        assert deleted.json() == {"id": conv["id"], "object": "conversation.deleted", "deleted": True}
        assert error_of(c.get(f"/v1/conversations/{conv['id']}"), 404)["code"] == "conversation_not_found"
        assert error_of(c.delete(f"/v1/conversations/{conv['id']}"), 404)["code"] == "conversation_not_found"
        assert [x["id"] for x in c.get("/v1/conversations").json()["data"]] == [other["id"]]


def test_a_conversation_is_invisible_to_another_account(live):
    server, store, secret, _ = live
    stranger = store.create_account("stranger", 10**6)
    _, stranger_secret = store.create_key(stranger.id)
    with client(server, secret) as mine, client(server, stranger_secret) as theirs:
        conv = mine.post("/v1/conversations", json={"messages": [{"role": "user", "content": "secret plans"}]}).json()
        cid = conv["id"]
        for response in (theirs.get(f"/v1/conversations/{cid}"),
                         theirs.patch(f"/v1/conversations/{cid}", json={"title": "mine now"}),
                         theirs.post(f"/v1/conversations/{cid}/messages",
                                     json={"messages": [{"role": "user", "content": "hi"}]}),
                         theirs.delete(f"/v1/conversations/{cid}")):
            assert error_of(response, 404)["message"] == f"no conversation {cid!r}"  # as if it never existed
        assert theirs.get("/v1/conversations").json()["data"] == []
        assert theirs.get("/v1/conversations", params={"q": "secret"}).json()["data"] == []
        assert mine.get(f"/v1/conversations/{cid}").json() == conv  # untouched


def test_conversation_routes_refuse_bad_input_with_error_objects(live, monkeypatch):
    from openglm.serve import conversations

    server, store, secret, _ = live
    with httpx.Client(base_url=server.url) as anonymous:
        assert error_of(anonymous.get("/v1/conversations"), 401)["code"] == "invalid_api_key"
        assert anonymous.post("/v1/conversations", json={}).status_code == 401
    with client(server, "sk-glm-wrong") as wrong:
        assert error_of(wrong.get("/v1/conversations"), 401)["code"] == "invalid_api_key"
    with client(server, secret) as c:
        cid = c.post("/v1/conversations", json={}).json()["id"]
        for bad in ({"messages": [{"role": "wizard", "content": "x"}]}, {"messages": "not a list"},
                    {"title": "t" * 201}, {"messages": [{"role": "user", "content": "x" * 200_001}]}):
            response = c.post("/v1/conversations", json=bad)
            assert response.status_code in (400, 422) and response.json()["error"]["message"]
        assert c.post(f"/v1/conversations/{cid}/messages", json={"messages": []}).status_code in (400, 422)
        assert c.post(f"/v1/conversations/{cid}/messages", json={"messages": [], "keep": -1}).status_code in (400, 422)
        assert c.get("/v1/conversations", params={"limit": 0}).status_code in (400, 422)
        assert c.get("/v1/conversations", params={"q": "q" * 201}).status_code in (400, 422)
        # A model's output may hold NUL, which PostgreSQL text cannot: kept as U+FFFD.
        nul = c.post("/v1/conversations", json={"title": "t\x00", "messages": [{"role": "user", "content": "a\x00b"}]})
        assert nul.status_code == 201 and nul.json()["messages"][0]["content"] == "a\ufffdb"
        assert nul.json()["title"] == "t\ufffd"
        assert c.get("/v1/conversations", params={"q": "a\x00b"}).json()["data"][0]["id"] == nul.json()["id"]
        c.delete(f"/v1/conversations/{nul.json()['id']}")
        surrogate = c.post("/v1/conversations", content=b'{"messages": [{"role": "user", "content": "x\\ud800y"}]}',
                           headers={"content-type": "application/json"})
        assert surrogate.status_code in (400, 422) and surrogate.json()["error"]["message"]
        assert error_of(c.post("/v1/conversations", content=b"{not json",
                               headers={"content-type": "application/json"}), 400)["message"]
        assert error_of(c.post("/v1/conversations", json={"title": "x" * 2_000_000}), 413)["code"] == "body_too_large"
        assert c.get("/v1/conversations/" + "x" * 65).status_code in (400, 422)
        assert error_of(c.get("/v1/conversations/%00'--"), 404)["code"] == "conversation_not_found"

        # A conversation and an account are bounded: past the bound, a 400 that says what to do.
        monkeypatch.setattr(conversations, "MAX_MESSAGES", 3)
        monkeypatch.setattr(conversations, "MAX_CONVERSATIONS", 2)
        two = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
        assert c.post(f"/v1/conversations/{cid}/messages", json=two).status_code == 200
        full = error_of(c.post(f"/v1/conversations/{cid}/messages", json=two), 400)
        assert full["code"] == "conversation_too_large" and "start a new one" in full["message"]
        assert len(c.get(f"/v1/conversations/{cid}").json()["messages"]) == 2  # nothing half-written
        assert c.post(f"/v1/conversations/{cid}/messages", json={**two, "keep": 1}).status_code == 200
        c.post("/v1/conversations", json={})
        assert "delete some" in error_of(c.post("/v1/conversations", json={}), 400)["message"]


def test_account_recent_requests_and_own_keys(live):
    server, store, secret, account_id = live
    stranger = store.create_account("stranger", 10**6)
    stranger_key, _ = store.create_key(stranger.id)
    limited, limited_secret = store.create_key(account_id, "limited", rpm=100, tpm=10_000)
    with client(server, secret) as c:
        me = c.get("/v1/account").json()
        assert (me["id"], me["balance"], me["available"]) == (account_id, 10**9, 10**9)
        assert me["key"]["current"] and me["key"]["prefix"] == secret[:13]
        assert c.get("/v1/usage/requests").json()["data"] == []
        chat = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "hi"}]}).json()
        [row] = c.get("/v1/usage/requests").json()["data"]
        assert chat["id"] == "chatcmpl-" + row["request_id"]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (chat["usage"]["prompt_tokens"],
                                                                    chat["usage"]["completion_tokens"])
        assert c.get("/v1/account").json()["balance"] == 10**9 - row["cost"]

        listed = c.get("/v1/keys").json()["data"]
        assert [k["name"] for k in listed] == [None, "limited"] and "secret_hash" not in listed[0]
        assert error_of(c.delete(f"/v1/keys/{stranger_key.id}"), 404)["code"] == "key_not_found"
        assert store.list_keys(stranger.id)[0].revoked_at is None

    with client(server, limited_secret) as c:
        made = c.post("/v1/keys", json={"name": "laptop"})
        assert made.status_code == 201
        new = made.json()
        # The new key inherits the limits of the key that made it, and is never an admin key.
        assert (new["name"], new["rpm"], new["tpm"], new["secret"][:7]) == ("laptop", 100, 10_000, "sk-glm-")
        assert "secret" not in c.get("/v1/keys").json()["data"][-1]
    with client(server, new["secret"]) as fresh:
        assert fresh.get("/v1/account").json()["key"]["id"] == new["id"]
        assert fresh.delete(f"/v1/keys/{new['id']}").json() == {"id": new["id"], "revoked": True}
        assert "revoked" in error_of(fresh.get("/v1/account"), 401)["message"]
        assert error_of(fresh.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}), 401)
