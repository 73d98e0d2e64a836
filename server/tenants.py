"""Tenants (`--tenants FILE`): who a key belongs to, which adapters it may use and change, its weight and quotas.

The file is TOML, one `[[tenant]]` table per tenant (docs/security.md has a worked example):

    [[tenant]]
    name = "acme"                                   # [A-Za-z0-9._-], unique; "admin" and "default" are reserved
    keys = ["9f86d081884c7d65...", "plain:dev-key"] # sha256 hex digests of its API keys; plain: for development
    adapters = ["acme/*", "shared/*", "base"]       # globs of the adapter names it may use; "base": the base model
    admin = ["acme/*"]                              # globs of the names it may register, replace and delete
    weight = 3                                      # its fair share of the engine (default 1)
    [tenant.limits]                                 # each optional; absent = no limit
    requests_per_minute = 600
    tokens_per_minute = 200000                      # prompt + output tokens
    max_concurrent = 8                              # its sequences running at once (the rest queue)
    max_queued = 32                                 # its sequences admitted beyond those
    max_adapters = 20                               # adapters registered under its admin globs
    max_device_slots = 2                            # distinct adapters resident for it at once
    max_upload_bytes = 104857600

A key is found by its SHA-256 digest, compared in constant time against every digest of the table (the time does
not depend on which key matched, or how much of one did); keys themselves are never stored or logged. Globs are
`fnmatch`'s, matched case-sensitively against the whole name; `*` crosses the namespace '/', so `*` alone means
every adapter (the base model still needs "base").

`TenantDirectory` holds the table in use and swaps it for a new one when the file changes (polled) or on SIGHUP; a
file that does not parse or validate keeps the old table, and the error is logged once with its line.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import re
import threading
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.server.engine.fairness import TenantSpec

log = logging.getLogger(__name__)

BASE = "base"  # in `adapters`: the base model (not a glob)
OPERATOR = "admin"  # the --admin-key holder, when a tenants file is in use
DEFAULT = "default"  # everyone, when no tenants file is in use
RESERVED_NAMES = (OPERATOR, DEFAULT)
MAX_FILE_BYTES = 4 * 2**20
MAX_WEIGHT = 1000.0
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_GLOB = re.compile(r"[A-Za-z0-9._/*?\[\]!-]{1,256}")
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
PLAIN = "plain:"
LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "max_queued", "max_adapters",
          "max_device_slots", "max_upload_bytes")
_FIELDS = ("name", "keys", "adapters", "admin", "weight", "limits")


class TenantFileError(ValueError):
    """The tenants file cannot be used: the message names the file, the line and the problem."""


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's quotas; None = none. Sequences count as admission does: a request weighs prompts x n."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt tokens at admission, output tokens as they are produced
    max_concurrent: int | None = None  # sequences the engine runs at once for it
    max_queued: int | None = None  # sequences admitted beyond max_concurrent (all of them without it)
    max_adapters: int | None = None  # adapters registered under its admin globs
    max_device_slots: int | None = None  # distinct adapter slots its requests hold at once
    max_upload_bytes: int | None = None

    @property
    def max_in_flight(self) -> int | None:
        """Sequences admitted and not finished at once: max_concurrent + max_queued (None: no tenant cap)."""
        if self.max_queued is None:
            return None
        return self.max_queued + (self.max_concurrent or 0)


@dataclass(frozen=True)
class Tenant:
    """Who made a request: a tenant of the file, the operator (--admin-key), or everyone (no file)."""

    name: str
    adapters: tuple[str, ...] = (BASE, "*")
    admin: tuple[str, ...] = ("*",)
    weight: float = 1.0
    limits: TenantLimits = TenantLimits()
    operator: bool = False  # sees every tenant's usage
    digests: tuple[bytes, ...] = field(default=(), repr=False)
    plain_keys: int = 0  # how many of its keys were given in plain text (warned about)

    def may_use(self, adapter: str | None) -> bool:
        """`adapter` (None: the base model) is one this tenant may run, list and read."""
        if adapter is None:
            return BASE in self.adapters
        return _matches(adapter, self.adapters)

    def may_admin(self, name: str) -> bool:
        """`name` is one this tenant may register, replace and delete."""
        return _matches(name, self.admin)

    def spec(self) -> TenantSpec:
        """What the engine holds its requests to (fairness.TenantSpec)."""
        return TenantSpec(self.name, self.weight, self.limits.max_device_slots, self.limits.max_concurrent)


def _matches(name: str, globs: Iterable[str]) -> bool:
    return any(g != BASE and fnmatch.fnmatchcase(name, g) for g in globs)


EVERYONE = Tenant(DEFAULT, operator=True)  # no tenants file: every caller, once past the keys
OPERATOR_TENANT = Tenant(OPERATOR, operator=True)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class TenantTable:
    """One parsed tenants file."""

    tenants: tuple[Tenant, ...]
    source: str = ""  # the file, for messages
    _keys: tuple[tuple[bytes, int], ...] = field(default=(), repr=False)  # (digest, index into tenants)

    def __post_init__(self) -> None:
        keys = tuple((d, i) for i, t in enumerate(self.tenants) for d in t.digests)
        object.__setattr__(self, "_keys", keys)

    def identify(self, key: str) -> Tenant | None:
        """The tenant whose key this is, or None. Every digest is compared (constant time, no early exit)."""
        digest, found = key_digest(key), -1
        for candidate, index in self._keys:
            if hmac.compare_digest(digest, candidate):
                found = index
        return self.tenants[found] if found >= 0 else None

    def get(self, name: str) -> Tenant | None:
        return next((t for t in self.tenants if t.name == name), None)

    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tenants)


# ---- parsing -------------------------------------------------------------------------------------------------
def parse_tenants(text: str, source: str = "tenants file", reserved_digests: Iterable[bytes] = ()) -> TenantTable:
    """The table `text` describes; TenantFileError naming `source`, the line and the problem otherwise.
    `reserved_digests`: digests no tenant key may have (the --admin-key's)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message says "(at line L, column C)" or "(at end of document)"
        at = re.search(r"at line (\d+)", str(exc))
        line = int(at.group(1)) if at else max(1, len(text.splitlines()))
        raise TenantFileError(f"{source}:{line}: not valid TOML: {exc}") from None
    where = _Lines(text, source)
    unknown = sorted(set(data) - {"tenant"})
    if unknown:
        raise TenantFileError(f"{where.of_key(unknown[0])}: unknown top-level key {unknown[0]!r}; the file holds "
                              "[[tenant]] tables only")
    entries = data.get("tenant", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise TenantFileError(f"{where.of_key('tenant')}: 'tenant' must be an array of tables ([[tenant]])")
    tenants = tuple(_tenant(entry, i, where) for i, entry in enumerate(entries))
    _check_unique(tenants, where, frozenset(reserved_digests))
    return TenantTable(tenants, source)


class _Lines:
    """Where things are in the file, for messages: TOML parsers give no positions for valid documents."""

    def __init__(self, text: str, source: str) -> None:
        self.lines, self.source = text.splitlines(), source
        self.headers = [n for n, line in enumerate(self.lines, 1) if re.match(r"\s*\[\[\s*tenant\s*\]\]", line)]

    def of_key(self, key: str, tenant: int | None = None) -> str:
        """`source:line` of `key = ...` (within the `tenant`-th [[tenant]] table when given), else of its table."""
        start = self.headers[tenant] if tenant is not None and tenant < len(self.headers) else 1
        end = self.headers[tenant + 1] if tenant is not None and tenant + 1 < len(self.headers) else len(self.lines)
        pattern = re.compile(rf"\s*(?:\[\s*tenant\.)?{re.escape(key)}\s*[=\]]")
        line = next((n for n in range(start, end + 1) if pattern.match(self.lines[n - 1])), start)
        return f"{self.source}:{line}"


def _tenant(entry: dict[str, Any], index: int, where: _Lines) -> Tenant:
    name = entry.get("name")
    label = f"tenant {name!r}" if isinstance(name, str) else f"tenant #{index + 1}"

    def fail(key: str, message: str) -> TenantFileError:
        return TenantFileError(f"{where.of_key(key, index)}: {label}: {message}")

    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise fail(unknown[0], f"unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise fail("name", "'name' must be 1-64 characters of letters, digits, '.', '_', '-'")
    if name in RESERVED_NAMES:
        raise fail("name", f"the name {name!r} is reserved ({OPERATOR!r}: the --admin-key holder, {DEFAULT!r}: "
                           "everyone when no tenants file is used)")
    digests, plain = _keys(entry.get("keys", []), lambda m: fail("keys", m))
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= MAX_WEIGHT:
        raise fail("weight", f"'weight' must be a number in (0, {MAX_WEIGHT:g}], got {weight!r}")
    adapters, admin = (_globs(entry.get(key, []), key, fail) for key in ("adapters", "admin"))
    return Tenant(name, adapters, admin, float(weight), _limits(entry.get("limits", {}), fail), digests=digests,
                  plain_keys=plain)


def _keys(raw: object, fail: Callable[[str], TenantFileError]) -> tuple[tuple[bytes, ...], int]:
    if not isinstance(raw, list):
        raise fail("'keys' must be a list of sha256 hex digests (or 'plain:KEY' for development)")
    digests, plain = [], 0
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise fail(f"keys[{i}] must be a string")
        if item.startswith(PLAIN):
            if len(item) == len(PLAIN):
                raise fail(f"keys[{i}] is an empty plain: key")
            digests.append(key_digest(item[len(PLAIN):]))
            plain += 1
            continue
        match = _DIGEST.fullmatch(item)
        if match is None:  # never quote the value: it may be a key pasted by mistake
            raise fail(f"keys[{i}] is neither a sha256 hex digest (64 hex digits) nor 'plain:KEY'")
        digests.append(bytes.fromhex(match.group(1)))
    return tuple(digests), plain


def _globs(raw: object, key: str, fail: Callable[[str, str], TenantFileError]) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(g, str) for g in raw):
        raise fail(key, f"'{key}' must be a list of glob patterns of adapter names")
    for glob in raw:
        if not _GLOB.fullmatch(glob):
            raise fail(key, f"{key} pattern {glob!r}: use adapter-name characters and the glob characters * ? [ ] !")
    return tuple(raw)


def _limits(raw: object, fail: Callable[[str, str], TenantFileError]) -> TenantLimits:
    if not isinstance(raw, dict):
        raise fail("limits", "'limits' must be a table ([tenant.limits])")
    unknown = sorted(set(raw) - set(LIMITS))
    if unknown:
        raise fail(unknown[0], f"unknown limit {unknown[0]!r} (known: {', '.join(LIMITS)})")
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(key, f"limit {key!r} must be an integer >= 1 (leave it out for none), got {value!r}")
    return TenantLimits(**raw)


def _check_unique(tenants: tuple[Tenant, ...], where: _Lines, reserved: frozenset[bytes]) -> None:
    owners: dict[bytes, str] = {}
    seen: set[str] = set()
    for i, tenant in enumerate(tenants):
        if tenant.name in seen:
            raise TenantFileError(f"{where.of_key('name', i)}: tenant {tenant.name!r} is defined twice")
        seen.add(tenant.name)
        for digest in tenant.digests:
            if digest in reserved:
                raise TenantFileError(f"{where.of_key('keys', i)}: tenant {tenant.name!r}: one of its keys is the "
                                      "--admin-key (the operator's key cannot be a tenant's)")
            if owners.get(digest, tenant.name) != tenant.name:
                raise TenantFileError(f"{where.of_key('keys', i)}: tenant {tenant.name!r}: one of its keys is also a "
                                      f"key of tenant {owners[digest]!r} (a key names one tenant)")
            owners[digest] = tenant.name


def read_tenants_file(path: Path, reserved_digests: Iterable[bytes] = ()) -> TenantTable:
    """Read and parse `path` (TenantFileError when it cannot be read, is too large or is invalid)."""
    return parse_tenants(_read(path), str(path), reserved_digests)


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TenantFileError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise TenantFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TenantFileError(f"{path}:{line}: not UTF-8 text") from None


# ---- the table in use, and reloading it --------------------------------------------------------------------------
class TenantDirectory:
    """The tenants table in use. `reload()` re-reads the file (the watcher thread calls it when the file's bytes
    change, and at once after `request_reload()`, which SIGHUP calls); an unusable file keeps the table in use."""

    def __init__(self, path: Path, reserved_digests: Iterable[bytes] = (), poll_s: float = 0.25) -> None:
        self.path, self.poll_s = Path(path), poll_s
        self._reserved = frozenset(reserved_digests)
        text = _read(self.path)
        self.table = parse_tenants(text, str(self.path), self._reserved)  # at start an error stops the server
        self._seen = hashlib.sha256(text.encode()).digest()  # what the table was read from (or the last failure)
        self.reload_errors = 0
        self.last_error: str | None = None
        self.on_change: Callable[[TenantTable, TenantTable], None] = lambda old, new: None
        self._wake = threading.Event()
        self._forced = False  # a reload was asked for (SIGHUP): run it even if the bytes did not change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        _warn_plain(self.table)

    def reload(self, *, forced: bool = False) -> bool:
        """Re-read the file; True when a new table is in use. Unchanged bytes are a no-op unless `forced`
        (SIGHUP); a failure is logged and counted once per distinct failure, unless forced."""
        with self._lock:
            try:
                text = _read(self.path)
            except TenantFileError as exc:
                return self._failed(str(exc), hashlib.sha256(str(exc).encode()).digest(), forced)
            seen = hashlib.sha256(text.encode()).digest()
            if seen == self._seen and not forced:
                return False
            try:
                table = parse_tenants(text, str(self.path), self._reserved)
            except TenantFileError as exc:
                return self._failed(str(exc), seen, forced)
            old, self.table, self._seen, self.last_error = self.table, table, seen, None
        _log_change(old, table)
        _warn_plain(table)
        self.on_change(old, table)
        return True

    def _failed(self, message: str, seen: bytes, forced: bool) -> bool:
        if seen != self._seen or forced:
            self._seen, self.last_error = seen, message
            self.reload_errors += 1
            log.error("tenants file not reloaded, still serving the previous one (%d tenants): %s",
                      len(self.table.tenants), message)
        return False

    def request_reload(self) -> None:
        """Reload soon on the watcher thread, even if the file looks unchanged (safe to call from a signal
        handler: it only sets an event)."""
        self._forced = True
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="loraplex-tenants", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            forced, self._forced = self._forced, False
            try:
                self.reload(forced=forced)
            except Exception:  # noqa: BLE001 - the watcher must outlive any surprise; the old table stays
                log.exception("tenants file watcher")


def _log_change(old: TenantTable, new: TenantTable) -> None:
    added = sorted(set(new.names()) - set(old.names()))
    removed = sorted(set(old.names()) - set(new.names()))
    log.info("tenants reloaded from %s: %d tenants%s%s", new.source, len(new.tenants),
             f", added {', '.join(added)}" if added else "", f", removed {', '.join(removed)}" if removed else "")


def _warn_plain(table: TenantTable) -> None:
    for tenant in table.tenants:
        if tenant.plain_keys:
            log.warning("tenant %r has %d plain: key(s) in %s: for development only; store their sha256 digests "
                        "instead (printf %%s \"$KEY\" | sha256sum)", tenant.name, tenant.plain_keys, table.source)
