"""Adapter-affinity routing vs random and consistent-hash routing: a discrete-event simulation (no servers).

The question: in front of R loraplex replicas, each holding at most S adapters in device slots, how much does
the router decide the device cache hit rate (requests served without a cold load), the cold loads per second
and the load balance? Pure Python + numpy; nothing here imports torch or starts a server.

Model (every number below is a CLI flag; defaults in brackets):

- Traffic: A adapters [500] with Zipf(alpha) popularity, p_i proportional to 1 / i^alpha (i = 1..A). Requests
  arrive as one Poisson process of total rate lambda = load x R x B / d, i.e. every replica is offered the same
  mean utilization `--load` [0.7] of its B concurrent sequences whatever R is. Each request names one adapter,
  drawn independently from the Zipf distribution (no temporal locality beyond popularity).
- Replica: B [16] requests run concurrently, the rest wait in one FIFO queue (an M/G/B queue, served in
  arrival order). Service time: exponential with mean d [2 s], plus `--load-time` [0.05 s] when the request's
  adapter had to be loaded (a cold load delays only that request).
- Device slots: an LRU of S adapters per replica, touched when a request is routed (with one FIFO queue per
  replica that is also the order in which requests are admitted). The adapter is there: a hit, it becomes the
  most recently used. It is not: a cold load, the least recently used adapter is evicted. Simplification:
  slots are never pinned; an adapter whose requests are still running can be evicted (as if a running request
  kept its own copy), so a batch may span more than S adapters. The real engine pins them (adapters/
  slot_table.py: a request waits until a slot frees). `over_slots` reports how often that happened: the
  fraction of requests admitted while the requests in service on that replica (this one included) named more
  than S distinct adapters, i.e. requests the real engine would have delayed.
- Router, with an exact and instant view of every replica (outstanding requests = running + queued, and which
  adapters each holds):
    random    uniform random replica (what a plain load balancer does; round-robin gives the same hit rate).
    hash      consistent hashing of the adapter name on a ring with `--vnodes` [160] points per replica
              (md5, ketama-style; nginx `hash $lora consistent`): a fixed adapter -> replica map, load-blind.
    affinity  Ray Serve multiplexing / the Gateway API Inference Extension's lora-affinity scorer: among the
              replicas that hold the adapter, the least loaded one (h); if none holds it, the least loaded
              replica. Spill bound: if h is saturated (outstanding >= B, a new request would queue) and
              outstanding(h) > k x outstanding(least loaded) (k = `--spill-factor` [2]), the request goes to
              the least loaded replica instead (a cold load there; the hot adapter then lives on both).
              Ties between equally loaded replicas rotate with the request index.
- Statistics: the first `--warmup` [20 %] of `--requests` [50 000] requests fill the caches and queues and are
  left out. hit rate = hits / requests; cold loads/s = misses / (time from the first to the last counted
  arrival), all replicas together; imbalance = max / mean requests per replica; max util = the busiest
  replica's busy time / (B x that window) (> 1: its queue grows for as long as the run lasts, and its delays
  depend on the run length); queueing delay = admission - arrival, p50 / p99.
- Reference: Che's approximation of an LRU under independent requests (hit rate of a cache of S fed by
  probabilities q: find T with sum(1 - exp(-q T)) = S, hit = sum q (1 - exp(-q T))) for random (every replica
  sees the whole distribution) and hash (replica r sees only its own adapters) is printed beside the
  simulated rates: the two must agree to about a point, or the simulation is wrong.

Every configuration uses the same seeded request stream for a given alpha (common random numbers: the
policies and the S values see identical arrivals, adapters and service times; R only rescales time), so
differences between policies are not sampling noise.

Run: .venv/bin/python bench/sim_affinity.py [--quick] [--replicas 1 2 4 8] [--slots 4 8 16 32]
     [--alphas 0.6 0.8 1.0 1.2] [--adapters 500] [--seed 0] [--jobs 2]
Writes bench/results/sim_affinity.json and sim_affinity.png (sim_affinity_quick.* with --quick; `--out` a JSON
path or a folder), prints a markdown table and a summary paragraph. Full sweep: 192 runs of 50 000 requests.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import os
import platform
import random
import sys
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # results_io next to this file, however the script is loaded
from results_io import pyplot, write_json  # noqa: E402 - torch-free (common.py imports torch)

RESULTS_DIR = Path(__file__).parent / "results"
POLICIES = ("random", "hash", "affinity")
ANCHOR = {"replicas": 4, "slots": 8, "alpha": 1.0}  # the figure's fixed values (nearest present in the sweep)


@dataclass(frozen=True)
class Params:
    """Everything but the swept (replicas, slots, alpha)."""

    adapters: int = 500
    requests: int = 50_000
    warmup: float = 0.2
    batch: int = 16
    service_s: float = 2.0
    load: float = 0.7
    load_time_s: float = 0.05
    vnodes: int = 160
    spill_factor: float = 2.0
    seed: int = 0


# ---- traffic ---------------------------------------------------------------------------------------------
def zipf_probs(n: int, alpha: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return w / w.sum()


@dataclass(frozen=True)
class Stream:
    """One seeded request stream per alpha: unit-rate gaps (divided by lambda later), adapters, unit-mean
    service times. Independent of R, S and the policy (common random numbers)."""

    gaps: np.ndarray
    adapters: np.ndarray
    service: np.ndarray


def make_stream(params: Params, alpha: float) -> Stream:
    rng = np.random.default_rng([params.seed, round(alpha * 1000)])
    n = params.requests
    return Stream(gaps=rng.exponential(1.0, n), adapters=rng.choice(params.adapters, n, p=zipf_probs(params.adapters,
                                                                                                          alpha)),
                  service=rng.exponential(1.0, n))


def adapter_name(i: int) -> str:
    return f"adapter-{i:04d}"


# ---- consistent hashing ----------------------------------------------------------------------------------
def _h64(key: str) -> int:
    return int.from_bytes(hashlib.md5(key.encode()).digest()[:8], "big")


def hash_table(adapters: int, replicas: int, vnodes: int) -> list[int]:
    """adapter index -> replica: the first ring point clockwise of the adapter name's hash, `vnodes` points per
    replica (ketama-style; the map of nginx `hash ... consistent`, up to its exact point keys)."""
    ring = sorted((_h64(f"replica-{r}#{v}"), r) for r in range(replicas) for v in range(vnodes))
    points = [p for p, _ in ring]
    table = []
    for a in range(adapters):
        k = bisect.bisect_right(points, _h64(adapter_name(a))) % len(ring)
        table.append(ring[k][1])
    return table


# ---- the simulation --------------------------------------------------------------------------------------
def simulate(policy: str, replicas: int, slots: int, alpha: float, params: Params = Params(),
             stream: Stream | None = None) -> dict[str, float]:
    """One configuration: route every request of the stream, run each replica's FIFO queue of B servers and
    its LRU of `slots` adapters; the statistics of the requests after the warm-up."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    stream = stream if stream is not None else make_stream(params, alpha)
    R, S, B = replicas, slots, params.batch
    lam = params.load * R * B / params.service_s
    arrivals = (np.cumsum(stream.gaps) / lam).tolist()
    service = (stream.service * params.service_s).tolist()
    names = stream.adapters.tolist()
    n = len(names)
    warm = int(n * params.warmup)
    rng = random.Random(f"{params.seed}/{policy}/{R}/{S}/{alpha}")
    table = hash_table(params.adapters, R, params.vnodes) if policy == "hash" else None
    lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(R)]
    free = [[0.0] * B for _ in range(R)]  # per replica: when each of its B servers is free (a heap)
    outstanding: list[list[float]] = [[] for _ in range(R)]  # end times of routed, unfinished requests (a heap)
    running: list[list[tuple[float, int]]] = [[] for _ in range(R)]  # (end, adapter) at the admission clock
    in_service: list[dict[int, int]] = [{} for _ in range(R)]  # adapter -> its requests in service
    per_replica = [0] * R
    busy = [0.0] * R
    hits = over = 0
    delays: list[float] = []
    spill = params.spill_factor
    for i in range(n):
        t, a = arrivals[i], names[i]
        if policy == "random":
            r = rng.randrange(R)
        elif policy == "hash":
            r = table[a]
        else:
            r = _affinity(i, t, a, outstanding, lru, R, B, spill)
        cache = lru[r]
        hit = a in cache
        if hit:
            cache.move_to_end(a)
        else:
            if len(cache) >= S:
                cache.popitem(last=False)
            cache[a] = None
        heap = free[r]
        start = t if heap[0] <= t else heap[0]
        cost = service[i] if hit else service[i] + params.load_time_s
        end = start + cost
        heapq.heapreplace(heap, end)
        if policy == "affinity":
            heapq.heappush(outstanding[r], end)
        run, count = running[r], in_service[r]
        while run and run[0][0] <= start:  # admission times never decrease within a replica (FIFO)
            b = heapq.heappop(run)[1]
            if count[b] == 1:
                del count[b]
            else:
                count[b] -= 1
        count[a] = count.get(a, 0) + 1
        heapq.heappush(run, (end, a))
        if i >= warm:
            hits += hit
            over += len(count) > S
            per_replica[r] += 1
            busy[r] += cost
            delays.append(start - t)
    counted = n - warm
    window = arrivals[-1] - arrivals[warm]
    misses = counted - hits
    mean = counted / R
    d = np.asarray(delays)
    return {
        "requests": counted, "window_s": window, "rate_req_s": lam,
        "hit_rate": hits / counted, "cold_loads": misses, "cold_loads_per_s": misses / window,
        "imbalance": max(per_replica) / mean, "max_util": max(busy) / (B * window),
        "delay_p50_s": float(np.percentile(d, 50)), "delay_p99_s": float(np.percentile(d, 99)),
        "over_slots": over / counted, "per_replica": per_replica,
    }


def _affinity(i: int, t: float, a: int, outstanding: list[list[float]], lru: list[OrderedDict[int, None]], R: int,
              B: int, spill: float) -> int:
    """The affinity router's pick (see the module docstring); drops finished requests from `outstanding`."""
    least = holder = -1
    least_load = holder_load = 0
    for j in range(R):
        q = (i + j) % R  # rotating tie-break
        h = outstanding[q]
        while h and h[0] <= t:
            heapq.heappop(h)
        load = len(h)
        if least < 0 or load < least_load:
            least, least_load = q, load
        if a in lru[q] and (holder < 0 or load < holder_load):
            holder, holder_load = q, load
    if holder < 0:
        return least
    if holder_load >= B and holder_load > spill * least_load:
        return least
    return holder


# ---- Che's approximation (the reference) -----------------------------------------------------------------
def che_hit_rate(q: np.ndarray, size: int) -> float:
    """LRU hit rate of a cache of `size` under independent requests with probabilities `q` (summing to 1)."""
    q = q[q > 0]
    if size >= len(q):
        return 1.0
    lo, hi = 0.0, 1.0
    while np.sum(1 - np.exp(-q * hi)) < size:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sum(1 - np.exp(-q * mid)) < size else (lo, mid)
    return float(np.sum(q * (1 - np.exp(-q * hi))))


def che_reference(replicas: int, slots: int, alpha: float, params: Params) -> dict[str, float]:
    p = zipf_probs(params.adapters, alpha)
    table = np.asarray(hash_table(params.adapters, replicas, params.vnodes))
    hashed = 0.0
    for r in range(replicas):
        w = p[table == r].sum()
        if w > 0:
            hashed += w * che_hit_rate(p[table == r] / w, slots)
    return {"random": che_hit_rate(p, slots), "hash": float(hashed)}


# ---- the sweep -------------------------------------------------------------------------------------------
def _run_one(task: tuple[str, int, int, float, Params]) -> dict[str, object]:
    policy, R, S, alpha, params = task
    return {"policy": policy, "replicas": R, "slots": S, "alpha": alpha} | simulate(policy, R, S, alpha, params)


def sweep(replicas: list[int], slots: list[int], alphas: list[float], params: Params,
          jobs: int = 1) -> list[dict[str, object]]:
    """Every (policy, R, S, alpha), each row with its Che reference (`che_hit_rate`, random and hash only)."""
    tasks = [(p, R, S, a, params) for a in alphas for R in replicas for S in slots for p in POLICIES]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_run_one, tasks, chunksize=4))
    else:
        rows = [_run_one(t) for t in tasks]
    refs = {(R, S, a): che_reference(R, S, a, params) for a in alphas for R in replicas for S in slots}
    for row in rows:
        row["che_hit_rate"] = refs[(row["replicas"], row["slots"], row["alpha"])].get(row["policy"])
    return rows


def find(rows: list[dict[str, object]], policy: str, replicas: int, slots: int, alpha: float) -> dict[str, object]:
    for row in rows:
        if (row["policy"], row["replicas"], row["slots"], row["alpha"]) == (policy, replicas, slots, alpha):
            return row
    raise KeyError((policy, replicas, slots, alpha))


def anchors(replicas: list[int], slots: list[int], alphas: list[float]) -> dict[str, float]:
    """ANCHOR's values, or the nearest present in the sweep."""
    swept = {"replicas": replicas, "slots": slots, "alpha": alphas}
    return {k: min(swept[k], key=lambda v, k=k: (abs(v - ANCHOR[k]), v)) for k in ANCHOR}


# ---- report ----------------------------------------------------------------------------------------------
def key_configs(replicas: list[int], slots: list[int], alphas: list[float]) -> list[tuple[int, int, float]]:
    anc = anchors(replicas, slots, alphas)
    R0, S0, a0 = int(anc["replicas"]), int(anc["slots"]), anc["alpha"]
    cfgs = [(R, S0, a0) for R in replicas] + [(R0, S, a0) for S in (min(slots), max(slots))]
    cfgs += [(R0, S0, a) for a in (min(alphas), max(alphas))] + [(max(replicas), S0, max(alphas))]
    return list(dict.fromkeys(cfgs))


def markdown(rows: list[dict[str, object]], replicas: list[int], slots: list[int], alphas: list[float]) -> str:
    cfgs = key_configs(replicas, slots, alphas)
    head = "| policy | " + " | ".join(f"R={R} S={S} α={a:.1f}" for R, S, a in cfgs) + " |"
    lines = ["Device cache hit rate (cold loads/s in brackets):", "", head, "|---" * (len(cfgs) + 1) + "|"]
    for p in POLICIES:
        cells = [find(rows, p, R, S, a) for R, S, a in cfgs]
        lines.append(f"| {p} | " + " | ".join(f"{c['hit_rate']:.1%} ({c['cold_loads_per_s']:.1f})" for c in cells)
                     + " |")
    lines += ["", "Balance and queueing:", "",
              "| policy | config | hit rate | Che ref | cold loads/s | imbalance | max util | delay p50 | delay p99 "
              "| over_slots |", "|---" * 10 + "|"]
    anc = anchors(replicas, slots, alphas)
    detail = list(dict.fromkeys([(int(anc["replicas"]), int(anc["slots"]), anc["alpha"]),
                                 (max(replicas), int(anc["slots"]), max(alphas))]))
    for R, S, a in detail:
        for p in POLICIES:
            c = find(rows, p, R, S, a)
            che = "-" if c["che_hit_rate"] is None else f"{c['che_hit_rate']:.1%}"
            mark = " ‡" if c["max_util"] > 1 else ""
            lines.append(f"| {p} | R={R} S={S} α={a:.1f} | {c['hit_rate']:.1%} | {che} | {c['cold_loads_per_s']:.1f} "
                         f"| {c['imbalance']:.2f} | {c['max_util']:.2f}{mark} | {c['delay_p50_s']:.2f} s "
                         f"| {c['delay_p99_s']:.2f} s | {c['over_slots']:.1%} |")
    lines += ["", "(‡ max util > 1: that replica is offered more than it can serve; its queue, and so the delays, "
              "grow with the run length. over_slots: requests admitted while their replica's running requests "
              "spanned more than S adapters, which the real engine's pinned slots would have delayed.)"]
    return "\n".join(lines)


def summary(rows: list[dict[str, object]], replicas: list[int], slots: list[int], alphas: list[float]) -> str:
    anc = anchors(replicas, slots, alphas)
    R, S, a = int(anc["replicas"]), int(anc["slots"]), anc["alpha"]
    c = {p: find(rows, p, R, S, a) for p in POLICIES}
    Rm, am = max(replicas), max(alphas)
    h = {p: find(rows, p, Rm, S, am) for p in POLICIES}
    che_err = max(abs(r["hit_rate"] - r["che_hit_rate"]) for r in rows if r["che_hit_rate"] is not None)
    ahead = sum(r["hit_rate"] >= find(rows, "random", r["replicas"], r["slots"], r["alpha"])["hit_rate"]
                for r in rows if r["policy"] == "affinity" and r["replicas"] > 1)
    multi = sum(1 for r in rows if r["policy"] == "affinity" and r["replicas"] > 1)
    return (
        f"At R={R}, S={S}, α={a:.1f}: random hits {c['random']['hit_rate']:.1%}, hash {c['hash']['hit_rate']:.1%}, "
        f"affinity {c['affinity']['hit_rate']:.1%}; cold loads/s {c['random']['cold_loads_per_s']:.1f} (random) vs "
        f"{c['hash']['cold_loads_per_s']:.1f} (hash) vs {c['affinity']['cold_loads_per_s']:.1f} (affinity), at "
        f"{c['random']['rate_req_s']:.1f} req/s. Imbalance (max/mean requests per replica): random "
        f"{c['random']['imbalance']:.2f}, hash {c['hash']['imbalance']:.2f}, affinity "
        f"{c['affinity']['imbalance']:.2f}; queueing delay p99 {c['random']['delay_p99_s']:.2f} / "
        f"{c['hash']['delay_p99_s']:.2f} / {c['affinity']['delay_p99_s']:.2f} s. Under the strongest skew and most "
        f"replicas (R={Rm}, S={S}, α={am:.1f}) hash puts {h['hash']['max_util']:.2f}x of a replica's capacity on its "
        f"busiest replica (imbalance {h['hash']['imbalance']:.2f}, delay p99 {h['hash']['delay_p99_s']:.1f} s) while "
        f"affinity keeps it at {h['affinity']['max_util']:.2f}x (imbalance {h['affinity']['imbalance']:.2f}, p99 "
        f"{h['affinity']['delay_p99_s']:.2f} s) with {h['affinity']['hit_rate']:.1%} hits (hash "
        f"{h['hash']['hit_rate']:.1%}, random {h['random']['hit_rate']:.1%}). Affinity's hit rate >= random's in "
        f"{ahead}/{multi} configurations with R > 1. Simulated random/hash hit rates are within "
        f"{che_err:.1%} of Che's approximation everywhere.{_pooled(rows, R, S, a, slots)}"
    )


def _pooled(rows: list[dict[str, object]], R: int, S: int, a: float, slots: list[int]) -> str:
    """Hash's R replicas of S slots against one replica's random-routed LRU of R x S slots, when swept."""
    if R * S not in slots:
        return ""
    big = find(rows, "random", R, R * S, a)["hit_rate"]
    return (f" Hash's {R} x {S} slots hit as one LRU of {R * S} does (random routing with S={R * S}, every replica "
            f"seeing every adapter: {big:.1%} vs {find(rows, 'hash', R, S, a)['hit_rate']:.1%}): each hash replica "
            f"sees only its share of the adapters.")


def plot(path: Path, rows: list[dict[str, object]], replicas: list[int], slots: list[int], alphas: list[float],
         params: Params) -> None:
    plt = pyplot()
    if plt is None:
        return
    anc = anchors(replicas, slots, alphas)
    R0, S0, a0 = int(anc["replicas"]), int(anc["slots"]), anc["alpha"]
    style = {"random": ("tab:gray", "o"), "hash": ("tab:blue", "s"), "affinity": ("tab:red", "^")}

    def lines(ax, xs, key, pick, xlabel, title, pct=True, log=False, che=False) -> None:
        for p in POLICIES:
            color, marker = style[p]
            ys = [find(rows, p, *pick(x))[key] for x in xs]
            ax.plot(xs, [100 * y for y in ys] if pct else ys, marker=marker, color=color, label=p)
            if che and p != "affinity":
                ref = [find(rows, p, *pick(x))["che_hit_rate"] for x in xs]
                ax.plot(xs, [100 * y for y in ref], ls=":", color=color, lw=1, label=f"{p}, Che approx.")
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("symlog", linthresh=0.1)  # p99 can be 0 (no queueing): linear below 0.1 s
        if xlabel.startswith("replicas") or xlabel.startswith("slots"):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    (a, b, c), (d, e, f) = axes
    lines(a, replicas, "hit_rate", lambda R: (R, S0, a0), "replicas R",
          f"(a) hit rate vs replicas (S={S0}, α={a0:.1f})", che=True)
    a.set_ylabel("device cache hit rate (%)")
    lines(b, replicas, "cold_loads_per_s", lambda R: (R, S0, a0), "replicas R",
          f"(b) cold loads/s, all replicas (S={S0}, α={a0:.1f})", pct=False)
    b.set_ylabel("cold loads per second")
    lines(c, alphas, "hit_rate", lambda al: (R0, S0, al), "Zipf α", f"(c) hit rate vs skew (R={R0}, S={S0})",
          che=True)
    c.set_ylabel("device cache hit rate (%)")
    lines(d, slots, "hit_rate", lambda S: (R0, S, a0), "slots per replica S",
          f"(d) hit rate vs slots (R={R0}, α={a0:.1f})", che=True)
    d.set_ylabel("device cache hit rate (%)")
    lines(e, alphas, "max_util", lambda al: (max(replicas), S0, al), "Zipf α",
          f"(e) busiest replica's utilization (R={max(replicas)}, S={S0})", pct=False)
    e.axhline(1.0, ls="--", color="black", lw=1)
    e.set_ylabel("busy time / capacity (> 1: overloaded)")
    lines(f, alphas, "delay_p99_s", lambda al: (max(replicas), S0, al), "Zipf α",
          f"(f) queueing delay p99 (R={max(replicas)}, S={S0})\nwhere (e) > 1 it grows with the run length", pct=False,
          log=True)
    f.set_ylabel("seconds (symlog)")
    fig.suptitle(f"Routing to LoRA replicas: A={params.adapters} Zipf adapters, B={params.batch} concurrent, "
                 f"mean service {params.service_s:g} s, offered load {params.load:g} per replica, "
                 f"{params.requests} requests/run, seed {params.seed} (dotted: Che's LRU approximation)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ---- output --------------------------------------------------------------------------------------------
def machine() -> dict[str, object]:
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Params()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="R 1 2 4, S 4 8, α 0.8 1.0 1.2, 4000 requests (seconds)")
    ap.add_argument("--replicas", type=int, nargs="+", default=None, help="R values [1 2 4 8]")
    ap.add_argument("--slots", type=int, nargs="+", default=None, help="device slots per replica [4 8 16 32]")
    ap.add_argument("--alphas", type=float, nargs="+", default=None, help="Zipf exponents [0.6 0.8 1.0 1.2]")
    ap.add_argument("--adapters", type=int, default=d.adapters, help="A, distinct adapters")
    ap.add_argument("--requests", type=int, default=None, help=f"requests per run [{d.requests}; --quick 4000]")
    ap.add_argument("--warmup", type=float, default=d.warmup, help="fraction of requests left out of the statistics")
    ap.add_argument("--batch", type=int, default=d.batch, help="B, requests a replica runs concurrently")
    ap.add_argument("--service", type=float, default=d.service_s, help="mean service time d (s, exponential)")
    ap.add_argument("--load", type=float, default=d.load, help="offered utilization per replica (λ = load·R·B/d)")
    ap.add_argument("--load-time", type=float, default=d.load_time_s, help="seconds a cold load adds to a request")
    ap.add_argument("--vnodes", type=int, default=d.vnodes, help="hash ring points per replica")
    ap.add_argument("--spill-factor", type=float, default=d.spill_factor, help="affinity's spill bound k")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path, or a folder (default bench/results/sim_affinity[_quick].json); PNG beside it")
    args = ap.parse_args(argv)
    args.replicas = args.replicas or ([1, 2, 4] if args.quick else [1, 2, 4, 8])
    args.slots = args.slots or ([4, 8] if args.quick else [4, 8, 16, 32])
    args.alphas = args.alphas or ([0.8, 1.0, 1.2] if args.quick else [0.6, 0.8, 1.0, 1.2])
    args.requests = args.requests or (4000 if args.quick else d.requests)
    if not 0 <= args.warmup < 1 or args.load <= 0 or min(args.replicas + args.slots) < 1 or args.batch < 1:
        ap.error("need 0 <= --warmup < 1, --load > 0, --replicas/--slots/--batch >= 1")
    stem = "sim_affinity_quick" if args.quick else "sim_affinity"
    if args.out is None:
        args.out = RESULTS_DIR / f"{stem}.json"
    elif args.out.suffix != ".json":
        args.out = args.out / f"{stem}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = Params(adapters=args.adapters, requests=args.requests, warmup=args.warmup, batch=args.batch,
                    service_s=args.service, load=args.load, load_time_s=args.load_time, vnodes=args.vnodes,
                    spill_factor=args.spill_factor, seed=args.seed)
    facts = machine()
    print("machine: " + "  ".join(f"{k}={v}" for k, v in facts.items()), flush=True)
    runs = 3 * len(args.replicas) * len(args.slots) * len(args.alphas)
    print(f"{runs} runs of {params.requests} requests, {args.jobs} processes ...", flush=True)
    started = time.perf_counter()
    rows = sweep(args.replicas, args.slots, args.alphas, params, jobs=args.jobs)
    wall = time.perf_counter() - started
    table = markdown(rows, args.replicas, args.slots, args.alphas)
    text = summary(rows, args.replicas, args.slots, args.alphas)
    print("\n" + table + "\n\n" + text + f"\n\n({runs} runs in {wall:.1f} s)")
    write_json(args.out, {
        "machine": facts, "wall_s": round(wall, 1), "seed": params.seed, "params": asdict(params),
        "sweep": {"replicas": args.replicas, "slots": args.slots, "alphas": args.alphas, "policies": list(POLICIES)},
        "model": __doc__.split("Model (", 1)[1].split("\n\nEvery configuration", 1)[0].join(("Model (", "")),
        "summary": text, "results": rows})
    plot(args.out.with_suffix(".png"), rows, args.replicas, args.slots, args.alphas, params)


if __name__ == "__main__":
    main()
