"""The GPU path on a GPU machine in under 8 minutes (issue 10): tests, kernels, engine. Run via gpu_check.sh.

Stages, each in its own process and time-boxed; a stage that fails or runs out of time is recorded and the next
one runs:
  adapters     seeded PEFT adapters for bench-7b written to the bench cache (CPU work, beside pytest + kernels)
  pytest       the `gpu`-marked tests: every test file holding one, except the HTTP layer's (tests/server/api)
  kernels      lora_apply against torch.mm on Llama-7B layer shapes (gpu_kernels.py)
  start        the engine's start on bench-7b: kernel warm-up (probes), KV pool by --gpu-memory-utilization over a
               profile run, graphs at start; then serving compiles no Triton variant (gpu_start.py)
  engine_bf16  the engine on bench-7b in bf16: base-only vs 32 distinct r16 adapters, CUDA graphs on / off
  engine_nf4   the same on an nf4 base (graphs on); skipped when bitsandbytes is not installed
With --cpu-dry-run every stage runs on tiny shapes on the CPU: the numbers mean nothing, the plumbing is checked.

Writes OUT/gpu_check.json (commit, command, machine, every stage's numbers), OUT/gpu_check.md (the table, also
printed), OUT/logs/<stage>.log and OUT/pytest.xml. Exit code 1 when a stage failed or timed out; a MISS against
a target is reported in the table, not an error.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch
from common import RESULTS_DIR, machine_facts, write_json

ROOT = Path(__file__).resolve().parent.parent
# Seconds per stage (GPU run; adapters runs in the background from the start). Together under 8 minutes.
BUDGET_S = {"adapters": 150, "pytest": 90, "kernels": 40, "start": 70, "engine_bf16": 150, "engine_nf4": 120}
DRY_BUDGET_S = {"adapters": 120, "pytest": 120, "kernels": 60, "start": 120, "engine_bf16": 120, "engine_nf4": 120}
# The HTTP layer needs fastapi and pydantic, which the GPU reference machine lacks: a stage importing it fails.
# (CI's dry run goes further and runs with those packages, boto3 and uvicorn made unimportable.)
HTTP_LAYER = "loraplex.server.api"


class Skip(Exception):
    """The stage cannot run on this machine (said in one line); not a failure."""


# ---- a stage, inside its own process -----------------------------------------------------------------------
def stage_main(name: str, dry: bool, out: Path, budget_s: float) -> int:
    """Run one stage and write OUT/stages/<name>.json: {"status": ok|skipped|failed, "rows": [...], ...}."""
    device = torch.device("cpu" if dry else "cuda")
    before = set(sys.modules)  # a stage runs in a fresh process; in a test, modules of others are not its own
    try:
        result = {"status": "ok"} | STAGES[name](dry, device, budget_s)
    except Skip as exc:
        print(f"SKIP: {exc}", flush=True)
        result = {"status": "skipped", "error": str(exc)}
    except Exception:  # noqa: BLE001 - recorded in the report; the driver goes on with the next stage
        traceback.print_exc()
        result = {"status": "failed", "error": traceback.format_exc(limit=4)}
    imported = sorted(m for m in set(sys.modules) - before if m == HTTP_LAYER or m.startswith(HTTP_LAYER + "."))
    if imported:
        result |= {"status": "failed", "error": f"the stage imported the HTTP layer ({', '.join(imported)})"}
    (out / "stages").mkdir(parents=True, exist_ok=True)
    (out / "stages" / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if result["status"] != "failed" else 1


def _adapters(dry: bool, device: torch.device, budget_s: float) -> dict[str, object]:
    import gpu_engine

    return gpu_engine.prepare(dry)


def _kernels(dry: bool, device: torch.device, budget_s: float) -> dict[str, object]:
    import gpu_kernels

    return gpu_kernels.run(dry, device)


def _start(dry: bool, device: torch.device, budget_s: float) -> dict[str, object]:
    import gpu_start

    return gpu_start.run(dry, device, budget_s)


def _engine(quantize: str) -> Callable[[bool, torch.device, float], dict[str, object]]:
    def stage(dry: bool, device: torch.device, budget_s: float) -> dict[str, object]:
        if quantize != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes not installed (bring its wheel: --wheels DIR, see bench/README.md)")
        import gpu_engine

        return gpu_engine.run(quantize, dry, device, budget_s)

    return stage


STAGES: dict[str, Callable[[bool, torch.device, float], dict[str, object]]] = {
    "adapters": _adapters, "kernels": _kernels, "start": _start, "engine_bf16": _engine("none"),
    "engine_nf4": _engine("nf4")}


# ---- the driver: stages as time-boxed processes ------------------------------------------------------------
class StageProcess:
    """One stage's process; its output goes to OUT/logs/<name>.log and, prefixed with the name, to ours."""

    def __init__(self, name: str, cmd: list[str], out: Path, budget_s: float, env: dict[str, str] | None = None
                 ) -> None:
        self.name, self.budget_s, self.started = name, budget_s, time.monotonic()
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", start_new_session=True, env={**os.environ, **(env or {})})
        self._pump = threading.Thread(target=self._copy, args=(out / "logs" / f"{name}.log",), daemon=True)
        self._pump.start()

    def _copy(self, log_path: Path) -> None:
        with log_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                self.tail.append(line)
                print(f"[{self.name}] {line}", end="", flush=True)

    def wait(self) -> int | None:
        """The exit code, or None when it ran past its budget (counted from its start) and was killed."""
        try:
            rc = self.proc.wait(timeout=max(0.0, self.started + self.budget_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: pytest's children go too
            self.proc.wait()
            rc = None
        self._pump.join(timeout=5)
        return rc

    def outcome(self, rc: int | None, result: dict[str, object]) -> dict[str, object]:
        """`result` with the status a timeout or a crash imposes, the seconds taken and, on failure, the log tail."""
        if rc is None:
            result = result | {"status": "timeout", "error": f"killed after its {self.budget_s:.0f} s budget"}
        elif not result:
            result = {"status": "failed", "error": f"exited {rc} without a result"}
        result["seconds"] = round(time.monotonic() - self.started, 1)
        if result["status"] in ("failed", "timeout"):
            result["log_tail"] = "".join(self.tail)
        return result


def start_stage(name: str, args: argparse.Namespace, budgets: dict[str, float]) -> StageProcess:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(args.out),
           "--budget-s", str(budgets[name]), *(["--cpu-dry-run"] if args.cpu_dry_run else [])]
    return StageProcess(name, cmd, args.out, budgets[name])


def finish_stage(proc: StageProcess, out: Path) -> dict[str, object]:
    rc = proc.wait()
    path = out / "stages" / f"{proc.name}.json"
    return proc.outcome(rc, json.loads(path.read_text()) if path.is_file() else {})


def gpu_test_files() -> list[str]:
    """Test files that hold `gpu`-marked tests. The HTTP layer's tests (tests/server/api) are left out: their
    conftest imports fastapi, which the GPU machine does not have."""
    api = ROOT / "tests" / "server" / "api"
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if api not in p.parents and "mark.gpu" in p.read_text(encoding="utf-8"))


def start_pytest(args: argparse.Namespace, budgets: dict[str, float], files: list[str]) -> StageProcess:
    """pytest -m gpu over `files`, with only the plugins named here (the same on every machine)."""
    plugins = ["-p", "pytest_timeout"] if importlib.util.find_spec("pytest_timeout") else []
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", *plugins, "-q",
           f"--junitxml={args.out / 'pytest.xml'}", *files]
    return StageProcess("pytest", cmd, args.out, budgets["pytest"], env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})


def finish_pytest(proc: StageProcess, out: Path, files: list[str]) -> dict[str, object]:
    rc = proc.wait()
    xml = out / "pytest.xml"
    counts = junit_counts(xml) if rc is not None and xml.is_file() else {}
    bad = counts.get("failed", 0) + counts.get("errors", 0)
    status = "ok" if rc == 0 and not bad else "failed"
    error = "no gpu tests collected" if rc == 5 else (f"pytest exited {rc}" if status == "failed" else None)
    row = {"metric": f"gpu-marked tests in {len(files)} files",
           "value": f"{counts.get('passed', 0)} passed, {bad} failed or errors, {counts.get('skipped', 0)} skipped",
           "target": "0 failed", "pass": status == "ok"}
    result = {"status": status, "rows": [row], "counts": counts, "files": files, "exit_code": rc}
    return proc.outcome(rc, result | ({"error": error} if error else {}))


def junit_counts(path: Path) -> dict[str, int]:
    suites = ET.parse(path).getroot().iter("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"passed": passed, "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def run_all(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """pytest and kernels while the adapters are written, then the engine stages, one at a time."""
    budgets = DRY_BUDGET_S if args.cpu_dry_run else BUDGET_S
    files = gpu_test_files()
    adapters = start_stage("adapters", args, budgets)
    results = {"pytest": finish_pytest(start_pytest(args, budgets, files), args.out, files)}
    results["kernels"] = finish_stage(start_stage("kernels", args, budgets), args.out)
    results["adapters"] = finish_stage(adapters, args.out)
    for name in ("start", "engine_bf16", "engine_nf4"):
        results[name] = finish_stage(start_stage(name, args, budgets), args.out)
    return results


# ---- report ------------------------------------------------------------------------------------------------
def table(results: dict[str, dict[str, object]], dry: bool) -> str:
    lines = ["| stage | metric | value | target | limit | result |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        error = str(r.get("error") or "").strip().splitlines()
        verdict = {"ok": "ok", "skipped": "SKIP", "failed": "FAIL", "timeout": "FAIL"}[r["status"]]
        status = f"{r['status']} in {r['seconds']} s" + (f": {error[-1]}" if error else "")
        lines.append(_md_row((name, "stage", status, "", "", verdict)))
        for row in r.get("rows", []):
            verdict = "-" if "pass" not in row else ("(dry run)" if dry else ("PASS" if row["pass"] else "MISS"))
            lines.append(_md_row((name, row["metric"], row["value"], row.get("target"), row.get("limit"), verdict)))
    return "\n".join(lines)


def _md_row(cells: tuple[object, ...]) -> str:
    return "| " + " | ".join(str(c or "").replace("|", "\\|") for c in cells) + " |"


def report(args: argparse.Namespace, results: dict[str, dict[str, object]], wall_s: float) -> bool:
    """Write the JSON and the markdown table, print the table; True when no stage failed."""
    failed = [n for n, r in results.items() if r["status"] in ("failed", "timeout")]
    facts = machine_facts("cpu" if args.cpu_dry_run else "cuda")
    write_json(args.out / "gpu_check.json", {"machine": facts, "dry_run": args.cpu_dry_run, "wall_s": wall_s,
                                             "failed_stages": failed, "stages": results})
    title = f"gpu_check{' --cpu-dry-run' if args.cpu_dry_run else ''}: {facts.get('gpu', facts['processor'])}, " \
            f"torch {facts['torch']}, {wall_s:.0f} s"
    text = f"# {title}\n\n{table(results, args.cpu_dry_run)}\n"
    (args.out / "gpu_check.md").write_text(text)
    print(f"\n{text}\nfailed stages: {', '.join(failed) or 'none'}", flush=True)
    return not failed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu", help="results folder")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every stage on tiny shapes on the CPU")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)  # internal: one stage
    parser.add_argument("--budget-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    return args


def main() -> int:
    args = parse_args()
    if args.stage:
        return stage_main(args.stage, args.cpu_dry_run, args.out, args.budget_s)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --cpu-dry-run to check the stages on the CPU)", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = run_all(args)
    return 0 if report(args, results, round(time.monotonic() - started, 1)) else 1


if __name__ == "__main__":
    sys.exit(main())
