"""Weighted fair share by tenant (issue 25, `bench/bench_fairness.py --tenants`): the in-process `LLMEngine` on the
tiny llama, open-loop Poisson arrivals in wall-clock time, as the two-tenant run (bench_fairness.py) but with
tenants as `--tenants` makes them (fairness.TenantSpec, what the HTTP layer passes the engine).

Tenants: `w1` (weight 1) spreads its requests over two adapters (w1-a, w1-b), `w3` (weight 3) uses one (w3-a),
`light` (weight 1, adapter B) sends a light load. w1 and w3 each offer `--load` x capacity (default 1.5) on
their own, so both stay backlogged the whole run; light offers capacity / 11 (bench_fairness.py's B). Every
request as in bench_fairness.py: prompt and new tokens uniform [8, 64), greedy, EOS ignored.

Cases per round, in a rotating order:
  light_alone  light's arrivals only: the reference for its TTFT
  tenants      w1 + w3 + light, policy fair, each request carrying its tenant's TenantSpec (weights 1, 3, 1)
  per_adapter  the same arrivals with no tenants (each adapter its own tenant, weight 1: what the server did
               before --tenants; w1's two adapters then get two shares). A baseline, no target.
Statistics over the window [20 % of --seconds, --seconds]: the output tokens of w1 and w3 in it, as shares of the
two flooders' total (light's tokens left out), and light's TTFT p99 (requests that arrived in the window).

Targets (PASS/MISS, on the medians of the per-round values): in `tenants`, w1's share within 0.25 +- 0.03 and
w3's within 0.75 +- 0.03; light's TTFT p99 ÷ light alone <= 2.

Run: .venv/bin/python bench/bench_fairness.py --tenants [--seconds 30] [--repeats 3] [--load 1.5]
Writes bench/results/fairness_tenants.json.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from common import RESULTS_DIR, bench_adapters, machine_facts, median, print_facts, write_json

from loraplex.server.engine.fairness import TenantSpec

DEFAULT_OUT = RESULTS_DIR / "fairness_tenants.json"
SPECS = {"w1": TenantSpec("w1", 1.0), "w3": TenantSpec("w3", 3.0), "light": TenantSpec("light", 1.0)}
# adapter -> its tenant. light's adapter is "B": bench_fairness.open_loop steps on after the last arrival until
# every request of "B" has its first token (none is censored early).
ADAPTERS = {"w1-a": "w1", "w1-b": "w1", "w3-a": "w3", "B": "light"}
CASES = ("light_alone", "tenants", "per_adapter")
SHARE_TOLERANCE = 0.03
TTFT_TARGET = 2.0
LIGHT_FRACTION = 1 / 11  # light's rate as a fraction of capacity (bench_fairness.py's B)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenants", action="store_true",
                        help="weighted fair share by tenant (bench/fairness_tenants.py) instead")


class _TenantEngine:
    """The engine as bench_fairness.open_loop drives it, each request given its adapter's tenant (or none)."""

    def __init__(self, engine: object, with_tenants: bool) -> None:
        self._engine, self._with_tenants = engine, with_tenants

    def add_request(self, rid: str, prompt: list[int], params: object, adapter: str) -> None:
        spec = SPECS[ADAPTERS[adapter]] if self._with_tenants else None
        self._engine.add_request(rid, prompt, params, adapter, tenant=spec)

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)


def arrivals(bf: object, seed: int, flood_rate: float, light_rate: float, seconds: float, flood: bool) -> list:
    """light's arrivals depend on `seed` only, so every case of a round sees the same ones; w1's requests go to
    its two adapters at random."""
    rng_l, rng_1, rng_3 = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    out = bf.requests(rng_l, "B", bf.poisson_times(rng_l, light_rate, seconds))
    if flood:
        w1 = bf.requests(rng_1, "w1-a", bf.poisson_times(rng_1, flood_rate, seconds))
        out += [bf.Arrival(a.at, rng_1.choice(("w1-a", "w1-b")), a.prompt, a.max_tokens) for a in w1]
        out += bf.requests(rng_3, "w3-a", bf.poisson_times(rng_3, flood_rate, seconds))
    return sorted(out, key=lambda a: a.at)


def summarize(bf: object, trace: object, seconds: float) -> dict[str, object]:
    lo = bf.WARM * seconds
    light = [r for r, a in trace.tenant.items() if a == "B" and lo <= trace.arrival[r][0] <= seconds]
    first = {r: trace.first.get(r, trace.end) for r in light}  # censored: the wait so far
    ttft = [1e3 * (first[r][0] - trace.arrival[r][0]) for r in light]
    waits = [float(first[r][1] - trace.arrival[r][1]) for r in light]  # in engine steps: machine-independent
    tokens = dict.fromkeys(SPECS, 0)
    for at, adapter, n in trace.tokens:
        if lo <= at <= seconds:
            tokens[ADAPTERS[adapter]] += n
    flood = max(1, tokens["w1"] + tokens["w3"])
    return {"light_ttft_ms": {"p50": bf.pct(ttft, 50), "p99": bf.pct(ttft, 99)},
            "light_wait_steps": {"p50": bf.pct(waits, 50), "p99": bf.pct(waits, 99)}, "light_requests": len(light),
            "censored": sum(r not in trace.first for r in light), "tokens": tokens,
            "share": {"w1": tokens["w1"] / flood, "w3": tokens["w3"] / flood},
            "preemptions": trace.preemptions, "steps": trace.end[1], "wall_s": trace.end[0]}


def capacity(bf: object, engine: object, seed: int, bursts: int = 3) -> dict[str, float]:
    """Closed-loop bursts of 8 x max_num_seqs requests on one adapter; the median burst's rates."""
    runs = []
    for b in range(bursts):
        work = bf.requests(random.Random(seed + b), "w3-a", [0.0] * (8 * bf.SEQS))
        wall = bf.closed_loop(engine, work)
        runs.append({"req_s": len(work) / wall, "tok_s": sum(a.max_tokens for a in work) / wall})
    return sorted(runs, key=lambda r: r["req_s"])[bursts // 2]


def run_round(bf: object, r: int, model_dir: Path, adapters: dict[str, Path], rates: tuple[float, float],
              seconds: float) -> dict[str, dict]:
    out: dict[str, dict] = {}
    shift = r % len(CASES)
    for case in CASES[shift:] + CASES[:shift]:
        engine = bf.build_engine(model_dir, adapters, "fair")
        work = arrivals(bf, 2000 + r, rates[0], rates[1], seconds, flood=case != "light_alone")
        out[case] = summarize(bf, bf.open_loop(_TenantEngine(engine, case == "tenants"), work, seconds), seconds)
        engine.close()
        s = out[case]
        print(f" round {r + 1} {case:11s}: light TTFT p50 {s['light_ttft_ms']['p50']:8.1f} ms  p99 "
              f"{s['light_ttft_ms']['p99']:8.1f} ms  wait p99 {s['light_wait_steps']['p99']:5.0f} steps  shares w1 "
              f"{s['share']['w1']:.3f} w3 {s['share']['w3']:.3f}  ({s['steps']} steps, {s['wall_s']:.0f} s)",
              flush=True)
    return out


def targets(rounds: list[dict[str, dict]]) -> dict[str, object]:
    ratio = median([rd["tenants"]["light_ttft_ms"]["p99"] / rd["light_alone"]["light_ttft_ms"]["p99"]
                    for rd in rounds])
    shares = {t: median([rd["tenants"]["share"][t] for rd in rounds]) for t in ("w1", "w3")}
    baseline = {t: median([rd["per_adapter"]["share"][t] for rd in rounds]) for t in ("w1", "w3")}
    want = {"w1": 0.25, "w3": 0.75}
    return {"light_ttft_p99_ratio": ratio, "ttft_target": TTFT_TARGET, "ttft_pass": ratio <= TTFT_TARGET,
            "shares": shares, "expected": want, "tolerance": SHARE_TOLERANCE,
            "share_pass": all(abs(shares[t] - want[t]) <= SHARE_TOLERANCE for t in want),
            "per_adapter_shares": baseline}


def main(args: argparse.Namespace) -> None:
    import bench_fairness as bf  # here: bench_fairness imports this module
    import torch

    torch.set_num_threads(1)
    facts = machine_facts("cpu")
    print_facts(facts)
    start = time.perf_counter()
    model_dir = bf.tiny_model_dir()
    adapters = dict(zip(ADAPTERS, bench_adapters(model_dir, "S1", len(ADAPTERS)), strict=True))
    cap = capacity(bf, bf.build_engine(model_dir, adapters, "fair"), seed=7)
    rates = (args.load * cap["req_s"], LIGHT_FRACTION * cap["req_s"])
    print(f"capacity {cap['req_s']:.1f} req/s ({cap['tok_s']:.0f} output tok/s); offered w1 and w3 {rates[0]:.1f} "
          f"req/s each, light {rates[1]:.2f} req/s", flush=True)
    rounds = [run_round(bf, r, model_dir, adapters, rates, args.seconds) for r in range(args.repeats)]
    tgt = targets(rounds)
    print(f"\ntenants: token shares w1 {tgt['shares']['w1']:.3f} (0.25 +- {SHARE_TOLERANCE}), w3 "
          f"{tgt['shares']['w3']:.3f} (0.75 +- {SHARE_TOLERANCE}): {'PASS' if tgt['share_pass'] else 'MISS'}")
    print(f"tenants: light TTFT p99 / alone = {tgt['light_ttft_p99_ratio']:.2f} (<= {TTFT_TARGET:g}): "
          f"{'PASS' if tgt['ttft_pass'] else 'MISS'}")
    print(f"per_adapter (baseline, no target): shares w1 {tgt['per_adapter_shares']['w1']:.3f}, w3 "
          f"{tgt['per_adapter_shares']['w3']:.3f} (each adapter one share: w1's two adapters get two)")
    out = args.out if args.out != RESULTS_DIR / "fairness.json" else DEFAULT_OUT
    write_json(out, {
        "machine": facts, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": "tiny llama (tests/fixtures/tiny_models.py, seed 0)", "adapters": ADAPTERS,
        "tenants": {t: {"weight": s.weight} for t, s in SPECS.items()},
        "engine": {"max_num_seqs": bf.SEQS, "max_batch_tokens": bf.BATCH_TOKENS, "block_size": bf.BLOCK_SIZE},
        "capacity": cap, "offered_req_s": {"w1": rates[0], "w3": rates[0], "light": rates[1]},
        "wall_s": round(time.perf_counter() - start, 1), "targets": tgt, "rounds": rounds})
