"""SharedRegistry against a real S3-compatible server (moto): several replicas' registries on one manifest,
conditional writes under contention, propagation by refresh, corrupt or missing manifests and buckets."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading

import boto3
import pytest

from loraplex.adapters import versions as V
from loraplex.adapters.digest import dir_digest
from loraplex.adapters.errors import AdapterConflictError, AdapterNotFoundError
from loraplex.adapters.registry import AdapterRecord, AdapterVersion, ManifestError
from loraplex.adapters.registry_s3 import SharedRegistry
from loraplex.adapters.sources.s3 import S3UnavailableError

_buckets = itertools.count()


@pytest.fixture
def url(s3_endpoint) -> str:
    """A fresh bucket per test (moto keeps state for the session)."""
    bucket = f"registry-{next(_buckets)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/team/prod"


def replica(url: str, endpoint: str) -> SharedRegistry:
    return SharedRegistry(url, endpoint)


def version(seed: str, remote: str | None = None) -> AdapterVersion:
    return AdapterVersion(hashlib.sha256(seed.encode()).hexdigest(), "upload", "", meta={"rank": 4},
                          remote=remote or f"s3://x/{seed}")


def record(name: str, remote: str | None = None) -> AdapterRecord:
    return AdapterRecord.of(name, version(name, remote))


def test_a_registration_through_one_replica_reaches_the_other_on_refresh(url, s3_endpoint):
    a, b = replica(url, s3_endpoint), replica(url, s3_endpoint)
    a.add(record("one"))
    assert "one" in a and "one" not in b  # b has not polled yet
    assert b.refresh() is True
    assert b.get("one") == a.get("one") and b.get("one").meta == {"rank": 4}
    assert b.refresh() is False  # 304: nothing changed
    b.remove("one")
    assert a.refresh() is True and "one" not in a


def test_changes_start_from_the_newest_manifest_even_without_a_refresh(url, s3_endpoint):
    a, b = replica(url, s3_endpoint), replica(url, s3_endpoint)
    a.add(record("one"))
    b.add(record("two"))  # b never refreshed: its write must not drop "one"
    assert {r.name for r in b.list()} == {"one", "two"}
    with pytest.raises(AdapterConflictError, match="'one' is already registered"):
        b.add(record("one"))
    a.remove("two")  # a never saw "two": the remove reads it first
    with pytest.raises(AdapterNotFoundError, match="'two' is not registered"):
        b.remove("two")
    a.refresh()
    b.refresh()
    assert [r.name for r in a.list()] == [r.name for r in b.list()] == ["one"]


def test_concurrent_registrations_from_many_replicas_lose_none(url, s3_endpoint):
    """8 replicas x 5 names each, all at once: every one lands (the conditional write retries lost races)."""
    replicas = [replica(url, s3_endpoint) for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(replicas))

    def register(i: int, reg: SharedRegistry) -> None:
        start.wait()
        try:
            for j in range(5):
                reg.add(record(f"r{i}-n{j}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i, r)) for i, r in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    fresh = replica(url, s3_endpoint)
    assert {r.name for r in fresh.list()} == {f"r{i}-n{j}" for i in range(8) for j in range(5)}


def test_one_name_registered_by_many_replicas_at_once_wins_once(url, s3_endpoint):
    replicas = [replica(url, s3_endpoint) for _ in range(6)]
    outcomes: list[str] = []
    start = threading.Barrier(len(replicas))

    def register(i: int, reg: SharedRegistry) -> None:
        start.wait()
        try:
            reg.add(record("same", remote=f"s3://x/same/{i}"))
            outcomes.append(f"won {i}")
        except AdapterConflictError:
            outcomes.append("409")

    threads = [threading.Thread(target=register, args=(i, r)) for i, r in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("409") == 5
    assert replica(url, s3_endpoint).get("same").remote == f"s3://x/same/{winners[0].split()[1]}"


def test_a_corrupt_manifest_stops_a_start_and_keeps_a_running_view(url, s3_endpoint):
    a = replica(url, s3_endpoint)
    a.add(record("one"))
    bucket, prefix = url[5:].split("/", 1)
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key=f"{prefix}/registry.json",
                                                            Body=b"{not json")
    with pytest.raises(ManifestError, match=rf"{url}/registry.json is corrupt"):
        replica(url, s3_endpoint)
    with pytest.raises(ManifestError):
        a.refresh()
    assert "one" in a  # the last good view keeps serving
    with pytest.raises(S3UnavailableError, match="corrupt"):  # and no change overwrites what it cannot read
        a.add(record("two"))


def test_a_missing_bucket_names_the_flag(s3_endpoint):
    with pytest.raises(ValueError, match=r"--registry: the bucket of s3://no-such-bucket/p does not exist"):
        SharedRegistry("s3://no-such-bucket/p", s3_endpoint)


@pytest.mark.parametrize("bad", ["s3://", "s3://A_bad/x", "http://bucket/x"])
def test_a_bad_url_names_the_flag(bad, s3_endpoint):
    with pytest.raises(ValueError, match="--registry"):
        SharedRegistry(bad, s3_endpoint)


def test_an_unreachable_store_is_a_502_naming_it(url):
    with pytest.raises(S3UnavailableError, match="cannot reach"):
        SharedRegistry(url, "http://127.0.0.1:9")  # discard port: connection refused


def test_files_are_copied_under_a_fresh_key_per_registration_and_deleted(url, s3_endpoint, tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(name.encode())
    reg = replica(url, s3_endpoint)
    first, second = reg.upload_files("one", tmp_path), reg.upload_files("one", tmp_path)
    assert first != second and first.startswith(f"{url}/adapters/one/")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket, key = first[5:].split("/", 1)
    assert client.get_object(Bucket=bucket, Key=f"{key}/adapter_config.json")["Body"].read() == b"adapter_config.json"
    reg.delete_files(first)
    assert client.list_objects_v2(Bucket=bucket, Prefix=key + "/").get("KeyCount", 0) == 0
    assert client.list_objects_v2(Bucket=bucket, Prefix=second[5:].split("/", 1)[1] + "/")["KeyCount"] == 2


def test_versions_replaced_by_many_replicas_at_once_all_land_in_the_history(url, s3_endpoint):
    """Replaces are compare-and-swap too: 4 replicas each make their own version current at once; every version
    is in the history afterwards (none lost) and exactly one is current."""
    first = replica(url, s3_endpoint)
    first.add(record("a"))
    replicas = [replica(url, s3_endpoint) for _ in range(4)]
    start = threading.Barrier(len(replicas))

    def replace(i: int, reg: SharedRegistry) -> None:
        start.wait()
        reg.update(lambda r: V.register_version(r, "a", version(f"v{i}"), replace_=True, pinned=None, history=8))

    threads = [threading.Thread(target=replace, args=(i, r)) for i, r in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = [v.sha256 for v in replica(url, s3_endpoint).get("a").versions]
    assert sorted(history) == sorted(version(s).sha256 for s in ("a", "v0", "v1", "v2", "v3"))
    assert history[-1] == version("a").sha256  # the first registration: least recently current


def test_a_route_and_a_rollback_reach_the_other_replica_on_refresh(url, s3_endpoint):
    a, b = replica(url, s3_endpoint), replica(url, s3_endpoint)
    a.add(record("a"))
    a.update(lambda r: V.register_version(r, "a", version("v2"), replace_=True, pinned=None, history=5))
    a.update(lambda r: V.set_route(r, "a", [(version("a").sha256[:8], 90), (version("v2").sha256[:8], 10)], "user"))
    assert b.refresh() and b.get("a").route == a.get("a").route
    a.update(lambda r: V.rollback(r, "a", None, 5))
    assert b.refresh() and b.get("a").current.sha256 == version("a").sha256 and b.get("a").route is None


def test_a_version_1_shared_manifest_is_read_with_digests_of_its_copies(url, s3_endpoint, tmp_path):
    """A manifest an older replica wrote (no versions): each entry's digest is computed from its copy in the
    store, and the next change writes version 2."""
    for name, body in (("adapter_config.json", b'{"r": 4}'), ("adapter_model.safetensors", b"weights")):
        (tmp_path / name).write_bytes(body)
    reg = replica(url, s3_endpoint)
    remote = reg.upload_files("old", tmp_path)
    bucket, prefix = url[5:].split("/", 1)
    entry = {"name": "old", "source": "upload", "local_dir": "", "pinned": False, "created_at": 1.0,
             "meta": {"rank": 4}, "remote": remote}
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket=bucket, Key=f"{prefix}/registry.json",
                      Body=json.dumps({"version": 1, "adapters": [entry]}).encode())
    fresh = replica(url, s3_endpoint)
    assert fresh.get("old").current.sha256 == dir_digest(tmp_path) and fresh.get("old").remote == remote
    fresh.add(record("new"))
    body = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/registry.json")["Body"].read())
    assert body["version"] == 2 and {e["name"] for e in body["adapters"]} == {"old", "new"}
