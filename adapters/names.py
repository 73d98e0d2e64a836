"""Adapter names: the one rule every entry point (HTTP, CLI `--preload`, manifest) shares.

A name becomes a file-name component (uploads, S3 copies), a metric label and an OpenAI `model`
value, so it is kept to a conservative alphabet: `[A-Za-z0-9._-]{1,128}`, never `.` or `..`.
"""

from __future__ import annotations

import re

from loraplex.adapters.errors import AdapterBadNameError

MAX_NAME_LENGTH = 128
_ALLOWED = re.compile(r"[A-Za-z0-9._-]")
_RESERVED = (".", "..")


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
            f"adapter name {name!r} contains the character {bad!r}; allowed: letters, digits, '.', '_', '-'",
            field=field,
        )
    if name in _RESERVED:
        raise AdapterBadNameError(f"adapter name {name!r} is reserved", field=field)
    return name
