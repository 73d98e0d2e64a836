"""Shipping adapter versions under load (issue 24's acceptance run), against a real server and PEFT as the oracle.

16 clients stream completions for one adapter name for 60 s (LORAPLEX_SWAP_LOAD_SECONDS) while an admin client
replaces its weights 20 times (by path, by upload and by PUT …/weights in turn), sets a 90/10 canary route, flips
it to 10/90, and rolls back. Checked:

- no request fails: every stream answers 200 and ends with `data: [DONE]`;
- every response's X-Loraplex-Adapter-Version names weights whose PEFT greedy output is that response's text;
- a request sent after a replace (or rollback) returned runs the new version;
- while a route stands, one user stays on one version (>= 99 %), and over >= 1,000 routed requests the split is
  within 5 points of the weights;
- afterwards only the current version holds a slot or host memory.

The route phases last until enough routed requests finished (bounded by a generous ceiling): the test never
depends on how fast the machine is. The numbers it measures go to the log (see docs/adapters.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from loraplex.adapters.digest import dir_digest

from ..engine_helpers import PeftReference
from .engine_hooks import wait_until

if TYPE_CHECKING:
    from .conftest import LiveServer

NAME = "live"
CLIENTS = 16
REPLACES = 20
PROMPTS = ([5, 17, 42, 99, 7], [300, 12, 64, 3, 250, 8, 11], [61, 62, 63])
N_TOKENS = 4
USERS = 600  # distinct users: enough that the share of users a route sends to each version is near its weight
ROUTED_PER_PHASE = 600  # routed requests each route phase waits for (two phases: >= 1,000 in all)
PHASE_CEILING_S = 120.0  # a phase that has not seen them by then fails the test (a broken server, not a slow one)
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@dataclass
class Answer:
    user: str
    prompt: int
    sent: float
    done: float = 0.0
    status: int = 0
    version: str = ""
    text: str = ""
    finished: bool = False  # ended with data: [DONE], no error event
    error: str = ""


@pytest.fixture(scope="module")
def weights(adapter_dir) -> list[Path]:
    """The first version and its 20 replacements: one config (rank 4 on q/v), each its own weights."""
    return [adapter_dir("llama", 4, ("q_proj", "v_proj"), 900 + i) for i in range(REPLACES + 1)]


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory, weights) -> LiveServer:
    root = tmp_path_factory.mktemp("versions-load")
    for i, d in enumerate(weights):
        shutil.copytree(d, root / f"v{i}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        return server_factory("--max-loras", "4", "--max-cpu-loras", "8", "--max-num-seqs", "32",
                              "--adapter-history", "5", adapter_root=root)


class Admin:
    """The admin client's calls, timed: (what, version made current or routed, sent, returned)."""

    def __init__(self, server: LiveServer, weights: list[Path]) -> None:
        self.url, self.weights, self.log = server.url, weights, []

    def _timed(self, what: str, call) -> dict:  # noqa: ANN001 - a zero-argument httpx call
        sent = time.monotonic()
        resp = call()
        assert resp.status_code == 200, (what, resp.status_code, resp.text)
        record = resp.json()
        self.log.append((what, record["version"], sent, time.monotonic()))
        return record

    def replace(self, i: int) -> dict:
        """Version i by path, by multipart upload, or by PUT …/weights, in turn."""
        d = self.weights[i]
        if i % 3 == 1:
            return self._timed(f"replace {i} by path", lambda: httpx.post(
                f"{self.url}/v1/adapters", json={"name": NAME, "path": f"v{i}", "replace": True}, timeout=120))
        if i % 3 == 2:
            files = {f: (f, (d / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
            return self._timed(f"replace {i} by upload", lambda: httpx.put(
                f"{self.url}/v1/adapters/{NAME}?replace=true", files=files, timeout=120))
        body = (d / "adapter_model.safetensors").read_bytes()
        return self._timed(f"replace {i} by weights", lambda: httpx.put(
            f"{self.url}/v1/adapters/{NAME}/weights", content=body, timeout=120))

    def route(self, splits: dict[str, int]) -> dict:
        body = {"versions": [{"version": v, "weight": w} for v, w in splits.items()], "sticky": "user"}
        return self._timed(f"route {splits}", lambda: httpx.put(f"{self.url}/v1/adapters/{NAME}/route", json=body,
                                                                timeout=120))

    def rollback(self) -> dict:
        return self._timed("rollback", lambda: httpx.post(f"{self.url}/v1/adapters/{NAME}/rollback", timeout=120))


async def stream_one(client: httpx.AsyncClient, answer: Answer) -> None:
    body = {"model": NAME, "prompt": PROMPTS[answer.prompt], "max_tokens": N_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "user": answer.user}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            answer.status, answer.version = resp.status_code, resp.headers.get("x-loraplex-adapter-version", "")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    answer.finished = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    answer.error = str(event["error"])
                    break
                answer.text += event["choices"][0]["text"]
    except httpx.HTTPError as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    answer.done = time.monotonic()


async def run_load(server: LiveServer, admin: Admin, seconds: float) -> tuple[list[Answer], dict]:
    answers: list[Answer] = []
    stop = asyncio.Event()
    marks: dict = {}

    async def client_loop(i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            while not stop.is_set():
                answer = Answer(f"user-{rng.randrange(USERS)}", rng.randrange(len(PROMPTS)), time.monotonic())
                answers.append(answer)
                await stream_one(client, answer)

    def routed_since(t: float) -> int:
        return sum(1 for a in answers if a.sent > t and a.done)

    async def admin_loop() -> None:
        start = time.monotonic()
        for i in range(1, REPLACES + 1):  # 20 replaces over the first 60 % of the run
            await asyncio.sleep(max(0.0, start + i * 0.6 * seconds / REPLACES - time.monotonic()))
            await asyncio.to_thread(admin.replace, i)
        current, previous = (dir_digest(admin.weights[i])[:12] for i in (REPLACES, REPLACES - 1))
        for phase, splits in (("route", {previous: 90, current: 10}), ("flip", {previous: 10, current: 90})):
            record = await asyncio.to_thread(admin.route, splits)
            marks[phase] = (admin.log[-1][3], splits, record)
            deadline = time.monotonic() + PHASE_CEILING_S
            while routed_since(marks[phase][0]) < ROUTED_PER_PHASE:
                assert time.monotonic() < deadline, f"{phase}: too few routed requests finished"
                await asyncio.sleep(0.2)
        marks["rollback"] = (time.monotonic(), None, await asyncio.to_thread(admin.rollback))
        await asyncio.sleep(max(1.0, start + seconds - time.monotonic()))
        stop.set()

    await asyncio.gather(admin_loop(), *(client_loop(i) for i in range(CLIENTS)))
    return answers, marks


def test_versions_under_load_no_request_fails_and_every_answer_is_its_versions_peft_output(
        server, weights, tiny_model_dir, tokenizer):
    seconds = float(os.environ.get("LORAPLEX_SWAP_LOAD_SECONDS", "60"))
    first = httpx.post(f"{server.url}/v1/adapters", json={"name": NAME, "path": "v0"}, timeout=120)
    assert first.status_code == 201, first.text
    admin = Admin(server, weights)
    t0 = time.monotonic()
    answers, marks = asyncio.run(run_load(server, admin, seconds))
    wall = time.monotonic() - t0

    failed = [a for a in answers if a.status != 200 or not a.finished or a.error]
    assert not failed, f"{len(failed)} failed, e.g. {failed[:3]}"
    by_version = {dir_digest(d)[:12]: d for d in weights}
    _check_peft(answers, by_version, tiny_model_dir, tokenizer)
    _check_after_each_change(answers, admin.log)
    splits = {phase: _check_route(answers, marks, phase) for phase in ("route", "flip")}
    # Only the current version keeps device or host memory once the load is over.
    wait_until(lambda: [v["tier"] for v in _record(server)["versions"][1:]] == ["disk"] * 4,
               "the replaced versions' slots and host copies freed")
    print(f"\nversions under load: {len(answers)} requests in {wall:.0f} s from {CLIENTS} streaming clients, 0 failed; "
          f"{REPLACES} replaces, route {splits['route']}, flip {splits['flip']}, rollback; admin call p50 "
          f"{sorted(t1 - t0 for *_, t0, t1 in admin.log)[len(admin.log) // 2] * 1e3:.0f} ms")


def _record(server: LiveServer) -> dict:
    return httpx.get(f"{server.url}/v1/adapters/{NAME}", timeout=30).json()


def _check_peft(answers: list[Answer], by_version: dict[str, Path], tiny_model_dir, tokenizer) -> None:  # noqa: ANN001
    seen = sorted({(a.version, a.prompt) for a in answers})
    assert {v for v, _ in seen} <= set(by_version), "a header names weights that were never registered"
    ref = PeftReference(tiny_model_dir("llama"), {v: by_version[v] for v in sorted({v for v, _ in seen})})
    expected = {(v, p): tokenizer.decode(ref.generate(list(PROMPTS[p]), v, N_TOKENS), skip_special_tokens=True)
                for v, p in seen}
    wrong = [a for a in answers if a.text != expected[a.version, a.prompt]]
    assert not wrong, f"{len(wrong)} answers differ from PEFT for the version they name, e.g. {wrong[:3]}"


def _check_after_each_change(answers: list[Answer], log: list[tuple]) -> None:
    """Between a replace's (or the rollback's) answer and the next admin call, every request sent runs the version
    that call made current."""
    for k, (what, version, _, returned) in enumerate(log):
        if what.startswith("route"):
            continue
        until = log[k + 1][2] if k + 1 < len(log) else float("inf")
        stray = Counter(a.version for a in answers if returned < a.sent < until and a.version != version)
        assert not stray, f"after {what} ({version}) requests ran {dict(stray)}"


def _check_route(answers: list[Answer], marks: dict, phase: str) -> dict:
    start, splits, _ = marks[phase]
    end = marks["flip" if phase == "route" else "rollback"][0]
    routed = [a for a in answers if start < a.sent and a.done < end]
    assert len(routed) >= ROUTED_PER_PHASE * 0.9, (phase, len(routed))
    per_user: dict[str, Counter] = {}
    for a in routed:
        per_user.setdefault(a.user, Counter())[a.version] += 1
    stuck = sum(c.most_common(1)[0][1] for c in per_user.values()) / len(routed)
    assert stuck >= 0.99, f"{phase}: only {stuck:.1%} of requests ran their user's usual version"
    total = sum(splits.values())
    shares = {v: sum(a.version == v for a in routed) / len(routed) for v in splits}
    for version, weight in splits.items():
        assert abs(shares[version] - weight / total) <= 0.05, (phase, shares, splits)
    return {v: f"{shares[v]:.1%}" for v in splits} | {"requests": len(routed), "sticky": f"{stuck:.1%}"}
