"""The continuous-batching engine against one-prompt-at-a-time generation and plain forwards."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from openglm import Config, GLMForCausalLM, OpenGLMError, SamplingParams, load_model
from openglm.infer.generate import generate_steps
from openglm.serve.engine import Engine, EngineFull, EngineRequest, PromptTooLong, RequestHandle

PROMPTS = ["The General", "通用语言模型通过自回归", "Numbers like 2022 and 130 appear too, as do symbols",
           "It"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def alone(model, tokenizer, prompt_ids, params):
    """Tokens and text of one prompt generated on its own by ``generate_steps``."""
    steps = list(generate_steps(model, tokenizer, [prompt_ids], params))
    return [s.token for s in steps], "".join(s.text for s in steps), steps[-1].finish_reason


def serve(model, tokenizer, scenario, **engine_kw):
    """Run ``await scenario(engine)`` with a started engine, stopping it afterwards."""
    engine_kw.setdefault("max_seq_len", 128)

    async def main():
        engine = Engine(model, tokenizer, **engine_kw)
        engine.start()
        try:
            return await scenario(engine)
        finally:
            engine.stop()

    return asyncio.run(main())


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


@pytest.mark.parametrize("packed", [True, False])
def test_requests_joining_and_leaving_mid_batch_match_single_generation(model, tokenizer, packed, monkeypatch):
    # 3 slots for 5 requests, joining at different steps and prefilled 3 tokens a step (several
    # chunks for the longer prompts) while the others keep decoding: in the same packed forward as
    # their decode steps, or in a padded forward of their own.
    if not packed:
        monkeypatch.setattr(Engine, "PACK_MAX_TOKENS", 0)
    prompts = [tokenizer.encode(p) for p in PROMPTS] + [tokenizer.encode("blank")]
    lengths = [12, 5, 9, 14, 7]

    async def scenario(engine):
        handles, head = [], []
        for ids, n in zip(prompts, lengths):
            handles.append(engine.submit(EngineRequest(ids, greedy(n))))
            event = await anext(handles[0], None)  # let the batch advance between arrivals
            head += [event] if event else []
        results = [await h.result() for h in handles]
        assert engine.num_running == 0 and engine.num_waiting == 0
        assert (engine.packed_steps > 0) == packed
        results[0] = (head + results[0][0], results[0][1])
        return handles, results

    handles, results = serve(model, tokenizer, scenario, max_batch_size=3, prefill_chunk=3)
    for ids, n, handle, (events, finish) in zip(prompts, lengths, handles, results):
        tokens, text, reason = alone(model, tokenizer, ids, greedy(n))
        assert [e.token for e in events] == tokens
        assert "".join(e.text for e in events) == text
        assert finish == reason == events[-1].finish_reason
        assert handle.completion_tokens == len(tokens)
    assert any(finish == "length" for _, finish in results)


def test_prompts_arriving_together_are_prefilled_in_one_padded_forward(model, tokenizer):
    # The oldest prompt (6 tokens) sets the chunk: the 2- and 4-token prompts are left-padded to 6,
    # the 9-token one is cut at 6 and finished in the next step.
    text = tokenizer.encode(PROMPTS[2] * 4)
    prompts = [text[:6], text[10:12], text[20:29], text[30:34]]

    async def scenario(engine):
        handles = [engine.submit(EngineRequest(p, greedy(6))) for p in prompts]
        return [(await h.result())[0] for h in handles]

    results = serve(model, tokenizer, scenario, prefill_chunk=24)
    for p, events in zip(prompts, results):
        assert [e.token for e in events] == alone(model, tokenizer, p, greedy(6))[0]


def test_a_long_prompt_is_prefilled_in_chunks_while_running_requests_decode(model, tokenizer):
    running_ids = tokenizer.encode(PROMPTS[0])
    long_ids = tokenizer.encode(PROMPTS[2] * 4)[:40]

    async def scenario(engine):
        running = engine.submit(EngineRequest(running_ids, greedy(60)))
        await anext(running)
        before = running.completion_tokens
        late = engine.submit(EngineRequest(long_ids, greedy(5)))
        first = await anext(late)
        during = running.completion_tokens - before
        rest, _ = await late.result()
        await running.result()
        return during, [first, *rest]

    during, events = serve(model, tokenizer, scenario, prefill_chunk=4)
    assert during >= 10  # one token per step for each of the 10 steps of 4 prompt tokens
    assert [e.token for e in events] == alone(model, tokenizer, long_ids, greedy(5))[0]


class LayerHold:
    """Holds the engine thread at the start of ``layer``'s forward. ``arm(when)`` returns a gate that
    catches the next forward whose input ``x`` (B, T, C) satisfies ``when``; ``await gate.engaged()``
    returns once the engine waits there, ``gate.release()`` lets it go on. Arming before the requests
    are submitted makes the held step deterministic: the engine cannot run ahead of a slow event loop."""

    class Gate:
        def __init__(self, when):
            self.when, self.entered, self.released = when, threading.Event(), threading.Event()

        async def engaged(self) -> None:
            entered = await asyncio.get_running_loop().run_in_executor(None, self.entered.wait, 60)
            assert entered, "the engine never ran the forward the hold waited for"

        def release(self) -> None:
            self.released.set()

    def __init__(self, layer, monkeypatch):
        self._gate: LayerHold.Gate | None = None
        original = layer.forward

        def held(x, *args, **kwargs):
            gate = self._gate
            if gate is not None and gate.when(x):
                self._gate = None
                gate.entered.set()
                gate.released.wait(60)
            return original(x, *args, **kwargs)

        monkeypatch.setattr(layer, "forward", held)

    def arm(self, when) -> LayerHold.Gate:
        self._gate = LayerHold.Gate(when)
        return self._gate


def delivery_log(monkeypatch) -> list:
    """Every (handle, event) pair in the order the event loop hands them to their handles."""
    log, original = [], RequestHandle._deliver

    def logged(handle, event, finish_reason):
        log.append((handle, event))
        return original(handle, event, finish_reason)

    monkeypatch.setattr(RequestHandle, "_deliver", logged)
    return log


def tokens_before(log: list, start: int, handle, other) -> int:
    """How many of ``handle``'s tokens were delivered in ``log[start:]`` before ``other``'s first token
    (counted from the delivery order itself, not when a slow event loop gets to read a counter)."""
    count = 0
    for h, event in log[start:]:
        if h is other and event is not None:
            return count
        count += h is handle and event is not None
    raise AssertionError("no token of the other request was delivered")


def decode_step(x) -> bool:  # a decode forward: one new token per row
    return x.shape[1] == 1


@pytest.mark.parametrize("case", ["decode", "packed", "too long", "off"])
def test_a_short_prompt_arriving_mid_step_is_prefilled_between_two_layers(model, tokenizer, monkeypatch, case):
    # The engine is held inside layer 1 of a step's forward (a decode, or a decode packed with a long
    # prompt's chunk) while a new request arrives: it prefills that prompt after layer 1, sends its
    # first token before the paused step's tokens, then ends the step. Not when the prompt exceeds
    # preempt_tokens or preempt_tokens is 0. Every request's tokens are those it gets alone.
    running_ids, late_ids = tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[1])[:6]
    long_ids = tokenizer.encode(PROMPTS[2] * 4)[:40]  # "packed": chunks of 8 beside the decode
    assert len(running_ids) != 1 + 8
    preempt = {"too long": 4, "off": 0}.get(case, 8)
    hold, log = LayerHold(model.model.layers[1], monkeypatch), delivery_log(monkeypatch)

    async def scenario(engine):
        gate = hold.arm(decode_step)  # running's first decode step
        running = engine.submit(EngineRequest(running_ids, greedy(20)))
        events = [await anext(running)]
        await gate.engaged()
        chunked = None
        if case == "packed":  # in a slot before the late request comes, its chunks packed beside the decode
            chunked = engine.submit(EngineRequest(long_ids, greedy(3)))
            first_gate, gate = gate, hold.arm(lambda x: x.shape[:2] == (1, 1 + 8))
            first_gate.release()
            await gate.engaged()
        packed, seen = engine.packed_steps, len(log)
        late = engine.submit(EngineRequest(late_ids, greedy(6)))
        gate.release()
        first = await anext(late)
        during = tokens_before(log, seen, running, late)
        rest = (await late.result())[0]
        events += (await running.result())[0]
        if chunked is not None:
            assert [e.token for e in (await chunked.result())[0]] == alone(model, tokenizer, long_ids, greedy(3))[0]
        return during, engine.preemptions, engine.packed_steps > packed, [first, *rest], events

    during, preemptions, packed, late_events, running_events = serve(
        model, tokenizer, scenario, prefill_chunk=8, preempt_tokens=preempt)
    # Not prefilled first, the late prompt joins the next step: running's tokens of the held step and
    # of that one (packed with the late prompt, its rows first) come before the late first token.
    assert (during, preemptions) == ((0, 1) if case in ("decode", "packed") else (2, 0))
    assert packed == (case != "decode")  # a decode packed with prompt tokens: the chunks, or the late prompt
    assert [e.token for e in late_events] == alone(model, tokenizer, late_ids, greedy(6))[0]
    assert [e.token for e in running_events] == alone(model, tokenizer, running_ids, greedy(20))[0]


def test_a_step_is_paused_once_at_most(model, tokenizer, monkeypatch):
    # Two prompts arrive while the engine is held inside layer 0; together they exceed the budget, so
    # the pause after layer 0 prefills the first only. The second is not prefilled after layer 1 (the
    # step was paused once already): it goes first in the next step, after the held step's tokens.
    running_ids, late_ids = tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[1])[:6]
    hold, log = LayerHold(model.model.layers[0], monkeypatch), delivery_log(monkeypatch)

    async def scenario(engine):
        gate = hold.arm(decode_step)
        running = engine.submit(EngineRequest(running_ids, greedy(20)))
        await anext(running)
        await gate.engaged()
        seen = len(log)
        late = [engine.submit(EngineRequest(late_ids, greedy(4))) for _ in range(2)]
        gate.release()
        for handle in [running, *late]:
            await handle.result()
        return [tokens_before(log, seen, running, handle) for handle in late], engine.preemptions

    assert serve(model, tokenizer, scenario, prefill_chunk=8) == ([0, 1], 1)


def test_each_request_keeps_its_own_sampling_params_in_one_batch(model, tokenizer):
    ids = [tokenizer.encode(p) for p in PROMPTS]
    ref_tokens = alone(model, tokenizer, ids[0], greedy(10))[0]
    stop_id = ref_tokens[4]
    params = [
        greedy(10),
        SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3),
        SamplingParams(max_new_tokens=8, temperature=0.7, top_k=5, repetition_penalty=1.3, seed=11),
        greedy(10, stop_token_ids=[stop_id]),
    ]
    prompts = [ids[0], ids[1], ids[2], ids[0]]

    async def scenario(engine):
        handles = [engine.submit(EngineRequest(p, sp)) for p, sp in zip(prompts, params)]
        return [await h.result() for h in handles]

    results = serve(model, tokenizer, scenario, max_batch_size=4)
    for p, sp, (events, finish) in zip(prompts, params, results):
        tokens, text, reason = alone(model, tokenizer, p, sp)
        assert [e.token for e in events] == tokens
        assert "".join(e.text for e in events) == text
        assert finish == reason
    assert results[3][0][-1].token == stop_id and results[3][1] == "stop"
    assert len(results[3][0]) == ref_tokens.index(stop_id) + 1


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[2])
    seeded = SamplingParams(max_new_tokens=16, temperature=1.2, seed=5)

    async def scenario(engine):
        lone = await engine.submit(EngineRequest(ids, seeded)).result()
        unseeded = SamplingParams(max_new_tokens=20, temperature=1.0)
        others = [engine.submit(EngineRequest(tokenizer.encode(p), unseeded)) for p in PROMPTS]
        crowded = await engine.submit(EngineRequest(ids, seeded)).result()
        reseeded = SamplingParams(max_new_tokens=16, temperature=1.2, seed=6)
        other_seed = await engine.submit(EngineRequest(ids, reseeded)).result()
        for h in others:
            await h.result()
        return lone, crowded, other_seed

    lone, crowded, other_seed = serve(model, tokenizer, scenario, max_batch_size=8)
    tokens = [e.token for e in lone[0]]
    assert tokens == [e.token for e in crowded[0]]
    assert tokens == alone(model, tokenizer, ids, seeded)[0]
    assert tokens != [e.token for e in other_seed[0]]


def test_stop_strings_end_the_text_before_them(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])
    _, text, _ = alone(model, tokenizer, ids, greedy(24))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0

    async def scenario(engine):
        return await engine.submit(EngineRequest(ids, greedy(24, stop_strings=[stop]))).result()

    events, finish = serve(model, tokenizer, scenario)
    assert finish == "stop" == events[-1].finish_reason
    assert "".join(e.text for e in events) == text[: text.find(stop)]


def test_length_limit(model, tokenizer):
    async def scenario(engine):
        handle = engine.submit(EngineRequest(tokenizer.encode("It reads"), greedy(5)))
        return handle, await handle.result()

    handle, (events, finish) = serve(model, tokenizer, scenario)
    assert finish == "length" and len(events) == 5 == handle.completion_tokens
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]
    assert handle.prompt_tokens == len(tokenizer.encode("It reads"))
    assert handle.queue_time >= 0 and handle.first_token_time >= handle.queue_time
    assert len(handle.inter_token_latencies) == 4


def test_logprobs_are_the_log_softmax_of_a_plain_forward(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[1])

    async def scenario(engine):
        other = engine.submit(EngineRequest(tokenizer.encode(PROMPTS[0]), greedy(6)))
        events, _ = await engine.submit(EngineRequest(ids, SamplingParams(max_new_tokens=6, temperature=0.8, seed=1),
                                                      logprobs=3)).result()
        assert (await other.result())[0][0].logprob is None
        return events

    events = serve(model, tokenizer, scenario)
    seq = list(ids)
    with torch.no_grad():
        for e in events:
            ref = model(torch.tensor([seq]))[0, -1].log_softmax(-1)
            top = ref.topk(3)
            assert e.logprob == pytest.approx(float(ref[e.token]), abs=1e-4)
            assert [t for t, _ in e.top_logprobs] == top.indices.tolist()
            assert [lp for _, lp in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            seq.append(e.token)


def blocked(engine):
    """Hold the engine thread inside ``run_exclusive`` until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(10)

    task = asyncio.ensure_future(engine.run_exclusive(hold))
    return task, started, release


async def until(event: threading.Event):
    while not event.is_set():
        await asyncio.sleep(0.001)


def test_timeout_while_queued_and_while_generating(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])

    async def scenario(engine):
        task, started, release = blocked(engine)
        await until(started)
        queued = engine.submit(EngineRequest(ids, greedy(8), timeout=0.05))
        await asyncio.sleep(0.1)
        release.set()
        await task
        queued_result = await queued.result()

        running = engine.submit(EngineRequest(ids, greedy(100), timeout=0.5))
        first = await anext(running)
        await engine.run_exclusive(time.sleep, 0.6)
        return queued_result, first, await running.result(), running

    (q_events, q_finish), first, (events, finish), running = serve(model, tokenizer, scenario, max_seq_len=256)
    assert q_events == [] and q_finish == "timeout"
    assert first.finish_reason is None
    assert finish == "timeout" == events[-1].finish_reason
    assert 1 + len(events) == running.completion_tokens < 100


def test_cancel_frees_the_slot_within_one_step(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[2])

    async def scenario(engine):
        keep = engine.submit(EngineRequest(ids, greedy(100)))
        drop = engine.submit(EngineRequest(ids, greedy(100)))
        await anext(drop)
        assert engine.num_running == 2
        await engine.run_exclusive(drop.cancel)
        dropped = await drop.result()
        assert await engine.run_exclusive(lambda: engine.num_running) == 1
        kept = await keep.result()

        # Alone in the engine, a request cancelled between two steps is gone after the next one,
        # and the engine then idles.
        lone = engine.submit(EngineRequest(ids, greedy(100)))
        await anext(lone)

        def cancel():
            lone.cancel()
            return engine.steps

        step = await engine.run_exclusive(cancel)
        assert (await lone.result())[1] == "cancelled"
        assert (engine.steps, engine.num_running) == (step + 1, 0)
        return drop, dropped, kept

    drop, (events, finish), (kept, _) = serve(model, tokenizer, scenario, max_seq_len=256)
    assert finish == "cancelled" and drop.completion_tokens == 1 + len(events) < 100
    assert [e.token for e in kept] == alone(model, tokenizer, ids, greedy(100))[0]


def test_cancelling_the_consuming_task_cancels_the_request(model, tokenizer):
    async def scenario(engine):
        handle = engine.submit(EngineRequest(tokenizer.encode("It"), greedy(100)))

        async def consume():
            async for _ in handle:
                pass

        task = asyncio.create_task(consume())
        while handle.completion_tokens < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return handle, await handle.result()

    handle, (_, finish) = serve(model, tokenizer, scenario, max_seq_len=256)
    assert finish == "cancelled" and handle.completion_tokens < 100


def test_full_queue_raises_engine_full(model, tokenizer):
    ids = tokenizer.encode("It")

    async def scenario(engine):
        task, started, release = blocked(engine)
        await until(started)
        handles = [engine.submit(EngineRequest(ids, greedy(3))) for _ in range(3)]
        assert engine.num_waiting == 3
        with pytest.raises(EngineFull, match="queue is full"):
            engine.submit(EngineRequest(ids, greedy(3)))
        release.set()
        await task
        return [await h.result() for h in handles]

    results = serve(model, tokenizer, scenario, max_batch_size=2, max_queue=3)
    assert {finish for _, finish in results} <= {"length", "stop"}


def test_invalid_requests_are_refused_at_submit(model, tokenizer):
    ids = tokenizer.encode("It reads")

    async def scenario(engine):
        with pytest.raises(PromptTooLong, match="exceeds"):
            engine.submit(EngineRequest(ids, greedy(33 - len(ids))))
        fits = engine.submit(EngineRequest(ids, greedy(32 - len(ids))))
        for bad in (EngineRequest([], greedy(3)), EngineRequest([10**6], greedy(3)),
                    EngineRequest(ids, greedy(0)), EngineRequest(ids, greedy(3), timeout=0)):
            with pytest.raises(OpenGLMError):
                engine.submit(bad)
        return await fits.result()

    _, finish = serve(model, tokenizer, scenario, max_seq_len=32)
    assert finish in ("length", "stop")


def test_stop_ends_pending_requests_as_cancelled(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])

    async def scenario(engine):
        task, started, release = blocked(engine)
        await until(started)
        handles = [engine.submit(EngineRequest(ids, greedy(50))) for _ in range(3)]
        release.set()
        engine.stop()
        await task
        assert engine.num_running == 0 and engine.num_waiting == 0
        with pytest.raises(EngineFull, match="not running"):
            engine.submit(EngineRequest(ids, greedy(3)))
        return [await h.result() for h in handles]

    results = serve(model, tokenizer, scenario, max_batch_size=2)
    assert [finish for _, finish in results] == ["cancelled"] * 3


def test_run_exclusive_returns_results_and_raises_errors(model, tokenizer):
    async def scenario(engine):
        assert await engine.run_exclusive(lambda a, b=0: (threading.current_thread().name, a + b), 1, b=2) == \
            ("openglm-engine", 3)
        with pytest.raises(ZeroDivisionError):
            await engine.run_exclusive(lambda: 1 / 0)
        return await engine.submit(EngineRequest(tokenizer.encode("It"), greedy(2))).result()

    assert serve(model, tokenizer, scenario)[1] == "length"


class FailsOnce(torch.nn.Module):
    """``model`` whose first forward raises, as a model step that hits an unexpected error."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.model, self.lm_head = model, model.config, model.model, model.lm_head
        self.failed = False

    def forward(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("model step failed")
        return self.inner(*args, **kwargs)


def test_a_failed_step_ends_its_requests_with_error_and_the_engine_goes_on(model, tokenizer, caplog):
    ids = tokenizer.encode("It reads")

    async def scenario(engine):
        failed = await engine.submit(EngineRequest(ids, greedy(4))).result()
        return failed, await engine.submit(EngineRequest(ids, greedy(4))).result()

    (events, finish), (after, _) = serve(FailsOnce(model), tokenizer, scenario)
    assert (events, finish) == ([], "error")
    assert "model step failed" in caplog.text
    assert [e.token for e in after] == alone(model, tokenizer, ids, greedy(4))[0]


def test_two_dimensional_position_models_are_refused(tokenizer):
    config = Config.from_name("glm-tiny-2d-debug", vocab_size=tokenizer.vocab_size)
    with pytest.raises(OpenGLMError, match="1D-position"):
        Engine(GLMForCausalLM.from_config(config, seed=0), tokenizer)


@pytest.mark.slow
def test_throughput_batched_vs_one_at_a_time():
    """Prints generation throughput on glm-tiny: 16 concurrent requests against requests one at a time."""
    from openglm import load_tokenizer

    model, tokenizer = load_model("glm-tiny"), load_tokenizer("glm-tiny")
    prompts = [tokenizer.encode(f"Story {i}: once upon a time") for i in range(16)]
    params = SamplingParams(max_new_tokens=32, temperature=0.8, seed=0)

    async def concurrent(engine):
        handles = [engine.submit(EngineRequest(p, params)) for p in prompts]
        return sum([len((await h.result())[0]) for h in handles])

    async def one_at_a_time(engine):
        return sum([len((await engine.submit(EngineRequest(p, params)).result())[0]) for p in prompts[:4]])

    for name, scenario in (("1 at a time", one_at_a_time), ("16 concurrent", concurrent)):
        start = time.perf_counter()
        tokens = serve(model, tokenizer, scenario, max_batch_size=16, max_seq_len=256)
        elapsed = time.perf_counter() - start
        print(f"\nglm-tiny, {name}: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.0f} tokens/s")


def fed_prompt_tokens(monkeypatch) -> list[int]:
    """The prompt tokens each prefill forward of the engine feeds, in order."""
    from openglm.serve.engine.runner import ModelRunner

    fed, original = [], ModelRunner.prefill

    def prefill(runner, slots, chunks):
        fed.append(sum(map(len, chunks)))
        return original(runner, slots, chunks)

    monkeypatch.setattr(ModelRunner, "prefill", prefill)
    return fed


def shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("first_running", [False, True], ids=["first ended", "first running"])
def test_a_prompt_sharing_a_cached_prefix_skips_its_prefill(model, tokenizer, monkeypatch, first_running):
    # Two questions after the same system prompt. The second feeds only what follows the shared
    # prefix, whose keys it takes from the first's slot (a copy while the first still runs), and
    # gets the tokens it gets alone.
    system = tokenizer.encode(PROMPTS[2] * 2)
    first, second = system + tokenizer.encode(" What is it?"), system + tokenizer.encode(" Who wrote it?")
    common = shared(first, second)
    assert common >= len(system) > 20
    fed = fed_prompt_tokens(monkeypatch)
    monkeypatch.setattr(Engine, "PACK_MAX_TOKENS", 0)  # prompts fed by prefill forwards only

    async def scenario(engine):
        one = engine.submit(EngineRequest(first, greedy(30 if first_running else 4)))
        if first_running:
            await anext(one)
        else:
            await one.result()
        two = await engine.submit(EngineRequest(second, greedy(8))).result()
        await one.result()
        return two, engine.core.prefix_tokens

    (events, _), reused = serve(model, tokenizer, scenario, preempt_tokens=0, max_batch_size=2)
    assert reused == common and fed == [len(first), len(second) - common]
    assert [e.token for e in events] == alone(model, tokenizer, second, greedy(8))[0]


def test_the_same_prompt_again_feeds_its_last_token_only(model, tokenizer, monkeypatch):
    ids = tokenizer.encode(PROMPTS[0])
    fed = fed_prompt_tokens(monkeypatch)

    async def scenario(engine):
        return [[e.token for e in (await engine.submit(EngineRequest(ids, greedy(6))).result())[0]] for _ in range(2)]

    again = serve(model, tokenizer, scenario)
    assert fed == [len(ids), 1] and again[0] == again[1] == alone(model, tokenizer, ids, greedy(6))[0]


def test_cached_prefixes_are_shared_within_a_cache_scope_only(model, tokenizer, monkeypatch):
    ids = tokenizer.encode(PROMPTS[2])
    fed = fed_prompt_tokens(monkeypatch)

    async def scenario(engine):
        for scope in ("a", "b", None, "a"):
            await engine.submit(EngineRequest(ids, greedy(2), cache_scope=scope)).result()

    serve(model, tokenizer, scenario)
    assert fed == [len(ids)] * 3 + [1]  # "b" and no scope prefill again; "a" again does not
