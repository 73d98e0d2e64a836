"""Start a real S3-compatible server (moto's `moto_server`) as a subprocess on 127.0.0.1 for tests.

Used by test files through a session fixture; it speaks the real S3 HTTP protocol, so boto3 and our
S3Source go through the same code paths as against AWS or MinIO.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Keep any real AWS config on the machine out of the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_s3_server(timeout_s: float = 30.0, attempts: int = 3) -> S3Server:
    """Start moto_server on a free port and wait until it accepts connections."""
    env = {**os.environ, **DUMMY_AWS_ENV}
    for _ in range(attempts):  # the free port can be taken between probing and binding: retry
        port = _free_port()
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if _port_open(port):
                return S3Server(f"http://127.0.0.1:{port}", process)
            time.sleep(0.1)
        S3Server("", process).stop()
    raise RuntimeError(f"moto_server did not start after {attempts} attempts")
