"""SharedRegistry: one adapter registry for many replicas, kept in S3-compatible storage (`--registry s3://…`).

Layout under `s3://bucket/prefix/`:

    registry.json                          the manifest (the same format as the local one, plus `remote`)
    adapters/<name>/<uuid>/adapter_config.json, adapter_model.safetensors
                                           one immutable copy per registration, written before the manifest

Changes are compare-and-swap on the manifest: read it with its ETag, apply the change, write it back with
`If-Match: <etag>` (`If-None-Match: *` when there is none yet). A write that lost a race gets 412, re-reads
and re-applies, so concurrent registrations from several replicas never lose one, and two registrations of one
name give one success and one 409. Readers never lock: each replica polls the manifest with `If-None-Match`
(a 304 costs no body) every `--registry-poll-seconds` and applies what changed (AdapterStore.sync).

A registration's files are uploaded under a fresh uuid before its manifest write, so a loser of a name race
never overwrites the winner's files (it deletes its own), and a replica that reads a record always finds them.

Every request runs on the process's S3 threads, and every operation (a refresh, a whole change with its retries,
an upload, a delete) ends within `--s3-timeout` (sources/s3.py: `s3_call`, `S3Deadline`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from loraplex.adapters.errors import AdapterConflictError, AdapterNotFoundError
from loraplex.adapters.names import validate_adapter_name
from loraplex.adapters.registry import (
    MANIFEST_NAME,
    AdapterRecord,
    ManifestError,
    RecordView,
    manifest_bytes,
    parse_manifest,
)
from loraplex.adapters.sources.base import ADAPTER_FILES
from loraplex.adapters.sources.s3 import (
    DEFAULT_TIMEOUT_S,
    NO_THREADS,
    S3Deadline,
    S3Location,
    S3UnavailableError,
    make_s3_client,
    parse_s3_url,
    s3_call,
    s3_errors,
)

log = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"
# Compare-and-swap attempts before a change gives up (502): each lost race means another replica's change
# landed, so this many in a row means dozens of concurrent writers.
MAX_CAS_ATTEMPTS = 40
_BACKOFF_MAX_S = 0.5

Records = dict[str, AdapterRecord]


def parse_registry_url(url: str) -> S3Location:
    """`--registry s3://bucket/prefix` → S3Location; ValueError naming the flag."""
    try:
        return parse_s3_url(url)
    except Exception as exc:  # noqa: BLE001 - AdapterValidationError: re-said for the flag
        raise ValueError(f"--registry: {exc}") from None


class SharedRegistry(RecordView):
    """The adapter registry shared by every replica given the same `--registry` URL."""

    shared = True

    def __init__(self, url: str, endpoint_url: str | None, client: Any = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.location = parse_registry_url(url)
        self.url = self.location.url()
        self.timeout_s = timeout_s
        self._client = client if client is not None else make_s3_client(endpoint_url, timeout_s)
        self._manifest_key = self.location.key(MANIFEST_NAME)
        self._lock = threading.Lock()  # one change or refresh at a time in this process
        self._etag: str | None = None  # of the manifest `_records` came from (None: none in the store yet)
        self._records: Records = {}
        self.missing_on_load: tuple[str, ...] = ()  # files live in the store; a missing one fails its load
        self._check_bucket()
        self.refresh()  # a corrupt manifest stops the server at start (ManifestError names it)

    # -- reading the store ------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Fetch the manifest when it changed since the last read (`If-None-Match`); True when the records
        changed. ManifestError for a corrupt manifest (the last good view is kept), S3UnavailableError when
        the store cannot be reached."""
        with self._lock:
            before = self._records
            self._fetch(conditional=True, deadline=self._deadline("reading the registry manifest"))
            return self._records != before

    def _deadline(self, what: str) -> S3Deadline:
        return S3Deadline(self.timeout_s, f"{what} at {self.url}", field="registry")

    def _get_manifest(self, args: dict[str, Any]) -> tuple[str, bytes] | None:
        """(ETag, body) of the manifest; None when it is unchanged (304). In an S3 thread."""
        try:
            answer = self._client.get_object(**args)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "304" or code == "NotModified":
                return None
            raise
        return answer["ETag"], answer["Body"].read()

    def _fetch(self, *, conditional: bool, deadline: S3Deadline) -> None:
        """Bring `_records`/`_etag` up to date with the store. Hold `_lock`."""
        args: dict[str, Any] = {"Bucket": self.location.bucket, "Key": self._manifest_key}
        if conditional and self._etag is not None:
            args["IfNoneMatch"] = self._etag
        try:
            with s3_errors(self.location, MANIFEST_NAME, field="registry"):
                got = s3_call(lambda: self._get_manifest(args), deadline)
                if got is None:
                    return
                etag, data = got
        except AdapterNotFoundError:  # no manifest yet: an empty registry, created by the first change
            self._etag, self._records = None, {}
            return
        try:
            self._records = parse_manifest(data)  # raises first: the old view stays
        except ValueError as exc:
            raise ManifestError(
                f"adapter registry manifest {self.location.url(MANIFEST_NAME)} is corrupt ({exc}); it was left "
                "untouched: repair it, or delete it to start with an empty registry") from exc
        self._etag = etag

    def _check_bucket(self) -> None:
        try:
            with s3_errors(self.location, None, field="registry"):
                s3_call(lambda: self._client.head_bucket(Bucket=self.location.bucket),
                        self._deadline("checking the bucket"))
        except AdapterNotFoundError:
            raise ValueError(f"--registry: the bucket of {self.url} does not exist (create it first)") from None

    # -- changes ------------------------------------------------------------------------------------
    def add(self, record: AdapterRecord) -> AdapterRecord:
        """Register `record` in the shared manifest; AdapterConflictError (409) when any replica holds the name."""
        validate_adapter_name(record.name)

        def change(records: Records) -> Records:
            if record.name in records:
                raise AdapterConflictError(f"adapter {record.name!r} is already registered", field="name")
            return {**records, record.name: record}

        self._update(change)
        return record

    def remove(self, name: str) -> AdapterRecord:
        """Unregister `name` everywhere; AdapterNotFoundError (404) when no replica holds it (any more)."""
        removed: list[AdapterRecord] = []

        def change(records: Records) -> Records:
            if name not in records:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered", field="name")
            removed.append(records[name])
            return {k: v for k, v in records.items() if k != name}

        self._update(change)
        return removed[-1]

    def _update(self, change: Callable[[Records], Records]) -> None:
        """Apply `change` to the newest manifest and write it back only if nobody wrote in between."""
        deadline = self._deadline("changing the registry manifest")
        with self._lock:
            for attempt in range(MAX_CAS_ATTEMPTS):
                try:
                    self._fetch(conditional=True, deadline=deadline)  # a 304 keeps our view: it is the newest
                except ManifestError as exc:  # a change must not overwrite what it cannot read
                    raise S3UnavailableError(str(exc), field="registry") from None
                updated = change(self._records)  # may raise 404/409 against the newest records
                etag = self._put_if_unchanged(updated, deadline)
                if etag is not None:
                    self._etag, self._records = etag, updated
                    return
                log.debug("registry manifest changed under us (attempt %d); re-reading", attempt + 1)
                time.sleep(min(deadline.remaining(), random.uniform(0, min(_BACKOFF_MAX_S, 0.01 * 2**attempt))))
        raise S3UnavailableError(
            f"could not update {self.location.url(MANIFEST_NAME)}: it changed under every one of "
            f"{MAX_CAS_ATTEMPTS} attempts", field="registry")

    def _put_if_unchanged(self, records: Records, deadline: S3Deadline) -> str | None:
        """Write the manifest if it is still the one we read; its new ETag, or None when another write won."""
        condition = {"IfMatch": self._etag} if self._etag is not None else {"IfNoneMatch": "*"}
        body = manifest_bytes(records)

        def put() -> str | None:
            try:
                answer = self._client.put_object(Bucket=self.location.bucket, Key=self._manifest_key, Body=body,
                                                 ContentType="application/json", **condition)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                # 412: the ETag moved; 409 ConditionalRequestConflict: a concurrent conditional write.
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return None
                raise
            return answer["ETag"]

        try:
            with s3_errors(self.location, MANIFEST_NAME, field="registry"):
                return s3_call(put, deadline)
        except AdapterNotFoundError:  # S3 answers 404 to If-Match when the manifest was deleted meanwhile
            return None

    # -- adapter files ------------------------------------------------------------------------------
    def upload_files(self, name: str, local_dir: Path) -> str:
        """Copy a validated adapter's two files under a fresh key prefix; its `s3://` URL for the record."""
        copy = S3Location(self.location.bucket, self.location.key(f"{ADAPTERS_DIR}/{name}/{uuid.uuid4().hex}"))
        deadline = self._deadline(f"uploading adapter {name!r}")
        for filename in ADAPTER_FILES:
            with s3_errors(copy, filename, field="registry"):
                s3_call(lambda f=filename: self._client.upload_file(str(Path(local_dir) / f), copy.bucket, copy.key(f),
                                                                    Config=NO_THREADS), deadline)
        return copy.url()

    def delete_files(self, remote: str) -> None:
        """Delete a registration's copy (best effort: a leftover costs storage, never correctness)."""
        copy = parse_s3_url(remote)
        keys = {"Objects": [{"Key": copy.key(f)} for f in ADAPTER_FILES], "Quiet": True}
        try:
            with s3_errors(copy, None, field="registry"):
                s3_call(lambda: self._client.delete_objects(Bucket=copy.bucket, Delete=keys),
                        self._deadline(f"deleting {remote}"))
        except Exception as exc:  # noqa: BLE001 - logged; the record is already gone
            log.warning("could not delete %s: %s", remote, exc)
