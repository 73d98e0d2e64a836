"""Issue 20 item 1 (BAD_INPUTS.md row 45, "restart unaffected"): a pinned adapter is validated again at every
start; one whose config holds a catastrophic regex must not stall the start (before the fix, the liveness probe
failed while it was matched, and an orchestrator restarted the server in a loop). Item 12: `--api-key` without
`--admin-key` leaves adapter admin open, which the start says in a warning."""

from __future__ import annotations

import json
import time

import httpx

from .conftest import API_KEY, HealthProbe, measure, start_server

EVIL = r"(?:[\w.]?){22}[\w.]{22}!"


def test_item1_a_pinned_adapter_with_a_catastrophic_pattern_does_not_stall_a_restart(tmp_path, tiny_model_dir,
                                                                                     good_adapter):
    state, root = tmp_path / "state", tmp_path / "adapters"
    files = {name: (good_adapter / name).read_bytes() for name in ("adapter_model.safetensors",)}
    config = json.loads((good_adapter / "adapter_config.json").read_text()) | {"rank_pattern": {EVIL: 8}}
    files["adapter_config.json"] = json.dumps(config).encode()
    t0 = time.perf_counter()
    first = start_server(tiny_model_dir("llama"), state, root)
    first_start_s = time.perf_counter() - t0
    try:
        resp = httpx.put(first.url + "/v1/adapters/evil", files={k: (k, v) for k, v in files.items()},
                         data={"pinned": "true"}, timeout=600)
        assert resp.status_code == 201, resp.text
    finally:
        first.stop()
    t0 = time.perf_counter()
    second = start_server(tiny_model_dir("llama"), state, root, "--api-key", API_KEY, ready_timeout=600)
    try:
        with measure("1", "restart with that adapter pinned (start to /ready)", second.proc.pid) as m:
            m.seconds = round(time.perf_counter() - t0, 2)
            with HealthProbe(second.url) as probe:
                time.sleep(0.5)
            m.status = httpx.get(second.url + "/v1/adapters/evil", timeout=30).json().get("state")
            m.extra["first_start_s"] = round(first_start_s, 2)
        assert m.status == "ready"
        assert m.seconds < 2 * first_start_s + 10, (m.seconds, first_start_s)  # no minutes of matching
        assert probe.worst < 0.5, probe.worst
        assert "--admin-key" in second.log() and "open" in second.log()  # the warning of item 12
    finally:
        second.stop()
