"""Property test: arbitrary JSON strings (lone surrogates, NUL, control and special tokens) in every text field
of every route are answered with a 2xx or a 4xx error object, never a 5xx, on a connection that stays open."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import serving

ADMIN_KEY = "admin-hostile"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
TOOLS = [{"type": "function", "function": {"name": "time", "description": "now",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}]
CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}
REPLY = {"role": "tool", "content": "noon", "tool_call_id": "call_1", "name": "time"}

# (route, body, where the text goes: a path of keys into the body; "*" puts it in a list of one)
FIELDS = [
    ("/v1/chat/completions", CHAT, ("model",)),
    ("/v1/chat/completions", CHAT, ("messages", 0, "content")),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
     ("messages", 0, "content", 0, "text")),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "system", "content": "be brief"}, *CHAT["messages"]]},
     ("messages", 0, "content")),
    ("/v1/chat/completions", CHAT, ("messages", 0, "name")),
    ("/v1/chat/completions", CHAT, ("stop",)),
    ("/v1/chat/completions", CHAT, ("stop", "*")),
    ("/v1/chat/completions", CHAT, ("user",)),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS}, ("tools", 0, "function", "name")),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS}, ("tools", 0, "function", "description")),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS}, ("tools", 0, "function", "parameters", "properties", "tz",
                                                       "type")),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "messages": [CHAT["messages"][0], CALL, REPLY]},
     ("messages", 1, "tool_calls", 0, "function", "arguments")),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "messages": [CHAT["messages"][0], CALL, REPLY]},
     ("messages", 2, "content")),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "messages": [CHAT["messages"][0], CALL, REPLY]},
     ("messages", 2, "tool_call_id")),
    ("/api/paas/v4/chat/completions", CHAT, ("messages", 0, "content")),
    ("/api/paas/v4/chat/completions", CHAT, ("request_id",)),
    ("/api/paas/v4/chat/completions", CHAT, ("user_id",)),
    ("/api/paas/v4/chat/completions", CHAT, ("stop", "*")),
    ("/v1/completions", {"model": "tiny", "prompt": "", "max_tokens": 1}, ("prompt",)),
    ("/v1/completions", {"model": "tiny", "prompt": "", "max_tokens": 1}, ("prompt", "*")),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}, ("stop",)),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}, ("model",)),
    ("/v1/embeddings", {"model": "tiny", "input": ""}, ("input",)),
    ("/v1/embeddings", {"model": "tiny", "input": ""}, ("input", "*")),
    ("/v1/embeddings", {"model": "tiny", "input": "hi"}, ("user",)),
    ("/v1/infill", {"model": "tiny", "prompt": "", "max_tokens": 1}, ("prompt",)),
    ("/v1/infill", {"model": "tiny", "prompt": "a [MASK] b", "max_tokens": 1}, ("request_id",)),
    ("/admin/accounts", {"name": "", "balance": 1}, ("name",)),
    ("/admin/keys", {"account_id": 1}, ("name",)),
    ("/admin/keys", {"account_id": 1}, ("models", "*")),
    ("/admin/keys", {"account_id": 1}, ("expires_at",)),
]

# Arbitrary text (every code point, lone surrogates included), mixed with what breaks naive code.
HOSTILE = st.sampled_from(["\udc80", "\ud800", "\udbff\udfff", "\x00", "\r\n", "\u202e", "\ufeff", "[MASK]",
                           "[gMASK]", "<|user|>", "<|endoftext|>", "'\"", "%s%n", "\\", "null"])
TEXT = st.lists(st.one_of(st.text(st.characters(exclude_categories=()), max_size=20), HOSTILE),
                max_size=6).map("".join)


def _put(body: dict, where: tuple, text: str) -> dict:
    body = copy.deepcopy(body)
    *path, last = where
    if last == "*":
        *path, last = path
        text = [text]
    node = body
    for part in path:
        node = node[part]
    node[last] = text
    return body


@pytest.fixture(scope="module", params=["engine in the server's process, SQLite", "engine in its own process, "
                                                                                "PostgreSQL"])
def live(request, tiny_checkpoint, tmp_path_factory):
    if "PostgreSQL" in request.param:
        url = request.getfixturevalue("postgres_server").new_database()
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'hostile.db'}"
    with serving(tiny_checkpoint, url, max_seq_len=48, admin_key=ADMIN_KEY,
                 engine_process="own" in request.param) as (server, store, secret, account_id):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            yield c, secret, store, account_id


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(FIELDS), text=TEXT)
def test_any_text_in_any_field_is_answered_without_a_server_error(live, field, text):
    c, secret, _, _ = live
    path, body, where = field
    key = ADMIN_KEY if path.startswith("/admin") else secret
    # Escaped as \\udc80 where the text has a lone surrogate, as json.dumps and JSON.stringify send it.
    content = json.dumps(_put(body, where, text))
    r = c.post(path, content=content, headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    assert r.status_code < 500, (path, where, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and ("type" in error if path.startswith("/v1/") else True), r.text
    assert r.headers.get("connection") != "close", (path, where)


def test_nothing_left_reserved(live):
    _, _, store, account_id = live
    assert store.open_reservations(account_id) == []


def test_nul_in_a_price_path_is_400_on_every_database(live):
    c, _, _, _ = live
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    for r in (c.get("/admin/prices/a%00b", headers=admin),
              c.put("/admin/prices/a%00b", json={"input_per_million": 1, "output_per_million": 1}, headers=admin)):
        assert r.status_code == 400 and "NUL" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("depth", [900, 5000])
def test_deeply_nested_json_is_not_a_server_error(live, depth):
    c, secret, _, _ = live
    parameters = "{" + '"a":{' * depth + "}" * depth + "}"
    content = json.dumps({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": 0}}]})
    content = content.replace('"parameters": 0', '"parameters": ' + parameters)
    r = c.post("/v1/chat/completions", content=content,
               headers={"content-type": "application/json", "authorization": f"Bearer {secret}"})
    assert r.status_code < 500 and (r.status_code == 200 or r.json()["error"]["message"]), r.text
