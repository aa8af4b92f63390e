"""The scheduler's rules on plain records: no model, no cache, no thread."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from openglm.serve.engine.scheduler import Budgets, first_prompts, schedule


@dataclass(eq=False)
class Req:
    prompt_len: int
    prefilled: int = 0
    generated: int = 0  # tokens generated so far (the last one not yet in the cache)
    submitted: float = 0.0
    deadline: float | None = None
    cancelled: bool = False

    @property
    def cached(self) -> int:
        return self.prefilled if self.prefilled < self.prompt_len else self.prompt_len + self.generated - 1


def decoding(prompt_len: int, generated: int = 1, submitted: float = 0.0) -> Req:
    return Req(prompt_len, prompt_len, generated, submitted)


def test_free_slots_take_the_oldest_waiting_requests():
    running = [decoding(5), decoding(7)]
    waiting = [Req(3, submitted=1), Req(4, submitted=2), Req(2, submitted=3)]
    plan = schedule(running, waiting, Budgets(max_batch_size=4, prefill_chunk=64))
    assert plan.admit == 2
    assert [r for r, _ in plan.prefill] == waiting[:2] and [n for _, n in plan.prefill] == [3, 3]
    assert plan.packed and plan.decode == running  # 2 decode + 6 prompt tokens: one packed forward


def test_a_full_batch_admits_nobody_and_an_idle_one_plans_nothing():
    full = schedule([decoding(5)] * 2, [Req(3)], Budgets(max_batch_size=2))
    assert (full.admit, full.prefill) == (0, [])
    idle = schedule([], [], Budgets(max_batch_size=2))
    assert (idle.admit, idle.prefill, idle.decode, idle.packed) == (0, [], [], False)


def test_the_oldest_prompt_sets_the_chunk_and_the_others_join_within_the_budget():
    # Oldest first whatever their slot order: the 6-token remainder of the oldest sets T = 6; the
    # budget of 20 token slots holds 3 rows of 6; the 2-token prompt is fed whole (left-padded).
    oldest = Req(16, prefilled=10, submitted=0)
    others = [Req(2, submitted=2), Req(9, submitted=1), Req(30, submitted=3), Req(4, submitted=4)]
    plan = schedule([*others, oldest], [], Budgets(max_batch_size=8, prefill_chunk=20))
    assert [(r, n) for r, n in plan.prefill] == [(oldest, 6), (others[1], 6), (others[0], 2)]


def test_a_long_prompt_is_cut_at_the_chunk_and_fed_over_several_steps():
    long = Req(10)
    fed = []
    while long.prefilled < long.prompt_len:
        plan = schedule([long], [], Budgets(max_batch_size=1, prefill_chunk=4))
        ((request, n),) = plan.prefill
        fed.append(n)
        long.prefilled += n
    assert fed == [4, 4, 2]
    assert plan.decode == [long]  # the step that completes the prompt decodes it too (unpacked)


def test_decode_and_chunks_pack_while_tokens_and_keys_stay_small():
    budgets = Budgets(max_batch_size=8, prefill_chunk=64, pack_max_tokens=10, pack_max_keys=100)
    running = [decoding(20, generated=5), decoding(30, generated=2)]  # 24 + 31 keys, plus one new token each
    fits = schedule(running, [Req(8)], budgets)  # 2 + 8 tokens, 25 + 32 + 8 = 65 keys
    assert fits.packed and fits.decode == running
    too_many_tokens = schedule(running, [Req(9)], budgets)
    too_many_keys = schedule([*running, decoding(40)], [Req(5)], budgets)
    for plan in (too_many_tokens, too_many_keys):
        # Unpacked: the prefill forward completes the prompt, which then decodes with the others.
        assert not plan.packed and plan.decode[-1] is plan.prefill[0][0]
    assert not schedule(running, [Req(8)], Budgets(max_batch_size=8, pack_max_tokens=0)).packed


def test_a_prompt_not_completed_this_step_does_not_decode():
    running = [decoding(5)]
    plan = schedule(running, [Req(100)], Budgets(max_batch_size=2, prefill_chunk=16, pack_max_tokens=0))
    assert plan.prefill[0][1] == 16 and plan.decode == running


@pytest.mark.parametrize("lengths, free, budget, expected", [
    ([3, 4, 5], 4, 16, 3),  # 3 rows padded to 5: 15 <= 16
    ([3, 4, 6], 4, 16, 2),  # 3 rows padded to 6: 18 > 16
    ([3, 4, 5], 2, 64, 2),  # no more than the free slots
    ([20, 2], 4, 16, 0),  # the oldest does not fit: nobody goes ahead of it
    ([3, 4], 4, 0, 0),  # preemption off
])
def test_first_prompts_fit_padded_together_in_the_budget(lengths, free, budget, expected):
    assert first_prompts([Req(n) for n in lengths], free, budget, now=0.0) == expected


def test_first_prompts_stop_at_an_ended_request():
    waiting = [Req(3), Req(3, cancelled=True), Req(3)]
    assert first_prompts(waiting, 4, 64, now=0.0) == 1
    timed_out = [Req(3, deadline=5.0), Req(3)]
    assert first_prompts(timed_out, 4, 64, now=4.9) == 2
    assert first_prompts(timed_out, 4, 64, now=5.0) == 0


def test_the_plan_changes_nothing():
    running, waiting = [decoding(5), Req(9, prefilled=3)], [Req(4)]
    before = [vars(r).copy() for r in [*running, *waiting]]
    schedule(running, waiting, Budgets(max_batch_size=4, prefill_chunk=4))
    first_prompts(waiting, 2, 64, now=0.0)
    assert [vars(r) for r in [*running, *waiting]] == before and len(waiting) == 1
