"""Typed messages into the engine's adapter inbox: what the host loader reports and what admin calls ask.

Other threads never touch the engine's SlotTable: they post one of these into the inbox (adapters/port.py),
and the engine thread applies them at the start of its next step (SlotTable.apply). Each is a frozen value,
so a message cannot change after it was posted.

`epoch` identifies one registration of a name (SlotTable hands it out): a result for an earlier copy of a
name, unregistered meanwhile, must not touch a later registration under the same name.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from loraplex.adapters.weights import AdapterWeights


# ---- from the host loader ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostLoaded:
    """The adapter's files were read and validated into host memory in `seconds`."""

    name: str
    epoch: int
    weights: AdapterWeights
    seconds: float


@dataclass(frozen=True)
class HostLoadFailed:
    """Reading or validating the adapter's files failed; `reason` says why (it fails only this adapter)."""

    name: str
    epoch: int
    reason: str


# ---- from admin calls (HTTP threads, the registry) -----------------------------------------------------
@dataclass(frozen=True)
class Command:
    """An admin command; `applied` is set once the engine thread applied it and published the snapshot that
    shows it, so a caller can answer its HTTP request with the new state. `failures` holds why applying it
    raised, if it did (set by the engine thread before `applied`)."""

    applied: threading.Event = field(default_factory=threading.Event, compare=False, repr=False, kw_only=True)
    failures: list[str] = field(default_factory=list, compare=False, repr=False, kw_only=True)

    def fail(self, reason: str) -> None:
        self.failures.append(reason)

    @property
    def label(self) -> str:
        """What the command was, for an error message: e.g. "Forget('x')"."""
        return f"{type(self).__name__}({getattr(self, 'name', '')!r})"


@dataclass(frozen=True)
class Pin(Command):
    """Pin (load now, never evict) or unpin `name`."""

    name: str
    pinned: bool = True


@dataclass(frozen=True)
class Forget(Command):
    """`name` was unregistered: drop every cached copy (a slot still in use is freed on its last release)."""

    name: str


@dataclass(frozen=True)
class Restore(Command):
    """`name` was registered (again): forget an earlier load error so the next request retries."""

    name: str


@dataclass(frozen=True)
class PutHost(Command):
    """Seed the host tier with weights registration already read and validated."""

    name: str
    weights: AdapterWeights


Message = HostLoaded | HostLoadFailed | Pin | Forget | Restore | PutHost
