"""Connection limits of the HTTP server: a cap on open connections, deadlines for reading a request's headers and
body, a bound on header bytes, and a deadline on a write the client does not read.

uvicorn (0.55, with httptools or h11) gives none of these in a form that holds against a hostile client:
`limit_concurrency` answers 503 only once a request's headers have arrived, so idle and half-sent connections
are never counted out and can take every file descriptor; nothing times out a connection that never completes
its headers (the keep-alive timeout starts only after a response); httptools buffers an endless header value
without bound; and a response whose client never reads waits in `send()` forever, holding its admission slot.
(Measured: docs/security.md#connections.)

So the server runs uvicorn's own HTTP protocol with this mixin over it (`guarded_protocol`). It only watches
the asyncio.Protocol callbacks both uvicorn implementations share and the request cycle's public flags:

- at most `max_connections` open: a new connection over the cap closes the connection that has been idle the
  longest (no request in progress: a keep-alive connection, or one still sending headers); if every one is busy
  the newcomer gets 503 and is closed;
- headers must arrive within `header_timeout_s` of the connection (or of the next request's first byte): else
  408 and close; and they may take at most `MAX_HEADER_BYTES`: else 431 and close;
- a body must keep arriving: no byte for `body_timeout_s` (while the app is waiting for it) gives 408 and close;
- a write the client does not take (the transport's buffer stays above its high-water mark) for
  `stream_write_timeout_s` (`--stream-write-timeout`) aborts the connection: the app sees a disconnect, so a stream's
  request is aborted in the engine and its admission released.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from loraplex.server.config import ConnectionLimits

log = logging.getLogger(__name__)

# Request line plus headers. nginx's default is 4 x 8 KiB, h11's 16 KiB; ours is generous.
MAX_HEADER_BYTES = 64 * 1024


def guarded_protocol(limits: ConnectionLimits, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11; or `base`) with `limits` enforced; pass
    it as `uvicorn.Config(http=...)`."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    return type(f"Guarded{base.__name__}", (_Guard, base), {"limits": limits})


# File descriptors the process needs beyond its connections (model files, adapters, logs, the event loop).
_FD_HEADROOM = 256


def ensure_fd_room(max_connections: int) -> None:
    """Raise the soft open-file limit to fit `max_connections` plus headroom (up to the hard limit); warn if it
    cannot, since connections past the limit would fail every accept."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + _FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            log.warning("--max-connections %d: the open-file limit is %d (hard); lower --max-connections or raise "
                        "the limit", max_connections, hard)


def _response(status: int, reason: str, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _Guard:
    """The mixin; the attributes it reads (`transport`, `cycle`, `connections`, `flow`, `loop`) are uvicorn's."""

    limits: ConnectionLimits
    transport: asyncio.Transport
    cycle: Any
    connections: set[Any]
    flow: Any
    loop: asyncio.AbstractEventLoop

    # ---- asyncio.Protocol callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._seen_cycle: Any = None  # the request cycle whose headers we last saw complete
        self._awaiting_headers = True  # bytes from now on belong to a request's head
        self._header_bytes = 0
        self._idle_since = self.loop.time()
        self._read_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._arm_read(self.limits.header_timeout_s, self._headers_late)
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # refused or timed out: nothing more is parsed
            return
        if self._awaiting_headers:
            if self._read_timer is None:  # the next request's first byte starts its header deadline
                self._arm_read(self.limits.header_timeout_s, self._headers_late)
            self._header_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if not self.transport.is_closing():
            self._after_data()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read()
        self._cancel_write()
        super().connection_lost(exc)  # type: ignore[misc]

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.stream_write_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._cancel_write()

    def on_response_complete(self) -> None:
        self._idle_since = self.loop.time()
        super().on_response_complete()  # type: ignore[misc]

    # ---- reading: headers, then the body ---------------------------------------------------------------
    def _after_data(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle:  # a request's headers just completed
            self._seen_cycle, self._awaiting_headers, self._header_bytes = cycle, False, 0
            self._cancel_read()
        if self._awaiting_headers:
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(431, "Request Header Fields Too Large", f"request headers over {MAX_HEADER_BYTES} bytes")
            return
        if cycle.more_body:  # the body is still coming: it may pause at most body_timeout_s
            self._arm_read(self.limits.body_timeout_s, self._body_late)
        else:  # the body is complete: what comes next is the next request's head
            self._cancel_read()
            self._awaiting_headers = True

    def _headers_late(self) -> None:
        self._read_timer = None
        if self._awaiting_headers and not self._busy():
            self._refuse(408, "Request Timeout",
                         f"request headers not received within {self.limits.header_timeout_s:g}s")

    def _body_late(self) -> None:
        self._read_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_complete:
            return
        if self.flow.read_paused:  # we stopped reading (the app is behind): not the client's delay
            self._arm_read(self.limits.body_timeout_s, self._body_late)
            return
        self._refuse(408, "Request Timeout", f"request body stalled for {self.limits.body_timeout_s:g}s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer `status` (unless a response has begun) and close; the app, if running, sees a disconnect."""
        if self not in self.connections:  # upgraded to another protocol (a WebSocket): the transport is not ours
            return
        cycle = self.cycle
        started = cycle is not None and (cycle.response_started or cycle.response_complete)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's further sends are dropped and its receive() says disconnect
            cycle.message_event.set()
        log.info("closing connection from %s: %s", _peer(self.transport), message)
        if not started:
            self.transport.write(_response(status, reason, message))
        self.transport.close()

    # ---- writing -------------------------------------------------------------------------------------
    def _write_stalled(self) -> None:
        self._write_timer = None
        if self not in self.connections:  # upgraded to another protocol: the transport is not ours any more
            return
        log.warning("client %s did not read its response for %gs (--stream-write-timeout): closing the connection",
                    _peer(self.transport), self.limits.stream_write_timeout_s)
        self.transport.abort()  # buffered bytes are dropped: connection_lost ends the request's cycle

    # ---- the cap ---------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        """A request is in progress (its body being read, or its response not complete yet)."""
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete and not cycle.disconnected

    def _make_room(self) -> None:
        """Over the cap: close the connection idle the longest, else refuse this one (503)."""
        idle = [c for c in self.connections if c is not self and isinstance(c, _Guard) and not c._busy()
                and not c.transport.is_closing()]
        if idle:
            victim = min(idle, key=lambda c: c._idle_since)
            log.info("%d connections (--max-connections %d): closing the one idle longest, from %s",
                     len(self.connections), self.limits.max_connections, _peer(victim.transport))
            victim.transport.abort()
            return
        log.warning("%d connections, all busy (--max-connections %d): refusing %s", len(self.connections),
                    self.limits.max_connections, _peer(self.transport))
        self.transport.write(_response(503, "Service Unavailable",
                                       f"too many connections (--max-connections {self.limits.max_connections})"))
        self.transport.close()

    # ---- timers ----------------------------------------------------------------------------------------
    def _arm_read(self, seconds: float, callback: Any) -> None:
        self._cancel_read()
        self._read_timer = self.loop.call_later(seconds, callback)

    def _cancel_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _cancel_write(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a client"
