"""The scheduler: pure functions from the running and waiting requests and the step's budgets to a plan.

Nothing here touches the model, the cache, a clock or a lock: the engine core hands in what it
knows of each request (its prompt length, how much of it and of the whole row is in the cache, when
it came, whether a waiting one already ended) and carries the plan out. The rules:

- Short prompts go first (``first_prompts``): the oldest waiting prompts that fit in
  ``preempt_tokens`` together (left-padded to the longest) are prefilled in a forward of their own
  ahead of the step's decode, or between two layers of a forward already running, so under load the
  time to first token is about one prefill.
- Every free slot takes the oldest waiting request (``schedule``).
- Prompt chunks: the oldest prompt still prefilling sets the chunk length T (what it still needs,
  at most ``prefill_chunk``); the next oldest join with up to T tokens each while rows x T stays
  within ``prefill_chunk``, so a long prompt never stalls the running requests for long.
- Every request past its prompt decodes one token.
- The decode and the prompt chunks run as one packed forward (the weights read once, not twice)
  while their tokens and the keys they read stay small next to the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True)
class Budgets:
    """What one step may hold."""

    max_batch_size: int  # slots: requests running at once
    prefill_chunk: int = 256  # prompt tokens (padding included) fed per step
    preempt_tokens: int = 64  # waiting prompts that fit in this (padded, together) go first; 0: none do
    # A packed forward gathers its slots' keys and scores every token against all of them: worth it
    # while both stay small next to the weights a separate forward reads again.
    pack_max_tokens: int = 64
    pack_max_keys: int = 4096


class Scheduled(Protocol):
    """What the scheduler reads of a request."""

    prompt_len: int
    prefilled: int  # prompt tokens in the cache
    submitted: float  # when it came (any clock, the same for all)
    deadline: float | None  # when it times out, on that clock
    cancelled: bool

    @property
    def cached(self) -> int:  # tokens of the row in the cache: prompt, then each generated token but the last
        ...


S = TypeVar("S", bound=Scheduled)


@dataclass(frozen=True)
class StepPlan(Generic[S]):
    """One engine step.

    The oldest ``admit`` waiting requests take free slots first. Unpacked, the ``prefill`` chunks
    run in one left-padded forward, then ``decode`` in one forward of a token per row (prompts this
    prefill completes included: they decode in the same step). Packed, both run as one packed
    forward and ``decode`` holds only the requests already past their prompts.
    """

    admit: int
    prefill: list[tuple[S, int]]  # (request, prompt tokens fed this step), oldest first
    decode: list[S]
    packed: bool


def _ended(request: Scheduled, now: float) -> bool:
    return request.cancelled or (request.deadline is not None and now >= request.deadline)


def first_prompts(waiting: Sequence[S], free_slots: int, preempt_tokens: int, now: float) -> int:
    """How many of the oldest ``waiting`` requests go first: while they have free slots, have not
    ended by ``now`` (cancelled or timed out: the core ends those), and their prompts, left-padded
    to the longest, fit in ``preempt_tokens`` together."""
    count = longest = 0
    for request in waiting:
        longest = max(longest, request.prompt_len)
        if count == free_slots or _ended(request, now) or longest * (count + 1) > preempt_tokens:
            break
        count += 1
    return count


def schedule(running: Sequence[S], waiting: Sequence[S], budgets: Budgets) -> StepPlan[S]:
    """The step for ``running`` (the requests holding slots) and ``waiting`` (oldest first)."""
    admit = max(0, min(len(waiting), budgets.max_batch_size - len(running)))
    decode = [r for r in running if r.prefilled == r.prompt_len]
    prefilling = sorted((r for r in [*running, *waiting[:admit]] if r.prefilled < r.prompt_len),
                        key=lambda r: r.submitted)
    prefill: list[tuple[S, int]] = []
    if prefilling:
        T = min(prefilling[0].prompt_len - prefilling[0].prefilled, budgets.prefill_chunk)
        prefill = [(r, min(r.prompt_len - r.prefilled, T)) for r in prefilling[: budgets.prefill_chunk // T]]
    tokens = len(decode) + sum(n for _, n in prefill)
    keys = sum(r.cached + 1 for r in decode) + sum(r.cached + n for r, n in prefill)
    packed = bool(decode and prefill) and tokens <= budgets.pack_max_tokens and keys <= budgets.pack_max_keys
    if not packed:
        decode += [r for r, n in prefill if r.prefilled + n == r.prompt_len]
    return StepPlan(admit, prefill, decode, packed)
