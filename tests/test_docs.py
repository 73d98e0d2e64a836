"""README.md and docs/ stay true to the code (issue 11): the flag table is the one `loraplex serve` defines,
every HTTP route is documented, and every relative link points at a file of this repository.

The flag table in docs/configuration.md sits between `<!-- flags -->` and `<!-- /flags -->` and is generated
from `loraplex.server.cli.FLAGS` (plus the options defined outside FLAGS, such as --preload). After changing
a flag, regenerate it with:

    .venv/bin/python tests/test_docs.py --write

The examples in README.md and docs/ are run against a live server by tests/server/api/test_readme_examples.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
API_DOC = ROOT / "docs" / "api.md"
FLAGS_START, FLAGS_END = "<!-- flags -->", "<!-- /flags -->"
# [text](target) links and ![alt](target) images; the target ends at whitespace or ')'.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---- the flag table ------------------------------------------------------------------------------------


def _serve_parser() -> argparse.ArgumentParser:
    from loraplex.server.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _default_text(flag: str, default: object) -> str:
    if default is None:
        return "unset"
    if isinstance(default, int) and not isinstance(default, bool) and flag.endswith("-bytes"):
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if default >= size and default % size == 0:
                return f"`{default}` ({default // size} {unit})"
    return f"`{default}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_flags_table() -> str:
    """The Markdown table of every `loraplex serve` option: flag, environment variable, default, meaning."""
    from loraplex.server.cli import FLAGS, _env_name

    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for flag, _kind, default, help_ in FLAGS:
        rows.append(f"| `{flag}` | `{_env_name(flag)}` | {_default_text(flag, default)} | {_cell(help_)} |")
    known = {f for f, *_ in FLAGS}
    for action in _serve_parser()._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag in known or flag == "--help":
            continue
        shown = f"{flag} {action.metavar}" if action.metavar else flag
        rows.append(f"| `{shown}` | `{_env_name(flag)}` | unset | {_cell(action.help or '')} |")
    return "\n".join(rows)


def _between_markers(text: str) -> str:
    start, end = text.index(FLAGS_START) + len(FLAGS_START), text.index(FLAGS_END)
    return text[start:end].strip()


def write_flags_table() -> None:
    text = CONFIG_DOC.read_text()
    start, end = text.index(FLAGS_START) + len(FLAGS_START), text.index(FLAGS_END)
    CONFIG_DOC.write_text(text[:start] + "\n" + render_flags_table() + "\n" + text[end:])


def test_the_flag_table_is_the_one_the_cli_defines():
    documented = _between_markers(CONFIG_DOC.read_text())
    assert documented == render_flags_table(), (
        "docs/configuration.md's flag table differs from server/cli.py's FLAGS: "
        "run `.venv/bin/python tests/test_docs.py --write`")


def test_every_serve_option_is_documented():
    text = CONFIG_DOC.read_text()
    options = [o for a in _serve_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert len(options) > 25
    missing = [o for o in options if f"`{o}" not in text]
    assert not missing, f"docs/configuration.md does not mention {missing}"


# ---- routes ---------------------------------------------------------------------------------------------


def test_every_http_route_is_documented():
    from loraplex.server.api.app import create_app
    from loraplex.server.cli import build_parser, configs_from_args
    from loraplex.server.runtime import Runtime

    args = build_parser().parse_args(["serve", "--model", str(ROOT / "no-model-needed")])
    app = create_app(Runtime(configs_from_args(args)), load_in_background=False)
    routes = [(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops]
    assert len(routes) >= 17
    text = API_DOC.read_text()
    missing = [f"{m} {p}" for m, p in routes if f"`{m} {p}`" not in text]
    assert not missing, f"docs/api.md has no `METHOD /path` entry for {missing}"


# ---- links ----------------------------------------------------------------------------------------------


def _links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link outside fenced code blocks."""
    out, in_fence = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if _FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.extend((number, m.group(1)) for m in _LINK.finditer(line))
    return out


def test_docs_exist_and_readme_links_each():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"configuration.md", "api.md", "adapters.md", "operations.md", "architecture.md", "benchmarks.md",
            "security.md", "limits.md"} <= names
    readme_targets = {target.split("#")[0] for _, target in _links(ROOT / "README.md")}
    assert {f"docs/{n}" for n in names} <= readme_targets, "README.md must link every page in docs/"


def test_every_relative_link_points_at_a_file_in_the_repository():
    problems = []
    for doc in doc_files():
        for number, target in _links(doc):
            where = f"{doc.relative_to(ROOT)}:{number}: {target}"
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: …
                problems.append(f"{where} (points outside the repository)")
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (doc.parent / path_part).resolve() if path_part else doc
            if not resolved.is_relative_to(ROOT):
                problems.append(f"{where} (leaves the repository)")
            elif not resolved.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{where} (no heading with that anchor in {resolved.relative_to(ROOT)})")
    assert not problems, "\n".join(problems)


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of `path`: lower case, punctuation dropped, spaces to '-',
    '-1', '-2'... for repeats."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line.strip()):
            in_fence = not in_fence
        heading = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return out


def test_nothing_points_at_the_shared_design_notes():
    # DESIGN.md, BAD_INPUTS.md and BENCHMARK.md live outside the repository: users cannot follow them.
    for doc in doc_files():
        text = doc.read_text()
        for name in ("DESIGN.md", "BAD_INPUTS.md", "BENCHMARK.md", "shared/"):
            assert name not in text, f"{doc.relative_to(ROOT)} mentions {name}"


def test_the_readme_leaves_exactly_one_block_for_the_demo_answers():
    text = (ROOT / "README.md").read_text()
    assert text.count("<!-- demo-answers -->") == 1 and text.count("<!-- /demo-answers -->") == 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_flags_table()
        print(f"wrote the flag table into {CONFIG_DOC.relative_to(ROOT)}")
    else:
        print(render_flags_table())
