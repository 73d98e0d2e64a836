"""The adapter-source seam: turn a user's reference (a path, an upload, an S3 URL) into a local directory.

Every source hands back a directory holding `adapter_config.json` + `adapter_model.safetensors`; a later
layer validates their contents. Sources that copy bytes (upload, S3) share the helpers below: a byte
budget counted on the bytes actually read, and a staging directory that appears under its final name
only once complete (rename is atomic), so a crash never leaves a half-written adapter behind.

Loads read a registered adapter again later (`AdapterSource.files`): every open walks from the source's
root with O_NOFOLLOW on each component, so a directory or file swapped for a symlink after registration
is refused instead of followed outside.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import stat
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

from loraplex.adapters.errors import AdapterForbiddenError, AdapterNotFoundError, AdapterTooLargeError
from loraplex.adapters.registry import fsync_dir
from loraplex.adapters.weights import AdapterFiles, regular_file

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
STAGING_SUFFIX = ".tmp"
_CHUNK = 1 << 20  # 1 MiB: bounded memory per copy regardless of file size

RefT = TypeVar("RefT")


class AdapterSource(ABC, Generic[RefT]):
    """Where adapter files come from. `RefT` is what the user hands in (a path, an upload, a URL)."""

    #: Directory this source writes copies into; None when it serves files in place (never deleted).
    owned_dir: Path | None = None

    @abstractmethod
    def materialize(self, ref: RefT, name: str | None = None) -> Path:
        """Return a local directory holding the adapter files for `ref`; raise AdapterError subclasses."""

    @abstractmethod
    def describe(self, ref: RefT) -> str:
        """The record's `source` string for `ref` ("local:<rel>", "upload", "s3://bucket/prefix")."""

    def files(self, local_dir: Path) -> AdapterFiles:
        """Read access to a registered copy for a load, confined to this source's folder at open time."""
        if self.owned_dir is None:
            raise NotImplementedError(f"{type(self).__name__} serves files in place and must confine them")
        return OwnedCopyFiles(self.owned_dir, Path(local_dir))

    def discard(self, local_dir: Path) -> None:
        """Delete a directory this source created (e.g. after a 409); never touches anything else."""
        if self.owned_dir is None:
            return
        target = Path(local_dir).resolve()
        if target.parent == self.owned_dir.resolve() and target.is_dir():
            shutil.rmtree(target, ignore_errors=True)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


def open_beneath(root: Path, parts: Sequence[str], *, directory: bool = False) -> int:
    """Open `root/parts[0]/.../parts[-1]` one component at a time from `root`, never following a symlink.

    Each component is opened relative to its parent's fd with O_NOFOLLOW, so what was checked cannot be
    swapped for a link in between: such a component fails with ELOOP instead of leading out
    of `root`. Returns an fd the caller owns: a directory when `directory`, else the file (O_NONBLOCK).
    A symlink met on the way always raises ELOOP; ENOTDIR means a real non-directory.
    """
    if any(part in ("", ".", "..") or "/" in part for part in parts):
        raise ValueError(f"not plain path components: {list(parts)}")
    fd = os.open(root, _DIR_FLAGS)
    try:
        for i, part in enumerate(parts):
            last_file = i == len(parts) - 1 and not directory
            flags = (os.O_RDONLY | os.O_NONBLOCK) if last_file else _DIR_FLAGS
            child = _open_at(fd, part, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def list_and_close(dir_fd: int) -> list[str]:
    """Entry names of a directory fd from `open_beneath`; the fd is closed either way."""
    try:
        return os.listdir(dir_fd)
    finally:
        os.close(dir_fd)


def _open_at(parent: int, part: str, flags: int) -> int:
    try:
        return os.open(part, flags, dir_fd=parent)
    except NotADirectoryError:
        # O_DIRECTORY | O_NOFOLLOW answers ENOTDIR for a symlink too: tell the two apart.
        if stat.S_ISLNK(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, "a path component is a symlink", part) from None
        raise


class OwnedCopyFiles(AdapterFiles):
    """A copy this source wrote into `owned_dir/<copy>/`: plain files only, never a symlink anywhere."""

    def __init__(self, owned_dir: Path, local_dir: Path) -> None:
        super().__init__(local_dir)
        self._root = owned_dir.resolve()
        if local_dir.parent.resolve() != self._root:
            raise self._outside(local_dir.name)
        self._copy = local_dir.name

    def check(self) -> None:
        try:
            os.close(self._open((), directory=True))
        except (FileNotFoundError, NotADirectoryError):
            raise AdapterNotFoundError(f"adapter copy {self._copy!r} does not exist", field="path") from None

    def open(self, filename: str) -> BinaryIO:
        return regular_file(self._open((filename,)), filename)

    def names(self) -> list[str]:
        return list_and_close(self._open((), directory=True))

    def _open(self, tail: tuple[str, ...], *, directory: bool = False) -> int:
        try:
            return open_beneath(self._root, (self._copy, *tail), directory=directory)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._outside("/".join((self._copy, *tail))) from None
            raise

    def _outside(self, shown: str) -> AdapterForbiddenError:
        return AdapterForbiddenError(
            f"adapter file {shown!r} is a symlink or lies outside the state dir {str(self._root)!r}; "
            "refusing to read it", field="path")


class ByteBudget:
    """Counts bytes actually read against a cap; AdapterTooLargeError (413) as soon as it is exceeded."""

    def __init__(self, limit: int, what: str) -> None:
        if limit <= 0:
            raise ValueError(f"byte limit must be > 0, got {limit}")
        self.limit = limit
        self.what = what
        self.used = 0

    def take(self, n: int) -> None:
        """Charge `n` bytes that were actually read."""
        self.used += n
        if self.used > self.limit:
            raise AdapterTooLargeError(f"{self.what} is larger than the limit of {self.limit} bytes")

    def require(self, n: int) -> None:
        """Refuse early when a declared size alone would exceed the cap (nothing is charged)."""
        if self.used + n > self.limit:
            raise AdapterTooLargeError(
                f"{self.what} is larger than the limit of {self.limit} bytes (declared {n} bytes)"
            )


class CappedReader(io.RawIOBase):
    """A read-only stream over `inner` that charges every byte read to `budget` (guards gzip bombs)."""

    def __init__(self, inner: BinaryIO, budget: ByteBudget) -> None:
        super().__init__()
        self._inner = inner
        self._budget = budget

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        # Never ask for more than one byte past the budget: one byte over is enough to refuse.
        room = self._budget.limit - self._budget.used + 1
        data = self._inner.read(min(size, room))
        self._budget.take(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def as_stream(payload: BinaryIO | bytes | bytearray | memoryview) -> BinaryIO:
    """Uploads arrive as bytes (tests, small bodies) or file objects (multipart spools)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(payload))
    if not hasattr(payload, "read"):
        raise TypeError(f"expected bytes or a binary file object, got {type(payload).__name__}")
    return payload


def copy_capped(src: BinaryIO, dest: Path, budget: ByteBudget) -> int:
    """Stream `src` into a new file `dest` (must not exist), charging `budget`; fsync; return the size."""
    written = 0
    with open(dest, "xb") as out:
        while True:
            room = budget.limit - budget.used + 1
            chunk = src.read(min(_CHUNK, room))
            if not chunk:
                break
            budget.take(len(chunk))
            out.write(chunk)
            written += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return written


def stage_atomically(parent: Path, label: str, fill: Callable[[Path], None]) -> Path:
    """Build a directory via `fill(tmp)` in `parent/<label>.<random>.tmp`, then rename it to
    `parent/<label>-<uuid>` in one step. On any failure the temp directory is removed and the error
    re-raised. `label` must be a validated adapter name (or another single safe path component)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{label}.", suffix=STAGING_SUFFIX, dir=parent))
    try:
        fill(tmp)
        fsync_dir(tmp)
        final = parent / f"{label}-{uuid.uuid4().hex}"
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    return final


def prepare_owned_dir(parent: Path) -> Path:
    """Create a source's download/upload folder and delete temp directories a crash left behind in it
    (they were never renamed into place, so nothing refers to them)."""
    parent.mkdir(parents=True, exist_ok=True)
    for tmp in parent.glob(f"*{STAGING_SUFFIX}"):
        if tmp.is_dir() and not tmp.is_symlink():
            log.info("removing %s, left by an interrupted adapter download/upload", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    return parent
