"""Every Triton kernel variant the engine can launch compiles to a cubin for sm_80 and sm_90 on this CPU-only
machine, within the register, spill and shared-memory limits, and every variant a serving step launches is
compiled at engine start (tests/gpu_aot/aot.py says how). CI compiles a sample (one variant per code shape:
`aot.py --sample`, about a minute on 2 cores when .cache/gpu_aot is cold, seconds when warm); the full run's
table is bench/results/gpu_aot.md (`python tests/gpu_aot/aot.py --out bench/results`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_variant_compiles_for_sm80_and_sm90_and_none_compiles_while_serving(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the recorder needs triton's JIT
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # cubins stay out of ~/.triton; results go to .cache
    proc = subprocess.run([sys.executable, "tests/gpu_aot/aot.py", "--sample", "--jobs", "2", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_aot.json").read_text()) if (tmp_path / "gpu_aot.json").is_file() else {}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["problems"] == [] and report["serving_variants"] <= report["warm_up_variants"]
    results = report["results"]
    kernels = {r["variant"].split()[0] for r in results}
    assert kernels == {"_shrink_kernel", "_expand_kernel", "_paged_attention_kernel"}
    assert {r["target"] for r in results} == {80, 90} and all(r["regs"] > 0 for r in results)
    wide_fp32 = [r for r in results if "_paged" in r["variant"] and "fp32" in r["variant"] and "'DIM': 256" in
                 r["variant"]]
    assert wide_fp32 and all(r["num_warps"] == 8 and r["spill_stores"] == 0 for r in wide_fp32)
    print(proc.stdout.splitlines()[2])  # the summary line, in pytest -s output


def test_a_runtime_int_specialisation_would_be_caught(monkeypatch):
    """The coverage check is not vacuous: with `depth` specialised again (== 1, divisible by 16), the serving
    sweep launches variants the warm-up never compiled."""
    code = ("import sys; sys.path.insert(0, 'tests/gpu_aot'); import aot\n"
            "from loraplex.adapters.ops import triton_ops as t\n"
            "for k in (t._shrink_kernel, t._expand_kernel):\n"
            "    p = next(p for p in k.params if p.name == 'depth'); p.do_not_specialize = False\n"
            "lora = lambda rec: {v for v in rec.variants() if 'attention' not in v.kernel}\n"
            "warm = lora(aot.record_warm_up({'m': aot.MODELS['Qwen2-7B']}, attention=False))\n"
            "print(len(lora(aot.record_serving(steps=20)) - warm))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 0
