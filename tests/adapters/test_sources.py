"""Adapter sources: a root-confined local dir, HTTP uploads (files / .tar.gz), and a real S3 server."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import save_file

from loraplex.adapters.errors import (
    AdapterBadNameError,
    AdapterForbiddenError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    AdapterValidationError,
)
from loraplex.adapters.sources import LocalDirSource, S3Source, S3UnavailableError, UploadSource, parse_s3_url
from loraplex.adapters.weights import AdapterFiles, AdapterWeights, load_adapter_dir

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="session")
def adapter_files(tmp_path_factory) -> dict[str, bytes]:
    """A small PEFT-looking adapter: config JSON + a real safetensors file (contents unchecked here)."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    g = torch.Generator().manual_seed(0)
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(16, 4, generator=g),
    }
    path = tmp_path_factory.mktemp("weights") / WEIGHTS
    save_file(tensors, str(path))
    return {CONFIG: json.dumps(config).encode(), WEIGHTS: path.read_bytes()}


def _write_adapter(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- local dir under --adapter-root (BAD_INPUTS rows 4, 5, 6) ---------------------------------------------


@pytest.fixture
def tree(tmp_path, adapter_files) -> dict[str, Path]:
    root = tmp_path / "root"
    outside = _write_adapter(tmp_path / "outside", adapter_files)
    _write_adapter(root / "good", adapter_files)
    _write_adapter(root / "team" / "deep", adapter_files)
    (root / "link_out").symlink_to(outside)
    (root / "rel_link_out").symlink_to(Path("..") / "outside")
    (root / "link_in").symlink_to(root / "good")
    (root / "team" / "rel_link_in").symlink_to(Path("..") / "good")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    leaky = _write_adapter(root / "leaky", {CONFIG: adapter_files[CONFIG]})
    (leaky / WEIGHTS).symlink_to(outside / WEIGHTS)
    (tmp_path / "root_alias").symlink_to(root)
    return {"root": root, "outside": outside, "alias": tmp_path / "root_alias"}


@pytest.mark.parametrize(
    ("path", "expected"),
    [("good", "good"), ("team/deep", "team/deep"), ("./team/../good", "good"), ("link_in", "good"),
     ("team/rel_link_in", "good")],
)  # fmt: skip
def test_local_relative_paths_resolve_inside_the_root(tree, path, expected):
    source = LocalDirSource(tree["root"])
    assert source.materialize(path) == (tree["root"] / expected).resolve()
    assert source.describe(path) == f"local:{expected}"


def test_local_absolute_path_inside_the_root_in_either_spelling(tree):
    """Absolute paths may use the configured root's spelling or its real location; another outside
    symlink that happens to lead into the root is still an outside path (it is not followed)."""
    real = (tree["root"] / "good").resolve()
    via_alias = LocalDirSource(tree["alias"])
    assert via_alias.resolve(str(tree["root"] / "good")) == real
    assert via_alias.resolve(str(tree["alias"] / "good")) == real
    direct = LocalDirSource(tree["root"])
    assert direct.resolve(str(tree["root"] / "good")) == real
    with pytest.raises(AdapterForbiddenError):
        direct.resolve(str(tree["alias"] / "good"))


@pytest.mark.parametrize(
    "path",
    ["../../etc", "../outside", "../no_such_dir", "/etc", "good/../../outside", "link_out", "rel_link_out",
     "link_out/../good", "leaky"],
)  # fmt: skip
def test_local_paths_leaving_the_root_are_403(tree, path):
    with pytest.raises(AdapterForbiddenError) as info:
        LocalDirSource(tree["root"]).resolve(path)
    assert info.value.status == 403 and "outside --adapter-root" in str(info.value)
    assert info.value.field == "path"


def test_local_absolute_paths_outside_are_403_whether_or_not_they_exist(tree):
    source = LocalDirSource(tree["root"])
    for path in (tree["outside"], tree["outside"] / "missing", Path("/nonexistent/x")):
        with pytest.raises(AdapterForbiddenError):
            source.resolve(str(path))


def test_local_nothing_outside_the_root_is_touched(tree, monkeypatch):
    """Refusals happen before any stat of an outside path: no existence oracle, no reads."""
    touched: list[str] = []
    real_lstat, real_stat = os.lstat, os.stat

    def spy(real):
        return lambda p, *a, **k: (touched.append(os.fspath(p)), real(p, *a, **k))[1]

    source = LocalDirSource(tree["root"])
    root = str(tree["root"].resolve())
    monkeypatch.setattr(os, "lstat", spy(real_lstat))
    monkeypatch.setattr(os, "stat", spy(real_stat))
    for path in ("link_out", "rel_link_out", "leaky", "../outside", str(tree["outside"])):
        with pytest.raises(AdapterForbiddenError):
            source.resolve(path)
    monkeypatch.undo()
    outside = [p for p in touched if not p.startswith(root)]
    assert touched and not outside, outside


def test_local_missing_path_is_404_and_file_is_400(tree):
    source = LocalDirSource(tree["root"])
    for path in ("nope", "good/nope", "good/adapter_config.json/x"):
        with pytest.raises(AdapterNotFoundError) as info:
            source.resolve(path)
        assert info.value.status == 404 and repr(path) in str(info.value)
    with pytest.raises(AdapterValidationError, match="not a directory"):
        source.resolve("good/adapter_config.json")
    for bad in ("", "  ", "a\x00b"):
        with pytest.raises(AdapterValidationError):
            source.resolve(bad)
    with pytest.raises(AdapterValidationError, match="too many symlinks"):
        source.resolve("loop_a")


def test_local_without_root_refuses_every_path(tree):
    source = LocalDirSource(None)
    with pytest.raises(AdapterForbiddenError, match="no --adapter-root") as info:
        source.resolve(str(tree["root"] / "good"))
    # The 403 says which flag turns it on and that an upload needs none.
    assert "LORAPLEX_ADAPTER_ROOT" in str(info.value) and "PUT /v1/adapters/{name}" in str(info.value)


def test_local_root_must_exist(tmp_path):
    with pytest.raises(ValueError, match="--adapter-root"):
        LocalDirSource(tmp_path / "missing")


# -- loads re-check confinement at open time ---------------------------------------------------------------

SHAPES = {"layers.0.q_proj": (16, 16)}  # the base module `adapter_files` targets


def _load(files: AdapterFiles) -> AdapterWeights:
    return load_adapter_dir(files, SHAPES, max_rank=8)


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """Real paths of the files opened by os.open or io.open (Path.open/read_bytes) while a test runs."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name an open fd's file")
    seen: list[Path] = []
    os_open, io_open = os.open, io.open

    def note(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))

    def spy_os_open(*args, **kwargs):
        fd = os_open(*args, **kwargs)
        note(fd)
        return fd

    def spy_io_open(*args, **kwargs):
        f = io_open(*args, **kwargs)
        note(f.fileno())
        return f

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(io, "open", spy_io_open)
    return seen


def _swap_for_link(victim: Path, copy: Path, relative: bool = False) -> None:
    """Move `victim` (a dir or a file) to `copy`, outside the root, and leave a symlink to it in its place."""
    shutil.move(victim, copy)
    victim.symlink_to(os.path.relpath(copy, victim.parent) if relative else copy)


def _under(paths: list[Path], root: Path) -> list[Path]:
    return [p for p in paths if p.is_relative_to(root.resolve())]


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("swapped", ["dir", "file"])
def test_local_load_refuses_what_was_swapped_for_an_outside_link(tree, tmp_path, opened, swapped, relative):
    """Registered inside the root, then the adapter dir (or one file) is replaced by a link to a valid copy
    outside: the load is refused (403) and no file outside the root is opened."""
    source = LocalDirSource(tree["root"])
    local_dir = source.materialize("good")
    assert _load(source.files(local_dir)).max_rank == 4
    victim = local_dir if swapped == "dir" else local_dir / WEIGHTS
    _swap_for_link(victim, tmp_path / "copy_outside", relative)
    opened.clear()
    with pytest.raises(AdapterForbiddenError, match="outside --adapter-root") as info:
        _load(source.files(local_dir))
    assert info.value.status == 403 and "'good'" in str(info.value)
    assert not _under(opened, tmp_path / "copy_outside") and not _under(opened, tree["outside"]), opened


@pytest.mark.parametrize("swapped", ["dir", "file"])
def test_local_load_refuses_a_link_swapped_in_between_the_check_and_the_open(tree, tmp_path, opened, swapped):
    """The race: the walk sees real files, then the link appears before the open. Opening beneath the root
    with O_NOFOLLOW on every component refuses it instead of following it."""
    source = LocalDirSource(tree["root"])
    local_dir = source.materialize("good")
    victim = local_dir if swapped == "dir" else local_dir / WEIGHTS
    walk = source._walk

    def walk_then_swap(parts, shown):
        real = walk(parts, shown)
        if parts[-1] == WEIGHTS and not victim.is_symlink():  # checked: now swap before the open
            _swap_for_link(victim, tmp_path / "copy_outside")
        return real

    files = source.files(local_dir)
    source._walk = walk_then_swap
    opened.clear()
    with pytest.raises(AdapterForbiddenError, match="outside --adapter-root"):
        _load(files)
    assert victim.is_symlink() and not _under(opened, tmp_path / "copy_outside"), opened


def test_local_load_follows_links_that_stay_inside_the_root(tree, opened):
    """A hub-cache layout (file -> ../blobs/<hash>) is fine: the real file inside the root is opened."""
    root = tree["root"]
    (root / "blobs").mkdir()
    shutil.move(root / "good" / WEIGHTS, root / "blobs" / "0123abcd")
    (root / "good" / WEIGHTS).symlink_to(Path("..") / "blobs" / "0123abcd")
    source = LocalDirSource(root)
    opened.clear()
    assert _load(source.files(source.materialize("good"))).max_rank == 4
    assert (root / "blobs" / "0123abcd").resolve() in opened


def test_local_load_of_a_vanished_or_foreign_dir(tree, tmp_path):
    source = LocalDirSource(tree["root"])
    local_dir = source.materialize("good")
    (local_dir / WEIGHTS).rename(local_dir / "adapter_model.bin")  # named from the confined listing
    with pytest.raises(AdapterValidationError, match="safetensors only: found adapter_model.bin"):
        _load(source.files(local_dir))
    (local_dir / CONFIG).unlink()
    with pytest.raises(AdapterValidationError, match=f"{CONFIG} is missing"):
        _load(source.files(local_dir))
    shutil.rmtree(local_dir)
    with pytest.raises(AdapterNotFoundError, match="'good' does not exist"):
        _load(source.files(local_dir))
    with pytest.raises(AdapterForbiddenError, match="outside --adapter-root"):  # e.g. the root changed
        source.files(tree["outside"])


def test_upload_copy_load_refuses_links_and_special_files(tmp_path, state, adapter_files, opened):
    source = UploadSource(state, max_bytes=1 << 20)
    stored = source.from_files("ad1", adapter_files)
    assert _load(source.files(stored)).max_rank == 4
    _swap_for_link(stored / WEIGHTS, tmp_path / "weights_outside")
    with pytest.raises(AdapterForbiddenError, match="symlink"):
        _load(source.files(stored))
    (stored / WEIGHTS).unlink()
    os.mkfifo(stored / WEIGHTS)  # would block a plain open forever
    with pytest.raises(AdapterValidationError, match="not a regular file"):
        _load(source.files(stored))
    _swap_for_link(stored, tmp_path / "copy_outside")
    with pytest.raises(AdapterForbiddenError, match="symlink"):
        _load(source.files(stored))
    assert not _under(opened, tmp_path / "weights_outside") and not _under(opened, tmp_path / "copy_outside")


# -- upload (BAD_INPUTS rows 15, 16) ------------------------------------------------------------------------


def _tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def _adapter_members(files: dict[str, bytes], folder: str = "") -> list[tuple[tarfile.TarInfo, bytes]]:
    return [_file(folder + name, data) for name, data in files.items()]


@pytest.fixture
def state(tmp_path) -> Path:
    return tmp_path / "state"


def _assert_stored(directory: Path, state: Path, files: dict[str, bytes]) -> None:
    assert directory.parent == state / "uploads" and directory.name.startswith("ad1-")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files


def test_upload_files_as_bytes_or_streams(state, adapter_files):
    source = UploadSource(state, max_bytes=1 << 20)
    _assert_stored(source.from_files("ad1", adapter_files), state, adapter_files)
    streams = {name: io.BytesIO(data) for name, data in adapter_files.items()}
    second = source.materialize(streams, name="ad1")
    _assert_stored(second, state, adapter_files)
    assert source.describe(streams) == "upload"
    assert len(list((state / "uploads").iterdir())) == 2  # no temp dirs left


@pytest.mark.parametrize("folder", ["", "my-adapter/", "./", "./my-adapter/"])
def test_upload_archive_flat_or_under_one_folder(state, adapter_files, folder):
    members = _adapter_members(adapter_files, folder)
    if folder.strip("./"):
        dir_info = tarfile.TarInfo(folder.rstrip("/"))
        dir_info.type = tarfile.DIRTYPE
        members.insert(0, (dir_info, None))
    source = UploadSource(state, max_bytes=1 << 20)
    _assert_stored(source.materialize(io.BytesIO(_tar_gz(members)), name="ad1"), state, adapter_files)


def _bad_archives(files: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    flat = _adapter_members(files)
    config, weights = files[CONFIG], b"x"
    return {
        "dotdot": (_tar_gz([*flat[:1], _file("../adapter_model.safetensors", files[WEIGHTS])]), "'..'"),
        "dotdot_inside": (_tar_gz([*flat[:1], _file("a/../../x/adapter_model.safetensors", b"x")]), "'..'"),
        "absolute": (_tar_gz([*flat[:1], _file("/tmp/adapter_model.safetensors", b"x")]), "absolute"),
        "symlink": (_tar_gz([*flat[:1], _special(WEIGHTS, tarfile.SYMTYPE, "/etc/passwd")]), "link"),
        "hardlink": (_tar_gz([*flat[:1], _special(WEIGHTS, tarfile.LNKTYPE, CONFIG)]), "link"),
        "device": (_tar_gz([*flat, _special("dev", tarfile.CHRTYPE)]), "special"),
        "fifo": (_tar_gz([*flat, _special("fifo", tarfile.FIFOTYPE)]), "special"),
        "extra": (_tar_gz([*flat, _file("README.md", b"hi")]), "unexpected"),
        "missing": (_tar_gz(flat[:1]), "missing adapter_model.safetensors"),
        "twice": (_tar_gz([*flat, flat[0]]), "twice"),
        "two_folders": (_tar_gz([_file("a/" + CONFIG, config), _file("b/" + WEIGHTS, weights)]), "one place"),
        "mixed": (_tar_gz([_file(CONFIG, config), _file("b/" + WEIGHTS, weights)]), "one place"),
        "too_deep": (_tar_gz(_adapter_members(files, "a/b/")), "unexpected"),
        "not_gzip": (b"PK\x03\x04 definitely a zip", "not a valid .tar.gz"),
        "truncated": (_tar_gz(flat)[:200], "not a valid .tar.gz"),
    }


@pytest.mark.parametrize(
    "case",
    ["dotdot", "dotdot_inside", "absolute", "symlink", "hardlink", "device", "fifo", "extra", "missing",
     "twice", "two_folders", "mixed", "too_deep", "not_gzip", "truncated"],
)  # fmt: skip
def test_bad_archives_are_400_and_write_nothing(tmp_path, state, adapter_files, case):
    data, says = _bad_archives(adapter_files)[case]
    source = UploadSource(state, max_bytes=1 << 20)
    before = _snapshot(tmp_path)
    with pytest.raises(AdapterValidationError) as info:
        source.from_archive("ad1", data)
    assert info.value.status == 400 and says in str(info.value)
    assert _snapshot(tmp_path) == before  # nothing left anywhere, not even a temp dir in uploads/


def test_upload_files_missing_or_extra_are_400(state, adapter_files):
    source = UploadSource(state, max_bytes=1 << 20)
    with pytest.raises(AdapterValidationError, match="missing adapter_model.safetensors") as info:
        source.from_files("ad1", {CONFIG: adapter_files[CONFIG]})
    assert info.value.field == WEIGHTS
    with pytest.raises(AdapterValidationError, match="unexpected"):
        source.from_files("ad1", {**adapter_files, "adapter_model.bin": b"pickle"})
    assert not any((state / "uploads").iterdir())


def test_upload_bad_name_is_422_before_writing(tmp_path, state, adapter_files):
    source = UploadSource(state, max_bytes=1 << 20)
    before = _snapshot(tmp_path)
    for call in (source.from_files, source.from_archive):
        with pytest.raises(AdapterBadNameError):
            call("../escape", adapter_files if call == source.from_files else _tar_gz([]))
    assert _snapshot(tmp_path) == before


def test_oversize_uploads_are_413_counting_real_bytes(tmp_path, state, adapter_files):
    limit = len(adapter_files[CONFIG]) + len(adapter_files[WEIGHTS]) - 1
    source = UploadSource(state, max_bytes=limit)
    before = _snapshot(tmp_path)
    with pytest.raises(AdapterTooLargeError) as info:
        source.from_files("ad1", {name: io.BytesIO(data) for name, data in adapter_files.items()})
    assert info.value.status == 413 and str(limit) in str(info.value)
    with pytest.raises(AdapterTooLargeError):
        source.from_archive("ad1", _tar_gz(_adapter_members(adapter_files)))
    # A gzip bomb: 64 MiB of zeros compress to ~64 KiB; refused while decompressing, not after.
    bomb = _tar_gz([_file(CONFIG, adapter_files[CONFIG]), _file(WEIGHTS, bytes(64 << 20))])
    assert len(bomb) < limit * 100
    with pytest.raises(AdapterTooLargeError):
        source.from_archive("ad1", bomb)
    assert _snapshot(tmp_path) == before


def test_oversize_compressed_stream_is_413(state):
    """Raw bytes are capped too: a gzip header whose file-name field never ends yields no output at all
    yet would be read to the end of the body without that cap."""
    source = UploadSource(state, max_bytes=1024)
    endless_name = b"\x1f\x8b\x08\x08" + bytes(6) + b"A" * (4 << 20)
    read_so_far = io.BytesIO(endless_name)
    with pytest.raises(AdapterTooLargeError):
        source.from_archive("ad1", read_so_far)
    assert read_so_far.tell() < (2 << 20)  # stopped near the cap (1 KiB + tar slack), not at 4 MiB


def test_stale_temp_dirs_are_removed_and_discard_is_confined(tmp_path, state, adapter_files):
    stale = state / "uploads" / "ad1.abc123.tmp"
    stale.mkdir(parents=True)
    (stale / CONFIG).write_bytes(b"{}")
    source = UploadSource(state, max_bytes=1 << 20)
    assert not stale.exists()
    stored = source.from_files("ad1", adapter_files)
    keep = _write_adapter(tmp_path / "user_dir", adapter_files)
    source.discard(keep)  # not ours: left alone
    assert keep.is_dir()
    source.discard(stored)
    assert not stored.exists()
    LocalDirSource(tmp_path).discard(keep)  # in-place sources never delete
    assert keep.is_dir()


# -- S3 against a real S3-compatible server ----------------------------------------------------------------


@pytest.fixture(scope="session")
def bucket(s3_endpoint, adapter_files) -> str:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="adapters")
    for prefix in ("team/a1", "flat-root-test"):
        for name, data in adapter_files.items():
            client.put_object(Bucket="adapters", Key=f"{prefix}/{name}", Body=data)
    client.put_object(Bucket="adapters", Key=f"half/{CONFIG}", Body=adapter_files[CONFIG])
    return "adapters"


def test_s3_download_into_state_dir(state, s3_endpoint, bucket, adapter_files):
    source = S3Source(state, endpoint_url=s3_endpoint, max_bytes=1 << 20)
    local = source.materialize(f"s3://{bucket}/team/a1/", name="a1")
    assert local.parent == state / "s3" and local.name.startswith("a1-")
    assert {p.name: p.read_bytes() for p in local.iterdir()} == adapter_files
    assert source.describe(f"s3://{bucket}/team/a1/") == "s3://adapters/team/a1"


def test_s3_endpoint_from_env_and_nameless_label(state, s3_endpoint, bucket, adapter_files, monkeypatch):
    monkeypatch.setenv("LORAPLEX_S3_ENDPOINT", s3_endpoint)
    local = S3Source(state, max_bytes=1 << 20).materialize(f"s3://{bucket}/flat-root-test")
    assert local.name.startswith("s3-") and (local / WEIGHTS).read_bytes() == adapter_files[WEIGHTS]


@pytest.mark.parametrize(
    ("url", "missing_key"),
    [("s3://adapters/team/none", "team/none/adapter_config.json"),
     ("s3://adapters/half", "half/adapter_model.safetensors"),
     ("s3://no-such-bucket/x", "x/adapter_config.json")],
)  # fmt: skip
def test_s3_missing_object_is_404_naming_the_key(tmp_path, state, s3_endpoint, bucket, url, missing_key):
    source = S3Source(state, endpoint_url=s3_endpoint, max_bytes=1 << 20)
    before = _snapshot(tmp_path)
    with pytest.raises(AdapterNotFoundError) as info:
        source.materialize(url, name="a1")
    assert info.value.status == 404 and missing_key in str(info.value)
    assert _snapshot(tmp_path) == before


def test_s3_oversize_is_413_before_download(tmp_path, state, s3_endpoint, bucket):
    source = S3Source(state, endpoint_url=s3_endpoint, max_bytes=100)
    before = _snapshot(tmp_path)
    with pytest.raises(AdapterTooLargeError) as info:
        source.materialize("s3://adapters/team/a1")
    assert info.value.status == 413 and "limit is 100" in str(info.value)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "url",
    ["http://adapters/x", "adapters/x", "s3://", "s3://UPPER/x", "s3://ab", "s3://a_b/x", "s3://ok/\x01"],
)
def test_s3_bad_urls_are_400(state, url):
    with pytest.raises(AdapterValidationError) as info:
        S3Source(state, endpoint_url="http://127.0.0.1:9", max_bytes=100).materialize(url)
    assert info.value.status == 400 and info.value.field == "path"


def test_s3_parse_url_forms():
    assert parse_s3_url("s3://bkt").url() == "s3://bkt"
    assert parse_s3_url("s3://bkt/a/b/").key(CONFIG) == f"a/b/{CONFIG}"
    assert parse_s3_url("s3://bkt/").key(WEIGHTS) == WEIGHTS


def test_s3_unreachable_endpoint_is_a_clear_error(state, s3_endpoint):
    # Port 9 (discard) on localhost is closed: connection refused, reported without a stack trace.
    with pytest.raises(S3UnavailableError) as info:
        S3Source(state, endpoint_url="http://127.0.0.1:9", max_bytes=100).materialize("s3://adapters/x")
    assert info.value.status == 502 and "s3://adapters/x/adapter_config.json" in str(info.value)
