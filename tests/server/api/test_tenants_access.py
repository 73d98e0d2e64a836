"""Issue 25's access matrix: 3 tenants x every route that names an adapter x (its own adapter, another tenant's, a
shared one, an unknown one): no cross-tenant use, listing or existence leak. An adapter a tenant may not use is
answered exactly as one that does not exist: the two 404s are byte-identical apart from the name (the names below
have the same length, so even Content-Length matches). Admin actions outside a tenant's admin globs are 403,
decided by the name alone (the same 403 whether the name exists or not).

One in-process server (tests/server/api/tenants_app.py) for the module; every row is one request.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from .tenants_app import METRICS_KEY, OPERATOR_KEY, auth, key_of, tenant_server, tenant_toml

TENANTS = ("acme", "bolt", "cove")  # names of one length: their adapters' names are of one length too
SHARED = "pool/one"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def other(tenant: str) -> str:
    return TENANTS[(TENANTS.index(tenant) + 1) % len(TENANTS)]


def names(tenant: str) -> dict[str, str]:
    """The four kinds of adapter name, as `tenant` sees them; "other" and "unknown" have the same length."""
    return {"own": f"{tenant}/one", "other": f"{other(tenant)}/one", "shared": SHARED,
            "unknown": f"{other(tenant)}/two"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, adapter_dir):
    toml = "".join(tenant_toml(t, [f"{t}/*", "pool/*", "base"], [f"{t}/*"]) for t in TENANTS)
    toml += tenant_toml("nobase", ["pool/*"], [])  # may use the shared adapters only, not even the base model
    preload = {f"{t}/one": i for i, t in enumerate(TENANTS)} | {SHARED: 3}
    with tenant_server(tmp_path_factory.mktemp("tenants"), tiny_model_dir("llama"),
                       lambda seed: adapter_dir("llama", rank=4, seed=seed), toml, preload) as (client, runtime):
        yield client, runtime


@pytest.fixture(scope="module")
def client(served):
    return served[0]


def _files(adapter: Path) -> dict[str, bytes]:
    return {n: (adapter / n).read_bytes() for n in (CONFIG, WEIGHTS)}


GEN = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
PARTNER = {"own": SHARED, "other": SHARED, "shared": "{own}", "unknown": SHARED}  # the merge's other adapter

# route -> (method, path, body) with "{x}" the adapter under test and "{y}" a second adapter the tenant may use.
USE_ROUTES = {
    "completions": ("POST", "/v1/completions", {"model": "{x}", "prompt": "hi", **GEN}),
    "completions n=2": ("POST", "/v1/completions", {"model": "{x}", "prompt": "hi", "n": 2, **GEN}),
    "completions stream": ("POST", "/v1/completions", {"model": "{x}", "prompt": "hi", "stream": True, **GEN}),
    "chat": ("POST", "/v1/chat/completions", {"model": "{x}", "messages": [{"role": "user", "content": "hi"}],
                                              **GEN}),
    "completions merge": ("POST", "/v1/completions", {"model": "base", "prompt": "hi", **GEN,
                                                      "adapters": [{"name": "{y}", "weight": 0.5},
                                                                   {"name": "{x}", "weight": 0.5}]}),
    "chat merge ties": ("POST", "/v1/chat/completions", {
        "model": "base", "messages": [{"role": "user", "content": "hi"}], **GEN, "merge_strategy": "ties",
        "density": 0.5, "adapters": [{"name": "{x}", "weight": 1.0}, {"name": "{y}", "weight": 1.0}]}),
    "tgi generate": ("POST", "/generate", {"inputs": "hi", "parameters": {"adapter_id": "{x}", "max_new_tokens": 2}}),
    "tgi stream": ("POST", "/generate_stream", {"inputs": "hi", "parameters": {"adapter_id": "{x}",
                                                                                "max_new_tokens": 2}}),
    "tgi compat": ("POST", "/", {"inputs": "hi", "parameters": {"adapter_id": "{x}", "max_new_tokens": 2}}),
    "tgi best_of=2": ("POST", "/generate", {"inputs": "hi", "parameters": {
        "adapter_id": "{x}", "max_new_tokens": 2, "best_of": 2, "do_sample": True, "seed": 1}}),
    "tgi merged_adapters": ("POST", "/generate", {"inputs": "hi", "parameters": {
        "max_new_tokens": 2, "merged_adapters": {"ids": ["{y}", "{x}"], "weights": [0.5, 0.5]}}}),
    "tokenize": ("POST", "/tokenize", {"model": "{x}", "prompt": "hi"}),
    "detokenize": ("POST", "/detokenize", {"model": "{x}", "tokens": [5, 6]}),
    "model card": ("GET", "/v1/models/{x}", None),
    "adapter record": ("GET", "/v1/adapters/{x}", None),
}


def _fill(value: object, x: str, y: str) -> object:
    if isinstance(value, str):
        return value.replace("{x}", x).replace("{y}", y)
    if isinstance(value, list):
        return [_fill(v, x, y) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, x, y) for k, v in value.items()}
    return value


def call(client, tenant: str, route: str, kind: str):
    method, path, body = USE_ROUTES[route]
    x = names(tenant)[kind]
    y = PARTNER[kind].format(own=names(tenant)["own"])
    return client.request(method, _fill(path, x, y), json=_fill(body, x, y), headers=auth(key_of(tenant)))


@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize("route", list(USE_ROUTES))
def test_every_route_serves_own_and_shared_adapters_and_hides_the_others_byte_for_byte(client, tenant, route):
    for kind in ("own", "shared"):
        resp = call(client, tenant, route, kind)
        assert resp.status_code == 200, (kind, resp.text)
        assert b'"error":{' not in resp.content and b'"error_type"' not in resp.content, (kind, resp.text)  # in-band
    hidden, missing = (call(client, tenant, route, kind) for kind in ("other", "unknown"))
    assert hidden.status_code == missing.status_code == 404, (hidden.text, missing.text)
    other_name, unknown_name = names(tenant)["other"], names(tenant)["unknown"]
    assert other_name.encode() in hidden.content  # the 404 names what was asked for
    assert hidden.content.replace(other_name.encode(), unknown_name.encode()) == missing.content
    headers = {k: v for k, v in hidden.headers.items() if k != "date"}
    assert headers == {k: v for k, v in missing.headers.items() if k != "date"}


@pytest.mark.parametrize("tenant", TENANTS)
def test_listings_show_only_what_the_tenant_may_use(client, tenant):
    own = names(tenant)["own"]
    models = client.get("/v1/models", headers=auth(key_of(tenant))).json()["data"]
    assert sorted(m["id"] for m in models) == sorted(["base", own, SHARED])
    records = client.get("/v1/adapters", headers=auth(key_of(tenant))).json()["data"]
    assert sorted(r["name"] for r in records) == sorted([own, SHARED])
    everything = client.get("/v1/adapters", headers=auth(OPERATOR_KEY)).json()["data"]
    assert {f"{t}/one" for t in TENANTS} | {SHARED} <= {r["name"] for r in everything}


def test_a_tenant_without_base_can_use_neither_the_base_model_nor_see_it(client):
    key = auth(key_of("nobase"))
    assert [m["id"] for m in client.get("/v1/models", headers=key).json()["data"]] == [SHARED]
    body = {"prompt": "hi", **GEN}
    base = client.post("/v1/completions", json={"model": "base", **body}, headers=key)
    nope = client.post("/v1/completions", json={"model": "nope", **body}, headers=key)
    assert base.status_code == nope.status_code == 404
    assert base.content.replace(b"'base'", b"'nope'", 1) == nope.content
    assert client.post("/v1/completions", json={"model": SHARED, **body}, headers=key).status_code == 200
    assert client.post("/tokenize", json={"prompt": "hi"}, headers=key).status_code == 200  # the shared tokenizer
    tgi = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, headers=key)
    assert tgi.status_code == 404, tgi.text  # TGI's empty adapter_id is the base model


# ---- admin actions: register (path, upload, vLLM's alias), delete (and vLLM's alias) ------------------------
def _register(client, tenant: str, name: str, how: str, adapter: Path):
    key = auth(key_of(tenant))
    if how == "path":
        return client.post("/v1/adapters", json={"name": name, "path": "spare-0"}, headers=key)
    if how == "load_lora_adapter":
        return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "spare-1"}, headers=key)
    if how == "upload":
        return client.put(f"/v1/adapters/{name}", files={k: (k, v) for k, v in _files(adapter).items()}, headers=key)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n, data in _files(adapter).items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return client.put(f"/v1/adapters/{name}", files={"archive": ("a.tar.gz", buf.getvalue())}, headers=key)


def _delete(client, tenant: str, name: str, how: str):
    key = auth(key_of(tenant))
    if how == "unload_lora_adapter":
        return client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=key)
    return client.delete(f"/v1/adapters/{name}", headers=key)


@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize("how", ["path", "load_lora_adapter", "upload", "archive"])
def test_registration_only_under_the_admin_globs_and_the_403_does_not_tell_whether_a_name_exists(
        client, adapter_dir, tenant, how):
    adapter = adapter_dir("llama", rank=4, seed=5)
    mine = f"{tenant}/{how[:4]}"
    made = _register(client, tenant, mine, how, adapter)
    assert made.status_code in (200, 201), made.text
    assert mine in {r["name"] for r in client.get("/v1/adapters", headers=auth(key_of(tenant))).json()["data"]}
    assert mine not in {r["name"] for r in client.get("/v1/adapters", headers=auth(key_of(other(tenant)))).json()[
        "data"]}
    assert _register(client, tenant, mine, how, adapter).status_code == 409  # its own namespace: it may know
    for name in (names(tenant)["other"], names(tenant)["unknown"], SHARED, "pool/new", "loose"):
        refused = _register(client, tenant, name, how, adapter)
        assert refused.status_code == 403, (name, refused.text)
        assert "may not register" in refused.text and name in refused.text
    taken, free = (_register(client, tenant, n, how, adapter) for n in (names(tenant)["other"],
                                                                        names(tenant)["unknown"]))
    assert taken.content.replace(names(tenant)["other"].encode(), names(tenant)["unknown"].encode()) == free.content
    assert _delete(client, tenant, mine, "delete").status_code == 200


@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize("how", ["delete", "unload_lora_adapter"])
def test_deletion_only_under_the_admin_globs(client, runtime_of_module, tenant, how):
    for kind in ("other", "unknown", "shared"):
        name = names(tenant)[kind]
        refused = _delete(client, tenant, name, how)
        assert refused.status_code == 403, (kind, refused.text)
    taken, free = (_delete(client, tenant, names(tenant)[k], how) for k in ("other", "unknown"))
    assert taken.content.replace(names(tenant)["other"].encode(), names(tenant)["unknown"].encode()) == free.content
    assert _delete(client, tenant, f"{tenant}/gone", how).status_code == 404  # its own namespace: it may know
    assert all(f"{t}/one" in runtime_of_module.store for t in TENANTS) and SHARED in runtime_of_module.store


@pytest.fixture(scope="module")
def runtime_of_module(served):
    return served[1]


def test_pinning_is_for_the_operator_only(client, adapter_dir):
    refused = client.post("/v1/adapters", json={"name": "acme/pin", "path": "spare-2", "pinned": True},
                          headers=auth(key_of("acme")))
    assert refused.status_code == 403 and "pin" in refused.text
    files = {k: (k, v) for k, v in _files(adapter_dir("llama", rank=4, seed=5)).items()}
    upload = client.put("/v1/adapters/acme/pin", files=files, data={"pinned": "true"}, headers=auth(key_of("acme")))
    assert upload.status_code == 403 and "pin" in upload.text
    made = client.post("/v1/adapters", json={"name": "acme/pin", "path": "spare-2", "pinned": True},
                       headers=auth(OPERATOR_KEY))
    assert made.status_code == 201, made.text
    assert client.delete("/v1/adapters/acme/pin", headers=auth(key_of("acme"))).status_code == 200


# ---- keys ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/models", "/v1/adapters", "/v1/usage"])
def test_unknown_or_missing_keys_are_401_on_every_route(client, path):
    for headers in ({}, auth("not-a-key"), {"x-api-key": "not-a-key"}):
        resp = client.get(path, headers=headers)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", resp.text
    body = client.post("/v1/completions", content=b"{not json", headers=auth("not-a-key"))
    assert body.status_code == 401  # the key before the body


def test_metrics_take_their_own_key(client):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth(key_of("acme"))).status_code == 401
    assert client.get("/metrics", headers=auth(METRICS_KEY)).status_code == 200
    assert client.get("/metrics", headers=auth(OPERATOR_KEY)).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
