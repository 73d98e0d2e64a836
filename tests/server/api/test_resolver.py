"""Resolution on first use (`--adapter-resolver`) against real servers: one folder inside --adapter-root and one
s3:// prefix (moto). 100 concurrent first requests for one unknown name make one registration and all get PEFT's
answer; a miss is remembered; names the pattern refuses and `..` are 404 without a resolution attempt; a symlink
out of the root is refused."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import httpx
import pytest

from ..engine_helpers import PeftReference

if TYPE_CHECKING:
    from .conftest import LiveServer

PROMPT = [5, 17, 42, 99, 7]
N_TOKENS = 4
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def weights(adapter_dir) -> dict[str, Path]:
    return {"fresh": adapter_dir("llama", 4, ("q_proj", "v_proj"), 801),
            "from-s3": adapter_dir("llama", 4, ("q_proj", "v_proj"), 802)}


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, weights, tokenizer) -> dict[str, str]:
    ref = PeftReference(tiny_model_dir("llama"), weights)
    return {name: tokenizer.decode(ref.generate(PROMPT, name, N_TOKENS), skip_special_tokens=True)
            for name in weights}


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory, weights) -> LiveServer:
    root = tmp_path_factory.mktemp("resolver-root")
    shutil.copytree(weights["fresh"], root / "models" / "fresh")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(weights["fresh"], outside / "evil")
    (root / "models" / "evil").symlink_to(outside / "evil")
    return server_factory("--adapter-resolver", str(root / "models"), "--adapter-resolver-negative-ttl", "600",
                          adapter_root=root)


def generate(server: LiveServer, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True})


def resolutions(server: LiveServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {r: float(v) for r, v in re.findall(r'^loraplex_adapter_resolutions_total\{result="(\w+)"\} (\S+)$',
                                                 text, re.M)}


def test_100_concurrent_first_requests_for_one_name_make_one_resolution_and_all_get_an_answer(server, oracle):
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            body = {"model": "fresh", "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(100)))

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 100, {r.status_code: r.text for r in answers}
    assert {r.json()["choices"][0]["text"] for r in answers} == {oracle["fresh"]}
    assert resolutions(server)["registered"] == 1
    assert server.log().count("resolved on first use") == 1
    rec = httpx.get(f"{server.url}/v1/adapters/fresh", timeout=30).json()
    assert rec["source"] == "local:models/fresh" and len({r.headers["x-loraplex-adapter-version"]
                                                          for r in answers}) == 1


def test_a_miss_is_a_404_remembered_for_the_negative_ttl(server):
    before = resolutions(server)
    first = generate(server, "missing-one")
    assert first.status_code == 404 and "the resolver has no 'models/missing-one'" in first.text, first.text
    second = generate(server, "missing-one")
    assert second.status_code == 404 and second.json() == first.json()
    after = resolutions(server)
    assert after["miss"] == before["miss"] + 1 and after["cached_miss"] == before["cached_miss"] + 1


@pytest.mark.parametrize("name", ["..", ".", "a" * 65, "bad name", "x/../../etc", "%2e%2e"])
def test_names_the_pattern_refuses_are_404_without_a_resolution(server, name):
    before = resolutions(server)
    resp = generate(server, name)
    assert resp.status_code == 404 and "not found" in resp.text, resp.text
    after = resolutions(server)
    assert after["refused"] == before["refused"] + 1
    assert (after["miss"], after["registered"]) == (before["miss"], before["registered"])  # nothing was tried


def test_a_symlink_out_of_the_root_is_refused(server):
    resp = generate(server, "evil")
    assert resp.status_code == 403 and "outside --adapter-root" in resp.text, resp.text
    assert httpx.get(f"{server.url}/v1/adapters/evil", timeout=30).status_code == 404


def test_an_s3_prefix_resolves_through_the_s3_source(server_factory, s3_endpoint, weights, oracle):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="resolver")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        client.upload_file(str(weights["from-s3"] / f), "resolver", f"team/loras/from-s3/{f}")
    srv = server_factory("--adapter-resolver", "s3://resolver/team/loras", "--s3-endpoint", s3_endpoint)
    resp = generate(srv, "from-s3")
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == oracle["from-s3"], resp.text
    assert httpx.get(f"{srv.url}/v1/adapters/from-s3", timeout=30).json()["source"] == \
        "s3://resolver/team/loras/from-s3"
    assert generate(srv, "not-there").status_code == 404
