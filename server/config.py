"""Frozen, validated configs, one per concern. Built once from CLI flags / env, passed into constructors.

Runtime state is never written back into a config. Validation raises ValueError naming the flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.server.generation_config import check_choice

QUANTIZE_CHOICES = ("none", "nf4", "int8")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _require(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{flag}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """What base model to load and how. `path=None` means the built-in demo model; `path` may be a HF model
    dir, a GGUF file, or a dir holding the GGUF file `gguf_file`."""

    path: Path | None = None
    gguf_file: str | None = None
    quantize: str = "none"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # None: the model's own context length (capped by the KV pool)
    served_model_name: str | None = None
    generation_config: str = "auto"  # auto | vllm | a folder (or file) holding generation_config.json

    def __post_init__(self) -> None:
        _require(self.quantize in QUANTIZE_CHOICES, "--quantize", f"must be one of {QUANTIZE_CHOICES}")
        _require(self.dtype in DTYPE_CHOICES, "--dtype", f"must be one of {DTYPE_CHOICES}")
        _require(self.device in DEVICE_CHOICES, "--device", f"must be one of {DEVICE_CHOICES}")
        _require(self.max_model_len is None or self.max_model_len > 0, "--max-model-len", "must be > 0")
        _require(self.gguf_file is None or self.path is not None, "--gguf-file",
                 "needs --model DIR (the dir holding it)")
        check_choice(self.generation_config)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA capacity: device slots per layer, the largest rank a slot holds, and the host tier's bounds
    (adapters kept in CPU memory, by count and by bytes: whichever binds first)."""

    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int = 32
    max_cpu_lora_bytes: int = 2 * 2**30

    def __post_init__(self) -> None:
        _require(self.max_loras >= 1, "--max-loras", "must be >= 1")
        _require(self.max_lora_rank >= 1, "--max-lora-rank", "must be >= 1")
        _require(self.max_cpu_loras >= self.max_loras, "--max-cpu-loras", "must be >= --max-loras")
        _require(self.max_cpu_lora_bytes >= 1, "--max-cpu-lora-bytes", "must be >= 1 (a byte budget)")


@dataclass(frozen=True)
class ConnectionLimits:
    """What the HTTP server enforces per connection (server/api/connections.py): an open-connection cap, deadlines
    for a request's headers and for each pause in its body, and for a response write the client does not read."""

    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    stream_write_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _require(self.max_connections >= 1, "--max-connections", "must be >= 1")
        _require(self.header_timeout_s > 0, "--header-timeout", "must be > 0 seconds")
        _require(self.body_timeout_s > 0, "--body-timeout", "must be > 0 seconds")
        _require(self.stream_write_timeout_s > 0, "--stream-write-timeout", "must be > 0 seconds")


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings: where to listen, keys, limits, where adapters may come from."""

    host: str = "127.0.0.1"
    port: int = 8000
    adapter_root: Path | None = None
    state_dir: Path = Path("state")
    api_key: str | None = None
    admin_key: str | None = None
    preload: tuple[tuple[str, str], ...] = ()
    # The built-in demo's adapters (set by server/demo.py, not a flag): registered from this folder as copies,
    # outside --adapter-root's confinement, which stays off unless the user sets it.
    demo_adapters: Path | None = None
    max_queue: int = 256  # admitted-but-unfinished requests beyond which we answer 429
    max_body_bytes: int = 4 * 2**20  # JSON request bodies
    max_upload_bytes: int = 2 * 2**30  # adapter uploads
    s3_endpoint: str | None = None
    registry: str | None = None  # s3://bucket/prefix shared by replicas; None: the registry in state_dir
    registry_poll_s: float = 2.0
    drain_timeout_s: float = 30.0
    connections: ConnectionLimits = ConnectionLimits()
    s3_timeout_s: float = 30.0  # one S3 operation (a registration's download, a manifest change), retries included

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, "--port", "must be in 1..65535")
        _require(self.max_queue >= 1, "--max-queue", "must be >= 1")
        _require(self.max_body_bytes >= 1024, "--max-body-bytes", "must be >= 1024")
        _require(self.registry is None or self.registry.startswith("s3://"), "--registry",
                 f"expected s3://bucket/prefix (unset: the registry in --state-dir), got {self.registry!r}")
        _require(self.registry_poll_s > 0, "--registry-poll-seconds", "must be > 0")
        _require(self.s3_timeout_s > 0, "--s3-timeout", "must be > 0 seconds")
        for name, path in self.preload:
            _require(bool(name) and bool(path), "--preload", f"expects NAME=PATH, got {name}={path}")
