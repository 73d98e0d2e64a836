"""Tiered adapter cache: disk -> host memory (LRU) -> device slots (LRU, pinning, refcount).

The engine asks `acquire(name)` when it wants to schedule a request for `name`. A device-resident adapter
answers READY with its slot (refcount + 1); otherwise a background load (disk -> host -> device slot) is
started and the request waits without blocking others. An adapter used by a running request (refcount > 0)
or pinned is never evicted. A failing load marks that adapter errored; only its requests fail. A name the
registry does not hold (`is_registered`) is answered ERRORED at once: it never costs a resident adapter
its slot. The host tier is bounded by a count and a byte budget, whichever binds first.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from loraplex.adapters.weights import AdapterWeights

log = logging.getLogger(__name__)

TIERS = ("disk", "host", "device")


class SlotState(enum.Enum):
    READY = "ready"
    LOADING = "loading"  # a load for this adapter is in flight; try again later
    NO_SLOT = "no_slot"  # every device slot is pinned or in use by running requests
    ERRORED = "errored"


@dataclass(frozen=True)
class Acquired:
    state: SlotState
    slot: int = -1
    reason: str | None = None


@dataclass
class CacheStats:
    """Monotonic counters read by the metrics exporter at scrape time."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS[1:], 0))
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS[1:], 0))
    evictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS[1:], 0))
    bytes_loaded: int = 0


@dataclass
class _Slot:
    owner: str | None = None
    ready: bool = False


SlotWriter = Callable[[int, AdapterWeights], None]


class AdapterCache:
    """Host LRU of at most `max_host` adapters and `max_host_bytes` bytes, and `num_slots` device slots
    written through `write_slot`."""

    def __init__(self, loader: Callable[[str], AdapterWeights], write_slot: SlotWriter, clear_slot:
                 Callable[[int], None], *, num_slots: int, max_host: int, max_host_bytes: int = 2 * 2**30,
                 workers: int = 2) -> None:
        self._loader, self._write_slot, self._clear_slot = loader, write_slot, clear_slot
        self._slots = [_Slot() for _ in range(num_slots)]
        self._slot_of: dict[str, int] = {}
        self._device_lru: OrderedDict[str, None] = OrderedDict()
        self._host: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._max_host, self._max_host_bytes = max_host, max_host_bytes
        self._host_bytes = 0  # sum of size_bytes over self._host
        self._refs: dict[str, int] = {}
        self._pinned: set[str] = set()
        self._errors: dict[str, str] = {}
        self._doomed: set[str] = set()  # unregistered while in use: free the slot on last release
        self._host_loading: set[str] = set()
        # Incarnation of each name (see `_incarnation`): a load job started for an unregistered copy must not
        # mark a later registration under the same name errored, nor seed its host tier with stale weights.
        # `forget` drops the entry, so names registered once and deleted leave nothing behind.
        self._epoch: dict[str, int] = {}
        self._epochs = itertools.count(1)
        self._load_info: dict[str, dict[str, float]] = {}
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-load")
        # Host prefetches get their own worker: a burst of them must never queue ahead of device loads.
        self._host_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-prefetch")
        self.stats = CacheStats()
        self.on_ready: Callable[[], None] = lambda: None
        self.on_load_seconds: Callable[[float], None] = lambda s: None
        # Set by the registry (AdapterStore.attach); without one (a bare engine with a loader) any name may load.
        self.is_registered: Callable[[str], bool] = lambda name: True

    # ---- engine side -------------------------------------------------------------------------
    def acquire(self, name: str, *, first: bool = True) -> Acquired:
        """READY (+1 ref) when on the device; otherwise start/await a load and say why not yet.

        `first`: this is the request's first ask, so it counts as one device hit or miss (a request that
        waits for its load retries every step; counting those retries would inflate the hit rate).
        """
        with self._lock:
            got = self._acquire(name)
            if first and got.state is not SlotState.ERRORED:
                (self.stats.hits if got.state is SlotState.READY else self.stats.misses)["device"] += 1
            return got

    def _acquire(self, name: str) -> Acquired:
        """acquire() without the accounting; the caller holds the lock."""
        if name in self._errors:
            return Acquired(SlotState.ERRORED, reason=self._errors[name])
        if name in self._doomed:  # the old copy is still in use; a re-registered one waits for it
            return Acquired(SlotState.LOADING) if self.is_registered(name) else _not_registered(name)
        slot = self._slot_of.get(name)
        if slot is not None and self._slots[slot].ready:
            self._refs[name] = self._refs.get(name, 0) + 1
            self._device_lru.move_to_end(name)
            return Acquired(SlotState.READY, slot)
        if slot is not None:
            return Acquired(SlotState.LOADING)
        if not self.is_registered(name):  # e.g. DELETEd as its request was added: evict nothing for it
            return _not_registered(name)
        # No host prefetch on NO_SLOT here: the scheduler retries every step, and with more waiting
        # adapters than host room, prefetching each time would evict them from host in a circle.
        return self._start_load(name, host_fallback=False, evict=True)

    def release(self, name: str) -> None:
        with self._lock:
            self._refs[name] -= 1
            if self._refs[name] == 0:
                del self._refs[name]
                self._maybe_free_doomed(name)

    def prefetch(self, name: str, *, evict: bool = False) -> None:
        """Start bringing `name` towards the device as soon as a request for it is queued: into a free slot,
        else into host memory. It evicts nothing (unless `evict`, for pinning): a speculative load must not
        take the slot of an adapter whose queued requests are about to run."""
        with self._lock:
            if name not in self._slot_of and name not in self._errors and self.is_registered(name):
                self._start_load(name, host_fallback=True, evict=evict)

    def put_host(self, name: str, weights: AdapterWeights) -> None:
        """Seed the host tier with weights already read (e.g. by registration's validation)."""
        with self._lock:
            self._insert_host(name, weights)

    def refcount(self, name: str) -> int:
        with self._lock:
            return self._refs.get(name, 0)

    # ---- admin side --------------------------------------------------------------------------
    def pin(self, name: str, pinned: bool = True) -> None:
        with self._lock:
            (self._pinned.add if pinned else self._pinned.discard)(name)
        if pinned:
            self.prefetch(name, evict=True)

    def forget(self, name: str) -> None:
        """Drop every cached copy of `name` (unregistered); a slot still in use is freed on last release."""
        with self._lock:
            self._epoch.pop(name, None)
            self._pinned.discard(name)
            self._errors.pop(name, None)
            self._drop_host(name)
            self._load_info.pop(name, None)
            if name in self._slot_of:
                self._doomed.add(name)
                self._maybe_free_doomed(name)

    def restore(self, name: str) -> None:
        """A name registered (again): forget any earlier error so the next request retries the load."""
        with self._lock:
            self._errors.pop(name, None)

    def tier(self, name: str) -> str:
        with self._lock:
            slot = self._slot_of.get(name)
            # A doomed slot holds the unregistered copy (still in use), not the name's current registration.
            if slot is not None and self._slots[slot].ready and name not in self._doomed:
                return "device"
            return "host" if name in self._host else "disk"

    def error(self, name: str) -> str | None:
        with self._lock:
            return self._errors.get(name)

    def load_info(self, name: str) -> dict[str, float]:
        with self._lock:
            return dict(self._load_info.get(name, {}))

    def resident(self) -> dict[str, list[str]]:
        """Adapter names per tier (device ones are ready in a slot)."""
        with self._lock:
            device = [n for n, s in self._slot_of.items() if self._slots[s].ready]
            return {"device": device, "host": list(self._host)}

    @property
    def host_bytes(self) -> int:
        with self._lock:
            return self._host_bytes

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._host_pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals (lock held) ---------------------------------------------------------------
    def _start_load(self, name: str, *, host_fallback: bool, evict: bool) -> Acquired:
        slot = self._reserve_slot(evict)
        if slot is None:
            if host_fallback:
                self._prefetch_host(name)
            return Acquired(SlotState.NO_SLOT)
        self._slots[slot] = _Slot(owner=name, ready=False)
        self._slot_of[name] = slot
        self._pool.submit(self._load_job, name, slot, self._incarnation(name))
        return Acquired(SlotState.LOADING)

    def _reserve_slot(self, evict: bool) -> int | None:
        for i, s in enumerate(self._slots):
            if s.owner is None:
                return i
        if not evict:
            return None
        for victim in self._device_lru:  # least recently used first
            if not self._refs.get(victim) and victim not in self._pinned:
                slot = self._slot_of[victim]
                self._free_slot(victim, slot)
                self.stats.evictions["device"] += 1
                return slot
        return None

    def _maybe_free_doomed(self, name: str) -> None:
        slot = self._slot_of.get(name)
        if name in self._doomed and not self._refs.get(name) and slot is not None and self._slots[slot].ready:
            self._free_slot(name, slot)
            self._doomed.discard(name)

    def _free_slot(self, name: str, slot: int) -> None:
        self._clear_slot(slot)
        self._slots[slot] = _Slot()
        del self._slot_of[name]
        self._device_lru.pop(name, None)

    def _prefetch_host(self, name: str) -> None:
        if name not in self._host and name not in self._host_loading:
            self._host_loading.add(name)
            self._host_pool.submit(self._host_job, name, self._incarnation(name))

    def _incarnation(self, name: str) -> int:
        """A number unique to this registration of `name` (0 is never one: it means "forgotten")."""
        return self._epoch.setdefault(name, next(self._epochs))

    # ---- workers -----------------------------------------------------------------------------
    def _host_job(self, name: str, epoch: int) -> None:
        try:
            self._host_get(name, epoch)
        except Exception as exc:  # noqa: BLE001 - any load failure marks only this adapter
            self._mark_error(name, exc, epoch)
        finally:
            with self._lock:
                self._host_loading.discard(name)

    def _load_job(self, name: str, slot: int, epoch: int) -> None:
        t0 = time.perf_counter()
        try:
            weights = self._host_get(name, epoch)
            t_host = time.perf_counter() - t0
            self._write_slot(slot, weights)
        except Exception as exc:  # noqa: BLE001 - any load failure marks only this adapter
            with self._lock:
                if self._slot_of.get(name) == slot:
                    self._free_slot(name, slot)
                    self._doomed.discard(name)  # an unregistered copy that never loaded has nothing to free
            self._mark_error(name, exc, epoch)
        else:
            total = time.perf_counter() - t0
            with self._lock:
                if self._slot_of.get(name) == slot:
                    self._slots[slot].ready = True
                    self._device_lru[name] = None
                    if self._epoch.get(name, 0) == epoch:
                        loads = self._load_info.get(name, {}).get("loads", 0) + 1
                        self._load_info[name] = {"last_load_seconds": total, "host_load_seconds": t_host,
                                                 "loads": loads}
                    self._maybe_free_doomed(name)
            self.on_load_seconds(total)
        self.on_ready()

    def _host_get(self, name: str, epoch: int) -> AdapterWeights:
        with self._lock:
            weights = self._host.get(name)
            if weights is not None:
                self.stats.hits["host"] += 1
                self._host.move_to_end(name)
                return weights
            self.stats.misses["host"] += 1
        weights = self._loader(name)  # disk read + validation, outside the lock
        with self._lock:
            self.stats.bytes_loaded += weights.size_bytes
            if self._epoch.get(name, 0) == epoch:  # else the name was unregistered meanwhile: keep nothing
                self._insert_host(name, weights)
        return weights

    def _insert_host(self, name: str, weights: AdapterWeights) -> None:
        self._drop_host(name)  # a stale copy under the same name must not count twice
        if weights.size_bytes > self._max_host_bytes:  # could never fit: keep it on disk (it still loads)
            return
        self._host[name] = weights
        self._host_bytes += weights.size_bytes
        while len(self._host) > self._max_host or self._host_bytes > self._max_host_bytes:
            self._drop_host(next(iter(self._host)))  # least recently used first
            self.stats.evictions["host"] += 1

    def _drop_host(self, name: str) -> None:
        weights = self._host.pop(name, None)
        if weights is not None:
            self._host_bytes -= weights.size_bytes

    def _mark_error(self, name: str, exc: Exception, epoch: int) -> None:
        log.warning("adapter %s failed to load: %s", name, exc)
        with self._lock:
            if self._epoch.get(name, 0) == epoch:
                self._errors[name] = str(exc) or type(exc).__name__
        self.on_ready()


def _not_registered(name: str) -> Acquired:
    # Not kept in `_errors`: a later registration of `name` must load normally.
    return Acquired(SlotState.ERRORED, reason=f"adapter {name!r} is not registered")
