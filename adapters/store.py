"""AdapterStore: registration (name check -> source -> digest -> validation -> durable record), versions, and the
host loader's reader.

Every registration is an immutable version whose id is the sha256 of its files (adapters/digest.py); a name's
record holds its current version and a bounded history (`--adapter-history`), and may split traffic between
versions (a canary route). The registry's records are the one owner of "which version is current": a change
(register, replace, rollback, route) is a pure function applied to the newest records (adapters/versions.py);
the engine knows each version as its own adapter `name@<sha256>`, so a replace never swaps weights under a
running request: admitted requests finish on the version they resolved, new ones start on the new one.

Registration validates the adapter against the base model before the record is written, so a registered
version is one that loaded once. Files can still vanish, rot, be swapped for symlinks, or be rewritten in place
later: every read goes through the source's `files`, which re-checks confinement at open time, and a file whose
size or modification time moved since it was checked is hashed again: bytes that are no longer the version's
fail that load (never served under the version's id).

With a shared registry (`--registry s3://…`, adapters/registry_s3.py) a registration also uploads the validated
files to the registry's store before its record is written there, and every replica applies the records other
replicas wrote or removed when it polls (`sync`); a replica fetches a version's files only when it first loads
it, and checks them against the version's digest.

The engine's adapter state is reached only through its AdapterPort: changes post typed commands and wait for
the engine thread to apply them; `describe` reads the snapshot the engine thread publishes.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from loraplex.adapters import versions as V
from loraplex.adapters.base_modules import BaseModules
from loraplex.adapters.digest import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE, DigestError, digest_streams, short
from loraplex.adapters.errors import AdapterConflictError, AdapterNotFoundError, AdapterValidationError
from loraplex.adapters.messages import Command
from loraplex.adapters.names import validate_adapter_name
from loraplex.adapters.port import AdapterPort
from loraplex.adapters.registry import (
    AdapterRecord,
    AdapterRegistry,
    AdapterVersion,
    Records,
    RecordView,
    remove_record,
)
from loraplex.adapters.registry_s3 import SharedRegistry
from loraplex.adapters.sources.base import AdapterSource
from loraplex.adapters.sources.local import LocalDirSource
from loraplex.adapters.sources.s3 import S3Source
from loraplex.adapters.sources.upload import UploadPayload, UploadSource
from loraplex.adapters.weights import AdapterFiles, AdapterWeights, load_adapter_dir

log = logging.getLogger(__name__)

TIERS = ("host", "device")  # what a prefetch may ask for
WEIGHTS_SOURCE = "weights"  # a version from PUT /v1/adapters/{name}/weights (a copy, as an upload)
Fingerprint = tuple[tuple[int, int, int, int], ...]  # per file: (device, inode, size, mtime_ns)


@dataclass(frozen=True)
class StoreConfig:
    state_dir: Path
    adapter_root: Path | None  # these three have no defaults here: the server's configs hold them
    max_lora_rank: int
    max_upload_bytes: int
    s3_endpoint: str | None = None
    registry_url: str | None = None  # s3://bucket/prefix: one registry shared by replicas; None: state_dir's
    history: int = 5  # versions kept per name (--adapter-history, validated by ServerConfig), the current one
    s3_timeout_s: float = 30.0  # --s3-timeout: one S3 operation, retries included


@dataclass(frozen=True)
class _LocalCopy:
    """Where this replica reads a shared version's files: its own registration's files, or a download."""

    remote: str
    source: AdapterSource[Any]
    local_dir: Path


class AdapterStore:
    def __init__(self, config: StoreConfig, module_shapes: Mapping[str, tuple[int, int]], num_slots: int) -> None:
        self.config = config
        self.module_shapes = BaseModules.of(module_shapes)  # with the base weights DoRA's norm reads, when given
        self.num_slots = num_slots
        self.registry: RecordView = (SharedRegistry(config.registry_url, config.s3_endpoint,
                                                    timeout_s=config.s3_timeout_s) if config.registry_url
                                     else AdapterRegistry(config.state_dir))
        self.local = LocalDirSource(config.adapter_root)
        self.upload = UploadSource(config.state_dir, config.max_upload_bytes)
        self.s3 = S3Source(config.state_dir, config.s3_endpoint, config.max_upload_bytes, config.s3_timeout_s)
        self.port: AdapterPort | None = None
        # Called (outside the lock) with each name unregistered here or by another replica: the runtime drops its
        # metric labels.
        self.on_removed: Callable[[str], None] = lambda name: None
        # Called (outside the lock) with the engine keys of versions that left the registry (a name removed, a
        # version trimmed from the history) and why: the runtime fails their requests that have not started.
        self.on_dropped: Callable[[Sequence[str], str], None] = lambda keys, reason: None
        # The records the engine was told about, by name: changes and `sync` apply the difference.
        self._applied: Records = {r.name: r for r in self.registry.list()}
        self._copies: dict[str, _LocalCopy] = {}  # shared versions' files on this replica, by engine key
        self._fetch_locks: dict[str, threading.Lock] = {}  # one download per version at a time
        self._checked: dict[str, Fingerprint] = {}  # engine key -> its files as last found equal to the digest
        # Makes "pin budget check + manifest write + commands to the engine" atomic with respect to other changes
        # (the engine's inbox keeps their order). File copies, hashing, validation and waiting for the engine
        # (slow) run outside it.
        self._lock = threading.Lock()
        self._remove_orphans()

    def attach(self, port: AdapterPort) -> None:
        """Connect the engine's adapter port: the versions of every record, pins included, as the engine must
        know them (applied when the engine starts)."""
        self.port = port
        # The registry is the one truth about versions: the slot table asks it before evicting anything for a load.
        port.is_registered = self.has_key
        for record in self.registry.list():
            V.engine_commands(port, record.name, None, record)

    # ---- registration --------------------------------------------------------------------------
    def register_path(self, name: str, path: str, pinned: bool | None = None, *, replace: bool = False,
                      sha256: str | None = None) -> AdapterRecord:
        """`path` inside --adapter-root, or an `s3://bucket/prefix` URL. `replace`: make it the name's new current
        version (a taken name is a 409 otherwise). `sha256`: the digest the files must have (400 otherwise)."""
        source: AdapterSource[Any] = self.s3 if str(path).startswith("s3://") else self.local
        return self._register(name, source, path, pinned, replace, sha256)

    def register_upload(self, name: str, payload: UploadPayload, pinned: bool | None = None, *,
                        replace: bool = False, sha256: str | None = None) -> AdapterRecord:
        return self._register(name, self.upload, payload, pinned, replace, sha256)

    def put_weights(self, name: str, weights: BinaryIO | bytes, sha256: str | None = None) -> AdapterRecord:
        """A new current version of a registered `name` from a raw safetensors body, with its current version's
        adapter_config.json (a training loop's update: no config round trip)."""
        record = self.registry.get(name)
        with self._open_files(name, record.current).open(CONFIG_FILE) as f:
            config = f.read(MAX_CONFIG_BYTES + 1)
        payload = {CONFIG_FILE: config, WEIGHTS_FILE: weights}
        return self._register(name, self.upload, payload, None, True, sha256, label=WEIGHTS_SOURCE)

    def _register(self, name: str, source: AdapterSource[Any], ref: Any, pinned: bool | None, replace: bool,
                  expected: str | None, label: str | None = None) -> AdapterRecord:
        validate_adapter_name(name)
        if name in self.registry and not replace:
            raise V.taken(name)
        self._check_pin_budget(name, pinned)  # early, before any download; checked again atomically below
        local_dir = source.materialize(ref, name)
        kept, remote = False, None
        try:
            files = source.files(local_dir)
            weights = self.validate(files)  # first: its errors name what is wrong with the files
            sha, fingerprint = _digest(files)
            _check_expected(expected, sha)
            known = self.registry.find(name).version(sha) if replace and name in self.registry else None
            if isinstance(self.registry, SharedRegistry) and known is None:  # others read this copy, never ours
                remote = self.registry.upload_files(name, local_dir)
            version = AdapterVersion(sha, label or source.describe(ref), "" if remote else str(local_dir),
                                     meta=_meta(weights), remote=remote)
            with self._lock:
                self._check_pin_budget(name, pinned)
                # 409 here when a concurrent registration of `name` won (any replica).
                records = self.registry.update(lambda r: self._with_version(r, name, version, replace, pinned))
                after = records[name]
                kept = after.version(sha) is version  # False: an identical version was there already
                key = V.engine_key(name, sha)
                if kept:
                    self._checked[key] = fingerprint
                    if remote:
                        self._copies[key] = _LocalCopy(remote, source, local_dir)
                # The validation read doubles as the first host load (laid out for the slot copy here, off the engine),
                # page-locked on CUDA as the host loader's are, so the first slot copy is asynchronous too.
                handed, gone = self._apply(name, after, (sha, weights.prepared(pin=torch.cuda.is_available())))
        except BaseException:
            if not kept:
                self._discard_copy(source, local_dir, remote)
            raise
        if not kept:  # the same bytes are registered already: keep their files, drop this copy
            self._discard_copy(source, local_dir, remote)
        self._after_change(name, gone, f"its version was trimmed from the history (--adapter-history "
                                       f"{self.config.history}) when {short(sha)} was registered")
        self._wait_applied(handed)  # so the answer (and a GET right after) shows the new version's tier
        log.info("registered adapter %s version %s (rank %d, %s)%s", name, short(sha), weights.max_rank,
                 version.source, " as its new current version" if replace else "")
        return after

    def _with_version(self, records: Records, name: str, version: AdapterVersion, replace: bool,
                      pinned: bool | None) -> Records:
        """The change a registration makes. A shared registry's new version needs its uploaded copy: one prepared
        without (its bytes were in the history) meets a history that lost them meanwhile only in a race: a 409."""
        updated = V.register_version(records, name, version, replace_=replace, pinned=pinned,
                                     history=self.config.history)
        if self.registry.shared and version.remote is None and updated[name].version(version.sha256) is version:
            raise AdapterConflictError(f"adapter {name!r} changed while these files were prepared; send them again",
                                       field="name")
        return updated

    def _discard_copy(self, source: AdapterSource[Any], local_dir: Path, remote: str | None) -> None:
        """Drop a copy nothing refers to (upload/S3); in-place local dirs are never deleted."""
        source.discard(local_dir)
        if remote and isinstance(self.registry, SharedRegistry):
            self.registry.delete_files(remote)

    def _check_pin_budget(self, name: str, pinned: bool | None) -> None:
        records = {r.name: r for r in self.registry.list()}
        if not pinned or (name in records and records[name].pinned):
            return  # no new pin
        if sum(r.pinned for r in records.values()) + 1 >= self.num_slots:
            raise AdapterConflictError(
                f"cannot pin more than {self.num_slots - 1} adapters with --max-loras {self.num_slots} "
                "(one slot must stay free for unpinned adapters)", field="pinned")

    def validate(self, files: Path | AdapterFiles) -> AdapterWeights:
        return load_adapter_dir(files, self.module_shapes, max_rank=self.config.max_lora_rank)

    # ---- versions: rollback, routes, prefetch ----------------------------------------------------------
    def rollback(self, name: str, version: str | None = None) -> AdapterRecord:
        """Make `version` (a digest prefix; default: the version current before this one) current again."""
        return self._change(name, lambda r: V.rollback(r, name, version, self.config.history), "rolled back")

    def set_route(self, name: str, splits: Sequence[tuple[str, int]], sticky: str) -> AdapterRecord:
        """Split `name`'s new requests between versions of its history by weight."""
        return self._change(name, lambda r: V.set_route(r, name, splits, sticky), "routed")

    def clear_route(self, name: str) -> AdapterRecord:
        return self._change(name, lambda r: V.clear_route(r, name), "route cleared")

    def _change(self, name: str, change: Callable[[Records], Records], what: str) -> AdapterRecord:
        validate_adapter_name(name)
        with self._lock:
            after = self.registry.update(change)[name]
            handed, gone = self._apply(name, after)
        self._after_change(name, gone, "its version left the history")
        self._wait_applied(handed)
        log.info("adapter %s %s: current %s%s", name, what, short(after.current.sha256),
                 f", route {_route_text(after)}" if after.route else "")
        return after

    def prefetch(self, name: str, tier: str) -> list[str]:
        """Load the versions new requests for `name` may start on, without a request; their engine keys."""
        if tier not in TIERS:
            raise AdapterValidationError(f"tier: expected one of {list(TIERS)}, got {tier!r}", field="tier")
        keys = [V.engine_key(name, sha) for sha in V.active(self.registry.get(name))]
        if self.port is not None:
            for key in keys:
                self.port.prefetch(key, tier)
        return keys

    # ---- unregistration ------------------------------------------------------------------------------
    def unregister(self, name: str) -> AdapterRecord:
        with self._lock:
            removed: list[AdapterRecord] = []
            # Shared: 404 when another replica removed it first.
            self.registry.update(lambda r: remove_record(r, name, removed))
            handed, gone = self._apply(name, None)
        self._after_change(name, gone, f"adapter {name!r} was unregistered before this request started")
        self._wait_applied(handed)  # its slots are freed (or doomed to be, while in use) before the answer
        log.info("unregistered adapter %s (%d versions)", name, len(removed[-1].versions))
        return removed[-1]

    # ---- applying a change: the engine, files, callbacks ----------------------------------------------------
    def _apply(self, name: str, after: AdapterRecord | None,
               fresh: tuple[str, AdapterWeights] | None = None) -> tuple[list[Command], list[AdapterVersion]]:
        """Tell the engine what changed for `name` since the record it knows; returns the commands to wait on and
        the versions that left the registry. Hold _lock."""
        before = self._applied.pop(name, None)
        if after is not None:
            self._applied[name] = after
        gone = V.dropped(before, after)
        for version in gone:
            self._checked.pop(V.engine_key(name, version.sha256), None)
            copy = self._copies.pop(V.engine_key(name, version.sha256), None)
            if copy is not None:
                copy.source.discard(copy.local_dir)
        handed = V.engine_commands(self.port, name, before, after, fresh) if self.port is not None else []
        return handed, gone

    def _after_change(self, name: str, gone: list[AdapterVersion], reason: str, *, mine: bool = True) -> None:
        """Outside the lock: fail the queued requests of versions that left, drop the metric labels of a name that
        left, and delete the files of versions this replica dropped (`mine`; others only drop their copies)."""
        if not gone:
            return
        self.on_dropped([V.engine_key(name, v.sha256) for v in gone], reason)
        if name not in self.registry:
            self.on_removed(name)
        for version in gone if mine else ():
            if version.remote and isinstance(self.registry, SharedRegistry):
                self.registry.delete_files(version.remote)
            elif version.local_dir:
                self._source_of(version).discard(Path(version.local_dir))

    def _wait_applied(self, commands: Iterable[Command | None]) -> None:
        """Wait for the engine to apply `commands`; AdapterCommandError / AdapterCommandTimeout (500 / 503)
        when it raised or did not in time."""
        if self.port is not None:
            self.port.wait_applied(commands)

    # ---- a shared registry: what other replicas changed ---------------------------------------------
    def sync(self) -> list[str]:
        """Fetch the shared manifest if it changed, then apply what the registry's view holds that this replica has
        not applied yet (other replicas' registrations, versions, routes, rollbacks and deletions): a new version
        becomes servable here (its files are fetched at its first load), a removed one is forgotten (running
        requests finish on its slot). Returns the names that changed. A no-op (and no request) for the local
        registry. Raises S3UnavailableError / ManifestError; the poller logs them."""
        registry = self.registry
        if not isinstance(registry, SharedRegistry):
            return []
        # Diff even when this poll saw no change: a change through this replica also reads the newest manifest,
        # so other replicas' changes can reach the view there first.
        registry.refresh()
        changed: dict[str, list[AdapterVersion]] = {}
        commands: list[Command] = []
        with self._lock:
            current = {r.name: r for r in registry.list()}
            for name in sorted(set(self._applied) | set(current)):
                if self._applied.get(name) != current.get(name):
                    handed, changed[name] = self._apply(name, current.get(name))
                    commands += handed
        for name, gone in changed.items():
            self._after_change(name, gone, "another replica removed its version", mine=False)
        if changed:
            log.info("registry %s: adapters changed by other replicas: %s", registry.url, ", ".join(changed))
        self._wait_applied(commands)
        return sorted(changed)

    def _remove_orphans(self) -> None:
        """Delete copied adapter dirs no version refers to: a kill -9 between the copy's final rename and the
        manifest write leaves one behind (the registry itself stays consistent: the version is absent)."""
        referenced = {Path(v.local_dir).resolve() for r in self.registry.list() for v in r.versions if v.local_dir}
        for owned in (self.upload.owned_dir, self.s3.owned_dir):
            for entry in owned.iterdir() if owned is not None else ():
                if entry.is_dir() and not entry.is_symlink() and entry.resolve() not in referenced:
                    log.info("removing %s: an adapter copy that no registry entry refers to", entry)
                    shutil.rmtree(entry, ignore_errors=True)

    def _source_of(self, version: AdapterVersion) -> AdapterSource[Any]:
        if version.source in ("upload", WEIGHTS_SOURCE):
            return self.upload
        return self.s3 if version.source.startswith("s3://") else self.local

    # ---- reading -------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        """Whether `name` is a registered adapter name (plain names only; see `has_key` for versions)."""
        return isinstance(name, str) and name in self.registry

    def has_key(self, key: str) -> bool:
        """Whether an engine key `name@<sha256>` names a version the registry holds (current or history)."""
        name, sha = V.split_key(key)
        record = self.registry.find(name)
        return record is not None and sha is not None and record.version(sha) is not None

    def get(self, name: str) -> AdapterRecord:
        return self.registry.get(name)

    def names(self) -> list[str]:
        return [r.name for r in self.registry.list()]

    def resolve(self, model: str, route_key: str | None = None) -> str:
        """The engine key a new request for `model` runs: "name" (its current version, or its route's choice for
        `route_key`) or "name@<version prefix>". 404 for an unknown name or version, 400 for a bad prefix."""
        name, prefix = V.split_key(model)
        record = self.registry.get(name)
        version = V.pick(record, route_key) if prefix is None else V.find_version(record, prefix, field="model")
        return V.engine_key(name, version.sha256)

    def load_weights(self, key: str) -> AdapterWeights:
        """The host loader's reader: re-read and re-validate a version's files (a shared version's are
        downloaded first, once per replica), after checking they are still the version's bytes."""
        name, version = self._version(key)
        files = self._open_files(name, version)
        self._check_unchanged(key, version, files)
        return self.validate(files)

    def _version(self, key: str) -> tuple[str, AdapterVersion]:
        name, sha = V.split_key(key)
        record = self.registry.find(name)
        version = record.version(sha) if record is not None and sha is not None else None
        if version is None:
            raise AdapterNotFoundError(f"adapter {name!r} has no version {short(sha or '')!r} any more", field="model")
        return name, version

    def _open_files(self, name: str, version: AdapterVersion) -> AdapterFiles:
        if version.remote:
            copy = self._local_copy(name, version)
            return copy.source.files(copy.local_dir)
        return self._source_of(version).files(Path(version.local_dir))

    def _check_unchanged(self, key: str, version: AdapterVersion, files: AdapterFiles) -> None:
        """The files still hold the version's bytes: unchanged since last checked (device, inode, size, mtime),
        else hashed again. A version's id must never serve other weights (a file rewritten in place)."""
        if _fingerprint(files) == self._checked.get(key):
            return
        sha, fingerprint = _digest(files)
        if sha != version.sha256:
            raise AdapterValidationError(
                f"the files of adapter {key.partition('@')[0]!r} version {short(version.sha256)} changed since it was "
                f"registered (their sha256 is now {short(sha)}); register them as a new version (\"replace\": true)",
                field="path")
        self._checked[key] = fingerprint

    def _local_copy(self, name: str, version: AdapterVersion) -> _LocalCopy:
        """This replica's copy of a shared version's files, downloaded on first use (host loader threads)."""
        key = V.engine_key(name, version.sha256)
        with self._lock:
            lock = self._fetch_locks.setdefault(key, threading.Lock())
        with lock:  # two loads of one version download once; other versions are not held up
            copy = self._copies.get(key)
            if copy is not None and copy.remote == version.remote:
                return copy
            local_dir = self.s3.materialize(version.remote, name)
            copy = _LocalCopy(version.remote, self.s3, local_dir)
            with self._lock:
                self._fetch_locks.pop(key, None)  # bounded: a lock lives while its download runs
                # The registry's view, not `_applied`: a poll makes a record servable (the API and the slot table
                # ask the registry) a moment before `sync` records it as applied.
                if not self.has_key(key):
                    self.s3.discard(local_dir)  # removed while downloading: keep nothing
                    raise AdapterNotFoundError(f"adapter {name!r} has no version {short(version.sha256)!r} any more",
                                               field="model")
                stale, self._copies[key] = self._copies.get(key), copy
            if stale is not None:
                stale.source.discard(stale.local_dir)
            return copy

    def describe(self, name: str) -> dict[str, Any]:
        """The public record: name, rank, alpha, targets, size, tier, pinned, state (+reason), load stats, the
        current version (`version`, `sha256`, `created`, `source`), its history and route."""
        rec = self.registry.get(name)
        view = self._view(name, rec.current)
        route = dict(rec.route.splits) if rec.route is not None else {}
        return {
            "name": rec.name, "source": rec.source, **rec.meta, "pinned": rec.pinned,
            "tier": view.tier if view else "disk",
            "state": "errored" if view and view.error else "ready", "error": view.error if view else None,
            "created_at": rec.created_at,
            "load_stats": dict(view.load_info) if view else {},
            "version": short(rec.current.sha256), "sha256": rec.current.sha256,
            "created": int(rec.current.created_at),
            "versions": [self._describe_version(name, v, i == 0, route.get(v.sha256))
                         for i, v in enumerate(rec.versions)],
            "route": ({"versions": [{"version": short(sha), "sha256": sha, "weight": w} for sha, w in rec.route.splits],
                       "sticky": rec.route.sticky} if rec.route is not None else None),
        }

    def _describe_version(self, name: str, version: AdapterVersion, current: bool, weight: int | None
                          ) -> dict[str, Any]:
        view = self._view(name, version)
        return {"version": short(version.sha256), "sha256": version.sha256, "created": int(version.created_at),
                "source": version.source, "rank": version.meta.get("rank"),
                "size_bytes": version.meta.get("size_bytes"), "current": current, "weight": weight,
                "tier": view.tier if view else "disk"}

    def _view(self, name: str, version: AdapterVersion) -> Any:
        return self.port.snapshot.view(V.engine_key(name, version.sha256)) if self.port is not None else None


def _digest(files: AdapterFiles) -> tuple[str, Fingerprint]:
    """(sha256, fingerprint) of an adapter's files, read through its source's confined opens; 400 when the files
    are missing or the config is not a JSON object (the validator says more)."""
    try:
        with files.open(CONFIG_FILE) as config, files.open(WEIGHTS_FILE) as weights:
            fingerprint = (_stat(config), _stat(weights))
            return digest_streams(config, weights), fingerprint
    except FileNotFoundError as exc:
        raise AdapterValidationError(f"{exc.args[0] if exc.args else 'a file'} is missing in {files.label}",
                                     field=str(exc.args[0]) if exc.args else "path") from None
    except DigestError as exc:
        raise AdapterValidationError(str(exc), field=CONFIG_FILE) from None


def _fingerprint(files: AdapterFiles) -> Fingerprint | None:
    try:
        with files.open(CONFIG_FILE) as config, files.open(WEIGHTS_FILE) as weights:
            return _stat(config), _stat(weights)
    except FileNotFoundError:
        return None  # the validator names what is missing


def _stat(f: BinaryIO) -> tuple[int, int, int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_expected(expected: str | None, sha: str) -> None:
    """A registration that states its digest: 400 naming both when the files' differs (nothing is stored)."""
    if expected is not None and expected.strip().lower() != sha:
        raise AdapterValidationError(f"sha256 mismatch: the request expects {expected.strip()[:80]!r} but the files' "
                                     f"sha256 is {sha!r}; nothing was registered", field="sha256")


def _route_text(record: AdapterRecord) -> str:
    assert record.route is not None
    return ", ".join(f"{short(sha)}={w}" for sha, w in record.route.splits) + f" (sticky: {record.route.sticky})"


def _meta(weights: AdapterWeights) -> dict[str, Any]:
    spec = weights.spec
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    return {"rank": weights.max_rank, "alpha": spec.lora_alpha, "target_modules": targets,
            "size_bytes": weights.size_bytes, "use_rslora": spec.use_rslora, "use_dora": spec.use_dora}
