"""Which adapter version answers a request, and saying so: the canary route key in, the version header out.

A request for an adapter name runs its current version, or the version its canary route picks (adapters/
versions.py `pick`): a sticky route hashes the request's route key, the `X-Loraplex-Route-Key` header or else
the OpenAI body's `user`, so one user stays on one version while the route stands. Every generation response
carries `X-Loraplex-Adapter-Version`: the 12 hex digits of the version's sha256, "base" for the base model, or
"name@version,…" for a merge; the response's `model` stays the name the caller sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.adapters.digest import short
from loraplex.adapters.versions import split_key

if TYPE_CHECKING:
    from loraplex.adapters.merge import MergeRecipe

ROUTE_KEY_HEADER = "x-loraplex-route-key"
VERSION_HEADER = "x-loraplex-adapter-version"
_MAX_ROUTE_KEY = 256  # characters of a route key that count (a longer header is cut, never refused)


def route_key(request: Request, user: str | None = None) -> str | None:
    """The key a sticky route hashes: the X-Loraplex-Route-Key header, else the OpenAI `user`, else None."""
    header = request.headers.get(ROUTE_KEY_HEADER)
    return header[:_MAX_ROUTE_KEY] if header else user


def mark_version(request: Request, adapter: str | None, merge: MergeRecipe | None = None) -> None:
    """Record which weights answer this request (`adapter`: the engine key name@sha256; None: the base model,
    or `merge`); AdapterVersionHeader sends it."""
    if merge is not None:
        value = ",".join(f"{name}@{short(sha or '')}" for name, sha in map(split_key, merge.names))
    else:
        sha = split_key(adapter)[1] if adapter is not None else None
        value = short(sha) if sha else "base"
    request.state.adapter_version = value


class AdapterVersionHeader:
    """ASGI middleware: adds X-Loraplex-Adapter-Version to a response whose request was marked (its headers
    leave when the response starts, after the route resolved the version, streamed responses included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, _with_version(scope, send))


def _with_version(scope: Scope, send: Send) -> Callable[[Message], Awaitable[None]]:
    async def send_with_version(message: Message) -> None:
        if message["type"] == "http.response.start":
            version = (scope.get("state") or {}).get("adapter_version")
            if version:
                message = {**message, "headers": [*message.get("headers", ()), (VERSION_HEADER.encode(),
                                                                                  version.encode())]}
        await send(message)

    return send_with_version
