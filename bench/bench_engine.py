"""Engine benchmark on bench-small (BENCHMARK.md): our engine against HF `generate` and PEFT mixed batches.

Closed loop, B = 16 requests started together, prompts of 32-128 seeded random tokens (`--quick`: 32),
64 new tokens each (`--quick`: 32), greedy, EOS ignored, for fp32 and nf4 bases. Throughput = output
tokens / seconds from the first `add_request` (or `generate` call) until every request finished.

  base      ours, base model only                    vs  hf        HF `generate`, static left-padded batch
  s1        ours, 16 distinct S1 adapters (r8 q/k/v/o)   (LoRA tax = s1 / base)
  p_*       ours, P adapters (r16, all 7 projections) vs  peft_*    PEFT `generate(adapter_names=[...])`
            mixes: distinct (16 adapters), skewed (Zipf 1.5 over 16), identical (1 adapter)

Every case of one base dtype runs once per round, rounds repeat (median of >= 3), so the ratios compare
measurements taken side by side on this shared, noisy machine. Our engine is built once per base dtype
with 32 device slots, so the 16 S1 and 16 P adapters all stay resident; a warm-up pass loads them.

Run: .venv/bin/python bench/bench_engine.py [--quick] [--repeats N] [--quantize none nf4]
Writes bench/results/engine.json and bench/results/engine.png.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402
    Stopwatch,
)
from peft import PeftModel  # noqa: E402

from loraplex.adapters.weights import load_adapter_dir  # noqa: E402
from loraplex.server.config import LoRAConfig, ModelConfig  # noqa: E402
from loraplex.server.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402
from loraplex.server.engine.scheduler import SchedulerConfig  # noqa: E402
from loraplex.server.model_loader import load_model  # noqa: E402

BATCH = 16
NUM_ADAPTERS = 16
MAX_RANK = 16
BLOCK_SIZE = 16
ZIPF_S = 1.5
FIRST_TOKEN_ID = 3  # ids 0..2 are the special tokens of the bench tokenizer


@dataclass(frozen=True)
class Workload:
    prompt_min: int
    prompt_max: int
    new_tokens: int
    seed: int = 0

    def prompts(self, vocab: int) -> list[list[int]]:
        rng = random.Random(self.seed)
        lengths = [rng.randint(self.prompt_min, self.prompt_max) for _ in range(BATCH)]
        return [[rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n)] for n in lengths]


def adapter_mixes(names: list[str], seed: int = 0) -> dict[str, list[str]]:
    """Per-request adapter names for the three mixes (BATCH requests each)."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** ZIPF_S for k in range(len(names))]
    return {
        "distinct": [names[i % len(names)] for i in range(BATCH)],
        "skewed": rng.choices(names, weights=weights, k=BATCH),
        "identical": [names[0]] * BATCH,
    }


# ---- our engine -------------------------------------------------------------------------------------------
class OurEngine:
    """One LLMEngine per base dtype, adapters resident in device slots before any timing."""

    def __init__(self, model_dir: Path, quantize: str, adapter_dirs: dict[str, Path], work: Workload) -> None:
        loaded = load_model(ModelConfig(path=model_dir, quantize=quantize, dtype="float32", device="cpu"))
        self.device = loaded.device
        self.work = work
        per_seq = -(-(work.prompt_max + work.new_tokens) // BLOCK_SIZE)
        slots = max(1, len(adapter_dirs))
        cfg = EngineConfig(
            max_model_len=work.prompt_max + work.new_tokens, block_size=BLOCK_SIZE,
            num_kv_blocks=BATCH * per_seq + BATCH,  # every request's whole context, plus slack
            scheduler=SchedulerConfig(max_num_seqs=BATCH, max_batch_tokens=BATCH * work.prompt_max),
            lora=LoRAConfig(max_loras=slots, max_lora_rank=MAX_RANK, max_cpu_loras=slots),
        )
        self.engine = LLMEngine(loaded, cfg, self._loader(adapter_dirs))
        self.params = SamplingParams(max_tokens=work.new_tokens, temperature=0.0, ignore_eos=True)
        self._n = 0

    def _loader(self, dirs: dict[str, Path]) -> Callable[[str], object]:
        return lambda name: load_adapter_dir(dirs[name], self.engine.lora.module_shapes(), max_rank=MAX_RANK)

    def run(self, prompts: list[list[int]], adapters: list[str | None]) -> tuple[float, list[list[int]]]:
        """Tokens/s from the first add_request until every request finished, and each request's tokens."""
        eng, outs = self.engine, {}
        ids = []
        with Stopwatch(self.device) as sw:
            for prompt, adapter in zip(prompts, adapters, strict=True):
                self._n += 1
                ids.append(f"r{self._n}")
                eng.add_request(ids[-1], prompt, self.params, adapter)
            while eng.has_work():
                for o in eng.step():
                    outs.setdefault(o.request_id, []).extend(o.new_token_ids)
                    if o.error:
                        raise RuntimeError(f"request {o.request_id} failed: {o.error}")
                if eng.last_step_tokens == 0:
                    time.sleep(0.001)  # everyone waits on an adapter load (only during warm-up)
        tokens = [outs[i] for i in ids]
        return sum(map(len, tokens)) / sw.seconds, tokens


# ---- HF / PEFT references ---------------------------------------------------------------------------------
class HFGenerate:
    """HF `generate`, one static left-padded batch; wrapped in PEFT when adapters are given."""

    def __init__(self, model_dir: Path, quantize: str, adapter_dirs: dict[str, Path] | None = None) -> None:
        loaded = load_model(ModelConfig(path=model_dir, quantize=quantize, dtype="float32", device="cpu"))
        self.device = loaded.device
        self.model = loaded.model
        if adapter_dirs:
            names = list(adapter_dirs)
            self.model = PeftModel.from_pretrained(loaded.model, str(adapter_dirs[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                self.model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
            self.model.eval()

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], new_tokens: int,
            adapters: list[str] | None = None) -> tuple[float, list[list[int]]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        extra = {"adapter_names": adapters} if adapters is not None else {}
        with Stopwatch(self.device) as sw:
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0, **extra)
        tokens = out[:, width:].tolist()
        return sum(map(len, tokens)) / sw.seconds, tokens
