"""Drive a live server's engine through its test hooks (LORAPLEX_TEST_HOOKS=1, set by `start_server`).

With these a test makes a request "still running" by construction: it holds the engine after a given number
of steps instead of hoping the machine is slow enough. Waits below poll for a state the test itself caused;
their deadlines only bound a broken server, they never decide a passing run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx


def allow_steps(url: str, steps: int | None) -> None:
    """The engine runs `steps` more steps and then holds (None: runs freely again)."""
    resp = httpx.post(url + "/_test/engine/steps", json={"steps": steps}, timeout=30)
    assert resp.status_code == 200, resp.text


def engine_state(url: str) -> dict[str, Any]:
    """{"waiting": n, "running": n, "steps": n} as the engine thread last published them."""
    return httpx.get(url + "/_test/engine", timeout=30).json()


@contextlib.contextmanager
def held(url: str, steps: int = 0) -> Iterator[None]:
    """Hold the engine after `steps` steps for the duration of the block; always release it after."""
    allow_steps(url, steps)
    try:
        yield
    finally:
        allow_steps(url, None)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll until `predicate()` is truthy (returns it); fails naming `what` if a broken server never gets
    there (the generous deadline is a safety net, not part of the test's logic)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.01)


def wait_queued(url: str, waiting: int, running: int = 0) -> None:
    """Wait until the (held) engine has taken exactly these requests from its inbox."""
    wait_until(lambda: engine_state(url) | {"steps": 0} == {"waiting": waiting, "running": running, "steps": 0},
               f"{waiting} waiting and {running} running requests in the engine")
