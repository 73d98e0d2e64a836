"""Adapters registered by path, confined to `--adapter-root`.

The path is resolved by walking it one component at a time from the real root, following symlinks
only while they stay inside: a `..` above the root or a link whose target lies outside is refused
(403) before anything outside is touched, so the answer never reveals whether an outside path exists.
The adapter files themselves are checked the same way (a root-internal dir may hold links that leave).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from loraplex.adapters.errors import (
    AdapterForbiddenError,
    AdapterNotFoundError,
    AdapterValidationError,
)
from loraplex.adapters.sources.base import ADAPTER_FILES, AdapterSource

_MAX_SYMLINKS = 40  # as Linux's MAXSYMLINKS: stops link loops


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
                "registration by path is disabled: --adapter-root is not set on this server", field="path"
            )
        return self._real_root

    @staticmethod
    def _outside(shown: str) -> AdapterForbiddenError:
        return AdapterForbiddenError(f"adapter path {shown!r} is outside --adapter-root", field="path")

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
