"""An adapter version's id: the sha256 of its files, computed the same way by the server and by clients.

    sha256( canonical(adapter_config.json) + b"\\n" + adapter_model.safetensors )

`canonical` parses the config and writes it back with sorted keys, no insignificant whitespace and UTF-8
(`json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`), so re-saving the same
config with other indentation or key order keeps the id; the weights file is hashed byte for byte. A
canonical config never holds a raw newline, so the separator makes the split unambiguous.

Stdlib only: the Python client imports it to compute a digest before an upload (`loraplex adapters digest DIR`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SHORT_LEN = 12  # hex digits shown for a version (the whole digest is kept)
MAX_CONFIG_BYTES = 1 << 20  # as the validator's limit (adapters/peft_config.py)
_CHUNK = 1 << 20


class DigestError(ValueError):
    """The files cannot be hashed (the config is not a JSON object, or is too large); says which."""


def canonical_config(data: bytes) -> bytes:
    """adapter_config.json's canonical bytes; DigestError when it is not a JSON object."""
    if len(data) > MAX_CONFIG_BYTES:
        raise DigestError(f"{CONFIG_FILE} is over the {MAX_CONFIG_BYTES}-byte limit")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DigestError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise DigestError(f"{CONFIG_FILE} must be a JSON object, got {type(config).__name__}")
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def digest_streams(config: BinaryIO, weights: BinaryIO) -> str:
    """The version id of an adapter whose two files are open as `config` and `weights` (read to the end)."""
    h = hashlib.sha256(canonical_config(config.read(MAX_CONFIG_BYTES + 1)))
    h.update(b"\n")
    while chunk := weights.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def adapter_digest(open_file: Callable[[str], BinaryIO]) -> str:
    """The version id of the adapter whose files `open_file(name)` opens (a source's confined reader)."""
    with open_file(CONFIG_FILE) as config, open_file(WEIGHTS_FILE) as weights:
        return digest_streams(config, weights)


def dir_digest(directory: str | Path) -> str:
    """The version id of a PEFT adapter directory on this machine (what a client checks before uploading)."""
    root = Path(directory)
    return adapter_digest(lambda name: open(root / name, "rb"))  # noqa: SIM115 - closed by adapter_digest


def short(sha256: str) -> str:
    """The version as shown: its first 12 hex digits."""
    return sha256[:SHORT_LEN]
