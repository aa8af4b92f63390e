"""The official ``openai`` client against a real server on loopback."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from live_server import serving


@pytest.fixture(scope="module", params=["engine in the server's process", "engine in its own process"])
def live(request, tiny_checkpoint, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'openai.db'}"
    with serving(tiny_checkpoint, url, engine_process="own" in request.param) as (server, store, secret, account_id):
        yield server, store, secret, account_id


def client(server, secret) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=60)


HELLO = [{"role": "user", "content": "The General Language Model"}]


def test_models_chat_and_completions(live):
    server, store, secret, account_id = live
    c = client(server, secret)
    assert [m.id for m in c.models.list()] == ["tiny"]
    chat = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    assert chat.choices[0].finish_reason == "length"
    text = c.completions.create(model="tiny", prompt="It reads", max_tokens=5, temperature=0, n=2)
    assert len(text.choices) == 2 and text.choices[0].text == text.choices[1].text  # greedy: n equal answers
    assert text.usage.completion_tokens == 10
    vectors = c.embeddings.create(model="tiny", input=["one", "two"])  # the client asks for base64
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 64
    filled = httpx.post(server.url + "/v1/infill", headers={"Authorization": f"Bearer {secret}"}, timeout=60,
                        json={"model": "tiny", "prompt": "The model fills [MASK] in text.", "max_tokens": 3})
    assert filled.status_code == 200 and len(filled.json()["spans"]) == 1


def test_streaming_with_usage(live):
    server, store, secret, account_id = live
    c = client(server, secret)
    before = store.ledger_totals(account_id)
    stream = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0.7, seed=1,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [ch.choices[0].finish_reason for ch in chunks[:-1]][-1] == "length"
    after = store.ledger_totals(account_id)
    assert after["completion_tokens"] - before["completion_tokens"] == 6
    assert after["prompt_tokens"] - before["prompt_tokens"] == chunks[-1].usage.prompt_tokens


def test_errors_map_to_client_exceptions(live, tiny_checkpoint, tmp_path):
    server, store, secret, account_id = live
    c = client(server, secret)
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-glm-wrong").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # validation: 400 as OpenAI sends it, not 422
        c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, temperature=5)
    assert e.value.code == "invalid_value" and e.value.param == "temperature"
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-glm-wrong").models.list()
    _, narrow = store.create_key(account_id, models=["other"])
    with pytest.raises(openai.PermissionDeniedError):
        client(server, narrow).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    poor = store.create_account("poor", 0)
    _, broke = store.create_key(poor.id)
    with pytest.raises(openai.RateLimitError) as e:
        client(server, broke).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert e.value.code == "insufficient_quota"


@pytest.fixture(scope="module")
def tool_checkpoint(tmp_path_factory, tokenizer):
    """A model that answers every chat with a call of the tool ``time`` (GLM-4's ``time\\n{}``).

    Attention and MLP outputs are zero, so the last hidden state is the current token's embedding
    and the logits depend on that token alone; the output layer makes each token of the chain
    ``<|assistant|> t i m e \\n { } <|user|>`` predict the next one.
    """
    from openglm import Config, GLMForCausalLM, save_model

    chain = [tokenizer.token_id("<|assistant|>"), *tokenizer.encode("time\n{}"), tokenizer.token_id("<|user|>")]
    assert len(set(chain)) == len(chain)  # a token with two successors would need more than a bigram model
    config = Config.from_name("glm-tiny-debug", vocab_size=tokenizer.vocab_size, eos_token_id=[tokenizer.eos_id],
                              pad_token_id=tokenizer.eos_id)
    model = GLMForCausalLM.from_config(config, seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b] += 50 * embed[a] / embed[a].norm()
    return save_model(model, tmp_path_factory.mktemp("tools") / "tools", tokenizer=tokenizer)


TOOLS = [{"type": "function", "function": {"name": "time", "description": "the current time",
                                            "parameters": {"type": "object", "properties": {}}}}]


def test_tool_calls(tool_checkpoint, tmp_path):
    # GLM-4 declares the tools in a long system turn: about 400 tokens with the tiny test tokenizer.
    with serving(tool_checkpoint, f"sqlite:///{tmp_path / 'tools.db'}", max_seq_len=1024) as (server, _, secret, _):
        c = client(server, secret)
        ask = [{"role": "user", "content": "What time is it?"}]
        reply = c.chat.completions.create(model="tiny", messages=ask, tools=TOOLS, max_tokens=20, temperature=0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert (call.function.name, call.function.arguments) == ("time", "{}") and call.id.startswith("call_")
        # Without tools the same text is plain content.
        plain = c.chat.completions.create(model="tiny", messages=ask, max_tokens=20, temperature=0).choices[0]
        assert (plain.message.content, plain.finish_reason, plain.message.tool_calls) == ("time\n{}", "stop", None)
        # Streamed, the call arrives whole, then finish_reason "tool_calls".
        chunks = list(c.chat.completions.create(model="tiny", messages=ask, tools=TOOLS, max_tokens=20,
                                                temperature=0, stream=True))
        calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        assert [(tc.function.name, tc.function.arguments) for tc in calls] == [("time", "{}")]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # The tool's answer goes back as a "tool" message, and the model calls it again (it knows nothing else).
        history = [*ask, choice.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
        again = c.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=20, temperature=0)
        assert again.usage.prompt_tokens > reply.usage.prompt_tokens


def test_requests_that_can_never_fit_are_400_and_retriable_429s_say_when(live):
    """A 503 or 429 tells a client to retry: only for what can succeed later, and with the wait."""
    server, store, secret, account_id = live
    c = client(server, secret)
    # More generations (prompts x n) than the engine queues at once (256 by default): never runnable.
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=["It reads"] * 64, n=5, max_tokens=1)
    assert e.value.code == "request_too_large" and "320" in e.value.message
    # prompt + max_tokens above the key's tokens per minute: never runnable either.
    _, small = store.create_key(account_id, tpm=50)
    with pytest.raises(openai.BadRequestError) as e:
        client(server, small).chat.completions.create(model="tiny", messages=HELLO, max_tokens=60)
    assert e.value.code == "request_too_large" and "retry-after" not in e.value.response.headers
    # Retriable: one request per minute, the second one waits; the 429 says how long.
    _, slow = store.create_key(account_id, rpm=1)
    client(server, slow).chat.completions.create(model="tiny", messages=HELLO, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        client(server, slow).chat.completions.create(model="tiny", messages=HELLO, max_tokens=1)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert store.open_reservations(account_id) == []
