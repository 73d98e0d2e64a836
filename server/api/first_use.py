"""Resolution on first use (`--adapter-resolver`): a generation request naming an unregistered adapter that the
resolver may serve registers it before the request resolves its version.

Concurrent first requests for one name join one resolution (one task per name on the event loop, shared through
`asyncio.shield`: a client that leaves does not cancel it for the others); the registration itself runs in the
admin pool (server/api/admin_work.py). Names the resolver refuses (pattern, `.`/`..`) and misses it remembers
are answered without starting any work; the request then gets the usual 404 (or the remembered error).
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from loraplex.adapters.versions import split_key
from loraplex.server.api.admin_work import run_admin
from loraplex.server.api.auth import caller
from loraplex.server.api.generation import runtime_of


async def resolve_on_first_use(request: Request, model: str | None) -> None:
    """Register `model`'s adapter from the resolver when it is not registered yet (and the resolver may serve
    it); raises the resolution's AdapterError. A no-op without --adapter-resolver."""
    rt = runtime_of(request)
    resolver = rt.resolver
    if resolver is None or not model or model == rt.served_model_name or rt.store is None:
        return
    name = split_key(model)[0]
    if name in rt.store or not caller(request).may_use(name):
        return  # a name its tenant may not use is the same 404 as an unknown one: nothing is resolved for it
    if not resolver.eligible(name):
        resolver.refused(name)
        return  # answered 404 as any unknown model, nothing touched
    miss = resolver.remembered_miss(name)
    if miss is not None:
        raise miss
    pending: dict[str, asyncio.Future[None]] = request.app.state.resolving
    task = pending.get(name)
    if task is None:
        task = pending[name] = asyncio.ensure_future(run_admin(resolver.resolve, name))
        task.add_done_callback(lambda _: pending.pop(name, None))
    await asyncio.shield(task)
