"""AsyncEngine: runs LLMEngine's step loop on its own thread; asyncio callers add, stream and abort.

The event loop never blocks on the model: requests and aborts go into an inbox the engine thread drains
between steps; outputs come back through per-request asyncio queues (call_soon_threadsafe).

Faults stay as small as they can: a bad inbox item fails its own request, a fault in a step fails that
step's requests (LLMEngine.step). Should the thread die anyway, every open stream gets a terminal error at
once, later calls are refused with `EngineDead`, and `on_fatal` tells the process to exit non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraplex.adapters.slot_table import AdapterSnapshot
from loraplex.server.engine.engine import LLMEngine
from loraplex.server.engine.request import Request, RequestOutput, StepStats
from loraplex.server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loraplex.adapters.merge import MergeRecipe
    from loraplex.server.engine.guided import CompiledGrammar, GuidedSpec

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine thread has stopped; no request can run in this process any more."""


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    merge: MergeRecipe | None = None
    prefix_of: str | None = None
    cache_salt: str | None = None


@dataclass(frozen=True)
class _FailNextStep:
    """Test hook: make the next forward pass raise once."""

    reason: str


@dataclass(frozen=True)
class _Crash:
    """Test hook: make the engine thread die, as an unexpected fault would."""

    reason: str


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine thread publishes after each inbox drain and step; other threads (metrics, tests) read
    this immutable value instead of the engine's live queues."""

    waiting: int = 0
    running: int = 0
    steps: int = 0  # steps that computed tokens since start
    kv_usage: float = 0.0  # fraction of KV blocks in use
    running_adapters: tuple[str, ...] = ()  # distinct adapter names of running requests, sorted
    waiting_adapters: tuple[str, ...] = ()  # the same for queued requests
    prefix_queries: int = 0  # tokens looked up in the prefix cache since start (vllm:prefix_cache_queries)
    prefix_hits: int = 0  # tokens found there (vllm:prefix_cache_hits)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: list[object] = []
        self._cv = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.on_step: Callable[[StepStats], None] = lambda stats: None  # metrics hook, engine thread
        self.on_fatal: Callable[[str], None] = lambda reason: None  # the thread died: the process should exit
        engine.adapter_port.waker = self._wake  # a loader result or an admin command arrived
        engine.adapter_port.engine_running = lambda: self.alive  # admin calls wait for their command only then
        self.alive = False
        self.dead_reason: str | None = None
        self.snapshot = EngineSnapshot()
        self._step_allowance: int | None = None  # test hook: steps still allowed (None = no limit)
        pool = engine.pool
        self._token_capacity = min(engine.config.max_model_len, pool.num_blocks * pool.block_size)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self.alive = True
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.close()

    @property
    def num_active(self) -> int:
        return len(self._streams)

    # ---- what callers on other threads may ask: immutable facts and thread-safe objects ------------------
    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        """RequestRejected (a ValueError) with the numbers if the request can never run."""
        self.engine.check_fits(prompt_len, params)

    def compile_grammar(self, spec: GuidedSpec) -> CompiledGrammar:
        """Compile a structured-output grammar (thread-safe, cached): the API does it before admission."""
        return self.engine.compile_grammar(spec)

    @property
    def token_capacity(self) -> int:
        """Most tokens (prompt + output) one request may hold: the context limit or the KV pool."""
        return self._token_capacity

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.engine.post.eos_ids

    @property
    def adapters(self) -> AdapterSnapshot:
        """The adapter snapshot the engine thread published last: tiers, states, errors, statistics."""
        return self.engine.adapter_port.snapshot

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                       request_id: str | None = None, *, merge: MergeRecipe | None = None,
                       prefix_of: str | None = None, cache_salt: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iterator early (client gone) aborts the request.
        `merge`, `prefix_of` and `cache_salt` as in LLMEngine.add_request."""
        rid = request_id or uuid.uuid4().hex
        self.check_fits(len(prompt_ids), params)  # reject early, in the caller's context
        self._check_alive()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        self._post(_Add(rid, list(prompt_ids), params, adapter, merge, prefix_of, cache_salt))
        if self.dead_reason is not None:  # died between the check and registering: no one will answer
            queue.put_nowait(_dead_output(rid, len(prompt_ids), self.dead_reason))
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
        """Requests for `adapter` that have not started end with an error (it was unregistered)."""
        self._post(("fail_adapter", adapter, reason))

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDead(f"the engine has stopped ({self.dead_reason}); the server is exiting")

    def _post(self, item: object) -> None:
        with self._cv:
            self._inbox.append(item)
            self._cv.notify()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- test hooks ------------------------------------------------------------------------------
    def allow_steps(self, n: int | None) -> None:
        """Test hook: run at most `n` more steps that compute tokens, then hold (None: no limit); steps that
        only wait on adapter loads are free. The inbox is still drained while held, so requests are queued in
        the engine but none advances: a test makes a request "still running" by construction instead of by
        guessing how fast the machine is."""
        with self._cv:
            self._step_allowance = n
            self._cv.notify()

    def fail_next_step(self, reason: str) -> None:
        """Test hook: the next step's forward raises (once), as a kernel fault would; the engine goes on."""
        self._post(_FailNextStep(reason))

    def crash(self, reason: str) -> None:
        """Test hook: the engine thread dies at its next wake-up, as an unexpected fault would kill it."""
        self._post(_Crash(reason))

    # ---- engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while self._wait_for_work():
                self._drain_inbox()
                self._step()
        except BaseException as exc:  # noqa: BLE001 - nothing may leave clients waiting on a dead thread
            log.critical("engine thread died: %s: %s", type(exc).__name__, exc, exc_info=True)
            self._die(f"{type(exc).__name__}: {exc}")
        finally:
            self.alive = False

    def _die(self, reason: str) -> None:
        """Ask the process to exit, then end every open stream with an error (nobody waits on a dead thread)."""
        self.dead_reason = reason
        self.alive = False
        try:
            self.on_fatal(f"the engine thread died ({reason})")  # first: /health is 503 before clients hear
        finally:
            for rid, (loop, queue) in list(self._streams.items()):
                _put(loop, queue, _dead_output(rid, 0, reason))

    def _can_step(self) -> bool:
        return self.engine.has_work() and self._step_allowance != 0

    def _wait_for_work(self) -> bool:
        with self._cv:
            if not self._inbox and not self._can_step() and not self.engine.adapter_work_pending() and not self._stop:
                self._cv.wait(timeout=1.0)
            return not self._stop

    def _drain_inbox(self) -> None:
        with self._cv:
            items, self._inbox = self._inbox, []
        for item in items:
            if isinstance(item, _Crash):
                raise RuntimeError(item.reason)
            try:
                self._apply(item)
            except Exception:  # noqa: BLE001 - one bad item must not kill the thread serving everyone
                log.exception("engine inbox item %r failed", type(item).__name__)
                if isinstance(item, _Add):
                    self._deliver([_error_output(item, "internal error while queueing this request", "internal")])
        # Adapter messages too, even while a test holds steps: admin calls wait for their command to land.
        applied = self.engine.apply_adapter_messages()
        if items or applied:  # an empty drain changed nothing: the step publishes its own snapshot
            self._publish()

    def _apply(self, item: object) -> None:
        if isinstance(item, _FailNextStep):
            self._arm_fault(item.reason)
        elif isinstance(item, _Add):
            try:
                self.engine.add_request(item.request_id, item.prompt_ids, item.params, item.adapter, item.merge,
                                        item.prefix_of, item.cache_salt)
            except ValueError as exc:
                self._deliver([_error_output(item, str(exc), "request")])
        elif item[0] == "abort":
            out = self.engine.abort(item[1])
            if out is not None:
                self._deliver([out])
        elif item[0] == "fail_adapter":
            self._deliver(self.engine.fail_adapter(item[1], item[2]))

    def _arm_fault(self, reason: str) -> None:
        runner = self.engine.runner
        execute = runner.execute

        def failing(*args: object, **kwargs: object) -> object:
            runner.execute = execute  # once
            raise RuntimeError(reason)

        runner.execute = failing

    def _step(self) -> None:
        if not self._can_step():
            return
        result = self.engine.step()  # faults inside a step fail that step's requests; others propagate
        computed = result.computed  # steps that only wait on adapter loads do not count
        with self._cv:
            if self._step_allowance is not None and computed:
                self._step_allowance -= 1
        self._publish(stepped=computed)
        try:
            self.on_step(result.stats)  # before delivery: a scrape right after a response sees this step
        except Exception:  # noqa: BLE001 - a metrics fault must not stop generation
            log.exception("on_step hook failed")
        self._deliver(result.outputs)
        if not computed and self.engine.has_work():
            with self._cv:  # everyone waits on adapter loads: sleep until one lands (or briefly)
                if not self._inbox and not self.engine.adapter_work_pending():
                    self._cv.wait(timeout=0.005)

    def _publish(self, stepped: bool = False) -> None:
        self.engine.publish_adapters()
        sched = self.engine.scheduler
        self.snapshot = EngineSnapshot(len(sched.waiting), len(sched.running), self.snapshot.steps + int(stepped),
                                       self.engine.pool.usage, _adapter_names(sched.running),
                                       sched.waiting.adapter_names(), sched.prefix_queries, sched.prefix_hits)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                _put(*target, out)


def _adapter_names(requests: Iterable[Request]) -> tuple[str, ...]:
    return tuple(sorted({r.adapter for r in requests if r.adapter}))


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[RequestOutput], out: RequestOutput) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, out)
    except RuntimeError:  # that caller's event loop is closed: nobody is waiting there any more
        log.debug("dropped output for %s: its event loop is closed", out.request_id)


def _error_output(item: _Add, message: str, kind: str) -> RequestOutput:
    return RequestOutput(item.request_id, [], "", True, "error", len(item.prompt_ids), 0, message, error_kind=kind)


def _dead_output(request_id: str, num_prompt_tokens: int, reason: str) -> RequestOutput:
    return RequestOutput(request_id, [], "", True, "error", num_prompt_tokens, 0,
                         f"the engine stopped ({reason}); the server is exiting, retry on another replica",
                         error_kind="unavailable")
