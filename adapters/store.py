"""AdapterStore: registration (name check -> source -> validation -> durable record) and the host loader's reader.

Registration validates the adapter against the base model before the record is written, so a registered
adapter is one that loaded once. Files can still vanish, rot or be swapped for symlinks later: every read
goes through the source's `files`, which re-checks confinement at open time, so the host loader's read then
fails and marks only that adapter errored.

With a shared registry (`--registry s3://…`, adapters/registry_s3.py) a registration also uploads the validated
files to the registry's store before its record is written there, and every replica applies the records other
replicas wrote or removed when it polls (`sync`); a replica fetches a record's files only when it first loads it.

The engine's adapter state is reached only through its AdapterPort: registration posts typed commands
(restore, seed the host tier, pin; forget on unregister) and waits for the engine thread to apply them;
`describe` reads the snapshot the engine thread publishes.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.adapters.errors import AdapterConflictError, AdapterNotFoundError
from loraplex.adapters.messages import Command
from loraplex.adapters.names import validate_adapter_name
from loraplex.adapters.port import AdapterPort
from loraplex.adapters.registry import AdapterRecord, AdapterRegistry, RecordView
from loraplex.adapters.registry_s3 import SharedRegistry
from loraplex.adapters.sources.base import AdapterSource
from loraplex.adapters.sources.local import LocalDirSource
from loraplex.adapters.sources.s3 import S3Source
from loraplex.adapters.sources.upload import UploadPayload, UploadSource
from loraplex.adapters.weights import AdapterFiles, AdapterWeights, load_adapter_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreConfig:
    state_dir: Path
    adapter_root: Path | None  # these three have no defaults here: the server's configs hold them
    max_lora_rank: int
    max_upload_bytes: int
    s3_endpoint: str | None = None
    registry_url: str | None = None  # s3://bucket/prefix: one registry shared by replicas; None: state_dir's
    s3_timeout_s: float = 30.0  # --s3-timeout: one S3 operation, retries included


@dataclass(frozen=True)
class _LocalCopy:
    """Where this replica reads a shared record's files: its own registration's files, or a download."""

    remote: str
    source: AdapterSource[Any]
    local_dir: Path


class AdapterStore:
    def __init__(self, config: StoreConfig, module_shapes: Mapping[str, tuple[int, int]], num_slots: int) -> None:
        self.config = config
        self.module_shapes = dict(module_shapes)
        self.num_slots = num_slots
        self.registry: RecordView = (SharedRegistry(config.registry_url, config.s3_endpoint,
                                                    timeout_s=config.s3_timeout_s) if config.registry_url
                                     else AdapterRegistry(config.state_dir))
        self.local = LocalDirSource(config.adapter_root)
        self.upload = UploadSource(config.state_dir, config.max_upload_bytes)
        self.s3 = S3Source(config.state_dir, config.s3_endpoint, config.max_upload_bytes, config.s3_timeout_s)
        self.port: AdapterPort | None = None
        # Called (outside the lock) with each name unregistered here or by another replica: the runtime drops
        # its metric labels and fails its queued requests.
        self.on_removed: Callable[[str], None] = lambda name: None
        # The records the engine was told about, by name: `sync` applies the difference to the registry's.
        self._applied: dict[str, AdapterRecord] = {r.name: r for r in self.registry.list()}
        self._copies: dict[str, _LocalCopy] = {}  # shared records' files on this replica, by name
        self._fetch_locks: dict[str, threading.Lock] = {}  # one download per name at a time
        # Makes "pin budget check + manifest write + command to the engine" and "manifest removal + forget
        # command" atomic with respect to each other (the engine's inbox keeps their order). File copies,
        # validation and waiting for the engine (slow) run outside it.
        self._lock = threading.Lock()
        self._remove_orphans()

    def attach(self, port: AdapterPort) -> None:
        """Connect the engine's adapter port and re-pin what the manifest says is pinned."""
        self.port = port
        # The registry is the one truth about names: the slot table asks it before evicting anything for a load.
        port.is_registered = self.__contains__
        for rec in self.registry.list():
            if rec.pinned:
                port.pin(rec.name)  # applied when the engine starts

    # ---- registration --------------------------------------------------------------------------
    def register_path(self, name: str, path: str, pinned: bool = False) -> AdapterRecord:
        """`path` inside --adapter-root, or an `s3://bucket/prefix` URL."""
        source: AdapterSource[Any] = self.s3 if str(path).startswith("s3://") else self.local
        return self._register(name, source, path, pinned)

    def register_upload(self, name: str, payload: UploadPayload, pinned: bool = False) -> AdapterRecord:
        return self._register(name, self.upload, payload, pinned)

    def _register(self, name: str, source: AdapterSource[Any], ref: Any, pinned: bool) -> AdapterRecord:
        validate_adapter_name(name)
        if name in self.registry:
            raise AdapterConflictError(f"adapter {name!r} is already registered", field="name")
        self._check_pin_budget(pinned)  # early, before any download; checked again atomically below
        local_dir = source.materialize(ref, name)
        committed, remote = False, None
        try:
            weights = self.validate(source.files(local_dir))
            if isinstance(self.registry, SharedRegistry):  # other replicas read this copy, never `local_dir`
                remote = self.registry.upload_files(name, local_dir)
            record = AdapterRecord(name, source.describe(ref), "" if remote else str(local_dir), pinned,
                                   meta=_meta(weights), remote=remote)
            with self._lock:
                self._check_pin_budget(pinned)
                self.registry.add(record)  # 409 here when a concurrent registration of `name` won (any replica)
                committed = True
                # A shared registry's write read the newest manifest: another replica's removal of `name` may
                # be in it before `sync` applied it here. Forget that old registration first, or its slot and
                # host copy would keep serving under the new record.
                stale = self._forget(name) if name in self._applied else None
                if remote:
                    self._copies[name] = _LocalCopy(remote, source, local_dir)
                self._applied[name] = record
                handed = (stale, *self._on_registered(record, weights))
        except BaseException:
            if not committed:  # a copy nothing refers to (upload/S3); in-place local dirs are never deleted
                source.discard(local_dir)
                if remote and isinstance(self.registry, SharedRegistry):
                    self.registry.delete_files(remote)
            raise
        if stale is not None:
            self.on_removed(name)  # the old registration's queued requests fail, its metric labels go
        self._wait_applied(handed)  # so the answer (and a GET right after) shows the host tier
        log.info("registered adapter %s (rank %d, %s)", name, weights.max_rank, record.source)
        return record

    def _check_pin_budget(self, pinned: bool) -> None:
        n_pinned = sum(r.pinned for r in self.registry.list())
        if pinned and n_pinned + 1 >= self.num_slots:
            raise AdapterConflictError(
                f"cannot pin more than {self.num_slots - 1} adapters with --max-loras {self.num_slots} "
                "(one slot must stay free for unpinned adapters)", field="pinned")

    def _on_registered(self, record: AdapterRecord, weights: AdapterWeights) -> tuple[Command, ...]:
        if self.port is None:
            return ()
        # The validation read doubles as the first host load (laid out for the slot copy here, off the engine),
        # page-locked on CUDA as the host loader's are, so the first slot copy is asynchronous too.
        return self.port.register(record.name, weights.prepared(pin=torch.cuda.is_available()), record.pinned)

    def _wait_applied(self, commands: Iterable[Command | None]) -> None:
        """Wait for the engine to apply `commands`; AdapterCommandError / AdapterCommandTimeout (500 / 503)
        when it raised or did not in time."""
        if self.port is not None:
            self.port.wait_applied(commands)

    def validate(self, files: Path | AdapterFiles) -> AdapterWeights:
        return load_adapter_dir(files, self.module_shapes, max_rank=self.config.max_lora_rank)

    def unregister(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self.registry.remove(name)  # shared: 404 when another replica removed it first
            handed = self._forget(name)
        self._wait_applied([handed])  # its slot is freed (or doomed to be, while in use) before the answer
        if record.remote and isinstance(self.registry, SharedRegistry):
            self.registry.delete_files(record.remote)
        else:
            self._source_of(record).discard(Path(record.local_dir))
        log.info("unregistered adapter %s", name)
        return record

    def _forget(self, name: str) -> Command | None:
        """Tell the engine `name` is gone and drop this replica's copy of a shared record's files. Hold _lock."""
        self._applied.pop(name, None)
        copy = self._copies.pop(name, None)
        if copy is not None:
            copy.source.discard(copy.local_dir)
        return self.port.forget(name) if self.port is not None else None

    # ---- a shared registry: what other replicas changed ---------------------------------------------
    def sync(self) -> list[str]:
        """Fetch the shared manifest if it changed, then apply what the registry's view holds that this replica has
        not applied yet (other replicas' registrations and deletions): a new record becomes servable here (its
        files are fetched at its first load), a removed or replaced one is forgotten (running requests finish on
        its slot). Returns the names that changed. A no-op (and no
        request) for the local registry. Raises S3UnavailableError / ManifestError; the poller logs them."""
        registry = self.registry
        if not isinstance(registry, SharedRegistry):
            return []
        # Diff even when this poll saw no change: a registration or deletion through this replica also reads the
        # newest manifest, so other replicas' changes can reach the view there first.
        registry.refresh()
        removed: list[str] = []
        added: list[str] = []
        commands: list[Command | None] = []
        with self._lock:
            current = {r.name: r for r in registry.list()}
            for name, record in list(self._applied.items()):
                if name not in current or current[name].remote != record.remote:
                    commands.append(self._forget(name))
                    removed.append(name)
            for name, record in current.items():
                if name not in self._applied:
                    self._applied[name] = record
                    commands.append(self._on_synced(record))
                    added.append(name)
        for name in removed:
            self.on_removed(name)
        if removed or added:
            log.info("registry %s: %d adapters added (%s), %d removed (%s) by other replicas", registry.url,
                     len(added), ", ".join(added), len(removed), ", ".join(removed))
        self._wait_applied(commands)
        return sorted(set(removed) | set(added))

    def _on_synced(self, record: AdapterRecord) -> Command | None:
        """A record another replica wrote: clear an old error under the name, pin it when asked. Hold _lock."""
        if self.port is None:
            return None
        restored = self.port.restore(record.name)
        return self.port.pin(record.name) if record.pinned else restored

    def _remove_orphans(self) -> None:
        """Delete copied adapter dirs no record refers to: a kill -9 between the copy's final rename and the
        manifest write leaves one behind (the registry itself stays consistent: the adapter is absent)."""
        referenced = {Path(r.local_dir).resolve() for r in self.registry.list()}
        for owned in (self.upload.owned_dir, self.s3.owned_dir):
            for entry in owned.iterdir() if owned is not None else ():
                if entry.is_dir() and not entry.is_symlink() and entry.resolve() not in referenced:
                    log.info("removing %s: an adapter copy that no registry entry refers to", entry)
                    shutil.rmtree(entry, ignore_errors=True)

    def _source_of(self, record: AdapterRecord) -> AdapterSource[Any]:
        if record.source == "upload":
            return self.upload
        return self.s3 if record.source.startswith("s3://") else self.local

    # ---- reading -------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.registry

    def get(self, name: str) -> AdapterRecord:
        return self.registry.get(name)

    def names(self) -> list[str]:
        return [r.name for r in self.registry.list()]

    def load_weights(self, name: str) -> AdapterWeights:
        """The host loader's reader: re-read and re-validate the registered files (a shared record's are
        downloaded first, once per replica)."""
        if name not in self.registry:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered", field="model")
        record = self.registry.get(name)
        if record.remote:
            copy = self._local_copy(record)
            return self.validate(copy.source.files(copy.local_dir))
        return self.validate(self._source_of(record).files(Path(record.local_dir)))

    def _local_copy(self, record: AdapterRecord) -> _LocalCopy:
        """This replica's copy of a shared record's files, downloaded on first use (host loader threads)."""
        with self._lock:
            lock = self._fetch_locks.setdefault(record.name, threading.Lock())
        with lock:  # two loads of one name download once; other names are not held up
            copy = self._copies.get(record.name)
            if copy is not None and copy.remote == record.remote:
                return copy
            local_dir = self.s3.materialize(record.remote, record.name)
            copy = _LocalCopy(record.remote, self.s3, local_dir)
            with self._lock:
                # The registry's view, not `_applied`: a poll makes a record servable (the API and the slot table
                # ask the registry) a moment before `sync` records it as applied.
                current = self.registry.get(record.name) if record.name in self.registry else None
                if current is None or current.remote != record.remote:
                    self.s3.discard(local_dir)  # removed or replaced while downloading: keep nothing
                    raise AdapterNotFoundError(f"adapter {record.name!r} is not registered", field="model")
                stale, self._copies[record.name] = self._copies.get(record.name), copy
            if stale is not None:
                stale.source.discard(stale.local_dir)
            return copy

    def describe(self, name: str) -> dict[str, Any]:
        """The public record: name, rank, alpha, targets, size, tier, pinned, state (+reason), load stats."""
        rec = self.registry.get(name)
        view = self.port.snapshot.view(name) if self.port is not None else None  # published by the engine
        return {
            "name": rec.name, "source": rec.source, **rec.meta, "pinned": rec.pinned,
            "tier": view.tier if view else "disk",
            "state": "errored" if view and view.error else "ready", "error": view.error if view else None,
            "created_at": rec.created_at,
            "load_stats": dict(view.load_info) if view else {},
        }


def _meta(weights: AdapterWeights) -> dict[str, Any]:
    spec = weights.spec
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    return {"rank": weights.max_rank, "alpha": spec.lora_alpha, "target_modules": targets,
            "size_bytes": weights.size_bytes, "use_rslora": spec.use_rslora}
