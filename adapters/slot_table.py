"""SlotTable: the one place that answers "where is adapter X" (disk, host memory, a device slot) and in what state.

Owned by the engine thread alone: no threads, no lock. Other threads reach it only through typed messages
(adapters/messages.py) that the engine applies at the start of a step, and read the immutable
`AdapterSnapshot` it publishes.

One entry per registered adapter name, with one state:

    REGISTERED -> HOST_LOADING -> HOST_READY -> DEVICE_READY        (or ERRORED from a failed read or copy)

The scheduler asks `acquire(name)` when it wants to run a request for `name`: a device-resident adapter
answers READY with its slot (refcount + 1); otherwise a slot is reserved (evicting the least recently used
unpinned, unreferenced adapter), its weights come from host memory or from a read the host loader is asked
for (`request_load`), and the engine copies them into the slot at its next step start (`load_due`). The
request waits without blocking others. An adapter used by a running request (refcount > 0) or pinned is
never evicted. A failing read or copy marks only that adapter errored. A name the registry does not hold
(`is_registered`) is answered ERRORED at once and costs no resident adapter its slot. The host tier is an
LRU bounded by a count and a byte budget, whichever binds first.

A virtual adapter (a ties / dare merge recipe, adapters/merge.py: "merge:...") is an entry like any other,
its "read" computed by the host loader. It counts as registered while every adapter of its recipe is, and is
forgotten with any of them: a component registered again gets a fresh merge.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from loraplex.adapters.merge import is_virtual, recipe_of
from loraplex.adapters.messages import Forget, HostLoaded, HostLoadFailed, Message, Pin, PutHost, Restore
from loraplex.adapters.weights import AdapterWeights

log = logging.getLogger(__name__)

TIERS = ("disk", "host", "device")
CACHED_TIERS = TIERS[1:]  # the tiers with hit/miss/eviction counters

# (name, epoch, urgent): ask the host loader to read an adapter's files; urgent = a device slot waits for it.
LoadRequester = Callable[[str, int, bool], None]
SlotWriter = Callable[[int, AdapterWeights], None]


class AdapterState(enum.Enum):
    REGISTERED = "registered"  # known; its weights are only on disk
    HOST_LOADING = "host_loading"  # the host loader is reading its files
    HOST_READY = "host_ready"  # its weights are in host memory (the host tier, or held for a pending slot copy)
    DEVICE_READY = "device_ready"  # in a device slot: a forward may use it
    ERRORED = "errored"  # its read or copy failed; its requests fail until it is registered again


class SlotState(enum.Enum):
    """What `acquire` answers."""

    READY = "ready"
    LOADING = "loading"  # a load for this adapter is under way; ask again next step
    NO_SLOT = "no_slot"  # every device slot is pinned or in use by running requests
    ERRORED = "errored"


@dataclass(frozen=True)
class Acquired:
    state: SlotState
    slot: int = -1
    reason: str | None = None
    epoch: int = 0  # READY: the registration in the slot (a prefix-cache key names it)


@dataclass(frozen=True)
class CacheStats:
    """Monotonic counters per cached tier (host, device) and bytes read from disk."""

    hits: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(CACHED_TIERS, 0))
    misses: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(CACHED_TIERS, 0))
    evictions: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(CACHED_TIERS, 0))
    bytes_loaded: int = 0


@dataclass(frozen=True)
class AdapterView:
    """One adapter as a snapshot shows it."""

    tier: str  # "disk", "host" or "device"
    state: AdapterState
    pinned: bool = False
    error: str | None = None
    load_info: Mapping[str, float] = field(default_factory=dict)  # last_load_seconds, host_load_seconds, loads


_ON_DISK = AdapterView("disk", AdapterState.REGISTERED)


@dataclass(frozen=True)
class AdapterSnapshot:
    """What the engine thread publishes for other threads (HTTP, metrics): never mutated once built."""

    adapters: Mapping[str, AdapterView] = field(default_factory=dict)
    resident: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {"device": (), "host": ()})
    stats: CacheStats = field(default_factory=CacheStats)
    host_bytes: int = 0
    num_slots: int = 0

    def view(self, name: str) -> AdapterView:
        """`name`'s view; a name the table holds nothing for is on disk."""
        return self.adapters.get(name, _ON_DISK)


@dataclass(eq=False)
class _Entry:
    """One registration of an adapter name (its `epoch`), as the engine thread tracks it."""

    name: str
    epoch: int
    state: AdapterState = AdapterState.REGISTERED
    slot: int | None = None  # the device slot reserved for it (filled once DEVICE_READY)
    refs: int = 0  # running requests that use its slot
    pinned: bool = False
    error: str | None = None
    pending: AdapterWeights | None = None  # weights to copy into `slot` at the next step start
    load_started: float = 0.0  # perf_counter() when `slot` was reserved
    host_wait: float = 0.0  # of the load, seconds spent waiting for the file read
    load_info: dict[str, float] = field(default_factory=dict)


class SlotTable:
    """`num_slots` device slots and a host LRU of at most `max_host` adapters and `max_host_bytes` bytes."""

    def __init__(self, *, num_slots: int, max_host: int, max_host_bytes: int = 2 * 2**30,
                 request_load: LoadRequester, clear_slot: Callable[[int], None],
                 is_registered: Callable[[str], bool] | None = None) -> None:
        self._slots: list[_Entry | None] = [None] * num_slots
        self._entries: dict[str, _Entry] = {}
        # Unregistered while running requests use them: the slot is freed on the last release.
        self._doomed: dict[str, _Entry] = {}
        self._device_lru: OrderedDict[str, None] = OrderedDict()  # DEVICE_READY names, least recent first
        self._host: OrderedDict[str, AdapterWeights] = OrderedDict()  # least recent first
        self._max_host, self._max_host_bytes = max_host, max_host_bytes
        self._host_bytes = 0  # sum of size_bytes over self._host
        self._due: dict[str, _Entry] = {}  # slot reserved and weights in host memory: copy at next step start
        self._epochs = itertools.count(1)
        self._counts = {kind: dict.fromkeys(CACHED_TIERS, 0) for kind in ("hits", "misses", "evictions")}
        self._bytes_loaded = 0
        self._request_load, self._clear_slot = request_load, clear_slot
        # Set by the registry (AdapterStore.attach); without one (a bare engine) any name may load.
        self.is_registered: Callable[[str], bool] = is_registered or (lambda name: True)
        self.on_load_seconds: Callable[[float], None] = lambda seconds: None
        # (name, epoch) of each registration dropped (unregistered, or a virtual adapter merged from one): the
        # engine unpublishes the KV blocks computed with it.
        self.on_forget: Callable[[str, int], None] = lambda name, epoch: None
        self._published = AdapterSnapshot(num_slots=num_slots)
        self._views: dict[str, AdapterView] = {}
        self._dirty: set[str] = set()  # names whose view changed since the last snapshot
        self._changed = False  # anything (views or counters) changed since the last snapshot

    # ---- the scheduler's side ------------------------------------------------------------------
    def acquire(self, name: str, *, first: bool = True) -> Acquired:
        """READY (+1 ref) when on the device; otherwise start or await a load and say why not yet.

        `first`: this is the request's first ask, so it counts as one device hit or miss (a request that
        waits for its load asks every step; counting those asks would inflate the hit rate).
        """
        got = self._acquire(name)
        if first and got.state is not SlotState.ERRORED:
            self._count("hits" if got.state is SlotState.READY else "misses", "device")
        return got

    def _acquire(self, name: str) -> Acquired:
        entry = self._entries.get(name)
        if entry is not None and entry.state is AdapterState.ERRORED:
            return Acquired(SlotState.ERRORED, reason=entry.error)
        if name in self._doomed:  # the old copy is still in use; a re-registered one waits for it
            return Acquired(SlotState.LOADING) if self._known(name) else self._not_registered(name)
        if entry is not None and entry.state is AdapterState.DEVICE_READY:
            entry.refs += 1
            self._device_lru.move_to_end(name)
            return Acquired(SlotState.READY, entry.slot, epoch=entry.epoch)
        if entry is not None and entry.slot is not None:
            return Acquired(SlotState.LOADING)
        if not self._known(name):  # e.g. DELETEd as its request was added: evict nothing for it
            return self._not_registered(name)
        # No host prefetch on NO_SLOT here: the scheduler asks every step, and with more waiting adapters
        # than host room, prefetching each time would evict them from host in a circle.
        return self._start_device_load(self._entry(name), evict=True, host_fallback=False)

    def release(self, name: str) -> None:
        entry = self._doomed.get(name) or self._entries[name]
        entry.refs -= 1
        if entry.refs == 0 and self._doomed.get(name) is entry:
            del self._doomed[name]
            self._release_slot(entry)

    def prefetch(self, name: str, *, evict: bool = False) -> None:
        """Bring `name` towards the device as soon as a request for it is queued: into a free slot, else into
        host memory. It evicts nothing (unless `evict`, for pinning): a speculative load must not take the
        slot of an adapter whose queued requests are about to run."""
        entry = self._entries.get(name)
        if name in self._doomed or not self._known(name):
            return
        if entry is None or (entry.slot is None and entry.state is not AdapterState.ERRORED):
            self._start_device_load(self._entry(name), evict=evict, host_fallback=True)

    def usable_slots(self, names: tuple[str, ...]) -> int:
        """How many slots `names` could hold at once: all but those of pinned adapters outside them (a linear
        merge needs one per adapter at the same time, adapters/merge.py)."""
        pinned = sum(1 for e in self._entries.values() if e.pinned and e.name not in names)
        return len(self._slots) - pinned

    def refcount(self, name: str) -> int:
        entry = self._doomed.get(name) or self._entries.get(name)
        return entry.refs if entry is not None else 0

    # ---- the engine's step start -----------------------------------------------------------------
    def apply(self, msg: Message) -> None:
        """Apply one message from the inbox (host loader results, admin commands)."""
        match msg:
            case HostLoaded():
                self._host_loaded(msg)
            case HostLoadFailed():
                self._host_failed(msg)
            case Pin():
                self.pin(msg.name, msg.pinned)
            case Forget():
                self.forget(msg.name)
            case Restore():
                self.restore(msg.name)
            case PutHost():
                self.put_host(msg.name, msg.weights)
            case _:
                raise TypeError(f"not an adapter message: {msg!r}")

    def load_due(self, write: SlotWriter) -> int:
        """Copy every adapter whose slot is reserved and whose weights are in host memory into its slot
        through `write` (the engine's slot writer); a copy that raises fails only that adapter. Returns how
        many copies were issued."""
        due, self._due = self._due, {}
        for entry in due.values():
            self._copy(entry, write)
        return len(due)

    def copies_pending(self) -> bool:
        return bool(self._due)

    # ---- admin (applied from messages) ----------------------------------------------------------
    def pin(self, name: str, pinned: bool = True) -> None:
        entry = self._entries.get(name)
        if entry is None and (not pinned or not self._known(name)):
            return
        entry = entry or self._entry(name)
        entry.pinned = pinned
        self._touch(entry)
        if pinned:
            self.prefetch(name, evict=True)

    def forget(self, name: str) -> None:
        """Drop every cached copy of `name` (unregistered); a slot still in use is freed on its last release.
        Results of reads started for this registration are ignored from now on (the epoch is gone). The virtual
        adapters merged from it go too."""
        self._forget_one(name)
        if not is_virtual(name):
            for other in [n for n in self._entries if is_virtual(n) and _merges(n, name)]:
                self._forget_one(other)

    def _forget_one(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        self._drop_host(name)
        self._dirty.add(name)
        self._changed = True
        if entry is None:
            return
        self.on_forget(name, entry.epoch)
        self._device_lru.pop(name, None)  # a doomed copy is never evicted: it is in use, or freed now
        self._due.pop(name, None)
        entry.pending = None
        if entry.slot is None:
            return
        if entry.refs:
            self._doomed[name] = entry  # running requests keep computing with it
        else:
            self._release_slot(entry)

    def restore(self, name: str) -> None:
        """A name registered (again): forget an earlier error so the next request retries the load."""
        entry = self._entries.get(name)
        if entry is not None and entry.state is AdapterState.ERRORED:
            entry.error = None
            entry.state = self._idle_state(entry)
            self._touch(entry)

    def put_host(self, name: str, weights: AdapterWeights) -> None:
        """Seed the host tier with weights already read (e.g. by registration's validation)."""
        entry = self._entry(name)
        self._insert_host(name, weights)
        if entry.state in (AdapterState.REGISTERED, AdapterState.HOST_LOADING):
            if entry.slot is not None:  # a slot waits for exactly these weights
                self._make_due(entry, weights)
            entry.state = self._idle_state(entry)
        self._touch(entry)

    # ---- queries (engine thread; other threads read `snapshot()`'s result) ----------------------------
    def tier(self, name: str) -> str:
        entry = self._entries.get(name)
        return self._tier(entry) if entry is not None else "disk"

    def state(self, name: str) -> AdapterState:
        entry = self._entries.get(name)
        return entry.state if entry is not None else AdapterState.REGISTERED

    def error(self, name: str) -> str | None:
        entry = self._entries.get(name)
        return entry.error if entry is not None else None

    def load_info(self, name: str) -> dict[str, float]:
        entry = self._entries.get(name)
        return dict(entry.load_info) if entry is not None else {}

    def is_pinned(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.pinned

    def occupancy(self) -> list[tuple[str, int, int] | None]:
        """Per device slot: (name, epoch, refs) of the registration holding it (an unregistered copy still in
        use included), or None when free. For invariant checks (the engine simulation) and debugging."""
        return [None if e is None else (e.name, e.epoch, e.refs) for e in self._slots]

    def epoch(self, name: str) -> int | None:
        """The epoch of `name`'s current registration as the table tracks it (None: nothing tracked)."""
        entry = self._entries.get(name)
        return entry.epoch if entry is not None else None

    def resident(self) -> dict[str, list[str]]:
        """Adapter names per tier; device ones are ready in a slot (an unregistered copy still in use too)."""
        device = [e.name for e in self._slots if e is not None and e.state is AdapterState.DEVICE_READY]
        return {"device": device, "host": list(self._host)}

    @property
    def host_bytes(self) -> int:
        return self._host_bytes

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    @property
    def stats(self) -> CacheStats:
        """A copy of the counters, as of now."""
        return CacheStats(*(MappingProxyType(dict(self._counts[k])) for k in ("hits", "misses", "evictions")),
                          bytes_loaded=self._bytes_loaded)

    def snapshot(self) -> AdapterSnapshot:
        """The immutable view other threads read; rebuilt only for what changed since the last one (the
        engine publishes it every step)."""
        if not self._changed:
            return self._published
        for name in self._dirty:
            entry = self._entries.get(name)
            if entry is None:
                self._views.pop(name, None)
            else:
                self._views[name] = AdapterView(self._tier(entry), entry.state, entry.pinned, entry.error,
                                                MappingProxyType(dict(entry.load_info)))
        adapters, resident = self._published.adapters, self._published.resident  # when only counters moved
        if self._dirty:
            adapters = MappingProxyType(dict(self._views))
            resident = MappingProxyType({tier: tuple(names) for tier, names in self.resident().items()})
        self._dirty.clear()
        self._changed = False
        self._published = AdapterSnapshot(adapters, resident, self.stats, self._host_bytes, len(self._slots))
        return self._published

    # ---- internals: device slots ----------------------------------------------------------------
    def _start_device_load(self, entry: _Entry, *, evict: bool, host_fallback: bool) -> Acquired:
        slot = self._reserve_slot(evict)
        if slot is None:
            if host_fallback and entry.state is AdapterState.REGISTERED:
                self._read(entry, urgent=False)
            return Acquired(SlotState.NO_SLOT)
        self._slots[slot] = entry
        entry.slot, entry.load_started, entry.host_wait = slot, time.perf_counter(), 0.0
        weights = self._host.get(entry.name)
        if weights is not None:
            self._count("hits", "host")
            self._host.move_to_end(entry.name)
            self._make_due(entry, weights)
        else:  # REGISTERED, or HOST_LOADING from a prefetch: the device-load pool takes the read over
            self._read(entry, urgent=True)
        self._touch(entry)
        return Acquired(SlotState.LOADING)

    def _reserve_slot(self, evict: bool) -> int | None:
        for i, owner in enumerate(self._slots):
            if owner is None:
                return i
        if not evict:
            return None
        victim = next((self._entries[n] for n in self._device_lru  # least recently used first
                       if not self._entries[n].refs and not self._entries[n].pinned), None)
        if victim is None:
            return None
        slot = victim.slot
        self._release_slot(victim, clear=False)  # the copy that follows overwrites every layer of the slot
        self._count("evictions", "device")
        return slot

    def _make_due(self, entry: _Entry, weights: AdapterWeights) -> None:
        entry.pending = weights
        entry.state = AdapterState.HOST_READY
        self._due[entry.name] = entry

    def _copy(self, entry: _Entry, write: SlotWriter) -> None:
        weights, entry.pending = entry.pending, None
        try:
            write(entry.slot, weights)
        except Exception as exc:  # noqa: BLE001 - a failing copy fails only this adapter
            self._fail(entry, str(exc) or type(exc).__name__)
            return
        entry.state = AdapterState.DEVICE_READY
        self._device_lru[entry.name] = None
        total = time.perf_counter() - entry.load_started
        entry.load_info = {"last_load_seconds": total, "host_load_seconds": entry.host_wait,
                           "loads": entry.load_info.get("loads", 0) + 1}
        self._touch(entry)
        self.on_load_seconds(total)

    def _release_slot(self, entry: _Entry, *, clear: bool = True) -> None:
        """Give `entry`'s slot back; clear it unless a copy into it follows at once."""
        slot, entry.slot = entry.slot, None
        self._slots[slot] = None
        if self._entries.get(entry.name) is entry:  # a forgotten copy left the LRU and the due list already
            self._device_lru.pop(entry.name, None)
            self._due.pop(entry.name, None)
        entry.pending = None
        if clear:
            self._clear_slot(slot)
        if entry.state in (AdapterState.DEVICE_READY, AdapterState.HOST_READY):
            entry.state = self._idle_state(entry)
        self._touch(entry)

    # ---- internals: host tier and reads ---------------------------------------------------------
    def _read(self, entry: _Entry, *, urgent: bool) -> None:
        """Ask the host loader for `entry`'s files (it merges an ask for a read already queued or running)."""
        if entry.state is AdapterState.REGISTERED:
            self._count("misses", "host")
            entry.state = AdapterState.HOST_LOADING
            self._touch(entry)
        self._request_load(entry.name, entry.epoch, urgent)

    def _host_loaded(self, msg: HostLoaded) -> None:
        self._bytes_loaded += msg.weights.size_bytes
        self._changed = True
        entry = self._current(msg.name, msg.epoch)
        if entry is None or entry.state not in (AdapterState.REGISTERED, AdapterState.HOST_LOADING):
            return  # unregistered meanwhile (keep nothing of that copy), or it has weights already
        self._insert_host(entry.name, msg.weights)
        if entry.slot is not None:
            entry.host_wait = time.perf_counter() - entry.load_started
            self._make_due(entry, msg.weights)
        entry.state = self._idle_state(entry)
        self._touch(entry)

    def _host_failed(self, msg: HostLoadFailed) -> None:
        entry = self._current(msg.name, msg.epoch)
        if entry is not None and entry.state in (AdapterState.REGISTERED, AdapterState.HOST_LOADING):
            self._fail(entry, msg.reason)

    def _insert_host(self, name: str, weights: AdapterWeights) -> None:
        self._drop_host(name)  # a stale copy under the same name must not count twice
        if weights.size_bytes > self._max_host_bytes:  # could never fit: keep it on disk (it still loads)
            return
        self._host[name] = weights
        self._host_bytes += weights.size_bytes
        self._dirty.add(name)
        while len(self._host) > self._max_host or self._host_bytes > self._max_host_bytes:
            self._drop_host(next(iter(self._host)))  # least recently used first
            self._count("evictions", "host")

    def _drop_host(self, name: str) -> None:
        weights = self._host.pop(name, None)
        if weights is None:
            return
        self._host_bytes -= weights.size_bytes
        entry = self._entries.get(name)
        if entry is not None and entry.state is AdapterState.HOST_READY:
            entry.state = self._idle_state(entry)  # a pending slot copy keeps its own reference
        self._dirty.add(name)
        self._changed = True

    # ---- internals: bookkeeping -----------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:  # a new registration of `name`: a number no earlier one had
            entry = self._entries[name] = _Entry(name, next(self._epochs))
            self._touch(entry)
        return entry

    def _current(self, name: str, epoch: int) -> _Entry | None:
        """The entry a loader result is for, unless `name` was unregistered (and maybe registered again)."""
        entry = self._entries.get(name)
        return entry if entry is not None and entry.epoch == epoch else None

    def _fail(self, entry: _Entry, reason: str) -> None:
        log.warning("adapter %s failed to load: %s", entry.name, reason)
        if entry.slot is not None:
            self._release_slot(entry)
        entry.pending = None
        entry.state, entry.error = AdapterState.ERRORED, reason
        self._touch(entry)

    def _idle_state(self, entry: _Entry) -> AdapterState:
        """The state its copies imply when nothing is in flight for it."""
        if entry.name in self._host or entry.pending is not None:
            return AdapterState.HOST_READY
        return AdapterState.REGISTERED

    def _tier(self, entry: _Entry) -> str:
        if entry.state is AdapterState.DEVICE_READY:
            return "device"
        return "host" if entry.name in self._host else "disk"

    def _known(self, name: str) -> bool:
        """Registered; a virtual adapter while its recipe is remembered and every adapter of it registered."""
        if not is_virtual(name):
            return self.is_registered(name)
        recipe = recipe_of(name)
        return recipe is not None and all(map(self.is_registered, recipe.names))

    def _not_registered(self, name: str) -> Acquired:
        # Not kept as an error: a later registration of `name` (or of a merge's adapter) must load normally.
        if not is_virtual(name):
            return Acquired(SlotState.ERRORED, reason=f"adapter {name!r} is not registered")
        recipe = recipe_of(name)
        missing = [n for n in recipe.names if not self.is_registered(n)] if recipe is not None else []
        return Acquired(SlotState.ERRORED, reason=f"adapter {missing[0]!r} is not registered" if missing
                        else f"merge {name!r} is no longer remembered; send the request again")

    def _count(self, kind: str, tier: str) -> None:
        self._counts[kind][tier] += 1
        self._changed = True

    def _touch(self, entry: _Entry) -> None:
        self._dirty.add(entry.name)
        self._changed = True


def _merges(virtual: str, name: str) -> bool:
    """Whether the virtual adapter was merged from `name` (one whose recipe is forgotten: assume so)."""
    recipe = recipe_of(virtual)
    return recipe is None or name in recipe.names
