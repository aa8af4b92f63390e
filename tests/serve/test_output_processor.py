"""The front end's output processor on hand-made engine outputs: no model, no engine thread."""

from __future__ import annotations

import asyncio

from openglm.serve.engine import EngineOutput, OutputProcessor, RequestHandle


def run(tokenizer, stop_strings, outputs):
    """Hand ``outputs`` (one list per engine step) to a processor tracking one request "r"; its events,
    finish reason, billed tokens and the ids the processor asked the engine to abort."""
    aborted, cancelled = [], []

    async def main():
        processor = OutputProcessor(tokenizer, aborted.append)
        handle = RequestHandle("r", 3, asyncio.get_running_loop(), cancelled.append)
        processor.add(handle, stop_strings)
        for step in outputs:
            processor.dispatch(step)  # as the engine thread does: through the handle's loop
            await asyncio.sleep(0)
        events, finish = await handle.result()
        return events, finish, handle, len(processor)

    events, finish, handle, left = asyncio.run(main())
    assert left == 0 and cancelled == []
    return events, finish, handle, aborted


def tokens(tokenizer, text):
    return [[EngineOutput("r", t)] for t in tokenizer.encode(text)]


def test_text_is_detokenized_in_the_front_end_and_the_last_output_ends_it(tokenizer):
    steps = tokens(tokenizer, "the general language model")
    steps[-1][0].finish_reason = "length"
    events, finish, handle, aborted = run(tokenizer, [], steps)
    assert "".join(e.text for e in events) == tokenizer.decode(tokenizer.encode("the general language model"))
    assert finish == "length" == events[-1].finish_reason and [e.finish_reason for e in events[:-1]] == [None] * (
        len(events) - 1)
    assert handle.completion_tokens == len(events) == len(steps) and aborted == []


def test_a_stop_string_ends_the_request_here_and_aborts_it_in_the_engine(tokenizer):
    # The engine went on generating past the stop string (its outputs were already on their way):
    # they are dropped, and not billed.
    text = "the general language model fills blanks"
    steps = tokens(tokenizer, text)
    events, finish, handle, aborted = run(tokenizer, ["language"], steps + [[EngineOutput("r", None, "cancelled")]])
    assert "".join(e.text for e in events) == "the general "
    assert finish == "stop" == events[-1].finish_reason and aborted == ["r"]
    assert handle.completion_tokens == len(events) < len(steps)


def test_a_stop_token_ends_without_its_text_and_the_timings_reach_the_handle(tokenizer):
    ids = tokenizer.encode("the general")
    steps = [[EngineOutput("r", ids[0], queue_time=0.5, first_token_time=0.75)]] + \
        [[EngineOutput("r", t, latency=0.25)] for t in ids[1:]] + [[EngineOutput("r", 0, "stop", latency=0.25)]]
    events, finish, handle, aborted = run(tokenizer, [], steps)
    assert "".join(e.text for e in events) == tokenizer.decode(ids) and events[-1].text == ""
    assert (finish, aborted) == ("stop", [])
    assert (handle.queue_time, handle.first_token_time) == (0.5, 0.75)
    assert handle.inter_token_latencies == [0.25] * len(ids)


def test_a_request_ended_without_a_token_has_no_event(tokenizer):
    events, finish, handle, aborted = run(tokenizer, [], [[EngineOutput("r", None, "cancelled", queue_time=0.1)]])
    assert (events, finish, handle.completion_tokens, aborted) == ([], "cancelled", 0, [])
