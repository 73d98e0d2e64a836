"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from loraplex.server.api.auth import require_metrics_key

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Alive: the process answers, the model loaded (or is loading) and, once started, the engine loop runs."""
    rt = request.app.state.runtime
    if rt.fatal_error:
        return JSONResponse({"status": "error", "reason": rt.fatal_error}, status_code=503)
    if rt.engine is not None and not rt.engine.alive and not rt.draining:
        return JSONResponse({"status": "error", "reason": "engine loop stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready: model loaded and warmed, not draining. 503 with the reason otherwise."""
    rt = request.app.state.runtime
    if rt.fatal_error:
        return JSONResponse({"status": "error", "reason": rt.fatal_error}, status_code=503)
    if rt.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not rt.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "model": rt.served_model_name})


@router.get("/metrics", dependencies=[Depends(require_metrics_key)])
async def metrics(request: Request) -> Response:
    """Prometheus text; needs --metrics-key (or the admin key) when that is set."""
    body, content_type = request.app.state.runtime.metrics.render()
    return Response(body, media_type=content_type)
