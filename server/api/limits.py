"""Limits at the door: the request body's size (a pure ASGI middleware: checks Content-Length and counts streamed
bytes), and how many admission slots one request may take.

Admission (Runtime.try_admit) counts sequences, not HTTP requests: a request weighs its prompts x best_of (or n),
since each runs as one sequence. One adapter (the base model included) may hold 3/4 of --max-queue, and one request
at most half of that: a single 64-prompt x n=3 request could otherwise take its adapter's whole share, and every
other client of that adapter got 429 until it ended.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from loraplex.server.runtime import adapter_queue_limit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def request_limit(max_queue: int) -> int:
    """Sequences one request may run at once: half of what one adapter may hold (at least 1)."""
    return max(1, adapter_queue_limit(max_queue) // 2)


def check_request_weight(max_queue: int, weight: int, what: str) -> str | None:
    """Why a request of `weight` sequences (`what`: "2 prompts x 3 choices") can never be admitted, or None."""
    limit = request_limit(max_queue)
    if weight <= limit:
        return None
    return (f"this request runs {weight} sequences ({what}); one request may run at most {limit} at once (half of "
            f"the {adapter_queue_limit(max_queue)} one adapter may hold of --max-queue {max_queue}): send fewer "
            "prompts or choices per request")


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed (chunked) body passes the limit. An HTTPException, so FastAPI's body
    reader passes it through (it turns any other error into 400 "There was an error parsing the body") and the
    app's handler answers 413 in the caller's dialect."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


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
                raise BodyTooLarge(limit)
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
