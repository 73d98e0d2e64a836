"""HostLoader: reads and validates adapter files in the background; the engine thread gets typed results.

It only reads: `loader(name)` (AdapterStore.load_weights: disk or S3 copy -> validated fp32 tensors), pins
the tensors in page-locked memory where CUDA is present (so the engine's slot copy can run asynchronously on
a side stream), and posts `HostLoaded` / `HostLoadFailed` into the engine's inbox, then wakes the engine. It
never touches device slots or the SlotTable.

Two pools, as the SlotTable asks: reads a device slot waits for (`urgent`) and speculative host prefetches
for queued requests. A burst of prefetches must never delay a device-bound read, so they queue apart. A read
asked for again while it is still queued or running is merged (a queued prefetch asked for urgently moves to
the urgent pool), so a name is never read twice for one ask.

A virtual adapter's name ("merge:...", a ties / dare merge recipe, adapters/merge.py) is not read but
computed, from its components read through the same `loader`: off the engine thread, like any read, but on a
worker of its own, one merge at a time, queued: a merge can take many seconds of CPU (an SVD per module), and on
the read pools three of them held back every other adapter's cold load (0.27 s -> 37 s). A queued merge can be
cancelled, and a running one stops at its next module (`cancel`, `close`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loraplex.adapters.merge import MergeCancelled, is_virtual, load_virtual
from loraplex.adapters.messages import HostLoaded, HostLoadFailed
from loraplex.adapters.weights import AdapterWeights

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    name: str
    epoch: int
    urgent: bool
    cancelled: bool = False  # superseded by an urgent job before it started, or cancelled (a merge: also while running)
    running: bool = False


class HostLoader:
    def __init__(self, loader: Callable[[str], AdapterWeights], post: Callable[[object], None],
                 wake: Callable[[], None], *, workers: int = 2, pin_memory: bool | None = None) -> None:
        self._loader, self._post, self._wake = loader, post, wake
        self._pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._urgent = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-load")
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-prefetch")
        self._merges = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-merge")
        self._jobs: dict[tuple[str, int], _Job] = {}  # queued or running, by (name, epoch)
        self._lock = threading.Lock()

    def submit(self, name: str, epoch: int, urgent: bool) -> None:
        """Read `name` (registration `epoch`) in the background; the result arrives as a message."""
        key = (name, epoch)
        merge = is_virtual(name)
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and (job.running or job.urgent or not urgent or merge):
                return  # already on its way, as fast as asked (merges have one queue, whatever the urgency)
            if job is not None:
                job.cancelled = True  # a queued prefetch a slot now waits for: the urgent pool reads it
            job = self._jobs[key] = _Job(name, epoch, urgent)
        pool = self._merges if merge else self._urgent if urgent else self._prefetch
        try:
            pool.submit(self._run, job)
        except RuntimeError:  # closed: the engine is stopping and nobody waits for the result
            log.debug("host loader closed; dropped the read of %s", name)

    def cancel(self, name: str, epoch: int) -> bool:
        """Drop a queued read of `name` (registration `epoch`), or stop a running merge at its next module; nothing
        is posted for it. True if there was one."""
        with self._lock:
            job = self._jobs.pop((name, epoch), None)
            if job is not None:
                job.cancelled = True
        return job is not None

    def close(self) -> None:
        """Stop the pools; queued reads are dropped, a running read finishes and its result is ignored, a running
        merge stops at its next module."""
        with self._lock:
            for job in self._jobs.values():
                job.cancelled = True
        for pool in (self._urgent, self._prefetch, self._merges):
            pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: _Job) -> None:
        with self._lock:
            if job.cancelled:
                return
            job.running = True
        t0 = time.perf_counter()
        try:
            weights = self._read(job)
        except MergeCancelled:
            return  # cancel() already forgot the job; nobody waits for it
        except Exception as exc:  # noqa: BLE001 - any read or validation failure fails only this adapter
            msg: HostLoaded | HostLoadFailed = HostLoadFailed(job.name, job.epoch, str(exc) or type(exc).__name__)
        else:
            msg = HostLoaded(job.name, job.epoch, weights, time.perf_counter() - t0)
        with self._lock:  # before posting: an ask after this starts a new read instead of being merged away
            if self._jobs.get((job.name, job.epoch)) is job:
                del self._jobs[(job.name, job.epoch)]
        self._post(msg)
        self._wake()

    def _read(self, job: _Job) -> AdapterWeights:
        if is_virtual(job.name):
            weights = load_virtual(job.name, self._loader, stop=lambda: job.cancelled)
        else:
            weights = self._loader(job.name)
        return weights.prepared(pin=self._pin)  # the slot layout, on this thread: the engine's copy stays a copy
