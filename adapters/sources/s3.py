"""Adapters fetched from S3 or an S3-compatible store (MinIO, Ceph, moto) into `state_dir/s3/`.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY env vars, profile,
instance role); the endpoint from the constructor or `LORAPLEX_S3_ENDPOINT`. Sizes are checked with
HEAD before any download (413), and the download itself is counted again in case the object changed.
Every boto error becomes an AdapterError with the object's URL, never a stack trace.

Every S3 request of the process (here and in registry_s3.py) runs on `S3_WORKERS` threads of its own, never on
the HTTP server's worker threads (where prompts are tokenized), and every operation has a total deadline,
`--s3-timeout` (retries and downloads included): an endpoint that never answers costs a 502 within it, and at
most `S3_WORKERS` threads however many registrations wait on it (before: 60 s x 4 attempts per registration, on
the shared pool, so forty of them stalled everyone's tokenization).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from loraplex.adapters.errors import (
    AdapterError,
    AdapterForbiddenError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    AdapterValidationError,
)
from loraplex.adapters.names import validate_adapter_name
from loraplex.adapters.sources.base import (
    ADAPTER_FILES,
    AdapterSource,
    ByteBudget,
    copy_capped,
    prepare_owned_dir,
    stage_atomically,
)

ENDPOINT_ENV = "LORAPLEX_S3_ENDPOINT"
# S3 bucket naming rules (3–63 chars, lowercase, digits, dots, hyphens, alnum at both ends).
_URL = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?", re.DOTALL)
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
DEFAULT_TIMEOUT_S = 30.0
S3_WORKERS = 8  # threads that make S3 requests, for the whole process
# upload_file in the calling thread (one of ours), never on s3transfer's own threads.
NO_THREADS = TransferConfig(use_threads=False)
T = TypeVar("T")
_DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}


class S3UnavailableError(AdapterError):
    """The store could not be reached or answered with a server-side error (502)."""

    status = 502


class S3Deadline:
    """The end of one S3 operation (`--s3-timeout` from its start): every call and every downloaded chunk checks it."""

    def __init__(self, timeout_s: float, what: str, field: str = "path") -> None:
        self.timeout_s, self.what, self.field = timeout_s, what, field
        self._end = time.monotonic() + timeout_s

    def remaining(self) -> float:
        """Seconds left; S3UnavailableError (502) once none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left

    def expired(self) -> S3UnavailableError:
        return S3UnavailableError(f"{self.what}: the S3 store did not answer within --s3-timeout "
                                  f"{self.timeout_s:g}s", field=self.field)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def s3_call(fn: Callable[[], T], deadline: S3Deadline) -> T:
    """Run `fn` (S3 requests) on the S3 threads and wait for it until `deadline`: S3UnavailableError after. A call
    that outlives its wait keeps its thread until boto's own timeouts end it (or its next deadline check); the pool
    is bounded, so such calls make later ones queue (and time out), never grow the process."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(S3_WORKERS, thread_name_prefix="s3")
    future = _pool.submit(fn)
    try:
        return future.result(timeout=deadline.remaining())
    except FutureTimeout:
        future.cancel()  # still queued: it never runs
        raise deadline.expired() from None


class _DeadlineReader:
    """A download stream that stops at the deadline (a server can drip bytes forever under any read timeout)."""

    def __init__(self, body: BinaryIO, deadline: S3Deadline) -> None:
        self._body, self._deadline = body, deadline

    def read(self, size: int = -1) -> bytes:
        self._deadline.remaining()
        return self._body.read(size)


@dataclass(frozen=True)
class S3Location:
    """A parsed `s3://bucket/prefix`; the prefix has no leading or trailing slash ("" = bucket root)."""

    bucket: str
    prefix: str

    def key(self, filename: str) -> str:
        return f"{self.prefix}/{filename}" if self.prefix else filename

    def url(self, filename: str | None = None) -> str:
        path = self.key(filename) if filename else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"


def parse_s3_url(url: object) -> S3Location:
    """`s3://bucket[/prefix]` → S3Location; AdapterValidationError (400) naming what is wrong."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise AdapterValidationError(f"expected an s3://bucket/prefix URL, got {url!r}", field="path")
    match = _URL.fullmatch(url)
    if match is None:
        raise AdapterValidationError(f"{url!r}: invalid S3 bucket name", field="path")
    prefix = (match.group("prefix") or "").strip("/")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in prefix):
        raise AdapterValidationError(f"{url!r}: the key prefix contains control characters", field="path")
    return S3Location(match.group("bucket"), prefix)


class S3Source(AdapterSource[str]):
    """Copies `<prefix>/adapter_config.json` + `<prefix>/adapter_model.safetensors` into the state dir."""

    def __init__(self, state_dir: Path, endpoint_url: str | None = None, max_bytes: int = 1 << 30,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.owned_dir = prepare_owned_dir(Path(state_dir) / "s3")
        self.endpoint_url = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        ByteBudget(max_bytes, "S3 adapter")  # validates max_bytes once, at start
        self._client: Any = None
        self._client_lock = threading.Lock()

    def describe(self, ref: str) -> str:
        return parse_s3_url(ref).url()

    def materialize(self, ref: str, name: str | None = None) -> Path:
        """Download the two adapter files under `ref` into `state_dir/s3/<label>-<uuid>/`, within --s3-timeout."""
        location = parse_s3_url(ref)
        label = validate_adapter_name(name) if name else _url_label(location)
        deadline = S3Deadline(self.timeout_s, f"adapter at {location.url()}")
        client = self._get_client()
        sizes = {f: self._object_size(client, location, f, deadline) for f in ADAPTER_FILES}
        total = sum(sizes.values())
        if total > self.max_bytes:
            raise AdapterTooLargeError(
                f"adapter at {location.url()} is {total} bytes ({sizes}); the limit is {self.max_bytes}",
                field="path",
            )
        budget = ByteBudget(self.max_bytes, f"adapter at {location.url()}")

        def download(filename: str, dest: Path) -> None:
            body = client.get_object(Bucket=location.bucket, Key=location.key(filename))["Body"]
            try:
                copy_capped(_DeadlineReader(body, deadline), dest, budget)  # type: ignore[arg-type]
            finally:
                body.close()

        def fill(tmp: Path) -> None:
            for filename in ADAPTER_FILES:
                with s3_errors(location, filename):
                    s3_call(lambda f=filename: download(f, tmp / f), deadline)

        return stage_atomically(self.owned_dir, label, fill)

    def _get_client(self) -> Any:
        with self._client_lock:  # boto3 clients are thread-safe; creating them is not
            if self._client is None:
                self._client = make_s3_client(self.endpoint_url, self.timeout_s)
            return self._client

    @staticmethod
    def _object_size(client: Any, location: S3Location, filename: str, deadline: S3Deadline) -> int:
        with s3_errors(location, filename):
            head = s3_call(lambda: client.head_object(Bucket=location.bucket, Key=location.key(filename)), deadline)
        return int(head["ContentLength"])


def make_s3_client(endpoint_url: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """A boto3 S3 client: path-style addressing for custom endpoints (MinIO, moto), bounded retries, and socket
    timeouts no longer than one operation's deadline (the deadline itself is S3Deadline's)."""
    config = Config(
        s3={"addressing_style": "path"} if endpoint_url else None,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=min(10.0, timeout_s),
        read_timeout=min(60.0, timeout_s),
    )
    with s3_errors(None, None):
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _url_label(location: S3Location) -> str:
    """A safe directory label when no adapter name is given: a hash of the URL."""
    return "s3-" + hashlib.sha256(location.url().encode()).hexdigest()[:16]


@contextmanager
def s3_errors(location: S3Location | None, filename: str | None, field: str = "path") -> Iterator[None]:
    """Translate boto errors into AdapterErrors that name the object (and the request field to blame)."""
    where = location.url(filename) if location is not None else "the S3 store"
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in _NOT_FOUND_CODES:
            raise AdapterNotFoundError(f"{where} does not exist", field=field) from None
        if code in _DENIED_CODES:
            raise AdapterForbiddenError(f"access to {where} was denied ({code})", field=field) from None
        message = error.get("Message") or code
        raise S3UnavailableError(f"S3 error for {where}: {message}", field=field) from None
    except BotoCoreError as exc:  # no credentials, endpoint unreachable, stream cut…
        raise S3UnavailableError(f"cannot reach {where}: {exc}", field=field) from None
