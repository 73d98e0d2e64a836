"""API keys: `--api-key` guards generation routes, `--admin-key` guards adapter registration."""

from __future__ import annotations

import hmac

from fastapi import Request

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
