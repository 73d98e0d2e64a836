"""Memory is charged for what is kept (issue 20 items 2 and 12; BAD_INPUTS.md rows 46 and 56).

Before: the whole safetensors file was read into one buffer that the kept lora_A / lora_B tensors viewed, so a
training-only tensor (VeLoRA's embedding: any size, and it compresses to nothing in a tar.gz) stayed in memory for
as long as the adapter did, while `size_bytes` (what --max-cpu-lora-bytes counts) said only A and B. Now only A
and B are read. And a lora_alpha whose scaled B is not finite is refused at registration, not on every request.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapters.errors import AdapterValidationError
from loraplex.adapters.weights import WEIGHTS_NAME, AdapterFiles, load_adapter_dir

CONFIG = "adapter_config.json"
VELORA = "base_model.model.model.layers.0.self_attn.q_proj.lora_velora_embed"


@pytest.fixture(scope="module")
def adapter(adapter_dir) -> Path:
    return adapter_dir("llama", 8, ("q_proj", "v_proj"), 3)


@pytest.fixture(scope="module")
def shapes(tiny_model_dir) -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1].endswith("_proj")}


class CountingFiles(AdapterFiles):
    """Counts the bytes read from the weights file."""

    read = 0

    def open(self, filename: str) -> BinaryIO:
        f = super().open(filename)
        if filename != WEIGHTS_NAME:
            return f
        outer = self

        class Counting:
            def __getattr__(self, name: str):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def read(self, n: int = -1) -> bytes:
                data = f.read(n)
                outer.read += len(data)
                return data

            def readinto(self, buffer) -> int:
                n = f.readinto(buffer)
                outer.read += n
                return n

        return Counting()  # type: ignore[return-value]


def with_extra(adapter: Path, out: Path, extra: dict[str, torch.Tensor], **config: object) -> Path:
    out.mkdir()
    tensors = load_file(adapter / WEIGHTS_NAME) | extra
    save_file(tensors, out / WEIGHTS_NAME)
    raw = json.loads((adapter / CONFIG).read_text()) | config
    (out / CONFIG).write_text(json.dumps(raw))
    return out


def ab_bytes(adapter: Path) -> int:
    return sum(t.numel() * 4 for t in load_file(adapter / WEIGHTS_NAME).values())


def test_a_training_only_tensor_is_never_read_and_size_bytes_is_what_is_held(adapter, shapes, tmp_path):
    # 8 MiB of NaN: reading it would be wasted memory, and checking it would refuse a valid adapter.
    big = with_extra(adapter, tmp_path / "velora", {VELORA: torch.full((2**21,), float("nan"))})
    files = CountingFiles(big)
    weights = load_adapter_dir(files, shapes, max_rank=16)
    assert weights.size_bytes == ab_bytes(adapter)
    assert files.read < weights.size_bytes + 64 * 1024, files.read  # header + A/B; not the 8 MiB
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for m in weights.modules.values() for t in (m.a, m.b)}
    assert sum(held.values()) == weights.size_bytes  # no tensor views a larger buffer


def test_kept_tensors_own_their_buffers_for_every_dtype(adapter, shapes, tmp_path):
    halves = {k: v.to(torch.bfloat16) for k, v in load_file(adapter / WEIGHTS_NAME).items()}
    out = tmp_path / "bf16"
    out.mkdir()
    save_file(halves | {VELORA: torch.zeros(2**20, dtype=torch.bfloat16)}, out / WEIGHTS_NAME)
    (out / CONFIG).write_text((adapter / CONFIG).read_text())
    weights = load_adapter_dir(out, shapes, max_rank=16)
    assert weights.size_bytes == ab_bytes(adapter)
    for module in weights.modules.values():
        assert module.a.dtype == torch.float32 and module.a.untyped_storage().nbytes() == module.a.numel() * 4


@pytest.mark.parametrize("config", [{"lora_alpha": 1e308}, {"lora_alpha": 1e300, "use_rslora": True},
                                    {"lora_alpha": 1e40}], ids=["1e308", "rslora-1e300", "1e40"])
def test_lora_alpha_whose_scaled_weights_are_not_finite_is_refused_naming_it(adapter, shapes, tmp_path, config):
    bad = with_extra(adapter, tmp_path / "alpha", {}, **config)
    with pytest.raises(AdapterValidationError) as err:
        load_adapter_dir(bad, shapes, max_rank=16)
    assert err.value.field == "lora_alpha" and "not finite" in err.value.message, err.value.message


def test_a_large_but_finite_scale_is_accepted(adapter, shapes, tmp_path):
    ok = with_extra(adapter, tmp_path / "ok", {}, lora_alpha=1e6)
    weights = load_adapter_dir(ok, shapes, max_rank=16)
    assert all(math.isfinite(m.scale) for m in weights.modules.values())


def test_a_huge_tensor_name_is_cut_in_the_error(adapter, shapes, tmp_path):
    name = "base_model.model." + "x" * 100_000 + ".lora_A.weight"
    bad = with_extra(adapter, tmp_path / "name", {name: torch.zeros(1)})
    with pytest.raises(AdapterValidationError) as err:
        load_adapter_dir(bad, shapes, max_rank=16)
    assert len(err.value.message) < 500
