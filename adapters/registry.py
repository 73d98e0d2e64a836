"""The durable adapter registry: name → record, persisted as one JSON manifest in `--state-dir`.

Every change rewrites `state_dir/registry.json` atomically (temp file in the same directory, fsync,
`os.replace`, fsync of the directory), so a kill -9 at any instant leaves either the old or the new
manifest on disk, never a torn one. A corrupt manifest stops the server at start with the file's name:
it is never silently replaced, since that would drop every registered adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraplex.adapters.digest import DigestError, dir_digest
from loraplex.adapters.errors import AdapterConflictError, AdapterError, AdapterNotFoundError
from loraplex.adapters.names import validate_adapter_name

log = logging.getLogger(__name__)

MANIFEST_NAME = "registry.json"
MANIFEST_VERSION = 2  # 2: records hold versions (history, route); 1 (one set of files per name) is still read
LEGACY_MANIFEST_VERSION = 1
# Temp files are `registry.json.<random>.tmp`; only a crash mid-write leaves one behind.
_TMP_SUFFIX = ".tmp"


class ManifestError(RuntimeError):
    """The manifest on disk cannot be read or parsed; raised at start, naming the file."""


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable version of an adapter: its files and their sha256 (adapters/digest.py), never changed.

    `source` says where it came from: "local:<path under the root>", "upload", "weights" (a raw safetensors
    body, PUT /v1/adapters/{name}/weights) or "s3://bucket/prefix". `meta` is free-form and JSON-serializable
    (rank, alpha, target_modules, size_bytes…), filled after validation. `remote` is set in a shared registry
    (`--registry s3://…`): the URL of the copy every replica reads (unique per registration); `local_dir` is
    then "" in the manifest, each replica keeping its own copy where it likes.
    """

    sha256: str
    source: str
    local_dir: str
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    remote: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, entry: object, name: str) -> AdapterVersion:
        if not isinstance(entry, dict):
            raise ValueError(f"entry {name!r}: a version is a {type(entry).__name__}, not an object")
        _check_fields(entry, name, {"sha256": str, "source": str, "local_dir": str, "created_at": (int, float),
                                    "meta": dict})
        if not _is_sha256(entry["sha256"]):
            raise ValueError(f"entry {name!r}: version {entry['sha256']!r} is not a sha256 hex digest")
        remote = entry.get("remote")
        if remote is not None and not isinstance(remote, str):
            raise ValueError(f"entry {name!r}: field 'remote' is not a string")
        return cls(entry["sha256"], entry["source"], entry["local_dir"], entry["created_at"], entry["meta"], remote)


@dataclass(frozen=True)
class Route:
    """A canary split of one adapter's traffic: `splits` = ((sha256, weight), ...), weights > 0. `sticky`:
    "user" picks a request's version by a hash of its route key (the OpenAI `user`, or X-Loraplex-Route-Key), so
    one user stays on one version; "none" draws every request at random (by weight)."""

    splits: tuple[tuple[str, int], ...]
    sticky: str = "user"

    def to_json(self) -> dict[str, Any]:
        return {"splits": [[sha, weight] for sha, weight in self.splits], "sticky": self.sticky}

    @classmethod
    def from_json(cls, entry: object, name: str) -> Route:
        ok = isinstance(entry, dict) and isinstance(entry.get("splits"), list) and entry.get("sticky") in STICKY
        splits = entry["splits"] if ok else []
        if not ok or not splits or not all(
                isinstance(s, list) and len(s) == 2 and _is_sha256(s[0]) and type(s[1]) is int and s[1] > 0
                for s in splits):
            raise ValueError(f"entry {name!r}: field 'route' is malformed")
        return cls(tuple((sha, weight) for sha, weight in splits), entry["sticky"])


STICKY = ("user", "none")


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter name and its versions. `versions[0]` is the current one (what a request for the
    name runs unless a route splits it); the rest is its history, most recently current first (rollback
    targets). `created_at`: when the name was first registered. `route`: a canary split, or None."""

    name: str
    versions: tuple[AdapterVersion, ...]
    pinned: bool = False
    created_at: float = field(default_factory=time.time)
    route: Route | None = None

    def __post_init__(self) -> None:
        if not self.versions:
            raise ValueError(f"adapter {self.name!r}: a record needs at least one version")

    @classmethod
    def of(cls, name: str, version: AdapterVersion, pinned: bool = False) -> AdapterRecord:
        """A new name with its first version."""
        return cls(name, (version,), pinned, version.created_at)

    @property
    def current(self) -> AdapterVersion:
        return self.versions[0]

    # The current version's, for callers that need no history.
    @property
    def source(self) -> str:
        return self.current.source

    @property
    def local_dir(self) -> str:
        return self.current.local_dir

    @property
    def remote(self) -> str | None:
        return self.current.remote

    @property
    def meta(self) -> dict[str, Any]:
        return self.current.meta

    def version(self, sha256: str) -> AdapterVersion | None:
        """The version with this whole digest, if the history holds it."""
        return next((v for v in self.versions if v.sha256 == sha256), None)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pinned": self.pinned, "created_at": self.created_at,
                "versions": [v.to_json() for v in self.versions],
                "route": self.route.to_json() if self.route is not None else None}

    @classmethod
    def from_json(cls, entry: object) -> AdapterRecord:
        """Parse one manifest entry; raise ValueError saying which field is wrong."""
        if not isinstance(entry, dict):
            raise ValueError(f"entry is a {type(entry).__name__}, not an object")
        name = entry.get("name")
        _check_fields(entry, name, {"name": str, "pinned": bool, "created_at": (int, float), "versions": list})
        try:
            validate_adapter_name(name)
        except AdapterError as exc:
            raise ValueError(str(exc)) from None
        versions = tuple(AdapterVersion.from_json(v, name) for v in entry["versions"])
        if not versions or len({v.sha256 for v in versions}) != len(versions):
            raise ValueError(f"entry {name!r}: 'versions' is empty or holds one version twice")
        route = Route.from_json(entry["route"], name) if entry.get("route") is not None else None
        record = cls(name, versions, entry["pinned"], entry["created_at"], route)
        if route is not None and any(record.version(sha) is None for sha, _ in route.splits):
            raise ValueError(f"entry {name!r}: its route names a version its history does not hold")
        return record

    @classmethod
    def from_legacy_json(cls, entry: object, digest: Callable[[str, str | None], str]) -> AdapterRecord:
        """A manifest version 1 entry (one set of files per name, no digest): one version whose digest
        `digest(local_dir, remote)` computes from its files."""
        if not isinstance(entry, dict):
            raise ValueError(f"entry is a {type(entry).__name__}, not an object")
        name = entry.get("name")
        _check_fields(entry, name, {"name": str, "source": str, "local_dir": str, "pinned": bool,
                                    "created_at": (int, float), "meta": dict})
        remote = entry.get("remote")
        if remote is not None and not isinstance(remote, str):
            raise ValueError(f"entry {name!r}: field 'remote' is not a string")
        try:
            validate_adapter_name(name)
        except AdapterError as exc:
            raise ValueError(str(exc)) from None
        version = AdapterVersion(digest(entry["local_dir"], remote), entry["source"], entry["local_dir"],
                                 entry["created_at"], entry["meta"], remote)
        return cls(name, (version,), entry["pinned"], entry["created_at"])


def _check_fields(entry: dict[str, Any], name: object, expected: dict[str, type | tuple[type, ...]]) -> None:
    for key, kind in expected.items():
        if not isinstance(entry.get(key), kind) or (kind is int and isinstance(entry.get(key), bool)):
            raise ValueError(f"entry {name!r}: field {key!r} is missing or of the wrong type")


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def fsync_dir(directory: Path) -> None:
    """Make a rename/creation inside `directory` durable (POSIX: the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers (and a crash) see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


Records = dict[str, AdapterRecord]


class RecordView:
    """A registry's records. `_records` is only ever replaced whole (under the subclass's lock), never mutated,
    so readers on other threads need no lock; changes go through `update`."""

    _records: Records
    #: Whether several replicas share this registry (it then has `refresh`, `upload_files`, `delete_files`).
    shared = False

    def get(self, name: str) -> AdapterRecord:
        """The record for `name`; AdapterNotFoundError (404) naming it when unknown."""
        record = self._records.get(name)
        if record is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered", field="name")
        return record

    def find(self, name: str) -> AdapterRecord | None:
        """The record for `name`, or None."""
        return self._records.get(name)

    def list(self) -> list[AdapterRecord]:
        """All records, in registration order."""
        return list(self._records.values())

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[AdapterRecord]:
        return iter(self.list())

    # -- changes (each registry implements `update`) ------------------------------------------------------
    def update(self, change: Callable[[Records], Records]) -> Records:
        """Apply `change` (a pure function of the records, adapters/versions.py; it may raise 404/409 against
        them) to the newest records and persist the result; the records written."""
        raise NotImplementedError

    def add(self, record: AdapterRecord) -> AdapterRecord:
        """Register `record`; AdapterConflictError (409) when the name is taken. Durable on return."""
        validate_adapter_name(record.name)
        self.update(lambda records: add_record(records, record))
        return record

    def remove(self, name: str) -> AdapterRecord:
        """Unregister `name` and return its record; AdapterNotFoundError (404) when unknown."""
        removed: list[AdapterRecord] = []
        self.update(lambda records: remove_record(records, name, removed))
        return removed[-1]


# Computes a version-1 entry's digest from its files: (local_dir, remote) -> sha256 hex.
LegacyDigest = Callable[[str, str | None], str]


def manifest_bytes(records: Records) -> bytes:
    """The manifest's JSON for `records` (the same format on disk and in a shared registry)."""
    body = {"version": MANIFEST_VERSION, "adapters": [r.to_json() for r in records.values()]}
    try:
        return json.dumps(body, indent=1, sort_keys=True).encode()
    except (TypeError, ValueError) as exc:  # a caller put a non-JSON value into `meta`
        raise ValueError(f"adapter record is not JSON-serializable: {exc}") from exc


def parse_manifest(data: bytes, legacy_digest: LegacyDigest | None = None) -> Records:
    """Records from a manifest's bytes; ValueError (or UnicodeDecodeError) saying what is wrong. A version-1
    manifest (written before versions existed) is read with each entry's digest from `legacy_digest`."""
    body = json.loads(data)
    if not isinstance(body, dict) or not isinstance(body.get("adapters"), list):
        raise ValueError('expected an object with an "adapters" list')
    if body.get("version") not in (LEGACY_MANIFEST_VERSION, MANIFEST_VERSION) or (
            body["version"] == LEGACY_MANIFEST_VERSION and legacy_digest is None):
        raise ValueError(f"unsupported manifest version {body.get('version')!r}")
    records: Records = {}
    for entry in body["adapters"]:
        record = (AdapterRecord.from_json(entry) if body["version"] == MANIFEST_VERSION
                  else AdapterRecord.from_legacy_json(entry, legacy_digest))
        if record.name in records:
            raise ValueError(f"adapter {record.name!r} appears twice")
        records[record.name] = record
    return records


def legacy_dir_digest(local_dir: str, remote: str | None) -> str:
    """A version-1 local entry's digest, from its files; a stand-in derived from the path when they are gone
    (the adapter then fails to load, as it would have before: its files may come back)."""
    try:
        return dir_digest(local_dir)
    except (OSError, DigestError) as exc:
        log.warning("adapter files in %s cannot be hashed (%s): its version id is derived from the path", local_dir,
                    exc)
        return hashlib.sha256(f"unreadable:{local_dir}".encode()).hexdigest()


class AdapterRegistry(RecordView):
    """Thread-safe map of adapter name → AdapterRecord, mirrored on disk after every change."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / MANIFEST_NAME
        self._lock = threading.Lock()
        self._remove_stale_temp_files()
        self._records: dict[str, AdapterRecord] = self._load()
        # Kept, not dropped: the files may come back (remounted volume); requests for these will fail
        # clearly at load time and the cache marks them errored.
        self.missing_on_load: tuple[str, ...] = tuple(
            r.name for r in self._records.values() if not Path(r.local_dir).is_dir()
        )  # the current versions' files; older ones are checked when rolled back to
        for name in self.missing_on_load:
            log.warning("adapter %r: its directory %s is gone", name, self._records[name].local_dir)

    # -- changes -------------------------------------------------------------------------------------
    def update(self, change: Callable[[Records], Records]) -> Records:
        """Apply `change` (a pure function of the records; it may raise a 404/409 AdapterError) and persist the
        result; durable on return. Changes are serialized: two racing registrations give one success, one 409."""
        with self._lock:
            updated = change(self._records)
            self._persist(updated)
            self._records = updated
        return updated


    # -- disk ----------------------------------------------------------------------------------------
    def _persist(self, records: Records) -> None:
        atomic_write_bytes(self.path, manifest_bytes(records))

    def _load(self) -> Records:
        if not self.path.exists():
            return {}
        try:
            data = self.path.read_bytes()
            records = parse_manifest(data, legacy_dir_digest)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(
                f"adapter registry manifest {self.path} is unreadable or corrupt ({exc}); "
                "it was left untouched: repair it, or move it away to start with an empty registry"
            ) from exc
        if json.loads(data).get("version") == LEGACY_MANIFEST_VERSION:
            log.info("adapter registry %s: upgraded to manifest version %d (each adapter's files hashed into its "
                     "first version)", self.path, MANIFEST_VERSION)
            self._persist(records)
        return records

    def _remove_stale_temp_files(self) -> None:
        for tmp in self.state_dir.glob(f"{MANIFEST_NAME}.*{_TMP_SUFFIX}"):
            log.info("removing %s, left by an interrupted registry write", tmp)
            tmp.unlink(missing_ok=True)


def add_record(records: Records, record: AdapterRecord) -> Records:
    """`records` plus a new name; AdapterConflictError (409) when it is taken."""
    if record.name in records:
        raise AdapterConflictError(f"adapter {record.name!r} is already registered", field="name")
    return {**records, record.name: record}


def remove_record(records: Records, name: str, removed: list[AdapterRecord]) -> Records:
    """`records` without `name` (appended to `removed`); AdapterNotFoundError (404) when unknown."""
    if name not in records:
        raise AdapterNotFoundError(f"adapter {name!r} is not registered", field="name")
    removed.append(records[name])
    return {k: v for k, v in records.items() if k != name}
