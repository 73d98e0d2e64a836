"""Issue 25 items 1, 6 and 7: the tenants file (digests, plain: keys, errors naming the line), reload without a
restart (a revoked key is refused within 2 s; a broken file keeps the old tenants serving and is counted), and the
secure defaults without a tenants file (--api-key alone guards every route; --admin-key alone guards the admin
routes; a warning when the server listens beyond loopback with no key)."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraplex.server.tenants import TenantDirectory, TenantFileError, key_digest, parse_tenants

from .tenants_app import OPERATOR_KEY, auth, key_of, tenant_server, tenant_toml

DIGEST_KEY = "a-key-only-its-digest-is-stored"


# ---- the file ------------------------------------------------------------------------------------------------
def test_keys_are_found_by_digest_or_plain_and_globs_decide_use_and_admin():
    digest = hashlib.sha256(DIGEST_KEY.encode()).hexdigest()
    table = parse_tenants(f'[[tenant]]\nname = "acme"\nkeys = ["{digest}", "plain:dev"]\nadapters = ["acme/*", '
                          '"shared/*", "base"]\nadmin = ["acme/*"]\nweight = 3\n[tenant.limits]\nmax_concurrent = 2\n'
                          '[[tenant]]\nname = "bolt"\nkeys = ["sha256:' + "0" * 64 + '"]\n')
    acme = table.identify(DIGEST_KEY)
    assert acme is not None and acme.name == "acme" and table.identify("dev") is acme
    assert table.identify("not-a-key") is None and table.identify(digest) is None  # the digest is not the key
    assert acme.may_use("acme/x") and acme.may_use("shared/y") and acme.may_use(None) and not acme.may_use("bolt/x")
    assert acme.may_admin("acme/x") and not acme.may_admin("shared/y")
    assert acme.spec().weight == 3 and acme.spec().max_concurrent == 2
    bolt = table.get("bolt")
    assert bolt is not None and not bolt.may_use(None) and not bolt.may_admin("bolt/x")  # nothing unless given


@pytest.mark.parametrize(("text", "line", "words"), [
    ('[[tenant]]\nname = "a"\nkeys = ["nothex"]\n', 3, "neither a sha256"),
    ('[[tenant]]\nname = "a"\n\n[[tenant]]\nname = "a"\n', 5, "defined twice"),
    ('[[tenant]]\nname = "admin"\n', 2, "reserved"),
    ('[[tenant]]\nname = "a"\nweight = 0\n', 3, "'weight'"),
    ('[[tenant]]\nname = "a"\n[tenant.limits]\nrequests_per_minute = -1\n', 4, "requests_per_minute"),
    ('[[tenant]]\nname = "a"\nkeys = ["plain:k"]\n[[tenant]]\nname = "b"\nkeys = ["plain:k"]\n', 6,
     "also a key of tenant 'a'"),
    ('[[tenant]]\nname = "a"\ncolour = 1\n', 3, "unknown field 'colour'"),
    ('[[tenant]]\nname = "a"\nkeys = [\n', 3, "not valid TOML"),
])  # fmt: skip
def test_an_invalid_file_is_refused_naming_its_line_and_the_problem(text, line, words):
    with pytest.raises(TenantFileError) as err:
        parse_tenants(text, "t.toml")
    assert f"t.toml:{line}" in str(err.value) or f"line {line}" in str(err.value), str(err.value)
    assert words in str(err.value)


def test_a_tenant_key_may_not_be_the_operators_and_keys_are_never_quoted():
    with pytest.raises(TenantFileError, match="--admin-key"):
        parse_tenants('[[tenant]]\nname = "a"\nkeys = ["plain:op"]\n', reserved_digests=[key_digest("op")])
    with pytest.raises(TenantFileError) as err:
        parse_tenants('[[tenant]]\nname = "a"\nkeys = ["sk-live-secret"]\n')
    assert "sk-live-secret" not in str(err.value)


def test_the_directory_keeps_the_old_table_when_the_file_breaks_and_counts_each_failure_once(tmp_path, caplog):
    path = tmp_path / "t.toml"
    path.write_text(tenant_toml("a", ["*"], []))
    directory = TenantDirectory(path)
    path.write_text(tenant_toml("a", ["*"], []) + 'name = "oops"\n')  # line 7: a second name
    with caplog.at_level(logging.ERROR, logger="loraplex.server.tenants"):
        assert not directory.reload() and not directory.reload()  # the same broken bytes: counted once
    assert directory.reload_errors == 1 and directory.table.names() == ("a",)
    assert f"{path}:" in caplog.text and "still serving the previous one" in caplog.text
    assert not directory.reload(forced=True) and directory.reload_errors == 2  # SIGHUP: tried, and counted, again
    path.write_text(tenant_toml("b", ["*"], []))
    assert directory.reload() and directory.table.names() == ("b",) and directory.last_error is None


# ---- reload in a running server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, adapter_dir):
    toml = tenant_toml("keep", ["*", "base"], []) + tenant_toml("gone", ["*", "base"], [])
    with tenant_server(tmp_path_factory.mktemp("reload"), tiny_model_dir("llama"),
                       lambda seed: adapter_dir("llama", rank=4, seed=seed), toml, {}) as served:
        yield served


def _models(client, tenant: str) -> int:
    return client.get("/v1/models", headers=auth(key_of(tenant))).status_code


def _within(seconds: float, condition) -> float:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < seconds, f"not within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_revoked_key_is_refused_within_2_s_and_a_broken_file_keeps_serving(served):
    client, runtime = served
    path: Path = runtime.config.server.tenants
    assert _models(client, "keep") == _models(client, "gone") == 200
    path.write_text(tenant_toml("keep", ["*", "base"], []))  # "gone" revoked; the watcher polls the file
    took = _within(2.0, lambda: _models(client, "gone") == 401)
    assert _models(client, "keep") == 200 and took < 2.0
    errors = runtime.tenants.reload_errors
    path.write_text("[[tenant]\nname = broken\n")  # not TOML
    _within(2.0, lambda: runtime.tenants.reload_errors == errors + 1)
    assert _models(client, "keep") == 200 and _models(client, "gone") == 401  # the last good table serves
    metrics = client.get("/metrics", headers=auth(OPERATOR_KEY)).text
    assert f"loraplex_tenants_reload_errors_total {float(errors + 1)}" in metrics
    path.write_text(tenant_toml("keep", ["*", "base"], []) + tenant_toml("gone", ["*", "base"], []))
    _within(2.0, lambda: _models(client, "gone") == 200)


def test_sighup_reloads_even_when_the_file_looks_unchanged(served):
    """SIGHUP calls request_reload (cli.main installs it): the watcher re-reads at once, forced."""
    _, runtime = served
    before = runtime.tenants.table
    runtime.tenants.request_reload()
    _within(2.0, lambda: runtime.tenants.table is not before)


# ---- without a tenants file ----------------------------------------------------------------------------------
def _app(*flags: str) -> TestClient:
    from loraplex.server.api.app import create_app
    from loraplex.server.cli import build_parser, configs_from_args
    from loraplex.server.runtime import Runtime

    args = build_parser().parse_args(["serve", "--model", "no-model-needed", *flags])
    return TestClient(create_app(Runtime(configs_from_args(args)), load_in_background=False))


ROUTES = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/generate"), ("POST", "/tokenize"),
          ("GET", "/v1/adapters"), ("DELETE", "/v1/adapters/x"), ("POST", "/v1/load_lora_adapter"),
          ("GET", "/v1/usage")]
ADMIN = {"/v1/adapters", "/v1/adapters/x", "/v1/load_lora_adapter", "/v1/usage"}


def _status(client: TestClient, method: str, path: str, key: str | None) -> int:
    return client.request(method, path, json={}, headers=auth(key) if key else {}).status_code


def test_api_key_alone_guards_every_route_admin_included():
    client = _app("--api-key", "k")
    for method, path in ROUTES:
        assert _status(client, method, path, None) == 401, path
        assert _status(client, method, path, "wrong") == 401, path
        assert _status(client, method, path, "k") != 401, path
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_admin_key_alone_guards_the_admin_routes_and_leaves_generation_open():
    client = _app("--admin-key", "adm")
    for method, path in ROUTES:
        assert (_status(client, method, path, None) == 401) == (path in ADMIN), path
        assert _status(client, method, path, "adm") != 401, path


def test_both_keys_the_api_key_does_not_open_the_admin_routes():
    client = _app("--api-key", "k", "--admin-key", "adm")
    for method, path in ROUTES:
        assert (_status(client, method, path, "k") == 401) == (path in ADMIN), path
        assert _status(client, method, path, "adm") != 401, path


@pytest.mark.parametrize(("host", "flags", "warned"), [
    ("0.0.0.0", (), True), ("::", (), True), ("10.1.2.3", (), True),
    ("127.0.0.1", (), False), ("localhost", (), False), ("::1", (), False),
    ("0.0.0.0", ("--api-key", "k"), False), ("0.0.0.0", ("--admin-key", "k"), False),
])  # fmt: skip
def test_a_warning_when_listening_beyond_loopback_with_no_key(caplog, host, flags, warned):
    from loraplex.server.cli import _warn_if_open, build_parser, configs_from_args

    config = configs_from_args(build_parser().parse_args(["serve", "--host", host, *flags]))
    with caplog.at_level(logging.WARNING, logger="loraplex.server.cli"):
        _warn_if_open(config.server)
    assert ("with no --api-key" in caplog.text) == warned, caplog.text


def test_api_key_and_tenants_together_are_refused_naming_the_flag(tmp_path):
    from loraplex.server.cli import build_parser, configs_from_args

    with pytest.raises(ValueError, match="--api-key"):
        configs_from_args(build_parser().parse_args(["serve", "--api-key", "k", "--tenants", str(tmp_path / "t")]))


def test_the_worked_example_of_docs_security_md_parses():
    text = (Path(__file__).parents[3] / "docs" / "security.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    table = parse_tenants(example, "docs/security.md")
    assert table.names() == ("acme", "bolt", "trial")
    assert table.identify("foo") is table.get("bolt")  # its digest is sha256("foo")
    assert table.identify("trial-key-for-development") is table.get("trial")
    acme = table.get("acme")
    assert acme is not None and acme.weight == 3 and acme.limits.max_device_slots == 4
