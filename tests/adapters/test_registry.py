"""Adapter names and the durable registry: persistence, races, kill -9 consistency, corrupt manifests."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loraplex.adapters import registry as registry_mod
from loraplex.adapters.digest import dir_digest
from loraplex.adapters.errors import AdapterBadNameError, AdapterConflictError, AdapterNotFoundError
from loraplex.adapters.names import validate_adapter_name
from loraplex.adapters.registry import AdapterRecord, AdapterRegistry, AdapterVersion, ManifestError

# -- names (BAD_INPUTS row 3) --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "my-adapter_v1.2", "A" * 128, "..a", "a..", "-", "_x", "x.y.z", "team/a",
                                  "acme/support-v2", "a/route-2", "route/a"])
def test_valid_names_are_returned_unchanged(name):
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "empty"),
        ("a" * 129, "129 characters"),
        ("a/b/c", "at most one"),
        ("/a", "empty part"),
        ("a/", "empty part"),
        ("../a", "'..' is reserved"),
        ("a/.", "'.' is reserved"),
        ("acme/route", "reserved"),
        ("acme/weights", "reserved"),
        ("a\\b", "'\\\\'"),
        ("my adapter", "' '"),
        ("tab\there", "'\\t'"),
        ("naïve", "'ï'"),
        ("a\x00b", "'\\x00'"),
        (".", "reserved"),
        ("..", "reserved"),
        (None, "string"),
        (12, "string"),
    ],
)
def test_bad_names_are_refused_with_the_reason(name, says):
    with pytest.raises(AdapterBadNameError) as info:
        validate_adapter_name(name)
    assert info.value.status == 422
    assert info.value.field == "name"
    assert says in str(info.value)


# -- registry basics --------------------------------------------------------------------------------------


def _record(name: str, tmp: Path, *, pinned: bool = False, meta: dict | None = None) -> AdapterRecord:
    local = tmp / "files" / name
    local.mkdir(parents=True, exist_ok=True)
    version = AdapterVersion(hashlib.sha256(name.encode()).hexdigest(), f"local:{name}", str(local), meta=meta or {})
    return AdapterRecord.of(name, version, pinned)


def test_add_persists_and_reloads(tmp_path):
    state = tmp_path / "state"
    reg = AdapterRegistry(state)
    rec = _record("a", tmp_path, pinned=True, meta={"rank": 8, "alpha": 16, "target_modules": ["q_proj"]})
    reg.add(rec)
    reg.add(_record("b", tmp_path))
    assert "a" in reg and "zz" not in reg and len(reg) == 2

    reopened = AdapterRegistry(state)
    assert reopened.get("a") == rec
    assert [r.name for r in reopened.list()] == ["a", "b"]  # registration order kept
    assert reopened.missing_on_load == ()
    body = json.loads((state / "registry.json").read_text())
    assert body["version"] == 2 and [e["name"] for e in body["adapters"]] == ["a", "b"]


def test_duplicate_add_is_409_and_keeps_the_first(tmp_path):
    reg = AdapterRegistry(tmp_path / "state")
    first = reg.add(_record("a", tmp_path))
    with pytest.raises(AdapterConflictError) as info:
        reg.add(_record("a", tmp_path, pinned=True))
    assert info.value.status == 409 and "'a'" in str(info.value)
    assert AdapterRegistry(tmp_path / "state").get("a") == first


def test_remove_persists_and_unknown_is_404(tmp_path):
    state = tmp_path / "state"
    reg = AdapterRegistry(state)
    reg.add(_record("a", tmp_path))
    reg.add(_record("b", tmp_path))
    assert reg.remove("a").name == "a"
    assert [r.name for r in AdapterRegistry(state).list()] == ["b"]
    for call in (reg.remove, reg.get):
        with pytest.raises(AdapterNotFoundError) as info:
            call("a")
        assert info.value.status == 404 and "'a'" in str(info.value)


def test_add_refuses_bad_name_and_non_json_meta(tmp_path):
    reg = AdapterRegistry(tmp_path / "state")
    with pytest.raises(AdapterBadNameError):
        reg.add(AdapterRecord.of("a/b/c", AdapterVersion("0" * 64, "upload", str(tmp_path))))
    with pytest.raises(ValueError, match="JSON"):
        reg.add(_record("a", tmp_path, meta={"x": object()}))
    assert len(reg) == 0 and len(AdapterRegistry(tmp_path / "state")) == 0


def test_vanished_local_dir_is_kept_and_reported(tmp_path):
    state = tmp_path / "state"
    reg = AdapterRegistry(state)
    gone = reg.add(_record("gone", tmp_path))
    reg.add(_record("here", tmp_path))
    Path(gone.local_dir).rmdir()
    reopened = AdapterRegistry(state)
    assert reopened.missing_on_load == ("gone",)
    assert reopened.get("gone") == gone and len(reopened) == 2


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"{not json", "corrupt"),
        (b"\xff\xfe", "corrupt"),
        (b"[]", "adapters"),
        (b'{"version": 99, "adapters": []}', "version"),
        (b'{"version": 1, "adapters": [{"name": "a"}]}', "'source'"),
        (b'{"version": 1, "adapters": [{"name": "a/../b", "source": "upload", "local_dir": "/x",'
         b' "pinned": false, "created_at": 1, "meta": {}}]}', "'/'"),
        (b'{"version": 2, "adapters": [{"name": "a", "pinned": false, "created_at": 1, "versions": []}]}',
         "'versions' is empty"),
        (b'{"version": 2, "adapters": [{"name": "a", "pinned": false, "created_at": 1, "versions": [{"sha256": "x",'
         b' "source": "upload", "local_dir": "/x", "created_at": 1, "meta": {}}]}]}', "not a sha256"),
        (b'{"version": 2, "adapters": [{"name": "a", "pinned": false, "created_at": 1, "route": {"splits": '
         b'[["' + b"b" * 64 + b'", 1]], "sticky": "user"}, "versions": [{"sha256": "' + b"a" * 64 +
         b'", "source": "upload", "local_dir": "/x", "created_at": 1, "meta": {}}]}]}', "route names a version"),
    ],
)  # fmt: skip
def test_corrupt_manifest_is_a_clear_error_and_left_untouched(tmp_path, content, says):
    state = tmp_path / "state"
    state.mkdir()
    (state / "registry.json").write_bytes(content)
    with pytest.raises(ManifestError) as info:
        AdapterRegistry(state)
    assert str(state / "registry.json") in str(info.value) and says in str(info.value)
    assert (state / "registry.json").read_bytes() == content


def test_duplicate_names_in_manifest_are_refused(tmp_path):
    state = tmp_path / "state"
    AdapterRegistry(state).add(_record("a", tmp_path))
    body = json.loads((state / "registry.json").read_text())
    body["adapters"] *= 2
    (state / "registry.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match="twice"):
        AdapterRegistry(state)


def test_a_version_1_manifest_is_upgraded_with_each_adapters_files_hashed(tmp_path):
    """Manifests written before versions existed: each entry becomes one version whose id is its files' sha256
    (a folder that is gone gets an id derived from its path, and stays reported missing)."""
    state, files = tmp_path / "state", tmp_path / "files" / "a"
    files.mkdir(parents=True)
    (files / "adapter_config.json").write_text('{"r": 4,  "peft_type": "LORA"}')
    (files / "adapter_model.safetensors").write_bytes(b"weights")
    state.mkdir()
    entries = [{"name": n, "source": "upload", "local_dir": str(d), "pinned": n == "a", "created_at": 7.5,
                "meta": {"rank": 4}} for n, d in (("a", files), ("gone", tmp_path / "nowhere"))]
    (state / "registry.json").write_text(json.dumps({"version": 1, "adapters": entries}))
    reg = AdapterRegistry(state)
    a = reg.get("a")
    assert a.current.sha256 == dir_digest(files) and a.pinned and a.meta == {"rank": 4} and len(a.versions) == 1
    assert reg.get("gone").current.sha256 == hashlib.sha256(f"unreadable:{tmp_path / 'nowhere'}".encode()).hexdigest()
    assert reg.missing_on_load == ("gone",)
    assert json.loads((state / "registry.json").read_text())["version"] == 2  # stored upgraded
    assert AdapterRegistry(state).get("a") == a


# -- concurrency (BAD_INPUTS row 19) ----------------------------------------------------------------------


def _slow_writes(monkeypatch) -> None:
    """Widen the check-then-write window so that a missing lock would let several adds through."""
    real = registry_mod.atomic_write_bytes

    def slow(path: Path, data: bytes) -> None:
        time.sleep(0.02)
        real(path, data)

    monkeypatch.setattr(registry_mod, "atomic_write_bytes", slow)


def _run_threads(n: int, target) -> None:
    barrier = threading.Barrier(n)
    threads = [threading.Thread(target=lambda i=i: (barrier.wait(), target(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)


def test_concurrent_add_of_same_name_gives_one_success(tmp_path, monkeypatch):
    _slow_writes(monkeypatch)
    reg = AdapterRegistry(tmp_path / "state")
    outcomes: list[str] = []

    def add(i: int) -> None:
        try:
            reg.add(_record("same", tmp_path, meta={"thread": i}))
            outcomes.append("ok")
        except AdapterConflictError:
            outcomes.append("409")

    _run_threads(8, add)
    assert sorted(outcomes) == ["409"] * 7 + ["ok"]
    reopened = AdapterRegistry(tmp_path / "state")
    assert len(reopened) == 1 and reopened.get("same") == reg.get("same")


def test_concurrent_adds_of_distinct_names_lose_nothing(tmp_path, monkeypatch):
    _slow_writes(monkeypatch)
    reg = AdapterRegistry(tmp_path / "state")
    _run_threads(8, lambda i: reg.add(_record(f"a{i}", tmp_path)))
    assert sorted(r.name for r in AdapterRegistry(tmp_path / "state").list()) == [f"a{i}" for i in range(8)]


# -- kill -9 consistency (Faults) -------------------------------------------------------------------------

_CHILD = r"""
import os, sys, time
from pathlib import Path
from loraplex.adapters import registry as R

state, mode, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

def stall():
    ready.write_text("stalled")
    time.sleep(120)

if mode == "mid_write":  # half of the new manifest reaches the temp file, then the process dies
    real_fdopen = os.fdopen
    class Half:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *exc): self.f.close()
        def write(self, data):
            self.f.write(data[: len(data) // 2]); self.f.flush(); stall()
    os.fdopen = lambda fd, *a, **k: Half(real_fdopen(fd, *a, **k))
elif mode == "before_replace":  # temp file complete, rename not yet done
    os.fsync = lambda fd: stall()
elif mode == "after_replace":  # renamed, directory not yet fsynced
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst); stall()
    os.replace = replace

reg = R.AdapterRegistry(state)
if mode == "loop":  # add adapters as fast as possible until killed
    ready.write_text("started")
    for i in range(100000):
        reg.add(R.AdapterRecord.of(f"n{i}", R.AdapterVersion("0" * 64, "upload", str(state), meta={"i": i})))
else:
    reg.add(R.AdapterRecord.of("new", R.AdapterVersion("0" * 64, "upload", str(state))))
"""


def _spawn_and_kill(state: Path, mode: str, delay_s: float = 0.0) -> None:
    ready = state.parent / f"ready-{mode}-{random.random()}"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(state), mode, str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert child.poll() is None, f"child exited early with {child.returncode}"
            assert time.monotonic() < deadline, "child never reached the kill point"
            time.sleep(0.01)
        time.sleep(delay_s)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("mid_write", ["old"]), ("before_replace", ["old"]), ("after_replace", ["old", "new"])],
)
def test_kill_9_during_add_leaves_old_or_new_manifest(tmp_path, mode, expected):
    state = tmp_path / "state"
    AdapterRegistry(state).add(AdapterRecord.of("old", AdapterVersion("0" * 64, "upload", str(state))))
    _spawn_and_kill(state, mode)
    reopened = AdapterRegistry(state)
    assert [r.name for r in reopened.list()] == expected
    assert list(state.glob("registry.json.*")) == []  # the interrupted temp file is cleaned up


def test_kill_9_at_random_moments_never_tears_the_manifest(tmp_path):
    rng = random.Random(1234)
    for attempt in range(3):
        state = tmp_path / f"state{attempt}"
        _spawn_and_kill(state, "loop", delay_s=rng.uniform(0.05, 0.3))
        names = [r.name for r in AdapterRegistry(state).list()]
        assert names == [f"n{i}" for i in range(len(names))]  # a prefix of what was added: no tear, no gap
