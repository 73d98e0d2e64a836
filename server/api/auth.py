"""Keys, and who a request comes from (`caller`): a tenant of `--tenants`, the operator, or everyone.

Without a tenants file the server has at most two keys:

| keys set | generation, `/v1/models`, `/tokenize` | adapter routes, `/v1/usage` |
|---|---|---|
| none | open | open (a warning at start when listening beyond loopback) |
| `--api-key` | the API key | the API key (one key closes the server, as vLLM's `--api-key` does) |
| `--admin-key` | open | the admin key |
| both | the API key or the admin key | the admin key |

With `--tenants` every route but `/health`, `/ready`, `/metrics` and `/version` needs a key: a tenant's (the file),
or the operator's (`--admin-key`, who may do everything). What a tenant may do with which adapter is then checked by
the routes (`Tenant.may_use`, `Tenant.may_admin`). `/metrics` needs `--metrics-key` (or the admin key) when that is
set. Keys are compared in constant time (hmac.compare_digest; tenants' by their SHA-256 digest, server/tenants.py)
and never logged.

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
from loraplex.server.tenants import EVERYONE, OPERATOR_TENANT, Tenant

USE, ADMIN, METRICS = "use", "admin", "metrics"  # what a route needs a key for


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _same(got: str, expected: str) -> bool:
    return hmac.compare_digest(got.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def _refused(what: str, key: str | None) -> ApiError:
    message = f"missing {what} (send 'Authorization: Bearer <key>')" if key is None else f"invalid {what}"
    return ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})


def identify(request: Request, scope: str) -> Tenant:
    """Who sent `request` for a route of `scope` (USE, ADMIN, METRICS); 401 for a missing or unknown key."""
    rt = request.app.state.runtime
    cfg, key = rt.config.server, presented_key(request)
    directory = rt.tenants
    if scope == METRICS:
        _check_any(key, [k for k in (cfg.metrics_key, cfg.admin_key) if k] if cfg.metrics_key else [], "metrics key")
        return OPERATOR_TENANT
    if directory is None:
        _check_any(key, *_keys_without_tenants(cfg.api_key, cfg.admin_key, scope))
        return EVERYONE
    if key is None:
        raise _refused("API key", None)
    if cfg.admin_key and _same(key, cfg.admin_key):
        return OPERATOR_TENANT
    tenant = directory.table.identify(key)
    if tenant is None:
        raise _refused("API key", key)
    return tenant


def _keys_without_tenants(api_key: str | None, admin_key: str | None, scope: str) -> tuple[list[str], str]:
    """The keys a route of `scope` accepts (none: it is open) and what to call them in a 401."""
    if scope == ADMIN:
        if admin_key:
            return [admin_key], "admin key"
        return ([api_key] if api_key else []), "API key"
    return ([api_key] + ([admin_key] if admin_key else []) if api_key else []), "API key"


def _check_any(key: str | None, accepted: list[str], what: str) -> None:
    """401 unless `key` is one of `accepted` (no key needed when `accepted` is empty); every one is compared."""
    if not accepted:
        return
    if key is None:
        raise _refused(what, None)
    matched = False
    for expected in accepted:
        matched |= _same(key, expected)
    if not matched:
        raise _refused(what, key)


def caller(request: Request) -> Tenant:
    """Who the route's key dependency found (everyone, for routes without one)."""
    return getattr(request.state, "tenant", EVERYONE)


def require_api_key(request: Request) -> None:
    """Generation, models, tokenize: the API key (or, with --tenants, any tenant's key)."""
    request.state.tenant = identify(request, USE)


def require_admin_key(request: Request) -> None:
    """Adapter routes and /v1/usage: the admin key (or, with --tenants, any tenant's key: the routes check names)."""
    request.state.tenant = identify(request, ADMIN)


def require_metrics_key(request: Request) -> None:
    identify(request, METRICS)


KEY_CHECKS = (require_api_key, require_admin_key, require_metrics_key)


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
