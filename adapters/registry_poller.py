"""RegistryPoller: a thread that applies other replicas' registry changes every `--registry-poll-seconds`.

A change made through any replica is served by every other one within one poll interval plus one manifest GET
(a 304 when nothing changed). A failing poll (store unreachable, corrupt manifest) keeps the last good view,
logs the reason once per distinct error, and is retried at the next tick: serving never stops for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class RegistryPoller:
    def __init__(self, sync: Callable[[], list[str]], interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"--registry-poll-seconds: must be > 0, got {interval_s}")
        self._sync, self.interval_s = sync, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = {"unchanged": 0, "changed": 0, "error": 0}  # read by the metrics at scrape time
        self.last_success = time.monotonic()
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loraplex-registry-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def poll_once(self) -> None:
        try:
            changed = self._sync()
        except Exception as exc:  # noqa: BLE001 - S3 down, corrupt manifest: keep serving the last good view
            self.polls["error"] += 1
            reason = f"{type(exc).__name__}: {exc}"
            if reason != self.last_error:
                log.warning("registry poll failed (serving the last good view; retrying every %.1fs): %s",
                            self.interval_s, reason)
            self.last_error = reason
            return
        if self.last_error is not None:
            log.info("registry poll works again")
        self.last_error = None
        self.last_success = time.monotonic()
        self.polls["changed" if changed else "unchanged"] += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll_once()
