"""AdapterStore: registration by path and upload, the durable record, the hand-off to the engine's adapter
state (commands through its port, records from its snapshot), unregistering, concurrency (same name, distinct
names, pin budget) and leftovers of a crash."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraplex.adapters.errors import (
    AdapterBadNameError,
    AdapterConflictError,
    AdapterForbiddenError,
    AdapterNotFoundError,
    AdapterValidationError,
)
from loraplex.adapters.host_loader import HostLoader
from loraplex.adapters.port import AdapterPort
from loraplex.adapters.slot_table import SlotState, SlotTable
from loraplex.adapters.store import AdapterStore, StoreConfig
from loraplex.adapters.weights import AdapterWeights

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def module_shapes(tiny_model_dir) -> dict[str, tuple[int, int]]:
    """The shapes the server validates against: those of the injected MultiLoRA layers of the tiny llama."""
    from loraplex.adapters.inject import inject_multi_lora
    from loraplex.server.config import ModelConfig
    from loraplex.server.model_loader import load_model

    model = load_model(ModelConfig(path=tiny_model_dir("llama"), device="cpu", dtype="float32")).model
    return inject_multi_lora(model, num_slots=1, max_rank=8, dtype=torch.float32).module_shapes()


@pytest.fixture(scope="module")
def good(adapter_dir) -> Path:
    return adapter_dir("llama", 8, ("q_proj", "v_proj"), 3)


@pytest.fixture(scope="module")
def other(adapter_dir) -> Path:
    return adapter_dir("llama", 4, ("q_proj", "k_proj", "v_proj", "o_proj"), 4)


@pytest.fixture
def root(tmp_path, good, other) -> Path:
    root = tmp_path / "root"
    for i in range(6):
        shutil.copytree(good, root / f"good{i}")
    shutil.copytree(other, root / "other")
    return root


class FakeDevice:
    """Slot writer/clearer: which adapter (by weights identity) sits in each slot."""

    def __init__(self, n: int) -> None:
        self.slots: list[AdapterWeights | None] = [None] * n

    def write(self, slot: int, w: AdapterWeights) -> None:
        self.slots[slot] = w

    def clear(self, slot: int) -> None:
        self.slots[slot] = None


class EngineSide:
    """The engine's adapter state, driven by the test instead of an engine thread: a SlotTable, a real
    HostLoader reading through the store, fake device slots, and the port's inbox applied by `apply()` (what
    LLMEngine.apply_adapter_messages does at each step start)."""

    def __init__(self, store: AdapterStore, num_slots: int) -> None:
        self.port, self.device = AdapterPort(), FakeDevice(num_slots)
        self.loader = HostLoader(store.load_weights, self.port.put, self.port.wake, pin_memory=False)
        self.table = SlotTable(num_slots=num_slots, max_host=4, request_load=self.loader.submit,
                               clear_slot=self.device.clear, is_registered=self.port.registered)
        store.attach(self.port)

    def apply(self) -> None:
        msgs = self.port.drain()
        for msg in msgs:
            self.table.apply(msg)
        self.table.load_due(self.device.write)
        self.port.publish(self.table.snapshot(), msgs)

    def acquire(self, name: str) -> AdapterWeights:
        """Ask as the scheduler does until READY (one reference); the weights in its slot. Waits for the host
        loader's messages, never sleeps; AssertionError with the reason if the load fails."""
        for _ in range(100):
            self.apply()
            got = self.table.acquire(name)
            if got.state is SlotState.READY:
                return self.device.slots[got.slot]
            assert got.state is not SlotState.ERRORED, got.reason
            if not self.table.copies_pending():
                assert self.port.wait_for_message(30), "the host loader never answered"
        raise AssertionError("never ready")


@pytest.fixture
def make_store(tmp_path, root, module_shapes) -> Callable[..., AdapterStore]:
    sides: list[EngineSide] = []

    def build(num_slots: int = 3, attach: bool = True, state: Path | None = None, registry: str | None = None,
                  s3_endpoint: str | None = None) -> AdapterStore:
        config = StoreConfig(state or tmp_path / "state", root, max_lora_rank=16, max_upload_bytes=10**6,
                             s3_endpoint=s3_endpoint, registry_url=registry)
        store = AdapterStore(config, module_shapes, num_slots)
        if attach:
            sides.append(EngineSide(store, num_slots))
            store.engine_side = sides[-1]  # for the tests' eyes
        return store

    yield build
    for side in sides:
        side.loader.close()


def files_of(adapter: Path) -> dict[str, bytes]:
    return {name: (adapter / name).read_bytes() for name in (CONFIG, WEIGHTS)}


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload_dirs(store: AdapterStore) -> list[str]:
    return sorted(p.name for p in store.upload.owned_dir.iterdir())


# ---------------------------------------------------------------------------------------------------------
# registering and describing
# ---------------------------------------------------------------------------------------------------------


def test_register_path_validates_records_and_describes(make_store, root):
    store = make_store()
    record = store.register_path("g", "good0")
    assert record.source == "local:good0" and Path(record.local_dir) == (root / "good0").resolve()
    info = store.describe("g")
    assert {k: info[k] for k in ("name", "rank", "alpha", "pinned", "state", "error")} == {
        "name": "g", "rank": 8, "alpha": 16, "pinned": False, "state": "ready", "error": None}
    assert sorted(info["target_modules"]) == ["q_proj", "v_proj"]  # PEFT writes a set: order varies
    # 2 layers x (q: A 8x64 + B 64x8, v: A 8x64 + B 32x8) fp32
    assert info["size_bytes"] == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8) * 4
    assert info["tier"] == "disk"  # no engine has applied the registration's commands yet
    store.engine_side.apply()
    assert store.describe("g")["tier"] == "host"  # the validation read seeded the host tier
    assert "g" in store and store.names() == ["g"] and store.get("g") == record
    assert info["created_at"] > 0 and info["load_stats"] == {}


def test_with_an_engine_thread_admin_calls_answer_once_the_engine_applied_them(make_store):
    """As the server runs: registration returns only once the engine thread took the adapter in (a describe
    right after shows the host tier), and unregistering only once its slot was freed."""
    store = make_store(num_slots=2)
    side, stop = store.engine_side, threading.Event()
    side.port.engine_running = lambda: not stop.is_set()

    def engine_thread() -> None:
        while not stop.is_set():
            if side.port.wait_for_message(0.01):
                side.apply()

    thread = threading.Thread(target=engine_thread)
    thread.start()
    try:
        store.register_path("g", "good0", pinned=True)
        assert store.describe("g")["tier"] in ("host", "device")  # the pin's read may have landed too
        store.unregister("g")
        assert side.port.snapshot.view("g").tier == "disk" and side.port.snapshot.resident["device"] == ()
    finally:
        stop.set()
        thread.join(30)


@pytest.mark.parametrize("cuda", [False, True])
def test_registration_seeds_the_host_tier_pinned_where_cuda_is(make_store, monkeypatch, cuda):
    """The validation read seeds the host tier: page-locked on a CUDA machine, as the host loader's reads are, so
    a fresh adapter's first slot copy is asynchronous (pinning itself needs CUDA: recorded here, not done)."""
    asked: list[bool] = []
    real = AdapterWeights.prepared

    def prepared(self: AdapterWeights, *, pin: bool = False) -> AdapterWeights:
        asked.append(pin)
        return real(self, pin=False)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(AdapterWeights, "prepared", prepared)
    store = make_store()
    store.register_path("g", "good0")
    assert asked == [cuda]


def test_without_an_engine_the_tier_is_disk(make_store):
    store = make_store(attach=False)
    store.register_path("g", "good0")
    assert store.describe("g")["tier"] == "disk" and store.describe("g")["state"] == "ready"


def test_the_record_survives_a_restart(make_store, tmp_path):
    store = make_store()
    store.register_path("g", "good0", pinned=True)
    store.register_upload("u", files_of(store.local.resolve("other")))
    again = make_store()
    assert again.names() == ["g", "u"] and again.get("g").pinned and again.get("u").source == "upload"
    again.engine_side.apply()
    table = again.engine_side.table  # attach re-pins what the manifest says is pinned
    assert table.is_pinned("g") and not table.is_pinned("u")
    assert torch.equal(again.load_weights("u").modules["model.layers.0.self_attn.q_proj"].a,
                       store.load_weights("u").modules["model.layers.0.self_attn.q_proj"].a)


def test_uploads_as_files_streams_or_archive(make_store, other):
    store = make_store()
    files = files_of(other)
    store.register_upload("as-bytes", files)
    store.register_upload("as-streams", {k: io.BytesIO(v) for k, v in files.items()})
    store.register_upload("as-archive", io.BytesIO(tar_gz(files)))
    metas = [store.get(n).meta for n in ("as-bytes", "as-streams", "as-archive")]
    assert metas[0] == metas[1] == metas[2] and metas[0]["rank"] == 4
    assert [d.rsplit("-", 1)[0] for d in upload_dirs(store)] == ["as-archive", "as-bytes", "as-streams"]


@pytest.mark.parametrize(("name", "error"), [("a/b", AdapterBadNameError), ("", AdapterBadNameError),
                                             ("..", AdapterBadNameError)])
def test_bad_names_are_refused_before_anything_is_read(make_store, name, error):
    store = make_store()
    with pytest.raises(error):
        store.register_upload(name, {CONFIG: b"x", WEIGHTS: b"y"})
    assert upload_dirs(store) == []


def test_duplicates_are_409_and_leave_no_copy(make_store, other):
    store = make_store()
    store.register_path("d", "good0")
    for call in (lambda: store.register_path("d", "good1"), lambda: store.register_upload("d", files_of(other))):
        with pytest.raises(AdapterConflictError, match="already registered"):
            call()
    assert upload_dirs(store) == [] and store.get("d").source == "local:good0"


def test_invalid_adapters_are_refused_and_their_upload_discarded(make_store, other, root):
    store = make_store()
    files = files_of(other)
    with pytest.raises(AdapterValidationError, match=CONFIG):
        store.register_upload("bad", {CONFIG: b"{]", WEIGHTS: files[WEIGHTS]})
    with pytest.raises(AdapterValidationError):
        store.register_upload("bad", {CONFIG: files[CONFIG], WEIGHTS: files[WEIGHTS][:-4]})
    cfg = json.loads(files[CONFIG])
    cfg["r"] = 32
    with pytest.raises(AdapterValidationError, match="32.*16"):
        store.register_upload("bad", {CONFIG: json.dumps(cfg).encode(), WEIGHTS: files[WEIGHTS]})
    with pytest.raises(AdapterForbiddenError):
        store.register_path("bad", "../root/../..")
    with pytest.raises(AdapterNotFoundError):
        store.register_path("bad", "nope")
    assert upload_dirs(store) == [] and store.names() == [] and (root / "other" / WEIGHTS).exists()


# ---------------------------------------------------------------------------------------------------------
# unregistering
# ---------------------------------------------------------------------------------------------------------


def test_unregister_removes_record_copy_and_cached_copies_but_never_user_files(make_store, root, other):
    store = make_store()
    store.register_path("p", "good0")
    store.register_upload("u", files_of(other))
    assert store.unregister("u").name == "u" and upload_dirs(store) == []
    assert store.unregister("p").source == "local:good0"
    assert (root / "good0" / WEIGHTS).exists() and store.names() == []
    store.engine_side.apply()
    assert store.engine_side.table.resident() == {"device": [], "host": []}
    for call in (lambda: store.unregister("p"), lambda: store.describe("p"), lambda: store.load_weights("p")):
        with pytest.raises(AdapterNotFoundError, match="'p'"):
            call()


def test_registering_again_after_unregister_serves_the_new_files(make_store, root, other):
    store = make_store()
    store.register_path("x", "good0")
    side = store.engine_side
    slot_weights = side.acquire("x")
    side.table.release("x")
    store.unregister("x")
    store.register_path("x", "other")
    again = side.acquire("x")
    assert again is not slot_weights and slot_weights.max_rank == 8 and again.max_rank == 4


def test_a_request_for_an_adapter_deleted_meanwhile_evicts_nothing(make_store):
    """Race: a request is added just as its adapter is DELETEd. Its acquire must not evict a resident
    adapter for a load of a name the registry no longer holds (that load could only fail)."""
    store = make_store(num_slots=1)
    store.register_path("a", "good0")
    store.register_path("b", "good1")
    side = store.engine_side
    resident = side.acquire("a")
    side.table.release("a")
    store.unregister("b")  # the registry drops it at once; the engine applies the forget at its next step
    got = side.table.acquire("b")
    assert got.state is SlotState.ERRORED and got.reason == "adapter 'b' is not registered"
    assert side.table.tier("a") == "device" and side.device.slots == [resident]
    assert side.table.stats.evictions["device"] == 0 and store.describe("a")["state"] == "ready"


def test_files_vanishing_after_registration_mark_only_that_adapter_errored(make_store, root):
    store = make_store(num_slots=2)
    store.register_path("gone", "good0")
    store.register_path("fine", "good1")
    side = store.engine_side
    side.apply()
    side.table.forget("gone")  # drop the host copy seeded by registration (as LRU eviction would)
    shutil.rmtree(root / "good0")
    with pytest.raises(AssertionError, match="does not exist"):
        side.acquire("gone")
    info = store.describe("gone")
    assert info["state"] == "errored" and "does not exist" in info["error"]
    assert store.describe("fine")["state"] == "ready" and side.acquire("fine").max_rank == 8


@pytest.mark.parametrize("swapped", ["dir", "file"])
def test_files_swapped_for_an_outside_link_after_registration_are_never_read(make_store, root, tmp_path, swapped):
    """The adapter dir (or its weights) becomes a symlink to a valid copy outside the root after
    registration: the load refuses it, marks only that adapter errored, and reads nothing outside."""
    store = make_store(num_slots=2)
    store.register_path("swapped", "good0")
    store.register_path("fine", "good1")
    side = store.engine_side
    side.apply()
    side.table.forget("swapped")  # drop the host copy seeded by registration (as LRU eviction would)
    victim = root / "good0" if swapped == "dir" else root / "good0" / WEIGHTS
    outside = tmp_path / "outside_copy"
    shutil.move(victim, outside)
    victim.symlink_to(outside)
    outside_file = outside / WEIGHTS if swapped == "dir" else outside
    outside_file.write_bytes(b"\xff" * 16)  # had it been read, the error would say "corrupt"
    with pytest.raises(AssertionError, match="outside --adapter-root"):
        side.acquire("swapped")
    info = store.describe("swapped")
    assert info["state"] == "errored" and "'good0' is outside --adapter-root" in info["error"]
    assert store.describe("fine")["state"] == "ready" and side.acquire("fine").max_rank == 8


# ---------------------------------------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------------------------------------


def _run(n: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_concurrent_registrations_of_one_name_give_one_winner_and_one_copy(make_store, other, monkeypatch):
    store = make_store()
    validate, barrier = store.validate, threading.Barrier(4, timeout=10)

    def in_lockstep(local_dir: Path) -> AdapterWeights:
        barrier.wait()  # every thread has its own copy and validates before anyone writes the manifest
        return validate(local_dir)

    monkeypatch.setattr(store, "validate", in_lockstep)
    results: list[str] = []

    def register(i: int) -> None:
        try:
            if i % 2:
                store.register_upload("same", files_of(other))
            else:
                store.register_path("same", f"good{i}")
            results.append("ok")
        except AdapterConflictError:
            results.append("409")

    _run(4, register)
    assert sorted(results) == ["409", "409", "409", "ok"]
    source = store.get("same").source
    assert len(upload_dirs(store)) == (1 if source == "upload" else 0)  # the losers' copies are gone


def test_distinct_names_validate_in_parallel(make_store, monkeypatch):
    """Slow validation (big files, S3) of one adapter must not hold up the registration of another."""
    store = make_store()
    validate, barrier = store.validate, threading.Barrier(4, timeout=10)

    def in_lockstep(local_dir: Path) -> AdapterWeights:
        barrier.wait()  # would time out (BrokenBarrierError) if registrations were serialized
        return validate(local_dir)

    monkeypatch.setattr(store, "validate", in_lockstep)
    errors: list[Exception] = []

    def register(i: int) -> None:
        try:
            store.register_path(f"n{i}", f"good{i}")
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    _run(4, register)
    assert errors == [] and sorted(store.names()) == ["n0", "n1", "n2", "n3"]


def test_pin_budget_keeps_one_slot_free_even_under_races(make_store, monkeypatch):
    store = make_store(num_slots=3)
    validate, barrier = store.validate, threading.Barrier(4, timeout=10)
    monkeypatch.setattr(store, "validate", lambda d: (barrier.wait(), validate(d))[1])
    outcomes: list[str] = []

    def register(i: int) -> None:
        try:
            store.register_path(f"pin{i}", f"good{i}", pinned=True)
            outcomes.append("ok")
        except AdapterConflictError as exc:
            assert "--max-loras 3" in str(exc) and exc.field == "pinned"
            outcomes.append("409")

    _run(4, register)
    assert sorted(outcomes) == ["409", "409", "ok", "ok"]
    assert sum(store.get(n).pinned for n in store.names()) == 2
    monkeypatch.setattr(store, "validate", validate)
    store.register_path("unpinned", "good5")  # unpinned registrations are not limited
    with pytest.raises(AdapterConflictError, match="cannot pin more than 2"):
        store.register_path("pin9", "good5", pinned=True)


# ---------------------------------------------------------------------------------------------------------
# crash leftovers
# ---------------------------------------------------------------------------------------------------------


def test_copies_no_record_refers_to_are_removed_at_start(make_store, other, tmp_path):
    store = make_store()
    store.register_upload("kept", files_of(other))
    kept = upload_dirs(store)
    # What a kill -9 between the upload's final rename and the manifest write leaves behind:
    orphan = store.upload.owned_dir / "lost-0123456789abcdef"
    orphan.mkdir()
    (orphan / CONFIG).write_bytes(b"{}")
    s3_orphan = store.s3.owned_dir / "s3lost-0123"
    s3_orphan.mkdir()
    stray_file = store.upload.owned_dir / "note.txt"
    stray_file.write_text("not ours to judge")
    again = make_store()
    assert upload_dirs(again) == sorted([*kept, "note.txt"]) and not s3_orphan.exists()
    assert again.names() == ["kept"] and again.load_weights("kept").max_rank == 4


# -- a registry shared by replicas (--registry s3://…) ----------------------------------------------------


@pytest.fixture
def replicas(make_store, tmp_path, s3_endpoint) -> Callable[[int], list[AdapterStore]]:
    """`n` stores (replicas) with their own state dirs and engine sides, sharing one registry in moto."""
    import boto3

    bucket = f"shared-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)

    def build(n: int = 2) -> list[AdapterStore]:
        return [make_store(state=tmp_path / f"replica-{i}", registry=f"s3://{bucket}/fleet", s3_endpoint=s3_endpoint)
                for i in range(n)]

    return build


def test_shared_registration_is_served_by_the_other_replica_after_it_syncs(replicas, other):
    a, b = replicas(2)
    removed: list[str] = []
    b.on_removed = removed.append
    a.register_path("p", "good0")
    a.register_upload("u", files_of(other))
    assert a.get("p").local_dir == "" and a.get("p").remote.startswith("s3://")  # the manifest names no local dir
    assert b.names() == [] and b.sync() == ["p", "u"] and b.names() == ["p", "u"]
    assert b.sync() == []  # unchanged: a 304, nothing applied twice
    side = b.engine_side
    weights = side.acquire("u")  # b downloads u's files at its first load, from the registry's copy
    assert weights.max_rank == 4 and len(list(b.s3.owned_dir.iterdir())) == 1
    assert torch.equal(weights.modules["model.layers.0.self_attn.q_proj"].a,
                       a.load_weights("u").modules["model.layers.0.self_attn.q_proj"].a)
    side.table.release("u")
    a.unregister("u")
    assert b.sync() == ["u"] and removed == ["u"] and b.names() == ["p"]
    side.apply()
    assert side.table.tier("u") == "disk" and list(b.s3.owned_dir.iterdir()) == []  # slot and copy dropped
    with pytest.raises(AdapterNotFoundError):
        b.load_weights("u")


def test_shared_names_conflict_across_replicas_before_any_sync(replicas):
    a, b = replicas(2)
    a.register_path("x", "good0")
    with pytest.raises(AdapterConflictError, match="'x' is already registered"):
        b.register_path("x", "good1")  # b never synced: the conditional write read the newest manifest
    with pytest.raises(AdapterNotFoundError):
        b.unregister("nope")
    b.unregister("x")  # a replica may remove what another registered
    assert a.sync() == ["x"] and a.names() == []


def test_shared_reregistration_under_the_same_name_replaces_the_old_copy(replicas, other):
    a, b = replicas(2)
    a.register_path("x", "good0")
    b.sync()
    first = b.engine_side.acquire("x")
    b.engine_side.table.release("x")
    a.unregister("x")
    a.register_path("x", "other")  # b sees a different record under the same name in one poll
    assert b.sync() == ["x"]
    again = b.engine_side.acquire("x")
    assert first.max_rank == 8 and again.max_rank == 4


def test_shared_pins_and_restarts_come_from_the_manifest(replicas, make_store, tmp_path, s3_endpoint):
    a, b = replicas(2)
    a.register_path("pinned", "good0", pinned=True)
    b.sync()
    b.engine_side.apply()
    assert b.engine_side.table.is_pinned("pinned")
    restarted = make_store(state=tmp_path / "fresh-replica", registry=a.config.registry_url, s3_endpoint=s3_endpoint)
    assert restarted.names() == ["pinned"]  # a new replica starts from the shared manifest
    restarted.engine_side.apply()
    assert restarted.engine_side.table.is_pinned("pinned")


def test_shared_registration_that_loses_a_race_leaves_no_files_behind(replicas):
    import boto3

    a, b = replicas(2)
    a.register_path("x", "good0")
    url = a.config.registry_url
    bucket, prefix = url[5:].split("/", 1)
    client = boto3.client("s3", endpoint_url=a.config.s3_endpoint)

    def copies() -> int:
        return client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/adapters/x/").get("KeyCount", 0)

    assert copies() == 2
    with pytest.raises(AdapterConflictError):  # b's view is stale: it uploads, then loses the manifest write
        b.register_path("x", "good1")
    assert copies() == 2 and upload_dirs(b) == []


def test_a_load_between_a_poll_and_its_sync_finds_the_new_adapter(replicas):
    """The poll makes a record servable (the API and the slot table ask the registry) before `sync` applies
    it: a load in that window must read it, not call it unregistered (which errored it on that replica)."""
    a, b = replicas(2)
    a.register_path("x", "good0")
    assert b.registry.refresh()  # the poller's first half; sync's bookkeeping has not run yet
    assert b.load_weights("x").max_rank == 8
    assert b.sync() == ["x"] and b.load_weights("x").max_rank == 8


def test_changes_seen_by_this_replicas_own_write_are_applied_at_the_next_sync(replicas):
    a, b = replicas(2)
    a.register_path("x", "good0")
    b.register_path("y", "good1")  # its write read the newest manifest: b's view holds "x" already
    b.engine_side.apply()
    assert b.sync() == ["x"]  # applied although that poll itself saw no change
    a.unregister("x")
    b.register_path("z", "other")  # sees the deletion the same way
    assert b.sync() == ["x"] and b.names() == ["y", "z"]


def test_a_replica_registering_a_name_another_replica_deleted_forgets_its_old_copy(replicas):
    """Issue 19, bug 4: b's own write read a's DELETE of x before b's sync applied it; b then registered x again
    and overwrote its bookkeeping without forgetting the old copy, so the new rank-4 record was served with the
    old rank-8 weights still in the slot (until an eviction), and the old local copy leaked."""
    a, b = replicas(2)
    a.register_path("x", "good0")
    b.sync()
    side = b.engine_side
    assert side.acquire("x").max_rank == 8  # the old registration sits in a device slot on b
    side.table.release("x")
    removed: list[str] = []
    b.on_removed = removed.append
    a.unregister("x")
    b.register_path("y", "good1")  # b's conditional write reads the newest manifest: its view loses x
    b.register_path("x", "other")  # no sync ran in between: b's engine still holds the old x
    assert removed == ["x"]  # the old registration's queued requests fail, its metric labels go
    assert side.acquire("x").max_rank == 4
    assert len(list(b.s3.owned_dir.iterdir())) == 0  # b read its own upload in place: no download kept


def test_an_admin_command_the_engine_failed_to_apply_is_an_error_not_a_success(make_store):
    """Issue 19, bug 5: applying a command raised on the engine thread, yet it was marked applied and DELETE
    answered "slot freed". Now the caller gets AdapterCommandError (500) naming the command."""
    from loraplex.adapters.errors import AdapterCommandError

    store = make_store(num_slots=2)
    side, stop = store.engine_side, threading.Event()
    store.register_path("g", "good0")
    side.apply()
    side.port.engine_running = lambda: not stop.is_set()

    def broken_forget(name: str) -> None:
        raise KeyError(name)

    side.table.forget = broken_forget

    def engine_thread() -> None:  # what LLMEngine.apply_adapter_messages does with a failing message
        while not stop.is_set():
            if side.port.wait_for_message(0.01):
                msgs = side.port.drain()
                for msg in msgs:
                    try:
                        side.table.apply(msg)
                    except Exception as exc:  # noqa: BLE001
                        msg.fail(f"{type(exc).__name__}: {exc}")
                side.port.publish(side.table.snapshot(), msgs)

    thread = threading.Thread(target=engine_thread)
    thread.start()
    try:
        with pytest.raises(AdapterCommandError, match=r"failed to apply Forget\('g'\): KeyError") as err:
            store.unregister("g")
        assert err.value.status == 500
    finally:
        stop.set()
        thread.join(30)
