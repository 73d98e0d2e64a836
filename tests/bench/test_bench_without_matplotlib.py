"""Every benchmark finishes without matplotlib (the `bench` extra): its tables and JSON are written, each chart is
skipped, and one line says which extra installs them.

Each plotting bench's `main()` runs in its `--quick` mode (or its smallest, where it has none) with matplotlib
unimportable and its measuring functions replaced by the committed results in bench/results/ (what a real run
returns, in seconds instead of minutes): argument parsing, the report, the JSON and the plot calls are the
bench's own. The other benches never import matplotlib, which the last test checks.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
COMMITTED = BENCH / "results"
SKIPPED = re.compile(r"^plots skipped: matplotlib is not installed \(pip install -e '\.\[bench\]' installs it\)$",
                     re.MULTILINE)


@pytest.fixture
def load_bench(monkeypatch) -> Iterator[Callable[[str], ModuleType]]:
    """`load_bench("bench_engine")`: the script as a module, matplotlib unimportable, torch's thread count and
    the bench modules it imported restored afterwards."""
    import torch

    threads, before = torch.get_num_threads(), set(sys.modules)
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their siblings (common, results_io)
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` raises ModuleNotFoundError

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        pyplot = getattr(sys.modules["results_io"], "pyplot", None)
        if pyplot is not None:
            pyplot.cache_clear()  # a fresh run: the skip line is printed once per process
        return module

    yield load
    torch.set_num_threads(threads)
    for name in set(sys.modules) - before:
        if (BENCH / f"{name}.py").is_file():
            sys.modules.pop(name)


def committed(name: str) -> dict:
    return json.loads((COMMITTED / name).read_text())


def run_main(module: ModuleType, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main()
    return capsys.readouterr().out


def assert_finished_without_plots(out: str, json_path: Path, tmp_path: Path) -> dict:
    assert len(SKIPPED.findall(out)) == 1, out
    assert not list(tmp_path.rglob("*.png"))
    return json.loads(json_path.read_text())


def test_bench_engine_quick(load_bench, monkeypatch, capsys, tmp_path):
    bench = load_bench("bench_engine")
    results = committed("engine.json")["results"]
    monkeypatch.setattr(bench, "run_config", lambda q, *a: results["fp32" if q == "none" else q])
    out = run_main(bench, ["--quick", "--out", str(tmp_path / "engine_quick.json")], monkeypatch, capsys)
    written = assert_finished_without_plots(out, tmp_path / "engine_quick.json", tmp_path)
    assert written["results"] == results and written["new_tokens"] == 32
    assert "PASS" in out or "MISS" in out  # the report's table ran


def test_bench_engine_quick_never_overwrites_the_committed_full_run(load_bench):
    bench = load_bench("bench_engine")
    sys.argv = ["bench_engine.py", "--quick"]
    assert bench.parse_args().out == COMMITTED / "engine_quick.json"
    sys.argv = ["bench_engine.py"]
    assert bench.parse_args().out == COMMITTED / "engine.json"


def _parts(result: dict, names: tuple[str, ...]) -> dict[str, dict]:
    """A committed result's parts as the part functions return them (run_parts adds machine and wall_s)."""
    return {n: {k: v for k, v in result[n].items() if k not in ("machine", "wall_s")} for n in names}


def test_bench_adapters_quick(load_bench, monkeypatch, capsys, tmp_path):
    bench = load_bench("bench_adapters")
    # every part main() runs by default; swap's committed numbers are the full run's (no quick one was kept)
    parts = _parts(committed("adapters_quick.json"), ("cold", "scale", "ttft")) | _parts(committed("adapters.json"),
                                                                                      ("swap",))
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench, "bench_small_dir", lambda: tmp_path / "model")
    for name in parts:
        monkeypatch.setattr(bench, f"part_{name}", lambda *a, _n=name: json.loads(json.dumps(parts[_n])))
    out = run_main(bench, ["--quick"], monkeypatch, capsys)
    written = assert_finished_without_plots(out, tmp_path / "adapters_quick.json", tmp_path)
    assert {"cold", "scale", "ttft", "swap"} <= written.keys()


def test_bench_http_quick(load_bench, monkeypatch, capsys, tmp_path):
    bench = load_bench("bench_http")
    parts = _parts(committed("http_quick.json"), ("overhead", "openloop"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"vocab_size": 49152}')

    class NoServer:
        def __init__(self, *args: object) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench, "bench_small_dir", lambda: model)
    monkeypatch.setattr(bench, "synth_adapters", lambda *a: [tmp_path / "adapters" / "a0"] * 100)
    monkeypatch.setattr(bench, "Server", NoServer)
    monkeypatch.setattr(bench, "part_overhead", lambda *a: json.loads(json.dumps(parts["overhead"])))
    monkeypatch.setattr(bench, "registered_openloop", lambda *a: json.loads(json.dumps(parts["openloop"])))
    out = run_main(bench, ["--quick"], monkeypatch, capsys)
    written = assert_finished_without_plots(out, tmp_path / "http_quick.json", tmp_path)
    assert {"overhead", "openloop"} <= written.keys()


def test_bench_fairness_smallest(load_bench, monkeypatch, capsys, tmp_path):
    bench = load_bench("bench_fairness")
    result = committed("fairness.json")
    monkeypatch.setattr(bench, "tiny_model_dir", lambda: tmp_path / "model")
    monkeypatch.setattr(bench, "bench_adapters", lambda *a: (tmp_path / "a", tmp_path / "b"))
    monkeypatch.setattr(bench, "build_engine", lambda *a: None)
    monkeypatch.setattr(bench, "measure_capacity", lambda *a, **k: result["capacity"])
    monkeypatch.setattr(bench, "run_round", lambda r, *a: result["rounds"][r])
    out = run_main(bench, ["--seconds", "1", "--out", str(tmp_path / "fairness.json")], monkeypatch, capsys)
    written = assert_finished_without_plots(out, tmp_path / "fairness.json", tmp_path)
    assert written["summary"] == result["summary"]  # medians recomputed from the same rounds


def test_sim_affinity_quick(load_bench, monkeypatch, capsys, tmp_path):
    bench = load_bench("sim_affinity")
    rows = committed("sim_affinity.json")["results"]  # the full sweep holds every --quick point
    monkeypatch.setattr(bench, "sweep", lambda *a, **k: rows)
    out = run_main(bench, ["--quick", "--out", str(tmp_path)], monkeypatch, capsys)
    written = assert_finished_without_plots(out, tmp_path / "sim_affinity_quick.json", tmp_path)
    assert written["results"] == rows and "| " in out  # the markdown table was printed


def test_no_bench_imports_matplotlib_but_through_results_io():
    """The only matplotlib import is results_io.pyplot's, which skips the charts when it is missing."""
    importers = sorted(p.name for p in BENCH.glob("*.py")
                       if re.search(r"^\s*(import|from) matplotlib", p.read_text(), re.MULTILINE))
    assert importers == ["results_io.py"]
