"""AdapterResolver on its own: which names it may resolve (a pure string check), the paths it registers, the
memory of misses (TTL, bound, never 5xx), and its flags' validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraplex.adapters import resolver as R
from loraplex.adapters.errors import (
    AdapterCommandTimeout,
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterValidationError,
)


class Calls:
    """A stand-in for AdapterStore.register_path: records calls, raises what it is told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.raises: BaseException | None = None

    def __call__(self, name: str, path: str) -> None:
        self.calls.append((name, path))
        if self.raises is not None:
            raise self.raises


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "models" / "team").mkdir(parents=True)
    return tmp_path


def make(root: Path, location: str = "models/team", **kw) -> tuple[R.AdapterResolver, Calls]:
    calls = Calls()
    where = location if location.startswith("s3://") else str(root / location)
    return R.AdapterResolver(R.ResolverConfig(where, **kw), calls, root), calls


def test_a_name_is_registered_from_the_folder_relative_to_the_root(root):
    resolver, calls = make(root)
    resolver.resolve("my-adapter.v2")
    assert calls.calls == [("my-adapter.v2", "models/team/my-adapter.v2")]
    assert resolver.counts["registered"] == 1
    at_root, calls = make(root, ".")
    at_root.resolve("x")
    assert calls.calls == [("x", "./x")]
    s3, calls = make(root, "s3://bucket/some/prefix/")
    s3.resolve("x")
    assert calls.calls == [("x", "s3://bucket/some/prefix/x")]


@pytest.mark.parametrize("name", ["..", ".", "a" * 65, "a/b", "../x", "", "a b", "naïve", "a@b"])
def test_names_the_pattern_refuses_touch_nothing(root, monkeypatch, name):
    resolver, calls = make(root)

    def no_filesystem(*args: object, **kw: object) -> None:
        raise AssertionError("the filesystem was touched")

    for fn in ("stat", "lstat", "open", "listdir", "scandir"):
        monkeypatch.setattr(os, fn, no_filesystem)
    assert not resolver.eligible(name)
    with pytest.raises(AdapterNotFoundError):
        resolver.resolve(name)
    assert calls.calls == [] and resolver.counts["refused"] == 1


def test_a_custom_pattern_is_a_full_match(root):
    resolver, calls = make(root, pattern=r"team-[a-z]+")
    assert resolver.eligible("team-abc") and not resolver.eligible("team-abc1") and not resolver.eligible("xteam-a")


def test_a_miss_is_remembered_for_the_ttl_and_said_for_the_request(root, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(R.time, "monotonic", lambda: clock[0])
    resolver, calls = make(root, negative_ttl_s=30)
    calls.raises = AdapterNotFoundError("adapter path 'models/team/gone' does not exist", field="path")
    with pytest.raises(AdapterNotFoundError, match="the resolver has no 'models/team/gone'") as first:
        resolver.resolve("gone")
    assert first.value.field == "model"
    with pytest.raises(AdapterNotFoundError) as second:
        resolver.resolve("gone")
    assert second.value is first.value and len(calls.calls) == 1 and resolver.counts["cached_miss"] == 1
    clock[0] += 30
    with pytest.raises(AdapterNotFoundError):
        resolver.resolve("gone")
    assert len(calls.calls) == 2  # expired: tried again


def test_invalid_files_are_remembered_with_their_own_status_but_server_faults_are_not(root):
    resolver, calls = make(root)
    calls.raises = AdapterValidationError("adapter_config.json is not valid JSON", field="adapter_config.json")
    with pytest.raises(AdapterValidationError, match="could not be resolved from 'models/team/bad'.*not valid JSON"):
        resolver.resolve("bad")
    assert resolver.remembered_miss("bad") is not None
    calls.raises = AdapterCommandTimeout("the engine did not apply it")
    with pytest.raises(AdapterCommandTimeout):
        resolver.resolve("slow")
    assert resolver.remembered_miss("slow") is None  # a 503 is worth retrying at once


def test_the_memory_of_misses_is_bounded(root, monkeypatch):
    monkeypatch.setattr(R, "MAX_REMEMBERED_MISSES", 3)
    resolver, calls = make(root)
    calls.raises = AdapterNotFoundError("nope", field="path")
    for i in range(5):
        with pytest.raises(AdapterNotFoundError):
            resolver.resolve(f"n{i}")
    assert [n for n in (f"n{i}" for i in range(5)) if resolver.remembered_miss(n)] == ["n2", "n3", "n4"]


def test_a_name_registered_meanwhile_counts_as_resolved(root):
    resolver, calls = make(root)
    calls.raises = AdapterConflictError("adapter 'x' is already registered", field="name")
    resolver.resolve("x")  # no error: the name is there now
    assert resolver.remembered_miss("x") is None


@pytest.mark.parametrize(("kw", "says"), [
    ({"pattern": "("}, "--adapter-resolver-pattern"),
    ({"negative_ttl_s": -1}, "--adapter-resolver-negative-ttl"),
    ({"location": "s3://Bad_Bucket/x"}, "--adapter-resolver"),
])
def test_bad_flags_name_the_flag(kw, says):
    with pytest.raises(ValueError, match=says):
        R.ResolverConfig(**{"location": "/x", **kw})


def test_a_folder_must_lie_inside_the_adapter_root(root, tmp_path_factory):
    register = Calls()
    outside = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(ValueError, match="must be a folder inside --adapter-root"):
        R.AdapterResolver(R.ResolverConfig(str(outside)), register, root)
    with pytest.raises(ValueError, match="needs --adapter-root"):
        R.AdapterResolver(R.ResolverConfig(str(root / "models")), register, None)
    with pytest.raises(ValueError, match="does not exist"):
        R.AdapterResolver(R.ResolverConfig(str(root / "nowhere")), register, root)
    (root / "models" / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="must be a folder inside --adapter-root"):
        R.AdapterResolver(R.ResolverConfig(str(root / "models" / "link")), register, root)
