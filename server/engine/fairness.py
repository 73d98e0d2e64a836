"""Fair sharing between tenants: the Virtual Token Counter (VTC) and its preemption rule.

After Sheng et al., "Fairness in Serving Large Language Models" (OSDI '24). A tenant is what the API decided
(`TenantSpec`, from `--tenants`: a customer, whatever adapters it uses), else an adapter name, base-model
requests being the tenant "". Each tenant has a counter of the weighted service it received, divided by its
weight (weighted VTC: a tenant of weight 3 is charged a third, so it gets three times the service of a weight-1
tenant while both are backlogged): `W_PROMPT` per prompt token computed (once: recomputing a preempted request's
context is not charged again) and `W_OUTPUT` per output token generated, the paper's weights (a decode step costs
more per token than prefill). Backlogged = has a waiting request (the paper's queue Q). When a tenant enters Q
its counter is lifted to the lowest counter in Q, or to the counter of the last tenant that left Q when Q is
empty: credit cannot be banked while a tenant asks for nothing. That level never decreases, which is why an idle
tenant whose counter is at or below it can be forgotten: it would be lifted to the level on return anyway (memory
stays bounded by the tenants in flight plus those that left ahead of the level).

Admission order (`order`): the waiting request of the backlogged tenant with the lowest counter, FCFS within a
tenant (the paper's rule), with one exception for latency: *entitled* tenants go first, lowest counter first.
Entitled = (a) its demand, running plus waiting requests, fits its share of the sequence slots (max_num_seqs x
its weight / the weights of the tenants with requests; equal shares when all weigh 1), and (b) its counter is at
most one full request's worth (its next request's prompt + max_tokens, weighted, divided by its weight) above the
lowest counter in Q. (a) makes the exception about light tenants only: with more tenants than slots, or two
tenants that both want more than half, nobody is entitled and the order is plain VTC. (b) bounds how far ahead of
VTC it lets a tenant get, so a tenant cannot buy extra service with, e.g., huge prompts.

Preemption for fairness (`over_share` tells the victims), every step: each entitled waiting request gets a sequence
slot in this step, a free one if there is one, else the slot of the newest running request of the most-served
tenant among those that run more than their share of slots (a request preempted for fairness before only once it
generated scheduler.REFAIR_TOKENS more tokens). So a light tenant never waits on the end of someone else's
generation, however long. Against thrash: a slot only moves from a tenant over its share to one within it (the
taker's running < its demand <= its share, so it never runs over its share; the giver's demand, its preempted
request included, stays over its share, so it never becomes entitled); over-share tenants never preempt and
within-share ones are never preempted, so a slot cannot ping-pong between tenants, and every fairness preemption of a
request is paid for by REFAIR_TOKENS of its progress, so none is recomputed over and over. A preempted request is
recomputed later exactly like a KV preemption (outputs so far kept, adapter slot kept).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.adapters.versions import name_of

W_PROMPT = 1.0  # counter units per prompt token computed
W_OUTPUT = 2.0  # counter units per output token generated

BASE_TENANT = ""


@dataclass(frozen=True)
class TenantSpec:
    """A request's tenant as the API decided it (the key's tenant in `--tenants`): its fairness key, its weight
    (fair share), and the engine-side limits the scheduler holds it to. Requests without one are accounted to
    their adapter, weight 1, no limits."""

    id: str
    weight: float = 1.0
    max_device_slots: int | None = None  # distinct adapter slots its requests hold at once
    max_concurrent: int | None = None  # its sequences running at once (the rest wait in the queue)

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"tenant {self.id!r}: weight must be > 0, got {self.weight!r}")
        for name in ("max_device_slots", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"tenant {self.id!r}: {name} must be >= 1, got {value!r}")


def tenant_of(adapter: str | None) -> str:
    """The tenant a request is accounted to: its adapter's name (every version of it, adapters/versions.py:
    a canary does not double a name's share), or "" for the base model."""
    return name_of(adapter) or BASE_TENANT


def request_worth(num_prompt: int, max_tokens: int) -> float:
    """One full request's worth of counter units: its whole prompt and every token it may generate."""
    return W_PROMPT * num_prompt + W_OUTPUT * max_tokens


class VirtualTokenCounter:
    """Per-tenant service counters (divided by each tenant's weight) and the backlog bookkeeping the lift rule
    needs."""

    def __init__(self) -> None:
        self._counters: dict[str, float] = {}
        self._weights: dict[str, float] = {}  # tenant -> its weight, while it has requests (absent: 1)
        self._queued: dict[str, int] = {}  # tenant -> waiting requests (Q = its keys)
        self._live: dict[str, int] = {}  # tenant -> requests in the scheduler (waiting or running)
        self._last_left: str | None = None  # the last tenant that left Q (its counter may still grow)
        self._floor = 0.0  # a lower bound of the level (it never decreases)

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def level(self) -> float:
        """What a tenant entering Q is lifted to: the lowest counter in Q, else the last one to leave it."""
        if self._queued:
            return min(self.counter(t) for t in self._queued)
        return max(self._floor, self.counter(self._last_left)) if self._last_left is not None else self._floor

    def backlog(self) -> dict[str, int]:
        """Waiting requests per backlogged tenant."""
        return dict(self._queued)

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def charge(self, tenant: str, prompt_tokens: int, output_tokens: int) -> None:
        service = W_PROMPT * prompt_tokens + W_OUTPUT * output_tokens
        self._counters[tenant] = self.counter(tenant) + service / self.weight(tenant)

    # ---- request lifecycle (called by the scheduler) -----------------------------------------
    def arrive(self, tenant: str, weight: float = 1.0) -> None:
        """A new request joined the queue (its tenant's weight as of this request: a reload may change it)."""
        self._live[tenant] = self._live.get(tenant, 0) + 1
        if weight != 1.0 or tenant in self._weights:
            self._weights[tenant] = weight
        self.enqueue(tenant)

    def enqueue(self, tenant: str) -> None:
        """A request of `tenant` entered the waiting queue (new or preempted)."""
        if tenant not in self._queued:
            self._counters[tenant] = max(self.counter(tenant), self.level())
        self._queued[tenant] = self._queued.get(tenant, 0) + 1

    def dequeue(self, tenant: str) -> None:
        """A waiting request of `tenant` left the queue (admitted, failed or aborted)."""
        self._queued[tenant] -= 1
        if self._queued[tenant] == 0:
            del self._queued[tenant]
            self._floor = max(self._floor, self.counter(tenant))
            self._last_left = tenant

    def depart(self, tenant: str, *, queued: bool) -> None:
        """A request of `tenant` finished (from the queue when `queued`)."""
        if queued:
            self.dequeue(tenant)
        self._live[tenant] -= 1
        if self._live[tenant] == 0:
            del self._live[tenant]
            self._weights.pop(tenant, None)
            self._forget_idle()

    def _forget_idle(self) -> None:
        level = self._floor = max(self._floor, self.level())  # forgetting the last leaver must not lower it
        for tenant in [t for t, c in self._counters.items() if t not in self._live and c <= level]:
            del self._counters[tenant]

    # ---- policy ------------------------------------------------------------------------------
    def order(self, next_worth: dict[str, float], running: dict[str, int],
              max_num_seqs: int) -> list[tuple[str, bool]]:
        """Waiting tenants in admission order, each with whether it is entitled (module docstring).

        `next_worth`: each waiting tenant's next request's `request_worth`, in the order of their oldest
        waiting request (the last tie-break); `running`: sequences per tenant.
        """
        low = min(self.counter(t) for t in next_worth)
        entitled = {t: self.counter(t) <= low + worth / self.weight(t) and self._fits_share(t, running, max_num_seqs)
                    for t, worth in next_worth.items()}
        ranked = sorted(next_worth, key=lambda t: (not entitled[t], self.counter(t), running.get(t, 0)))
        return [(t, entitled[t]) for t in ranked]

    def over_share(self, tenant: str, running: dict[str, int], max_num_seqs: int) -> bool:
        """`tenant` runs more sequences than its share of the slots."""
        return running.get(tenant, 0) * self._total_weight(running) > max_num_seqs * self.weight(tenant)

    def _fits_share(self, tenant: str, running: dict[str, int], max_num_seqs: int) -> bool:
        demand = running.get(tenant, 0) + self._queued.get(tenant, 0)
        # demand <= max_num_seqs x weight / total weight (max_num_seqs / tenants when all weigh 1)
        return demand * self._total_weight(running) <= max_num_seqs * self.weight(tenant)

    def _total_weight(self, running: dict[str, int]) -> float:
        """The weights of the tenants with requests in the scheduler, running or waiting."""
        return sum(self.weight(t) for t in {t for t, n in running.items() if n} | set(self._queued))

    def num_tracked(self) -> int:
        """Tenants with a counter in memory (it stays bounded: idle tenants at or below the level go)."""
        return len(self._counters)

