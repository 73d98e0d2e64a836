"""The examples of README.md and docs/*.md, run as written against a live demo server (issue 11).

Which blocks run: a fenced block tagged `bash` or `python` whose opening fence is preceded (blank lines
aside) by an HTML comment `<!-- test: run [options] -->`. Options:

    expect="TEXT"          TEXT must appear in the block's stdout (repeatable; write \\" for a quote)
    json                   stdout must be one JSON document
    needs=demo-adapters    skipped, saying why, unless the demo adapters are built (deploy/adapters/)

Blocks without the comment (installation, deployment, examples that need keys or S3) are not run; in README.md
every `bash`/`python` block that calls the server with curl or the `openai` client must carry it.

How they run: README.md first, then docs/*.md in name order, each file's blocks from top to bottom, all against
one `loraplex serve` without --model (the built-in demo; its adapters are preloaded when built) and in one
scratch working directory, so that blocks build on earlier ones as a reader's would (adapters.md makes
`my-adapter`, clients.md uploads it): run one block alone with -k and it may miss what an earlier one made.
`http://localhost:8000` (and `http://127.0.0.1:8000`) become the server's URL; `.venv/bin` comes first on PATH
(the reader's `source .venv/bin/activate`) and LORAPLEX_URL points at the server, for the `loraplex` commands.
bash blocks run with `bash -e -o pipefail`, python blocks with this interpreter (the dev extra has `openai`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loraplex.server.demo import DemoUnavailable, demo_adapters_dir, demo_gguf

from .conftest import LiveServer, start_server

ROOT = Path(__file__).resolve().parents[3]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_URLS = ("http://localhost:8000", "http://127.0.0.1:8000")
BLOCK_TIMEOUT_S = 300
_MARKER = re.compile(r"^<!--\s*test:\s*run\b(?P<options>.*?)-->\s*$")
_OPEN = re.compile(r"^```(?P<lang>[A-Za-z0-9_+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence
    lang: str
    code: str
    marked: bool
    expect: tuple[str, ...] = ()
    json: bool = False
    needs_demo_adapters: bool = False

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def parse_blocks(doc: Path) -> list[Block]:
    """Every fenced block of `doc`, with the options of the `<!-- test: run -->` comment before it."""
    lines, blocks, i = doc.read_text().splitlines(), [], 0
    while i < len(lines):
        opening = _OPEN.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(previous)
        options = _options(marker.group("options")) if marker else {}
        blocks.append(Block(doc, i + 1, opening.group("lang"), "\n".join(lines[i + 1:end]) + "\n", marker is not None,
                            expect=tuple(options.get("expect", ())), json="json" in options,
                            needs_demo_adapters="demo-adapters" in options.get("needs", ())))
        i = end + 1
    return blocks


def _options(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for token in shlex.split(text):
        key, _, value = token.partition("=")
        out.setdefault(key, []).append(value)
    unknown = set(out) - {"expect", "json", "needs"}
    assert not unknown, f"unknown <!-- test: run --> option(s) {sorted(unknown)}"
    return out


RUNNABLE = [b for doc in DOCS for b in parse_blocks(doc) if b.marked]


def test_the_readme_examples_that_call_the_server_are_all_run():
    readme = parse_blocks(ROOT / "README.md")
    calls = [b for b in readme if b.lang in ("bash", "python") and ("curl " in b.code or "from openai" in b.code)]
    assert len(calls) >= 4, [b.id for b in calls]  # the demo answers, /v1/models, chat with curl, the openai client
    assert all(b.marked for b in calls), [b.id for b in calls if not b.marked]
    langs = {b.lang for b in RUNNABLE}
    assert langs <= {"bash", "python"}, langs
    assert {"bash", "python"} <= langs


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    try:
        demo_gguf()
    except DemoUnavailable as exc:
        pytest.skip(str(exc))
    base = tmp_path_factory.mktemp("readme")
    # The first start converts the demo model's GGUF into the cache (~1 min on 2 cores); later ones take seconds.
    server = start_server(None, base / "state", None, "--max-model-len", "512", ready_timeout=600)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reader")


def _env(server: LiveServer) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "LORAPLEX_URL": server.url,
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _skip_reason(block: Block) -> str | None:
    if block.needs_demo_adapters and demo_adapters_dir() is None:
        return "the demo adapters are not built (deploy/adapters/ or the cache's demo-adapters)"
    if block.lang == "bash" and "curl " in block.code and shutil.which("curl") is None:
        return "curl is not installed"
    if block.lang == "python" and "openai" in block.code and importlib.util.find_spec("openai") is None:
        return "the openai package is not installed (pip install -e '.[dev]')"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_example_runs_as_written(block: Block, demo: LiveServer, workdir: Path):
    reason = _skip_reason(block)
    if reason:
        pytest.skip(reason)
    code = block.code
    for url in DOC_URLS:
        code = code.replace(url, demo.url)
    argv = ["bash", "-e", "-o", "pipefail", "-c", code] if block.lang == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(argv, cwd=workdir, env=_env(demo), capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    shown = f"{block.id} exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert done.returncode == 0, shown
    for text in block.expect:
        assert text in done.stdout, f"{block.id}: {text!r} not in its output\n{shown}"
    if block.json:
        try:
            json.loads(done.stdout)
        except ValueError as exc:
            pytest.fail(f"{block.id}: the output is not one JSON document ({exc})\n{shown}")


@pytest.mark.slow
def test_every_exported_metric_is_documented(demo: LiveServer):
    body = httpx.get(demo.url + "/metrics", timeout=30).text
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) \S+$", body, re.MULTILINE)}
    names = {n for n in names if not n.endswith("_created")}  # prometheus_client's companions, documented as such
    assert len(names) >= 20, sorted(names)
    text = (ROOT / "docs" / "operations.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/operations.md does not list {missing}"
