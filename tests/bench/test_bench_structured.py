"""bench/bench_structured.py: `--quick` on the tiny random llama writes a complete result (both arms, per-round
numbers, the target's verdict, validity counts with no guided output broken), and the output judge tells a valid
answer from a broken one and from one cut by max_tokens."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(request):
    sys.path.insert(0, str(ROOT / "bench"))  # the script imports its sibling `common`
    spec = importlib.util.spec_from_file_location("bench_structured", ROOT / "bench" / "bench_structured.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_structured"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_structured", None)
    sys.path.remove(str(ROOT / "bench"))


def test_quick_run_writes_the_result(tiny_model_dir, tmp_path):
    out = tmp_path / "structured.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAPLEX_BENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "bench/bench_structured.py", "--quick", "--model", str(tiny_model_dir()),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "throughput, half under a JSON schema / none" in proc.stdout
    result = json.loads(out.read_text())
    assert result["commit"] and result["command"] and result["machine"]["cpu_count"]
    assert result["params"]["requests"] == 4 and result["params"]["guided_in_mixed"] == 2
    assert result["params"]["max_tokens"] == 16 and result["params"]["schema"]["additionalProperties"] is False
    assert result["target"] == 0.85 and result["met"] == (result["ratio"] >= 0.85)
    (row,) = result["rounds"]  # quick: one round
    assert row["ratio_tok_s"] == pytest.approx(row["mixed"]["tok_s"] / row["none"]["tok_s"])
    for arm in ("none", "mixed"):
        assert row[arm]["tokens"] > 0 and row[arm]["errors"] == [] and row[arm]["decode_steps"] > 0
        assert row[arm]["decode_step_ms_at_full_batch"] > 0
        assert set(row[arm]["grammar_ms_per_decode_step"]) == {"fill", "apply", "accept", "sample"}
    assert row["none"]["grammar_ms_per_decode_step"]["accept"] == 0  # no grammar, no accept calls
    assert row["mixed"]["grammar_ms_per_decode_step"]["fill"] > 0 and row["mixed"]["guided_row_steps"] > 0
    assert result["medians"]["ratio_tok_s"] == result["ratio"]
    guided = result["validity"]["guided"]
    assert guided["outputs"] == 2 and guided["invalid"] == guided["error"] == 0
    assert guided["valid"] + guided["length"] == 2 and result["validity"]["guided_bad_examples"] == []
    assert all(s["text"].startswith('{"name": "') for s in result["sample_guided_outputs"])


def test_judge(bench):
    good = '{"name": "Ada", "age": 36, "city": "London", "hobbies": ["maths", "poetry"]}'
    assert bench.judge(good, "stop") == "valid"
    assert bench.judge('{"name": "Ada", "age": 300, "city": "London", "hobbies": []}', "stop") == "invalid"
    assert bench.judge('{"name": "Ada", "age": 36, "city": "Lond', "length") == "length"
    assert bench.judge('{"name": "Ada", "age": 36, "city": "Lond', "stop") == "invalid"
    assert bench.judge("", "error") == "error"
    assert bench.judge(f"Sure! ```json\n{good}\n``` Hope it helps.", "stop") == "invalid"
    assert bench.judge(f"Sure! ```json\n{good}\n``` Hope it helps.", "stop", strict=False) == "valid"
