"""server/api/connections.py in process (issue 20 items 5, 6): uvicorn with the guarded protocol and a tiny ASGI app,
driven by raw sockets. Timeouts are tiny so each case is quick; every wait has a generous ceiling."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest
import uvicorn

from loraplex.server.api.connections import MAX_HEADER_BYTES, guarded_protocol
from loraplex.server.config import ConnectionLimits

LIMITS = ConnectionLimits(max_connections=8, header_timeout_s=0.3, body_timeout_s=0.3, stream_write_timeout_s=0.5)
ended: list[str] = []  # how each streamed response ended, as the app saw it


async def app(scope, receive, send) -> None:  # noqa: ANN001 - a bare ASGI app
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":  # 16 MiB in 64 KiB chunks: far more than socket buffers hold
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        listener = asyncio.ensure_future(listen())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(256):
            if gone.is_set():
                ended.append("disconnect")
                return
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        listener.cancel()
        ended.append("complete")
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = str(len(body)).encode()
    headers = [(b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=guarded_protocol(LIMITS), log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(10)
    return sock


def answer(sock: socket.socket) -> bytes:
    """The status line the server sent before closing ("" if it closed without one)."""
    try:
        data = sock.recv(4096)
    except OSError:
        return b""
    return data.split(b"\r\n", 1)[0]


def get(port: int, path: str = "/") -> bytes:
    with connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return answer(sock)


pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("payload, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n", b"408"),  # headers that never complete
    (b"", b"408"),  # a connection that says nothing
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 4096), b"431"),  # headers over the cap
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789", b"408"),  # a stalled body
], ids=["half-sent-headers", "silent", "header-over-cap", "stalled-body"])
async def test_a_client_that_stalls_or_floods_gets_an_error_and_is_closed(payload, status):
    async with serving() as port:
        sock = await asyncio.to_thread(connect, port)
        with contextlib.suppress(OSError):  # the server may close while the flood is still being sent
            sock.sendall(payload)
        t0 = time.monotonic()
        assert (await asyncio.to_thread(answer, sock)).startswith(b"HTTP/1.1 " + status)
        assert time.monotonic() - t0 < 8
        sock.close()


async def test_a_body_that_keeps_coming_is_served():
    async with serving() as port:
        sock = await asyncio.to_thread(connect, port)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n")
        for _ in range(4):  # each pause below the body timeout
            await asyncio.sleep(0.1)
            sock.sendall(b"0123456789")
        assert await asyncio.to_thread(answer, sock) == b"HTTP/1.1 200 OK"
        sock.close()


async def test_over_the_cap_the_connection_idle_longest_is_closed_and_newcomers_are_served():
    async with serving() as port:
        idle = [await asyncio.to_thread(connect, port) for _ in range(LIMITS.max_connections)]
        await asyncio.sleep(0.05)
        assert (await asyncio.to_thread(get, port)).startswith(b"HTTP/1.1 200")  # evicts the oldest idle one
        assert (await asyncio.to_thread(answer, idle[0])) == b""  # closed without a word
        for sock in idle:
            sock.close()


async def test_a_response_the_client_never_reads_is_aborted_after_the_write_timeout():
    ended.clear()
    async with serving() as port:
        sock = await asyncio.to_thread(connect, port, 4096)
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        deadline = time.monotonic() + 20
        while not ended and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert ended == ["disconnect"]  # the app saw the client go: its request ends, its resources are freed
        sock.close()
