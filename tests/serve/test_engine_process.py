"""The engine in a process of its own against the in-process engine: same tokens, same contract."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import httpx
import pytest
from live_server import serving

from openglm import OpenGLMError, SamplingParams, load_model, load_tokenizer
from openglm.serve.engine_tasks import embed
from openglm.serve.engine import Engine, EngineClient, EngineFull, EngineRequest, PromptTooLong
from openglm.serve.engine.process import EngineProcess

PROMPTS = ["The General", "通用语言模型通过自回归", "Numbers like 2022 and 130 appear too", "It"]


@pytest.fixture(scope="module")
def remote(tiny_checkpoint):
    engine = EngineProcess(str(tiny_checkpoint), threads=1, max_batch_size=3, max_queue=6, max_seq_len=128)
    engine.start()
    yield engine
    engine.stop()


def requests(tokenizer) -> list[EngineRequest]:
    """Greedy and seeded sampled requests, more than the 3 slots, one with logprobs."""
    out = []
    for i, text in enumerate(PROMPTS * 2):
        params = SamplingParams(max_new_tokens=6 + i, temperature=0 if i % 2 else 0.9, top_p=0.9, seed=i)
        out.append(EngineRequest(tokenizer.encode(text), params, logprobs=2 if i == 3 else None))
    return out


async def run_all(engine, reqs):
    handles = [engine.submit(r) for r in reqs]
    results = [await h.result() for h in handles]
    return handles, results


def test_same_tokens_text_and_counts_as_the_engine_in_this_process(remote, tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)

    async def local():
        engine = Engine(load_model(tiny_checkpoint), tokenizer, max_batch_size=3, max_seq_len=128)
        engine.start()
        try:
            return engine.model_name, await run_all(engine, requests(tokenizer))
        finally:
            engine.stop()

    name, expected = asyncio.run(local())
    handles, results = asyncio.run(run_all(remote, requests(tokenizer)))
    assert remote.model_name == name and remote.max_seq_len == 128
    for (events, finish), (want, want_finish), handle in zip(results, expected[1], handles):
        assert [(e.token, e.text, e.finish_reason) for e in events] == \
            [(e.token, e.text, e.finish_reason) for e in want]
        assert [e.top_logprobs for e in events] == [e.top_logprobs for e in want]
        assert finish == want_finish and handle.completion_tokens == len(events)
        assert handle.queue_time >= 0 and handle.first_token_time >= handle.queue_time
    assert remote.num_running == 0 and remote.num_waiting == 0



def test_stop_strings_end_the_text_in_the_server_process_and_the_request_in_the_engine(remote, tokenizer):
    # The engine process sends token ids only; the server detokenizes, finds the stop string and
    # has the engine abort the request, whose slot is then free.
    ids = tokenizer.encode(PROMPTS[0])
    greedy = SamplingParams(max_new_tokens=40, temperature=0)
    whole = "".join(e.text for e in asyncio.run(run_all(remote, [EngineRequest(ids, greedy)]))[1][0][0])
    stop = whole[len(whole) // 3 : len(whole) // 3 + 3]
    assert stop.strip() and whole.find(stop) > 0
    stopped = dataclasses.replace(greedy, stop_strings=[stop])
    handles, [(events, finish)] = asyncio.run(run_all(remote, [EngineRequest(ids, stopped)]))
    assert finish == "stop" == events[-1].finish_reason and handles[0].completion_tokens == len(events) < 40
    assert "".join(e.text for e in events) == whole[: whole.find(stop)]
    deadline = time.monotonic() + 30
    while remote.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert remote.num_running == 0 and remote.free_slots == remote.max_batch_size


def test_both_engines_are_engine_clients(remote, tiny_checkpoint, tokenizer):
    assert isinstance(remote, EngineClient)
    assert isinstance(Engine(load_model(tiny_checkpoint), tokenizer, max_seq_len=64), EngineClient)
    assert (remote.max_batch_size, remote.max_queue, remote.max_seq_len, remote.vocab_size) == \
        (3, 6, 128, tokenizer.vocab_size)


def test_requests_with_the_same_request_id_stay_apart(remote, tokenizer):
    # The caller's request_id is no key here: two requests naming the same one each get their own tokens.
    reqs = [EngineRequest(tokenizer.encode(text), SamplingParams(max_new_tokens=12, temperature=0),
                          request_id="same") for text in PROMPTS[:2]]
    alone = [asyncio.run(run_all(remote, [r]))[1][0] for r in reqs]
    handles, together = asyncio.run(asyncio.wait_for(run_all(remote, reqs), 60))  # (one of them once hung)
    assert [[e.token for e in events] for events, _ in together] == [[e.token for e in events] for events, _ in alone]
    assert [h.completion_tokens for h in handles] == [12, 12] and handles[0].request_id != handles[1].request_id

def test_cancel_ends_the_request_and_bills_what_was_handed_out(remote, tokenizer):
    async def scenario():
        handle = remote.submit(EngineRequest(tokenizer.encode("It"), SamplingParams(max_new_tokens=100, temperature=0)))
        first = [await anext(handle), await anext(handle)]
        handle.cancel()
        rest, finish = await handle.result()
        return first + rest, finish, handle

    events, finish, handle = asyncio.run(scenario())
    assert finish == "cancelled" and handle.completion_tokens == len(events) < 100


def test_bad_requests_are_refused_at_submit_and_the_queue_is_bounded(remote, tokenizer):
    async def scenario():
        with pytest.raises(PromptTooLong):
            remote.submit(EngineRequest([5] * 100, SamplingParams(max_new_tokens=29)))
        with pytest.raises(OpenGLMError, match="token ids"):
            remote.submit(EngineRequest([10**6], SamplingParams(max_new_tokens=2)))
        long = SamplingParams(max_new_tokens=100, temperature=0)
        handles = [remote.submit(EngineRequest(tokenizer.encode("It"), long)) for _ in range(9)]  # 3 slots + 6
        with pytest.raises(EngineFull, match="queue is full"):
            remote.submit(EngineRequest(tokenizer.encode("It"), long))
        for h in handles:
            h.cancel()
        return [(await h.result())[1] for h in handles]

    assert set(asyncio.run(scenario())) <= {"cancelled", "length"}


def test_run_exclusive_runs_in_the_engine_process_with_its_model(remote, tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    batch = [[5, 6, 7], [8]]

    async def scenario():
        pid = await remote.run_exclusive(os.getpid)
        vectors, _ = await remote.run_exclusive(embed, remote.model, batch)
        with pytest.raises(IndexError):
            await remote.run_exclusive(embed, remote.model, [[10**6]])
        with pytest.raises(Exception, match="pickle|lambda"):
            await remote.run_exclusive(lambda: 1)
        return pid, vectors

    pid, vectors = asyncio.run(scenario())
    assert pid == remote.pid != os.getpid()
    # (the engine's model has its decode layout and one thread: the same values up to rounding)
    assert abs(vectors - embed(model, batch)[0]).max() < 1e-5


def test_a_checkpoint_that_does_not_load_fails_start_with_its_message(tmp_path):
    with pytest.raises(OpenGLMError, match="no-such-model"):
        EngineProcess(str(tmp_path / "no-such-model")).start()


def test_a_dead_engine_process_ends_its_requests_with_error(tiny_checkpoint, tokenizer):
    exits = []
    engine = EngineProcess(str(tiny_checkpoint), threads=1, max_seq_len=256, on_exit=exits.append)
    engine.start()
    assert engine.alive

    async def scenario():
        handle = engine.submit(EngineRequest(tokenizer.encode("It"), SamplingParams(max_new_tokens=200, temperature=0)))
        await anext(handle)
        os.kill(engine.pid, signal.SIGKILL)
        _, finish = await asyncio.wait_for(handle.result(), 30)
        with pytest.raises(EngineFull):
            engine.submit(EngineRequest(tokenizer.encode("It"), SamplingParams(max_new_tokens=2)))
        return finish

    try:
        assert asyncio.run(scenario()) == "error"
        assert not engine.alive and exits == ["the engine process exited unexpectedly (exit code -9)"]
    finally:
        engine.stop()
    assert len(exits) == 1  # stop() is no unexpected exit


def test_the_api_answers_503_once_its_engine_process_died(tiny_checkpoint, tmp_path):
    with serving(tiny_checkpoint, f"sqlite:///{tmp_path / 'dead.db'}", engine_process=True) as (server, _, secret, _):
        auth = {"Authorization": f"Bearer {secret}"}
        body = {"model": "tiny", "prompt": "It", "max_tokens": 2}
        assert httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=60).status_code == 200
        engine = server.server.config.app.state.services.backend.engine
        os.kill(engine.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while engine.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(server.url + "/health", timeout=10)
        refused = httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=60)
    assert health.status_code == refused.status_code == 503
    assert refused.json()["error"]["code"] == "engine_stopped"


def test_stop_ends_pending_requests_as_cancelled(tiny_checkpoint, tokenizer):
    engine = EngineProcess(str(tiny_checkpoint), threads=1, max_batch_size=1, max_seq_len=256)
    engine.start()
    long = SamplingParams(max_new_tokens=200, temperature=0)

    async def scenario():
        handles = [engine.submit(EngineRequest(tokenizer.encode("It"), long)) for _ in range(2)]  # one waits
        await anext(handles[0])
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        with pytest.raises(EngineFull, match="not running"):
            engine.submit(EngineRequest(tokenizer.encode("It"), long))
        return [(await h.result())[1] for h in handles]

    assert asyncio.run(scenario()) == ["cancelled", "cancelled"]
    assert not engine.alive and engine.pid is not None
