"""The services under the routes, on their own: response and chunk schemas, logprob answers, and the
``GenerationBackend`` seam, with a backend that is not the engine behind the real routes and billing."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from live_server import LiveServer

from openglm.serve import schemas as S
from openglm.serve.engine import TokenEvent
from openglm.serve.errors import APIError


def test_chunks_carry_the_keys_openai_sends():
    head = dict(id="chatcmpl-1", created=7, model="m")
    role = S.ChatCompletionChunk(**head, choices=[S.ChatChunkChoice(index=0, delta=S.ChatDelta(role="assistant",
                                                                                              content=""),
                                                                    finish_reason=None)])
    assert role.model_dump_json(exclude_unset=True) == (
        '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,'
        '"delta":{"role":"assistant","content":""},"finish_reason":null}]}')
    text = S.ChatChunkChoice(index=1, delta=S.ChatDelta(content="你好"), logprobs=None, finish_reason=None)
    assert text.model_dump_json(exclude_unset=True) == \
        '{"index":1,"delta":{"content":"你好"},"logprobs":null,"finish_reason":null}'
    end = S.ChatChunkChoice(index=0, delta=S.ChatDelta(), finish_reason="stop")
    assert end.model_dump_json(exclude_unset=True) == '{"index":0,"delta":{},"finish_reason":"stop"}'
    usage = S.ChatCompletionChunk(**head, choices=[], request_id="r", usage=S.Usage(prompt_tokens=2, total_tokens=2))
    assert json.loads(usage.model_dump_json(exclude_unset=True)) == {
        **head, "object": "chat.completion.chunk", "choices": [], "request_id": "r",
        "usage": {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}}
    calls = S.ChatDelta(content=None, tool_calls=[S.ChunkToolCall(index=0, id="call_1", function=S.FunctionCall(
        name="f", arguments="{}"))])
    assert calls.model_dump_json(exclude_unset=True) == ('{"content":null,"tool_calls":[{"index":0,"id":"call_1",'
                                                         '"type":"function","function":{"name":"f","arguments":"{}"}}]}')


def test_errors_in_openai_and_zhipu_shapes():
    err = APIError(403, "no", "permission_error", "model_not_allowed", "model", zhipu="1220")
    assert err.body("/v1/chat/completions").model_dump_json() == \
        '{"error":{"message":"no","type":"permission_error","param":"model","code":"model_not_allowed"}}'
    assert err.body("/api/paas/v4/chat/completions").model_dump_json() == '{"error":{"code":"1220","message":"no"}}'
    assert (err.status_for("/v1/models"), err.status_for("/api/paas/v4/chat/completions")) == (403, 434)


def test_completion_logprobs_count_offsets_per_run(tokenizer):
    from openglm.serve.services.tokens import Tokens

    tokens = Tokens(tokenizer)
    a, b, c = tokenizer.encode("The General Language")[:3]
    texts = [tokenizer.decode([t]) for t in (a, b, c)]
    lp = tokens.completion_logprobs(([(a, None, None), (b, -1.0, [(b, -1.0)])], 0), ([(c, -2.0, [])], 100))
    assert lp.tokens == texts and lp.token_logprobs == [None, -1.0, -2.0]
    assert lp.top_logprobs == [None, {texts[1]: -1.0}, {}]
    assert lp.text_offset == [0, len(texts[0]), 100]


class _Reversed:
    """One generation of ``ReverseBackend``: the prompt's tokens, last first, one every ``delay`` seconds."""

    def __init__(self, prompt: list[int], max_new_tokens: int, tokenizer, delay: float):
        self.tokens, self.tokenizer, self.delay = prompt[::-1][:max_new_tokens], tokenizer, delay
        self.prompt_tokens, self.completion_tokens = len(prompt), 0
        self.finish_reason: str | None = None
        self.queue_time = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        for i, token in enumerate(self.tokens):
            await asyncio.sleep(self.delay)
            if self.cancelled:
                self.finish_reason = "cancelled"
                return
            self.completion_tokens += 1
            last = i == len(self.tokens) - 1
            if last:
                self.finish_reason = "length"
            yield TokenEvent(token, self.tokenizer.decode([token]), finish_reason="length" if last else None)


class ReverseBackend:
    """A ``GenerationBackend`` with no model at all: each generation is its prompt reversed."""

    max_seq_len, max_queue, num_running, num_waiting = 512, 8, 0, 0

    def __init__(self, tokenizer, delay: float = 0.0):
        self.tokenizer, self.delay, self.handles = tokenizer, delay, []

    def ready(self) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, prompt, params, logprobs, cache_scope=None):
        self.handles.append(_Reversed(prompt, params.max_new_tokens, self.tokenizer, self.delay))
        return self.handles[-1]

    async def run_on_model(self, fn, *args, with_tokenizer=False):
        raise APIError(501, "this backend runs generations only", "server_error")


@pytest.fixture
def reversed_server(tokenizer, tmp_path):
    """The server's routes over ``ReverseBackend``, with a real store; yields (url, store, key, account, backend)."""
    from openglm.serve.app import add_api_routes, app_for, backend_lifespan
    from openglm.serve.services import Services
    from openglm.serve.store import Store

    store = Store(f"sqlite:///{tmp_path / 'seam.db'}")
    store.set_price("rev", 1_000_000, 2_000_000)
    account = store.create_account("seam", 10**9)
    _, secret = store.create_key(account.id)
    backend = ReverseBackend(tokenizer, delay=0.01)
    app = app_for(Services.build(backend, store, "rev", tokenizer, None), backend_lifespan)
    add_api_routes(app)
    try:
        with LiveServer(app) as server:
            yield server.url, store, secret, account.id, backend
    finally:
        store.close()


def _settled(store, account_id: int) -> dict:
    deadline = time.monotonic() + 10
    while store.open_reservations(account_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    return store.ledger_totals(account_id)


def test_the_routes_run_on_another_backend(reversed_server, tokenizer):
    url, store, secret, account_id, backend = reversed_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0, timeout=30)
    prompt = tokenizer.encode("The General Language Model")
    expected = "".join(tokenizer.decode([t]) for t in prompt[::-1][:3])

    whole = client.completions.create(model="rev", prompt=prompt, max_tokens=3, echo=True)
    assert whole.choices[0].text == tokenizer.decode(prompt) + expected
    assert whole.choices[0].finish_reason == "length" and whole.id.startswith("cmpl-")
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), 3)

    chunks = list(client.completions.create(model="rev", prompt=prompt, max_tokens=3, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    for i in range(2):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    chat = list(client.chat.completions.create(model="rev", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason == "length"
    assert len(backend.handles[-1].tokens) == 4
    totals = _settled(store, account_id)
    assert (totals["requests"], totals["completion_tokens"]) == (3, 3 + 6 + 4)

    with pytest.raises(openai.APIStatusError) as refused:  # what the backend cannot do, it refuses by status
        client.embeddings.create(model="rev", input="Hi")
    assert refused.value.status_code == 501


def test_a_stream_closed_early_is_billed_what_the_backend_generated(reversed_server, tokenizer):
    url, store, secret, account_id, backend = reversed_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0, timeout=30)
    prompt = tokenizer.encode("The General Language Model fills blanks in text. " * 4)
    with client.completions.create(model="rev", prompt=prompt, max_tokens=len(prompt), stream=True) as stream:
        received = [chunk for _, chunk in zip(range(3), stream)]
    assert len(received) == 3
    totals = _settled(store, account_id)
    handle = backend.handles[-1]
    assert handle.finish_reason == "cancelled" and 3 <= handle.completion_tokens < len(prompt)
    assert totals["completion_tokens"] == handle.completion_tokens and totals["prompt_tokens"] == len(prompt)
