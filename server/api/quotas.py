"""Tenants' quotas at the door (server/tenants.py's `limits`): checked before admission, 429 with `Retry-After` and
a message naming the quota, counted in the usage book (`loraplex_tenant_throttled_total`).

Rates are buckets that refill continuously at limit / 60 per second and hold at most one second's worth (at least
one request, one token): a burst is cut at a second's worth, and over any minute a tenant gets at most its limit
plus that second's worth. `requests_per_minute` takes one per request before it is admitted. `tokens_per_minute`
admits while the tenant is not in debt, then takes the prompt tokens at admission and the output tokens as they
are produced: a request already running that goes past the budget finishes, and the debt it leaves delays the
next one (so over a minute of flood a tenant gets its limit, plus a second's worth, plus what its requests running
at the minute's end had not finished).

`max_queued` caps the tenant's sequences admitted and not finished at `max_concurrent + max_queued` (the engine
runs at most `max_concurrent` of them; scheduler.py holds that). `max_adapters` counts the registered adapters
under its admin globs, registrations under way included. Time comes from `clock` (monotonic seconds): tests drive
a minute of flood without waiting for one.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loraplex.server.tenants import Tenant
from loraplex.server.usage import UsageBook

BURST_SECONDS = 1.0  # a bucket holds this many seconds' worth of its rate
_EPSILON = 1e-9  # refills sum float seconds: a level a rounding error short of what is needed is there


@dataclass(frozen=True)
class Refusal:
    """Why a tenant's request is refused: the quota's name, the message, when to retry and the status."""

    quota: str
    message: str
    retry_after_s: int = 1
    status: int = 429


@dataclass
class _Bucket:
    """Refills at `per_minute` / 60 per second up to a second's worth; `level` may go below zero (a debt)."""

    per_minute: int
    level: float
    at: float

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0

    @property
    def burst(self) -> float:
        return max(1.0, self.rate * BURST_SECONDS)

    def refill(self, now: float) -> None:
        self.level = min(self.burst, self.level + max(0.0, now - self.at) * self.rate)
        self.at = now

    def seconds_until(self, level: float) -> int:
        """Whole seconds (at least 1) until the bucket holds `level`."""
        return max(1, math.ceil((level - self.level) / self.rate))


class TenantQuotas:
    """Every tenant's buckets and in-flight counts. Thread-safe; `clock` is injectable for tests."""

    def __init__(self, usage: UsageBook, clock: Callable[[], float] = time.monotonic) -> None:
        self.usage, self.clock = usage, clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}  # (tenant, quota) -> its bucket
        self._in_flight: dict[str, int] = {}  # tenant -> sequences admitted, not finished
        self._registering: dict[str, int] = {}  # tenant -> registrations under way

    def admit(self, tenant: Tenant, weight: int, prompt_tokens: int, reserve: Callable[[], str | None]
              ) -> Refusal | None:
        """Check `tenant`'s quotas for a request of `weight` sequences and `prompt_tokens` prompt tokens; when they
        allow it, call `reserve` (the server-wide admission: None when admitted, else why not) and, if it admitted,
        charge the request. All or nothing; returns the refusal (counted as throttled) or None."""
        with self._lock:
            refusal = self._check(tenant, weight)
            if refusal is None:
                why = reserve()
                refusal = None if why is None else Refusal("max_queue", why)
            if refusal is not None:
                self.usage.throttled(tenant.name, refusal.quota)
                return refusal
            self._charge(tenant, weight, prompt_tokens)
            return None

    def _check(self, tenant: Tenant, weight: int) -> Refusal | None:
        limits, now = tenant.limits, self.clock()
        cap = limits.max_in_flight
        held = self._in_flight.get(tenant.name, 0)
        if cap is not None and held + weight > cap:
            return Refusal("max_queued", f"tenant {tenant.name!r} has {held} sequences in flight and this request "
                                         f"needs {weight} more; its max_concurrent + max_queued is {cap}")
        for quota, need in (("requests_per_minute", 1.0), ("tokens_per_minute", 1.0)):
            bucket = self._bucket(tenant, quota, now)
            if bucket is not None and bucket.level < need - _EPSILON:
                wait = bucket.seconds_until(need)
                return Refusal(quota, f"tenant {tenant.name!r} is over its {quota} quota ({bucket.per_minute}); "
                                      f"retry after {wait}s", wait)
        return None

    def _charge(self, tenant: Tenant, weight: int, prompt_tokens: int) -> None:
        self._in_flight[tenant.name] = self._in_flight.get(tenant.name, 0) + weight
        for quota, amount in (("requests_per_minute", 1), ("tokens_per_minute", prompt_tokens)):
            bucket = self._buckets.get((tenant.name, quota))
            if bucket is not None:
                bucket.level -= amount

    def _bucket(self, tenant: Tenant, quota: str, now: float) -> _Bucket | None:
        """The tenant's bucket for `quota`, refilled to `now` (made full, or re-rated after a reload); None when the
        tenant has no such limit."""
        per_minute = getattr(tenant.limits, quota)
        key = (tenant.name, quota)
        if per_minute is None:
            self._buckets.pop(key, None)
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(per_minute, 0.0, now)
            bucket.level = bucket.burst
        bucket.refill(now)
        if bucket.per_minute != per_minute:  # the limit changed (a reload): the debt or credit so far is kept
            bucket.per_minute = per_minute
            bucket.level = min(bucket.level, bucket.burst)
        return bucket

    def charge_output(self, tenant: str, tokens: int) -> None:
        """`tokens` output tokens of `tenant` were produced (a debt when over its budget: the next request waits)."""
        with self._lock:
            bucket = self._buckets.get((tenant, "tokens_per_minute"))
            if bucket is not None:
                bucket.refill(self.clock())
                bucket.level -= tokens

    def release(self, tenant: str, weight: int = 1) -> None:
        """`weight` of the tenant's admitted sequences finished."""
        with self._lock:
            left = self._in_flight.get(tenant, 0) - weight
            if left > 0:
                self._in_flight[tenant] = left
            else:
                self._in_flight.pop(tenant, None)

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    # ---- registrations ---------------------------------------------------------------------------------
    def begin_registration(self, tenant: Tenant, registered: int) -> Refusal | None:
        """A registration by `tenant`, which has `registered` adapters under its admin globs, may start (then call
        `end_registration` once it ended), or the refusal (403: waiting does not help)."""
        with self._lock:
            limit = tenant.limits.max_adapters
            pending = self._registering.get(tenant.name, 0)
            if limit is not None and registered + pending >= limit:
                self.usage.throttled(tenant.name, "max_adapters")
                return Refusal("max_adapters", f"tenant {tenant.name!r} has {registered} adapters registered"
                                               f"{f' and {pending} being registered' if pending else ''}; its "
                                               f"max_adapters is {limit} (delete one first)", status=403)
            self._registering[tenant.name] = pending + 1
            return None

    def end_registration(self, tenant: Tenant) -> None:
        with self._lock:
            left = self._registering.get(tenant.name, 0) - 1
            if left > 0:
                self._registering[tenant.name] = left
            else:
                self._registering.pop(tenant.name, None)

    def keep_only(self, tenants: Iterable[str]) -> None:
        """Drop the buckets of tenants no longer in the file (a reload); in-flight counts drain on their own."""
        keep = set(tenants)
        with self._lock:
            for key in [k for k in self._buckets if k[0] not in keep]:
                del self._buckets[key]
