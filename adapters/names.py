"""Adapter names: the one rule every entry point (HTTP, CLI `--preload`, manifest) shares.

A name becomes a metric label, an OpenAI `model` value, part of a URL path and (mapped by `path_label`) a file-name
component of uploads and S3 copies, so it is kept to a conservative alphabet: `[A-Za-z0-9._-]`, at most 128
characters, with at most one `/` separating a namespace from the rest (`acme/support`: tenants' access globs match
namespaces, see server/tenants.py). No part is empty, `.` or `..`; the part after a `/` is never one of the words
the adapter routes use after a name (`PUT /v1/adapters/acme/route` must mean one thing).
"""

from __future__ import annotations

import re

from loraplex.adapters.errors import AdapterBadNameError

MAX_NAME_LENGTH = 128
_ALLOWED = re.compile(r"[A-Za-z0-9._/-]")
_RESERVED = (".", "..")
# What follows `/v1/adapters/{name}` in the adapter routes: a namespaced name ending in one would be ambiguous.
ROUTE_WORDS = ("rollback", "route", "weights", "prefetch", "versions")


def validate_adapter_name(name: object, *, field: str = "name") -> str:
    """Return `name` unchanged when it is a valid adapter name, else raise AdapterBadNameError (422)."""
    if not isinstance(name, str):
        raise AdapterBadNameError(f"adapter name must be a string, got {type(name).__name__}", field=field)
    if not name:
        raise AdapterBadNameError("adapter name is empty", field=field)
    if len(name) > MAX_NAME_LENGTH:
        raise AdapterBadNameError(
            f"adapter name is too long: {len(name)} characters (at most {MAX_NAME_LENGTH})", field=field
        )
    bad = next((ch for ch in name if not _ALLOWED.fullmatch(ch)), None)
    if bad is not None:
        raise AdapterBadNameError(
            f"adapter name {name!r} contains the character {bad!r}; allowed: letters, digits, '.', '_', '-' (and "
            "one '/' after a namespace)",
            field=field,
        )
    parts = name.split("/")
    if len(parts) > 2:
        raise AdapterBadNameError(f"adapter name {name!r} has {len(parts) - 1} '/'; at most one, after a namespace "
                                  "(namespace/name)", field=field)
    for part in parts:
        if not part:
            raise AdapterBadNameError(f"adapter name {name!r} has an empty part around '/'", field=field)
        if part in _RESERVED:
            raise AdapterBadNameError(f"adapter name {name!r} is reserved" if len(parts) == 1 else
                                      f"adapter name {name!r}: {part!r} is reserved", field=field)
    if len(parts) == 2 and parts[1] in ROUTE_WORDS:
        raise AdapterBadNameError(f"adapter name {name!r}: {parts[1]!r} after a namespace is reserved (the adapter "
                                  f"routes use it after a name: {', '.join(ROUTE_WORDS)})", field=field)
    return name


def path_label(name: str) -> str:
    """A single file-name component standing for a valid adapter name: its '/' becomes '+' (never in a name, so
    two names never share a label)."""
    return validate_adapter_name(name).replace("/", "+")
