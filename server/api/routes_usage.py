"""`GET /v1/usage`: what each tenant was served since the server started (server/usage.py), the same numbers as
the `loraplex_tenant_*` metrics.

With `--tenants` a tenant's key sees its own entry, the operator's (--admin-key) every tenant's; without a tenants
file the admin key (or the API key alone, see auth.py) sees the one tenant "default".
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from loraplex.server.api.auth import KeysFirstRoute, caller, require_admin_key
from loraplex.server.runtime import Runtime

router = APIRouter(route_class=KeysFirstRoute)


@router.get("/v1/usage", dependencies=[Depends(require_admin_key)])
async def usage(request: Request) -> dict[str, Any]:
    rt: Runtime = request.app.state.runtime
    tenant = caller(request)
    visible = rt.tenant_names() if tenant.operator else [tenant.name]
    return {"object": "usage", "since": rt.usage.started, "data": rt.usage.report(visible, rt.queue_depths())}
