"""The typed client against a live `loraplex serve` (with API and admin keys), sync and async, plus its
error and SSE parsing against canned answers (httpx.MockTransport)."""

from __future__ import annotations

import importlib.util
import io
import shutil
import signal
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraplex.clients import Adapter, AsyncLoraplexClient, Completion, LoraplexClient, LoraplexError

API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"
GEN = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
CHAT = [{"role": "user", "content": "say something"}]


def _start_server():  # -> the live-server helper of tests/server/api/conftest.py (a conftest is not importable)
    path = Path(__file__).resolve().parents[1] / "server" / "api" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_loraplex_live_server", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module.start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, adapter_dir) -> Iterator:
    base = tmp_path_factory.mktemp("client")
    root = base / "adapters"
    for name, seed in (("alpha", 0), ("spare", 1)):
        shutil.copytree(adapter_dir("llama", rank=4, seed=seed), root / name)
    live = _start_server()(tiny_model_dir("llama"), base / "state", root, "--preload", "alpha=alpha",
                           "--served-model-name", "base", "--api-key", API_KEY, "--admin-key", ADMIN_KEY)
    yield live
    live.stop(signal.SIGKILL)


@pytest.fixture
def client(server) -> Iterator[LoraplexClient]:
    with LoraplexClient(server.url, api_key=API_KEY, admin_key=ADMIN_KEY, timeout=60) as c:
        yield c


def test_health_ready_and_models(client):
    assert client.health()["status"] == "ok"
    assert client.ready() is True
    models = {m.id: m.parent for m in client.models()}
    assert models["base"] is None
    assert models["alpha"] == "base"


def test_complete_and_stream_agree(client):
    done = client.complete("alpha", "hello world", **GEN)
    assert isinstance(done, Completion)
    assert done.model == "alpha" and done.finish_reason == "length"
    assert done.usage.completion_tokens == 6 and done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + 6
    deltas = list(client.stream("alpha", "hello world", **GEN))
    assert deltas and all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas) == done.text  # greedy: the same tokens, streamed


def test_chat_and_stream_chat_agree(client):
    done = client.chat("base", CHAT, **GEN)
    assert done.finish_reason == "length" and done.usage.completion_tokens == 6
    assert "".join(client.stream_chat("base", CHAT, **GEN)) == done.text


def test_adapter_lifecycle_by_path(client):
    record = client.register_adapter("spare-by-path", "spare", pinned=True)
    assert isinstance(record, Adapter)
    assert (record.name, record.rank, record.pinned, record.state) == ("spare-by-path", 4, True, "ready")
    assert "spare-by-path" in {a.name for a in client.list_adapters()}
    assert client.get_adapter("spare-by-path").size_bytes == record.size_bytes > 0
    assert client.complete("spare-by-path", "hi", **GEN).usage.completion_tokens == 6
    with pytest.raises(LoraplexError) as taken:
        client.register_adapter("spare-by-path", "spare")
    assert taken.value.status == 409 and "spare-by-path" in taken.value.message
    assert client.delete_adapter("spare-by-path").name == "spare-by-path"
    with pytest.raises(LoraplexError) as gone:
        client.get_adapter("spare-by-path")
    assert gone.value.status == 404


def test_upload_dir_and_archive(client, adapter_dir, tmp_path):
    src = adapter_dir("llama", rank=8, seed=3)
    assert client.upload_adapter("uploaded", src).rank == 8
    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(src / f, arcname=f)
    assert client.upload_adapter("uploaded-tgz", archive, pinned=True).pinned is True
    assert client.complete("uploaded-tgz", "hi", **GEN).text == client.complete("uploaded", "hi", **GEN).text
    for name in ("uploaded", "uploaded-tgz"):
        client.delete_adapter(name)
    (tmp_path / "half").mkdir()
    shutil.copy(src / "adapter_config.json", tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        client.upload_adapter("half", tmp_path / "half")


def test_server_errors_raise_with_status_and_message(server, client):
    with pytest.raises(LoraplexError) as unknown:
        client.complete("no-such-adapter", "hi", max_tokens=2)
    assert unknown.value.status == 404 and "no-such-adapter" in unknown.value.message
    with pytest.raises(LoraplexError) as streamed:
        list(client.stream("no-such-adapter", "hi", max_tokens=2))
    assert streamed.value.status == 404
    with LoraplexClient(server.url, api_key="wrong") as bad:
        with pytest.raises(LoraplexError) as denied:
            bad.complete("alpha", "hi", max_tokens=2)
        assert denied.value.status == 401
        with pytest.raises(LoraplexError) as no_admin:  # no admin key given: admin routes refuse
            bad.list_adapters()
        assert no_admin.value.status == 401
    with pytest.raises(TypeError, match="stream"):
        client.complete("alpha", "hi", stream=True)


async def test_async_client_mirrors_the_sync_one(server, adapter_dir):
    async with AsyncLoraplexClient(server.url, api_key=API_KEY, admin_key=ADMIN_KEY, timeout=60) as c:
        assert await c.ready() is True
        assert (await c.health())["status"] == "ok"
        done = await c.complete("alpha", "hello world", **GEN)
        assert "".join([d async for d in c.stream("alpha", "hello world", **GEN)]) == done.text
        chat = await c.chat("alpha", CHAT, **GEN)
        assert "".join([d async for d in c.stream_chat("alpha", CHAT, **GEN)]) == chat.text
        assert (await c.register_adapter("async-spare", "spare")).name == "async-spare"
        assert "async-spare" in {m.id for m in await c.models()}
        assert (await c.get_adapter("async-spare")).rank == 4
        assert "async-spare" in {a.name for a in await c.list_adapters()}
        await c.delete_adapter("async-spare")
        assert (await c.upload_adapter("async-up", adapter_dir("llama", rank=8, seed=5))).rank == 8
        assert (await c.complete("async-up", "hi", **GEN)).usage.completion_tokens == 6
        assert (await c.delete_adapter("async-up")).name == "async-up"
        with pytest.raises(LoraplexError) as gone:
            await c.complete("async-spare", "hi", max_tokens=2)
        assert gone.value.status == 404


# ---- parsing, against canned answers --------------------------------------------------------------


def _canned(status: int, body: bytes, content_type: str = "application/json") -> LoraplexClient:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body,
                                                                   headers={"content-type": content_type}))
    return LoraplexClient("http://canned", transport=transport)


def test_ready_is_false_on_503_and_other_errors_raise():
    assert _canned(503, b'{"status": "loading"}').ready() is False
    with pytest.raises(LoraplexError) as err:
        _canned(500, b'{"error": {"message": "boom", "type": "server_error", "code": 500}}').ready()
    assert (err.value.status, err.value.message) == (500, "boom")


@pytest.mark.parametrize(("body", "message"), [
    (b'{"error": {"message": "adapter x not found", "type": "not_found_error"}}', "adapter x not found"),
    (b'{"error": "bad input", "error_type": "validation"}', "bad input"),
    (b'{"detail": "Not Found"}', "Not Found"),
    (b"upstream gateway timeout", "upstream gateway timeout"),
])
def test_error_message_is_extracted_from_each_dialect(body, message):
    with pytest.raises(LoraplexError) as err:
        _canned(418, body).models()
    assert (err.value.status, err.value.message) == (418, message)
    assert str(err.value) == f"418: {message}"


def test_stream_error_event_raises_after_partial_output():
    sse = io.BytesIO()
    sse.write(b'data: {"choices": [{"text": "par"}]}\n\n')
    sse.write(b'data: {"error": {"message": "adapter failed to load", "code": 502}}\n\n')
    sse.write(b"data: [DONE]\n\n")
    got: list[str] = []
    with pytest.raises(LoraplexError) as err:
        for delta in _canned(200, sse.getvalue(), "text/event-stream").stream("m", "p"):
            got.append(delta)
    assert got == ["par"]
    assert (err.value.status, err.value.message) == (502, "adapter failed to load")


def test_adapter_names_are_quoted_into_one_path_segment():
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(404, json={"error": {"message": "nope"}})

    client = LoraplexClient("http://canned", admin_key="k", transport=httpx.MockTransport(handler))
    with pytest.raises(LoraplexError):
        client.get_adapter("../v1/models?x=1")
    assert seen == ["/v1/adapters/..%2Fv1%2Fmodels%3Fx%3D1"]
