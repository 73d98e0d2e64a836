"""Adapters registered by HTTP upload: two files, or one `.tar.gz` holding exactly those two files.

Archives are never extracted wholesale: each member is checked (a regular file, a plain relative name
that is one of the two adapter files, optionally under a single top folder) and copied by hand into a
file whose name we chose, so nothing can be written outside the staging directory. Every byte read —
compressed, decompressed and per file — is counted against `max_bytes` (413), whatever the headers say.

Headers are bounded before `tarfile` reads them: it reads a GNU long-name or pax record whole into memory (a
64 MiB name compresses to 64 KiB), so records over `MAX_TAR_HEADER_BYTES`, chains of more than a few of them,
sparse members and archives of more than `MAX_MEMBERS` members are refused (400) first; member names quoted in
errors are cut short.
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
# A GNU long-name/long-link or pax record: a path of our two file names under one folder needs far less.
MAX_TAR_HEADER_BYTES = 4096
_MAX_HEADER_CHAIN = 4  # extended-header records in a row before one member
MAX_MEMBERS = 8  # the two files and their folder, with room for a stray entry such as "./"
_SHOWN = 100  # characters of a member name quoted in an error
_EXTENDED = {tarfile.GNUTYPE_LONGNAME: "GNU long-name", tarfile.GNUTYPE_LONGLINK: "GNU long-link",
             tarfile.XHDTYPE: "pax", tarfile.XGLTYPE: "pax global", tarfile.SOLARIS_XHDTYPE: "pax (Solaris)"}


def _bad(message: str, field: str = "archive") -> AdapterValidationError:
    return AdapterValidationError(message, field=field)


def _shown(name: str) -> str:
    return repr(name if len(name) <= _SHOWN else name[:_SHOWN] + "...")


class _BoundedTarInfo(tarfile.TarInfo):
    """Checks a header record's declared size before tarfile reads the record into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        kind = _EXTENDED.get(self.type)
        chain = getattr(tar, "_loraplex_chain", 0) + 1 if kind else 0
        tar._loraplex_chain = chain  # type: ignore[attr-defined]
        if kind and self.size > MAX_TAR_HEADER_BYTES:
            raise _bad(f"archive has a {kind} header record of {self.size} bytes; at most {MAX_TAR_HEADER_BYTES} "
                       "are accepted (the adapter's file names are short)")
        if chain > _MAX_HEADER_CHAIN:
            raise _bad(f"archive has more than {_MAX_HEADER_CHAIN} extended header records in a row")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _bad(f"archive member {_shown(self.name)} is a sparse file; only regular files")
        return super()._proc_member(tar)  # type: ignore[misc]


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
                with tarfile.open(fileobj=plain, mode="r|", tarinfo=_BoundedTarInfo) as tar:  # type: ignore[arg-type]
                    _extract_members(tar, tmp, files_budget)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise _bad(f"archive is not a valid .tar.gz: {str(exc)[:200]}") from None

        return stage_atomically(self.owned_dir, name, fill)


def _extract_members(tar: tarfile.TarFile, dest: Path, budget: ByteBudget) -> None:
    """Copy the two adapter files out of a streamed tar, refusing anything else (400)."""
    folders: set[str | None] = set()  # the folder each adapter file sits in (None: archive root)
    dirs: set[str] = set()
    seen: set[str] = set()
    for count, member in enumerate(tar, start=1):  # streaming mode: members must be read in order, once
        if count > MAX_MEMBERS:
            raise _bad(f"archive has more than {MAX_MEMBERS} members; it should hold the two adapter files")
        parts = _member_parts(member.name)
        if member.isdir():
            if len(parts) > 1:
                raise _bad(f"archive member {_shown(member.name)}: only one top folder is allowed")
            dirs.update(parts)
            continue
        if not member.isfile():
            raise _bad(f"archive member {_shown(member.name)} is a link or special file; only regular files")
        if len(parts) not in (1, 2) or parts[-1] not in ADAPTER_FILES:
            raise _bad(f"unexpected archive member {_shown(member.name)}; only {', '.join(ADAPTER_FILES)}")
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
        shown = ", ".join(_shown(name) for name in found[:4])
        raise _bad(f"archive must hold the two files in one place (flat or one top folder); found {shown}")


def _member_parts(name: str) -> tuple[str, ...]:
    """Name components without `.`; 400 for absolute names and `..` anywhere."""
    if name.startswith("/") or "\\" in name or "\x00" in name:
        raise _bad(f"archive member {_shown(name)} has an absolute or non-portable name")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _bad(f"archive member {_shown(name)} contains '..'")
    return parts
