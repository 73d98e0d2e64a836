"""Request/response shapes of the adapter admin API, and the conversion of an upload form into a payload.

JSON bodies are strict (no coercion of `"yes"` into a bool, no unknown fields on our own route) so a typo is
a 422 naming the field rather than a silently ignored option. vLLM's alias bodies accept vLLM's extra
fields. Upload forms arrive as multipart: the files stay in Starlette's spooled temp files and are passed
on as file objects, never read into memory here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.datastructures import FormData, UploadFile

from loraplex.adapters.sources.base import ADAPTER_FILES, CONFIG_FILE
from loraplex.adapters.sources.upload import UploadPayload
from loraplex.server.api.errors import ApiError

ARCHIVE_FIELD = "archive"
PINNED_FIELD = "pinned"
UPLOAD_FIELDS = (*ADAPTER_FILES, ARCHIVE_FIELD, PINNED_FIELD)
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class RegisterAdapterRequest(BaseModel):
    """`POST /v1/adapters`: `path` relative to (or inside) --adapter-root, or `s3://bucket/prefix`."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    path: StrictStr
    pinned: StrictBool = False


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter` body; vLLM-only extras (e.g. `load_inplace`) are ignored."""

    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter` body (`lora_int_id` is accepted and ignored, as names are unique)."""

    lora_name: StrictStr
    lora_int_id: int | None = None


class AdapterInfo(BaseModel):
    """One adapter's public record (`AdapterStore.describe`); fields it adds later pass through."""

    model_config = ConfigDict(extra="allow")
    name: str
    source: str
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    size_bytes: int | None = None
    pinned: bool
    tier: Literal["disk", "host", "device"]
    state: Literal["ready", "errored"]
    error: str | None = None
    created_at: float
    load_stats: dict[str, float | int]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


def upload_payload(form: FormData) -> tuple[UploadPayload, bool]:
    """The store's upload payload (`{file name: stream}` or the archive's stream) and `pinned`; 400/422 else."""
    _check_fields(form)
    pinned = _parse_pinned(form.get(PINNED_FIELD))
    if ARCHIVE_FIELD in form:
        if any(f in form for f in ADAPTER_FILES):
            raise ApiError(400, f"send either the field '{ARCHIVE_FIELD}' or the two adapter files, not both",
                           param=ARCHIVE_FIELD)
        return _file_stream(form, ARCHIVE_FIELD), pinned
    missing = [f for f in ADAPTER_FILES if f not in form]
    if missing:
        raise ApiError(400, f"upload is missing the file field(s) {', '.join(repr(m) for m in missing)}; send "
                       f"{' and '.join(repr(f) for f in ADAPTER_FILES)}, or one '{ARCHIVE_FIELD}' (.tar.gz)",
                       param=missing[0])
    return {f: _file_stream(form, f) for f in ADAPTER_FILES}, pinned


def _check_fields(form: FormData) -> None:
    unknown = sorted({k for k in form if k not in UPLOAD_FIELDS})
    if unknown:
        raise ApiError(400, f"unexpected form field(s) {unknown}; expected {list(UPLOAD_FIELDS)}", param=unknown[0])
    repeated = sorted({k for k in form if len(form.getlist(k)) > 1})
    if repeated:
        raise ApiError(400, f"form field(s) {repeated} sent more than once", param=repeated[0])


def _file_stream(form: FormData, field: str) -> UploadPayload:
    value = form[field]
    if isinstance(value, UploadFile):
        return value.file  # Starlette's spooled temp file, rewound after parsing: streamed on, not read here
    if field == CONFIG_FILE:  # a small JSON text part (curl -F 'adapter_config.json=<file') is fine too
        return value.encode()
    raise ApiError(400, f"form field '{field}' must be a file part (with a filename), not a text field",
                   param=field)


def _parse_pinned(value: str | UploadFile | None) -> bool:
    if value is None:
        return False
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ApiError(422, f"form field '{PINNED_FIELD}' must be true or false, got {value!r}", param=PINNED_FIELD)
