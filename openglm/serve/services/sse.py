"""Answers written from the response schemas: JSON bodies and server-sent events."""

from __future__ import annotations

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from .generation import Job


def json_response(body: BaseModel, headers: dict[str, str]) -> Response:
    return Response(body.model_dump_json(exclude_unset=True), media_type="application/json", headers=headers)


def sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json(exclude_unset=True)}\n\n"


class SSEResponse(StreamingResponse):
    """A server-sent-event stream that stops its job when the response ends in any way (client gone)."""

    def __init__(self, job: Job | None, content, headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.job is not None:
                self.job.stop()
