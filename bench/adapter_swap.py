"""Shipping adapter versions over HTTP (bench_adapters.py `--parts swap`; BENCHMARK.md: "hot-adapter TTFT p99 with
one replace per second ÷ without <= 1.2"): a real `loraplex serve` of bench-small, fp32 on the CPU.

A training loop pushes new weights for adapter `trained` once per second: `PUT /v1/adapters/trained/weights`
with a raw 19.5 MB P adapter (rank 16 on all seven projections; the registered config is kept), then one
streamed request for `trained`. Meanwhile the measured class, requests for two pinned adapters `hot0`/`hot1`,
arrives as a Poisson stream. Two cases per round, in alternating order:

  replace  each second: PUT …/weights (a new version: upload, hash, validate, register, host tier), then the
           request for `trained`, which loads the new version into a slot and runs it
  steady   each second: the same request for `trained`, on its resident version (the same compute, no replace)

Reported: the hot class's TTFT p50/p99 per case and p99(replace) ÷ p99(steady) (median of the per-round
ratios; target <= 1.2); the time from the PUT's first byte to the new version's first token (p50/p99), split
into the PUT's answer and the request's TTFT; every `trained` answer's X-Loraplex-Adapter-Version is checked to
be the version its PUT made current.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import ServerProcess

HOT = ("hot0", "hot1")
TRAINED = "trained"
WEIGHTS_FILE = "adapter_model.safetensors"
SERVER_FLAGS = ["--max-loras", "8", "--max-cpu-loras", "16", "--max-num-seqs", "16", "--max-batch-tokens", "512",
                "--max-model-len", "256", "--num-kv-blocks", "256"]
_TIMEOUT = httpx.Timeout(120.0)


@dataclass(frozen=True)
class SwapWork:
    seconds: float  # per case and round
    hot_rate: float  # requests/s for the hot adapters (the measured class)
    pushes_per_s: float = 1.0
    new_tokens: int = 4
    prompt: tuple[int, int] = (8, 24)  # prompt length range, tokens


@dataclass
class Push:
    """One training push: when its PUT started and answered, the version it made current, the first token."""

    sent: float
    answered: float = 0.0
    version: str = ""
    first_token: float = 0.0
    answer_version: str = ""


class SwapServer(ServerProcess):
    def __init__(self, model_dir: Path, root: Path, state: Path) -> None:
        super().__init__(["--model", str(model_dir), "--state-dir", str(state), "--adapter-root", str(root),
                          *SERVER_FLAGS], state.parent / "server.log")

    def register(self, name: str, path: str, pinned: bool = False) -> dict:
        r = httpx.post(f"{self.url}/v1/adapters", json={"name": name, "path": path, "pinned": pinned},
                       timeout=_TIMEOUT)
        if r.status_code != 201:
            raise RuntimeError(f"registering {name} failed: {r.status_code} {r.text[:300]}")
        return r.json()


def start(model_dir: Path, adapters: list[Path], work_dir: Path) -> SwapServer:
    """A server with hot0/hot1 pinned and `trained` registered; adapters[0..2] are theirs."""
    root = work_dir / "root"
    for name, src in zip((*HOT, TRAINED), adapters, strict=False):
        shutil.copytree(src, root / name)
    server = SwapServer(model_dir, root, work_dir / "state")
    for name in HOT:
        server.register(name, name, pinned=True)
    server.register(TRAINED, TRAINED)
    return server


async def _stream(client: httpx.AsyncClient, model: str, prompt: list[int], work: SwapWork
                  ) -> tuple[float, str]:
    """A streamed completion, drained; (seconds to the first token, the version header)."""
    body = {"model": model, "prompt": prompt, "max_tokens": work.new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start, first = time.perf_counter(), None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{model}: {resp.status_code} {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
            if line.startswith("data: ") and '"error"' in line:
                raise RuntimeError(f"{model}: {line[:300]}")
    return first - start, resp.headers["x-loraplex-adapter-version"]


def _prompt(rng: random.Random, work: SwapWork, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(rng.randint(*work.prompt))]


async def _hot_traffic(client: httpx.AsyncClient, work: SwapWork, seed: int, vocab: int) -> list[float]:
    """Poisson arrivals for the hot adapters over `work.seconds`; their TTFTs."""
    rng, jobs, t0 = random.Random(seed), [], time.perf_counter()
    at = rng.expovariate(work.hot_rate)
    while at < work.seconds:
        jobs.append(_at(t0 + at, _stream(client, HOT[len(jobs) % 2], _prompt(rng, work, vocab), work)))
        at += rng.expovariate(work.hot_rate)
    return [ttft for ttft, _ in await asyncio.gather(*jobs)]


async def _at(when: float, job):  # noqa: ANN001, ANN202 - a coroutine and its result
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    return await job


async def _trainer(client: httpx.AsyncClient, url: str, bodies: list[bytes], replace: bool, work: SwapWork,
                   seed: int, vocab: int) -> list[Push]:
    """Once per 1/pushes_per_s: (replace) PUT new weights, then one streamed request for `trained`."""
    rng, pushes, t0 = random.Random(seed), [], time.perf_counter()
    period = 1.0 / work.pushes_per_s
    for k in range(int(work.seconds * work.pushes_per_s)):
        await asyncio.sleep(max(0.0, t0 + k * period - time.perf_counter()))
        push = Push(time.perf_counter())
        if replace:
            resp = await client.put(f"{url}/v1/adapters/{TRAINED}/weights", content=bodies[(seed + k) % len(bodies)])
            if resp.status_code != 200:
                raise RuntimeError(f"PUT weights: {resp.status_code} {resp.text[:300]}")
            push.version = resp.json()["version"]
        push.answered = time.perf_counter()
        ttft, push.answer_version = await _stream(client, TRAINED, _prompt(rng, work, vocab), work)
        push.first_token = push.answered + ttft
        if replace and push.answer_version != push.version:
            raise RuntimeError(f"the request after a PUT ran {push.answer_version}, not {push.version}")
        pushes.append(push)
    return pushes


async def run_case(server: SwapServer, bodies: list[bytes], replace: bool, work: SwapWork, seed: int,
                   vocab: int) -> dict[str, object]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server.url, timeout=_TIMEOUT, limits=limits) as client:
        hot, pushes = await asyncio.gather(_hot_traffic(client, work, seed, vocab),
                                           _trainer(client, server.url, bodies, replace, work, seed, vocab))
    return {"hot_ttft_s": hot, "pushes": [p.__dict__ for p in pushes]}


def distinct_bodies(weights: list[Path], count: int) -> list[bytes]:
    """`count` different safetensors bodies of one config (the trainer's successive checkpoints)."""
    bodies = [(d / WEIGHTS_FILE).read_bytes() for d in weights[:count]]
    if len({hash(b) for b in bodies}) != len(bodies):
        raise RuntimeError("the pushed weights must all differ (each push is a new version)")
    return bodies
