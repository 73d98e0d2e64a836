"""Run the shipped nginx config (`deploy/nginx/nginx.conf` + `loraplex_route.js`) as a real nginx for tests.

    proxy = start_nginx(["127.0.0.1:8001", "127.0.0.1:8002"], tmp_path)
    try:
        requests.post(proxy.url + "/v1/completions", json={"model": "support", "prompt": "hi"})
    finally:
        proxy.stop()

The config is rendered from the shipped file, never copied by hand, so a test exercises what ships. Only what
must differ in a test changes: the upstream `server` lines (the given `host:port` list, in order), the listen
address (a free port on 127.0.0.1), pid/error/access log and temp paths (inside `workdir`), `user root;` (as
root, workers would otherwise run as `nobody` and could not write temp files under the pytest tmp dir), and
nginx runs in the foreground (`-g 'daemon off;'`). Needs `nginx` on PATH and its njs module
(`bash scripts/install_nginx.sh`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NGINX_DIR = REPO / "deploy" / "nginx"
CONFIG = NGINX_DIR / "nginx.conf"
JS_MODULE = NGINX_DIR / "loraplex_route.js"
JS_NGINX_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")  # the path nginx.conf loads

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 5  # a free port can be taken between our probe and nginx's bind: then try another


def ensure_nginx() -> str | None:
    """Make sure nginx and its njs module are installed: None when they are (installing them with
    scripts/install_nginx.sh when missing and we are root), else why they cannot be (a skip reason: not root).
    Raises CalledProcessError when the install itself fails (CI runs the script up front anyway)."""
    if shutil.which("nginx") is not None and JS_NGINX_MODULE.is_file():
        return None
    if os.geteuid() != 0:
        return (f"nginx or {JS_NGINX_MODULE} is missing, and installing them needs root "
                "(run: sudo bash scripts/install_nginx.sh)")
    subprocess.run(["bash", str(REPO / "scripts" / "install_nginx.sh")], check=True, timeout=900)
    return None


@dataclass
class NginxProcess:
    """A running nginx. `url` is http://127.0.0.1:<port>; `stop()` is idempotent. `workdir` holds its files,
    among them access.log (one line per request with `route_key=` and `upstream=`)."""

    process: subprocess.Popen[bytes]
    url: str
    workdir: Path

    def error_log(self) -> str:
        """nginx's stderr (startup errors) and error log so far: for assertion messages."""
        logs = [self.workdir / "stderr.log", self.workdir / "error.log"]
        return "".join(log.read_text(errors="replace") for log in logs if log.exists())

    def stop(self) -> None:
        """Fast shutdown (SIGTERM: the master stops its workers), then wait; SIGKILL past the deadline."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)


def render_config(upstreams: list[str], port: int, workdir: Path) -> str:
    """The shipped nginx.conf with the test's upstreams, listen port and paths (see the module docstring)."""
    if not upstreams:
        raise ValueError("start_nginx needs at least one upstream host:port")
    text = CONFIG.read_text()
    text = _sub_once(r"(?m)^pid\s+[^;]+;", f"pid {workdir / 'nginx.pid'};", text)
    text = _sub_once(r"(?m)^error_log\s+[^;]+;", f"error_log {workdir / 'error.log'} info;\nuser root;", text)
    text = _sub_once(r"(?m)^(\s*)access_log\s+\S+", rf"\g<1>access_log {workdir / 'access.log'}", text)
    text = _sub_once(r"(?m)^(\s*)listen\s+8080;", rf"\g<1>listen 127.0.0.1:{port};", text)
    temp = "\n".join(f"    {kind}_temp_path {workdir / 'temp' / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = _sub_once(r"(?m)^http\s*\{", "http {\n" + temp, text)
    block = re.search(r"(?ms)^([ \t]*)upstream\s+loraplex\s*\{.*?^\1\}", text)
    if block is None:
        raise ValueError(f"{CONFIG}: no `upstream loraplex {{ ... }}` block")
    lines = block.group(0).splitlines(keepends=True)
    servers = [i for i, line in enumerate(lines) if re.match(r"\s*server\s", line)]
    if not servers:
        raise ValueError(f"{CONFIG}: the upstream block has no `server` line")
    indent = re.match(r"\s*", lines[servers[0]]).group(0)
    options = " ".join(lines[servers[0]].split()[2:]).rstrip(";")  # max_fails=... of the shipped lines
    new = "".join(f"{indent}server {u}{' ' + options if options else ''};\n" for u in upstreams)
    lines = [line for i, line in enumerate(lines) if i not in servers[1:]]
    lines[servers[0]] = new
    return text[: block.start()] + "".join(lines) + text[block.end():]


def start_nginx(upstreams: list[str], workdir: Path) -> NginxProcess:
    """Start nginx with the shipped config in front of `upstreams` ("host:port", hashed in that order) and
    return once it accepts connections (bounded wait). Files live in `workdir` (one nginx per workdir). Raises
    RuntimeError with nginx's error log when it does not start."""
    workdir.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "temp" / kind).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(JS_MODULE, workdir / JS_MODULE.name)  # js_import resolves next to the config file
    conf = workdir / "nginx.conf"
    failures = []
    for _ in range(_PORT_ATTEMPTS):
        port = _free_port()
        conf.write_text(render_config(upstreams, port, workdir))
        for stale in ("error.log", "nginx.pid"):
            (workdir / stale).unlink(missing_ok=True)
        with open(workdir / "stderr.log", "wb") as stderr:  # startup errors, before error_log is open
            process = subprocess.Popen(
                ["nginx", "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
                stdout=subprocess.DEVNULL, stderr=stderr,
            )
        proxy = NginxProcess(process, f"http://127.0.0.1:{port}", workdir)
        if _wait_listening(process, port, workdir / "nginx.pid"):
            return proxy
        proxy.stop()
        failures.append(f"port {port}: exit {process.returncode}\n{proxy.error_log()}")
        if "Address already in use" not in failures[-1]:
            break
    raise RuntimeError("nginx did not start:\n" + "\n".join(failures))


def _wait_listening(process: subprocess.Popen[bytes], port: int, pid_file: Path) -> bool:
    """Poll until nginx accepts on `port` (True), exits, or the deadline passes (False). nginx writes its pid
    file only after it bound its listen sockets, so a connect that succeeds once the file names our process
    reached this nginx, not whoever else might have taken the port."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if pid_file.read_text().strip() != str(process.pid):
                raise OSError("no pid file yet")
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.02)  # poll interval, not a synchronization guess
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sub_once(pattern: str, replacement: str, text: str) -> str:
    new, n = re.subn(pattern, replacement, text, count=1)
    if n != 1:
        raise ValueError(f"{CONFIG}: expected a line matching {pattern!r}")
    return new
