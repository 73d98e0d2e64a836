"""AsyncEngine: runs LLMEngine's step loop on its own thread; asyncio callers add, stream and abort.

The event loop never blocks on the model: requests and aborts go into an inbox the engine thread drains
between steps; outputs come back through per-request asyncio queues (call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loraplex.server.engine.engine import LLMEngine
from loraplex.server.engine.request import RequestOutput
from loraplex.server.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: list[object] = []
        self._cv = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.on_step: Callable[[LLMEngine], None] = lambda e: None  # metrics hook, engine thread
        engine.adapters.on_ready = self._wake
        self.alive = False

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.adapters.close()

    @property
    def num_active(self) -> int:
        return len(self._streams)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iterator early (client gone) aborts the request."""
        rid = request_id or uuid.uuid4().hex
        self.engine.check_fits(len(prompt_ids), params)  # reject early, in the caller's context
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        self._post(_Add(rid, list(prompt_ids), params, adapter))
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)
            self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def fail_adapter(self, adapter: str, reason: str) -> None:
        """Queued requests for `adapter` end with an error (it was unregistered); running ones finish."""
        self._post(("fail_adapter", adapter, reason))

    def _post(self, item: object) -> None:
        with self._cv:
            self._inbox.append(item)
            self._cv.notify()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        self.alive = True
        try:
            while self._wait_for_work():
                self._drain_inbox()
                self._step()
        finally:
            self.alive = False

    def _wait_for_work(self) -> bool:
        with self._cv:
            if not self._inbox and not self.engine.has_work() and not self._stop:
                self._cv.wait(timeout=1.0)
            return not self._stop

    def _drain_inbox(self) -> None:
        with self._cv:
            items, self._inbox = self._inbox, []
        for item in items:
            self._apply(item)

    def _apply(self, item: object) -> None:
        if isinstance(item, _Add):
            try:
                self.engine.add_request(item.request_id, item.prompt_ids, item.params, item.adapter)
            except ValueError as exc:
                self._deliver([RequestOutput(item.request_id, [], "", True, "error", len(item.prompt_ids), 0,
                                             str(exc))])
        elif item[0] == "abort":
            out = self.engine.abort(item[1])
            if out is not None:
                self._deliver([out])
        elif item[0] == "fail_adapter":
            self._deliver(self.engine.fail_adapter(item[1], item[2]))

    def _step(self) -> None:
        if not self.engine.has_work():
            return
        try:
            outputs = self.engine.step()
        except Exception:  # noqa: BLE001 - a model failure must end requests, not the loop
            log.exception("engine step failed; failing the running requests")
            outputs = self.engine.fail_running("internal engine error during the forward pass")
        self.on_step(self.engine)  # before delivery: a scrape right after a response sees this step
        self._deliver(outputs)
        if self.engine.last_step_tokens == 0 and self.engine.has_work():
            with self._cv:  # everyone waits on adapter loads: sleep until one lands (or briefly)
                if not self._inbox:
                    self._cv.wait(timeout=0.005)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                loop, queue = target
                loop.call_soon_threadsafe(queue.put_nowait, out)
