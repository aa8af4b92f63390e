"""Error answers of the HTTP API: one ``APIError``, sent in OpenAI's shape, or in Zhipu's under ``/api/paas/``.

OpenAI's: ``{"error": {"message", "type", "param", "code"}}`` with OpenAI's statuses; Zhipu's:
``{"error": {"code", "message"}}`` with Zhipu's string code, and its statuses where they differ.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ..errors import OpenGLMError
from . import schemas as S
from .store import AuthError, InsufficientBalance, RateLimited, RequestTooLarge, StoreError

log = logging.getLogger("openglm.serve")

ZHIPU_PREFIX = "/api/paas/"
# Zhipu's code for each HTTP status where a request has no more specific one (1210: bad parameters,
# 1222: no such API).
_ZHIPU_BY_STATUS = {400: "1210", 401: "1000", 403: "1220", 404: "1222", 413: "1210", 429: "1302",
                    500: "500", 503: "1305"}
# The HTTP status Zhipu sends where it differs from OpenAI's: Zhipu answers 434 for "no permission to
# this API" and 400 for every bad parameter (its clients have error classes for 400/401/429/500/503).
_ZHIPU_STATUS = {403: 434, 413: 400}


class APIError(Exception):
    """An error answer: HTTP ``status``, OpenAI's ``type``/``code``/``param``, and Zhipu's ``zhipu`` code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, zhipu: str | None = None, headers: dict[str, str] | None = None,
                 zhipu_status: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.zhipu = zhipu or _ZHIPU_BY_STATUS.get(status, str(status))
        self.zhipu_status = zhipu_status or _ZHIPU_STATUS.get(status, status)
        self.headers = headers or {}

    def status_for(self, path: str) -> int:
        return self.zhipu_status if path.startswith(ZHIPU_PREFIX) else self.status

    def body(self, path: str) -> S.ErrorResponse | S.ZhipuErrorResponse:
        if path.startswith(ZHIPU_PREFIX):
            return S.ZhipuErrorResponse(error=S.ZhipuErrorDetail(code=self.zhipu, message=self.message))
        return S.ErrorResponse(error=S.ErrorDetail(message=self.message, type=self.type, param=self.param,
                                                   code=self.code))

    def response(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return Response(self.body(path).model_dump_json(), status_code=self.status_for(path),
                        headers=headers if headers is not None else self.headers, media_type="application/json")


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) answer was ready."""


def overloaded(e: Exception) -> APIError:
    """503 for a request the engine cannot take now (its queue is full, or it stopped): clients retry."""
    return APIError(503, f"the server is overloaded: {e}", "server_error", "overloaded", headers={"retry-after": "1"})


def store_error(e: StoreError) -> APIError:
    """The answer to a refusal of the store (auth, balance, limits, a duplicate request id)."""
    if isinstance(e, AuthError) and e.http_status == 403:
        return APIError(403, str(e), "permission_error", "model_not_allowed", "model", zhipu="1220")
    if isinstance(e, AuthError):
        return APIError(401, str(e), "invalid_request_error", "invalid_api_key", zhipu=e.code)
    if isinstance(e, InsufficientBalance):
        # OpenAI's own clients retry a 429 unless told not to: topping up takes a person.
        return APIError(429, str(e), "insufficient_quota", "insufficient_quota", zhipu=e.code,
                        headers={"x-should-retry": "false"})
    if isinstance(e, RequestTooLarge):
        return APIError(400, str(e), code="request_too_large", param="max_tokens", zhipu=e.code)
    if isinstance(e, RateLimited):
        return APIError(429, str(e), e.kind, "rate_limit_exceeded", zhipu=e.code,
                        headers={"retry-after": str(max(1, math.ceil(e.retry_after)))})
    return APIError(e.http_status, str(e), "invalid_request_error", "duplicate_request_id"
                    if e.code == "1231" else None, zhipu=e.code)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every failure of ``app`` with an ``APIError`` body, counted in its services' metrics."""
    app.add_exception_handler(APIError, _answer)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(ClientGone, _gone)
    app.add_exception_handler(OpenGLMError, _openglm)
    app.add_exception_handler(Exception, _crash)


async def _answer(request: Request, err: APIError) -> Response:
    request.app.state.services.metrics.errors.labels(str(err.status)).inc()
    return err.response(request.url.path)


async def _invalid(request: Request, e: RequestValidationError) -> Response:
    return await _answer(request, _validation_error(e.errors()))


async def _http(request: Request, e: HTTPException) -> Response:
    message = e.detail if isinstance(e.detail, str) else "invalid request"
    if e.status_code == 400:  # Starlette's own: a body it could not read (e.g. not UTF-8)
        message = f"the request body could not be read: {message}"
    return await _answer(request, APIError(e.status_code, message, headers=dict(e.headers or {})))


async def _gone(request: Request, e: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def _openglm(request: Request, e: OpenGLMError) -> Response:  # a message our own code raised about the input
    return await _answer(request, APIError(400, str(e)))


async def _crash(request: Request, e: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return await _answer(request, APIError(500, "internal server error", "server_error"))


def _validation_error(errors: list[dict]) -> APIError:
    """400 invalid_request_error naming the parameter, as OpenAI answers (its clients: BadRequestError)."""
    # A value that fails every branch of a union (content: str | list[TextPart]) has an error per
    # branch: the one that is not "wrong type" says what is wrong with the value given.
    first = next((x for x in errors if not x.get("type", "").endswith(("_type", "_parsing"))),
                 errors[0] if errors else {})
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_branch(p)]
    kind = first.get("type", "")
    code = "missing_required_parameter" if kind == "missing" else \
        "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    return APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
                    + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""),
                    param=".".join(loc) or None, code=code, zhipu="1214" if loc else "1210")


def _union_branch(part) -> bool:
    """Whether a pydantic error location part names a union's branch ("str", "list[TextPart]"), not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))
