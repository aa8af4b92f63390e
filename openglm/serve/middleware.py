"""ASGI middleware of the HTTP API."""

from __future__ import annotations

from .errors import APIError


class BodyLimit:
    """Answer 413 to a body over ``max_bytes`` before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"0")
        too_large = APIError(413, f"request body is larger than {self.max_bytes} bytes", code="body_too_large")
        if not declared.isdigit():
            return await self._reply(scope, receive, send, APIError(400, "invalid Content-Length header"))
        if int(declared) > self.max_bytes:
            return await self._reply(scope, receive, send, too_large)
        body, more = bytearray(), True
        while more:  # a chunked body has no Content-Length: count as it comes
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._reply(scope, receive, send, too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # later calls wait for the client to go away, as the server's own receive does
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _reply(self, scope, receive, send, err: APIError):
        response = err.response(scope.get("path", ""), headers={"connection": "close"})
        await response(scope, receive, send)
