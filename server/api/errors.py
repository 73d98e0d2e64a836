"""Every error leaves as JSON in the caller's dialect, never as a stack trace.

`/v1/*` (OpenAI): {"error": {"message", "type", "code"}}; `/generate*` (TGI): {"error", "error_type"}.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.adapters.errors import AdapterError
from loraplex.server.engine.async_engine import EngineDead
from loraplex.server.engine.engine import RequestRejected

log = logging.getLogger(__name__)

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
                 502: "upstream_error"}


class ApiError(Exception):
    """Raised by routes: an HTTP status, a message naming the problem, optional headers and field."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if request.url.path.startswith("/generate") or request.url.path == "/":  # "/": TGI compat route
        body: dict = {"error": message, "error_type": _tgi_type(status)}
    else:
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _tgi_type(status: int) -> str:
    return {400: "validation", 401: "authentication", 404: "not_found", 413: "validation", 422: "validation",
            429: "overloaded", 503: "unavailable"}.get(status, "generation" if status >= 500 else "validation")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first_field = [], None
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":  # loc is ("body", <char offset>), not a field
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            parts.append(f"request body is not valid JSON ({detail} at character {err['loc'][-1]})")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        first_field = first_field or field
        msg = {"string_unicode": "not valid Unicode text (a lone surrogate)",
               "extra_forbidden": "unknown field (not part of this API; see docs/api.md)"}.get(err.get("type", ""),
                                                                                                 err.get("msg"))
        parts.append(f"{field}: {msg or 'invalid'}")
    return "; ".join(parts) or "invalid request", first_field


def _not_utf8_message(exc: UnicodeDecodeError) -> str:
    byte = exc.object[exc.start : exc.start + 1].hex()
    return (f"request body is not valid UTF-8 (byte 0x{byte} at offset {exc.start}: {exc.reason}); the prompt "
            "and every other string must be UTF-8 text")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(AdapterError)
    async def _adapter(request: Request, exc: AdapterError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.field)

    @app.exception_handler(RequestRejected)
    async def _rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return error_response(request, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _validation_message(exc)
        # Text that is not Unicode (a lone surrogate from a "\udcff" escape) is a bad prompt (400, as for
        # invalid UTF-8 bytes), not a wrongly shaped body.
        # An unknown field is refused like a known one this server does not implement: 400 naming it.
        kinds = {e.get("type") for e in exc.errors()}
        status = 400 if "string_unicode" in kinds or kinds == {"extra_forbidden"} else 422
        return error_response(request, status, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        bad_bytes = exc.__cause__
        if isinstance(bad_bytes, UnicodeDecodeError):  # FastAPI's generic "error parsing the body"
            return error_response(request, 400, _not_utf8_message(bad_bytes), "prompt")
        return error_response(request, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineDead)
    async def _dead(request: Request, exc: EngineDead) -> JSONResponse:
        return error_response(request, 503, str(exc))

    @app.exception_handler(RecursionError)
    async def _deep(request: Request, exc: RecursionError) -> JSONResponse:
        return error_response(request, 400, "JSON body is nested too deeply")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request, 500, "internal server error")
