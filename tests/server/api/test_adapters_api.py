"""Adapter admin API over HTTP against a real server: every Registration row of BAD_INPUTS.md (1-19),
uploads (files / archive), listing, records, unregistering, the vLLM aliases, and 503 before ready.

One server (with --admin-key, so row 17 is covered by the same process) is shared by the module; every
test registers adapters under its own names so the tests do not depend on each other's order.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from loraplex.server.api.app import create_app
from loraplex.server.config import ModelConfig, ServerConfig
from loraplex.server.engine.engine import EngineConfig
from loraplex.server.runtime import Runtime, RuntimeConfig

ADMIN_KEY = "admin-secret"
MAX_UPLOAD = 100_000  # a rank-8 attention adapter of the tiny model is ~29 KB
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


# ---------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--admin-key", ADMIN_KEY, "--max-loras", "2", "--max-cpu-loras", "4",
                          "--max-upload-bytes", str(MAX_UPLOAD))


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def good(adapter_dir) -> Path:
    return adapter_dir("llama", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 0)


@pytest.fixture
def place(server, good) -> Callable[..., Path]:
    """`place(rel, src=good)`: copy an adapter dir under the server's adapter root at `rel`."""

    def copy(rel: str, src: Path | None = None) -> Path:
        dest = server.adapter_root / rel
        shutil.copytree(src or good, dest)
        return dest

    return copy


def expect_error(resp: httpx.Response, status: int, *words: str) -> str:
    """The OpenAI-style error body with `status`, whose message names every one of `words`."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == status, body
    message = body["error"]["message"]
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert "Traceback" not in resp.text
    return message


def edit_config(adapter: Path, **changes: object) -> None:
    path = adapter / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def adapter_files(adapter: Path) -> dict[str, bytes]:
    return {name: (adapter / name).read_bytes() for name in (CONFIG, WEIGHTS)}


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def put_files(client: httpx.Client, name: str, files: dict[str, bytes], **form: str) -> httpx.Response:
    return client.put(f"/v1/adapters/{name}", files={k: (k, v) for k, v in files.items()}, data=form)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------------------
# happy paths: register, read, unregister
# ---------------------------------------------------------------------------------------------------------


def test_register_by_path_returns_the_record_and_get_and_list_show_it(client, place, good):
    place("rec-a")
    resp = client.post("/v1/adapters", json={"name": "rec-a", "path": "rec-a"})
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert record["name"] == "rec-a" and record["source"] == "local:rec-a"
    assert (record["rank"], record["alpha"], record["pinned"], record["state"]) == (8, 16, False, "ready")
    assert sorted(record["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert record["size_bytes"] > 0 and record["tier"] in ("host", "device") and record["error"] is None
    assert isinstance(record["load_stats"], dict)
    got = client.get("/v1/adapters/rec-a")
    assert got.status_code == 200 and got.json()["name"] == "rec-a"
    listing = client.get("/v1/adapters").json()
    assert listing["object"] == "list" and "rec-a" in [r["name"] for r in listing["data"]]


def test_absolute_path_inside_the_root_is_accepted(client, place):
    adapter = place("nested/abs-a")
    resp = client.post("/v1/adapters", json={"name": "abs-a", "path": str(adapter)})
    assert resp.status_code == 201, resp.text
    assert resp.json()["source"] == "local:nested/abs-a"


def test_delete_returns_the_removed_record_then_it_is_gone(client, place):
    place("del-a")
    assert client.post("/v1/adapters", json={"name": "del-a", "path": "del-a"}).status_code == 201
    resp = client.delete("/v1/adapters/del-a")
    assert resp.status_code == 200 and resp.json()["name"] == "del-a"
    expect_error(client.get("/v1/adapters/del-a"), 404, "del-a")
    assert "del-a" not in [r["name"] for r in client.get("/v1/adapters").json()["data"]]
    # the name is free again, and the files under the root were never touched
    assert client.post("/v1/adapters", json={"name": "del-a", "path": "del-a"}).status_code == 201


def test_upload_two_files_and_archive_give_the_same_adapter(client, good):
    files = adapter_files(good)
    resp = put_files(client, "up-files", files)
    assert resp.status_code == 201, resp.text
    assert resp.json()["source"] == "upload"
    archive = tar_gz([tar_member(f"top/{k}", v) for k, v in files.items()])
    resp2 = client.put("/v1/adapters/up-tar", files={"archive": ("a.tar.gz", archive)})
    assert resp2.status_code == 201, resp2.text
    for key in ("rank", "alpha", "target_modules", "size_bytes", "state"):
        assert resp.json()[key] == resp2.json()[key]


def test_uploads_live_in_the_state_dir_and_delete_removes_them(server, client, good):
    before = tree(server.state_dir / "uploads")
    assert put_files(client, "up-del", adapter_files(good)).status_code == 201
    added = tree(server.state_dir / "uploads") - before
    assert any(p.startswith("up-del-") for p in added), added
    assert client.delete("/v1/adapters/up-del").status_code == 200
    assert tree(server.state_dir / "uploads") == before


def test_pinned_by_json_and_by_form_and_pin_budget(client, place, good):
    place("pin-a")
    resp = client.post("/v1/adapters", json={"name": "pin-a", "path": "pin-a", "pinned": True})
    assert resp.status_code == 201 and resp.json()["pinned"] is True
    # --max-loras 2: one slot must stay free for unpinned adapters
    expect_error(put_files(client, "pin-b", adapter_files(good), pinned="true"), 409, "pin", "--max-loras 2")
    expect_error(put_files(client, "pin-c", adapter_files(good), pinned="maybe"), 422, "pinned")
    assert client.delete("/v1/adapters/pin-a").status_code == 200
    resp = put_files(client, "pin-b", adapter_files(good), pinned="true")
    assert resp.status_code == 201 and resp.json()["pinned"] is True
    assert client.delete("/v1/adapters/pin-b").status_code == 200


def test_vllm_aliases_load_and_unload(client, place):
    place("vllm-a")
    resp = client.post("/v1/load_lora_adapter", json={"lora_name": "vllm-a", "lora_path": "vllm-a"})
    # vLLM answers plain text, not a JSON record.
    assert resp.status_code == 200 and resp.text == "Success: LoRA adapter 'vllm-a' added successfully."
    assert client.get("/v1/adapters/vllm-a").status_code == 200
    expect_error(client.post("/v1/load_lora_adapter", json={"lora_name": "vllm-a", "lora_path": "vllm-a"}), 409)
    resp = client.post("/v1/unload_lora_adapter", json={"lora_name": "vllm-a", "lora_int_id": 3})
    assert resp.status_code == 200 and resp.text == "Success: LoRA adapter 'vllm-a' removed successfully."
    expect_error(client.get("/v1/adapters/vllm-a"), 404)
    expect_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 422, "lora_path")
    expect_error(client.post("/v1/unload_lora_adapter", json={}), 422, "lora_name")


def test_the_base_model_name_cannot_be_taken(server, client, place):
    base = httpx.get(server.url + "/ready").json()["model"]
    place(f"base-{base}")
    expect_error(client.post("/v1/adapters", json={"name": base, "path": f"base-{base}"}), 409, base)


# ---------------------------------------------------------------------------------------------------------
# BAD_INPUTS.md Registration rows 1-19
# ---------------------------------------------------------------------------------------------------------


def test_an_unknown_field_is_a_400_naming_it(client):
    # Refused like the generation routes' unknown fields: a misspelt `pinned` must not register it unpinned.
    expect_error(client.post("/v1/adapters", json={"name": "x", "path": "x", "pined": True}), 400, "pined",
                 "unknown field")


@pytest.mark.parametrize(("body", "field"), [
    ({"path": "x"}, "name"), ({"name": "x"}, "path"), ({}, "name"),
    ({"name": 5, "path": "x"}, "name"), ({"name": "x", "path": "x", "pinned": "yes"}, "pinned"),
])
def test_row1_missing_or_wrong_fields_are_422_naming_the_field(client, body, field):
    message = expect_error(client.post("/v1/adapters", json=body), 422, field)
    assert client.post("/v1/adapters", json=body).json()["error"]["param"].startswith(field), message


def test_row1_non_json_body_is_422(client):
    resp = client.post("/v1/adapters", content=b"{not json", headers={"content-type": "application/json"})
    expect_error(resp, 422)


def test_row2_name_already_registered_is_409_for_path_and_upload(client, place, good):
    place("dup-a")
    assert client.post("/v1/adapters", json={"name": "dup-a", "path": "dup-a"}).status_code == 201
    expect_error(client.post("/v1/adapters", json={"name": "dup-a", "path": "dup-a"}), 409, "dup-a")
    expect_error(put_files(client, "dup-a", adapter_files(good)), 409, "dup-a", "already registered")


@pytest.mark.parametrize("name", ["a/b", "..", ".", "has space", "x" * 129, "", "ünï", "a\nb"])
def test_row3_bad_names_are_422(client, place, name):
    expect_error(client.post("/v1/adapters", json={"name": name, "path": "whatever"}), 422, "name")


def test_row3_bad_name_in_the_upload_url_is_422_before_reading_the_body(client, good):
    expect_error(put_files(client, "has space", adapter_files(good)), 422, "has space")
    expect_error(put_files(client, "x" * 129, adapter_files(good)), 422, "too long")


def test_row4_missing_path_is_404(client):
    expect_error(client.post("/v1/adapters", json={"name": "nope", "path": "does/not/exist"}), 404, "does/not/exist")


@pytest.mark.parametrize("path", ["../../etc", "../outside", "/etc", "/", "./../etc/passwd"])
def test_row5_paths_outside_the_root_are_403(client, path):
    expect_error(client.post("/v1/adapters", json={"name": "outside", "path": path}), 403, "outside")


def test_row5_a_real_adapter_outside_the_root_is_403(client, good):
    expect_error(client.post("/v1/adapters", json={"name": "outside2", "path": str(good)}), 403)


def test_row6_symlinks_leaving_the_root_are_403(server, client, good, place):
    (server.adapter_root / "link-out").symlink_to(good, target_is_directory=True)
    expect_error(client.post("/v1/adapters", json={"name": "link-out", "path": "link-out"}), 403)
    inside = place("file-link-out")
    (inside / WEIGHTS).unlink()
    (inside / WEIGHTS).symlink_to(good / WEIGHTS)
    expect_error(client.post("/v1/adapters", json={"name": "file-link-out", "path": "file-link-out"}), 403)
    # a link that stays inside the root is fine
    place("link-target")
    (server.adapter_root / "link-in").symlink_to(server.adapter_root / "link-target", target_is_directory=True)
    assert client.post("/v1/adapters", json={"name": "link-in", "path": "link-in"}).status_code == 201


def test_row7_config_not_json_or_missing_is_400(client, place):
    bad = place("cfg-bad")
    (bad / CONFIG).write_text("{ this is not json")
    expect_error(client.post("/v1/adapters", json={"name": "cfg-bad", "path": "cfg-bad"}), 400, CONFIG)
    gone = place("cfg-gone")
    (gone / CONFIG).unlink()
    expect_error(client.post("/v1/adapters", json={"name": "cfg-gone", "path": "cfg-gone"}), 400, CONFIG)


@pytest.mark.parametrize(("changes", "field"), [
    ({"peft_type": "IA3"}, "peft_type"), ({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_row8_unsupported_config_is_400_naming_the_field(client, place, changes, field):
    name = f"cfg-{field}"
    edit_config(place(name), **changes)
    expect_error(client.post("/v1/adapters", json={"name": name, "path": name}), 400, field)


def test_row9_rank_over_the_limit_is_400_naming_both_numbers(client, place, adapter_dir):
    place("rank64", adapter_dir("llama", 64, ("q_proj",), 1))
    expect_error(client.post("/v1/adapters", json={"name": "rank64", "path": "rank64"}), 400, "64", "32")


def test_row10_unknown_target_module_is_400_naming_it(client, place):
    edit_config(place("tgt-bad"), target_modules=["q_proj", "wobble_proj"])
    expect_error(client.post("/v1/adapters", json={"name": "tgt-bad", "path": "tgt-bad"}), 400, "wobble_proj")


def test_row11_pickle_only_is_400_and_never_unpickled(client, place, tmp_path):
    adapter = place("pickle-only")
    (adapter / WEIGHTS).unlink()
    marker = tmp_path / "unpickled"
    # A pickle that would create `marker` if anything ever loaded it.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (adapter / "adapter_model.bin").write_bytes(payload)
    expect_error(client.post("/v1/adapters", json={"name": "pickle-only", "path": "pickle-only"}), 400,
                 "safetensors only", "adapter_model.bin")
    assert not marker.exists()


def test_row12_truncated_or_corrupt_safetensors_is_400(client, place):
    cut = place("st-cut")
    data = (cut / WEIGHTS).read_bytes()
    (cut / WEIGHTS).write_bytes(data[: len(data) // 2])
    expect_error(client.post("/v1/adapters", json={"name": "st-cut", "path": "st-cut"}), 400, "truncated")
    junk = place("st-junk")
    (junk / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage")
    expect_error(client.post("/v1/adapters", json={"name": "st-junk", "path": "st-junk"}), 400, WEIGHTS)


def test_row13_shape_mismatch_is_400_naming_the_tensor(client, place):
    adapter = place("shape-bad")
    tensors = load_file(adapter / WEIGHTS)
    r, fan_in = tensors[Q_PROJ_A].shape
    tensors[Q_PROJ_A] = tensors[Q_PROJ_A].new_zeros(r, fan_in + 1)
    save_file(tensors, adapter / WEIGHTS)
    expect_error(client.post("/v1/adapters", json={"name": "shape-bad", "path": "shape-bad"}), 400, Q_PROJ_A)


def test_row14_huge_declared_shape_is_400_before_allocating(client, place):
    adapter = place("huge")
    header = json.dumps({Q_PROJ_A: {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]}}).encode()
    (adapter / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    expect_error(client.post("/v1/adapters", json={"name": "huge", "path": "huge"}), 400, Q_PROJ_A, "1000000000")


def test_row15_upload_over_the_limit_is_413(client, good):
    too_big = {CONFIG: (good / CONFIG).read_bytes(), WEIGHTS: bytes(MAX_UPLOAD + 1)}
    expect_error(put_files(client, "big", too_big), 413, str(MAX_UPLOAD))
    # without a Content-Length (chunked): the streamed bytes are counted
    boundary = "xyzBOUNDARYzyx"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{WEIGHTS}\"; filename=\"w\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(4):
            yield bytes(MAX_UPLOAD // 2)
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = client.put("/v1/adapters/big2", content=chunks(),
                      headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    expect_error(resp, 413)
    expect_error(client.get("/v1/adapters/big2"), 404)


def test_row15_archive_inflating_past_the_limit_is_413(client, good):
    bomb = tar_gz([tar_member(CONFIG, (good / CONFIG).read_bytes()), tar_member(WEIGHTS, bytes(20 * MAX_UPLOAD))])
    assert len(bomb) < MAX_UPLOAD // 10
    expect_error(client.put("/v1/adapters/bomb", files={"archive": ("a.tar.gz", bomb)}), 413)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "hardlink", "extra", "device", "missing"])
def test_row16_bad_archives_are_400_and_write_nothing(server, client, good, case):
    files = adapter_files(good)
    ok = [tar_member(k, v) for k, v in files.items()]
    members = {
        "dotdot": [tar_member(f"../{CONFIG}", files[CONFIG]), ok[1]],
        "absolute": [tar_member(f"/tmp/{CONFIG}", files[CONFIG]), ok[1]],
        "symlink": [ok[0], tar_member(WEIGHTS, kind=tarfile.SYMTYPE, link="/etc/passwd")],
        "hardlink": [ok[0], tar_member(WEIGHTS, kind=tarfile.LNKTYPE, link="/etc/passwd")],
        "extra": [*ok, tar_member("evil.py", b"print('hi')")],
        "device": [*ok, tar_member("dev", kind=tarfile.CHRTYPE)],
        "missing": ok[:1],
    }[case]
    before, parent_before = tree(server.state_dir), tree(server.state_dir.parent)
    resp = client.put(f"/v1/adapters/tar-{case}", files={"archive": ("a.tar.gz", tar_gz(members))})
    expect_error(resp, 400, "archive")
    assert tree(server.state_dir) == before
    assert tree(server.state_dir.parent) - parent_before <= {p for p in tree(server.state_dir.parent)
                                                            if p.startswith("server-")}  # only the log


def test_row16_not_a_gzip_is_400(client):
    expect_error(client.put("/v1/adapters/tar-junk", files={"archive": ("a.tar.gz", b"plain bytes")}), 400,
                 "tar.gz")


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"files": {CONFIG: (CONFIG, b"{}")}}, WEIGHTS),
    ({"files": {"archive": ("a", b"x"), CONFIG: (CONFIG, b"{}")}}, "not both"),
    ({"files": {"weights.bin": ("w", b"x")}}, "weights.bin"),
    ({"data": {WEIGHTS: "not a file"}, "files": {CONFIG: (CONFIG, b"{}")}}, "file part"),
    ({"json": {"archive": "x"}}, "multipart/form-data"),
])
def test_malformed_upload_forms_are_400_naming_the_field(client, kwargs, says):
    expect_error(client.put("/v1/adapters/form-bad", **kwargs), 400, says)


def test_upload_with_bad_contents_is_400_and_leaves_nothing(server, client, good):
    files = adapter_files(good)
    before = tree(server.state_dir / "uploads")
    expect_error(put_files(client, "up-bad", {CONFIG: b"[1, 2]", WEIGHTS: files[WEIGHTS]}), 400, CONFIG)
    expect_error(put_files(client, "up-cut", {CONFIG: files[CONFIG], WEIGHTS: files[WEIGHTS][:100]}), 400)
    assert tree(server.state_dir / "uploads") == before


@pytest.mark.parametrize(("method", "path", "kwargs"), [
    ("POST", "/v1/adapters", {"json": {"name": "k", "path": "k"}}),
    ("PUT", "/v1/adapters/k", {"files": {"archive": ("a", b"x")}}),
    ("GET", "/v1/adapters", {}),
    ("GET", "/v1/adapters/rec-a", {}),
    ("DELETE", "/v1/adapters/rec-a", {}),
    ("POST", "/v1/load_lora_adapter", {"json": {"lora_name": "k", "lora_path": "k"}}),
    ("POST", "/v1/unload_lora_adapter", {"json": {"lora_name": "rec-a"}}),
])
def test_row17_admin_routes_need_the_admin_key(server, method, path, kwargs):
    for headers, says in (({}, "missing admin key"), ({"Authorization": "Bearer wrong"}, "invalid admin key"),
                          ({"x-api-key": "wrong"}, "invalid admin key")):
        resp = httpx.request(method, server.url + path, headers=headers, timeout=30, **kwargs)
        expect_error(resp, 401, says)
        assert resp.headers.get("www-authenticate") == "Bearer"
    ok = httpx.get(server.url + "/v1/adapters", headers={"x-api-key": ADMIN_KEY}, timeout=30)
    assert ok.status_code == 200


def test_row18_unregister_unknown_is_404(client):
    expect_error(client.delete("/v1/adapters/never-was"), 404, "never-was")
    expect_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "never-was"}), 404, "never-was")
    expect_error(client.get("/v1/adapters/never-was"), 404, "never-was")


def _race(calls: list[Callable[[], httpx.Response]]) -> list[int]:
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], httpx.Response]) -> int:
        barrier.wait()
        return call().status_code

    with ThreadPoolExecutor(len(calls)) as pool:
        return sorted(pool.map(run, calls))


def test_row19_concurrent_registrations_of_one_name_give_one_201_and_one_409(server, client, place, good):
    files = adapter_files(good)
    for i in range(4):
        place(f"race-{i}")
        by_path = lambda i=i: client.post("/v1/adapters", json={"name": f"race-{i}", "path": f"race-{i}"})  # noqa: E731
        by_upload = lambda i=i: put_files(client, f"race-{i}", files)  # noqa: E731
        calls = [by_path, by_path] if i % 2 else [by_path, by_upload]
        assert _race(calls) == [201, 409], i
        assert client.get(f"/v1/adapters/race-{i}").json()["state"] == "ready"
    # exactly one upload dir per upload that won, none for the losers
    owners = [r["name"] for r in client.get("/v1/adapters").json()["data"] if r["source"] == "upload"]
    dirs = {p.name.rsplit("-", 1)[0] for p in (server.state_dir / "uploads").iterdir()}
    assert dirs == set(owners)


def test_registry_manifest_matches_the_api(server, client):
    manifest = json.loads((server.state_dir / "registry.json").read_text())
    assert sorted(a["name"] for a in manifest["adapters"]) == sorted(
        r["name"] for r in client.get("/v1/adapters").json()["data"])


# ---------------------------------------------------------------------------------------------------------
# before the model is loaded (in-process app, nothing loaded): 503, but auth still comes first
# ---------------------------------------------------------------------------------------------------------


def test_503_while_the_runtime_is_not_ready(tmp_path):
    from starlette.testclient import TestClient

    config = RuntimeConfig(ModelConfig(), EngineConfig(), ServerConfig(state_dir=tmp_path, admin_key="k"))
    app = create_app(Runtime(config), load_in_background=False)
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as tc:
        expect_error(tc.post("/v1/adapters", json={"name": "a", "path": "a"}, headers=auth), 503, "loading")
        expect_error(tc.get("/v1/adapters", headers=auth), 503, "loading")
        expect_error(tc.delete("/v1/adapters/a", headers=auth), 503)
        expect_error(tc.post("/v1/adapters", json={"name": "a", "path": "a"}), 401)
        assert tc.post("/v1/adapters", json={"name": "a", "path": "a"}, headers=auth).headers["retry-after"]
