"""The engine simulation (tests/sim/engine_sim.py): thousands of seeded scenarios of the real engine core over a
fake forward, invariants after every step; hypothesis shrinks a failing one. A failure prints one line that
replays it:

    bash scripts/test.sh tests/sim -k seeded --sim-seed=N        (a seeded scenario)
    bash scripts/test.sh tests/sim -k replay --sim-replay=1,0,4,...   (a shrunk one: its draws)

`--sim-long` runs 100,000 seeded scenarios; `--sim-scenarios N` and `--sim-first-seed S` pick others.
"""

from __future__ import annotations

import logging
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import engine_sim as sim

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def quiet_engine_logs():
    """The scenarios inject faults by the thousand: their log lines (and tracebacks) would cost seconds."""
    logging.disable(logging.ERROR)
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def world_parts(tokenizer):
    from loraplex.server.engine.guided import GuidedCompiler

    vocab = len(tokenizer)
    guided = GuidedCompiler(tokenizer, vocab, eos_token_ids=(tokenizer.eos_token_id,))
    return tokenizer, sim.FakeModel(vocab), guided


def _run(parts, scenario):
    tokenizer, model, guided = parts
    return sim.run_scenario(scenario, tokenizer, model, guided)


def _fails(parts, scenario) -> bool:
    try:
        _run(parts, scenario)
    except sim.SimViolation:
        return True
    return False


def _explain(parts, scenario, err: Exception, replay: str) -> str:
    small = sim.shrink(scenario, lambda s: _fails(parts, s))
    try:
        _run(parts, small)
        why = str(err)
    except sim.SimViolation as exc:
        why = str(exc)
    return (f"{why}\nreplay: bash scripts/test.sh tests/sim {replay}\n"
            f"shrunk to {len(small.events)} of {len(scenario.events)} events:\n{small.describe()}")


def test_seeded_scenarios(world_parts, request):
    """2,000 seeded scenarios (CI), every invariant after every step; the first failure is shrunk."""
    opt = request.config.getoption
    if opt("--sim-seed") is not None:
        seeds = [opt("--sim-seed")]
    else:
        count = 100_000 if opt("--sim-long") else opt("--sim-scenarios")
        seeds = range(opt("--sim-first-seed"), opt("--sim-first-seed") + count)
    vocab = world_parts[1].vocab_size
    totals = sim.Report()
    t0 = time.perf_counter()
    for seed in seeds:
        scenario = sim.generate(sim.Draws.from_seed(seed), vocab)
        try:
            report = _run(world_parts, scenario)
        except sim.SimViolation as err:
            pytest.fail(_explain(world_parts, scenario, err, f"-k seeded --sim-seed={seed}"), pytrace=False)
        _add(totals, report)
    seconds = time.perf_counter() - t0
    print(f"\nsimulation: {len(seeds)} scenarios in {seconds:.1f} s ({len(seeds) / seconds:.0f}/s), "
          f"{totals.steps} steps, {totals.requests} requests ({totals.rejected} rejected at the door), "
          f"outcomes {dict(sorted(totals.outcomes.items()))}, {totals.checked_greedy} outputs (greedy and sampled) and "
          f"{totals.checked_prompt_logprobs} prompt logprobs equal to their solo reference, "
          f"{totals.preemptions} preemptions, {totals.prefix_hits} tokens found in the prefix cache, "
          f"longest drain {totals.idle_after} steps")


def _add(totals, report) -> None:
    totals.steps += report.steps
    totals.requests += report.requests
    totals.rejected += report.rejected
    totals.checked_greedy += report.checked_greedy
    totals.checked_prompt_logprobs += report.checked_prompt_logprobs
    totals.preemptions += report.preemptions
    totals.prefix_hits += report.prefix_hits
    totals.idle_after = max(totals.idle_after, report.idle_after)
    for k, v in report.outcomes.items():
        totals.outcomes[k] = totals.outcomes.get(k, 0) + v


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_hypothesis_scenarios(world_parts, data):
    """Scenarios drawn by hypothesis, which shrinks a failing one to few events and small numbers."""
    draws = sim.Draws(lambda lo, hi: data.draw(st.integers(lo, hi)))
    scenario = sim.generate(draws, world_parts[1].vocab_size, max_events=25)
    try:
        _run(world_parts, scenario)
    except sim.SimViolation as err:
        replay = ",".join(map(str, draws.log))
        raise sim.SimViolation(f"{err}\nreplay: bash scripts/test.sh tests/sim -k replay --sim-replay={replay}\n"
                               f"{scenario.describe()}") from None


def test_replay(world_parts, request):
    """`--sim-replay=1,0,4,...`: run the scenario those draws make, printing it."""
    values = request.config.getoption("--sim-replay")
    if values is None:
        pytest.skip("no --sim-replay given")
    scenario = sim.generate(sim.Draws.from_list([int(v) for v in values.split(",")]), world_parts[1].vocab_size,
                            max_events=25)
    print(scenario.describe())
    print(_run(world_parts, scenario))
