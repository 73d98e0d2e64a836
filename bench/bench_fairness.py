"""Fairness benchmark (BENCHMARK.md: tenant B's TTFT p99 while tenant A offers 10x B's load above capacity
÷ B alone <= 2): the in-process `LLMEngine`, open-loop Poisson arrivals in wall-clock time.

Two tenants, each with its own S1 adapter (rank 8 on q/k/v/o), on the tiny llama test model
(tests/fixtures/tiny_models.py: hidden 64, 2 layers, seeded random weights). Its step time barely grows with the batch
(as a GPU's at small batch), so B's TTFT ratio shows the scheduler's wait rather than a CPU's compute per
extra sequence; bench-small takes ~0.4 s a step on 2 cores, too slow for hundreds of B requests per run.

Capacity: a closed-loop burst of 4 x max_num_seqs requests of A, measured once per run. Offered load:
`--load` x capacity (default 1.5), split 10:1 between A and B. Every request: prompt of uniform [8, 64)
seeded token ids, uniform [8, 64) new tokens, greedy, EOS ignored. Cases per round, in a rotating order:

  b_alone  B's arrivals only: the reference
  fair     A + B, scheduling policy fair (the default)
  fcfs     A + B, scheduling policy fcfs

B's arrivals are identical in the three cases of a round (one seed per round). Arrivals run for `--seconds`;
then stepping goes on (no new arrivals) until every B request has its first token, for at most half as long
again; a B request still waiting then counts its wait so far and is reported as censored. Statistics cover
the steady-state window [20 % of --seconds, --seconds]: TTFT of the B requests that arrived in it (first
token's step end minus the scheduled arrival, so the wait for the step in progress counts), the same wait in
engine steps (machine-independent), and the output tokens each tenant got in it (its token share).

Targets (PASS/MISS, on the medians of the per-round values):
  B's TTFT p99 with A flooding (fair) ÷ B alone <= 2;
  B's token share (fair) >= its fair share = min(B's demand, 1/2), where B's demand = B's tokens in the
  window when alone ÷ all tokens served in the window with A; less one mean B request (a window's edge cuts
  a request or two).
The fcfs case is the baseline, shown without a target.

Run: .venv/bin/python bench/bench_fairness.py [--seconds 30] [--repeats 3] [--load 1.5]
Writes bench/results/fairness.json and fairness.png (the PNG when matplotlib, the `bench` extra, is installed).

`--tenants` runs weighted fair share by tenant instead (bench/fairness_tenants.py: tenants of weights 1 and 3
flooding, a light one's TTFT): .venv/bin/python bench/bench_fairness.py --tenants [--seconds 30] [--repeats 3]

`--http` runs the flood over HTTP instead (bench/fairness_http.py: a real server on SmolLM2, tenant A flooding
from its own process): .venv/bin/python bench/bench_fairness.py --http [--http-seconds 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: see bench/README.md, one intra-op thread

import fairness_http  # noqa: E402
import fairness_tenants  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    _build_once,
    bench_adapters,
    cache_root,
    machine_facts,
    median,
    print_facts,
    pyplot,
    write_json,
)
from tiny_models import build_model_dir  # noqa: E402

from loraplex.adapters.weights import load_adapter_dir  # noqa: E402
from loraplex.server.config import LoRAConfig, ModelConfig  # noqa: E402
from loraplex.server.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from loraplex.server.engine.request import Request  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402
from loraplex.server.engine.scheduler import SchedulerConfig  # noqa: E402
from loraplex.server.model_loader import load_model  # noqa: E402

SEQS = 16
BATCH_TOKENS = 256
BLOCK_SIZE = 16
PROMPT = (8, 64)
OUTPUT = (8, 64)
MAX_LEN = PROMPT[1] + OUTPUT[1]
MAX_RANK = 16
A_TO_B = 10.0
FIRST_TOKEN_ID = 3  # ids 0..2 are the tiny tokenizer's special tokens
WARM = 0.2  # the first 20 % of the arrival period is warm-up
CASES = ("b_alone", "fair", "fcfs")
TTFT_TARGET = 2.0


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the run's start
    tenant: str  # "A" or "B" (also the adapter's name)
    prompt: list[int]
    max_tokens: int


@dataclass
class Trace:
    """What one run saw: per request its tenant, arrival and first token (time and step), per step the
    output tokens per tenant."""

    tenant: dict[str, str] = field(default_factory=dict)
    arrival: dict[str, tuple[float, int]] = field(default_factory=dict)  # id -> (seconds, steps done)
    first: dict[str, tuple[float, int]] = field(default_factory=dict)
    tokens: list[tuple[float, str, int]] = field(default_factory=list)  # (seconds, tenant, output tokens)
    preemptions: int = 0
    recomputed: int = 0  # context tokens the preempted requests must compute again
    end: tuple[float, int] = (0.0, 0)


# ---- setup ---------------------------------------------------------------------------------------------------
def tiny_model_dir() -> Path:
    return _build_once(cache_root() / "tiny-llama-s0", lambda d: build_model_dir(d, "llama", seed=0))


def build_engine(model_dir: Path, adapters: dict[str, Path], policy: str) -> LLMEngine:
    loaded = load_model(ModelConfig(path=model_dir, dtype="float32", device="cpu"))
    cfg = EngineConfig(
        max_model_len=MAX_LEN, block_size=BLOCK_SIZE,
        num_kv_blocks=SEQS * -(-MAX_LEN // BLOCK_SIZE) + SEQS,  # every sequence's whole context: no KV preemption
        scheduler=SchedulerConfig(max_num_seqs=SEQS, max_batch_tokens=BATCH_TOKENS, policy=policy),
        lora=LoRAConfig(max_loras=len(adapters), max_lora_rank=MAX_RANK, max_cpu_loras=len(adapters)),
    )
    holder: list[LLMEngine] = []
    engine = LLMEngine(loaded, cfg, lambda name: load_adapter_dir(
        adapters[name], holder[0].lora.module_shapes(), max_rank=MAX_RANK))
    holder.append(engine)
    warm = [Arrival(0.0, t, list(range(FIRST_TOKEN_ID, FIRST_TOKEN_ID + 8)), 4) for t in adapters]
    closed_loop(engine, warm)  # loads both adapters into their slots before any timing
    return engine


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def requests(rng: random.Random, tenant: str, times: list[float]) -> list[Arrival]:
    vocab = 512
    return [Arrival(t, tenant, [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(rng.randrange(*PROMPT))],
                    rng.randrange(*OUTPUT)) for t in times]


def poisson_times(rng: random.Random, rate: float, seconds: float) -> list[float]:
    times, at = [], rng.expovariate(rate)
    while at < seconds:
        times.append(at)
        at += rng.expovariate(rate)
    return times


def arrivals(seed: int, rate_a: float, rate_b: float, seconds: float, with_a: bool) -> list[Arrival]:
    """B's arrivals depend on `seed` only, so every case of a round sees the same ones."""
    rng_b, rng_a = random.Random(seed), random.Random(seed + 1)
    out = requests(rng_b, "B", poisson_times(rng_b, rate_b, seconds))
    if with_a:
        out += requests(rng_a, "A", poisson_times(rng_a, rate_a, seconds))
    return sorted(out, key=lambda a: a.at)


# ---- driving the engine ----------------------------------------------------------------------------------------
def closed_loop(engine: LLMEngine, work: list[Arrival]) -> float:
    """Add everything at once, step until done; returns the wall seconds."""
    t0 = time.perf_counter()
    for i, a in enumerate(work):
        engine.add_request(f"c{t0}-{i}", a.prompt, _params(a.max_tokens), a.tenant)
    while engine.has_work():
        if not engine.step().computed:  # everyone waits on an adapter load (a background thread)
            time.sleep(0.001)
    return time.perf_counter() - t0


def measure_capacity(engine: LLMEngine, seed: int, bursts: int = 3) -> dict[str, float]:
    """Closed-loop bursts of 8 x max_num_seqs requests; the median burst's rates."""
    runs = []
    for b in range(bursts):
        work = requests(random.Random(seed + b), "A", [0.0] * (8 * SEQS))
        wall = closed_loop(engine, work)
        runs.append({"req_s": len(work) / wall, "tok_s": sum(a.max_tokens for a in work) / wall, "wall_s": wall})
    return sorted(runs, key=lambda r: r["req_s"])[bursts // 2] | {"bursts_req_s": [r["req_s"] for r in runs]}


def open_loop(engine: LLMEngine, work: list[Arrival], seconds: float) -> Trace:
    """Add each request at its arrival time and step the engine in between; see the module docstring."""
    trace, t0, i, steps = Trace(), time.perf_counter(), 0, 0
    engine.scheduler.on_preempt = lambda r: _count_preemption(trace, r)
    while True:
        now = time.perf_counter() - t0
        i = _admit_due(engine, work, i, now, steps, trace)
        if i == len(work) and (not _b_waiting(trace) or now > 1.5 * seconds):
            break
        if not engine.has_work():
            time.sleep(max(0.0, work[i].at - now) if i < len(work) else 0.001)
            continue
        step = engine.step()
        steps += 1
        _record(trace, step.outputs, time.perf_counter() - t0, steps)
        if not step.computed:
            time.sleep(0.001)
    trace.end = (time.perf_counter() - t0, steps)
    return trace


def _count_preemption(trace: Trace, req: Request) -> None:
    trace.preemptions += 1
    trace.recomputed += req.num_tokens - 1  # its context up to the token it is about to sample


def _admit_due(engine: LLMEngine, work: list[Arrival], i: int, now: float, steps: int, trace: Trace) -> int:
    while i < len(work) and work[i].at <= now:
        a, rid = work[i], f"r{i}"
        engine.add_request(rid, a.prompt, _params(a.max_tokens), a.tenant)
        trace.tenant[rid], trace.arrival[rid] = a.tenant, (a.at, steps)
        i += 1
    return i


def _record(trace: Trace, outs: list, now: float, steps: int) -> None:
    per_tenant: dict[str, int] = {}
    for o in outs:
        if o.new_token_ids and o.request_id not in trace.first:
            trace.first[o.request_id] = (now, steps)
        tenant = trace.tenant[o.request_id]
        per_tenant[tenant] = per_tenant.get(tenant, 0) + len(o.new_token_ids)
    trace.tokens += [(now, t, n) for t, n in per_tenant.items()]


def _b_waiting(trace: Trace) -> bool:
    return any(t == "B" and rid not in trace.first for rid, t in trace.tenant.items())


# ---- statistics --------------------------------------------------------------------------------------------------
def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(trace: Trace, seconds: float) -> dict[str, object]:
    lo = WARM * seconds
    b_ids = [r for r, t in trace.tenant.items() if t == "B" and lo <= trace.arrival[r][0] <= seconds]
    first = {r: trace.first.get(r, trace.end) for r in b_ids}  # censored: the wait so far
    ttft = [1e3 * (first[r][0] - trace.arrival[r][0]) for r in b_ids]
    waits = [float(first[r][1] - trace.arrival[r][1]) for r in b_ids]
    tokens = {t: sum(n for at, tt, n in trace.tokens if tt == t and lo <= at <= seconds) for t in ("A", "B")}
    total = max(1, tokens["A"] + tokens["B"])
    served = sum(n for at, _, n in trace.tokens if lo <= at <= seconds)  # output tokens, both tenants
    return {"served_tok_s": served / (seconds - lo), "recomputed_tokens": trace.recomputed,
            "b_requests": len(b_ids), "censored": sum(r not in trace.first for r in b_ids),
            "b_ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "b_wait_steps": {"p50": pct(waits, 50), "p99": pct(waits, 99)},
            "tokens": tokens, "share": {t: n / total for t, n in tokens.items()},
            "preemptions": trace.preemptions, "steps": trace.end[1], "wall_s": trace.end[0]}


def fair_share(alone: dict, flooded: dict, mean_out: float) -> dict[str, float]:
    """B's fair share of what the engine served with A: min(B's demand, 1/2), and the allowance of one
    mean B request for the window's edges."""
    total = max(1, sum(flooded["tokens"].values()))
    demand = alone["tokens"]["B"] / total
    return {"demand": demand, "fair_share": min(demand, 0.5), "allowance": mean_out / total}


# ---- the run -----------------------------------------------------------------------------------------------------
def run_round(r: int, model_dir: Path, adapters: dict[str, Path], rates: tuple[float, float],
              seconds: float) -> dict[str, dict]:
    out: dict[str, dict] = {}
    shift = r % len(CASES)
    for case in CASES[shift:] + CASES[:shift]:
        engine = build_engine(model_dir, adapters, "fcfs" if case == "fcfs" else "fair")
        work = arrivals(1000 + r, rates[0], rates[1], seconds, with_a=case != "b_alone")
        out[case] = summarize(open_loop(engine, work, seconds), seconds)
        engine.close()
        s = out[case]
        print(f" round {r + 1} {case:8s}: B TTFT p50 {s['b_ttft_ms']['p50']:8.1f} ms  p99 "
              f"{s['b_ttft_ms']['p99']:8.1f} ms  B share {s['share']['B']:.3f}  ({s['wall_s']:.0f} s)", flush=True)
    return out


def targets(rounds: list[dict[str, dict]]) -> dict[str, dict[str, object]]:
    mean_out = sum(OUTPUT) / 2
    res: dict[str, dict[str, object]] = {}
    for case in ("fair", "fcfs"):
        ratio = median([rd[case]["b_ttft_ms"]["p99"] / rd["b_alone"]["b_ttft_ms"]["p99"] for rd in rounds])
        shares = [fair_share(rd["b_alone"], rd[case], mean_out) for rd in rounds]
        share = median([rd[case]["share"]["B"] for rd in rounds])
        fair, allowance = median([s["fair_share"] for s in shares]), median([s["allowance"] for s in shares])
        res[case] = {"ttft_p99_ratio": ratio, "ttft_target": TTFT_TARGET, "ttft_pass": ratio <= TTFT_TARGET,
                     "b_share": share, "b_fair_share": fair, "allowance": allowance,
                     "share_pass": share >= fair - allowance}
    return res


def medians(rounds: list[dict[str, dict]], case: str) -> dict[str, float]:
    def m(get: Callable[[dict], float]) -> float:
        return median([get(rd[case]) for rd in rounds])

    return {"b_ttft_p50_ms": m(lambda s: s["b_ttft_ms"]["p50"]), "b_ttft_p99_ms": m(lambda s: s["b_ttft_ms"]["p99"]),
            "b_wait_steps_p50": m(lambda s: s["b_wait_steps"]["p50"]),
            "b_wait_steps_p99": m(lambda s: s["b_wait_steps"]["p99"]),
            "b_share": m(lambda s: s["share"]["B"]), "a_share": m(lambda s: s["share"]["A"]),
            "preemptions": m(lambda s: s["preemptions"]), "censored": m(lambda s: s["censored"]),
            "b_requests": m(lambda s: s["b_requests"]), "served_tok_s": m(lambda s: s["served_tok_s"]),
            "recomputed_tokens": m(lambda s: s["recomputed_tokens"])}


COLUMNS = (  # (header, width, format of one table cell)
    ("case", 8, "{case:8s}"), ("B TTFT p50", 11, "{b_ttft_p50_ms:8.1f} ms"),
    ("B TTFT p99", 11, "{b_ttft_p99_ms:8.1f} ms"),
    ("B wait p50", 11, "{b_wait_steps_p50:5.0f} steps"), ("B wait p99", 11, "{b_wait_steps_p99:5.0f} steps"),
    ("B share", 8, "{b_share:8.3f}"), ("A share", 8, "{a_share:8.3f}"), ("served", 13, "{served_tok_s:7.0f} tok/s"),
    ("preempt", 8, "{preemptions:8.0f}"), ("recomputed", 10, "{recomputed_tokens:10.0f}"),
    ("censored", 8, "{censored:8.0f}"), ("B reqs", 7, "{b_requests:7.0f}"),
)


def print_report(table: dict[str, dict[str, float]], tgt: dict[str, dict[str, object]]) -> None:
    head = " ".join(f"{h:>{w}s}" if i else f"{h:{w}s}" for i, (h, w, _) in enumerate(COLUMNS))
    print("\n" + head + "\n" + "-" * len(head))
    for case, row in table.items():
        print(" ".join(fmt.format(case=case, **row) for _, _, fmt in COLUMNS))
    print("(B wait: engine steps from arrival to first token; preempt / recomputed: fairness preemptions of A's "
          "requests and the context tokens they compute again, per run)\n")
    for case, t in tgt.items():
        note = "target" if case == "fair" else "baseline, no target"
        print(f"{case} ({note}): B TTFT p99 / alone = {t['ttft_p99_ratio']:.2f} (<= {TTFT_TARGET:g}: "
              f"{'PASS' if t['ttft_pass'] else 'MISS'});  B token share {t['b_share']:.4f} >= fair share "
              f"{t['b_fair_share']:.4f} - {t['allowance']:.4f}: {'PASS' if t['share_pass'] else 'MISS'}")


def plot(path: Path, table: dict[str, dict[str, float]], tgt: dict[str, dict[str, object]], title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    _ttft_bars(left, table)
    flooded = [c for c in table if c != "b_alone"]
    bars = right.bar(flooded, [table[c]["b_share"] for c in flooded], 0.5, color="tab:blue")
    right.bar_label(bars, fmt="%.3f", fontsize=8)
    fair = float(tgt["fair"]["b_fair_share"])
    right.axhline(fair, ls="--", color="black", lw=1, label=f"B's fair share {fair:.3f}")
    right.legend(fontsize=8, loc="upper right")
    right.set_ylim(0, 1.6 * max(fair, *(table[c]["b_share"] for c in flooded)))
    right.set_ylabel("B's share of the output tokens (A has the rest)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _ttft_bars(ax: object, table: dict[str, dict[str, float]]) -> None:
    cases = list(table)
    xs = range(len(cases))
    for off, key in ((-0.2, "b_ttft_p50_ms"), (0.2, "b_ttft_p99_ms")):
        bars = ax.bar([x + off for x in xs], [table[c][key] for c in cases], 0.4, label=key[7:10])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), cases)
    ax.set_ylabel("B's TTFT (ms, log)")
    ax.legend(fontsize=8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="arrival period of each run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (medians of per-round values, >= 3)")
    parser.add_argument("--load", type=float, default=1.5, help="offered load (A + B) as a multiple of capacity")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/fairness[_http].json")
    fairness_http.add_arguments(parser)
    fairness_tenants.add_arguments(parser)
    args = parser.parse_args()
    args.out = args.out or (fairness_http.DEFAULT_OUT if args.http else RESULTS_DIR / "fairness.json")
    if args.repeats < 3:
        parser.error("--repeats: the protocol asks for a median of >= 3 rounds")
    if args.load <= 1.0:
        parser.error("--load: the benchmark is about an engine above capacity (> 1)")
    return args


def main() -> None:
    args = parse_args()
    if args.http:
        fairness_http.main(args)
        return
    if args.tenants:
        fairness_tenants.main(args)
        return
    torch.set_num_threads(1)
    facts = machine_facts("cpu")
    print_facts(facts)
    start = time.perf_counter()
    model_dir = tiny_model_dir()
    a_dir, b_dir = bench_adapters(model_dir, "S1", 2)
    adapters = {"A": a_dir, "B": b_dir}
    capacity = measure_capacity(build_engine(model_dir, adapters, "fair"), seed=7)
    total = args.load * capacity["req_s"]
    rates = (total * A_TO_B / (A_TO_B + 1), total / (A_TO_B + 1))
    print(f"capacity {capacity['req_s']:.1f} req/s ({capacity['tok_s']:.0f} output tok/s); offered A "
          f"{rates[0]:.1f} req/s, B {rates[1]:.2f} req/s", flush=True)
    rounds = [run_round(r, model_dir, adapters, rates, args.seconds) for r in range(args.repeats)]
    table = {case: medians(rounds, case) for case in CASES}
    tgt = targets(rounds)
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_report(table, tgt)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {
        "machine": facts,
        "settings": settings, "model": "tiny llama (tests/fixtures/tiny_models.py, seed 0)", "adapters": "S1 x 2",
        "engine": {"max_num_seqs": SEQS, "max_batch_tokens": BATCH_TOKENS, "block_size": BLOCK_SIZE},
        "prompt_tokens": PROMPT, "new_tokens": OUTPUT, "capacity": capacity,
        "offered_req_s": {"A": rates[0], "B": rates[1]}, "wall_s": round(time.perf_counter() - start, 1),
        "summary": table, "targets": tgt, "rounds": rounds})
    title = (f"tiny llama, A offers {A_TO_B:g}x B, together {args.load:g}x capacity; "
             f"medians of {args.repeats} rounds")
    plot(args.out.with_suffix(".png"), table, tgt, title)


if __name__ == "__main__":
    main()
