"""Where adapter admin work runs: a small thread pool of its own, at a lower CPU priority than serving.

Registering a version reads, copies, hashes and validates tens of megabytes (a 19.5 MB adapter: ~100-150 ms of
CPU). On the request path's default thread pool that work would compete as an equal with the engine thread and
the event loop; here its threads are niced (Linux: a thread is a task with its own nice value), so under CPU
pressure serving runs first and a training loop pushing weights every second costs the hot requests little.
The admin call itself just waits a little longer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
NICENESS = 10  # added to the process's: well below serving, still ahead of batch jobs at 19
WORKERS = 8  # admin calls in flight at once; more wait their turn, never on the HTTP server's shared threads


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
    except (OSError, AttributeError) as exc:  # not Linux, or not permitted: the work runs at normal priority
        log.debug("admin work runs at normal priority: %s", exc)


_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="loraplex-admin", initializer=_lower_priority)


async def run_admin(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a blocking admin call (registration, replace, rollback, route, unregistration) off the event loop, at
    the admin pool's lower CPU priority."""
    return await asyncio.get_running_loop().run_in_executor(_pool, functools.partial(fn, *args, **kwargs))
