"""Tar header bombs (issue 20 item 3; BAD_INPUTS.md row 47): tarfile reads a GNU long-name or pax record whole
into memory before yielding its member, and the error quoted the name back. A 583 KB upload cost 20 s, +2.9 GB of
RSS and a 600 MB error body. Now such records are refused by their declared size before they are read."""

from __future__ import annotations

import io
import resource
import tarfile
import time
from pathlib import Path

import pytest

from loraplex.adapters.errors import AdapterValidationError
from loraplex.adapters.sources.upload import MAX_MEMBERS, MAX_TAR_HEADER_BYTES, UploadSource


def tar_gz(members: list[tarfile.TarInfo], fmt: int = tarfile.GNU_FORMAT, data: bytes = b"{}") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **pax: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.pax_headers = kind, 2 if kind == tarfile.REGTYPE else 0, pax
    return info


@pytest.fixture
def source(tmp_path: Path) -> UploadSource:
    return UploadSource(tmp_path, 1 << 30)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu-longname", "pax-path"])
def test_a_huge_name_record_is_refused_before_it_is_read(source, fmt):
    archive = tar_gz([member("a" * (64 * 2**20) + "/adapter_config.json")], fmt)
    before, t0 = peak_rss_mib(), time.perf_counter()
    with pytest.raises(AdapterValidationError) as err:
        source.from_archive("bomb", archive)
    assert time.perf_counter() - t0 < 2 and peak_rss_mib() - before < 32
    assert "header record" in err.value.message and str(MAX_TAR_HEADER_BYTES) in err.value.message
    assert len(err.value.message) < 300


def test_a_chain_of_extended_headers_is_refused(source):
    # Each pax record is small, but records keep coming before any member: one long chain, no member.
    raw = io.BytesIO()
    for _ in range(50):
        info = tarfile.TarInfo("x")
        raw.write(info._create_pax_generic_header({"comment": "c" * 100}, tarfile.XHDTYPE, "utf-8"))
    raw.write(tarfile.TarInfo("adapter_config.json").tobuf(tarfile.USTAR_FORMAT))
    import gzip

    with pytest.raises(AdapterValidationError, match="in a row"):
        source.from_archive("chain", gzip.compress(raw.getvalue()))


def test_many_members_are_refused_after_the_limit(source):
    archive = tar_gz([member(f"d{i}/", tarfile.DIRTYPE) for i in range(MAX_MEMBERS + 5)])
    with pytest.raises(AdapterValidationError, match=f"more than {MAX_MEMBERS} members"):
        source.from_archive("many", archive)


def test_sparse_members_are_refused(source):
    with pytest.raises(AdapterValidationError, match="sparse"):
        source.from_archive("sparse", tar_gz([member("adapter_config.json", tarfile.GNUTYPE_SPARSE)]))


def test_member_names_in_errors_are_cut(source):
    archive = tar_gz([member("b" * 3000 + ".txt")], tarfile.PAX_FORMAT)  # a pax record under the limit
    with pytest.raises(AdapterValidationError) as err:
        source.from_archive("long", archive)
    assert "unexpected archive member" in err.value.message and len(err.value.message) < 300
