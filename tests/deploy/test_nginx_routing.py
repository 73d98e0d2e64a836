"""The shipped nginx config (deploy/nginx/) routes by adapter affinity: a real nginx with its njs module in
front of three in-process stub upstreams that say who answered.

Hash placement depends on the upstreams' addresses (random ports), so tests never assume which upstream a
name lands on: they learn it through the header route and compare. Synchronization is by construction
(threading.Event), never by sleeping; the only waits are bounded polls for startup.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from .nginx_server import NginxProcess, ensure_nginx, start_nginx

TIMEOUT = (10, 60)  # (connect, read) seconds for every client request: generous, only a bound on failure
GATE_TIMEOUT_S = 30.0  # how long a stub holds a stream open waiting for the test (only reached on failure)
NAMES = [f"adapter-{i:02d}" for i in range(60)]


class Stub(ThreadingHTTPServer):
    """An upstream that answers JSON saying which upstream it is, or SSE for stream requests."""

    daemon_threads = True

    def __init__(self, index: int) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.index = index
        self.gates: dict[str, threading.Event] = {}  # X-Stub-Gate token -> released by the test
        self.gate_timed_out = threading.Event()
        self.requests = 0  # requests received
        self.lock = threading.Lock()
        # A short poll interval only makes shutdown() return sooner (it waits for the next poll).
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        """Stop accepting and close the listening socket: connects are refused from now on."""
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=30)


class StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Stub

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        with self.server.lock:
            self.server.requests += 1
        if self.headers.get("X-Stub-Drop"):  # a replica dying mid-request: close without answering
            self.close_connection = True
            return
        info = {"upstream": self.server.index, "path": self.path, "method": self.command, "body_len": len(body),
                "http_version": self.request_version, "authorization": self.headers.get("Authorization"),
                "x_forwarded_for": self.headers.get("X-Forwarded-For")}
        try:
            wants_stream = json.loads(body).get("stream") is True
        except (ValueError, AttributeError):
            wants_stream = False
        if self.path == "/generate_stream" or wants_stream:
            self._stream(info)
            return
        payload = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self, info: dict[str, Any]) -> None:
        """Three SSE events as HTTP/1.1 chunks, each flushed. With an X-Stub-Gate header, the events after the
        first wait until the test releases the gate. No X-Accel-Buffering header (loraplex sends one): the
        stream must get through on nginx's config alone."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        gate = self.server.gates.get(self.headers.get("X-Stub-Gate", ""))
        for n in (1, 2, 3):
            if n == 2 and gate is not None and not gate.wait(GATE_TIMEOUT_S):
                self.server.gate_timed_out.set()
            self._chunk(f"data: {json.dumps({**info, 'n': n})}\n\n".encode())
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_DELETE = _handle


@pytest.fixture(scope="module", autouse=True)
def nginx_installed() -> None:
    reason = ensure_nginx()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def stubs() -> Iterator[list[Stub]]:
    servers = [Stub(i) for i in range(3)]
    yield servers
    for s in servers:
        if s.thread.is_alive():
            s.stop()


@pytest.fixture
def proxy(stubs: list[Stub], tmp_path: Path) -> Iterator[NginxProcess]:
    nginx = start_nginx([s.address for s in stubs], tmp_path / "nginx")
    yield nginx
    nginx.stop()


def post(proxy: NginxProcess, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
    r = requests.post(proxy.url + path, headers=headers, timeout=TIMEOUT, **kwargs)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}\n{proxy.error_log()[-4000:]}"
    return r


def upstream_of(r: requests.Response) -> int:
    if r.headers.get("Content-Type", "").startswith("text/event-stream"):
        return json.loads(r.text.split("\n\n")[0].removeprefix("data: "))["upstream"]
    return r.json()["upstream"]


def by_header(proxy: NginxProcess, name: str) -> int:
    r = post(proxy, "/v1/completions", headers={"X-Loraplex-Adapter": name}, json={"prompt": "hi"})
    assert r.headers["X-Loraplex-Route-Key"] == name
    return upstream_of(r)


def test_header_routing_is_sticky_and_spreads(proxy: NginxProcess) -> None:
    placement = {name: by_header(proxy, name) for name in NAMES}
    again = {name: by_header(proxy, name) for name in NAMES}
    assert again == placement, "the same X-Loraplex-Adapter must always land on the same upstream"
    assert set(placement.values()) == {0, 1, 2}, f"{len(NAMES)} names must spread over all 3 upstreams"
    # Any route, any method: the header decides.
    r = requests.get(proxy.url + "/v1/models", headers={"X-Loraplex-Adapter": NAMES[0]}, timeout=TIMEOUT)
    assert upstream_of(r) == placement[NAMES[0]]


def test_body_routing_agrees_with_the_header(proxy: NginxProcess) -> None:
    placement = {name: by_header(proxy, name) for name in NAMES}
    for name in NAMES:
        bodies = {
            "/v1/completions": {"model": name, "prompt": "hi"},
            "/v1/chat/completions": {"model": name, "messages": [{"role": "user", "content": "hi"}]},
            "/generate": {"inputs": "hi", "parameters": {"adapter_id": name}},
            "/generate_stream": {"inputs": "hi", "parameters": {"adapter_id": name, "max_new_tokens": 4}},
            "/": {"inputs": "hi", "parameters": {"adapter_id": name}},  # TGI's compat route
            "/v1/load_lora_adapter": {"lora_name": name, "lora_path": name},
        }
        for path, body in bodies.items():
            r = post(proxy, path, json=body)
            assert r.headers["X-Loraplex-Route-Key"] == name, path
            assert upstream_of(r) == placement[name], f"{path} with {name!r}: body and header routes differ"
    # /v1/adapters/<name>: the path names the adapter (GET, DELETE, and PUT uploads).
    for name in NAMES[:10]:
        r = requests.get(proxy.url + f"/v1/adapters/{name}", timeout=TIMEOUT)
        assert (r.headers["X-Loraplex-Route-Key"], upstream_of(r)) == (name, placement[name])
        r = requests.delete(proxy.url + f"/v1/adapters/{name}", timeout=TIMEOUT)
        assert upstream_of(r) == placement[name]
    # A namespaced name (issue 25, acme/support) is one key, the whole name, as in the body.
    name = "acme/support"
    r = requests.get(proxy.url + f"/v1/adapters/{name}", timeout=TIMEOUT)
    assert (r.headers["X-Loraplex-Route-Key"], upstream_of(r)) == (name, by_header(proxy, name))


def test_header_wins_over_body(proxy: NginxProcess) -> None:
    placement = {name: by_header(proxy, name) for name in NAMES}
    a = NAMES[0]
    b = next(n for n in NAMES if placement[n] != placement[a])
    r = post(proxy, "/v1/completions", headers={"X-Loraplex-Adapter": a}, json={"model": b, "prompt": "hi"})
    assert (r.headers["X-Loraplex-Route-Key"], upstream_of(r)) == (a, placement[a])
    tgi = {"inputs": "x", "parameters": {"adapter_id": a}}
    r = post(proxy, "/generate", headers={"X-Loraplex-Adapter": b}, json=tgi)
    assert (r.headers["X-Loraplex-Route-Key"], upstream_of(r)) == (b, placement[b])


@pytest.mark.parametrize("body", [
    b"not json at all",
    b'{"model": "trunc',
    b"",
    b'{"prompt": "no model"}',
    b'{"model": ""}',
    b'{"model": 123}',
    b'{"model": "two words"}',  # not a plain token: never echoed into a response header
    b'{"model": "a\\r\\nSet-Cookie: x=1"}',
    b"[1, 2]",
    b"null",
    b'{"inputs": "x", "parameters": "adapter"}',
])
def test_requests_without_a_usable_name_are_still_served(proxy: NginxProcess, body: bytes) -> None:
    for path in ("/v1/completions", "/generate"):
        r = post(proxy, path, data=body, headers={"Content-Type": "application/json"})
        assert r.headers["X-Loraplex-Route-Key"] == "-"
        assert "Set-Cookie" not in r.headers
        assert r.json()["body_len"] == len(body)


def test_requests_without_a_name_spread_round_robin(proxy: NginxProcess) -> None:
    # An empty hash key makes nginx fall back to round robin: no single replica gets all of them.
    seen = {upstream_of(post(proxy, "/generate", json={"inputs": "x"})) for _ in range(6)}
    assert seen == {0, 1, 2}


def test_a_3_mib_body_is_routed_by_its_model(proxy: NginxProcess) -> None:
    name = NAMES[7]
    body = json.dumps({"prompt": "x" * (3 * 2**20), "model": name}).encode()  # the name at the very end

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(body), 2**16):
            yield body[i:i + 2**16]

    expected = by_header(proxy, name)
    for data in (body, chunked()):  # Content-Length, then Transfer-Encoding: chunked
        r = post(proxy, "/v1/completions", data=data, headers={"Content-Type": "application/json"})
        assert r.headers["X-Loraplex-Route-Key"] == name, proxy.error_log()[-4000:]
        assert (upstream_of(r), r.json()["body_len"]) == (expected, len(body))


def test_bodies_nginx_spools_to_disk_fall_back_and_uploads_pass(proxy: NginxProcess) -> None:
    name = NAMES[3]
    expected = by_header(proxy, name)
    # 8 MiB: past client_body_buffer_size, so nginx writes it to a temp file and njs cannot read it. The
    # request is still forwarded whole; only the body rule is skipped.
    body = json.dumps({"model": name, "prompt": "x" * (8 * 2**20)}).encode()
    r = post(proxy, "/v1/completions", data=body)
    assert (r.headers["X-Loraplex-Route-Key"], r.json()["body_len"]) == ("-", len(body))
    r = post(proxy, "/v1/completions", data=body, headers={"X-Loraplex-Adapter": name})
    assert (r.headers["X-Loraplex-Route-Key"], upstream_of(r)) == (name, expected)
    # Uploads: PUT /v1/adapters/<name>, multipart, larger than the JSON routes' client_max_body_size (16m).
    blob = b"\0" * (20 * 2**20)
    r = requests.put(proxy.url + f"/v1/adapters/{name}", files={"archive": ("a.tar.gz", blob)}, timeout=TIMEOUT)
    assert r.status_code == 200, proxy.error_log()[-4000:]
    assert r.headers["X-Loraplex-Route-Key"] == name
    assert (upstream_of(r), r.json()["method"]) == (expected, "PUT")
    assert r.json()["body_len"] > len(blob)


def test_authorization_passes_and_forwarded_for_is_added(proxy: NginxProcess) -> None:
    auth = "Bearer sk-Test_42 =="
    r = post(proxy, "/v1/completions", json={"model": "x"}, headers={"Authorization": auth})
    assert r.json()["authorization"] == auth
    assert r.json()["x_forwarded_for"] == "127.0.0.1"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "streamer", "prompt": "hi", "stream": True}),
    ("/generate_stream", {"inputs": "hi", "parameters": {"adapter_id": "streamer"}}),
])
def test_streams_pass_through_unbuffered(proxy: NginxProcess, stubs: list[Stub], path: str,
                                         body: dict[str, Any]) -> None:
    # Every stub holds its stream after event 1 until the test has read event 1 through nginx: the test can
    # only get there if nginx forwarded event 1 on its own, without waiting for more of the response.
    # (This checks what clients see. nginx 1.22 happens to relay such chunks promptly even with
    # proxy_buffering on, so the test does not pin that directive; it pins the behaviour.)
    gate = threading.Event()
    for s in stubs:
        s.gates[path] = gate
    with requests.post(proxy.url + path, json=body, headers={"X-Stub-Gate": path}, stream=True,
                       timeout=TIMEOUT) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-Loraplex-Route-Key"] == "streamer"
        chunks = r.iter_content(chunk_size=None)
        received = b""
        while b"\n\n" not in received:
            received += next(chunks)
        first = json.loads(received.split(b"\n\n")[0].removeprefix(b"data: "))
        assert (first["n"], first["http_version"]) == (1, "HTTP/1.1")
        assert not any(s.gate_timed_out.is_set() for s in stubs), "event 1 only arrived after the stub gave up"
        gate.set()
        received += b"".join(chunks)
    events = [e.removeprefix(b"data: ") for e in received.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    assert [json.loads(e)["n"] for e in events[:-1]] == [1, 2, 3]
    assert not any(s.gate_timed_out.is_set() for s in stubs)


def test_a_post_that_reached_an_upstream_is_never_replayed(proxy: NginxProcess, stubs: list[Stub]) -> None:
    # The upstream takes the request and dies without answering: a generation may have started there, so
    # nginx must answer 502 rather than run it again on the next replica (no non_idempotent retries).
    r = requests.post(proxy.url + "/v1/completions", json={"model": NAMES[0]}, headers={"X-Stub-Drop": "1"},
                      timeout=TIMEOUT)
    assert r.status_code == 502
    assert r.headers["X-Loraplex-Route-Key"] == NAMES[0]
    assert sum(s.requests for s in stubs) == 1


def test_a_dead_upstream_moves_only_its_keys(proxy: NginxProcess, stubs: list[Stub]) -> None:
    placement = {name: by_header(proxy, name) for name in NAMES}
    dead = placement[NAMES[0]]
    stubs[dead].stop()
    after = {name: by_header(proxy, name) for name in NAMES}  # every request answered 200 (by_header checks)
    for name in NAMES:
        if placement[name] == dead:
            assert after[name] != dead, name
        else:
            assert after[name] == placement[name], f"{name} was not on the dead upstream and must not move"
    # Stable while the upstream stays down, through the body route as well.
    for name in NAMES:
        assert by_header(proxy, name) == after[name]
        assert upstream_of(post(proxy, "/v1/completions", json={"model": name})) == after[name]
    assert "connect() failed" in proxy.error_log()
