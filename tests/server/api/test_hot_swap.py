"""Adapters come and go while traffic flows, against a real server and PEFT as the oracle.

Cache churn (20 adapters, 3 device slots, 5 host), registering under load, unregistering with requests in
flight and queued, files vanishing after registration, bad registrations under load, restart from the same
--state-dir, and kill -9 in the middle of registrations. Requests are greedy with `ignore_eos`, prompts
are token ids, and every output must equal PEFT's for the same adapter.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from loraplex.adapters.targets import ATTENTION_TARGETS, TARGET_MODULES

from ..engine_helpers import PeftReference
from .engine_hooks import allow_steps, held, wait_queued

if TYPE_CHECKING:
    from .conftest import LiveServer

ATTENTION, ALL7 = ATTENTION_TARGETS, TARGET_MODULES
N_TOKENS = 6
N_CHURN = 20
CHURN = [f"c{i:02d}" for i in range(N_CHURN)]
# Adapters beyond the churn set, by role; each name is also its key in the PEFT reference.
EXTRA = ("hot-a", "hot-b", "hot-c", "del-x", "del-y", "gone-f", "gone-r")
PROMPTS = ([5, 17, 42, 99, 7], [300, 12, 64, 3, 250, 8, 11], [61, 62, 63])
WEIGHTS = "adapter_model.safetensors"

# One intra-op thread here and in the servers: tiny models gain nothing from two, and OpenMP barrier waits
# on a busy 2-core machine cost many times the work (see `single_torch_thread` in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _spec(i: int) -> tuple[int, tuple[str, ...], int]:
    """Varied ranks and targets: (rank, target modules, seed)."""
    return ((4, 8, 16)[i % 3], (ATTENTION, ("q_proj", "v_proj"), ALL7)[i % 3 if i % 2 else 0], 100 + i)


# ---------------------------------------------------------------------------------------------------------
# fixtures: adapter files, the PEFT oracle, a server with the churn set registered
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_files(adapter_dir) -> dict[str, Path]:
    names = [*CHURN, *EXTRA]
    return {name: adapter_dir("llama", *_spec(i)) for i, name in enumerate(names)}


class Oracle:
    """PEFT greedy text per (adapter, prompt, n), computed once."""

    def __init__(self, reference: PeftReference, tokenizer) -> None:  # noqa: ANN001 - a HF tokenizer
        self.reference, self.tokenizer = reference, tokenizer
        self._memo: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def text(self, adapter: str, prompt: int, n: int = N_TOKENS) -> str:
        key = (adapter, prompt, n)
        with self._lock:  # PEFT's set_adapter is global state
            if key not in self._memo:
                ids = self.reference.generate(list(PROMPTS[prompt]), adapter, n)
                self._memo[key] = self.tokenizer.decode(ids, skip_special_tokens=True)
            return self._memo[key]


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, adapter_files, tokenizer) -> Oracle:
    return Oracle(PeftReference(tiny_model_dir("llama"), adapter_files), tokenizer)


def place(server: LiveServer, name: str, src: Path) -> None:
    shutil.copytree(src, server.adapter_root / name)


def register(server: LiveServer, name: str, adapter_files: dict[str, Path], *, key: str | None = None) -> dict:
    place(server, name, adapter_files[key or name])
    resp = httpx.post(f"{server.url}/v1/adapters", json={"name": name, "path": name}, timeout=60)
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def one_thread_servers() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def server(server_factory, adapter_files, one_thread_servers) -> LiveServer:
    srv = server_factory("--max-loras", "3", "--max-cpu-loras", "5", "--max-num-seqs", "16")
    for name in CHURN:
        register(srv, name, adapter_files)
    return srv


def body(model: str, prompt: int, n: int = N_TOKENS, **extra: object) -> dict:
    return {"model": model, "prompt": list(PROMPTS[prompt]), "max_tokens": n, "temperature": 0,
            "ignore_eos": True, **extra}


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$" if want else
                         rf"^{re.escape(name)} (\S+)$", re.M)
    found = pattern.search(text)
    return float(found.group(1)) if found else 0.0


def lora_info(server: LiveServer) -> dict[str, str]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    found = re.search(r"^vllm:lora_requests_info\{(.*)\} \S+$", text, re.M)
    assert found, "vllm:lora_requests_info missing"
    return dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))


async def complete(client: httpx.AsyncClient, model: str, prompt: int, n: int = N_TOKENS) -> httpx.Response:
    return await client.post("/v1/completions", json=body(model, prompt, n))


def check(resp: httpx.Response, oracle: Oracle, adapter: str, prompt: int, n: int = N_TOKENS) -> None:
    assert resp.status_code == 200, (adapter, resp.status_code, resp.text)
    out = resp.json()
    assert out["usage"]["completion_tokens"] == n, out
    assert out["choices"][0]["text"] == oracle.text(adapter, prompt, n), (adapter, prompt)


# ---------------------------------------------------------------------------------------------------------
# cache churn
# ---------------------------------------------------------------------------------------------------------


def test_the_oracle_tells_adapters_apart(oracle):
    """Otherwise a request served with the wrong adapter's slot could pass the churn test."""
    texts = {name: oracle.text(name, 0) for name in CHURN}
    assert len(set(texts.values())) >= N_CHURN - 2, texts


def test_churn_many_adapters_few_slots_every_output_is_right(server, oracle):
    evictions_before = metric(server, "loraplex_adapter_evictions_total", tier="device")
    rng = random.Random(7)
    jobs = [(CHURN[i % N_CHURN], rng.randrange(len(PROMPTS))) for i in range(40)]
    rng.shuffle(jobs)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(complete(client, a, p) for a, p in jobs))

    responses = asyncio.run(run())
    failures = [(a, r.status_code, r.text[:200]) for (a, _), r in zip(jobs, responses, strict=True)
                if r.status_code != 200]
    assert not failures, failures
    for (adapter, prompt), resp in zip(jobs, responses, strict=True):
        check(resp, oracle, adapter, prompt)
    assert metric(server, "loraplex_adapter_evictions_total", tier="device") > evictions_before
    assert metric(server, "loraplex_adapters_resident", tier="device") <= 3
    assert metric(server, "loraplex_adapters_resident", tier="host") <= 5
    assert metric(server, "loraplex_requests_total", adapter=CHURN[0], endpoint="/v1/completions",
                  status="200") >= 2


# ---------------------------------------------------------------------------------------------------------
# registering while traffic flows
# ---------------------------------------------------------------------------------------------------------


def test_register_while_traffic_flows(server, oracle, adapter_files):
    for name in ("hot-a", "hot-b"):
        register(server, name, adapter_files)
    files = {f: (adapter_files["hot-c"] / f).read_bytes() for f in ("adapter_config.json", WEIGHTS)}

    async def background(client: httpx.AsyncClient, adapter: str, stop: asyncio.Event, log: list) -> None:
        i = 0
        while not stop.is_set() or i < 2:
            prompt = i % len(PROMPTS)
            log.append((adapter, prompt, await complete(client, adapter, prompt)))
            i += 1

    async def run() -> tuple[list, httpx.Response, httpx.Response]:
        stop, log = asyncio.Event(), []
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            workers = [asyncio.create_task(background(client, a, stop, log)) for a in ("hot-a", "hot-b")]
            while len(log) < 2:  # traffic is flowing
                await asyncio.sleep(0.01)
            put = await client.put("/v1/adapters/hot-c", files={k: (k, v) for k, v in files.items()})
            first = await complete(client, "hot-c", 1)
            stop.set()
            await asyncio.gather(*workers)
            return log, put, first

    log, put, first = asyncio.run(run())
    assert put.status_code == 201, put.text
    check(first, oracle, "hot-c", 1)
    assert len(log) >= 4
    for adapter, prompt, resp in log:
        check(resp, oracle, adapter, prompt)


# ---------------------------------------------------------------------------------------------------------
# unregistering: in-flight requests finish, queued ones fail clearly, new ones get 404, the slot is freed
# ---------------------------------------------------------------------------------------------------------


def _sse_events(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            assert "error" not in event, event
            yield event


def _hold_slot(server: LiveServer, adapter: str, started: threading.Event, release: threading.Event) -> None:
    """Stream a long request for `adapter` until `release`, then hang up (the server aborts it)."""
    with httpx.stream("POST", server.url + "/v1/completions", json=body(adapter, 1, 240, stream=True),
                      timeout=300) as resp:
        for _ in _sse_events(resp.iter_lines()):
            started.set()
            if release.is_set():
                return


def _running_and_waiting(server: LiveServer) -> tuple[list[str], list[str]]:
    info = lora_info(server)
    return info["running_lora_adapters"].split(","), info["waiting_lora_adapters"].split(",")


def test_delete_fails_queued_requests_for_it_with_a_clear_error(server, adapter_files):
    register(server, "del-y", adapter_files)
    holding = CHURN[10:13]
    for name in holding:  # resident before the engine is held: one step admits all three
        assert httpx.post(server.url + "/v1/completions", json=body(name, 0, 1), timeout=120).status_code == 200
    release, holders, starts = threading.Event(), [], []
    waiting: dict = {}
    queued = threading.Thread(target=lambda: waiting.update(
        resp=httpx.post(server.url + "/v1/completions", json=body("del-y", 0), timeout=120)))
    with held(server.url):
        try:
            for name in holding:  # running requests hold all 3 device slots
                starts.append(threading.Event())
                holders.append(threading.Thread(target=_hold_slot, args=(server, name, starts[-1], release)))
                holders[-1].start()
            wait_queued(server.url, waiting=3)
            allow_steps(server.url, 1)  # one step: all three run (and stay running: the engine holds after)
            for name, started in zip(holding, starts, strict=True):
                assert started.wait(120), f"{name} never started"
            queued.start()
            wait_queued(server.url, waiting=1, running=3)
            assert "del-y" in _running_and_waiting(server)[1]
            assert httpx.delete(server.url + "/v1/adapters/del-y", timeout=30).status_code == 200
            queued.join(120)
            assert all(t.is_alive() for t in holders), "a holder finished: the engine was not held"
        finally:
            release.set()
    for t in holders:
        t.join(120)
    resp = waiting["resp"]
    assert resp.status_code == 404, resp.text
    assert "del-y" in resp.json()["error"]["message"] and "unregistered" in resp.json()["error"]["message"]


def test_delete_lets_running_requests_finish_and_frees_the_slot_after(server, oracle, adapter_files):
    register(server, "del-x", adapter_files)
    n_x = 200
    with held(server.url, steps=2), httpx.stream(  # del-x runs 2 steps, then stays running by construction
            "POST", server.url + "/v1/completions", json=body("del-x", 0, n_x, stream=True), timeout=300) as stream:
        events = _sse_events(stream.iter_lines())
        chunks = [next(events)["choices"][0]["text"]]  # del-x is running
        resident_busy = metric(server, "loraplex_adapters_resident", tier="device")
        gone = httpx.delete(server.url + "/v1/adapters/del-x", timeout=30)
        assert gone.status_code == 200 and gone.json()["name"] == "del-x"
        assert "del-x" in _running_and_waiting(server)[0], "del-x finished before it was deleted"
        new = httpx.post(server.url + "/v1/completions", json=body("del-x", 0), timeout=60)
        assert new.status_code == 404 and "del-x" in new.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/adapters/del-x", timeout=30).status_code == 404
        assert "del-x" not in [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]]
        allow_steps(server.url, None)
        rest = list(events)
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    # the full output, as if nothing had happened
    assert "".join(chunks + [e["choices"][0]["text"] for e in rest]) == oracle.text("del-x", 0, n_x)
    assert metric(server, "loraplex_adapters_resident", tier="device") == resident_busy - 1


# ---------------------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------------------


def test_files_deleted_before_first_load_fail_only_that_adapter(server, oracle, adapter_files):
    register(server, "gone-f", adapter_files)
    shutil.rmtree(server.adapter_root / "gone-f")

    async def run() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            # Push its host copy (seeded by registration) out of the 5-adapter host cache.
            others = await asyncio.gather(*(complete(client, name, 2) for name in CHURN[:6]))
            tier = (await client.get("/v1/adapters/gone-f")).json()["tier"]
            assert tier == "disk", f"gone-f is still cached ({tier}): this test would not load from disk"
            bad, good = await asyncio.gather(complete(client, "gone-f", 0), complete(client, CHURN[7], 0))
            return list(others), bad, good

    others, bad, good = asyncio.run(run())
    for name, resp in zip(CHURN[:6], others, strict=True):
        check(resp, oracle, name, 2)
    check(good, oracle, CHURN[7], 0)
    assert bad.status_code == 400, bad.text  # a clear 4xx naming the adapter, never a 500
    message = bad.json()["error"]["message"]
    assert "gone-f" in message and "does not exist" in message, message
    record = httpx.get(server.url + "/v1/adapters/gone-f", timeout=30).json()
    assert record["state"] == "errored" and "does not exist" in record["error"], record
    again = httpx.post(server.url + "/v1/completions", json=body("gone-f", 1), timeout=60)
    assert again.status_code == bad.status_code  # stays errored until registered again
    # registered again with files in place: it serves
    assert httpx.delete(server.url + "/v1/adapters/gone-f", timeout=30).status_code == 200
    register(server, "gone-f", adapter_files)
    check(httpx.post(server.url + "/v1/completions", json=body("gone-f", 0), timeout=60), oracle, "gone-f", 0)


def _bad_registrations(server: LiveServer, good_dir: Path) -> list[Callable[[httpx.Client], httpx.Response]]:
    """50 registration attempts that must all fail with a 4xx (rows 1-16 of BAD_INPUTS.md)."""
    root = server.adapter_root

    def variant(name: str, edit: Callable[[Path], None]) -> str:
        shutil.copytree(good_dir, root / name)
        edit(root / name)
        return name

    def config(**changes: object) -> Callable[[Path], None]:
        def edit(d: Path) -> None:
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg.update(changes)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        return edit

    def huge(d: Path) -> None:
        header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                             {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 8]}}).encode()
        (d / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))

    edits: dict[str, Callable[[Path], None]] = {
        "notjson": lambda d: (d / "adapter_config.json").write_text("{nope"),
        "dora": config(use_dora=True), "ia3": config(peft_type="IA3"), "bias": config(bias="all"),
        "rank": config(r=64), "module": config(target_modules=["q_proj", "nope_proj"]),
        "pickle": lambda d: ((d / WEIGHTS).rename(d / "adapter_model.bin")),
        "cut": lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:200]),
        "huge": huge,
    }
    paths = [variant(f"bad-{k}", e) for k, e in edits.items()]
    posts = [{"name": f"b-{p}", "path": p} for p in paths]
    posts += [{"name": "b-out", "path": "../../etc"}, {"name": "b-abs", "path": "/etc"},
              {"name": "b-missing", "path": "no/such/dir"}, {"name": "has space", "path": "x"},
              {"name": CHURN[0], "path": "bad-dora"}, {"path": "x"}, {"name": "b-nopath"}]
    calls: list[Callable[[httpx.Client], httpx.Response]] = [
        (lambda c, b=b: c.post("/v1/adapters", json=b)) for b in posts]
    cfg = (good_dir / "adapter_config.json").read_bytes()
    calls += [lambda c: c.put("/v1/adapters/b-up", files={"adapter_config.json": ("c", b"[]"),
                                                          WEIGHTS: ("w", b"x" * 64)}),
              lambda c: c.put("/v1/adapters/b-tar", files={"archive": ("a", b"not a tar")}),
              lambda c: c.put("/v1/adapters/b-half", files={"adapter_config.json": ("c", cfg)})]
    return [calls[i % len(calls)] for i in range(50)]


def test_fifty_bad_registrations_while_good_traffic_runs(server, oracle, adapter_files):
    bad = _bad_registrations(server, adapter_files[CHURN[1]])
    names_before = {r["name"] for r in httpx.get(server.url + "/v1/adapters", timeout=30).json()["data"]}
    statuses: list[int] = []

    def attack() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            statuses.extend(call(client).status_code for call in bad)

    async def traffic(stop: threading.Event) -> list[tuple[str, int, httpx.Response]]:
        log = []
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            async def loop(adapters: list[str]) -> None:
                i = 0
                while not stop.is_set() or i < 2:
                    adapter, prompt = adapters[i % len(adapters)], i % len(PROMPTS)
                    log.append((adapter, prompt, await complete(client, adapter, prompt)))
                    flowing.set()
                    i += 1
            await asyncio.gather(loop(CHURN[2:4]), loop(["hot-a", CHURN[4]]))
        return log

    stop, flowing = threading.Event(), threading.Event()

    def attack_while_traffic_flows() -> None:
        try:
            if flowing.wait(120):
                attack()
        finally:
            stop.set()

    attacker = threading.Thread(target=attack_while_traffic_flows)
    attacker.start()
    log = asyncio.run(traffic(stop))
    attacker.join(120)
    assert len(statuses) == 50 and all(400 <= s < 500 for s in statuses), statuses
    assert sorted(set(statuses)) == [400, 403, 404, 409, 422]
    for adapter, prompt, resp in log:
        check(resp, oracle, adapter, prompt)
    names_after = {r["name"] for r in httpx.get(server.url + "/v1/adapters", timeout=30).json()["data"]}
    assert names_after == names_before


# ---------------------------------------------------------------------------------------------------------
# durability: kill -9 in the middle of registrations, then restart with the same --state-dir
# ---------------------------------------------------------------------------------------------------------


def _registration_burst(server: LiveServer, files: dict[str, bytes], acked: list[str], errors: list[str]) -> None:
    """Register k0, k1, ... (uploads and paths alternately) until the server dies."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i in range(10_000):
            name = f"k{i}"
            try:
                if i % 2:
                    resp = client.post("/v1/adapters", json={"name": name, "path": "k-src"})
                else:
                    resp = client.put(f"/v1/adapters/{name}", files={k: (k, v) for k, v in files.items()})
            except httpx.HTTPError:
                return  # the server died mid-request
            if resp.status_code != 201:
                errors.append(resp.text)
                return
            acked.append(name)


def _kill_during_registrations(server: LiveServer, adapter_files: dict[str, Path]) -> list[str]:
    files = {f: (adapter_files["hot-a"] / f).read_bytes() for f in ("adapter_config.json", WEIGHTS)}
    place(server, "k-src", adapter_files["hot-b"])
    acked: list[str] = []
    errors: list[str] = []
    thread = threading.Thread(target=_registration_burst, args=(server, files, acked, errors))
    thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < 4 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(acked) >= 4 and not errors, errors
    time.sleep(random.Random(3).random() * 0.05)
    server.stop(signal.SIGKILL)
    thread.join(60)
    return acked


def test_kill_9_during_registrations_then_restart_serves_the_same_adapters(server, server_factory, oracle,
                                                                          adapter_files):
    register(server, "gone-r", adapter_files)
    pin = httpx.post(server.url + "/v1/adapters", json={"name": "pinned-r", "path": CHURN[5], "pinned": True},
                     timeout=60)
    assert pin.status_code == 201, pin.text
    before = {r["name"]: r for r in httpx.get(server.url + "/v1/adapters", timeout=30).json()["data"]}
    sample = {CHURN[0]: CHURN[0], CHURN[9]: CHURN[9], "hot-c": "hot-c", "pinned-r": CHURN[5]}  # name -> files
    outputs = {n: httpx.post(server.url + "/v1/completions", json=body(n, 2), timeout=60).json() for n in sample}
    acked = _kill_during_registrations(server, adapter_files)
    shutil.rmtree(server.adapter_root / "gone-r")  # its files vanish while the server is down

    again = server_factory("--max-loras", "3", "--max-cpu-loras", "5", state_dir=server.state_dir,
                           adapter_root=server.adapter_root)
    after = {r["name"]: r for r in httpx.get(again.url + "/v1/adapters", timeout=30).json()["data"]}
    assert set(before) | set(acked) <= set(after), "a registration acknowledged before the kill was lost"
    assert len(set(after) - set(before) - set(acked)) <= 1  # at most the one in flight, and then complete
    for name, record in before.items():
        for key in ("source", "rank", "alpha", "target_modules", "size_bytes", "pinned", "created_at"):
            assert record[key] == after[name][key], (name, key)
    uploads = {p.name.rsplit("-", 1)[0] for p in (server.state_dir / "uploads").iterdir()}
    assert uploads == {n for n, r in after.items() if r["source"] == "upload"}  # no half-written leftovers
    assert after["pinned-r"]["pinned"] is True

    for name, files in sample.items():
        resp = httpx.post(again.url + "/v1/completions", json=body(name, 2), timeout=60)
        assert resp.json()["choices"][0]["text"] == outputs[name]["choices"][0]["text"], name
        check(resp, oracle, files, 2)
    newest = sorted(set(after) - set(before), key=lambda n: int(n[1:]))[-2:]  # one upload, one by path
    for name in newest:
        check(httpx.post(again.url + "/v1/completions", json=body(name, 1), timeout=60), oracle,
              "hot-a" if after[name]["source"] == "upload" else "hot-b", 1)
    lost = httpx.post(again.url + "/v1/completions", json=body("gone-r", 0), timeout=60)
    assert lost.status_code >= 400 and "gone-r" in lost.json()["error"]["message"], lost.text
    record = httpx.get(again.url + "/v1/adapters/gone-r", timeout=30).json()
    assert record["state"] == "errored" and "does not exist" in record["error"]
    states = {r["name"]: r["state"] for r in httpx.get(again.url + "/v1/adapters", timeout=30).json()["data"]}
    assert {n for n, state in states.items() if state != "ready"} == {"gone-r"}
