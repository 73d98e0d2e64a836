"""Typed Python client for the loraplex HTTP API: `LoraplexClient` (sync) and `AsyncLoraplexClient` (async).

Both clients share everything but the sending: each operation is built once as a `_Call` (method, path, body,
which key it needs, how to parse the answer) and parsed by the same functions; the two classes only differ in
how they send a call (httpx.Client vs httpx.AsyncClient) and iterate a stream. Any HTTP error answer raises
`LoraplexError(status, message)` with the server's message; connection failures stay httpx.TransportError.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

T = TypeVar("T")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
VERSION_HEADER = "x-loraplex-adapter-version"
_DONE = object()  # sentinel: the SSE stream's `data: [DONE]`


class LoraplexError(Exception):
    """An error answer from the server: HTTP `status` and the server's `message` (plus the parsed `body`)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.body = status, message, body


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Completion:
    """One finished completion (text or chat): the first choice's text, why it stopped, token counts."""

    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
    raw: dict[str, Any] = field(repr=False, compare=False)
    # The weights that answered: the adapter version (12 hex digits of its sha256), "base", or a merge's
    # "name@version,…" (the X-Loraplex-Adapter-Version header).
    adapter_version: str | None = None


@dataclass(frozen=True)
class Model:
    id: str
    parent: str | None  # the base model for adapters, None for the base itself
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Adapter:
    """An adapter's record as `GET /v1/adapters/{name}` describes it."""

    name: str
    rank: int | None
    alpha: float | None
    target_modules: list[str] | str | None
    size_bytes: int | None
    tier: str
    pinned: bool
    state: str
    error: str | None
    load_stats: dict[str, float]
    raw: dict[str, Any] = field(repr=False, compare=False)
    version: str | None = None  # the current version: 12 hex digits of its sha256
    sha256: str | None = None
    versions: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the history, current first
    route: dict[str, Any] | None = None  # a canary split: {"versions": [{version, sha256, weight}], "sticky"}


# ---- request specs and response parsing (shared by both clients) ------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: dict[str, Any] | None = None
    files: Mapping[str, Path] | None = None  # multipart file fields, opened only while sending
    data: dict[str, str] | None = None  # multipart text fields
    content: Path | None = None  # a raw body, read from this file while sending
    admin: bool = False  # needs the admin key rather than the API key
    accept: tuple[int, ...] = ()  # error statuses handed to `parse` instead of raised


def _error(resp: httpx.Response) -> LoraplexError:
    """The server's message from an OpenAI-style `{"error": {"message"}}` or TGI-style `{"error": str}` body."""
    try:
        body = resp.json()
    except ValueError:
        return LoraplexError(resp.status_code, resp.text.strip()[:500] or resp.reason_phrase)
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return LoraplexError(resp.status_code, str(err.get("message", err)), body)
    if err is not None:
        return LoraplexError(resp.status_code, str(err), body)
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return LoraplexError(resp.status_code, str(detail), body)


def _finish(call: _Call[T], resp: httpx.Response) -> T:
    if resp.status_code >= 400 and resp.status_code not in call.accept:
        raise _error(resp)
    return call.parse(resp)


def _json(resp: httpx.Response) -> dict[str, Any]:
    return resp.json()


def _completion(resp: httpx.Response) -> Completion:
    body = resp.json()
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    u = body.get("usage") or {}
    usage = Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0), u.get("total_tokens", 0))
    return Completion(body.get("id", ""), body.get("model", ""), text or "", choice.get("finish_reason"), usage,
                      body, resp.headers.get(VERSION_HEADER))


def _adapter_from(record: dict[str, Any]) -> Adapter:
    return Adapter(record["name"], record.get("rank"), record.get("alpha"), record.get("target_modules"),
                   record.get("size_bytes"), record.get("tier", "disk"), bool(record.get("pinned", False)),
                   record.get("state", "ready"), record.get("error"), dict(record.get("load_stats") or {}),
                   record, record.get("version"), record.get("sha256"), list(record.get("versions") or []),
                   record.get("route"))


def _adapter(resp: httpx.Response) -> Adapter:
    return _adapter_from(resp.json())


def _adapters(resp: httpx.Response) -> list[Adapter]:
    return [_adapter_from(r) for r in resp.json()["data"]]


def _models(resp: httpx.Response) -> list[Model]:
    return [Model(m["id"], m.get("parent"), m) for m in resp.json()["data"]]


def _is_ready(resp: httpx.Response) -> bool:
    return resp.status_code == 200


def _generation(path: str, body: dict[str, Any], params: Mapping[str, Any], stream: bool) -> _Call[Completion]:
    if "stream" in params:
        raise TypeError("stream= is not a parameter here: call stream() / stream_chat() to stream")
    return _Call("POST", path, _completion, json={**body, **params, "stream": stream})


def _complete(model: str, prompt: str, params: Mapping[str, Any], stream: bool = False) -> _Call[Completion]:
    return _generation("/v1/completions", {"model": model, "prompt": prompt}, params, stream)


def _chat(model: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any],
          stream: bool = False) -> _Call[Completion]:
    return _generation("/v1/chat/completions", {"model": model, "messages": [dict(m) for m in messages]}, params,
                       stream)


def _upload(name: str, path: str | Path, pinned: bool | None, replace: bool = False,
            sha256: str | None = None) -> _Call[Adapter]:
    """A PEFT dir (its two files) or a `.tar.gz` of them; missing local files fail here, before any request."""
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        files = {"archive": path}
    elif path.is_dir():
        files = {f: path / f for f in ADAPTER_FILES}
        missing = [f for f, p in files.items() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"adapter dir {path} lacks {', '.join(missing)}")
    else:
        raise FileNotFoundError(f"{path} is neither an adapter dir nor a .tar.gz archive")
    data = {"replace": "true" if replace else "false"}
    data |= {"pinned": "true" if pinned else "false"} if pinned is not None else {}
    data |= {"sha256": sha256} if sha256 is not None else {}
    return _Call("PUT", f"/v1/adapters/{_segment(name)}", _adapter, files=files, data=data, admin=True)


def _segment(name: str) -> str:
    """Adapter names go into the URL path: quote them so that '/' or '?' cannot change the route."""
    return quote(name, safe="")


@contextmanager
def _opened(files: Mapping[str, Path] | None) -> Iterator[dict[str, tuple[str, Any]] | None]:
    """Open the multipart file fields for the duration of one request (streamed by httpx, not read here)."""
    if not files:
        yield None
        return
    with ExitStack() as stack:
        yield {name: (p.name, stack.enter_context(p.open("rb"))) for name, p in files.items()}


def _body(call: _Call[Any]) -> bytes | None:
    """A raw body's bytes (PUT …/weights: one safetensors file, sent with its length)."""
    return call.content.read_bytes() if call.content is not None else None


def _sse_delta(line: str) -> str | object | None:
    """One SSE line -> the text delta it carries, `_DONE`, or None (blank/comment/role-only lines)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return _DONE
    event = json.loads(payload)
    if "error" in event:  # an error after the 200 headers were sent arrives as an event
        err = event["error"]
        message = err.get("message", err) if isinstance(err, dict) else err
        status = err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), int) else 500
        raise LoraplexError(status, str(message), event)
    choice = (event.get("choices") or [{}])[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or None


class _Base:
    """Base URL and keys; which header a call carries."""

    def __init__(self, base_url: str, api_key: str | None, admin_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key, self._admin_key = api_key, admin_key

    def _headers(self, call: _Call[Any]) -> dict[str, str]:
        # Either key where the other is not given: one key may open every route (a tenant's, or --api-key alone).
        key = (self._admin_key or self._api_key) if call.admin else (self._api_key or self._admin_key)
        return {"Authorization": f"Bearer {key}"} if key else {}


_HEALTH: _Call[dict[str, Any]] = _Call("GET", "/health", _json)
_READY: _Call[bool] = _Call("GET", "/ready", _is_ready, accept=(503,))
_MODELS: _Call[list[Model]] = _Call("GET", "/v1/models", _models)
_LIST: _Call[list[Adapter]] = _Call("GET", "/v1/adapters", _adapters, admin=True)


def _register(name: str, path: str, pinned: bool | None, replace: bool = False,
              sha256: str | None = None) -> _Call[Adapter]:
    body: dict[str, Any] = {"name": name, "path": path, "replace": replace}
    body |= {"pinned": pinned} if pinned is not None else {}
    body |= {"sha256": sha256} if sha256 is not None else {}
    return _Call("POST", "/v1/adapters", _adapter, json=body, admin=True)


def _weights(name: str, weights: str | Path, sha256: str | None) -> _Call[Adapter]:
    """A raw adapter_model.safetensors as the name's new current version (its current config is kept)."""
    path = Path(weights)
    if path.is_dir():
        path = path / ADAPTER_FILES[1]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a safetensors file")
    query = f"?sha256={quote(sha256, safe='')}" if sha256 is not None else ""
    return _Call("PUT", f"/v1/adapters/{_segment(name)}/weights{query}", _adapter, content=path, admin=True)


def _rollback(name: str, version: str | None) -> _Call[Adapter]:
    return _Call("POST", f"/v1/adapters/{_segment(name)}/rollback", _adapter,
                 json={"version": version} if version is not None else {}, admin=True)


def _route(name: str, weights: Mapping[str, int], sticky: str) -> _Call[Adapter]:
    splits = [{"version": v, "weight": w} for v, w in weights.items()]
    return _Call("PUT", f"/v1/adapters/{_segment(name)}/route", _adapter, json={"versions": splits, "sticky": sticky},
                 admin=True)


def _unroute(name: str) -> _Call[Adapter]:
    return _Call("DELETE", f"/v1/adapters/{_segment(name)}/route", _adapter, admin=True)


def _prefetch(name: str, tier: str) -> _Call[dict[str, Any]]:
    return _Call("POST", f"/v1/adapters/{_segment(name)}/prefetch", _json, json={"tier": tier}, admin=True)


def _get(name: str) -> _Call[Adapter]:
    return _Call("GET", f"/v1/adapters/{_segment(name)}", _adapter, admin=True)


def _delete(name: str) -> _Call[Adapter]:
    return _Call("DELETE", f"/v1/adapters/{_segment(name)}", _adapter, admin=True)


# ---- the clients: one-line methods over the shared calls ----------------------------------------------------


class LoraplexClient(_Base):
    """Blocking client. `with LoraplexClient(url) as c: c.complete("my-adapter", "Hello", max_tokens=16)`."""

    def __init__(self, base_url: str, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float = 60.0, *, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, admin_key)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def _run(self, call: _Call[T]) -> T:
        with _opened(call.files) as files:
            resp = self._http.request(call.method, call.path, json=call.json, files=files, data=call.data,
                                      content=_body(call), headers=self._headers(call))
        return _finish(call, resp)

    def _stream(self, call: _Call[Any]) -> Iterator[str]:
        with self._http.stream(call.method, call.path, json=call.json, headers=self._headers(call)) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise _error(resp)
            for line in resp.iter_lines():
                delta = _sse_delta(line)
                if delta is _DONE:
                    return
                if delta:
                    yield delta

    def complete(self, model: str, prompt: str, **params: Any) -> Completion:
        """`POST /v1/completions`; `model` is an adapter name or the base name; params as OpenAI/vLLM's."""
        return self._run(_complete(model, prompt, params))

    def stream(self, model: str, prompt: str, **params: Any) -> Iterator[str]:
        """Streamed `/v1/completions`: yields text deltas until `data: [DONE]`."""
        return self._stream(_complete(model, prompt, params, stream=True))

    def chat(self, model: str, messages: Sequence[Mapping[str, str]], **params: Any) -> Completion:
        return self._run(_chat(model, messages, params))

    def stream_chat(self, model: str, messages: Sequence[Mapping[str, str]], **params: Any) -> Iterator[str]:
        return self._stream(_chat(model, messages, params, stream=True))

    def models(self) -> list[Model]:
        return self._run(_MODELS)

    def register_adapter(self, name: str, path: str, pinned: bool | None = None, *, replace: bool = False,
                         sha256: str | None = None) -> Adapter:
        """Register a PEFT dir by path (inside the server's --adapter-root) or s3:// URL. `replace`: as the name's
        new current version; `sha256`: the digest its files must have (`adapter_digest(dir)`)."""
        return self._run(_register(name, path, pinned, replace, sha256))

    def upload_adapter(self, name: str, dir_path: str | Path, pinned: bool | None = None, *, replace: bool = False,
                       sha256: str | None = None) -> Adapter:
        """Upload a local PEFT dir (or a .tar.gz of its two files); `replace` and `sha256` as register_adapter."""
        return self._run(_upload(name, dir_path, pinned, replace, sha256))

    def put_weights(self, name: str, weights: str | Path, sha256: str | None = None) -> Adapter:
        """A new current version from a local adapter_model.safetensors (or a PEFT dir's), keeping the config."""
        return self._run(_weights(name, weights, sha256))

    def rollback(self, name: str, version: str | None = None) -> Adapter:
        """Make a version of the history current again (default: the previous one)."""
        return self._run(_rollback(name, version))

    def set_route(self, name: str, weights: Mapping[str, int], sticky: str = "user") -> Adapter:
        """Split new requests between versions: {version prefix: weight}; sticky "user" or "none"."""
        return self._run(_route(name, weights, sticky))

    def clear_route(self, name: str) -> Adapter:
        return self._run(_unroute(name))

    def prefetch(self, name: str, tier: str = "device") -> dict[str, Any]:
        """Load the name's current (or routed) versions without a request: "host" or "device"."""
        return self._run(_prefetch(name, tier))

    def list_adapters(self) -> list[Adapter]:
        return self._run(_LIST)

    def get_adapter(self, name: str) -> Adapter:
        return self._run(_get(name))

    def delete_adapter(self, name: str) -> Adapter:
        """Unregister; answers the removed record."""
        return self._run(_delete(name))

    def health(self) -> dict[str, Any]:
        return self._run(_HEALTH)

    def ready(self) -> bool:
        """True when the model is loaded and the server is not draining (503 -> False)."""
        return self._run(_READY)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LoraplexClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLoraplexClient(_Base):
    """asyncio client with the same methods as `LoraplexClient`, as coroutines / async iterators."""

    def __init__(self, base_url: str, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float = 60.0, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, admin_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def _run(self, call: _Call[T]) -> T:
        with _opened(call.files) as files:
            resp = await self._http.request(call.method, call.path, json=call.json, files=files, data=call.data,
                                            content=_body(call), headers=self._headers(call))
        return _finish(call, resp)

    async def _stream(self, call: _Call[Any]) -> AsyncIterator[str]:
        async with self._http.stream(call.method, call.path, json=call.json, headers=self._headers(call)) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise _error(resp)
            async for line in resp.aiter_lines():
                delta = _sse_delta(line)
                if delta is _DONE:
                    return
                if delta:
                    yield delta

    async def complete(self, model: str, prompt: str, **params: Any) -> Completion:
        return await self._run(_complete(model, prompt, params))

    def stream(self, model: str, prompt: str, **params: Any) -> AsyncIterator[str]:
        return self._stream(_complete(model, prompt, params, stream=True))

    async def chat(self, model: str, messages: Sequence[Mapping[str, str]], **params: Any) -> Completion:
        return await self._run(_chat(model, messages, params))

    def stream_chat(self, model: str, messages: Sequence[Mapping[str, str]], **params: Any) -> AsyncIterator[str]:
        return self._stream(_chat(model, messages, params, stream=True))

    async def models(self) -> list[Model]:
        return await self._run(_MODELS)

    async def register_adapter(self, name: str, path: str, pinned: bool | None = None, *, replace: bool = False,
                               sha256: str | None = None) -> Adapter:
        return await self._run(_register(name, path, pinned, replace, sha256))

    async def upload_adapter(self, name: str, dir_path: str | Path, pinned: bool | None = None, *,
                             replace: bool = False, sha256: str | None = None) -> Adapter:
        return await self._run(_upload(name, dir_path, pinned, replace, sha256))

    async def put_weights(self, name: str, weights: str | Path, sha256: str | None = None) -> Adapter:
        return await self._run(_weights(name, weights, sha256))

    async def rollback(self, name: str, version: str | None = None) -> Adapter:
        return await self._run(_rollback(name, version))

    async def set_route(self, name: str, weights: Mapping[str, int], sticky: str = "user") -> Adapter:
        return await self._run(_route(name, weights, sticky))

    async def clear_route(self, name: str) -> Adapter:
        return await self._run(_unroute(name))

    async def prefetch(self, name: str, tier: str = "device") -> dict[str, Any]:
        return await self._run(_prefetch(name, tier))

    async def list_adapters(self) -> list[Adapter]:
        return await self._run(_LIST)

    async def get_adapter(self, name: str) -> Adapter:
        return await self._run(_get(name))

    async def delete_adapter(self, name: str) -> Adapter:
        return await self._run(_delete(name))

    async def health(self) -> dict[str, Any]:
        return await self._run(_HEALTH)

    async def ready(self) -> bool:
        return await self._run(_READY)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncLoraplexClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
