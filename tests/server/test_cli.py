"""`loraplex serve` flags: each default is its config dataclass's default, shown in --help, overridable by env."""

from __future__ import annotations

import dataclasses
import os

import pytest

from loraplex.server.cli import FLAGS, _env_name, build_parser, configs_from_args
from loraplex.server.config import ConnectionLimits, LoRAConfig, ModelConfig, ServerConfig
from loraplex.server.demo import with_demo_adapters
from loraplex.server.engine.engine import EngineConfig
from loraplex.server.engine.scheduler import SchedulerConfig
from loraplex.server.runtime import RuntimeConfig

# flag -> (config dataclass, field) it sets. --log-level configures logging only.
FLAG_FIELDS = {
    "--model": (ModelConfig, "path"),
    "--gguf-file": (ModelConfig, "gguf_file"),
    "--quantize": (ModelConfig, "quantize"),
    "--dtype": (ModelConfig, "dtype"),
    "--device": (ModelConfig, "device"),
    "--served-model-name": (ModelConfig, "served_model_name"),
    "--host": (ServerConfig, "host"),
    "--port": (ServerConfig, "port"),
    "--adapter-root": (ServerConfig, "adapter_root"),
    "--state-dir": (ServerConfig, "state_dir"),
    "--api-key": (ServerConfig, "api_key"),
    "--admin-key": (ServerConfig, "admin_key"),
    "--max-queue": (ServerConfig, "max_queue"),
    "--max-body-bytes": (ServerConfig, "max_body_bytes"),
    "--max-upload-bytes": (ServerConfig, "max_upload_bytes"),
    "--s3-endpoint": (ServerConfig, "s3_endpoint"),
    "--registry": (ServerConfig, "registry"),
    "--registry-poll-seconds": (ServerConfig, "registry_poll_s"),
    "--drain-timeout": (ServerConfig, "drain_timeout_s"),
    "--s3-timeout": (ServerConfig, "s3_timeout_s"),
    "--max-connections": (ConnectionLimits, "max_connections"),
    "--header-timeout": (ConnectionLimits, "header_timeout_s"),
    "--body-timeout": (ConnectionLimits, "body_timeout_s"),
    "--stream-write-timeout": (ConnectionLimits, "stream_write_timeout_s"),
    "--max-loras": (LoRAConfig, "max_loras"),
    "--max-cpu-loras": (LoRAConfig, "max_cpu_loras"),
    "--max-cpu-lora-bytes": (LoRAConfig, "max_cpu_lora_bytes"),
    "--max-lora-rank": (LoRAConfig, "max_lora_rank"),
    "--max-num-seqs": (SchedulerConfig, "max_num_seqs"),
    "--max-batch-tokens": (SchedulerConfig, "max_batch_tokens"),
    "--scheduling-policy": (SchedulerConfig, "policy"),
    "--max-model-len": (ModelConfig, "max_model_len"),  # unset: the model's own (the runtime sets the engine's)
    "--generation-config": (ModelConfig, "generation_config"),
    "--num-kv-blocks": (EngineConfig, "num_kv_blocks"),
    "--block-size": (EngineConfig, "block_size"),
    "--kv-cache-memory": (EngineConfig, "kv_cache_memory"),
    "--gpu-memory-utilization": (EngineConfig, "gpu_memory_utilization"),
}


@pytest.fixture(autouse=True)
def _no_loraplex_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("LORAPLEX_")]:
        monkeypatch.delenv(key)


def _serve_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["serve"]


def _field_default(config: type, name: str) -> object:
    (f,) = (f for f in dataclasses.fields(config) if f.name == name)
    return f.default


def test_every_flag_default_is_its_config_dataclass_default():
    flags = {flag for flag, *_ in FLAGS}
    assert flags - {"--log-level", "--cuda-graphs", "--prefix-caching"} == set(FLAG_FIELDS)  # on|off: below
    serve = _serve_parser()
    for flag, (config, name) in FLAG_FIELDS.items():
        assert serve.get_default(flag.lstrip("-").replace("-", "_")) == _field_default(config, name), flag


def test_engine_and_scheduler_defaults_written_in_the_cli_are_their_dataclass_defaults():
    # cli.py spells them out so that --help never imports torch.
    from loraplex.server.cli import ENGINE_DEFAULTS, SCHEDULER_DEFAULTS

    for name, value in ENGINE_DEFAULTS.items():
        assert value == (None if name == "max_model_len" else _field_default(EngineConfig, name)), name
    for name, value in SCHEDULER_DEFAULTS.items():
        assert value == _field_default(SchedulerConfig, name), name


def test_help_answers_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from loraplex.server.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_flags_build_the_default_configs():
    cfg = configs_from_args(build_parser().parse_args(["serve"]))
    # No --max-model-len: the model config says "the model's own", the engine keeps its default until the model
    # is loaded (Runtime sets it then).
    model = ModelConfig()
    # No --model: the demo, with its adapters preloaded when they are built (server/demo.py).
    assert cfg == RuntimeConfig(model, EngineConfig(), with_demo_adapters(ServerConfig()))
    with_model = configs_from_args(build_parser().parse_args(["serve", "--model", "m"]))
    assert with_model.server == ServerConfig()


def test_help_shows_each_default_and_env_var():
    text = " ".join(_serve_parser().format_help().split())
    for flag, _, default, _ in FLAGS:
        assert f"(env {_env_name(flag)}; default {default})" in text, flag


def test_env_vars_override_defaults(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_LORAS", "3")
    monkeypatch.setenv("LORAPLEX_STATE_DIR", "/tmp/elsewhere")
    monkeypatch.setenv("LORAPLEX_DRAIN_TIMEOUT", "2.5")
    cfg = configs_from_args(build_parser().parse_args(["serve"]))
    assert cfg.engine.lora.max_loras == 3
    assert str(cfg.server.state_dir) == "/tmp/elsewhere"
    assert cfg.server.drain_timeout_s == 2.5
    # A flag still wins over its env var.
    assert configs_from_args(build_parser().parse_args(["serve", "--max-loras", "5"])).engine.lora.max_loras == 5


def test_cuda_graphs_is_on_or_off_and_defaults_to_the_config():
    default = "on" if _field_default(EngineConfig, "cuda_graphs") else "off"
    assert _serve_parser().get_default("cuda_graphs") == default
    assert configs_from_args(build_parser().parse_args(["serve", "--cuda-graphs", "off"])).engine.cuda_graphs is False
    with pytest.raises(ValueError, match="--cuda-graphs: expected on or off, got 'maybe'"):
        configs_from_args(build_parser().parse_args(["serve", "--cuda-graphs", "maybe"]))


def test_a_bad_env_value_or_log_level_is_a_usage_error_naming_the_flag(monkeypatch, capsys):
    from loraplex.server.cli import main

    monkeypatch.setenv("LORAPLEX_PORT", "abc")
    build_parser().parse_args(["generate", "hi"])  # other verbs do not even look at it
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve"])
    assert exc.value.code == 2 and "argument --port: invalid int value: 'abc'" in capsys.readouterr().err
    monkeypatch.delenv("LORAPLEX_PORT")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--log-level", "loud"])
    assert exc.value.code == 2 and "--log-level: expected one of debug, info" in capsys.readouterr().err


def test_registry_flags_build_the_server_config_and_refuse_bad_values(monkeypatch):
    args = ["serve", "--model", "m", "--registry", "s3://fleet/prod", "--registry-poll-seconds", "0.5"]
    cfg = configs_from_args(build_parser().parse_args(args))
    assert cfg.server.registry == "s3://fleet/prod" and cfg.server.registry_poll_s == 0.5
    monkeypatch.setenv("LORAPLEX_REGISTRY", "s3://from-env/x")
    assert configs_from_args(build_parser().parse_args(["serve", "--model", "m"])).server.registry == "s3://from-env/x"
    for bad, message in ((["--registry", "/some/dir"], "--registry: expected s3://bucket/prefix"),
                         (["--registry-poll-seconds", "0"], "--registry-poll-seconds: must be > 0")):
        with pytest.raises(ValueError, match=message):
            configs_from_args(build_parser().parse_args(["serve", "--model", "m", *bad]))


def test_kv_flags_reach_the_engine_config_and_are_validated(monkeypatch):
    monkeypatch.setenv("LORAPLEX_GPU_MEMORY_UTILIZATION", "0.8")
    cfg = configs_from_args(build_parser().parse_args(["serve", "--kv-cache-memory", "1000000"]))
    assert (cfg.engine.kv_cache_memory, cfg.engine.gpu_memory_utilization) == (1_000_000, 0.8)
    with pytest.raises(ValueError, match="--gpu-memory-utilization: must be in"):
        configs_from_args(build_parser().parse_args(["serve", "--gpu-memory-utilization", "0"]))
