"""The durable adapter registry: name → record, persisted as one JSON manifest in `--state-dir`.

Every change rewrites `state_dir/registry.json` atomically (temp file in the same directory, fsync,
`os.replace`, fsync of the directory), so a kill -9 at any instant leaves either the old or the new
manifest on disk, never a torn one. A corrupt manifest stops the server at start with the file's name:
it is never silently replaced, since that would drop every registered adapter.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import AdapterConflictError, AdapterError, AdapterNotFoundError
from loraplex.adapters.names import validate_adapter_name

log = logging.getLogger(__name__)

MANIFEST_NAME = "registry.json"
MANIFEST_VERSION = 1
# Temp files are `registry.json.<random>.tmp`; only a crash mid-write leaves one behind.
_TMP_SUFFIX = ".tmp"


class ManifestError(RuntimeError):
    """The manifest on disk cannot be read or parsed; raised at start, naming the file."""


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter. `local_dir` holds adapter_config.json + adapter_model.safetensors.

    `source` says where it came from: "local:<path under the root>", "upload" or "s3://bucket/prefix".
    `meta` is free-form and JSON-serializable (rank, alpha, target_modules, size_bytes…), filled by the
    caller after validation. `remote` is set in a shared registry (`--registry s3://…`): the URL of the copy
    of the files every replica reads (unique per registration); `local_dir` is then "" in the manifest, each
    replica keeping its own copy where it likes.
    """

    name: str
    source: str
    local_dir: str
    pinned: bool = False
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    remote: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, entry: object) -> AdapterRecord:
        """Parse one manifest entry; raise ValueError saying which field is wrong."""
        if not isinstance(entry, dict):
            raise ValueError(f"entry is a {type(entry).__name__}, not an object")
        expected: dict[str, type | tuple[type, ...]] = {
            "name": str, "source": str, "local_dir": str, "pinned": bool,
            "created_at": (int, float), "meta": dict,
        }  # fmt: skip
        for key, kind in expected.items():
            if not isinstance(entry.get(key), kind):
                name = entry.get("name")
                raise ValueError(f"entry {name!r}: field {key!r} is missing or of the wrong type")
        remote = entry.get("remote")
        if remote is not None and not isinstance(remote, str):
            raise ValueError(f"entry {entry.get('name')!r}: field 'remote' is not a string")
        try:
            validate_adapter_name(entry["name"])
        except AdapterError as exc:
            raise ValueError(str(exc)) from None
        return cls(**{key: entry[key] for key in expected}, remote=remote)


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


class RecordView:
    """Read access to a registry's records. `_records` is only ever replaced whole (under the subclass's
    lock), never mutated, so readers on other threads need no lock."""

    _records: dict[str, AdapterRecord]
    #: Whether several replicas share this registry (it then has `refresh`, `upload_files`, `delete_files`).
    shared = False

    def get(self, name: str) -> AdapterRecord:
        """The record for `name`; AdapterNotFoundError (404) naming it when unknown."""
        record = self._records.get(name)
        if record is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered", field="name")
        return record

    def list(self) -> list[AdapterRecord]:
        """All records, in registration order."""
        return list(self._records.values())

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[AdapterRecord]:
        return iter(self.list())


def manifest_bytes(records: dict[str, AdapterRecord]) -> bytes:
    """The manifest's JSON for `records` (the same format on disk and in a shared registry)."""
    body = {"version": MANIFEST_VERSION, "adapters": [r.to_json() for r in records.values()]}
    try:
        return json.dumps(body, indent=1, sort_keys=True).encode()
    except (TypeError, ValueError) as exc:  # a caller put a non-JSON value into `meta`
        raise ValueError(f"adapter record is not JSON-serializable: {exc}") from exc


def parse_manifest(data: bytes) -> dict[str, AdapterRecord]:
    """Records from a manifest's bytes; ValueError (or UnicodeDecodeError) saying what is wrong."""
    body = json.loads(data)
    if not isinstance(body, dict) or not isinstance(body.get("adapters"), list):
        raise ValueError('expected an object with an "adapters" list')
    if body.get("version") != MANIFEST_VERSION:
        raise ValueError(f"unsupported manifest version {body.get('version')!r}")
    records: dict[str, AdapterRecord] = {}
    for entry in body["adapters"]:
        record = AdapterRecord.from_json(entry)
        if record.name in records:
            raise ValueError(f"adapter {record.name!r} appears twice")
        records[record.name] = record
    return records


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
        )
        for name in self.missing_on_load:
            log.warning("adapter %r: its directory %s is gone", name, self._records[name].local_dir)

    # -- changes -------------------------------------------------------------------------------------
    def add(self, record: AdapterRecord) -> AdapterRecord:
        """Register `record`; AdapterConflictError (409) when the name is taken. Durable on return."""
        validate_adapter_name(record.name)
        with self._lock:  # check-then-write under one lock: two racing adds give one success, one 409
            if record.name in self._records:
                raise AdapterConflictError(f"adapter {record.name!r} is already registered", field="name")
            updated = {**self._records, record.name: record}
            self._persist(updated)
            self._records = updated
        return record

    def remove(self, name: str) -> AdapterRecord:
        """Unregister `name` and return its record; AdapterNotFoundError (404) when unknown."""
        with self._lock:
            record = self.get(name)
            updated = {k: v for k, v in self._records.items() if k != name}
            self._persist(updated)
            self._records = updated
        return record

    # -- disk ----------------------------------------------------------------------------------------
    def _persist(self, records: dict[str, AdapterRecord]) -> None:
        atomic_write_bytes(self.path, manifest_bytes(records))

    def _load(self) -> dict[str, AdapterRecord]:
        if not self.path.exists():
            return {}
        try:
            return parse_manifest(self.path.read_bytes())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(
                f"adapter registry manifest {self.path} is unreadable or corrupt ({exc}); "
                "it was left untouched: repair it, or move it away to start with an empty registry"
            ) from exc

    def _remove_stale_temp_files(self) -> None:
        for tmp in self.state_dir.glob(f"{MANIFEST_NAME}.*{_TMP_SUFFIX}"):
            log.info("removing %s, left by an interrupted registry write", tmp)
            tmp.unlink(missing_ok=True)
