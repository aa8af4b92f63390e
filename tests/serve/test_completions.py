"""``/v1/completions`` for evaluation harnesses: token-id prompts, ``echo`` with prompt logprobs, ``max_tokens: 0``;
and request fields the server cannot honour, refused by name."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from live_server import serving, sse_events


@pytest.fixture(scope="module", params=["engine in the server's process", "engine in its own process"])
def live(request, tiny_checkpoint, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'completions.db'}"
    with serving(tiny_checkpoint, url, engine_process="own" in request.param) as (server, store, secret, account_id):
        yield server, store, secret, account_id


def http(server, secret) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60)


def client(server, secret) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=60)


TEXT = "The General Language Model reads the text around a blank"


def reference_logprobs(checkpoint, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from the checkpoint loaded here."""
    from openglm import load_model

    with torch.no_grad():
        logprobs = load_model(checkpoint)(torch.tensor([ids]))[0].log_softmax(-1)  # (T, V)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_token_id_prompts(live, tokenizer):
    server, _, secret, _ = live
    ids = tokenizer.encode(TEXT)
    c = client(server, secret)
    by_text = c.completions.create(model="tiny", prompt=TEXT, max_tokens=6, temperature=0)
    by_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    batch = c.completions.create(model="tiny", prompt=[ids, ids[:5]], max_tokens=3, temperature=0)
    assert len(batch.choices) == 2 and batch.usage.prompt_tokens == len(ids) + 5
    assert batch.choices[0].text == by_text.choices[0].text[:len(batch.choices[0].text)]
    with http(server, secret) as h:
        outside = h.post("/v1/completions", json={"model": "tiny", "prompt": [ids, [tokenizer.vocab_size]]})
        assert outside.status_code == 400 and outside.json()["error"]["param"] == "prompt"
        assert str(tokenizer.vocab_size) in outside.json()["error"]["message"]
        for empty in ("", ["a", ""]):  # a text of no tokens
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": empty})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", empty


def test_echo_with_logprobs_scores_the_prompt(live, tokenizer, tiny_checkpoint):
    server, store, secret, account_id = live
    ids = tokenizer.encode(TEXT)
    reference = reference_logprobs(tiny_checkpoint, ids)
    c = client(server, secret)
    before = store.ledger_totals(account_id)
    scored = c.completions.create(model="tiny", prompt=ids, echo=True, logprobs=2, max_tokens=0)
    after = store.ledger_totals(account_id)
    choice = scored.choices[0]
    assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert lp.token_logprobs[1:] == pytest.approx(reference, abs=1e-4)
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 2 and max(top.values()) >= logprob
        if token in top:  # the same position's numbers: the same value
            assert top[token] == logprob
    # Billed: the prompt, nothing generated.
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids), 0)
    assert after["prompt_tokens"] - before["prompt_tokens"] == len(ids)
    assert after["completion_tokens"] == before["completion_tokens"]

    # What lm-evaluation-harness sends: one token generated after the scored prompt.
    one = c.completions.create(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=1,
                               temperature=0).choices[0]
    assert one.logprobs.token_logprobs[:-1] == lp.token_logprobs and len(one.logprobs.tokens) == len(ids) + 1
    assert one.text == choice.text + one.logprobs.tokens[-1]
    assert one.logprobs.text_offset[-1] == len(choice.text)

    # A prompt longer than one output-layer product of the scoring pass.
    from openglm.serve.engine_tasks import SCORE_ROWS

    long = (ids * (SCORE_ROWS // len(ids) + 2))[: SCORE_ROWS + 20]
    scored = c.completions.create(model="tiny", prompt=long, echo=True, logprobs=1, max_tokens=0).choices[0]
    assert scored.logprobs.token_logprobs[1:] == pytest.approx(reference_logprobs(tiny_checkpoint, long), abs=1e-4)

    # n copies of a prompt scored once, billed once.
    twice = c.completions.create(model="tiny", prompt=ids, echo=True, logprobs=0, max_tokens=0, n=2)
    assert [ch.logprobs.token_logprobs for ch in twice.choices] == [lp.token_logprobs] * 2
    assert twice.usage.prompt_tokens == len(ids) and twice.choices[0].logprobs.top_logprobs[1] == {}


def test_echo_puts_the_prompt_first(live):
    server, _, secret, _ = live
    c = client(server, secret)
    plain = c.completions.create(model="tiny", prompt=TEXT, max_tokens=5, temperature=0).choices[0]
    echoed = c.completions.create(model="tiny", prompt=TEXT, max_tokens=5, temperature=0, echo=True).choices[0]
    assert echoed.text == TEXT + plain.text and echoed.logprobs is None
    nothing = c.completions.create(model="tiny", prompt=TEXT, max_tokens=0)
    assert nothing.choices[0].text == "" and nothing.usage.completion_tokens == 0
    with http(server, secret) as h, h.stream("POST", "/v1/completions", json={
            "model": "tiny", "prompt": TEXT, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 1,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5
    chunks = [e["choices"][0] for e in events[:-2]]
    assert chunks[0]["text"] == TEXT and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(ch["text"] for ch in chunks) == echoed.text
    assert chunks[-1]["finish_reason"] == "length"
    with http(server, secret) as h, h.stream("POST", "/v1/completions", json={
            "model": "tiny", "prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and [e["choices"][0]["text"] for e in events[:-1]] == [TEXT]


def test_unsupported_fields_are_refused_by_name(live):
    server, _, secret, _ = live
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    tools = [{"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}}}}]
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}
    refused = {
        "suffix": ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "suffix": "b"}),
        "best_of": ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "best_of": 3}),
        "dimensions": ("/v1/embeddings", {"model": "tiny", "input": "a", "dimensions": 8}),
        "response_format": ("/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}}),
        "tool_choice": ("/v1/chat/completions", {**chat, "tool_choice": "auto"}),
        "messages": ("/v1/chat/completions", {**chat, "messages": [{"role": "tool", "content": "12:00"}]}),
        "presence_penalty": ("/v1/completions", {"model": "tiny", "prompt": "a", "presence_penalty": 0.5}),
        "frequency_penalty": ("/v1/chat/completions", {**chat, "frequency_penalty": -1}),
        "logit_bias": ("/v1/chat/completions", {**chat, "logit_bias": {"5": 100}}),
    }
    zhipu_refused = {
        "response_format": {**chat, "response_format": {"type": "json_object"}},
        "tool_choice": {**chat, "tool_choice": "auto"},
        "messages": {**chat, "messages": [*chat["messages"], {"role": "tool", "content": "12:00"}]},
    }
    accepted = {
        "suffix null": ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "suffix": None}),
        "best_of = n": ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "best_of": 2, "n": 2}),
        "text format": ("/v1/chat/completions", {**chat, "response_format": {"type": "text"}}),
        "defaults sent": ("/v1/chat/completions", {**chat, "frequency_penalty": 0, "presence_penalty": 0.0,
                                                   "logit_bias": {}}),
        "no tools used": ("/v1/chat/completions", {**chat, "tools": tools, "tool_choice": "none"}),
        "a result after its call": ("/v1/chat/completions", {**chat, "messages": [
            *chat["messages"], call, {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]}),
    }
    with http(server, secret) as h:
        for field, (path, body) in refused.items():
            r = h.post(path, json=body)
            error = r.json()["error"]
            assert (r.status_code, error["type"], error["param"]) == (400, "invalid_request_error", field), r.text
            assert error["message"].startswith(field), error
        for field, body in zhipu_refused.items():
            r = h.post("/api/paas/v4/chat/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "1214", r.text  # Zhipu: a bad parameter
            assert r.json()["error"]["message"].startswith(field)
        for name, (path, body) in accepted.items():
            assert h.post(path, json=body).status_code == 200, name
    # Named calls that answer nothing, and choices the model cannot be held to.
    with http(server, secret) as h:
        stray = h.post("/v1/chat/completions", json={**chat, "messages": [
            *chat["messages"], call, {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}]})
        assert stray.status_code == 400 and "call_2" in stray.json()["error"]["message"]
        forced = h.post("/v1/chat/completions", json={**chat, "tools": tools, "tool_choice": "required"})
        assert forced.status_code == 400 and forced.json()["error"]["param"] == "tool_choice"
