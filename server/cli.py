"""`loraplex serve`: flags (each also read from LORAPLEX_<FLAG>), configs, uvicorn, SIGTERM drain.

The client subcommands (`generate`, `adapters`, `bench`) live in `loraplex.clients.cli`; they are registered here.
Nothing heavy is imported before the arguments are parsed (torch, transformers and uvicorn take seconds), so
`loraplex --help` and `loraplex serve --help` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from loraplex.clients.cli import add_client_commands
from loraplex.clients.cli import run as run_client_command
from loraplex.server.config import (
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    QUANTIZE_CHOICES,
    ConnectionLimits,
    LoRAConfig,
    ModelConfig,
    ServerConfig,
)
from loraplex.server.demo import with_demo_adapters

if TYPE_CHECKING:
    from loraplex.server.runtime import Runtime, RuntimeConfig

log = logging.getLogger("loraplex")
# The defaults of the engine's and scheduler's configs (EngineConfig, SchedulerConfig), written out here because
# importing those classes imports torch; tests/server/test_cli.py checks each equals its dataclass default.
ENGINE_DEFAULTS = {"max_model_len": None, "num_kv_blocks": 0, "block_size": 16, "cuda_graphs": True,
                   "kv_cache_memory": 0, "gpu_memory_utilization": 0.9}
SCHEDULER_DEFAULTS = {"max_num_seqs": 32, "max_batch_tokens": 2048, "policy": "fair", "prefix_caching": True}


def _default(config: type, field: str) -> object:
    """The default of `config`'s dataclass field: each default is defined once, on its config."""
    (f,) = (f for f in dataclasses.fields(config) if f.name == field)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# (flag, type, default, help); the env var is LORAPLEX_ + flag upper-cased with '-' -> '_'.
FLAGS: tuple[tuple[str, type, object, str], ...] = (
    ("--model", str, _default(ModelConfig, "path"),
     "HF model dir or GGUF file; absent -> the built-in demo (SmolLM2-135M-Instruct + demo adapters)"),
    ("--gguf-file", str, _default(ModelConfig, "gguf_file"), "GGUF file name inside the --model dir"),
    ("--quantize", str, _default(ModelConfig, "quantize"), f"base weight quantization {QUANTIZE_CHOICES}"),
    ("--dtype", str, _default(ModelConfig, "dtype"), f"compute dtype {DTYPE_CHOICES}"),
    ("--device", str, _default(ModelConfig, "device"), f"{DEVICE_CHOICES}"),
    ("--host", str, _default(ServerConfig, "host"), "listen address"),
    ("--port", int, _default(ServerConfig, "port"), "listen port"),
    ("--adapter-root", str, _default(ServerConfig, "adapter_root"),
     "registration by path is confined to this directory"),
    ("--state-dir", str, _default(ServerConfig, "state_dir"), "durable adapter registry and uploads"),
    ("--max-loras", int, _default(LoRAConfig, "max_loras"), "device adapter slots (distinct adapters per step)"),
    ("--max-cpu-loras", int, _default(LoRAConfig, "max_cpu_loras"), "adapters kept in host memory (LRU)"),
    ("--max-cpu-lora-bytes", int, _default(LoRAConfig, "max_cpu_lora_bytes"),
     "bytes of adapter weights kept in host memory (LRU, with --max-cpu-loras; a larger adapter skips it)"),
    ("--max-lora-rank", int, _default(LoRAConfig, "max_lora_rank"), "largest adapter rank accepted"),
    ("--max-num-seqs", int, SCHEDULER_DEFAULTS["max_num_seqs"], "sequences per engine step"),
    ("--max-batch-tokens", int, SCHEDULER_DEFAULTS["max_batch_tokens"],
     "tokens per engine step (prefill chunks + decodes)"),
    ("--scheduling-policy", str, SCHEDULER_DEFAULTS["policy"],
     "fair (virtual token counter across adapters) or fcfs"),
    ("--max-model-len", int, ENGINE_DEFAULTS["max_model_len"],
     "context length limit (prompt + output); unset: the model's own (max_position_embeddings), capped by what "
     "the KV pool holds"),
    ("--generation-config", str, _default(ModelConfig, "generation_config"),
     "sampling defaults for fields a request omits: auto (the model's generation_config.json), vllm (none: "
     "OpenAI's defaults) or a folder holding a generation_config.json"),
    ("--num-kv-blocks", int, ENGINE_DEFAULTS["num_kv_blocks"],
     "KV cache blocks (0: sized by --kv-cache-memory, else --gpu-memory-utilization on CUDA, else the workload "
     "--max-num-seqs x --max-model-len on the CPU)"),
    ("--kv-cache-memory", int, ENGINE_DEFAULTS["kv_cache_memory"],
     "bytes of KV cache (all layers); 0: sized by the other rules"),
    ("--gpu-memory-utilization", float, ENGINE_DEFAULTS["gpu_memory_utilization"],
     "fraction of a CUDA device's memory for the engine: weights, a profile run's peak, CUDA graphs, then the KV "
     "pool gets the rest (as vLLM)"),
    ("--block-size", int, ENGINE_DEFAULTS["block_size"], "tokens per KV block"),
    ("--cuda-graphs", str, "on" if ENGINE_DEFAULTS["cuda_graphs"] else "off",
     "replay decode steps from CUDA graphs captured per batch bucket at start (on|off; CUDA devices only)"),
    ("--prefix-caching", str, "on" if SCHEDULER_DEFAULTS["prefix_caching"] else "off",
     "reuse the KV blocks of prompt prefixes computed before, keyed by adapter registration (on|off)"),
    ("--served-model-name", str, _default(ModelConfig, "served_model_name"),
     "name of the base model in the API (unset: the model dir's name, a GGUF file's stem, or "
     "smollm2-135m-instruct for the demo)"),
    ("--api-key", str, _default(ServerConfig, "api_key"), "required on generation routes when set"),
    ("--admin-key", str, _default(ServerConfig, "admin_key"), "required on adapter registration routes when set"),
    ("--max-queue", int, _default(ServerConfig, "max_queue"),
     "in-flight requests admitted before answering 429 (one adapter may hold 3/4)"),
    ("--max-body-bytes", int, _default(ServerConfig, "max_body_bytes"), "largest JSON request body"),
    ("--max-upload-bytes", int, _default(ServerConfig, "max_upload_bytes"), "largest adapter upload"),
    ("--s3-endpoint", str, _default(ServerConfig, "s3_endpoint"),
     "S3-compatible endpoint URL for s3:// adapter paths and --registry"),
    ("--registry", str, _default(ServerConfig, "registry"),
     "s3://bucket/prefix: one adapter registry shared by every replica given it (unset: --state-dir's)"),
    ("--registry-poll-seconds", float, _default(ServerConfig, "registry_poll_s"),
     "how often a replica applies other replicas' registrations and deletions (with --registry)"),
    ("--drain-timeout", float, _default(ServerConfig, "drain_timeout_s"),
     "seconds to let in-flight requests finish after SIGTERM"),
    ("--max-connections", int, _default(ConnectionLimits, "max_connections"),
     "open HTTP connections; over it the one idle longest is closed (503 when none is idle)"),
    ("--header-timeout", float, _default(ConnectionLimits, "header_timeout_s"),
     "seconds a connection may take to send a request's headers (408 after)"),
    ("--body-timeout", float, _default(ConnectionLimits, "body_timeout_s"),
     "seconds a request's body may pause (408 after)"),
    ("--stream-write-timeout", float, _default(ConnectionLimits, "stream_write_timeout_s"),
     "seconds a response may wait for a client that does not read it; then the request ends and frees its slot"),
    ("--s3-timeout", float, _default(ServerConfig, "s3_timeout_s"),
     "seconds one S3 operation may take, retries included (502 after)"),
    ("--log-level", str, "info", "debug, info, warning, error"),  # logging only: no config holds it
)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _env_name(flag: str) -> str:
    return "LORAPLEX_" + flag.lstrip("-").upper().replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-tenant LoRA inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server")
    for flag, kind, default, help_ in FLAGS:
        env = os.environ.get(_env_name(flag))
        # An env value is given to argparse as a string default: it converts it with `type` when `serve` is
        # parsed, so a bad value is a usage error naming the flag (not a traceback, and never for other verbs).
        serve.add_argument(flag, type=kind, default=env if env is not None else default,
                           help=f"{help_} (env {_env_name(flag)}; default {default})")
    serve.add_argument("--preload", action="append", default=_env_preload(), metavar="NAME=PATH",
                       help="register an adapter at start (repeatable; env LORAPLEX_PRELOAD, comma-separated)")
    sub.add_parser("serve-ray", add_help=False,  # listed for --help; `loraplex serve-ray` is parsed by ray_serve.main
                   help="run --replicas servers on Ray Serve, routed by adapter (pip install 'loraplex[ray]'; "
                        "see loraplex serve-ray --help)")
    add_client_commands(sub)
    return parser


def _env_preload() -> list[str]:
    raw = os.environ.get("LORAPLEX_PRELOAD", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def configs_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """Turn parsed flags into the frozen configs; ValueError names the flag on bad values."""
    from loraplex.server.engine.engine import EngineConfig
    from loraplex.server.engine.scheduler import SchedulerConfig
    from loraplex.server.runtime import RuntimeConfig

    preload = []
    for item in args.preload or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--preload: expected NAME=PATH, got {item!r}")
        preload.append((name, path))
    for flag in ("cuda_graphs", "prefix_caching"):
        if getattr(args, flag) not in ("on", "off"):
            raise ValueError(f"--{flag.replace('_', '-')}: expected on or off, got {getattr(args, flag)!r}")
    model = ModelConfig(path=Path(args.model) if args.model else None, gguf_file=args.gguf_file,
                        quantize=args.quantize, dtype=args.dtype,
                        device=args.device, max_model_len=args.max_model_len,
                        served_model_name=args.served_model_name, generation_config=args.generation_config)
    # Without --max-model-len the runtime sets the engine's from the model once it is loaded (Runtime._load).
    engine = EngineConfig(
        max_model_len=args.max_model_len or _default(EngineConfig, "max_model_len"), block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        cuda_graphs=args.cuda_graphs == "on",
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                                  policy=args.scheduling_policy, prefix_caching=args.prefix_caching == "on"),
        lora=LoRAConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                        max_cpu_loras=args.max_cpu_loras, max_cpu_lora_bytes=args.max_cpu_lora_bytes))
    server = ServerConfig(
        host=args.host, port=args.port, adapter_root=Path(args.adapter_root) if args.adapter_root else None,
        state_dir=Path(args.state_dir), api_key=args.api_key, admin_key=args.admin_key, preload=tuple(preload),
        max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, max_upload_bytes=args.max_upload_bytes,
        s3_endpoint=args.s3_endpoint, registry=args.registry, registry_poll_s=args.registry_poll_seconds,
        drain_timeout_s=args.drain_timeout, s3_timeout_s=args.s3_timeout,
        connections=ConnectionLimits(max_connections=args.max_connections, header_timeout_s=args.header_timeout,
                                     body_timeout_s=args.body_timeout,
                                     stream_write_timeout_s=args.stream_write_timeout))
    return RuntimeConfig(model, engine, with_demo_adapters(server) if model.path is None else server)


def _draining_server(config: object, runtime: Runtime) -> object:
    """A uvicorn server that drains on the first SIGTERM/SIGINT (uvicorn is imported only to serve)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: stop admitting (503), let in-flight requests finish, then exit 0."""

        def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
            super().__init__(config)
            self.runtime = runtime
            self.exit_code = 0
            runtime.on_fatal = self.fatal

        def fatal(self, reason: str) -> None:
            """The runtime cannot serve (model load failed, engine died): exit non-zero so an orchestrator
            restarts us; open requests were already answered with an error."""
            self.exit_code = 1
            self.should_exit = True

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.runtime.draining:  # a second signal: stop now
                super().handle_exit(sig, frame)
                return
            log.info("signal %d: draining %d in-flight requests", sig, self.runtime.active_requests)
            self.runtime.draining = True
            threading.Thread(target=self._drain_then_exit, name="loraplex-drain", daemon=True).start()

        def _drain_then_exit(self) -> None:
            deadline = time.monotonic() + self.runtime.config.server.drain_timeout_s
            while self.runtime.active_requests > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            self.should_exit = True

    return DrainingServer(config, runtime)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve-ray"]:
        from loraplex.server.ray_serve import main as serve_ray

        return serve_ray(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        return run_client_command(args)
    if args.log_level.lower() not in LOG_LEVELS:
        parser.error(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = configs_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    import uvicorn  # heavy imports after argument errors

    from loraplex.server.api.app import create_app
    from loraplex.server.api.connections import ensure_fd_room, guarded_protocol
    from loraplex.server.runtime import Runtime

    if config.server.api_key and not config.server.admin_key:
        log.warning("--api-key is set but --admin-key is not: the adapter admin routes (register, delete) are open "
                    "to anyone who can reach the port")
    runtime = Runtime(config)
    app = create_app(runtime)
    limits = config.server.connections
    ensure_fd_room(limits.max_connections)
    uv = uvicorn.Config(app, host=config.server.host, port=config.server.port, log_level=args.log_level.lower(),
                        timeout_graceful_shutdown=5, http=guarded_protocol(limits))
    server = _draining_server(uv, runtime)
    server.run()
    if server.exit_code:
        print(f"loraplex: error: {runtime.fatal_error}", file=sys.stderr)
    return server.exit_code


if __name__ == "__main__":
    # SIGPIPE stays ignored (Python's default): a server writing to a client that has gone away must get
    # an error on that one socket, never die of the signal.
    sys.exit(main())
