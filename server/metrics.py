"""Prometheus metrics: loraplex_* names plus the vllm:* names that LoRA-aware routers read.

Counters/histograms are updated as things happen; gauges describing current state (queue lengths, KV
usage, adapter residency) are computed at scrape time by a custom collector, so they are never stale.
Label values come only from registered adapters or the served base name; anything else is "unknown".
When an adapter is unregistered its children are removed (`forget_adapter`), so the label sets are
bounded by the adapters registered now, not by every name ever registered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraplex.adapters.merge import is_virtual
from loraplex.adapters.slot_table import AdapterSnapshot
from loraplex.server.engine.async_engine import EngineSnapshot
from loraplex.server.engine.request import StepStats

if TYPE_CHECKING:
    from loraplex.server.runtime import Runtime

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("loraplex_requests", "Finished HTTP generation requests",
                                ["adapter", "endpoint", "status"], registry=r)
        self.latency = Histogram("loraplex_request_latency_seconds", "End-to-end request latency",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loraplex_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.batch_size = Histogram("loraplex_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_adapters = Histogram("loraplex_batch_distinct_adapters", "Distinct adapters per engine step",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.adapter_load = Histogram("loraplex_adapter_load_seconds", "Adapter load time, disk/host to device",
                                      buckets=LATENCY_BUCKETS, registry=r)
        # A ties / dare merge computes a virtual adapter from its components once (seconds to a minute): its own
        # histogram, so it is no outlier among plain loads.
        self.merge_load = Histogram("loraplex_adapter_merge_seconds",
                                    "Time to compute a ties/dare merge into its virtual adapter and load it",
                                    buckets=LATENCY_BUCKETS, registry=r)
        r.register(_StateCollector(runtime))
        # Resolving a label and touching its children happen under one lock, which forget_adapter takes too.
        self._lock = threading.Lock()
        # adapter label value -> the (counter, label values) children made for it, to remove on unregister.
        self._children: dict[str, set[tuple[Counter, tuple[str, ...]]]] = {}

    def label(self, adapter: str | None) -> str:
        """A label value that never comes from user input: a registered adapter, the base, or 'unknown'."""
        if adapter is None or adapter == self.runtime.served_model_name:
            return self.runtime.served_model_name
        store = self.runtime.store
        return adapter if store is not None and adapter in store else "unknown"

    def record_request(self, *, endpoint: str, adapter: str | None, status: int, latency_s: float | None = None,
                       ttft_s: float | None = None, tpot_s: float | None = None, prompt_tokens: int = 0,
                       generation_tokens: int = 0, count_request: bool = True) -> None:
        """One finished HTTP request. The extra choices of an `n` > 1 request pass `count_request=False`:
        their tokens count, the request (and its latency) is counted once, by its first choice."""
        # A request that finishes just after its adapter's DELETE resolves to "unknown" (the store no longer
        # has it) and so cannot re-create a child forget_adapter removed: the lock orders the two.
        with self._lock:
            label = self.label(adapter)
            if count_request:
                self._child(self.requests, label, endpoint, str(status)).inc()
            if generation_tokens:
                self._child(self.generation_tokens, label).inc(generation_tokens)
        if not count_request:
            return
        for hist, value in ((self.latency, latency_s), (self.ttft, ttft_s), (self.tpot, tpot_s)):
            if value is not None:
                hist.observe(value)
        self.prompt_tokens.inc(prompt_tokens)

    def forget_adapter(self, name: str) -> None:
        """Remove every child labelled `name`. Call after the store unregistered it, so that later
        requests for it are counted under "unknown" instead of re-creating the children."""
        with self._lock:
            for metric, labelvalues in self._children.pop(name, ()):
                metric.remove(*labelvalues)

    def _child(self, metric: Counter, *labelvalues: str) -> Counter:
        """`metric.labels(*labelvalues)`, remembered under its adapter label (the first label). Hold _lock."""
        self._children.setdefault(labelvalues[0], set()).add((metric, labelvalues))
        return metric.labels(*labelvalues)

    def observe_step(self, stats: StepStats) -> None:
        if stats.num_tokens:
            self.batch_size.observe(stats.num_seqs)
            self.batch_adapters.observe(stats.num_adapters)

    def observe_adapter_load(self, seconds: float, *, merge: bool = False) -> None:
        (self.merge_load if merge else self.adapter_load).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector(Collector):
    """Gauges read at scrape time from the snapshots the engine thread publishes (never its live state)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        client = self.runtime.engine
        snap = client.snapshot if client is not None else EngineSnapshot()  # published by the engine thread
        yield _gauge("loraplex_num_requests_running", "Requests in the running batch", snap.running)
        yield _gauge("loraplex_num_requests_waiting", "Requests queued in the engine", snap.waiting)
        yield _gauge("loraplex_kv_cache_usage_ratio", "Fraction of KV blocks in use", snap.kv_usage)
        yield _gauge("vllm:num_requests_running", "Requests in the running batch (vLLM name)", snap.running)
        yield _gauge("vllm:num_requests_waiting", "Requests queued (vLLM name)", snap.waiting)
        yield _gauge("vllm:gpu_cache_usage_perc", "KV cache usage, 0..1 (vLLM's older name)", snap.kv_usage)
        yield _gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0..1 (vLLM's current name)", snap.kv_usage)
        yield from _prefix_cache_metrics(snap)
        yield from self._adapter_metrics(client.adapters if client is not None else None, snap)
        yield from self._registry_metrics()

    def _registry_metrics(self) -> Iterator:
        """With a shared registry: how its polls went, and how stale this replica's view may be."""
        poller = self.runtime.poller
        if poller is None:
            return
        polls = CounterMetricFamily("loraplex_registry_polls", "Shared registry polls by result", labels=["result"])
        for result, count in poller.polls.items():
            polls.add_metric([result], count)
        yield polls
        yield _gauge("loraplex_registry_sync_age_seconds", "Seconds since the last successful registry poll",
                     time.monotonic() - poller.last_success)

    def _adapter_metrics(self, adapters: AdapterSnapshot | None, snap: EngineSnapshot) -> Iterator:
        store, slots = self.runtime.store, self.runtime.config.engine.lora.max_loras
        yield _gauge("loraplex_adapter_slots_total", "Device adapter slots", slots)
        yield _gauge("loraplex_adapters_registered", "Registered adapters", len(store.names()) if store else 0)
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running/waiting LoRA adapters (value: timestamp)",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        # Adapter names come from registered adapters only: a request names one before it is admitted.
        info.add_metric([str(slots), ",".join(snap.running_adapters), ",".join(snap.waiting_adapters)], time.time())
        yield info
        if adapters is None:
            return
        res = GaugeMetricFamily("loraplex_adapters_resident", "Adapters resident per tier", labels=["tier"])
        for tier in ("device", "host"):
            # Registered adapters only: a ties / dare merge's virtual adapter holds a slot but is no adapter.
            res.add_metric([tier], sum(not is_virtual(name) for name in adapters.resident[tier]))
        res.add_metric(["disk"], len(store.names()) if store else 0)
        yield res
        for name, field, help_ in (("adapter_cache_hits", "hits", "Cache hits"),
                                   ("adapter_cache_misses", "misses", "Cache misses"),
                                   ("adapter_evictions", "evictions", "Cache evictions")):
            fam = CounterMetricFamily(f"loraplex_{name}", f"{help_} per tier", labels=["tier"])
            for tier, value in getattr(adapters.stats, field).items():
                fam.add_metric([tier], value)
            yield fam


def _prefix_cache_metrics(snap: EngineSnapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """vLLM's token counters (queried, found) and their ratio since start."""
    yield CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                              value=snap.prefix_queries)
    yield CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                              value=snap.prefix_hits)
    ratio = snap.prefix_hits / snap.prefix_queries if snap.prefix_queries else 0.0
    yield _gauge("loraplex_prefix_cache_hit_ratio", "Prefix cache hits / queries (tokens) since start", ratio)


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)

