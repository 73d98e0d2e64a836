"""Adapters registered by HTTP upload: two files, or one `.tar.gz` holding exactly those two files.

Archives are never extracted wholesale: each member is checked (a regular file, a plain relative name
that is one of the two adapter files, optionally under a single top folder) and copied by hand into a
file whose name we chose, so nothing can be written outside the staging directory. Every byte read —
compressed, decompressed and per file — is counted against `max_bytes` (413), whatever the headers say.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from loraplex.adapters.errors import AdapterValidationError
from loraplex.adapters.names import validate_adapter_name
from loraplex.adapters.sources.base import (
    ADAPTER_FILES,
    AdapterSource,
    ByteBudget,
    CappedReader,
    as_stream,
    copy_capped,
    prepare_owned_dir,
    stage_atomically,
)

FilePayload = BinaryIO | bytes
UploadPayload = Mapping[str, FilePayload] | BinaryIO | bytes
# Tar headers, padding and the end-of-archive record around the files' own bytes.
_TAR_OVERHEAD = 1 << 20


def _bad(message: str, field: str = "archive") -> AdapterValidationError:
    return AdapterValidationError(message, field=field)


class UploadSource(AdapterSource[UploadPayload]):
    """Writes uploads into `state_dir/uploads/<name>-<uuid>/`, atomically."""

    def __init__(self, state_dir: Path, max_bytes: int) -> None:
        self.owned_dir = prepare_owned_dir(Path(state_dir) / "uploads")
        self.max_bytes = max_bytes
        ByteBudget(max_bytes, "upload")  # validates max_bytes once, at start

    def materialize(self, ref: UploadPayload, name: str | None = None) -> Path:
        """A mapping of the two files → from_files; a single stream/bytes → from_archive."""
        if name is None:
            raise ValueError("an upload needs the adapter name")
        if isinstance(ref, Mapping):
            return self.from_files(name, ref)
        return self.from_archive(name, ref)

    def describe(self, ref: UploadPayload) -> str:
        return "upload"

    def from_files(self, name: str, files: Mapping[str, FilePayload]) -> Path:
        """Store `adapter_config.json` + `adapter_model.safetensors` given as bytes or file objects."""
        validate_adapter_name(name)
        missing = [f for f in ADAPTER_FILES if f not in files]
        extra = sorted(set(files) - set(ADAPTER_FILES))
        if missing:
            raise _bad(f"upload is missing {', '.join(missing)}", field=missing[0])
        if extra:
            raise _bad(f"unexpected upload file(s) {extra}; send only {', '.join(ADAPTER_FILES)}", extra[0])
        budget = ByteBudget(self.max_bytes, "upload")

        def fill(tmp: Path) -> None:
            for filename in ADAPTER_FILES:
                copy_capped(as_stream(files[filename]), tmp / filename, budget)

        return stage_atomically(self.owned_dir, name, fill)

    def from_archive(self, name: str, fileobj: BinaryIO | bytes) -> Path:
        """Store the two adapter files from a `.tar.gz` (flat, or under one top folder)."""
        validate_adapter_name(name)
        # Buffered: gzip parses its header a byte at a time.
        raw = io.BufferedReader(
            CappedReader(as_stream(fileobj), ByteBudget(self.max_bytes + _TAR_OVERHEAD, "upload archive"))
        )
        # Decompressed bytes are capped too: a small gzip can expand to terabytes (gzip bomb).
        plain = CappedReader(
            gzip.GzipFile(fileobj=raw, mode="rb"),
            ByteBudget(self.max_bytes + _TAR_OVERHEAD, "uncompressed upload archive"),
        )
        files_budget = ByteBudget(self.max_bytes, "upload")

        def fill(tmp: Path) -> None:
            try:
                with tarfile.open(fileobj=plain, mode="r|") as tar:  # type: ignore[arg-type]
                    _extract_members(tar, tmp, files_budget)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise _bad(f"archive is not a valid .tar.gz: {exc}") from None

        return stage_atomically(self.owned_dir, name, fill)


def _extract_members(tar: tarfile.TarFile, dest: Path, budget: ByteBudget) -> None:
    """Copy the two adapter files out of a streamed tar, refusing anything else (400)."""
    folders: set[str | None] = set()  # the folder each adapter file sits in (None: archive root)
    dirs: set[str] = set()
    seen: set[str] = set()
    for member in tar:  # streaming mode: members must be read in order, once
        parts = _member_parts(member.name)
        if member.isdir():
            if len(parts) > 1:
                raise _bad(f"archive member {member.name!r}: only one top folder is allowed")
            dirs.update(parts)
            continue
        if not member.isfile():
            raise _bad(f"archive member {member.name!r} is a link or special file; only regular files")
        if len(parts) not in (1, 2) or parts[-1] not in ADAPTER_FILES:
            raise _bad(f"unexpected archive member {member.name!r}; only {', '.join(ADAPTER_FILES)}")
        if parts[-1] in seen:
            raise _bad(f"archive holds {parts[-1]} twice")
        seen.add(parts[-1])
        folders.add(parts[0] if len(parts) == 2 else None)
        budget.require(member.size)
        source = tar.extractfile(member)
        assert source is not None  # regular files always have a stream
        copy_capped(source, dest / parts[-1], budget)  # our own name: never the member's path
    missing = [f for f in ADAPTER_FILES if f not in seen]
    if missing:
        raise _bad(f"archive is missing {', '.join(missing)}")
    if len(folders) > 1 or not dirs <= folders:
        found = sorted({*dirs, *(f for f in folders if f is not None)})
        raise _bad(f"archive must hold the two files in one place (flat or one top folder); found {found}")


def _member_parts(name: str) -> tuple[str, ...]:
    """Name components without `.`; 400 for absolute names and `..` anywhere."""
    if name.startswith("/") or "\\" in name or "\x00" in name:
        raise _bad(f"archive member {name!r} has an absolute or non-portable name")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _bad(f"archive member {name!r} contains '..'")
    return parts
