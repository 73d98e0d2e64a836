"""AdapterStore: registration (name check -> source -> validation -> durable record) and the host loader's reader.

Registration validates the adapter against the base model before the record is written, so a registered
adapter is one that loaded once. Files can still vanish, rot or be swapped for symlinks later: every read
goes through the source's `files`, which re-checks confinement at open time, so the host loader's read then
fails and marks only that adapter errored.

The engine's adapter state is reached only through its AdapterPort: registration posts typed commands
(restore, seed the host tier, pin; forget on unregister) and waits for the engine thread to apply them;
`describe` reads the snapshot the engine thread publishes.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import AdapterConflictError, AdapterNotFoundError
from loraplex.adapters.messages import Command
from loraplex.adapters.names import validate_adapter_name
from loraplex.adapters.port import AdapterPort
from loraplex.adapters.registry import AdapterRecord, AdapterRegistry
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


class AdapterStore:
    def __init__(self, config: StoreConfig, module_shapes: Mapping[str, tuple[int, int]], num_slots: int) -> None:
        self.config = config
        self.module_shapes = dict(module_shapes)
        self.num_slots = num_slots
        self.registry = AdapterRegistry(config.state_dir)
        self.local = LocalDirSource(config.adapter_root)
        self.upload = UploadSource(config.state_dir, config.max_upload_bytes)
        self.s3 = S3Source(config.state_dir, config.s3_endpoint, config.max_upload_bytes)
        self.port: AdapterPort | None = None
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
        committed = False
        try:
            weights = self.validate(source.files(local_dir))
            record = AdapterRecord(name, source.describe(ref), str(local_dir), pinned, meta=_meta(weights))
            with self._lock:
                self._check_pin_budget(pinned)
                self.registry.add(record)  # 409 here when a concurrent registration of `name` won
                committed = True
                handed = self._on_registered(record, weights)
        except BaseException:
            if not committed:  # a copy nothing refers to (upload/S3); in-place local dirs are never deleted
                source.discard(local_dir)
            raise
        self._wait_applied(handed)  # so the answer (and a GET right after) shows the host tier
        log.info("registered adapter %s (rank %d, %s)", name, weights.max_rank, record.source)
        return record

    def _check_pin_budget(self, pinned: bool) -> None:
        n_pinned = sum(r.pinned for r in self.registry.list())
        if pinned and n_pinned + 1 >= self.num_slots:
            raise AdapterConflictError(
                f"cannot pin more than {self.num_slots - 1} adapters with --max-loras {self.num_slots} "
                "(one slot must stay free for unpinned adapters)", field="pinned")

    def _on_registered(self, record: AdapterRecord, weights: AdapterWeights) -> Command | None:
        if self.port is None:
            return None
        # The validation read doubles as the first host load (laid out for the slot copy here, off the engine).
        return self.port.register(record.name, weights.prepared(), record.pinned)

    def _wait_applied(self, command: Command | None) -> None:
        if self.port is not None:
            self.port.wait_applied(command)

    def validate(self, files: Path | AdapterFiles) -> AdapterWeights:
        return load_adapter_dir(files, self.module_shapes, max_rank=self.config.max_lora_rank)

    def unregister(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self.registry.remove(name)
            handed = self.port.forget(name) if self.port is not None else None
        self._wait_applied(handed)  # its slot is freed (or doomed to be, while in use) before the answer
        self._source_of(record).discard(Path(record.local_dir))
        log.info("unregistered adapter %s", name)
        return record

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
        """The host loader's reader: re-read and re-validate the registered files."""
        if name not in self.registry:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered", field="model")
        record = self.registry.get(name)
        return self.validate(self._source_of(record).files(Path(record.local_dir)))

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
