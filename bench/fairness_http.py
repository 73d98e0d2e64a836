"""Fairness over HTTP (BENCHMARK.md: "A floods from its own process (16 streams, --max-num-seqs 4), B sequential:
TTFT p99 / max ÷ alone <= 3 / <= 10"): a real `loraplex serve` of bench-small (SmolLM2-135M-Instruct and its
demo adapters), fp32 on the CPU.

Tenant A (adapter `pirate`) floods from its own process: 16 streamed requests of 300 new tokens always in
flight (a finished one is replaced at once). Tenant B (adapter `json`) sends requests of 4 new tokens one
after another, streamed through TGI's `/generate_stream` (one event per token, so TTFT is exact). Server
flags: --max-num-seqs 4 --max-batch-tokens 512 --num-kv-blocks 256 --max-model-len 512, the policy under test.

Cases per round, in a rotating order, each `--http-seconds` of B's requests (the first 10 % is warm-up):
  b_alone  B alone (policy fair)
  fair     A flooding + B, --scheduling-policy fair
  fcfs     A flooding + B, --scheduling-policy fcfs
Reported per case: B's TTFT p50 / p99 / max, B's time from first to last token (p99, max), B's requests, A's
output tokens per second (A is served, not starved). Targets on medians over rounds: fair p99 ÷ alone <= 3,
fair max ÷ alone <= 10. fcfs is the baseline, shown without a target.

Run: .venv/bin/python bench/bench_fairness.py --http [--http-seconds 60] [--repeats 3]
Writes bench/results/fairness_http.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import RESULTS_DIR, ServerProcess, machine_facts, median, print_facts, write_json

A_ADAPTER, B_ADAPTER = "pirate", "json"
A_STREAMS, A_TOKENS, B_TOKENS = 16, 300, 4
SEQS = 4
SERVER_FLAGS = ["--max-num-seqs", str(SEQS), "--max-batch-tokens", "512", "--num-kv-blocks", "256",
                "--max-model-len", "512"]
A_PROMPT = "Tell me a long story about a ship, its crew and the sea, with many details about every sailor."
B_PROMPT = "What is the capital of France?"
CASES = ("b_alone", "fair", "fcfs")
WARM = 0.1
TARGETS = {"p99": 3.0, "max": 10.0}


# ---- tenant A: the flood, in its own process -----------------------------------------------------------
def flood(url: str, out: Path) -> None:
    """Keep A_STREAMS streamed requests of A_TOKENS in flight until SIGTERM; write the tokens received."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counts = [0] * A_STREAMS
    body = {"inputs": A_PROMPT, "parameters": {"adapter_id": A_ADAPTER, "max_new_tokens": A_TOKENS,
                                               "do_sample": False, "ignore_eos_token": True}}

    def stream(i: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
            while not stop.is_set():
                try:
                    with client.stream("POST", url + "/generate_stream", json=body) as resp:
                        for line in resp.iter_lines():
                            if stop.is_set():
                                return
                            counts[i] += line.startswith("data:")
                except httpx.HTTPError:
                    time.sleep(0.1)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(A_STREAMS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    stop.wait()
    out.write_text(json.dumps({"tokens": sum(counts), "seconds": time.monotonic() - t0}))


def start_flood(url: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--flood", url, "--flood-out", str(out)])


def stop_flood(proc: subprocess.Popen, out: Path) -> dict[str, float]:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    data = json.loads(out.read_text())
    return {"a_tok_s": data["tokens"] / data["seconds"]}


# ---- tenant B: sequential short requests --------------------------------------------------------------
def b_request(client: httpx.Client, url: str) -> tuple[float, float]:
    """(TTFT, first-to-last-token seconds) of one streamed B request."""
    body = {"inputs": B_PROMPT, "parameters": {"adapter_id": B_ADAPTER, "max_new_tokens": B_TOKENS,
                                               "do_sample": False, "ignore_eos_token": True}}
    t0 = time.perf_counter()
    first = last = None
    with client.stream("POST", url + "/generate_stream", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data:"):
                last = time.perf_counter()
                first = first or last
    if first is None:
        raise RuntimeError("B's stream ended without a token")
    return first - t0, last - first


def b_sequence(url: str, seconds: float) -> list[tuple[float, float, float]]:
    """(start offset, TTFT, rest) of B's requests sent one after another for `seconds`."""
    out = []
    t0 = time.perf_counter()
    with httpx.Client(timeout=httpx.Timeout(900.0)) as client:
        while (start := time.perf_counter() - t0) < seconds:
            ttft, rest = b_request(client, url)
            out.append((start, ttft, rest))
    return out


# ---- a case, a round, the report ----------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def run_case(case: str, seconds: float, work: Path) -> dict[str, float]:
    policy = "fcfs" if case == "fcfs" else "fair"
    server = ServerProcess([*SERVER_FLAGS, "--scheduling-policy", policy], work / f"server-{case}.log")
    try:
        flood_out = work / f"flood-{case}.json"
        proc = start_flood(server.url, flood_out) if case != "b_alone" else None
        if proc is not None:
            time.sleep(5.0)  # A's 16 streams are in flight before B starts
        samples = b_sequence(server.url, seconds)
        a = stop_flood(proc, flood_out) if proc is not None else {"a_tok_s": 0.0}
    finally:
        server.stop()
    kept = [s for s in samples if s[0] >= WARM * seconds]
    ttft, rest = [s[1] for s in kept], [s[2] for s in kept]
    return {"b_requests": len(kept), "ttft_p50": statistics.median(ttft), "ttft_p99": pct(ttft, 99),
            "ttft_max": max(ttft), "rest_p99": pct(rest, 99), "rest_max": max(rest), **a}


def run_round(r: int, seconds: float, work: Path) -> dict[str, dict[str, float]]:
    order = CASES[r % 3:] + CASES[: r % 3]
    out = {}
    for case in order:
        out[case] = run_case(case, seconds, work)
        m = out[case]
        print(f"round {r} {case:8s} B: {m['b_requests']:4d} requests, TTFT p50 {m['ttft_p50'] * 1e3:7.0f} ms, "
              f"p99 {m['ttft_p99'] * 1e3:7.0f} ms, max {m['ttft_max'] * 1e3:7.0f} ms, rest max "
              f"{m['rest_max'] * 1e3:6.0f} ms; A {m['a_tok_s']:.1f} tok/s", flush=True)
    return out


def targets(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, object]]:
    out = {}
    for case in ("fair", "fcfs"):
        for stat in ("p99", "max"):
            ratio = median([r[case][f"ttft_{stat}"] / r["b_alone"][f"ttft_{stat}"] for r in rounds])
            entry: dict[str, object] = {"value": round(ratio, 2)}
            if case == "fair":
                entry.update(target=TARGETS[stat], verdict="PASS" if ratio <= TARGETS[stat] else "MISS")
            out[f"{case}_ttft_{stat}_over_alone"] = entry
    return out


def main(args: argparse.Namespace) -> None:
    facts = machine_facts("cpu")
    print_facts(facts)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fairness-http-") as tmp:
        rounds = [run_round(r, args.http_seconds, Path(tmp)) for r in range(args.repeats)]
    table = {case: {k: median([r[case][k] for r in rounds]) for k in rounds[0][case]} for case in CASES}
    tgt = targets(rounds)
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\n{'case':8s} {'TTFT p50':>9s} {'p99':>8s} {'max':>8s} {'rest max':>9s} {'A tok/s':>8s}  (medians, ms)")
    for case in CASES:
        m = table[case]
        print(f"{case:8s} {m['ttft_p50'] * 1e3:9.0f} {m['ttft_p99'] * 1e3:8.0f} {m['ttft_max'] * 1e3:8.0f} "
              f"{m['rest_max'] * 1e3:9.0f} {m['a_tok_s']:8.1f}")
    for name, t in tgt.items():
        verdict = f"  target <= {t['target']:g}: {t['verdict']}" if "target" in t else "  (baseline)"
        print(f"{name:28s} {t['value']:7.2f}{verdict}")
    write_json(args.out, {
        "machine": facts, "command": " ".join(sys.argv), "settings": {"http_seconds": args.http_seconds,
                                                                        "repeats": args.repeats},
        "server_flags": SERVER_FLAGS, "tenants": {"A": {"adapter": A_ADAPTER, "streams": A_STREAMS,
                                                        "new_tokens": A_TOKENS},
                                                  "B": {"adapter": B_ADAPTER, "new_tokens": B_TOKENS}},
        "wall_s": round(time.perf_counter() - start, 1), "summary": table, "targets": tgt, "rounds": rounds})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--flood", required=True)
    parser.add_argument("--flood-out", type=Path, required=True)
    ns = parser.parse_args()
    flood(ns.flood, ns.flood_out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http", action="store_true", help="the HTTP flood (bench/fairness_http.py) instead")
    parser.add_argument("--http-seconds", type=float, default=60.0, help="B's requests per case (--http)")


DEFAULT_OUT = RESULTS_DIR / "fairness_http.json"
