"""Hostile adapters (issue 20 items 1, 2, 3, 7, 8, 12a; BAD_INPUTS.md rows 45, 46, 47, 51, 52, 56).

Each attack is an upload or registration a holder of the admin key can send. Expected: a quick, specific answer,
memory charged only for what is kept, and nobody else stalled (/health is polled throughout: its slowest answer
must stay under 0.5 s).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save

from .conftest import (
    S3_TIMEOUT_S,
    HealthProbe,
    completion,
    error_message,
    measure,
)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Catastrophic backtracking for Python's `re` (issue 20 item 1): each +2 on the repeat counts triples the time.
EVIL = r"(?:[\w.]?){22}[\w.]{22}!"
HEALTH_BOUND_S = 0.5


def files_of(adapter: Path, config: dict | None = None, weights: bytes | None = None) -> dict[str, bytes]:
    raw = json.loads((adapter / CONFIG).read_text())
    return {CONFIG: json.dumps(raw | (config or {})).encode(), WEIGHTS: weights or (adapter / WEIGHTS).read_bytes()}


def put_files(admin: httpx.Client, name: str, files: dict[str, bytes]) -> httpx.Response:
    return admin.put(f"/v1/adapters/{name}", files={k: (k, v) for k, v in files.items()})


def put_archive(admin: httpx.Client, name: str, archive: bytes) -> httpx.Response:
    return admin.put(f"/v1/adapters/{name}", files={"archive": ("adapter.tar.gz", archive)})


def tar_gz(members: dict[str, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt, compresslevel=6) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ab_bytes(adapter: Path) -> int:
    """fp32 bytes of an adapter's lora_A / lora_B tensors: what the server keeps."""
    return sum(t.numel() * 4 for k, t in load_file(adapter / WEIGHTS).items() if ".lora_" in k)


# ---- item 1 / row 45: regexes in adapter_config.json ----------------------------------------------------------
def test_item1_catastrophic_rank_pattern_is_matched_in_linear_time(server, admin, good_adapter):
    files = files_of(good_adapter, {"rank_pattern": {EVIL: 4}, "alpha_pattern": {EVIL: 2.0}})
    with HealthProbe(server.url) as probe, measure("1", "rank_pattern/alpha_pattern (?:[\\w.]?){22}[\\w.]{22}!",
                                                  server.proc.pid) as m:
        resp = put_files(admin, "evil-rank", files)
        m.status, m.extra["health_worst_s"] = resp.status_code, round(probe.worst, 3)
    # Matched as PEFT matches it (the key selects no module, so every module keeps r), in linear time.
    assert resp.status_code == 201, resp.text
    assert resp.json()["rank"] == 8
    assert m.seconds < 5 and probe.worst < HEALTH_BOUND_S and probe.failures == 0, (m, probe.worst)


def test_item1_catastrophic_target_modules_regex_is_quick_and_named(server, admin, good_adapter):
    with HealthProbe(server.url) as probe, measure("1", "target_modules string regex", server.proc.pid) as m:
        resp = put_files(admin, "evil-targets", files_of(good_adapter, {"target_modules": EVIL}))
        m.status, m.extra["health_worst_s"] = resp.status_code, round(probe.worst, 3)
    error_message(resp, 400, "target_modules")
    assert m.seconds < 5 and probe.worst < HEALTH_BOUND_S, (m, probe.worst)


@pytest.mark.parametrize("pattern", [r"(q)\1_proj", r"(?=q)q_proj", r"(?<!x)q_proj"])
def test_item1_patterns_beyond_linear_time_matching_are_refused_naming_the_field(server, admin, good_adapter,
                                                                                pattern):
    with measure("1", f"rank_pattern {pattern}", server.proc.pid) as m:
        name = f"refused-pattern-{abs(hash(pattern)) % 10**6}"
        resp = put_files(admin, name, files_of(good_adapter, {"rank_pattern": {pattern: 8}}))
        m.status = resp.status_code
    error_message(resp, 400, "rank_pattern")


# ---- item 2 / row 46: a training-only tensor must not cost memory --------------------------------------------
def velora_weights(adapter: Path, mib: int) -> bytes:
    """The adapter's weights plus VeLoRA's training-only embedding of `mib` MiB (zeros: it compresses away)."""
    tensors = load_file(adapter / WEIGHTS)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_velora_embed"
    tensors[key] = torch.zeros(mib * 2**20 // 4, dtype=torch.float32)
    return save(tensors)


def test_item2_training_only_tensor_is_skipped_without_keeping_its_bytes(server, admin, good_adapter):
    weights = velora_weights(good_adapter, 96)
    archive = tar_gz({CONFIG: (good_adapter / CONFIG).read_bytes(), WEIGHTS: weights})
    del weights
    sizes = []
    with HealthProbe(server.url) as probe, measure("2", "2 uploads, 96 MiB lora_velora_embed each (tar.gz "
                                                  f"{len(archive) // 1024} KiB)", server.proc.pid) as m:
        for i in range(2):
            resp = put_archive(admin, f"velora-{i}", archive)
            assert resp.status_code == 201, resp.text
            sizes.append(resp.json()["size_bytes"])
        m.status, m.extra["health_worst_s"] = resp.status_code, round(probe.worst, 3)
    assert sizes == [ab_bytes(good_adapter)] * 2  # the host tier's accounting is what is held
    assert m.rss_after_mib < 40, m  # before the fix: ~96 MiB more per adapter, invisible to the budget
    assert probe.worst < HEALTH_BOUND_S, probe.worst


# ---- item 3 / row 47: tar header bombs --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu-longname", "pax-path"])
def test_item3_huge_tar_name_headers_are_refused_quickly_with_a_short_error(server, admin, good_adapter, fmt):
    long_name = "a" * (64 * 2**20) + "/" + CONFIG  # a 64 MiB member name: compresses to ~64 KiB
    archive = tar_gz({long_name: b"{}"}, fmt)
    with HealthProbe(server.url) as probe, measure("3", f"{'GNU long-name' if fmt == tarfile.GNU_FORMAT else 'pax'}"
                                                  f" header of 64 MiB (tar.gz {len(archive) // 1024} KiB)",
                                                  server.proc.pid) as m:
        resp = put_archive(admin, "tar-bomb", archive)
        m.status, m.extra["body_bytes"] = resp.status_code, len(resp.content)
        m.extra["health_worst_s"] = round(probe.worst, 3)
    error_message(resp, 400, "header")
    assert len(resp.content) < 2048, len(resp.content)
    assert m.seconds < 5 and m.peak_rss_mib < 32, m
    assert probe.worst < HEALTH_BOUND_S, probe.worst


# ---- item 12a / row 56: scaled weights that are not finite -------------------------------------------------------
@pytest.mark.parametrize("config", [{"lora_alpha": 1e308}, {"lora_alpha": 1e300, "use_rslora": True}],
                         ids=["alpha-1e308", "rslora-1e300"])
def test_item12_alpha_whose_scaled_weights_overflow_is_refused_at_registration(server, admin, good_adapter, config):
    with measure("12", f"lora_alpha {config}", server.proc.pid) as m:
        resp = put_files(admin, f"huge-alpha-{len(config)}", files_of(good_adapter, config))
        m.status = resp.status_code
    error_message(resp, 400, "lora_alpha", "finite")


# ---- item 8 / row 52: an S3 endpoint that never answers ----------------------------------------------------------
def test_item8_s3_that_never_answers_is_a_502_within_the_timeout_and_stalls_nobody(server, admin, client):
    n_registrations = 45  # more than the HTTP worker pool's 40 threads (tokenization runs there)
    t0 = time.perf_counter()

    def register(i: int) -> tuple[int, float]:
        try:
            resp = admin.post("/v1/adapters", json={"name": f"s3-{i}", "path": f"s3://silent-bucket/a{i}"},
                              timeout=60)
            return resp.status_code, time.perf_counter() - t0
        except httpx.TimeoutException:
            return -1, time.perf_counter() - t0

    with measure("8", f"{n_registrations} registrations from a silent S3 endpoint + 4 completions",
                 server.proc.pid) as m, ThreadPoolExecutor(n_registrations + 4) as pool:
        registrations = [pool.submit(register, i) for i in range(n_registrations)]
        time.sleep(0.5)  # they are all waiting on S3 now
        started = time.perf_counter()
        answers = [completion(client, max_tokens=4) for _ in range(4)]
        completions_s = time.perf_counter() - started
        results = [f.result() for f in registrations]
        m.status = sorted({s for s, _ in results})
        slowest = max(t for _, t in results)
        m.extra.update(completions_s=round(completions_s, 2), slowest_registration_s=round(slowest, 2))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert completions_s < 10, completions_s  # before the fix: waited for the worker pool S3 had filled
    assert {s for s, _ in results} == {502}, results
    assert max(t for _, t in results) < 8 * S3_TIMEOUT_S + 10, results
    error_message(admin.post("/v1/adapters", json={"name": "s3-x", "path": "s3://silent-bucket/x"}), 502,
                  "--s3-timeout")


# ---- item 7 / row 51: merges never occupy the threads that serve cold loads --------------------------------------
def test_item7_merges_run_on_their_own_worker_and_never_delay_a_cold_load():
    from loraplex.adapters.host_loader import HostLoader
    from loraplex.adapters.peft_config import LoraSpec
    from loraplex.adapters.weights import AdapterWeights, LoraModuleWeights

    gate = threading.Event()  # the merges' component reads block until the test releases them
    posted: list[object] = []
    arrived = threading.Condition()
    reading = {"now": 0, "most": 0}

    def weights(seed: int) -> AdapterWeights:
        g = torch.Generator().manual_seed(seed)
        module = LoraModuleWeights(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.0)
        return AdapterWeights(LoraSpec(2, 2.0, ("q_proj",)), {"l0.q_proj": module}, 128)

    def read(name: str) -> AdapterWeights:
        if name.startswith("slow"):
            with arrived:
                reading["now"] += 1
                reading["most"] = max(reading["most"], reading["now"])
            gate.wait(30)
            with arrived:
                reading["now"] -= 1
        return weights(len(name))

    def post(msg: object) -> None:
        with arrived:
            posted.append(msg)
            arrived.notify_all()

    loader = HostLoader(read, post, lambda: None, workers=2, pin_memory=False)
    with measure("7", "3 ties merges whose reads block + 1 cold load (in process)", os.getpid()) as m:
        m.status = _cold_load_beside_merges(loader, gate, arrived, posted, reading)


def _cold_load_beside_merges(loader, gate, arrived, posted, reading) -> str:
    from loraplex.adapters.merge import MergeRecipe, remember
    from loraplex.adapters.messages import HostLoaded

    try:
        merges = [remember(MergeRecipe((("slow-a", w), ("slow-b", 1.0)), "ties", density=0.5)) for w in (0.2, 0.4, 0.6)]
        for name in merges:
            loader.submit(name, 1, True)
        time.sleep(0.2)  # the merges have started reading their components
        t0 = time.perf_counter()
        loader.submit("cold", 1, True)
        with arrived:
            got = arrived.wait_for(lambda: any(getattr(p, "name", None) == "cold" for p in posted), timeout=5)
        cold_s = time.perf_counter() - t0
        assert got, "a cold load waited behind merges"
        assert reading["most"] == 1, reading  # merges compute one at a time
        gate.set()
        with arrived:
            assert arrived.wait_for(lambda: sum(isinstance(p, HostLoaded) for p in posted) == 4, timeout=30), posted
        assert cold_s < 2, cold_s
        return f"cold load in {cold_s:.3f}s"
    finally:
        gate.set()
        loader.close()
