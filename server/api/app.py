"""The FastAPI application: routers, error handlers, body limits, and the runtime's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loraplex.server.api import (
    routes_adapters,
    routes_health,
    routes_openai,
    routes_testing,
    routes_tgi,
    routes_tokenize,
)
from loraplex.server.api.errors import install_error_handlers
from loraplex.server.api.limits import BodySizeLimit
from loraplex.server.runtime import Runtime


def create_app(runtime: Runtime, *, load_in_background: bool = True) -> FastAPI:
    """Build the app around `runtime`. The model loads in the background: /ready says 503 until done."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_in_background and runtime.engine is None:
            runtime.start_loading()
        yield
        runtime.shutdown()

    app = FastAPI(title="loraplex", version=routes_tokenize.server_version(), lifespan=lifespan)
    app.state.runtime = runtime
    install_error_handlers(app)
    for module in (routes_health, routes_openai, routes_tgi, routes_adapters, routes_tokenize):
        app.include_router(module.router)
    if routes_testing.enabled():
        app.include_router(routes_testing.router)
    cfg = runtime.config.server
    app.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes, max_upload_bytes=cfg.max_upload_bytes)
    return app
