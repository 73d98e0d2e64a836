"""An in-process server with a tenants file, for the tenant tests: a real Runtime on the tiny model behind the
real app (FastAPI's TestClient), adapters preloaded by path, keys as plain: entries (the digests are tested apart).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient

OPERATOR_KEY = "operator-key"
METRICS_KEY = "metrics-key"


def key_of(tenant: str) -> str:
    return f"key-of-{tenant}"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tenant_toml(name: str, adapters: list[str], admin: list[str], weight: float = 1, **limits: int) -> str:
    lines = ["[[tenant]]", f'name = "{name}"', f'keys = ["plain:{key_of(name)}"]',
             f"adapters = {adapters!r}".replace("'", '"'), f"admin = {admin!r}".replace("'", '"'), f"weight = {weight}"]
    if limits:
        lines.append("[tenant.limits]")
        lines += [f"{k} = {v}" for k, v in limits.items()]
    return "\n".join(lines) + "\n"


@contextmanager
def tenant_server(base: Path, model_dir: Path, adapter: Callable[[int], Path], tenants: str,
                  preload: dict[str, int], *flags: str) -> Iterator[tuple[TestClient, object]]:
    """(client, runtime) of a loaded server whose tenants file holds `tenants` and which preloads `preload`
    (adapter name -> seed of its tiny adapter, copied under the adapter root)."""
    from loraplex.server.api.app import create_app
    from loraplex.server.cli import build_parser, configs_from_args
    from loraplex.server.runtime import Runtime

    root = base / "adapters"
    for name, seed in preload.items():
        shutil.copytree(adapter(seed), root / name.replace("/", "-"))
    for seed in range(3):  # spares for registrations by path
        shutil.copytree(adapter(seed), root / f"spare-{seed}")
    (base / "tenants.toml").write_text(tenants)
    args = ["serve", "--model", str(model_dir), "--state-dir", str(base / "state"), "--adapter-root", str(root),
            "--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "256",
            "--block-size", "8", "--max-loras", "4", "--served-model-name", "base", "--tenants",
            str(base / "tenants.toml"), "--admin-key", OPERATOR_KEY, "--metrics-key", METRICS_KEY, *flags,
            *[f"--preload={n}={n.replace('/', '-')}" for n in preload]]
    runtime = Runtime(configs_from_args(build_parser().parse_args(args)))
    runtime.load()
    assert runtime.load_error is None, runtime.load_error
    try:
        with TestClient(create_app(runtime, load_in_background=False)) as client:
            yield client, runtime
    finally:
        runtime.shutdown()
