"""AdapterResolver: serve an adapter by name from storage on its first request, without a registration step.

`--adapter-resolver DIR|s3://bucket/prefix`: a request for an unregistered name that matches
`--adapter-resolver-pattern` (default `[A-Za-z0-9._-]{1,64}`, and never `.` or `..`) registers `<resolver>/<name>`
through the ordinary registration path, then runs. A DIR must lie inside `--adapter-root` and the path is
walked with its confinement (no `..`, no symlink out: adapters/sources/local.py); an s3:// prefix goes through
the S3 source. A name the pattern refuses is answered 404 without touching the filesystem or the network.

A failed resolution (no such adapter: 404; files that do not validate: 400) is remembered for
`--adapter-resolver-negative-ttl` seconds and answered from memory meanwhile; that memory holds at most
`MAX_REMEMBERED_MISSES` names (oldest dropped first), so a client asking for random names cannot grow it.
Concurrent first requests for one name share one resolution (the API's `first_use` joins them).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.errors import (
    AdapterConflictError,
    AdapterError,
    AdapterNotFoundError,
)
from loraplex.adapters.names import validate_adapter_name

log = logging.getLogger(__name__)

DEFAULT_PATTERN = r"[A-Za-z0-9._-]{1,64}"
MAX_REMEMBERED_MISSES = 4096
RESULTS = ("registered", "miss", "cached_miss", "refused")  # loraplex_adapter_resolutions_total{result}


@dataclass(frozen=True)
class ResolverConfig:
    location: str  # DIR or s3://bucket/prefix
    pattern: str = DEFAULT_PATTERN
    negative_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"--adapter-resolver-pattern: not a regular expression ({exc})") from None
        if not self.negative_ttl_s >= 0:
            raise ValueError(f"--adapter-resolver-negative-ttl: must be >= 0 seconds, got {self.negative_ttl_s}")
        if self.location.startswith("s3://"):
            from loraplex.adapters.sources.s3 import parse_s3_url  # boto3: not at CLI parse time unless needed

            try:
                parse_s3_url(self.location)
            except AdapterError as exc:
                raise ValueError(f"--adapter-resolver: {exc}") from None


class AdapterResolver:
    """`register(name, path)` registers an adapter by path (AdapterStore.register_path); `adapter_root` is
    --adapter-root (a DIR resolver needs one and must lie inside it)."""

    def __init__(self, config: ResolverConfig, register: Callable[[str, str], object],
                 adapter_root: Path | None) -> None:
        self.config = config
        self._register = register
        self._pattern = re.compile(config.pattern)
        self._base = config.location.rstrip("/") if config.location.startswith("s3://") else \
            _relative_dir(config.location, adapter_root)
        self._misses: OrderedDict[str, tuple[float, AdapterError]] = OrderedDict()  # name -> (expiry, error)
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(RESULTS, 0)  # read by the metrics at scrape time

    def eligible(self, name: str) -> bool:
        """Whether `name` may be resolved at all: the pattern matches it whole and it is a valid adapter name
        (never `.` or `..`). A pure string check: nothing is touched for a name that fails it."""
        try:
            validate_adapter_name(name)
        except AdapterError:
            return False
        return self._pattern.fullmatch(name) is not None

    def remembered_miss(self, name: str) -> AdapterError | None:
        """The error of a failed resolution of `name` within the negative TTL, if any."""
        with self._lock:
            miss = self._misses.get(name)
            if miss is None:
                return None
            if miss[0] <= time.monotonic():
                del self._misses[name]
                return None
            self.counts["cached_miss"] += 1
            return miss[1]

    def refused(self, name: str) -> None:
        with self._lock:
            self.counts["refused"] += 1

    def resolve(self, name: str) -> None:
        """Register `name` from the resolver's location (blocking: reads and validates its files). Raises the
        AdapterError of a failed resolution (remembered for the negative TTL; 5xx ones are not)."""
        if not self.eligible(name):
            self.refused(name)
            raise AdapterNotFoundError(f"adapter {name!r} is not registered", field="model")
        miss = self.remembered_miss(name)
        if miss is not None:
            raise miss
        path = f"{self._base}/{name}"
        try:
            self._register(name, path)
        except AdapterConflictError:
            return  # registered meanwhile (an admin call, another replica): it is there, which is what we wanted
        except AdapterError as exc:
            error = _explained(exc, name, path)
            if error.status < 500:
                self._remember(name, error)
            raise error from exc
        with self._lock:
            self.counts["registered"] += 1
        log.info("adapter %s resolved on first use from %s", name, path)

    def _remember(self, name: str, error: AdapterError) -> None:
        with self._lock:
            self.counts["miss"] += 1
            self._misses[name] = (time.monotonic() + self.config.negative_ttl_s, error)
            self._misses.move_to_end(name)
            while len(self._misses) > MAX_REMEMBERED_MISSES:
                self._misses.popitem(last=False)


def _explained(exc: AdapterError, name: str, path: str) -> AdapterError:
    """The registration's error, said for a request that named `name` (its `model`)."""
    if isinstance(exc, AdapterNotFoundError):
        return AdapterNotFoundError(f"adapter {name!r} is not registered, and the resolver has no {path!r}",
                                    field="model")
    error = type(exc)(f"adapter {name!r} could not be resolved from {path!r}: {exc.message}", field="model")
    return error


def _relative_dir(location: str, adapter_root: Path | None) -> str:
    """A DIR resolver's folder relative to --adapter-root (registration walks it from there, confined);
    ValueError naming the flag when there is no root or the folder is not inside it."""
    if adapter_root is None:
        raise ValueError(f"--adapter-resolver {location!r}: a folder needs --adapter-root too (it must lie inside "
                         "the root, whose confinement applies to every path it resolves; e.g. the same folder)")
    try:
        root, real = Path(adapter_root).resolve(strict=True), Path(location).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"--adapter-resolver {location!r} does not exist ({exc})") from None
    if not real.is_dir() or not real.is_relative_to(root):
        raise ValueError(f"--adapter-resolver {location!r} must be a folder inside --adapter-root "
                         f"{str(adapter_root)!r}")
    rel = real.relative_to(root).as_posix()
    return "." if rel in ("", ".") else os.path.normpath(rel)
