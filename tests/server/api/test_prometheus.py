"""A real Prometheus scrapes a real loraplex server: per-adapter request counters, the vllm:* router gauges and
every query of the Grafana dashboard come back through Prometheus' query API.

Prometheus is Debian's `prometheus` binary; when it is missing the test installs it with
scripts/install_prometheus.sh (root + the Debian mirror; CI runs that script up front).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
WAIT_S = 60.0
REQUESTS = {"alpha": 3, "beta": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(what: str, probe: Callable[[], object], timeout: float = WAIT_S) -> object:
    """Call `probe` until it returns something truthy; fail naming `what` and the last answer otherwise."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"{what}: not seen within {timeout:.0f}s (last answer: {last!r})")


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    if shutil.which("prometheus") is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "install_prometheus.sh")], check=True, timeout=900)
    path = shutil.which("prometheus")
    assert path, "scripts/install_prometheus.sh ran but no prometheus binary is on PATH"
    return path


@pytest.fixture(scope="module")
def server(server_factory, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prom-adapters")
    for i, name in enumerate(REQUESTS):
        shutil.copytree(adapter_dir("llama", rank=4, seed=i), root / name)
    preload = [arg for name in REQUESTS for arg in ("--preload", f"{name}={name}")]
    return server_factory(*preload, "--served-model-name", "base", adapter_root=root)


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, server, tmp_path_factory) -> Iterator[str]:
    """Prometheus running deploy/prometheus.yml, re-pointed at the test server and scraping every second."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "loraplex"]
    job["static_configs"] = [{"targets": [server.url.removeprefix("http://")]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [prometheus_bin, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _poll("prometheus /-/ready", lambda: proc.poll() is None and _ready(url))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _query(prom: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


@pytest.fixture(scope="module")
def traffic(server) -> None:
    for name, n in REQUESTS.items():
        for _ in range(n):
            resp = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                "model": name, "prompt": "hello world", "max_tokens": 4, "temperature": 0})
            assert resp.status_code == 200, resp.text


def test_promtool_accepts_the_deploy_config(prometheus_bin):
    promtool = Path(prometheus_bin).with_name("promtool")
    out = subprocess.run([str(promtool), "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_sees_request_counters_per_adapter(prometheus, traffic):
    def counts() -> dict[str, float] | None:
        series = _query(prometheus, 'loraplex_requests_total{endpoint="/v1/completions",status="200"}')
        got = {s["metric"]["adapter"]: float(s["value"][1]) for s in series}
        return got if got == {k: float(v) for k, v in REQUESTS.items()} else None

    _poll("loraplex_requests_total for both adapters", counts)
    (target,) = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert target["health"] == "up", target


def test_router_gauges_arrive_with_vllm_names(prometheus, traffic):
    (info,) = _poll("vllm:lora_requests_info", lambda: _query(prometheus, "vllm:lora_requests_info"))
    slots = _query(prometheus, "loraplex_adapter_slots_total")[0]["value"][1]
    assert info["metric"]["max_lora"] == slots == "8"  # the server's --max-loras default
    assert abs(float(info["value"][1]) - time.time()) < 120, "the value must be a current unix timestamp"
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc"):
        (sample,) = _query(prometheus, name)
        assert float(sample["value"][1]) >= 0, name


def test_every_dashboard_query_returns_data(prometheus, traffic):
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "loraplex.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    for expr in exprs:
        # rate() needs two scrapes after a series appears: poll rather than sleep a fixed time.
        _poll(f"dashboard query {expr!r}", lambda e=expr: _query(prometheus, e))
    by_adapter = _query(prometheus, "sum by (adapter) (rate(loraplex_requests_total[1m]))")
    assert set(REQUESTS) <= {s["metric"]["adapter"] for s in by_adapter}


def _lora_info(server) -> dict[str, str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"]
    return family.samples[0].labels


def test_lora_requests_info_lists_an_adapter_while_it_runs(server):
    body = {"model": "beta", "prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    seen: list[str] = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # generating now
        seen.append(_lora_info(server)["running_lora_adapters"])
        for _ in lines:  # drain; the request finishes
            pass
    assert "beta" in seen[0].split(","), seen
    assert _lora_info(server)["running_lora_adapters"] == ""
