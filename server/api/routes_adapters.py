"""Adapter admin API: register (by path/S3 URL or by upload), list, describe, unregister; vLLM's aliases.

Every route needs `--admin-key` when one is set. Registration reads and validates files (blocking I/O, S3) and
waits for the engine thread to take the new adapter in, so it runs in a worker thread and the event loop keeps
serving generation traffic meanwhile: at most `ADMIN_THREADS` at once, never on the HTTP server's shared worker
threads (where prompts are tokenized), so registrations waiting on a slow store stall nobody's generation. Records
come from the snapshot the engine publishes (store.describe).
Unregistering lets running requests finish on the device copy, ends queued ones with an error, and refuses new
ones (404).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from loraplex.adapters.errors import AdapterConflictError, AdapterNotFoundError
from loraplex.adapters.names import validate_adapter_name
from loraplex.adapters.store import AdapterStore
from loraplex.server.api.auth import KeysFirstRoute, require_admin_key
from loraplex.server.api.errors import ApiError
from loraplex.server.api.schemas_adapters import (
    AdapterInfo,
    AdapterList,
    LoadLoRAAdapterRequest,
    RegisterAdapterRequest,
    UnloadLoRAAdapterRequest,
    upload_payload,
)
from loraplex.server.runtime import Runtime

router = APIRouter(dependencies=[Depends(require_admin_key)], tags=["adapters"], route_class=KeysFirstRoute)

# Bounds on the multipart parser: our fields are 2 files or 1 archive, plus `pinned`; extras are named (400).
_MAX_FORM_PARTS = 8
ADMIN_THREADS = 8  # registrations / unregistrations working at once; more wait their turn
T = TypeVar("T")


async def _admin_thread(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking adapter admin work on a thread under the app's admin limiter, not the default one."""
    limiter = getattr(request.app.state, "admin_limiter", None)
    if limiter is None:  # made in the event loop that uses it
        limiter = request.app.state.admin_limiter = anyio.CapacityLimiter(ADMIN_THREADS)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)


def _store(request: Request, *, writing: bool = False) -> AdapterStore:
    """The runtime's store; 503 while the model loads (or failed to), and for changes while draining."""
    rt: Runtime = request.app.state.runtime
    if rt.store is None or rt.engine is None:
        reason = f"startup failed: {rt.load_error}" if rt.load_error else "the model is still loading"
        raise ApiError(503, f"adapter registry unavailable: {reason}", headers={"Retry-After": "5"})
    if writing and rt.draining:
        raise ApiError(503, "the server is shutting down (draining); adapters cannot be changed")
    return rt.store


def _check_new_name(request: Request, store: AdapterStore, name: str) -> None:
    """Cheap checks before any file is read or any upload byte is consumed (the store re-checks)."""
    validate_adapter_name(name)
    if name == request.app.state.runtime.served_model_name:
        raise AdapterConflictError(f"adapter name {name!r} is the served base model's name", field="name")
    if name in store:
        raise AdapterConflictError(f"adapter {name!r} is already registered", field="name")


async def _register_path(request: Request, name: str, path: str, pinned: bool) -> dict[str, Any]:
    store = _store(request, writing=True)
    _check_new_name(request, store, name)
    await _admin_thread(request, store.register_path, name, path, pinned)
    return store.describe(name)


async def _unregister(request: Request, name: str) -> dict[str, Any]:
    store = _store(request, writing=True)
    record = store.describe(name)  # 404 naming it when unknown; the answer shows what was removed
    await _admin_thread(request, store.unregister, name)
    rt: Runtime = request.app.state.runtime
    rt.adapter_removed(name)
    return record


@router.post("/v1/adapters", status_code=201, response_model=AdapterInfo)
async def register_adapter(body: RegisterAdapterRequest, request: Request) -> dict[str, Any]:
    """Register a PEFT LoRA dir under --adapter-root (relative or absolute inside it) or at an s3:// URL."""
    return await _register_path(request, body.name, body.path, body.pinned)


@router.put("/v1/adapters/{name}", status_code=201, response_model=AdapterInfo)
async def upload_adapter(name: str, request: Request) -> dict[str, Any]:
    """Register by multipart upload: `adapter_config.json` + `adapter_model.safetensors`, or `archive`."""
    store = _store(request, writing=True)
    _check_new_name(request, store, name)  # before reading a possibly large body
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, f"expected a multipart/form-data body, got {content_type or 'no content type'!r}; "
                       "send the fields 'adapter_config.json' and 'adapter_model.safetensors', or 'archive'")
    async with request.form(max_files=_MAX_FORM_PARTS, max_fields=_MAX_FORM_PARTS) as form:
        payload, pinned = upload_payload(form)
        await _admin_thread(request, store.register_upload, name, payload, pinned)
    return store.describe(name)


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(request: Request) -> dict[str, Any]:
    store = _store(request)
    data = []
    for name in store.names():
        try:
            data.append(store.describe(name))
        except AdapterNotFoundError:  # unregistered between names() and describe(): not listed
            continue
    return {"object": "list", "data": data}


@router.get("/v1/adapters/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, request: Request) -> dict[str, Any]:
    return _store(request).describe(name)


@router.delete("/v1/adapters/{name}", response_model=AdapterInfo)
async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
    return await _unregister(request, name)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM-compatible registration by path: 200 with vLLM's plain success text (errors are JSON, as vLLM's)."""
    await _register_path(request, body.lora_name, body.lora_path, False)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM-compatible unregistration: 200 with vLLM's plain success text."""
    await _unregister(request, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
