"""Shared helpers for engine tests: build an engine over a tiny model with named adapters, and references."""

from __future__ import annotations

import contextlib
import inspect
import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel

from loraplex.adapters.weights import load_adapter_dir
from loraplex.server.config import LoRAConfig, ModelConfig
from loraplex.server.engine.engine import EngineConfig, LLMEngine
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.engine.scheduler import SchedulerConfig
from loraplex.server.model_loader import load_model

MAX_RANK = 16


def make_engine(model_dir: Path, adapters: dict[str, Path], *, max_loras: int = 4, max_cpu_loras: int = 8,
                num_kv_blocks: int = 256, block_size: int = 4, max_num_seqs: int = 16,
                max_batch_tokens: int = 256, max_model_len: int = 256, decode_buckets: bool = False,
                device: str = "cpu", cuda_graphs: bool = True, dtype: str = "float32",
                quantize: str = "none") -> LLMEngine:
    loaded = load_model(ModelConfig(path=model_dir, device=device, dtype=dtype, quantize=quantize))
    holder: dict[str, LLMEngine] = {}

    def loader(name: str):
        return load_adapter_dir(adapters[name], holder["engine"].lora.module_shapes(), max_rank=MAX_RANK)

    cfg = EngineConfig(
        max_model_len=max_model_len, block_size=block_size, num_kv_blocks=num_kv_blocks,
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens),
        lora=LoRAConfig(max_loras=max_loras, max_lora_rank=MAX_RANK, max_cpu_loras=max_cpu_loras),
        decode_buckets=decode_buckets, cuda_graphs=cuda_graphs,
    )
    holder["engine"] = LLMEngine(loaded, cfg, loader)
    return holder["engine"]


def run_to_completion(engine: LLMEngine, timeout_s: float = 120.0) -> dict[str, list]:
    """Step until idle; returns request_id -> list of outputs. Adapter reads are asynchronous, so after a step
    that scheduled nothing (everyone waits on a read) it waits for the host loader's message, as the AsyncEngine
    does."""
    outs: dict[str, list] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not engine.has_work():
            return outs
        step = engine.step()
        for o in step.outputs:
            outs.setdefault(o.request_id, []).append(o)
        if not step.computed:
            wait_for_adapter_news(engine)
    raise AssertionError("engine did not finish")


def wait_for_adapter_news(engine: LLMEngine, timeout_s: float = 1.0) -> None:
    """Block until the next step start has adapter work (a loader result, a due slot copy), bounded."""
    if not engine.adapter_work_pending():
        engine.adapter_port.wait_for_message(timeout_s)


def tokens_of(outputs: list) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


class PeftReference:
    """HF generate / PeftModel one request at a time: the oracle for greedy tokens."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], *, device: str = "cpu", dtype: str = "float32",
                 quantize: str = "none") -> None:
        loaded = load_model(ModelConfig(path=model_dir, device=device, dtype=dtype, quantize=quantize))
        self.device = loaded.device
        self.names = list(adapters)
        self.model = PeftModel.from_pretrained(loaded.model, str(adapters[self.names[0]]), adapter_name=self.names[0])
        for name in self.names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()

    @torch.no_grad()
    def generate(self, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
        """Plain greedy loop with HF's KV cache; EOS neither stops nor is masked (like ignore_eos)."""
        with self._using(adapter):
            return self._greedy(prompt, max_tokens)

    @torch.no_grad()
    def logits_along(self, prompt: list[int], tokens: list[int], adapter: str | None) -> torch.Tensor:
        """[len(tokens), V] fp32: the logits from which each of `tokens` is picked, given the prompt and the
        tokens before it (teacher-forced, one forward without a cache)."""
        ids = torch.tensor([prompt + tokens[:-1]], device=self.device)
        with self._using(adapter):
            logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 :]
        return logits.float()

    def _using(self, adapter: str | None) -> contextlib.AbstractContextManager:
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        ids, cache, out = torch.tensor([prompt], device=self.device), None, []
        # transformers renamed `past_key_values` to `cache` (in and out); the GPU reference machine's 5.17 has
        # the old name.
        name = "cache" if "cache" in inspect.signature(self.model.get_base_model().forward).parameters \
            else "past_key_values"
        for _ in range(max_tokens):
            res = self.model(input_ids=ids, use_cache=True, **{name: cache})
            cache = getattr(res, name)
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]], device=self.device)
        return out


def greedy_gap(ref: PeftReference, prompt: list[int], adapter: str | None, tokens: list[int]) -> float:
    """How far `tokens` are from the reference's greedy choice: the largest, over the steps, of (the reference's
    best logit - its logit for the token picked), teacher-forced on `tokens`. 0: every token is the reference's
    argmax; a small gap: a near tie that another rounding (bf16, a quantized base) may break the other way."""
    logits = ref.logits_along(prompt, tokens, adapter)
    picked = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return float((logits.max(dim=-1).values - picked).max())


def overflowing_adapter(src: Path, dst: Path, factor: float = 1e30) -> Path:
    """A copy of the PEFT adapter at `src` whose LoRA weights are multiplied by `factor`: still finite on disk
    (it registers), but its delta overflows fp32 in the forward, so its rows' logits are non-finite."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: v * factor for k, v in tensors.items()}, dst / "adapter_model.safetensors")
    return dst
