"""Request/response shapes of the adapter admin API, and the conversion of an upload form into a payload.

JSON bodies are strict (no coercion of `"yes"` into a bool, no unknown fields on our own route) so a typo is
a 422 naming the field rather than a silently ignored option. vLLM's alias bodies accept vLLM's extra
fields. Upload forms arrive as multipart: the files stay in Starlette's spooled temp files and are passed
on as file objects, never read into memory here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.datastructures import FormData, UploadFile

from loraplex.adapters.sources.base import ADAPTER_FILES, CONFIG_FILE
from loraplex.adapters.sources.upload import UploadPayload
from loraplex.server.api.errors import ApiError

ARCHIVE_FIELD = "archive"
PINNED_FIELD = "pinned"
REPLACE_FIELD = "replace"
SHA256_FIELD = "sha256"
UPLOAD_FIELDS = (*ADAPTER_FILES, ARCHIVE_FIELD, PINNED_FIELD, REPLACE_FIELD, SHA256_FIELD)
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class RegisterAdapterRequest(BaseModel):
    """`POST /v1/adapters`: `path` relative to (or inside) --adapter-root, or `s3://bucket/prefix`. `replace`: make
    the files the name's new current version (a taken name is a 409 otherwise). `sha256`: the digest the files
    must have (adapters/digest.py; 400 naming both otherwise). `pinned` unset: false, or a replaced name's own."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    path: StrictStr
    pinned: StrictBool | None = None
    replace: StrictBool = False
    sha256: StrictStr | None = Field(default=None, max_length=128)


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter` body: `load_inplace` replaces a registered name's weights (a new
    current version, as `replace`); other vLLM-only extras are ignored."""

    lora_name: StrictStr
    lora_path: StrictStr
    load_inplace: StrictBool = False


class RollbackRequest(BaseModel):
    """`POST /v1/adapters/{name}/rollback`: a version (a prefix of its sha256, >= 4 hex digits); default the
    version current before this one."""

    model_config = ConfigDict(extra="forbid")
    version: StrictStr | None = None


class RouteSplit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictStr
    weight: StrictInt


class RouteRequest(BaseModel):
    """`PUT /v1/adapters/{name}/route`: split new requests between versions by weight. `sticky: "user"` keeps one
    route key (the OpenAI `user`, or X-Loraplex-Route-Key) on one version; "none" draws per request."""

    model_config = ConfigDict(extra="forbid")
    versions: list[RouteSplit] = Field(min_length=1, max_length=8)
    sticky: Literal["user", "none"] = "user"


class PrefetchRequest(BaseModel):
    """`POST /v1/adapters/{name}/prefetch`: load without a request, into host memory or a device slot."""

    model_config = ConfigDict(extra="forbid")
    tier: Literal["host", "device"] = "device"


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter` body (`lora_int_id` is accepted and ignored, as names are unique)."""

    lora_name: StrictStr
    lora_int_id: int | None = None


class VersionInfo(BaseModel):
    version: str
    sha256: str
    created: int
    source: str
    rank: int | None = None
    size_bytes: int | None = None
    current: bool
    weight: int | None = None  # its share of a route, if one splits the traffic
    tier: Literal["disk", "host", "device"]


class RouteVersion(BaseModel):
    version: str
    sha256: str
    weight: int


class RouteInfo(BaseModel):
    versions: list[RouteVersion]
    sticky: str


class PrefetchAnswer(BaseModel):
    name: str
    tier: Literal["host", "device"]
    versions: list[str]  # the versions being loaded (12 hex digits)


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
    version: str  # the current version: 12 hex digits of its sha256
    sha256: str
    created: int  # when the current version was registered (Unix seconds)
    versions: list[VersionInfo]  # the history, the current version first
    route: RouteInfo | None = None


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


@dataclass(frozen=True)
class UploadOptions:
    """An upload form's fields besides the files."""

    pinned: bool | None
    replace: bool
    sha256: str | None


def upload_payload(form: FormData) -> tuple[UploadPayload, UploadOptions]:
    """The store's upload payload (`{file name: stream}` or the archive's stream) and the form's options
    (`pinned`, `replace`, `sha256`); 400/422 else."""
    _check_fields(form)
    options = UploadOptions(_parse_bool(form, PINNED_FIELD), bool(_parse_bool(form, REPLACE_FIELD)),
                            _text_field(form, SHA256_FIELD))
    payload = _files(form)
    return payload, options


def _files(form: FormData) -> UploadPayload:
    if ARCHIVE_FIELD in form:
        if any(f in form for f in ADAPTER_FILES):
            raise ApiError(400, f"send either the field '{ARCHIVE_FIELD}' or the two adapter files, not both",
                           param=ARCHIVE_FIELD)
        return _file_stream(form, ARCHIVE_FIELD)
    missing = [f for f in ADAPTER_FILES if f not in form]
    if missing:
        raise ApiError(400, f"upload is missing the file field(s) {', '.join(repr(m) for m in missing)}; send "
                       f"{' and '.join(repr(f) for f in ADAPTER_FILES)}, or one '{ARCHIVE_FIELD}' (.tar.gz)",
                       param=missing[0])
    return {f: _file_stream(form, f) for f in ADAPTER_FILES}


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


def parse_bool(value: str | UploadFile | None, field: str) -> bool | None:
    """A form field or query parameter "true"/"false" (1/0, yes/no, on/off); None when absent; 422 else."""
    if value is None:
        return None
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ApiError(422, f"form field '{field}' must be true or false, got {value!r}", param=field)


def _parse_bool(form: FormData, field: str) -> bool | None:
    return parse_bool(form.get(field), field)


def _text_field(form: FormData, field: str) -> str | None:
    value = form.get(field)
    if value is None or isinstance(value, str):
        return value
    raise ApiError(400, f"form field '{field}' must be a text field, not a file", param=field)
