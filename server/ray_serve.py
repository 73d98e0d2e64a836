"""loraplex on Ray Serve: N engine replicas behind Ray's HTTP proxy, each adapter's requests sent to the replicas
that already hold it (`pip install 'loraplex[ray]'`).

    loraplex serve-ray --replicas 2 --model /models/base --registry s3://bucket/loraplex --port 8000

Two deployments make the application (`build_app`; `app_builder` for `serve run` and Ray Serve config files):

- `LoraplexReplica` (N replicas): one loraplex engine each, built from the same flags as `loraplex serve`. It runs
  our ASGI app in-process for each forwarded request and streams the answer back (status and headers first, then
  the body as the app sends it: server-sent events are not buffered; a client that goes away aborts the request).
  Its `@serve.multiplexed` loader tells Ray which adapters it served last (up to `--max-loras`, LRU): Ray then
  sends those adapters' requests to it first. The loader loads nothing: the engine loads an adapter's weights on
  its first request, as in `loraplex serve`. Ray's health check replaces a replica whose engine died.
- `LoraplexRouter` (the ingress, light: it never imports torch): reads the body, finds the adapter the request
  names with deploy/nginx's rules (`X-Loraplex-Adapter` header, else the body's `model`, `parameters.adapter_id`
  or `lora_name`, else `/v1/adapters/<name>`) and, when that is a registered adapter, calls a replica with it as
  Ray's multiplexed model id; anything else (the base model, unknown names, `/v1/models`, `/health`, `/ready`)
  goes to any replica. Every answer, error bodies included, passes through unchanged, plus
  `X-Loraplex-Replica: <replica id>`. `GET /metrics` merges every replica's metrics with a `replica` label.

Each replica keeps its own `<--state-dir>/replica-<rank>`. An adapter registered through the router reaches one
replica; the others learn it from a shared registry (`--registry s3://…`). Without one, give every replica the
same `--preload`: with more than one replica the router then refuses registrations and deletions (409).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import ray
    from ray import serve
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("loraplex on Ray Serve needs Ray: pip install 'loraplex[ray]'") from exc

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("loraplex.ray")

APP_NAME = "loraplex"
REPLICA_DEPLOYMENT = "LoraplexReplica"
ROUTER_DEPLOYMENT = "LoraplexRouter"
REPLICA_HEADER = "x-loraplex-replica"  # on every answer: the replica that served it
ADAPTER_HEADER = "x-loraplex-adapter"  # routing hint for requests whose body names no adapter
# POST routes whose JSON body names the adapter, and where (the keys deploy/nginx routes by, in the same order).
GENERATION_ROUTES = {"/v1/completions": ("model",), "/v1/chat/completions": ("model",),
                     "/generate": ("parameters", "adapter_id"), "/generate_stream": ("parameters", "adapter_id"),
                     "/": ("parameters", "adapter_id")}
_BODY_KEYS = {**GENERATION_ROUTES, "/v1/load_lora_adapter": ("lora_name",), "/v1/unload_lora_adapter": ("lora_name",)}
_ADMIN_WRITES = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
_OPENAI_TYPES = {409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 502: "upstream_error", 503: "service_unavailable"}
_TGI_TYPES = {409: "validation", 413: "validation", 429: "overloaded", 502: "generation", 503: "unavailable"}


# ---- what travels between the router and a replica ----------------------------------------------
@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the router received it (the ASGI scope's parts and the whole body), and the adapter
    it generates with, if any (the replica that serves it records that it holds that adapter)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    adapter: str | None = None


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class RouterSettings:
    """What the router needs to know of the replicas' flags (it never parses them: that imports torch)."""

    refuse_registration: str | None  # why admin writes are refused (several replicas, no shared registry)
    max_body_bytes: int  # --max-body-bytes and --max-upload-bytes, enforced here as the replicas do (413)
    max_upload_bytes: int
    names_refresh_s: float = 1.0  # the fewest seconds between two look-ups of the registered names

    def body_limit(self, method: str, path: str) -> int:
        upload = method == "PUT" and path.startswith("/v1/adapters/")  # as loraplex.server.api.limits
        return self.max_upload_bytes if upload else self.max_body_bytes


def requested_adapter(method: str, path: str, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The adapter (or base model) a request names, first found, as deploy/nginx finds its routing key: the
    `X-Loraplex-Adapter` header; the JSON body's `model` (OpenAI routes), `parameters.adapter_id` (TGI) or
    `lora_name` (vLLM's adapter routes); the name in `/v1/adapters/<name>`. None when it names none."""
    if name := _header(headers, ADAPTER_HEADER):
        return name
    keys = _BODY_KEYS.get(path) if method == "POST" else None
    if keys is not None:
        try:
            value: Any = json.loads(body)
        except (ValueError, RecursionError):
            value = None  # not JSON: the replica says why
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            return value
    if path.startswith("/v1/adapters/"):  # a name may carry one '/' after a namespace: acme/support
        return "/".join(path.removeprefix("/v1/adapters/").split("/")[:2]).strip("/") or None
    return None


def generates(method: str, path: str) -> bool:
    return method == "POST" and path in GENERATION_ROUTES


def _header(headers: Sequence[tuple[bytes, bytes]], name: str) -> str | None:
    key = name.encode()
    return next((v.decode("latin-1") for k, v in headers if k.lower() == key), None)


def is_admin_write(method: str, path: str) -> bool:
    return method in ("POST", "PUT", "DELETE", "PATCH") and (
        path in _ADMIN_WRITES or path.startswith("/v1/adapters/"))


def error_response(path: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error in the caller's dialect, shaped as `loraplex.server.api.errors` shapes it (imported there
    with torch, so not imported here)."""
    if path.startswith("/generate") or path == "/":
        body: dict[str, Any] = {"error": message, "error_type": _TGI_TYPES.get(status, "generation")}
    else:
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


# ---- running our ASGI app for one forwarded request ---------------------------------------------
async def run_asgi(app: Callable[[Scope, Receive, Send], Any], req: ForwardedRequest,
                   extra_headers: Sequence[tuple[bytes, bytes]] = (),
                   close_timeout_s: float = 5.0) -> AsyncIterator[ResponseHead | bytes]:
    """Run `app` for `req` in this process: yields the `ResponseHead`, then each body chunk as the app sends
    it. Closing the generator early (the caller went away) tells the app the client disconnected, so the
    engine aborts the request; the app gets `close_timeout_s` to finish before it is cancelled."""
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
        "query_string": req.query_string, "root_path": "", "headers": list(req.headers),
        "client": req.client, "server": ("127.0.0.1", 0), "state": {},
    }
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    started = False
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                yield ResponseHead(message["status"], [*message.get("headers", ()), *extra_headers])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        if not started:  # the app ended without answering (it raised before its error handlers ran)
            await asyncio.wait([task])
            reason = repr(task.exception()) if not task.cancelled() and task.exception() else "no response"
            log.error("%s %s: the app sent no response: %s", req.method, req.path, reason)
            yield ResponseHead(500, [(b"content-type", b"application/json"), *extra_headers])
            yield json.dumps({"error": {"message": "internal error: the server sent no response",
                                        "type": "server_error", "param": None, "code": 500}}).encode()
    finally:
        gone.set()  # the response is complete or the caller went away: either way the client is gone now
        if not task.done():
            done, _ = await asyncio.wait([task], timeout=close_timeout_s)
            if not done:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("%s %s failed after answering", req.method, req.path, exc_info=task.exception())


def merge_metrics(texts: Sequence[tuple[str, str]]) -> bytes:
    """Prometheus texts of several replicas as one: each sample gets a `replica` label (its replica's id)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(s._replace(labels={**s.labels, "replica": replica}) for s in family.samples)

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


class _Forwarded(Response):
    """A replica's answer, relayed as it arrives: the head already read, then the rest of the stream."""

    def __init__(self, head: ResponseHead, rest: DeploymentResponseGenerator,
                 on_success: Callable[[], None] | None = None) -> None:
        super().__init__(status_code=head.status)
        self.raw_headers = list(head.headers)
        self._rest = rest
        self._on_success = on_success  # called once a 2xx answer was relayed whole

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        finished = False
        try:
            async for chunk in self._rest:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finished = True
        except Exception:  # noqa: BLE001 - the status is sent: the body ends short, the reason goes to the log
            log.exception("%s: relaying the replica's answer failed", scope.get("path"))
        finally:
            if not finished:
                self._rest.cancel()  # the client went away (or the replica did): stop the generation
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if finished and self.status_code < 300 and self._on_success is not None:
            self._on_success()


# ---- the deployments ---------------------------------------------------------------------------
class _AdapterTicket:
    """What the multiplexed loader hands Ray: the name only (the engine holds the weights and evicts them)."""

    def __init__(self, name: str) -> None:
        self.name = name


@serve.deployment(name=REPLICA_DEPLOYMENT)
class LoraplexReplica:
    """One loraplex engine. Loads the model in the constructor: Ray routes to it only once it is ready."""

    def __init__(self, settings: dict[str, Any]) -> None:
        # Heavy imports here, not at module level: the router imports this module too.
        from loraplex.server.api.app import create_app
        from loraplex.server.cli import configs_from_args
        from loraplex.server.runtime import Runtime

        context = serve.get_replica_context()
        self.replica_id = context.replica_tag
        rank = getattr(context.rank, "rank", context.rank)
        args = argparse.Namespace(**settings)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        args.state_dir = str(Path(args.state_dir) / f"replica-{rank}")
        self.runtime = Runtime(configs_from_args(args))
        self.runtime.load()  # blocking: the constructor returns once the model is loaded and warmed up
        if self.runtime.fatal_error is not None:
            raise RuntimeError(self.runtime.fatal_error)  # Ray retries the replica, then reports the deploy failed
        self.app = create_app(self.runtime, load_in_background=False)
        self._header = (REPLICA_HEADER.encode(), self.replica_id.encode())
        async def ticket(name: str) -> _AdapterTicket:
            return _AdapterTicket(name)

        # Made here, not as a decorator: the cap comes from the flags (Ray 2.60 detects it at runtime).
        cap = self.runtime.config.engine.lora.max_loras
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=cap)(ticket)
        log.info("replica %s (rank %s) ready: %s", self.replica_id, rank, self.runtime.served_model_name)

    async def handle_request(self, req: ForwardedRequest) -> AsyncIterator[ResponseHead | bytes]:
        """Serve one forwarded request: the head, then the body chunks (a streaming handle call)."""
        store = self.runtime.store
        if req.adapter and store is not None and req.adapter in store:
            # Ray now routes `req.adapter` here first. Recorded whether or not the router set it as the
            # multiplexed model id (a router that has not yet seen a new registration does not).
            await self.get_adapter(req.adapter)
        async for item in run_asgi(self.app, req, extra_headers=[self._header]):
            yield item

    def metrics_text(self) -> tuple[str, str]:
        """(replica id, this replica's Prometheus text): the router merges every replica's."""
        body, _ = self.runtime.metrics.render()
        return self.replica_id, body.decode()

    def catalog(self) -> dict[str, Any]:
        """The names a request may give: the base model's and the registered adapters'."""
        store = self.runtime.store
        return {"base": self.runtime.served_model_name, "adapters": store.names() if store is not None else []}

    def check_health(self) -> None:
        """Ray's health check: raising makes Ray replace this replica."""
        rt = self.runtime
        if rt.fatal_error is not None:
            raise RuntimeError(rt.fatal_error)
        if rt.engine is None or not rt.engine.alive:
            raise RuntimeError("the engine loop stopped")

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.shutdown()


@serve.deployment(name=ROUTER_DEPLOYMENT)
class LoraplexRouter:
    """The HTTP ingress: picks the replica by the adapter a request names and relays its answer."""

    def __init__(self, replicas: DeploymentHandle, settings: RouterSettings) -> None:
        self._replicas = replicas
        self._stream = replicas.options(stream=True)
        self._settings = settings
        self._base: str | None = None
        self._names: frozenset[str] = frozenset()
        self._names_at = -float("inf")
        self._names_lock = asyncio.Lock()

    async def __call__(self, request: Request) -> Response:
        method, path = request.method, request.scope["path"]
        if self._settings.refuse_registration and is_admin_write(method, path):
            return error_response(path, 409, self._settings.refuse_registration)
        limit = self._settings.body_limit(method, path)
        body = await self._read_body(request, limit)
        if body is None:
            return error_response(path, 413, f"request body exceeds the limit of {limit} bytes")
        headers = list(request.scope["headers"])
        if method == "GET" and path == "/metrics" and not _header(headers, ADAPTER_HEADER):
            return await self._metrics()
        name = requested_adapter(method, path, body, headers)
        model_id = await self._multiplexed_id(name)
        handle = self._stream.options(multiplexed_model_id=model_id) if model_id else self._stream
        client = request.scope.get("client")
        gen = handle.handle_request.remote(ForwardedRequest(
            method, path, request.scope.get("query_string", b""), headers, body, tuple(client) if client else None,
            name if generates(method, path) else None))
        try:
            head = await gen.__anext__()
        except Exception as exc:  # noqa: BLE001 - every failure to reach a replica is answered in our error shape
            gen.cancel()
            return self._unreachable(path, exc)
        return _Forwarded(head, gen, self._forget_names if is_admin_write(method, path) else None)

    @staticmethod
    async def _read_body(request: Request, limit: int) -> bytes | None:
        """The whole body, or None past `limit` bytes (before reading it all when Content-Length says so)."""
        parts, size = [], 0
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        return b"".join(parts)

    async def _multiplexed_id(self, name: str | None) -> str:
        """`name` when a replica has it registered, else "" (base model, unknown names: any replica answers,
        and Ray's router keeps no state for names that were never adapters)."""
        if not name:
            return ""
        if name != self._base and name not in self._names:
            await self._refresh_names()
        return name if name in self._names and name != self._base else ""

    async def _refresh_names(self) -> None:
        async with self._names_lock:
            if time.monotonic() - self._names_at < self._settings.names_refresh_s:
                return  # looked up a moment ago (an unknown name must not cost a look-up per request)
            try:
                catalog = await self._replicas.catalog.remote()
            except Exception:  # noqa: BLE001 - no replica answers now: route without a multiplexed id
                log.warning("could not list the registered adapters", exc_info=True)
                return
            finally:
                self._names_at = time.monotonic()
            self._base, self._names = catalog["base"], frozenset(catalog["adapters"])

    async def _metrics(self) -> Response:
        """Every replica's /metrics in one scrape, each series labelled with its `replica` (a scrape relayed to
        one replica at random would make counters jump between replicas)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        results = await self._replicas.broadcast("metrics_text").results_async(timeout_s=30, return_exceptions=True)
        texts = [r for r in results if not isinstance(r, BaseException)]
        for failure in (r for r in results if isinstance(r, BaseException)):
            log.warning("a replica's metrics could not be read: %r", failure)
        if not texts:
            return error_response("/metrics", 503, "no replica answered for its metrics", {"Retry-After": "5"})
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE_LATEST)

    def _forget_names(self) -> None:
        self._names_at = -float("inf")  # a registration or deletion went through: look up again when needed

    @staticmethod
    def _unreachable(path: str, exc: Exception) -> Response:
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, BackPressureError):
            return error_response(path, 429, "every replica is at capacity; retry later", {"Retry-After": "1"})
        log.error("%s: no replica answered: %r", path, exc)
        return error_response(path, 503, f"no replica could serve the request ({type(exc).__name__})",
                              {"Retry-After": "5"})

    async def routing_state(self) -> dict[str, Any]:
        """For operators and tests: the adapters this router knows (looked up again if it has not for a second),
        those Ray's router believes each replica holds (read from Ray's private router state, as Ray's own tests
        do: None if that changes), and whether torch got imported here (it must not: the router stays light)."""
        await self._refresh_names()
        placement = None
        with contextlib.suppress(AttributeError):
            router = self._stream._router._asyncio_router._request_router
            if router is not None:
                placement = {r.replica_id.unique_id: sorted(r.multiplexed_model_ids)
                             for r in router.curr_replicas.values()}
        return {"adapters": sorted(self._names), "base": self._base, "placement": placement,
                "torch_imported": "torch" in sys.modules}


# ---- building and running the application -------------------------------------------------------
@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    routers: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    router_cpus: float = 0.0


def serve_settings(argv: Sequence[str]) -> dict[str, Any]:
    """`loraplex serve` flags (their LORAPLEX_* env defaults read here) as plain values for the replicas,
    checked once here (a usage error exits); relative paths made absolute (replicas run elsewhere)."""
    from loraplex.server.cli import build_parser, configs_from_args

    parser = build_parser()
    args = parser.parse_args(["serve", *argv])
    try:
        configs_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    for key in ("state_dir", "adapter_root", "model"):
        value = getattr(args, key, None)  # a str, or a flag's default (state_dir's is a Path)
        if value and "://" not in str(value):
            setattr(args, key, os.path.abspath(value))
    return vars(args)


def build_app(argv: Sequence[str], options: RayOptions = RayOptions()) -> serve.Application:
    """The Ray Serve application for `loraplex serve` flags `argv`: `serve.run(build_app([...], RayOptions(2)))`."""
    return app_from_settings(serve_settings(argv), options)


def registration_refusal(settings: dict[str, Any], replicas: int) -> str | None:
    """Why the router refuses adapter registrations and deletions, if it does: with several replicas and no
    shared registry, one would reach a single replica (and each replica restarts from its own state dir)."""
    if replicas == 1 or settings.get("registry"):
        return None
    return (f"adapter registration through the Ray router would reach one of {replicas} replicas only: give the "
            "replicas a shared registry (--registry s3://bucket/prefix), or register adapters at start on every "
            "replica (--preload NAME=PATH)")


def app_from_settings(settings: dict[str, Any], options: RayOptions) -> serve.Application:
    if options.replicas < 1 or options.routers < 1:
        raise ValueError("--replicas and --routers must be >= 1")
    refuse = registration_refusal(settings, options.replicas)
    replica = LoraplexReplica.options(
        num_replicas=options.replicas,
        max_ongoing_requests=settings["max_queue"],  # beyond it the replica's own admission answers 429
        max_queued_requests=settings["max_queue"],  # requests waiting in a router for a replica: 429 beyond
        graceful_shutdown_timeout_s=settings["drain_timeout"],
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
    ).bind(settings)
    per_router = -(-options.replicas * settings["max_queue"] // options.routers)  # what the replicas admit, shared
    return LoraplexRouter.options(
        num_replicas=options.routers, max_ongoing_requests=max(per_router, 100),
        ray_actor_options={"num_cpus": options.router_cpus},
    ).bind(replica, RouterSettings(refuse, settings["max_body_bytes"], settings["max_upload_bytes"]))


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run loraplex.server.ray_serve:app_builder flags="--model /m --registry s3://b/p" replicas=2`
    and Ray Serve config files (KubeRay's RayService): the same application as `loraplex serve-ray`."""
    numeric = {"replicas": int, "routers": int, "replica_cpus": float, "replica_gpus": float, "router_cpus": float}
    unknown = set(args) - set(numeric) - {"flags"}
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; expected flags or {sorted(numeric)}")
    options = RayOptions(**{k: numeric[k](v) for k, v in args.items() if k != "flags"})
    return build_app(shlex.split(args.get("flags", "")), options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex serve-ray", add_help=False, allow_abbrev=False,  # never take a prefix of a serve flag
        description="Run loraplex on Ray Serve: --replicas engines behind Ray's HTTP proxy on --host/--port, "
                    "each adapter routed to the replicas that hold it. Every `loraplex serve` flag applies to "
                    "each replica; each replica keeps <--state-dir>/replica-<rank>.")
    parser.add_argument("-h", "--help", action="store_true", help="show this help, then `loraplex serve`'s flags")
    parser.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    parser.add_argument("--routers", type=int, default=1, help="ingress (router) replicas (default 1)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray instance)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    parser.add_argument("--replica-gpus", type=float, default=None,
                        help="GPUs Ray reserves per replica (default 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--app-name", default=APP_NAME, help=f"Ray Serve application name (default {APP_NAME})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`loraplex serve-ray [ray flags] [loraplex serve flags]`: serves until SIGTERM or SIGINT, then stops the
    application (replicas finish their requests first, up to --drain-timeout) and exits 0; 1 if it failed."""
    parser = build_parser()
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if own.help:
        parser.print_help()
        print("\nloraplex serve flags (each replica gets them):", flush=True)
        from loraplex.server.cli import build_parser as serve_parser

        serve_parser().parse_args(["serve", "--help"])  # prints and exits 0
    if own.replicas < 1 or own.routers < 1:
        parser.error("--replicas and --routers must be >= 1")
    settings = serve_settings(rest)  # a usage error exits here, before Ray starts
    logging.basicConfig(level=settings["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    address = own.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        gpus = own.replica_gpus
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        serve.start(http_options={"host": settings["host"], "port": settings["port"]})
        app = app_from_settings(settings, RayOptions(own.replicas, own.routers, own.replica_cpus, gpus))
        serve.run(app, name=own.app_name, route_prefix="/")
        log.info("serving on http://%s:%d with %d replica(s)", settings["host"], settings["port"], own.replicas)
        stop.wait()
        log.info("stopping: replicas finish their requests first (up to --drain-timeout %ss)",
                 settings["drain_timeout"])
        return 0
    except Exception as exc:  # noqa: BLE001 - e.g. the deploy failed (no replica could start): say why, exit 1
        print(f"loraplex: error: {exc}{_deploy_messages(own.app_name)}", file=sys.stderr)
        return 1
    finally:
        if address == "local":
            serve.shutdown()
        else:  # a shared cluster: remove our application only
            with contextlib.suppress(Exception):
                serve.delete(own.app_name)
        ray.shutdown()


def _deploy_messages(app_name: str) -> str:
    """The deployments' status messages (a replica constructor's traceback, for one): Ray's deploy error
    names no cause."""
    with contextlib.suppress(Exception):
        app = serve.status().applications.get(app_name)
        if app is not None:
            return "".join(f"\n{name}: {d.status}: {d.message}" for name, d in app.deployments.items() if d.message)
    return ""


if __name__ == "__main__":
    sys.exit(main())
