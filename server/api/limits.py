"""Request body size limit as a pure ASGI middleware (checks Content-Length and counts streamed bytes)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """413 for bodies over `max_bytes`; adapter uploads (PUT /v1/adapters/...) get `max_upload_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_upload_bytes: int) -> None:
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(scope, send, limit)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await _reject(scope, send, limit)

    def _limit(self, scope: Scope) -> int:
        upload = scope["method"] == "PUT" and scope["path"].startswith("/v1/adapters/")
        return self.max_upload_bytes if upload else self.max_bytes


async def _reject(scope: Scope, send: Callable[[Message], Awaitable[None]], limit: int) -> None:
    message = f"request body exceeds the limit of {limit} bytes"
    if scope["path"].startswith("/generate") or scope["path"] == "/":  # "/": TGI compat route
        body: dict[str, Any] = {"error": message, "error_type": "validation"}
    else:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": 413}}
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
