"""bench/sim_affinity.py: the routing simulation's invariants on tiny seeded inputs (no flakes: every run is
deterministic), and `--quick` writes its JSON (and PNG where matplotlib is installed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(adapters=100, requests=3000, warmup=0.2, seed=3)


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("sim_affinity", ROOT / "bench" / "sim_affinity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_affinity"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("sim_affinity", None)


def _run(sim, policy, replicas, slots, alpha, **kw):
    params = sim.Params(**(TINY | kw))
    return sim.simulate(policy, replicas, slots, alpha, params)


def test_one_replica_every_policy_is_the_same(sim):
    rows = [_run(sim, p, 1, 4, 1.0) for p in sim.POLICIES]
    assert len({r["hit_rate"] for r in rows}) == 1
    assert len({r["cold_loads"] for r in rows}) == 1
    assert all(r["imbalance"] == 1.0 for r in rows)


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.2])
@pytest.mark.parametrize("replicas", [2, 4])
def test_hash_and_affinity_hit_at_least_as_often_as_random(sim, replicas, alpha):
    rand = _run(sim, "random", replicas, 4, alpha)["hit_rate"]
    assert _run(sim, "hash", replicas, 4, alpha)["hit_rate"] >= rand
    assert _run(sim, "affinity", replicas, 4, alpha)["hit_rate"] >= rand


def test_hash_hit_rate_never_falls_with_more_slots(sim):
    # LRU is a stack algorithm and hash's per-replica streams do not depend on S: exact inclusion
    rates = [_run(sim, "hash", 4, s, 1.0)["hit_rate"] for s in (1, 2, 4, 8, 16, 32)]
    assert rates == sorted(rates)
    assert rates[-1] > rates[0]


@pytest.mark.parametrize("policy", ["random", "hash", "affinity"])
def test_cold_loads_are_the_misses(sim, policy):
    row = _run(sim, policy, 4, 4, 1.0)
    assert row["requests"] == 3000 - 600
    assert row["cold_loads"] == round(row["requests"] * (1 - row["hit_rate"]))
    assert sum(row["per_replica"]) == row["requests"]
    assert row["cold_loads_per_s"] == pytest.approx(row["cold_loads"] / row["window_s"])


def test_seeded_runs_repeat(sim):
    assert _run(sim, "affinity", 4, 4, 1.0) == _run(sim, "affinity", 4, 4, 1.0)
    assert _run(sim, "random", 4, 4, 1.0) != _run(sim, "random", 4, 4, 1.0, seed=4)


def test_hash_matches_che_approximation(sim):
    """The simulated LRU agrees with the analytic reference (a wrong cache or router would not)."""
    params = sim.Params(adapters=100, requests=20000, seed=1)
    ref = sim.che_reference(4, 8, 1.0, params)
    for policy in ("random", "hash"):
        assert sim.simulate(policy, 4, 8, 1.0, params)["hit_rate"] == pytest.approx(ref[policy], abs=0.03)


def test_quick_writes_json_and_png(sim, tmp_path, capsys):
    sim.main(["--quick", "--jobs", "1", "--requests", "1500", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "sim_affinity_quick.json").read_text())
    assert out["commit"] and out["command"] and out["seed"] == 0
    assert out["sweep"]["replicas"] == [1, 2, 4] and out["params"]["adapters"] == 500
    assert len(out["results"]) == 3 * 3 * 2 * 3
    assert {r["policy"] for r in out["results"]} == {"random", "hash", "affinity"}
    printed = capsys.readouterr().out
    assert "| policy |" in printed and "At R=4, S=8, α=1.0: random hits" in printed
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed (the bench extra): JSON checked, no PNG")
    assert (tmp_path / "sim_affinity_quick.png").stat().st_size > 10_000
