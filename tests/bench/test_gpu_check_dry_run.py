"""bench/gpu_check.sh --cpu-dry-run: every stage runs on tiny shapes on the CPU and reports, as the GPU machine
would run it: loraplex imported through the script's own path shim, and the packages the GPU reference machine
lacks (the HTTP layer's and S3's) made unimportable."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"pytest", "kernels", "adapters", "start", "engine_bf16", "engine_nf4"}
# Not installed on the GPU reference machine (bitsandbytes neither, but it is brought as a wheel there).
ABSENT = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "multipart", "python_multipart", "boto3",
          "botocore")


def _absent_packages(tmp_path: Path) -> Path:
    """A sitecustomize that makes ABSENT look uninstalled: import fails, importlib.util.find_spec gives None."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n")
    return site


@pytest.mark.slow
def test_cpu_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(_absent_packages(tmp_path))}
    env.pop("LORAPLEX_BENCH_CACHE", None)  # the script's own temporary cache
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "/path/loraplex" in proc.stdout  # imported through the shim, not the editable install
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["commit"] and report["command"] and report["dry_run"] is True
    assert set(report["stages"]) == STAGES and report["failed_stages"] == []
    for name, stage in report["stages"].items():
        assert stage["status"] == "ok" and stage["rows"], (name, stage)
    tests = report["stages"]["pytest"]
    assert "tests/server/test_engine_cuda.py" in tests["files"] and not any("/api/" in f for f in tests["files"])
    assert tests["counts"]["skipped"] > 0 and tests["counts"]["passed"] == tests["counts"]["failed"] == 0
    table = (out / "gpu_check.md").read_text()
    assert "| stage | metric | value | target | limit | result |" in table
    assert all(f"| {name} | stage | ok" in table for name in STAGES)


def test_nf4_stage_skips_without_bitsandbytes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_check

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    assert gpu_check.stage_main("engine_nf4", True, tmp_path, 10.0) == 0
    result = json.loads((tmp_path / "stages" / "engine_nf4.json").read_text())
    assert result["status"] == "skipped" and "bitsandbytes not installed" in result["error"]
