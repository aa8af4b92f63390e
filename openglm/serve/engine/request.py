"""What crosses the engine's layers: a request in, one output per generated token out, and the check
every request passes once, in the client that takes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import uuid4

from ...errors import OpenGLMError
from ...infer.sampling import SamplingParams


@dataclass
class EngineRequest:
    """One completion to generate: token ids in, tokens out."""

    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob and the top-k alternatives
    timeout: float | None = None  # seconds from submit; on expiry the request ends with finish_reason "timeout"
    request_id: str = field(default_factory=lambda: uuid4().hex)
    # A request reuses the cached prompt prefixes of requests with the same scope only (say, an
    # account's), so that nobody learns from a faster first token what another tenant sent.
    cache_scope: str | None = None


@dataclass(slots=True)
class EngineOutput:
    """What the engine core hands out for one request in one step: a token id, or only the end.

    ``finish_reason`` is set on the request's last output: "stop" (a stop token), "length",
    "timeout", "cancelled" or "error". The core knows tokens only; text and stop strings are the
    front end's (``OutputProcessor``).
    """

    request_id: str
    token: int | None  # None: the request ended without a new token
    finish_reason: str | None = None
    logprob: float | None = None  # log-softmax of the model's logits (before temperature and penalties)
    top_logprobs: list[tuple[int, float]] | None = None  # (token, logprob), most likely first
    queue_time: float | None = None  # seconds from submit to a batch slot, on the first output after admission
    first_token_time: float | None = None  # seconds from submit, on the first token
    latency: float | None = None  # seconds since the request's previous token, on every later token


@dataclass
class TokenEvent:
    """One generated token of one request, as the caller sees it."""

    token: int
    text: str  # new printable text this token completes (may be "")
    logprob: float | None = None  # log-softmax of the model's logits (before temperature and penalties)
    top_logprobs: list[tuple[int, float]] | None = None  # (token, logprob), most likely first
    finish_reason: str | None = None  # on the request's last token only: "stop" | "length" | "timeout"


class EngineFull(OpenGLMError):
    """The waiting queue is full, or the engine is not running: try again later."""


class PromptTooLong(OpenGLMError):
    """Prompt plus ``max_new_tokens`` does not fit in the engine's ``max_seq_len``."""


def check_request(request: EngineRequest, vocab_size: int, max_seq_len: int) -> None:
    """Raise ``OpenGLMError`` (``PromptTooLong`` for the length) for a request no engine can run."""
    ids, params = request.prompt_ids, request.params
    if not ids:
        raise OpenGLMError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in ids):
        raise OpenGLMError(f"prompt token ids must be in 0..{vocab_size - 1}")
    if params.max_new_tokens < 1:
        raise OpenGLMError("max_new_tokens must be >= 1")
    if request.logprobs is not None and not 0 <= request.logprobs <= vocab_size:
        raise OpenGLMError(f"logprobs must be in 0..{vocab_size}, got {request.logprobs}")
    if request.timeout is not None and request.timeout <= 0:
        raise OpenGLMError(f"timeout must be > 0 seconds, got {request.timeout}")
    if len(ids) + params.max_new_tokens > max_seq_len:
        raise PromptTooLong(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"engine's {max_seq_len} positions"
        )
