"""HTTP benchmark (issue "HTTP API and observability"): a real `loraplex serve` on 127.0.0.1, bench-small fp32 CPU.

1. overhead  Closed loop at concurrency 32, same model, same requests (seeded token-id prompts of 16-32
             tokens, 32 new tokens, greedy, ignore_eos, base model): output tok/s over HTTP
             (`POST /v1/completions`, non-streaming) divided by the in-process AsyncEngine built from the
             same flags (`configs_from_args` + `Runtime`). Target >= 0.9. bench-small, not a tiny model, so
             a step costs real compute (~0.4 s at B=32 here) and the server is not trivially overhead-bound;
             the HTTP client runs on the same 2 cores as the server, so its CPU counts against HTTP.
2. open loop Poisson arrivals over HTTP at 0.25x..1.25x the measured base-only capacity (closed loop at
             concurrency 32, same route and length distribution), n in {5, 100} registered S1 adapters,
             popularity floor(power(0.3) * n). Streamed through TGI's `POST /generate_stream` (one event per
             token, so TTFT and TPOT are exact; the OpenAI stream sends a chunk only when text appears, and
             bench-small's 512-entry tokenizer decodes most of its 49152 ids to nothing). Input/output lengths
             uniform [8, 64) / [8, 32) tokens instead of [8, 128): scaled down for a 2-core CPU.
             Reports req/s, output tok/s, TTFT and TPOT p50/p99, per-tier cache hits/misses from /metrics,
             disk loads/s and MB/s, and a latency plot. Each rate sends a fixed number of requests (at most
             `--window` seconds of arrivals).

Both runs use one intra-op thread per process (OMP_NUM_THREADS=1, see bench_adapters.py: the shared machine's
OpenMP stragglers otherwise dominate). Server flags: --max-num-seqs 32 --max-batch-tokens 512 --block-size 16
--num-kv-blocks 320 --max-model-len 128 --max-loras 8 --max-cpu-loras 32 (the CLI's LoRA defaults).

Run: .venv/bin/python bench/bench_http.py [--quick] [--parts overhead openloop]
Writes bench/results/http.json and bench/results/http.png (http_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads; see the module docstring

import httpx  # noqa: E402
from bench_adapters import popular, print_machine, run_parts, synth_adapters  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    ServerProcess,
    bench_small_dir,
    median,
    paired_ratio,
    pyplot,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

from loraplex.server.cli import build_parser, configs_from_args  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402
from loraplex.server.runtime import Runtime  # noqa: E402

CONCURRENCY = 32
BASE_NAME = "bench-small"
FIRST_TOKEN_ID = 3  # ids 0..2 are the special tokens of the bench tokenizer
TARGET_OVERHEAD = 0.9
LOADS = (0.25, 0.5, 0.75, 1.0, 1.25)
SERVER_FLAGS = ("--device", "cpu", "--dtype", "float32", "--served-model-name", BASE_NAME, "--max-num-seqs",
                str(CONCURRENCY), "--max-batch-tokens", "512", "--block-size", "16", "--num-kv-blocks", "320",
                "--max-model-len", "128", "--max-loras", "8", "--max-cpu-loras", "32", "--max-lora-rank", "16",
                "--log-level", "warning")
_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


@dataclass(frozen=True)
class Req:
    prompt: list[int]
    max_tokens: int
    adapter: str | None = None
    text: str = ""  # the prompt as text, for TGI's `inputs` (decoded from in-vocabulary ids)


@dataclass(frozen=True)
class OpenWork:
    requests: int  # per rate
    window_s: float  # at most this many seconds of arrivals per rate
    prompt: tuple[int, int] = (8, 64)
    output: tuple[int, int] = (8, 32)


def make_requests(seed: int, count: int, prompt: tuple[int, int], out: tuple[int, int], vocab: int) -> list[Req]:
    """Seeded prompts of token ids; lengths uniform in [lo, hi) (hi exclusive, as BENCHMARK.md writes it)."""
    rng = random.Random(seed)
    return [Req([rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(rng.randrange(*prompt))], rng.randrange(*out))
            for _ in range(count)]


def text_requests(seed: int, count: int, work: OpenWork, tokenizer: PreTrainedTokenizerBase) -> list[Req]:
    """Text prompts for TGI's `inputs` with an exact token length: the text decodes twice as many random
    in-vocabulary ids as wanted (random byte-level ids re-encode to at least as many tokens), and TGI's
    `truncate` keeps the last `len(prompt)` tokens of it."""
    rng, out = random.Random(seed), []
    for _ in range(count):
        n = rng.randrange(*work.prompt)
        text = tokenizer.decode([rng.randrange(FIRST_TOKEN_ID, len(tokenizer)) for _ in range(2 * n)])
        ids = tokenizer(text).input_ids
        if len(ids) < n:
            raise RuntimeError(f"prompt text encodes to {len(ids)} tokens, fewer than the {n} wanted")
        out.append(Req(ids[-n:], rng.randrange(*work.output), text=text))
    return out


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---- the server --------------------------------------------------------------------------------------------
class Server(ServerProcess):
    """The benchmark's server, with adapter registration and the cache metrics it reads."""

    def __init__(self, model_dir: Path, adapter_root: Path, state_dir: Path) -> None:
        super().__init__(["--model", str(model_dir), "--state-dir", str(state_dir), "--adapter-root",
                          str(adapter_root), *SERVER_FLAGS], state_dir.parent / "server.log")

    def register(self, names_paths: list[tuple[str, str]]) -> None:
        with httpx.Client(base_url=self.url, timeout=_TIMEOUT) as client:
            for name, path in names_paths:
                r = client.post("/v1/adapters", json={"name": name, "path": path})
                if r.status_code != 201:
                    raise RuntimeError(f"registering {name} failed: {r.status_code} {r.text[:300]}")

    def metrics(self) -> dict[str, float]:
        """{'family{labels}': value} of the loraplex_adapter_* series."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(loraplex_adapter_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}



# ---- clients: HTTP and in-process ----------------------------------------------------------------------------
def completion_body(req: Req, stream: bool) -> dict[str, object]:
    body = {"model": req.adapter or BASE_NAME, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def http_complete(client: httpx.AsyncClient, req: Req) -> int:
    r = await client.post("/v1/completions", json=completion_body(req, stream=False))
    if r.status_code != 200:
        raise RuntimeError(f"completion failed: {r.status_code} {r.text[:300]}")
    return r.json()["usage"]["completion_tokens"]


def tgi_body(req: Req) -> dict[str, object]:
    return {"inputs": req.text, "parameters": {"adapter_id": req.adapter, "max_new_tokens": req.max_tokens,
                                               "truncate": len(req.prompt), "ignore_eos_token": True,
                                               "details": True}}


async def http_stream(client: httpx.AsyncClient, req: Req) -> dict[str, float]:
    """One `/generate_stream` request: TTFT (first token event), time per later token, output tokens.

    TGI's stream sends one event per token. (The OpenAI stream sends a chunk only when text appears, and
    bench-small's tokenizer has 512 entries for a 49152-row LM head: most sampled ids decode to nothing.)
    """
    start, first, last, tokens = time.perf_counter(), None, None, 0
    async with client.stream("POST", "/generate_stream", json=tgi_body(req)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"stream failed: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            first, last, tokens = first or time.perf_counter(), time.perf_counter(), tokens + 1
    if tokens != req.max_tokens:
        raise RuntimeError(f"stream returned {tokens} tokens, expected {req.max_tokens}")
    return {"ttft": first - start, "e2e": last - start, "tokens": tokens,
            "tpot": (last - first) / (tokens - 1) if tokens > 1 else float("nan")}


async def closed_loop(send, reqs: list[Req], concurrency: int) -> dict[str, float]:
    """Keep `concurrency` requests in flight; `send(req)` returns its output token count."""
    queue = list(reversed(reqs))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            n = await send(queue.pop())  # not `tokens += await ...`: that reads `tokens` before the await
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    return {"tok_s": tokens / seconds, "req_s": len(reqs) / seconds, "seconds": seconds, "tokens": tokens}


async def http_closed_loop(url: str, reqs: list[Req], concurrency: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=_TIMEOUT, limits=limits) as client:
        return await closed_loop(lambda r: http_complete(client, r), reqs, concurrency)


class InProcess:
    """The engine `loraplex serve` would build from SERVER_FLAGS, driven in this process (no HTTP)."""

    def __init__(self, model_dir: Path, state_dir: Path) -> None:
        args = build_parser().parse_args(["serve", "--model", str(model_dir), "--state-dir", str(state_dir),
                                          *SERVER_FLAGS])
        self.runtime = Runtime(configs_from_args(args))
        self.runtime.load()
        if self.runtime.engine is None:
            raise RuntimeError(f"in-process runtime failed to start: {self.runtime.load_error}")

    async def complete(self, req: Req) -> int:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
        n = 0
        async for out in self.runtime.engine.generate(req.prompt, params, req.adapter):
            if out.error:
                raise RuntimeError(out.error)
            n += len(out.new_token_ids)
        return n

    def closed_loop(self, reqs: list[Req], concurrency: int) -> dict[str, float]:
        return asyncio.run(closed_loop(self.complete, reqs, concurrency))

    def close(self) -> None:
        self.runtime.shutdown()


# ---- 1. HTTP vs in-process --------------------------------------------------------------------------------
def part_overhead(server: Server, model_dir: Path, work_dir: Path, n_req: int, repeats: int,
                  vocab: int) -> dict[str, object]:
    local = InProcess(model_dir, work_dir / "inproc-state")
    rounds: dict[str, list[dict[str, float]]] = {"http": [], "inproc": []}
    try:
        for r in range(repeats + 1):  # round 0 warms both up; dropped
            reqs = make_requests(100 + r, n_req, (16, 33), (32, 33), vocab)
            for case in (("http", "inproc") if r % 2 == 0 else ("inproc", "http")):
                res = (asyncio.run(http_closed_loop(server.url, reqs, CONCURRENCY)) if case == "http"
                       else local.closed_loop(reqs, CONCURRENCY))
                if res["tokens"] != 32 * n_req:
                    raise RuntimeError(f"{case}: {res['tokens']} output tokens, expected {32 * n_req}")
                print(f"  round {r}{' (warm-up)' if r == 0 else ''} {case}: {res['tok_s']:.1f} tok/s", flush=True)
                if r:
                    rounds[case].append(res)
    finally:
        local.close()
    ratio = paired_ratio([x["tok_s"] for x in rounds["http"]], [x["tok_s"] for x in rounds["inproc"]])
    return {"requests": n_req, "concurrency": CONCURRENCY, "prompt_tokens": [16, 32], "new_tokens": 32,
            "rounds": rounds, "tok_s": {c: median([x["tok_s"] for x in v]) for c, v in rounds.items()},
            "ratio": ratio, "target": TARGET_OVERHEAD, "pass": ratio >= TARGET_OVERHEAD}


# ---- 2. open loop --------------------------------------------------------------------------------------------
async def open_loop(url: str, reqs: list[Req], rate: float, seed: int) -> tuple[list[dict[str, float]], float]:
    """Poisson arrivals at `rate` req/s; -> per-request stats and the span from first arrival to last token."""
    rng, at, arrivals = random.Random(seed), 0.0, []
    for _ in reqs:
        at += rng.expovariate(rate)
        arrivals.append(at)
    limits = httpx.Limits(max_connections=len(reqs), max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=_TIMEOUT, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(req: Req, when: float) -> dict[str, float]:
            await asyncio.sleep(max(0.0, t0 + when - time.perf_counter()))
            return await http_stream(client, req)

        stats = await asyncio.gather(*(one(q, w) for q, w in zip(reqs, arrivals, strict=True)))
        span = time.perf_counter() - t0 - arrivals[0]
    return list(stats), span


def run_rate(server: Server, n: int, mult: float, capacity: float, work: OpenWork,
             tokenizer: PreTrainedTokenizerBase, seed: int) -> dict[str, object]:
    rate = mult * capacity
    count = max(8, min(work.requests, int(rate * work.window_s)))
    reqs = text_requests(seed, count, work, tokenizer)
    rng = random.Random(seed + 1)
    reqs = [replace(q, adapter=f"a{popular(rng.random(), n):04d}") for q in reqs]
    before = server.metrics()
    stats, span = asyncio.run(open_loop(server.url, reqs, rate, seed))
    delta = {k: v - before.get(k, 0.0) for k, v in server.metrics().items()}
    tokens = sum(s["tokens"] for s in stats)
    ttft, tpot = [1e3 * s["ttft"] for s in stats], [1e3 * s["tpot"] for s in stats if s["tokens"] > 1]
    cache = cache_delta(delta, span)
    cache["device_loads_per_request"] = cache["device"]["misses"] / count
    return {"n": n, "load": mult, "offered_req_s": rate, "requests": count, "achieved_req_s": count / span,
            "output_tok_s": tokens / span, "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "tpot_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)}, "cache": cache}


def cache_delta(delta: dict[str, float], span: float) -> dict[str, object]:
    """Per-tier hits/misses over one run from the /metrics counters, and disk reads per second.

    Counter semantics (adapters/slot_table.py): a device miss is a load started into a slot; every request that
    gets its slot counts a device hit, including one that waited for its own load. A host miss is a disk read.
    """
    out: dict[str, object] = {}
    for tier in ("device", "host"):
        hits = delta.get(f'loraplex_adapter_cache_hits_total{{tier="{tier}"}}', 0.0)
        misses = delta.get(f'loraplex_adapter_cache_misses_total{{tier="{tier}"}}', 0.0)
        out[tier] = {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None}
    out["disk_loads_per_s"] = out["host"]["misses"] / span
    return out


def measure_capacity(server: Server, work: OpenWork, tokenizer: PreTrainedTokenizerBase,
                     n_req: int) -> dict[str, float]:
    """Base-only closed loop at concurrency 32, same route and length distribution as the open loop: req/s."""
    reqs = text_requests(7, n_req, work, tokenizer)

    async def run() -> dict[str, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=_TIMEOUT) as client:
            return await closed_loop(lambda r: _stream_tokens(client, r), reqs, CONCURRENCY)

    return asyncio.run(run())


async def _stream_tokens(client: httpx.AsyncClient, req: Req) -> int:
    return int((await http_stream(client, req))["tokens"])


def part_openloop(server: Server, work: OpenWork, tokenizer: PreTrainedTokenizerBase, capacity_requests: int,
                  adapter_mb: float) -> dict[str, object]:
    cap = measure_capacity(server, work, tokenizer, capacity_requests)
    print(f"  base-only capacity: {cap['req_s']:.2f} req/s, {cap['tok_s']:.1f} tok/s", flush=True)
    runs = []
    for n in (5, 100):
        for i, mult in enumerate(LOADS):
            res = run_rate(server, n, mult, cap["req_s"], work, tokenizer, seed=1000 * n + i)
            res["cache"]["disk_mb_per_s"] = res["cache"]["disk_loads_per_s"] * adapter_mb
            runs.append(res)
            print(f"  n={n:>3} load {mult:.2f}x ({res['offered_req_s']:.2f} req/s, {res['requests']} req): "
                  f"{res['achieved_req_s']:.2f} req/s {res['output_tok_s']:.1f} tok/s, TTFT p50/p99 "
                  f"{res['ttft_ms']['p50']:.0f}/{res['ttft_ms']['p99']:.0f} ms, TPOT p50/p99 "
                  f"{res['tpot_ms']['p50']:.0f}/{res['tpot_ms']['p99']:.0f} ms", flush=True)
    return {"work": {"requests_per_rate": work.requests, "window_s": work.window_s, "prompt": work.prompt,
                     "output": work.output}, "capacity": cap, "runs": runs}


# ---- report ----------------------------------------------------------------------------------------------
def print_report(res: dict[str, object]) -> None:
    print("\n== HTTP benchmark (bench-small, fp32, CPU, 1 thread per process) ==")
    print_machine(res, ["overhead", "openloop"])
    if "overhead" in res:
        o = res["overhead"]
        print(f"HTTP / in-process at concurrency {CONCURRENCY}: {o['tok_s']['http']:.1f} / {o['tok_s']['inproc']:.1f}"
              f" tok/s = {o['ratio']:.3f} (target >= {TARGET_OVERHEAD}): {'PASS' if o['pass'] else 'MISS'}")
    if "openloop" in res:
        o = res["openloop"]
        print(f"open loop, capacity {o['capacity']['req_s']:.2f} req/s (base only, closed loop at {CONCURRENCY})")
        print(f"  {'n':>4}{'load':>6}{'offer/s':>9}{'req/s':>8}{'tok/s':>8}{'TTFT p50':>10}{'p99':>8}"
              f"{'TPOT p50':>10}{'p99':>8}{'dev hit':>9}{'host hit':>9}{'loads/req':>10}{'disk/s':>8}")
        for r in o["runs"]:
            c = r["cache"]
            rate = [c[t]["hit_rate"] for t in ("device", "host")]
            print(f"  {r['n']:>4}{r['load']:>6.2f}{r['offered_req_s']:>9.2f}{r['achieved_req_s']:>8.2f}"
                  f"{r['output_tok_s']:>8.1f}{r['ttft_ms']['p50']:>10.0f}{r['ttft_ms']['p99']:>8.0f}"
                  f"{r['tpot_ms']['p50']:>10.0f}{r['tpot_ms']['p99']:>8.0f}"
                  + "".join(f"{x:>9.2f}" if x is not None else f"{'-':>9}" for x in rate)
                  + f"{c['device_loads_per_request']:>10.2f}{c['disk_loads_per_s']:>8.2f}")


def plot(path: Path, res: dict[str, object]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    if "openloop" in res:
        runs = res["openloop"]["runs"]
        for n in sorted({r["n"] for r in runs}):
            rs = [r for r in runs if r["n"] == n]
            x = [r["load"] for r in rs]
            for q, style in (("p50", "-o"), ("p99", "--s")):
                axes[0].plot(x, [r["ttft_ms"][q] for r in rs], style, label=f"n={n} TTFT {q}")
                axes[1].plot(x, [r["tpot_ms"][q] for r in rs], style, label=f"n={n} TPOT {q}")
            axes[2].plot(x, [r["achieved_req_s"] for r in rs], "-o", label=f"n={n} achieved")
        axes[2].plot(x, [r["offered_req_s"] for r in rs], ":", color="gray", label="offered")
        axes[0].set(xlabel="offered load (x base-only capacity)", ylabel="ms", yscale="log", title="TTFT")
        axes[1].set(xlabel="offered load (x base-only capacity)", ylabel="ms", title="TPOT")
        axes[2].set(xlabel="offered load (x base-only capacity)", ylabel="req/s", title="throughput")
        for ax in axes:
            ax.legend(fontsize=7)
    if "overhead" in res:
        o = res["overhead"]
        fig.suptitle(f"HTTP / in-process at concurrency {CONCURRENCY}: {o['ratio']:.3f} (target {TARGET_OVERHEAD})",
                     fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def registered_openloop(server: Server, model_dir: Path, adapters: list[Path], quick: bool,
                        window: float) -> dict[str, object]:
    """Register the adapters over HTTP (the validation read seeds the host tier), then run the open loop."""
    t0 = time.perf_counter()
    server.register([(f"a{i:04d}", d.name) for i, d in enumerate(adapters)])
    print(f"  registered {len(adapters)} adapters in {time.perf_counter() - t0:.1f} s", flush=True)
    mb = statistics.fmean((d / "adapter_model.safetensors").stat().st_size for d in adapters[:5]) / 2**20
    return part_openloop(server, OpenWork(24 if quick else 48, window), AutoTokenizer.from_pretrained(model_dir),
                         48 if quick else 96, mb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests per case (same protocol)")
    ap.add_argument("--parts", nargs="+", default=["overhead", "openloop"], choices=["overhead", "openloop"])
    ap.add_argument("--repeats", type=int, default=3, help="rounds for the HTTP/in-process ratio")
    ap.add_argument("--window", type=float, default=60.0, help="at most this many seconds of arrivals per rate")
    args = ap.parse_args()
    model_dir = bench_small_dir()
    adapters = synth_adapters(model_dir, "S1", 1000)[:100]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    stem = "http_quick" if args.quick else "http"
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-http-") as tmp:
        server = Server(model_dir, adapters[0].parent, Path(tmp) / "state")
        parts: dict[str, Callable[[], dict[str, object]]] = {
            "overhead": lambda: part_overhead(server, model_dir, Path(tmp), 64 if args.quick else 128, args.repeats,
                                              vocab),
            "openloop": lambda: registered_openloop(server, model_dir, adapters, args.quick, args.window),
        }
        try:
            res = run_parts(parts, args.parts, RESULTS_DIR / f"{stem}.json",
                            {"model": "bench-small", "dtype": "float32", "quick": args.quick,
                             "server_flags": list(SERVER_FLAGS)})
        finally:
            server.stop()
    print_report(res)
    plot(RESULTS_DIR / f"{stem}.png", res)


if __name__ == "__main__":
    main()
