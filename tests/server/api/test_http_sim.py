"""The HTTP-level variant of the engine simulation (tests/sim): a seeded random script of clients run through a
real server on the tiny model: streamed and plain completions, n > 1, merges, disconnects before the first token
and mid-stream, DELETE and re-registration of adapters in use, all at once on a small KV pool (preemptions) and
few device slots. Every client must get an answer (a status, a complete body or a stream ending in [DONE] or
an error event), none a 5xx; afterwards the engine is idle: nothing running or queued, every KV block free.

Timing decides which adapter a request finds registered and how far a stream gets, so outcomes vary between
machines; what is checked holds for every interleaving.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil

import httpx
import pytest

SEED = 19
CLIENTS = 48
ADAPTERS = ("a1", "a2", "a3")
DEADLINE_S = 300.0  # a generous ceiling per client: the bug class this catches hangs forever


@pytest.fixture(scope="module")
def server(server_factory, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-sim-root")
    for i, name in enumerate(ADAPTERS):
        shutil.copytree(adapter_dir("llama", (4, 8, 16)[i], ("q_proj", "k_proj", "v_proj", "o_proj"), 60 + i),
                        root / name)
    preload = [arg for name in ADAPTERS for arg in ("--preload", f"{name}={name}")]
    return server_factory(*preload, "--max-num-seqs", "3", "--max-loras", "2", "--num-kv-blocks", "40",
                          "--max-batch-tokens", "32", "--max-queue", "64", adapter_root=root)


def _body(rng: random.Random, model: str) -> dict:
    body: dict = {"prompt": " ".join(rng.choice(("the", "quick", "fox", "sea", "ship")) for _ in range(
        rng.randint(2, 30))), "max_tokens": rng.randint(1, 24), "temperature": rng.choice((0, 0.8)),
        "ignore_eos": True, "n": rng.choice((1, 1, 2, 3))}
    if rng.random() < 0.15:
        body["adapters"] = [{"name": "a1", "weight": 0.5}, {"name": "a2", "weight": 0.5}]
        body["model"] = model
    else:
        body["model"] = rng.choice((model, *ADAPTERS))
    return body


async def _complete(client: httpx.AsyncClient, body: dict) -> str:
    answer = await client.post("/v1/completions", json=body)
    assert answer.status_code in (200, 404, 429), answer.text  # 404: an adapter it names was deleted
    if answer.status_code == 200:
        assert len(answer.json()["choices"]) == body["n"]
    return str(answer.status_code)


async def _stream(client: httpx.AsyncClient, body: dict, leave_after: int | None) -> str:
    """Stream to the end ([DONE] or an error event), or leave after `leave_after` events (a disconnect)."""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as answer:
        if answer.status_code != 200:
            await answer.aread()
            assert answer.status_code in (404, 429), answer.text
            return str(answer.status_code)
        events = 0
        async for line in answer.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "done"
            event = json.loads(line[6:])
            if "error" in event:
                assert event["error"]["code"] in (400, 404), event  # its adapter went (or errored), never a 5xx
                return f"event-{event['error']['code']}"
            events += 1
            if leave_after is not None and events >= leave_after:
                return "left"
    raise AssertionError("the stream ended without [DONE] or an error event")


async def _admin(client: httpx.AsyncClient, rng: random.Random) -> str:
    name = rng.choice(ADAPTERS)
    if rng.random() < 0.35:
        answer = await client.delete(f"/v1/adapters/{name}")
        assert answer.status_code in (200, 204, 404), answer.text
    else:
        answer = await client.post("/v1/adapters", json={"name": name, "path": name})
        assert answer.status_code in (201, 409), answer.text
    return f"admin-{answer.status_code}"


async def _client(url: str, rng: random.Random, base: str) -> str:
    await asyncio.sleep(rng.random() * 2.0)  # arrivals spread over a while: an order, not a timing assumption
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as client:
        kind = rng.random()
        if kind < 0.12:
            return await _admin(client, rng)
        body = _body(rng, base)
        if kind < 0.45:
            return await _complete(client, body)
        return await _stream(client, body, rng.choice((None, None, 0, 1, 3)))


def test_every_client_of_a_random_script_gets_an_answer_and_the_engine_drains(server):
    base = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    rng = random.Random(SEED)
    seeds = [rng.randrange(2**32) for _ in range(CLIENTS)]

    async def main() -> list[str]:
        tasks = [_client(server.url, random.Random(s), base) for s in seeds]
        return await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S)

    outcomes = asyncio.run(main())
    assert len(outcomes) == CLIENTS
    print({o: outcomes.count(o) for o in sorted(set(outcomes))})
    _assert_drained(server)


def _assert_drained(server) -> None:
    """Aborts land on the engine thread's next wake: poll /metrics (bounded) until nothing runs or waits."""
    import time

    deadline = time.monotonic() + 60
    while True:
        metrics = httpx.get(server.url + "/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith(("loraplex_num_requests_running ", "loraplex_num_requests_waiting ",
                                      "loraplex_kv_cache_usage_ratio "))}
        if not any(values.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert values == {"loraplex_num_requests_running": 0.0, "loraplex_num_requests_waiting": 0.0,
                      "loraplex_kv_cache_usage_ratio": 0.0}, values
    assert httpx.get(server.url + "/health").status_code == 200
