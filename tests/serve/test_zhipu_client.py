"""Zhipu's own ``zhipuai`` client against the Zhipu route of a real server on loopback: answers and error classes."""

from __future__ import annotations

import pytest
import zhipuai
from live_server import LiveServer, serving
from zhipuai.core import _errors as errors  # the client's error classes, by HTTP status

HELLO = [{"role": "user", "content": "The General Language Model"}]


@pytest.fixture(scope="module", params=["engine in the server's process", "engine in its own process"])
def live(request, tiny_checkpoint, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'zhipu.db'}"
    with serving(tiny_checkpoint, url, engine_process="own" in request.param) as (server, store, secret, account_id):
        yield server, store, secret, account_id


def client(url: str, secret: str):
    return zhipuai.ZhipuAI(api_key=secret, base_url=url + "/api/paas/v4", max_retries=0, timeout=60)


def code(e) -> str:
    return e.value.response.json()["error"]["code"]


def test_chat_and_stream(live):
    server, store, secret, account_id = live
    c = client(server.url, secret)
    reply = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, do_sample=False,
                                      request_id="zhipu-client-1")
    assert reply.request_id == "zhipu-client-1" and reply.usage.completion_tokens == 4
    chunks = list(c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, do_sample=False, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reply.choices[0].message.content


def test_errors_raise_the_clients_classes(live):
    server, store, secret, account_id = live
    c = client(server.url, secret)
    with pytest.raises(errors.APIAuthenticationError) as e:  # 401
        client(server.url, "sk-glm-wrong").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert code(e) == "1002"
    with pytest.raises(errors.APIRequestFailedError) as e:  # 400: a bad parameter, not FastAPI's 422
        c.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}], max_tokens=2)
    assert code(e) == "1214" and "messages.0.role" in e.value.response.json()["error"]["message"]
    with pytest.raises(errors.APIRequestFailedError) as e:  # 400: Zhipu's status for an unknown model
        c.chat.completions.create(model="glm-5", messages=HELLO, max_tokens=2)
    assert code(e) == "1211"
    c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, request_id="zhipu-client-2")
    with pytest.raises(errors.APIRequestFailedError) as e:
        c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, request_id="zhipu-client-2")
    assert code(e) == "1231"
    _, narrow = store.create_key(account_id, models=["other"])
    with pytest.raises(errors.APIStatusError) as e:  # Zhipu: 434 for no permission to the API
        client(server.url, narrow).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert e.value.status_code == 434 and code(e) == "1220"
    _, broke = store.create_key(store.create_account("broke", 0).id)
    with pytest.raises(errors.APIReachLimitError) as e:  # 429 arrears
        client(server.url, broke).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert code(e) == "1113"
    _, slow = store.create_key(account_id, rpm=1)
    client(server.url, slow).chat.completions.create(model="tiny", messages=HELLO, max_tokens=1)
    with pytest.raises(errors.APIReachLimitError) as e:  # 429 frequency, with the wait
        client(server.url, slow).chat.completions.create(model="tiny", messages=HELLO, max_tokens=1)
    assert code(e) == "1303" and int(e.value.response.headers["retry-after"]) >= 1
    _, small = store.create_key(account_id, tpm=20)
    with pytest.raises(errors.APIRequestFailedError) as e:  # above the key's tpm: never runnable, not a 429
        client(server.url, small).chat.completions.create(model="tiny", messages=HELLO, max_tokens=30)
    assert code(e) == "1210"
    assert store.open_reservations(account_id) == []


def test_loading_model_is_503(tmp_path):
    from openglm.serve.app import create_app
    from openglm.serve.store import Store

    store = Store(f"sqlite:///{tmp_path / 'loading.db'}")
    _, secret = store.create_key(store.create_account("a", 10**6).id)
    try:
        with LiveServer(create_app(None, store, "tiny", None)) as server:
            with pytest.raises(errors.APIServerFlowExceedError) as e:
                client(server.url, secret).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    finally:
        store.close()
    assert code(e) == "1305" and e.value.response.headers["retry-after"] == "2"
