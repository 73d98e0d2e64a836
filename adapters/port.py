"""AdapterPort: the side of the engine's adapter state that other threads may touch.

In: a thread-safe inbox of typed messages (adapters/messages.py) — host loader results and admin commands
(pin, forget, restore, put_host) — that the engine thread drains at the start of each step and applies to
its SlotTable. Out: the immutable `AdapterSnapshot` the engine thread publishes after it applied messages and
after each step; the registry's `describe`, the HTTP routes and the metrics read only that.

An admin call that must show its effect in its answer ("201, then GET shows tier host"; DELETE frees the slot)
posts its command and waits, bounded, for the engine thread to apply it — only while an engine thread runs
(`engine_running`, set by the AsyncEngine). A command the engine failed to apply, or did not apply in time,
raises (500 / 503 at the API), so an answer never claims an effect nobody saw. A bare LLMEngine (tests,
benchmarks) applies the commands at its next `step()` or `apply_adapter_messages()`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable

from loraplex.adapters.errors import AdapterCommandError, AdapterCommandTimeout
from loraplex.adapters.messages import Command, Forget, Message, Pin, PutHost, Restore
from loraplex.adapters.slot_table import AdapterSnapshot
from loraplex.adapters.weights import AdapterWeights

# Longest an admin call waits for the engine thread to apply its command: about one engine step, normally.
APPLY_TIMEOUT_S = 30.0


class AdapterPort:
    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._arrived = threading.Event()  # set on every post, cleared by the drain: lets a bare driver wait
        self.snapshot = AdapterSnapshot()  # replaced (never mutated) by the engine thread
        self.waker: Callable[[], None] = lambda: None  # the AsyncEngine's: new messages for the engine thread
        self.engine_running: Callable[[], bool] = lambda: False  # the AsyncEngine's: a thread applies messages
        # The registry's membership test (AdapterStore.attach); the SlotTable asks it through `registered`.
        self.is_registered: Callable[[str], bool] = lambda name: True

    def registered(self, name: str) -> bool:
        return self.is_registered(name)

    # ---- any thread ------------------------------------------------------------------------------
    def put(self, msg: Message) -> None:
        """Queue one message (the host loader wakes the engine itself, once per result)."""
        self._inbox.put(msg)
        self._arrived.set()

    def wake(self) -> None:
        self.waker()

    def post(self, *msgs: Message) -> None:
        for msg in msgs:
            self.put(msg)
        self.wake()

    def wait_applied(self, commands: Iterable[Command | None], timeout: float = APPLY_TIMEOUT_S) -> bool:
        """Wait until the engine thread applied every one of `commands` (and so every message posted before
        them). Returns False at once when no engine thread runs (a bare engine applies them at its next step),
        True once applied. Raises AdapterCommandError when applying one raised, AdapterCommandTimeout when
        `timeout` passed or the engine thread stopped first: the caller answers with that, never "done"."""
        pending = [c for c in commands if c is not None]
        if not pending or not self.engine_running():
            return False
        deadline = time.monotonic() + timeout
        for command in pending:
            while not command.applied.wait(0.05):
                if not self.engine_running():
                    raise AdapterCommandTimeout(f"the engine stopped before applying {command.label}")
                if time.monotonic() > deadline:
                    raise AdapterCommandTimeout(f"the engine did not apply {command.label} within {timeout:g} s; "
                                                "its effect is unknown, check the adapter's record")
            if command.failures:
                raise AdapterCommandError(f"the engine failed to apply {command.label}: {command.failures[0]}")
        return True

    def wait_for_message(self, timeout: float) -> bool:
        """Block until something was posted since the last drain (a bare driver's alternative to sleeping)."""
        return self._arrived.wait(timeout)

    # ---- admin commands (post only; callers wait with wait_applied outside their own locks) ------------
    def pin(self, name: str, pinned: bool = True) -> Command:
        return self._command(Pin(name, pinned))

    def forget(self, name: str) -> Command:
        return self._command(Forget(name))

    def restore(self, name: str) -> Command:
        return self._command(Restore(name))

    def register(self, name: str, weights: AdapterWeights, pinned: bool) -> tuple[Command, ...]:
        """A new registration: clear an old error, seed the host tier with the validated weights, pin."""
        commands = (self.restore(name), self._command(PutHost(name, weights)))
        return (*commands, self.pin(name)) if pinned else commands

    def _command(self, command: Command) -> Command:
        self.post(command)
        return command

    # ---- the engine thread ---------------------------------------------------------------------------
    def pending(self) -> bool:
        return not self._inbox.empty()

    def drain(self) -> list[Message]:
        self._arrived.clear()  # first: a message posted during the drain sets it again
        items: list[Message] = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def publish(self, snapshot: AdapterSnapshot, applied: Iterable[Message] = ()) -> None:
        """Make `snapshot` the one readers see, then release the admin callers waiting on `applied`."""
        self.snapshot = snapshot
        for msg in applied:
            if isinstance(msg, Command):
                msg.applied.set()
