"""Adapters registered by path, confined to `--adapter-root`.

The path is resolved by walking it one component at a time from the real root, following symlinks
only while they stay inside: a `..` above the root or a link whose target lies outside is refused
(403) before anything outside is touched, so the answer never reveals whether an outside path exists.
The adapter files themselves are checked the same way (a root-internal dir may hold links that leave).
Every load does it again (`files`): the walk re-checks what registration checked, and the real path it
finds is then opened beneath the root with O_NOFOLLOW on each component, so a directory or file swapped
for an outside link after registration, or between the check and the open, is refused, never read.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from loraplex.adapters.errors import (
    AdapterForbiddenError,
    AdapterNotFoundError,
    AdapterValidationError,
)
from loraplex.adapters.sources.base import ADAPTER_FILES, AdapterSource, list_and_close, open_beneath
from loraplex.adapters.weights import AdapterFiles, regular_file

_MAX_SYMLINKS = 40  # as Linux's MAXSYMLINKS: stops link loops
_UPLOAD_HINT = ("an adapter from anywhere else can be uploaded: PUT /v1/adapters/{name} with its two files "
                "(`loraplex adapters upload NAME DIR`)")


class LocalDirSource(AdapterSource[str]):
    """Serves adapter directories in place (no copy) from under `root`; `root=None` refuses all paths."""

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root)
        self._real_root: Path | None = None
        self._spellings: tuple[Path, ...] = ()
        if root is not None:
            try:
                real = Path(root).resolve(strict=True)
            except (OSError, RuntimeError) as exc:
                raise ValueError(f"--adapter-root {str(root)!r} does not exist ({exc})") from exc
            if not real.is_dir():
                raise ValueError(f"--adapter-root {str(root)!r} is not a directory")
            self._real_root = real
            # Users may spell absolute paths through the configured root or through its real location.
            self._spellings = (real, Path(os.path.abspath(root)))

    def materialize(self, ref: str, name: str | None = None) -> Path:
        return self.resolve(ref)

    def files(self, local_dir: Path) -> AdapterFiles:
        """Read access to a registered dir for a load, confined to the root at every open (see above)."""
        return RootedDirFiles(self, Path(local_dir))

    def describe(self, ref: str) -> str:
        root = self._require_root()
        return f"local:{self.resolve(ref).relative_to(root).as_posix()}"

    def resolve(self, path: str) -> Path:
        """The real adapter directory for `path` (relative to the root, or absolute inside it).

        403 outside the root (directly, by `..` or by symlink), 404 when it does not exist,
        400 when it is not a directory or is not a usable path string.
        """
        root = self._require_root()
        real = self._walk(self._root_relative_parts(path), path)
        if not real.is_dir():
            raise AdapterValidationError(f"adapter path {path!r} is not a directory", field="path")
        rel = real.relative_to(root).parts
        for filename in ADAPTER_FILES:
            # Missing files are the validator's business (400); only check that present ones stay inside.
            if os.path.lexists(real / filename):
                self._walk((*rel, filename), path)
        final = real.resolve(strict=True)
        if not final.is_relative_to(root):  # the walk guarantees this; keep the invariant explicit
            raise self._outside(path)
        return final

    # -- helpers -------------------------------------------------------------------------------------
    def _require_root(self) -> Path:
        if self._real_root is None:
            raise AdapterForbiddenError(
                "registration by path is off: this server has no --adapter-root (restart it with --adapter-root DIR "
                f"or LORAPLEX_ADAPTER_ROOT=DIR to register folders under DIR); {_UPLOAD_HINT}", field="path")
        return self._real_root

    def _outside(self, shown: str) -> AdapterForbiddenError:
        return AdapterForbiddenError(
            f"adapter path {shown!r} is outside --adapter-root {str(self.root)!r} (paths are confined to it; give "
            f"one relative to it, or inside it); {_UPLOAD_HINT}", field="path")

    def _root_relative_parts(self, path: object) -> Sequence[str]:
        if not isinstance(path, str) or not path.strip():
            raise AdapterValidationError("adapter path must be a non-empty string", field="path")
        if "\x00" in path:
            raise AdapterValidationError("adapter path contains a NUL byte", field="path")
        return self._rebase(path, path) if os.path.isabs(path) else Path(path).parts

    def _rebase(self, absolute: str, shown: str) -> Sequence[str]:
        """Parts of an absolute path below the root (by prefix, without resolving); 403 when not below."""
        parts = Path(absolute).parts
        for spelling in self._spellings:
            if parts[: len(spelling.parts)] == spelling.parts:
                return parts[len(spelling.parts) :]
        raise self._outside(shown)

    def _walk(self, parts: Sequence[str], shown: str) -> Path:
        """Follow `parts` from the real root like the kernel would, but refuse to step outside it.

        `current` is always a real (symlink-free) directory inside the root, so `..` is its parent.
        """
        root = self._require_root()
        pending = list(reversed(parts))  # a stack: links push their target's parts
        current, links = root, 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if current == root:
                    raise self._outside(shown)
                current = current.parent
                continue
            candidate = current / part
            if not stat.S_ISLNK(self._lstat_mode(candidate, shown)):
                current = candidate
                continue
            links += 1
            if links > _MAX_SYMLINKS:
                raise AdapterValidationError(f"adapter path {shown!r}: too many symlinks", field="path")
            target = os.readlink(candidate)
            if os.path.isabs(target):
                pending.extend(reversed(self._rebase(target, shown)))
                current = root
            else:
                pending.extend(reversed(Path(target).parts))
        return current

    @staticmethod
    def _lstat_mode(candidate: Path, shown: str) -> int:
        try:
            return os.lstat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise AdapterNotFoundError(f"adapter path {shown!r} does not exist", field="path") from None
        except OSError as exc:
            raise AdapterValidationError(
                f"adapter path {shown!r} cannot be read: {exc.strerror}", field="path"
            ) from None


class RootedDirFiles(AdapterFiles):
    """A registered dir under the root (its real path, as registration resolved it), read for a load."""

    def __init__(self, source: LocalDirSource, local_dir: Path) -> None:
        super().__init__(local_dir)
        self._source, self._root = source, source._require_root()
        if not local_dir.is_relative_to(self._root):  # e.g. restarted with another --adapter-root
            raise source._outside(str(local_dir))
        self._rel = local_dir.relative_to(self._root).parts
        self._shown = local_dir.relative_to(self._root).as_posix()

    def check(self) -> None:
        os.close(self._open(self._rel, directory=True))

    def open(self, filename: str) -> BinaryIO:
        try:
            return regular_file(self._open((*self._rel, filename)), filename)
        except AdapterNotFoundError:
            self.check()  # the directory itself is gone (404) or left the root (403)?
            raise FileNotFoundError(filename) from None  # no: only this file is missing

    def names(self) -> list[str]:
        return list_and_close(self._open(self._rel, directory=True))

    def _open(self, parts: Sequence[str], *, directory: bool = False) -> int:
        """Walk `parts` from the root (403 outside, 404 missing), then open the real path it found."""
        real = self._source._walk(parts, self._shown)
        try:
            return open_beneath(self._root, real.relative_to(self._root).parts, directory=directory)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # swapped for a symlink between the walk and the open
                raise self._source._outside(self._shown) from None
            if exc.errno == errno.ENOTDIR:
                raise AdapterValidationError(f"adapter path {self._shown!r} is not a directory", field="path") from None
            if exc.errno == errno.ENOENT:
                raise AdapterNotFoundError(f"adapter path {self._shown!r} does not exist", field="path") from None
            raise
