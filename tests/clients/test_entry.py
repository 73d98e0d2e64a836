"""`loraplex` client verbs start without the server's imports (no torch, transformers, uvicorn), and the rest
goes to the server's CLI."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from loraplex.clients.entry import main
code = main(["adapters", "ls", "--url", "http://127.0.0.1:9"])
heavy = sorted(m for m in ("torch", "transformers", "uvicorn", "loraplex.server") if m in sys.modules)
print("exit", code, "heavy", heavy)
"""


def test_client_verbs_do_not_import_the_server():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert "exit 1 heavy []" in proc.stdout, proc.stdout + proc.stderr
    assert "loraplex: error: cannot connect to http://127.0.0.1:9" in proc.stderr


def test_serve_and_help_go_to_the_server_cli():
    proc = subprocess.run([sys.executable, "-m", "loraplex.clients.entry", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "serve" in proc.stdout and "generate" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "loraplex.clients.entry", "serve", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--port: must be in 1..65535" in proc.stderr
