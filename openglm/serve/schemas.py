"""Request and response bodies of the HTTP API (pydantic): OpenAI's shapes, Zhipu's request fields, GLM infilling.

Unknown request fields are ignored, as OpenAI-compatible servers do, so that clients sending newer
fields still work; every field we read is typed and bounded, so a bad value is a 400, never a crash.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

MAX_N = 16  # choices per request: each one is a full engine request
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_TOP_LOGPROBS = 20
MAX_UNITS = 2**53  # money and ids stay exact in JSON numbers and far inside the database's 64-bit integers
MAX_LIMIT = 2**31


# JSON may escape half of a UTF-16 surrogate pair ("\\udc80"); Python then holds a str that is not
# Unicode text: no tokenizer, database or UTF-8 encoder takes it.
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_DEPTH = 32  # nesting of free-form JSON (a tool's parameters schema): walked recursively downstream


def _check_value(value: Any, depth: int = 0) -> None:
    """Raise ValueError if ``value`` (str, or lists and dicts of them) holds a lone surrogate or nests
    deeper than ``MAX_DEPTH``."""
    if isinstance(value, str):
        if not value.isascii() and (bad := _SURROGATE.search(value)):
            raise ValueError(f"contains an unpaired UTF-16 surrogate (\\u{ord(bad.group()):04x}), which is not text")
    elif isinstance(value, (list, dict)):
        if depth >= MAX_DEPTH:
            raise ValueError(f"nests deeper than {MAX_DEPTH} levels")
        for item in [*value, *value.values()] if isinstance(value, dict) else value:  # a dict: keys, values
            _check_value(item, depth + 1)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _text(cls, value):
        """Every field of every request body holds only real text, nested to a bounded depth (nested
        bodies check their own fields, so that the error names the innermost one: ``messages.0.content``)."""
        _check_value(value)
        return value


def _stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _unsupported(message: str) -> PydanticCustomError:
    """A field that would change the answer in a way this server cannot honour (``suffix``, ``best_of``,
    ``dimensions``, a JSON ``response_format``, ``tool_choice`` with no tools, penalties, ``logit_bias``):
    declared so that it is refused by name, never silently ignored as unknown fields are."""
    return PydanticCustomError("unsupported", message)


_TokenId = Annotated[int, Field(ge=0, lt=MAX_LIMIT)]


class StreamOptions(_Request):
    include_usage: bool = False


class FunctionDef(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionCall(_Request):  # in requests (an assistant turn) and in responses
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "observation"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def to_template(self) -> dict:
        """The dict ``render_chat`` takes: text parts joined, OpenAI's ``developer`` role read as ``system``."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ResponseFormat(_Request):
    type: str


def _text_format_only(cls, value: ResponseFormat | None):
    if value is not None and value.type != "text":
        raise _unsupported(f'only {{"type": "text"}} is supported: this server cannot constrain the output to '
                           f'{value.type!r}')
    return value


def _tool_results_follow_calls(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
    """A tool result answers a call: it must follow an assistant message with ``tool_calls`` (other results
    of the same calls between them), and its ``tool_call_id``, if any, must name one of those calls."""
    calls: list[ToolCall] | None = None  # the calls of the assistant message that results may answer
    for i, m in enumerate(messages):
        if m.role in ("tool", "observation"):
            if not calls:
                raise PydanticCustomError("invalid_value", f"message {i} (role {m.role!r}) is a tool result with "
                                          "no preceding assistant message with tool_calls")
            ids = {c.id for c in calls if c.id is not None}
            if m.tool_call_id is not None and ids and m.tool_call_id not in ids:
                raise PydanticCustomError("invalid_value", f"message {i}: tool_call_id {m.tool_call_id!r} answers "
                                          "none of the preceding tool_calls")
        else:
            calls = m.tool_calls if m.role == "assistant" else None
    return messages


class _Sampling(_Request):
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**53)] | None = None  # exact in JSON numbers
    # vLLM's field: cached prompt prefixes are reused only between requests of one account and one salt
    cache_salt: Annotated[str, Field(max_length=256)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value:  # OpenAI's additive penalties: the sampler has none (0, the default, is accepted)
            raise _unsupported("only 0 is supported: this server does not apply frequency or presence penalties")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value):
        if value:
            raise _unsupported("not supported: this server does not bias logits (an empty map is accepted)")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return _stop_list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[int, Field(ge=1, lt=MAX_LIMIT)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, lt=MAX_LIMIT)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    _messages = field_validator("messages")(_tool_results_follow_calls)
    _response_format = field_validator("response_format")(_text_format_only)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value, info: ValidationInfo):
        if value is None or "tools" not in info.data:  # (tools failed validation: that error is enough)
            return value
        if not info.data["tools"]:
            raise _unsupported("only allowed when tools are given")
        if value not in ("auto", "none"):  # "required" or a named function: nothing forces the model to call
            raise _unsupported('only "auto" and "none" are supported: this server cannot force a tool call')
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ZhipuChatRequest(_Sampling):
    """``POST /api/paas/v4/chat/completions``: Zhipu's fields on top of the chat ones (one stop string)."""

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    request_id: Annotated[str, Field(min_length=6, max_length=64)] | None = None
    do_sample: bool = True
    user_id: Annotated[str, Field(min_length=6, max_length=128)] | None = None
    max_tokens: Annotated[int, Field(ge=1, lt=MAX_LIMIT)] | None = None
    stop: Annotated[list[str], Field(max_length=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] = 0.95
    top_p: Annotated[float, Field(gt=0, lt=1)] = 0.7
    tools: list[Tool] | None = None
    tool_choice: Literal["auto"] | None = None
    response_format: ResponseFormat | None = None

    _messages = field_validator("messages")(_tool_results_follow_calls)
    _response_format = field_validator("response_format")(_text_format_only)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value, info: ValidationInfo):
        if value is not None and "tools" in info.data and not info.data["tools"]:
            raise _unsupported("only allowed when tools are given")
        return value


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of token ids, or a list of either (one batch).

    ``echo`` puts the prompt before each completion, and with ``logprobs`` the prompt tokens' logprobs
    before the completion's (the first token's is null); ``max_tokens: 0`` generates nothing, so that
    ``echo`` with ``logprobs`` scores a text (log-likelihood evaluation).
    """

    model: str
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=64)]
             | Annotated[list[_TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[_TokenId], Field(min_length=1)]], Field(min_length=1, max_length=64)])
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[int, Field(ge=0, lt=MAX_LIMIT)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    user: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:  # a suffix asks for text inserted before it: /v1/infill fills blanks instead
            raise _unsupported("not supported; use /v1/infill to fill a blank inside a text")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value, info: ValidationInfo):
        if value is not None and value != info.data.get("n", 1):
            raise _unsupported("not supported (only best_of equal to n, which returns every choice)")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``: mean-pooled final hidden states of each input."""

    model: str
    input: (str | Annotated[list[str], Field(min_length=1, max_length=256)]
            | Annotated[list[Annotated[int, Field(ge=0, lt=MAX_LIMIT)]], Field(min_length=1)]
            | Annotated[list[Annotated[list[Annotated[int, Field(ge=0, lt=MAX_LIMIT)]], Field(min_length=1)]],
                        Field(min_length=1, max_length=256)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value):
        if value is not None:  # the vector is the model's hidden state: its width is not a choice
            raise _unsupported("not supported: this model's embeddings have one fixed width")
        return value

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if value == "" or (isinstance(value, list) and any(v == "" for v in value)):
            raise ValueError("input must not be empty text")
        return value


class InfillRequest(_Request):
    """``POST /v1/infill``: GLM blank infilling of ``[MASK]`` / ``[sMASK]`` / ``[gMASK]`` in ``prompt``."""

    model: str
    prompt: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, lt=MAX_LIMIT)] = 32  # per blank
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**53)] | None = None  # exact in JSON numbers
    request_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None


# --- responses -------------------------------------------------------------------------------------

class _Response(BaseModel):
    """A response body, written with ``model_dump_json(exclude_unset=True)``: a field with a default
    value (``object``, ``role``) is always written, an optional one (default None) only where it was
    given (None then as null), so that each body has exactly the keys OpenAI's has."""

    def model_post_init(self, context: Any) -> None:
        self.__pydantic_fields_set__.update(name for name, field in type(self).model_fields.items()
                                            if field.default is not None)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    request_id: str | None = None  # Zhipu's route echoes it


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token of an echo, which nothing predicts
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(_Response):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingList(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Infill(_Response):
    id: str
    object: Literal["infill"] = "infill"
    created: int
    model: str
    text: str  # the prompt with every blank filled
    spans: list[str]  # what went into each blank, in order
    usage: Usage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "openglm"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChunkToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatDelta(_Response):
    """What a stream chunk adds to a choice's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion; the last one (``include_usage``) has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    request_id: str | None = None  # Zhipu's route echoes it
    usage: Usage | None = None


class CompletionChunkChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionChunk(_Response):
    """One server-sent event of a streamed text completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ErrorDetail(_Response):
    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


class ZhipuErrorDetail(_Response):
    code: str  # Zhipu's codes are strings: "1113"
    message: str


class ZhipuErrorResponse(_Response):
    error: ZhipuErrorDetail


# --- the server, accounts, keys and admin ----------------------------------------------------------

# A time as the API has always written it: ISO 8601 with its offset ("+00:00"; pydantic would write "Z").
_Time = Annotated[datetime, PlainSerializer(datetime.isoformat, return_type=str)]


class Health(_Response):
    status: Literal["ok"] = "ok"
    model: str


class ObjectList(_Response):
    """A list answer of the account API: ``{"object": "list", "data": [...]}``."""

    object: Literal["list"] = "list"
    data: list[Any]


class KeyView(_Response):
    """One of the account's keys as the account sees it (never its secret, but once: ``NewKeyView``)."""

    id: int
    name: str | None
    prefix: str
    created_at: _Time
    expires_at: _Time | None
    revoked_at: _Time | None
    models: list[str] | None
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    current: bool  # the key of the request that asks

    @classmethod
    def of(cls, key, current_id: int, **more) -> KeyView:
        """The view of ``key`` (a ``KeyInfo``) for a request made with the key ``current_id``."""
        return cls(**{name: getattr(key, name) for name in KeyView.model_fields if name != "current"},
                   current=key.id == current_id, **more)


class NewKeyView(KeyView):
    secret: str


class AccountView(_Response):
    id: int
    name: str
    balance: int  # units: 1e-6 of the currency
    reserved: int  # held for requests running now
    available: int
    key: KeyView  # the key of the request


class Revoked(_Response):
    id: int
    revoked: Literal[True] = True


class Deleted(_Response):
    id: str
    object: str  # what was deleted: "conversation.deleted"
    deleted: Literal[True] = True


class Balance(_Response):
    account_id: int
    balance: int


class ModelPrice(_Response):
    model: str
    input_per_million: int
    output_per_million: int



class UsageReport(BaseModel):
    account_id: int
    balance: int  # units: 1e-6 of the currency
    usage: list[dict[str, Any]]  # by day and model


class NewAccount(_Request):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    balance: Annotated[int, Field(ge=0, lt=MAX_UNITS)] = 0


class TopUp(_Request):
    amount: Annotated[int, Field(gt=0, lt=MAX_UNITS)]


class NewKey(_Request):
    account_id: Annotated[int, Field(ge=1, lt=MAX_UNITS)]
    name: str | None = None
    expires_at: str | None = None  # ISO 8601
    models: list[str] | None = None
    rpm: Annotated[int, Field(ge=1, lt=MAX_LIMIT)] | None = None
    tpm: Annotated[int, Field(ge=1, lt=MAX_LIMIT)] | None = None
    max_concurrency: Annotated[int, Field(ge=1, lt=MAX_LIMIT)] | None = None
    admin: bool = False


class Price(_Request):
    input_per_million: Annotated[int, Field(ge=0, lt=MAX_LIMIT)]
    output_per_million: Annotated[int, Field(ge=0, lt=MAX_LIMIT)]
