"""Writing benchmark results: the JSON record with the commit and the exact command first (BENCHMARK.md), and
the PNG charts when matplotlib (the `bench` extra) is installed.

No torch here, so that scripts which never touch a model (sim_affinity.py) share it with common.py's users.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

PLOTS_EXTRA = "bench"  # pyproject.toml's extra that installs matplotlib


def write_json(path: Path, data: dict[str, object]) -> None:
    """Write a result, with the commit it ran on and the exact command first (BENCHMARK.md: every result
    JSON records them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # This run's commit and command, never those of a results file it merged into.
    record = {"commit": git_commit(), "command": command_line()} | {
        k: v for k, v in data.items() if k not in ("commit", "command")}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def git_commit() -> str:
    """HEAD of the checkout the benchmark runs from, "-dirty" when the tree has uncommitted changes."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=here)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def command_line() -> str:
    """The exact command, with the environment settings the run lines ask for."""
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE") if k in os.environ]
    return " ".join([*env, Path(sys.executable).name, *sys.argv])


@cache
def pyplot() -> ModuleType | None:
    """matplotlib.pyplot (headless), or None when matplotlib is not installed: then one line says so, once per
    run, and each chart is skipped while the tables and the JSON are written as usual."""
    try:
        import matplotlib
    except ImportError:
        print(f"plots skipped: matplotlib is not installed (pip install -e '.[{PLOTS_EXTRA}]' installs it)",
              flush=True)
        return None
    matplotlib.use("Agg")  # no display on a server; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt
