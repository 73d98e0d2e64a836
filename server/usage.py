"""Metering: what each tenant was served since the server started, for `GET /v1/usage` and the
`loraplex_tenant_*` metrics (both read this one book, so they always agree).

Per tenant: finished generation requests by HTTP status (refusals included: 404, 429, ...), tokens by kind
(`prompt`: every prompt token of its requests, once per prompt whatever `n`; `cached`: those of them found in the
prefix cache; `output`: generated tokens, every choice's, counted as they are produced), and refusals by the quota
that refused them. Without `--tenants` everything is booked to the tenant "default". A tenant removed from the
tenants file is dropped from the book at the reload, so its size is bounded by the file, as metric label sets must
be.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

TOKEN_KINDS = ("prompt", "cached", "output")


@dataclass
class TenantUsage:
    requests: Counter[str] = field(default_factory=Counter)  # HTTP status -> finished requests
    tokens: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(TOKEN_KINDS, 0)))
    throttled: Counter[str] = field(default_factory=Counter)  # quota -> refused requests


class UsageBook:
    """Thread-safe counters per tenant (the HTTP layer writes them; metrics scrapes and /v1/usage read)."""

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._tenants: dict[str, TenantUsage] = {}

    def _of(self, tenant: str) -> TenantUsage:  # hold _lock
        return self._tenants.setdefault(tenant, TenantUsage())

    def request(self, tenant: str, status: int) -> None:
        with self._lock:
            self._of(tenant).requests[str(status)] += 1

    def tokens(self, tenant: str, kind: str, n: int) -> None:
        if n:
            with self._lock:
                self._of(tenant).tokens[kind] += n

    def throttled(self, tenant: str, quota: str) -> None:
        with self._lock:
            self._of(tenant).throttled[quota] += 1

    def keep_only(self, tenants: Iterable[str]) -> None:
        """Forget tenants not in `tenants` (removed from the file)."""
        keep = set(tenants)
        with self._lock:
            for name in [n for n in self._tenants if n not in keep]:
                del self._tenants[name]

    def snapshot(self) -> dict[str, TenantUsage]:
        """A copy of every tenant's counters."""
        with self._lock:
            return {name: TenantUsage(Counter(u.requests), Counter(u.tokens), Counter(u.throttled))
                    for name, u in self._tenants.items()}

    def report(self, tenants: Iterable[str], queue_depth: dict[str, int]) -> list[dict[str, Any]]:
        """`GET /v1/usage`'s entries for `tenants` (sorted by name), with each one's queue depth now."""
        book = self.snapshot()
        out = []
        for name in sorted(set(tenants)):
            usage = book.get(name, TenantUsage())
            out.append({"tenant": name, "requests": dict(sorted(usage.requests.items())),
                        "tokens": {kind: usage.tokens[kind] for kind in TOKEN_KINDS},
                        "throttled": dict(sorted(usage.throttled.items())), "queue_depth": queue_depth.get(name, 0)})
        return out
