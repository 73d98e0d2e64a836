"""Scale-out: two loraplex replicas sharing one adapter registry in a real S3-compatible server (moto), behind a
real nginx that routes by adapter (deploy/nginx/, consistent hash on the adapter name).

Register 10 adapters through replica A; replica B serves them after one poll. Traffic over all 10 through
nginx (named by header or by the JSON body): each adapter's requests land on one replica, cold loads across
replicas equal the number of adapters (not twice), and every output equals a single server's. A deletion
through replica B takes effect on both. The routing table and load counts are printed to the CI log.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

N_ADAPTERS = 10
REQUESTS_PER_ADAPTER = 4
PROMPTS = ("the quick brown fox", "one two three four", "hello there, how are", "a b c d e f")
PROPAGATION_DEADLINE_S = 120.0  # generous: a poll is 0.2 s; the bound is for a loaded CI machine only

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nginx_helper(test_helper):
    helper = test_helper("deploy/nginx_server.py")
    reason = helper.ensure_nginx()
    if reason is not None:
        pytest.skip(reason)
    return helper


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, adapter_dir) -> Path:
    root = tmp_path_factory.mktemp("fleet-adapters")
    targets = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"))
    for i in range(N_ADAPTERS):
        shutil.copytree(adapter_dir("llama", 4 + 4 * (i % 2), targets[i % 2], 100 + i), root / f"a{i}")
    return root


@pytest.fixture(scope="module")
def fleet(server_factory, s3_endpoint, adapter_root, nginx_helper, tmp_path_factory):
    """Replicas A and B on one registry, nginx in front of both, and a single reference server."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="fleet")
    shared = ("--registry", "s3://fleet/prod", "--s3-endpoint", s3_endpoint, "--registry-poll-seconds", "0.2",
              "--max-loras", str(N_ADAPTERS))  # room for all: a second load would be an eviction, not routing
    a = server_factory(*shared, adapter_root=adapter_root)
    b = server_factory(*shared)  # no adapter root: B can only serve what the shared registry holds
    preload = [f"--preload=a{i}=a{i}" for i in range(N_ADAPTERS)]
    reference = server_factory(*preload, "--max-loras", str(N_ADAPTERS), adapter_root=adapter_root)
    proxy = nginx_helper.start_nginx([a.url.removeprefix("http://"), b.url.removeprefix("http://")],
                                     tmp_path_factory.mktemp("nginx"))
    yield {"A": a, "B": b, "reference": reference, "nginx": proxy}
    proxy.stop()
    for server in (a, b, reference):
        server.stop(signal.SIGKILL)


def completion(url: str, adapter: str, prompt: str, *, header: bool = False) -> httpx.Response:
    headers = {"X-Loraplex-Adapter": adapter} if header else {}
    body = {"model": adapter, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)


def samples(server, name: str) -> list:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def requests_per_adapter(server) -> Counter:
    counts: Counter = Counter()
    for s in samples(server, "loraplex_requests_total"):
        if s.labels["endpoint"] == "/v1/completions" and s.labels["status"] == "200":
            counts[s.labels["adapter"]] += int(s.value)
    return counts


def device_loads(server) -> int:
    (count,) = samples(server, "loraplex_adapter_load_seconds_count")
    return int(count.value)


def adapter_names(server) -> set[str]:
    return {a["name"] for a in httpx.get(server.url + "/v1/adapters", timeout=30).json()["data"]}


def wait_until(check, what: str) -> float:
    """Poll `check()` until true; the seconds it took. Fails naming `what` past the (generous) deadline."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < PROPAGATION_DEADLINE_S, f"{what}: not after {PROPAGATION_DEADLINE_S}s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_two_replicas_share_one_registry_behind_nginx(fleet, capsys):
    a, b, reference, proxy = fleet["A"], fleet["B"], fleet["reference"], fleet["nginx"]
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    for name in names:
        answer = httpx.post(a.url + "/v1/adapters", json={"name": name, "path": name}, timeout=120)
        assert answer.status_code == 201, answer.text
    propagation = wait_until(lambda: adapter_names(b) == set(names), "B lists the adapters registered through A")
    assert httpx.post(b.url + "/v1/adapters", json={"name": "a0", "path": "a0"}, timeout=60).status_code in (403, 409)

    expected = {(n, p): completion(reference.url, n, p).json()["choices"][0]["text"] for n in names for p in PROMPTS}
    route_keys: dict[str, set[str]] = {}
    for round_ in range(REQUESTS_PER_ADAPTER):
        for name in names:
            prompt = PROMPTS[round_ % len(PROMPTS)]
            answer = completion(proxy.url, name, prompt, header=round_ % 2 == 0)  # by header, then by body
            assert answer.status_code == 200, (answer.text, proxy.error_log()[-2000:])
            assert answer.json()["choices"][0]["text"] == expected[(name, prompt)], (name, prompt)
            route_keys.setdefault(name, set()).add(answer.headers.get("X-Loraplex-Route-Key", ""))

    served = {"A": requests_per_adapter(a), "B": requests_per_adapter(b)}
    loads = {"A": device_loads(a), "B": device_loads(b)}
    table = [f"{'adapter':8} {'A':>3} {'B':>3}"] + [f"{n:8} {served['A'][n]:3d} {served['B'][n]:3d}" for n in names]
    with capsys.disabled():
        print(f"\n[scale-out] registry propagation A -> B: {propagation:.2f}s (poll every 0.2s)")
        print("[scale-out] requests per adapter per replica through nginx:\n  " + "\n  ".join(table))
        print(f"[scale-out] cold loads (device): A {loads['A']}, B {loads['B']}, total {sum(loads.values())} "
              f"for {N_ADAPTERS} adapters; adapters per replica: "
              f"A {sum(1 for n in names if served['A'][n])}, B {sum(1 for n in names if served['B'][n])}")
    for name in names:
        assert route_keys[name] == {name}, route_keys[name]  # header and body gave nginx the same key
        assert sorted((served["A"][name], served["B"][name])) == [0, REQUESTS_PER_ADAPTER], (name, served)
    assert sum(loads.values()) == N_ADAPTERS, loads

    # A deletion through B (which never held the files' origin) takes effect on both replicas.
    assert httpx.delete(b.url + "/v1/adapters/a3", timeout=60).status_code == 200
    assert httpx.get(b.url + "/v1/adapters/a3", timeout=30).status_code == 404
    gone = wait_until(lambda: httpx.get(a.url + "/v1/adapters/a3", timeout=30).status_code == 404,
                      "A forgets the adapter deleted through B")
    for url in (a.url, b.url, proxy.url):
        answer = completion(url, "a3", PROMPTS[0])
        assert answer.status_code == 404 and "a3" in answer.json()["error"]["message"], answer.text
    assert completion(proxy.url, "a4", PROMPTS[0]).status_code == 200  # the others still serve
    with capsys.disabled():
        print(f"[scale-out] deletion through B reached A in {gone:.2f}s; a3 answers 404 on A, B and nginx")
