"""Adapter admin API: register (by path/S3 URL, by upload, or new weights from a training loop), replace, roll back,
canary routes, prefetch, list, describe, unregister; vLLM's aliases.

Every route needs `--admin-key` when one is set. Registration reads, hashes and validates files (blocking I/O, S3)
and waits for the engine thread to take the new version in, so it runs in the admin pool's threads, at a lower CPU
priority (server/api/admin_work.py), never on the HTTP server's shared worker threads (where prompts are tokenized):
registrations waiting on a slow store stall nobody's generation, and the event loop keeps serving meanwhile. Records
come from the snapshot the engine publishes (store.describe). A replace, rollback or route change is atomic:
requests admitted before it finish on the version they resolved, every request admitted after its answer runs on
the new choice (adapters/versions.py). Unregistering lets running requests finish on the device copy, ends queued
ones with an error, and refuses new ones (404).

Tenants (--tenants): a tenant lists and reads the adapters it may use (`adapters` globs; any other is a 404 exactly
as for a name nobody registered), and registers, replaces, rolls back, routes, prefetches and deletes only names its
`admin` globs match (else 403, decided by the name alone, before anything is looked up), within its `max_adapters`
and, for uploads, its `max_upload_bytes`. Pinning holds a device slot for every tenant, so only the operator
(--admin-key) may pin. Names carry at most one '/', a namespace (`acme/support`), so the routes take `{name:path}`,
and the routes with a word after the name come first (adapters/names.py reserves those words after a namespace).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse

from loraplex.adapters.digest import short
from loraplex.adapters.errors import AdapterConflictError, AdapterNotFoundError
from loraplex.adapters.names import validate_adapter_name
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.versions import taken, version_of
from loraplex.server.api.admin_work import run_admin
from loraplex.server.api.auth import KeysFirstRoute, caller, require_admin_key
from loraplex.server.api.errors import ApiError
from loraplex.server.api.limits import lower_body_limit
from loraplex.server.api.schemas_adapters import (
    REPLACE_FIELD,
    AdapterInfo,
    AdapterList,
    LoadLoRAAdapterRequest,
    PrefetchAnswer,
    PrefetchRequest,
    RegisterAdapterRequest,
    RollbackRequest,
    RouteRequest,
    UnloadLoRAAdapterRequest,
    parse_bool,
    upload_payload,
)
from loraplex.server.runtime import Runtime
from loraplex.server.tenants import Tenant

router = APIRouter(dependencies=[Depends(require_admin_key)], tags=["adapters"], route_class=KeysFirstRoute)

# Bounds on the multipart parser: our fields are 2 files or 1 archive, plus options; extras are named (400).
_MAX_FORM_PARTS = 8
# A raw weights body is held in memory up to this (a 7B adapter's is tens of MB) and spills to a temp file beyond:
# no disk write on the event loop for the usual sizes, bounded memory for a huge one.
_SPOOL_IN_MEMORY = 64 << 20


def _store(request: Request, *, writing: bool = False) -> AdapterStore:
    """The runtime's store; 503 while the model loads (or failed to), and for changes while draining."""
    rt: Runtime = request.app.state.runtime
    if rt.store is None or rt.engine is None:
        reason = f"startup failed: {rt.load_error}" if rt.load_error else "the model is still loading"
        raise ApiError(503, f"adapter registry unavailable: {reason}", headers={"Retry-After": "5"})
    if writing and rt.draining:
        raise ApiError(503, "the server is shutting down (draining); adapters cannot be changed")
    return rt.store


def _check_new_name(request: Request, store: AdapterStore, name: str, replace: bool = False) -> None:
    """Cheap checks before any file is read or any upload byte is consumed (the store re-checks)."""
    validate_adapter_name(name)
    if name == request.app.state.runtime.served_model_name:
        raise AdapterConflictError(f"adapter name {name!r} is the served base model's name", field="name")
    if name in store and not replace:
        raise taken(name)


def _status(response: Response, existed: bool) -> None:
    """201 for a new name, 200 for a new version of a registered one (a replace)."""
    response.status_code = 200 if existed else 201


def check_admin(request: Request, name: str, *, pinned: bool = False) -> Tenant:
    """403 unless the caller's tenant may register, replace and delete `name` (and pin, when `pinned`): decided by
    the name alone, so the answer says nothing of whether `name` exists. Returns the tenant."""
    tenant = caller(request)
    if not tenant.may_admin(name):
        raise ApiError(403, f"tenant {tenant.name!r} may not register, replace or delete adapter {name!r} (its admin "
                            f"globs: {', '.join(tenant.admin) or 'none'})", param="name")
    if pinned and not tenant.operator:
        raise ApiError(403, "only the operator (--admin-key) may pin an adapter: a pinned adapter holds a device slot "
                            "for every tenant", param="pinned")
    return tenant


def check_visible(request: Request, store: AdapterStore, name: str) -> None:
    """404 for an adapter the caller's tenant may not use, exactly as the store answers for an unknown one."""
    if not caller(request).may_use(name):
        raise AdapterNotFoundError(f"adapter {name!r} is not registered", field="name")
    store.get(name)  # the store's own 404 when unknown


@contextlib.contextmanager
def _registration(request: Request, store: AdapterStore, tenant: Tenant, name: str) -> Iterator[None]:
    """A new name counts against the tenant's max_adapters while it registers (403 when it has them all; a new
    version of a name it has does not count)."""
    if name in store:
        yield
        return
    rt: Runtime = request.app.state.runtime
    registered = sum(tenant.may_admin(n) for n in store.names()) if tenant.limits.max_adapters else 0
    refused = rt.quotas.begin_registration(tenant, registered)
    if refused is not None:
        raise ApiError(refused.status, refused.message, param="name")
    try:
        yield
    finally:
        rt.quotas.end_registration(tenant)


async def _register_path(request: Request, name: str, path: str, pinned: bool | None, replace: bool = False,
                         sha256: str | None = None) -> tuple[dict[str, Any], bool]:
    """Register by path; (the record, whether the name existed before)."""
    tenant = check_admin(request, name, pinned=bool(pinned))
    store = _store(request, writing=True)
    _check_new_name(request, store, name, replace)
    existed = name in store
    with _registration(request, store, tenant, name):
        await run_admin(lambda: store.register_path(name, path, pinned, replace=replace, sha256=sha256))
    return store.describe(name), existed


async def _unregister(request: Request, name: str) -> dict[str, Any]:
    check_admin(request, name)
    store = _store(request, writing=True)
    record = store.describe(name)  # 404 naming it when unknown; the answer shows what was removed
    await run_admin(store.unregister, name)
    return record


@router.post("/v1/adapters", status_code=201, response_model=AdapterInfo)
async def register_adapter(body: RegisterAdapterRequest, request: Request, response: Response) -> dict[str, Any]:
    """Register a PEFT LoRA dir under --adapter-root (relative or absolute inside it) or at an s3:// URL; with
    `replace`, as the name's new current version (200)."""
    record, existed = await _register_path(request, body.name, body.path, body.pinned, body.replace, body.sha256)
    _status(response, existed)
    return record


@router.put("/v1/adapters/{name:path}/weights", response_model=AdapterInfo)
async def put_weights(name: str, request: Request) -> dict[str, Any]:
    """A new current version of a registered adapter from a raw `adapter_model.safetensors` body, with its
    current version's adapter_config.json (a training loop's update; `?sha256=` states the expected digest)."""
    _check_upload_limit(request, check_admin(request, name))
    store = _store(request, writing=True)
    store.get(name)  # 404 before the body is read
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as body:
        async for chunk in request.stream():  # the upload limit applies (server/api/limits.py)
            body.write(chunk)
        if not body.tell():
            raise ApiError(400, "the body is empty: send the adapter_model.safetensors bytes", param="body")
        body.seek(0)
        await run_admin(store.put_weights, name, body, request.query_params.get("sha256"))
    return store.describe(name)


@router.post("/v1/adapters/{name:path}/rollback", response_model=AdapterInfo)
async def rollback_adapter(name: str, request: Request, body: RollbackRequest | None = None) -> dict[str, Any]:
    """Make a version of the history current again (default: the one current before); clears a route."""
    check_admin(request, name)
    store = _store(request, writing=True)
    await run_admin(store.rollback, name, body.version if body is not None else None)
    return store.describe(name)


@router.put("/v1/adapters/{name:path}/route", response_model=AdapterInfo)
async def set_route(name: str, body: RouteRequest, request: Request) -> dict[str, Any]:
    """Split the name's new requests between versions of its history by weight (a canary)."""
    check_admin(request, name)
    store = _store(request, writing=True)
    splits = [(split.version, split.weight) for split in body.versions]
    await run_admin(store.set_route, name, splits, body.sticky)
    return store.describe(name)


@router.delete("/v1/adapters/{name:path}/route", response_model=AdapterInfo)
async def clear_route(name: str, request: Request) -> dict[str, Any]:
    """Back to the current version for every new request."""
    check_admin(request, name)
    store = _store(request, writing=True)
    await run_admin(store.clear_route, name)
    return store.describe(name)


@router.post("/v1/adapters/{name:path}/prefetch", status_code=202, response_model=PrefetchAnswer)
async def prefetch_adapter(name: str, request: Request, body: PrefetchRequest | None = None) -> dict[str, Any]:
    """Load the versions new requests may start on, without a request (202: the load runs in the background;
    GET the record for its tier). An admin operation: it takes host memory or a device slot with no request."""
    check_admin(request, name)
    tier = body.tier if body is not None else "device"
    keys = _store(request).prefetch(name, tier)
    return {"name": name, "tier": tier, "versions": [short(version_of(key) or "") for key in keys]}


@router.put("/v1/adapters/{name:path}", status_code=201, response_model=AdapterInfo)
async def upload_adapter(name: str, request: Request, response: Response) -> dict[str, Any]:
    """Register by multipart upload: `adapter_config.json` + `adapter_model.safetensors`, or `archive`; `?replace=
    true` (or a form field `replace`) makes it the name's new current version; a form field `sha256` states the
    digest the files must have."""
    tenant = check_admin(request, name)  # all before reading a possibly large body
    store = _store(request, writing=True)
    replace_query = parse_bool(request.query_params.get(REPLACE_FIELD), REPLACE_FIELD)
    _check_new_name(request, store, name, replace=replace_query is not False)
    _check_upload_limit(request, tenant)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, f"expected a multipart/form-data body, got {content_type or 'no content type'!r}; "
                       "send the fields 'adapter_config.json' and 'adapter_model.safetensors', or 'archive'")
    existed = name in store
    with _registration(request, store, tenant, name):
        async with request.form(max_files=_MAX_FORM_PARTS, max_fields=_MAX_FORM_PARTS) as form:
            payload, opts = upload_payload(form)
            if opts.pinned:
                check_admin(request, name, pinned=True)
            replace = bool(replace_query or opts.replace)
            await run_admin(lambda: store.register_upload(name, payload, opts.pinned, replace=replace,
                                                          sha256=opts.sha256))
    _status(response, existed)
    return store.describe(name)


def _check_upload_limit(request: Request, tenant: Tenant) -> None:
    """Hold the upload's body to the tenant's max_upload_bytes (413 naming it, at once when Content-Length says
    more, else when the bytes read pass it)."""
    limit = tenant.limits.max_upload_bytes
    if limit is None:
        return
    usage = request.app.state.runtime.usage
    lower_body_limit(request, limit, f"the upload exceeds tenant {tenant.name!r}'s max_upload_bytes ({limit} bytes)",
                     lambda: usage.throttled(tenant.name, "max_upload_bytes"))


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(request: Request) -> dict[str, Any]:
    """Every registered adapter the caller's tenant may use."""
    store, tenant = _store(request), caller(request)
    data = []
    for name in store.names():
        if not tenant.may_use(name):
            continue
        try:
            data.append(store.describe(name))
        except AdapterNotFoundError:  # unregistered between names() and describe(): not listed
            continue
    return {"object": "list", "data": data}


@router.get("/v1/adapters/{name:path}", response_model=AdapterInfo)
async def get_adapter(name: str, request: Request) -> dict[str, Any]:
    store = _store(request)
    check_visible(request, store, name)
    return store.describe(name)


@router.delete("/v1/adapters/{name:path}", response_model=AdapterInfo)
async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
    return await _unregister(request, name)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM-compatible registration by path: 200 with vLLM's plain success text (errors are JSON, as vLLM's).
    `load_inplace` makes the files a registered name's new current version (as `replace`)."""
    await _register_path(request, body.lora_name, body.lora_path, None, body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM-compatible unregistration: 200 with vLLM's plain success text."""
    await _unregister(request, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
