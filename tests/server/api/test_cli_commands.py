"""`loraplex generate|adapters|bench` against a live `loraplex serve` (API and admin keys set): what they print,
that generation streams, and that errors print `loraplex: error: ...` with a non-zero exit."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from loraplex.clients import LoraplexClient
from loraplex.server.cli import main

from .conftest import free_port

API_KEY, ADMIN_KEY = "cli-api-key", "cli-admin-key"
GEN = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(autouse=True)
def _no_loraplex_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("LORAPLEX_")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def server(server_factory, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-adapters")
    for name, seed in (("alpha", 0), ("spare", 1)):
        shutil.copytree(adapter_dir("llama", rank=4, seed=seed), root / name)
    return server_factory("--preload", "alpha=alpha", "--served-model-name", "base", "--api-key", API_KEY,
                          "--admin-key", ADMIN_KEY, adapter_root=root)


@pytest.fixture
def client(server):
    with LoraplexClient(server.url, api_key=API_KEY, admin_key=ADMIN_KEY) as c:
        yield c


@pytest.fixture
def cli(server, capsys):
    """`cli(*argv) -> (exit status, stdout, stderr)`, with --url and both keys given as flags."""

    def run(*argv: str, keys: bool = True) -> tuple[int, str, str]:
        flags = ["--url", server.url] + (["--api-key", API_KEY, "--admin-key", ADMIN_KEY] if keys else [])
        code = main([*argv, *flags])
        out, err = capsys.readouterr()
        return code, out, err

    return run


class _Writes(io.StringIO):
    """A stdout that counts its writes (each streamed delta is one write + flush)."""

    writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_generate_base_and_adapter_stream_the_completion(cli, client, monkeypatch):
    for adapter in (None, "alpha"):
        extra = ["--adapter", adapter] if adapter else []
        code, out, err = cli("generate", "hello world", "--max-tokens", "6", *extra)
        expected = client.complete(adapter or "base", "hello world", **GEN).text
        assert (code, out, err) == (0, expected + "\n", "")
    base, alpha = (cli("generate", "hello world", *a)[1] for a in ([], ["--adapter", "alpha"]))
    assert base != alpha  # the adapter changes the answer
    # Streamed: one write per delta, then the newline.
    deltas = list(client.stream("alpha", "hello world", **GEN))
    sink = _Writes()
    monkeypatch.setattr(sys, "stdout", sink)
    assert main(["generate", "hello world", "--adapter", "alpha", "--max-tokens", "6", "--url", client.base_url,
                 "--api-key", API_KEY]) == 0
    assert sink.getvalue() == "".join(deltas) + "\n"
    assert sink.writes == len(deltas) + 1 and len(deltas) > 1


def test_generate_chat_uses_the_chat_route(cli, client):
    code, out, _ = cli("generate", "say something", "--chat", "--adapter", "alpha", "--max-tokens", "6")
    chat = client.chat("alpha", [{"role": "user", "content": "say something"}], **GEN).text
    assert code == 0 and out == chat + "\n"


def test_keys_and_url_from_the_environment(server, client, monkeypatch, capsys):
    monkeypatch.setenv("LORAPLEX_URL", server.url)
    monkeypatch.setenv("LORAPLEX_API_KEY", API_KEY)
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY", ADMIN_KEY)
    assert main(["generate", "hi", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out == client.complete("base", "hi", max_tokens=4, temperature=0).text + "\n"
    assert main(["adapters", "ls"]) == 0
    assert "alpha" in capsys.readouterr().out


def test_adapters_ls_add_show_upload_rm(cli, adapter_dir):
    code, out, _ = cli("adapters", "ls")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "RANK", "TIER", "STATE", "PINNED"]
    assert any(line.split()[:2] == ["alpha", "4"] for line in lines[1:])

    code, out, _ = cli("adapters", "add", "spare-by-path", "spare", "--pinned")
    assert code == 0 and out.startswith("added spare-by-path: rank 4") and "pinned yes" in out
    code, out, _ = cli("adapters", "show", "spare-by-path")
    record = json.loads(out)
    assert code == 0 and (record["name"], record["rank"], record["pinned"]) == ("spare-by-path", 4, True)

    code, out, _ = cli("adapters", "upload", "uploaded", str(adapter_dir("llama", rank=8, seed=3)))
    assert code == 0 and out.startswith("uploaded uploaded: rank 8")
    names = {line.split()[0] for line in cli("adapters", "ls")[1].splitlines()[1:]}
    assert {"alpha", "spare-by-path", "uploaded"} <= names
    code, out, _ = cli("generate", "hi", "--adapter", "uploaded", "--max-tokens", "3")
    assert code == 0 and out.endswith("\n")

    for name in ("spare-by-path", "uploaded"):
        assert cli("adapters", "rm", name)[:2] == (0, f"removed {name}\n")
    names = {line.split()[0] for line in cli("adapters", "ls")[1].splitlines()[1:]}
    assert names.isdisjoint({"spare-by-path", "uploaded"})


def test_server_errors_print_the_message_and_exit_1(cli):
    code, out, err = cli("generate", "hi", "--adapter", "no-such-adapter")
    assert code == 1 and out == ""
    assert err.startswith("loraplex: error: ") and "no-such-adapter" in err and "404" in err
    code, _, err = cli("adapters", "show", "no-such-adapter")
    assert code == 1 and "no-such-adapter" in err and "404" in err
    code, _, err = cli("adapters", "rm", "no-such-adapter")
    assert code == 1 and err.startswith("loraplex: error: ")
    code, _, err = cli("adapters", "add", "alpha", "spare")  # the name is taken
    assert code == 1 and "409" in err
    code, _, err = cli("adapters", "ls", keys=False)  # the admin key is required
    assert code == 1 and "401" in err and err.count("\n") == 1


def test_local_errors_exit_2(cli, tmp_path, capsys):
    (tmp_path / "half").mkdir()
    code, _, err = cli("adapters", "upload", "half", str(tmp_path / "half"))
    assert code == 2 and err.startswith("loraplex: error: ") and "adapter_model.safetensors" in err


def test_adapters_without_a_verb_lists_them(cli):
    code, out, _ = cli("adapters")
    assert code == 0 and out == cli("adapters", "ls")[1] and "alpha" in out


def test_generate_dash_reads_the_prompt_from_stdin(cli, client, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world"))
    code, out, _ = cli("generate", "-", "--max-tokens", "6")
    assert code == 0 and out == client.complete("base", "hello world", **GEN).text + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = cli("generate", "-")
    assert code == 2 and "nothing on standard input" in err


def test_bench_prints_throughput_and_latency_percentiles(cli):
    code, out, err = cli("bench", "--requests", "4", "--concurrency", "2", "--max-tokens", "4",
                         "--adapter", "alpha", "--adapter", "base")
    assert code == 0, out
    assert "4 ok, 0 failed" in out
    labels = [line.split("  ")[0].strip() for line in out.splitlines()]
    assert labels == ["requests:", "concurrency:", "req/s:", "output tok/s:", "TTFT:", "TPOT:"], out
    assert "p50" in out and "p99" in out
    assert "4/4" in err  # the progress bar (stderr) counted every request


def test_no_server_is_a_clear_error_from_the_entry_point():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "adapters", "ls", "--url", url],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"loraplex: error: cannot connect to {url}"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_percentile_is_nearest_rank():
    from loraplex.clients.cli import percentile

    assert percentile([3.0], 99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
