"""Adapter versions: the changes a name's record goes through, and what each one tells the engine.

A registration is an immutable version whose id is the sha256 of its files (adapters/digest.py). A name's record
(adapters/registry.py) holds its versions, the current one first, the others most recently current first, at
most `--adapter-history` of them, plus an optional canary route. The registry's records are the one owner of
"which version is current": every change below is a pure function of the records, applied by the registry
under its lock (or compare-and-swap, for a shared registry), so a request resolves its version against one
consistent view.

The engine knows each version as its own adapter, under the key `name@<sha256>` (`engine_key`): a replace
registers a new key, so requests admitted on the old version keep its slot and finish on it while new ones
load the new one, and nothing in the engine ever has to swap weights under a running request. A version that
no request should start on any more (replaced, rolled back from, out of a route) is *retired*: the engine
frees its slot and host copy once no live request names it. A version that leaves the history is forgotten.
`engine_commands` turns a record's before/after into those commands.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from loraplex.adapters.digest import short
from loraplex.adapters.errors import AdapterConflictError, AdapterNotFoundError, AdapterValidationError
from loraplex.adapters.registry import STICKY, AdapterRecord, AdapterVersion, Records, Route

if TYPE_CHECKING:
    from loraplex.adapters.messages import Command
    from loraplex.adapters.port import AdapterPort
    from loraplex.adapters.weights import AdapterWeights

KEY_SEP = "@"  # never in an adapter name ([A-Za-z0-9._-]): "name@version" is unambiguous
MIN_PREFIX = 4  # hex digits a version prefix needs at least
MAX_SPLITS = 8  # versions one route may split traffic between
MAX_WEIGHT = 1_000_000
_HEX = re.compile(r"[0-9a-f]+")


# ---- engine keys ---------------------------------------------------------------------------------------
def engine_key(name: str, sha256: str) -> str:
    """The adapter name the engine knows one version by."""
    return f"{name}{KEY_SEP}{sha256}"


def split_key(key: str) -> tuple[str, str | None]:
    """(name, version) of an engine key or of a user's "name@version-prefix"; (name, None) for a plain name."""
    name, sep, version = key.partition(KEY_SEP)
    return (name, version) if sep else (name, None)


def name_of(key: str | None) -> str | None:
    """The adapter name of an engine key (None stays None): what metrics, admission and logs use."""
    return None if key is None else key.partition(KEY_SEP)[0]


def display(key: str) -> str:
    """An engine key as a message shows it: "'name' version abc123def456" ('name' for a plain name)."""
    name, sha = split_key(key)
    return f"{name!r} version {short(sha)}" if sha else repr(name)


def version_of(key: str | None) -> str | None:
    """The whole digest of an engine key (None for the base model or a plain name)."""
    return None if key is None else split_key(key)[1]


# ---- finding versions --------------------------------------------------------------------------------------
def find_version(record: AdapterRecord, prefix: str, *, field: str = "version") -> AdapterVersion:
    """The version of `record` whose digest starts with `prefix`: 400 when the prefix is malformed or matches
    several versions, 404 when none."""
    wanted = prefix.lower()
    if not (MIN_PREFIX <= len(wanted) <= 64 and _HEX.fullmatch(wanted)):
        raise AdapterValidationError(f"{field}: a version is {MIN_PREFIX} to 64 hex digits of its sha256, got "
                                     f"{prefix[:80]!r}", field=field)
    matches = [v for v in record.versions if v.sha256.startswith(wanted)]
    if not matches:
        known = ", ".join(short(v.sha256) for v in record.versions)
        raise AdapterNotFoundError(f"adapter {record.name!r} has no version {wanted!r} (its history: {known})",
                                   field=field)
    if len(matches) > 1:
        raise AdapterValidationError(f"{field}: {wanted!r} matches {len(matches)} versions of {record.name!r} ("
                                     f"{', '.join(short(v.sha256) for v in matches)}); give more digits", field=field)
    return matches[0]


def active(record: AdapterRecord | None) -> list[str]:
    """Digests a new request may start on: the routed ones, or the current one (current first)."""
    if record is None:
        return []
    if record.route is None:
        return [record.current.sha256]
    routed = [sha for sha, _ in record.route.splits]
    return sorted(routed, key=lambda sha: sha != record.current.sha256)


def pick(record: AdapterRecord, route_key: str | None, rng: random.Random | None = None) -> AdapterVersion:
    """The version a new request for the name runs: the current one, or a route's choice. A sticky route hashes
    (name, route key) onto the cumulative weights, so one key always lands on one version while the route
    stands; without a key (or with `sticky: none`) the draw is random by weight."""
    route = record.route
    if route is None:
        return record.current
    total = sum(w for _, w in route.splits)
    if route.sticky == "user" and route_key:
        digest = hashlib.sha256(f"{record.name}\0{route_key}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") % total
    else:
        point = (rng or random).randrange(total)
    for sha, weight in route.splits:
        if point < weight:
            return record.version(sha)
        point -= weight
    raise AssertionError("unreachable: the point lies below the total weight")


# ---- record changes (pure: the registry applies them to its newest records) ----------------------------------
def register_version(records: Records, name: str, version: AdapterVersion, *, replace_: bool,
                     pinned: bool | None, history: int) -> Records:
    """`name` registered with `version` as its current one. Without `replace_` a taken name is a 409; with it,
    the version becomes current (an identical digest already in the history is reused, files and all), the
    route is cleared (every new request runs this version) and the history is trimmed to `history`.
    `pinned` None keeps the record's."""
    record = records.get(name)
    if record is None:
        return {**records, name: AdapterRecord.of(name, version, bool(pinned))}
    if not replace_:
        raise taken(name)
    kept = record.version(version.sha256) or version
    versions = (kept, *(v for v in record.versions if v.sha256 != version.sha256))
    updated = replace(record, versions=versions[:history], route=None,
                      pinned=record.pinned if pinned is None else pinned)
    return {**records, name: updated}


def taken(name: str) -> AdapterConflictError:
    """The 409 for registering a taken name without `replace`."""
    return AdapterConflictError(f"adapter {name!r} is already registered (send \"replace\": true to make these "
                                "files its new current version)", field="name")


def rollback(records: Records, name: str, prefix: str | None, history: int) -> Records:
    """Make `prefix`'s version current (default: the one current before it); clears the route."""
    record = _get(records, name)
    if prefix is None:
        if len(record.versions) < 2:
            raise AdapterValidationError(f"adapter {name!r} has a single version ({short(record.current.sha256)}): "
                                         "there is nothing to roll back to", field="version")
        target = record.versions[1]
    else:
        target = find_version(record, prefix)
    versions = (target, *(v for v in record.versions if v is not target))
    return {**records, name: replace(record, versions=versions[:history], route=None)}


def set_route(records: Records, name: str, splits: Sequence[tuple[str, int]], sticky: str) -> Records:
    """Split `name`'s new requests between versions of its history by weight."""
    record = _get(records, name)
    if sticky not in STICKY:
        raise AdapterValidationError(f"sticky: expected one of {list(STICKY)}, got {sticky!r}", field="sticky")
    if not 1 <= len(splits) <= MAX_SPLITS:
        raise AdapterValidationError(f"versions: a route splits between 1 and {MAX_SPLITS} versions, got "
                                     f"{len(splits)}", field="versions")
    resolved: list[tuple[str, int]] = []
    for i, (prefix, weight) in enumerate(splits):
        if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
            raise AdapterValidationError(f"versions.{i}.weight: an integer in 0..{MAX_WEIGHT}, got {weight!r}",
                                         field=f"versions.{i}.weight")
        sha = find_version(record, prefix, field=f"versions.{i}.version").sha256
        if any(sha == other for other, _ in resolved):
            raise AdapterValidationError(f"versions.{i}.version: version {short(sha)} is listed twice",
                                         field=f"versions.{i}.version")
        resolved.append((sha, weight))
    if not any(weight for _, weight in resolved):
        raise AdapterValidationError("versions: at least one weight must be > 0", field="versions")
    route = Route(tuple((sha, w) for sha, w in resolved if w > 0), sticky)
    return {**records, name: replace(record, route=route)}


def clear_route(records: Records, name: str) -> Records:
    """Back to the current version for every new request (no-op without a route)."""
    record = _get(records, name)
    return {**records, name: replace(record, route=None)}


def _get(records: Records, name: str) -> AdapterRecord:
    record = records.get(name)
    if record is None:
        raise AdapterNotFoundError(f"adapter {name!r} is not registered", field="name")
    return record


# ---- what a change tells the engine ------------------------------------------------------------------------
def dropped(before: AdapterRecord | None, after: AdapterRecord | None) -> list[AdapterVersion]:
    """Versions `before` held that `after` does not (trimmed from the history, or the name removed)."""
    kept = {v.sha256 for v in after.versions} if after is not None else set()
    return [v for v in (before.versions if before is not None else ()) if v.sha256 not in kept]


def engine_commands(port: AdapterPort, name: str, before: AdapterRecord | None, after: AdapterRecord | None,
                    fresh: tuple[str, AdapterWeights] | None = None) -> list[Command]:
    """Post the commands that bring the engine from `before` to `after` (either may be None: registered,
    removed) and return them to wait on. `fresh`: (digest, weights) registration read and validated, seeded into
    the host tier. Order: versions new requests may start on first (restore: a rollback clears an old load
    error and the retirement), pins, then retirements, then versions that left the history (forget)."""
    history = {v.sha256 for v in after.versions} if after is not None else set()
    was_active = set(active(before))
    commands: list[Command] = []
    for sha in active(after):
        if sha in was_active:
            continue
        key = engine_key(name, sha)
        if fresh is not None and fresh[0] == sha:
            commands += port.register(key, fresh[1], pinned=False)
        else:
            commands.append(port.restore(key))
    commands += _pin_commands(port, name, before, after, history)
    # Newly inactive: no longer active, or first seen here as history (a record another replica wrote).
    was_inactive = {v.sha256 for v in before.versions} - was_active if before is not None else set()
    inactive = [sha for sha in _shas(after) if sha not in active(after) and sha not in was_inactive]
    commands += [port.retire(engine_key(name, sha)) for sha in inactive]
    commands += [port.forget(engine_key(name, v.sha256)) for v in dropped(before, after)]
    return commands


def _shas(record: AdapterRecord | None) -> list[str]:
    return [v.sha256 for v in record.versions] if record is not None else []


def _pin_commands(port: AdapterPort, name: str, before: AdapterRecord | None, after: AdapterRecord | None,
                  history: set[str]) -> list[Command]:
    """A pinned name pins its current version only: moving the current version moves the pin."""
    old = before.current.sha256 if before is not None and before.pinned else None
    new = after.current.sha256 if after is not None and after.pinned else None
    if old == new:
        return []
    out = [port.pin(engine_key(name, new))] if new is not None else []
    if old is not None and old in history:
        out.append(port.pin(engine_key(name, old), False))
    return out
