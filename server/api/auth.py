"""API keys: `--api-key` guards generation routes, `--admin-key` guards adapter registration.

Routers whose routes need a key use `KeysFirstRoute`: FastAPI reads and validates a request's body before it runs
the route's dependencies, so without it a client with no key (or a wrong one) sending invalid JSON got a 422 about
the body instead of the documented 401.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from loraplex.server.api.errors import ApiError


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _check(request: Request, expected: str | None, what: str) -> None:
    if not expected:
        return
    got = _presented_key(request)
    if got is None:
        raise ApiError(401, f"missing {what} (send 'Authorization: Bearer <key>')",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(got.encode(), expected.encode()):
        raise ApiError(401, f"invalid {what}", headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request) -> None:
    _check(request, request.app.state.runtime.config.server.api_key, "API key")


def require_admin_key(request: Request) -> None:
    _check(request, request.app.state.runtime.config.server.admin_key, "admin key")


KEY_CHECKS = (require_api_key, require_admin_key)


class KeysFirstRoute(APIRoute):
    """An APIRoute that runs its key dependencies (`KEY_CHECKS`) before the body is read: 401 comes before any 413,
    422 or 400 about the body. The dependencies still run as declared (they are cheap), and stay in the schema."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = [d.dependency for d in self.dependencies if d.dependency in KEY_CHECKS]
        if not checks:
            return handler

        async def keys_first(request: Request) -> Response:
            for check in checks:
                check(request)
            return await handler(request)

        return keys_first
