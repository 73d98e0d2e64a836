"""Shared fixtures: tiny seeded models per family, their tokenizer, and seeded PEFT adapters.

Everything is built locally once per session (no hub). Heavy imports (transformers, peft) happen inside
the fixtures so test files that never ask for a model do not pay for them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from loraplex.adapters.targets import ATTENTION_TARGETS

# Without CUDA, Triton kernels run under Triton's interpreter. The switch is read when a kernel is decorated,
# so it must be set before anything imports triton (peft -> bitsandbytes does): else triton's own jit helpers
# (tl.sum, tl.zeros, ...) stay compiled-only and interpreted kernels cannot call them.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ATTENTION = ATTENTION_TARGETS


def load_test_helper(relative: str):  # -> the module
    """tests/ is not a package (pytest --import-mode=importlib): load a helper module by its path under tests/."""
    import importlib.util
    import sys

    path = Path(__file__).parent / relative
    spec = importlib.util.spec_from_file_location(f"loraplex_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def test_helper() -> Callable[[str], object]:
    """`test_helper("deploy/nginx_server.py")`: a helper module under tests/, for test files to use."""
    return load_test_helper


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto_server) on loopback for the session, with dummy AWS credentials in
    the environment (restored afterwards)."""
    helper = load_test_helper("s3_server.py")
    saved = {key: os.environ.get(key) for key in helper.DUMMY_AWS_ENV}
    os.environ.update(helper.DUMMY_AWS_ENV)
    server = helper.start_s3_server()
    try:
        yield server.endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def family_seed(family: str) -> int:
    """A fixed weight seed per family, distinct so that llama and mistral (same shape) differ."""
    from tiny_models import FAMILIES

    return FAMILIES.index(family)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model_dir(family="llama") -> Path`: a tiny seeded model dir, built once per family."""
    from tiny_models import build_model_dir

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in built:
            built[family] = build_model_dir(root / family, family, seed=family_seed(family))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tokenizer():  # -> PreTrainedTokenizerFast (the tiny models' tokenizer, vocab 512)
    from tiny_models import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Callable[[str], Path]) -> Callable[..., Path]:
    """`adapter_dir(family, rank, targets, seed, alpha=None, use_rslora=False, use_dora=False,
    ensure_weight_tying=False) -> Path`, cached per args."""
    from synthetic_adapters import make_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    built: dict[tuple, Path] = {}

    def get(
        family: str = "llama",
        rank: int = 8,
        targets: Sequence[str] = ATTENTION,
        seed: int = 0,
        alpha: float | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        ensure_weight_tying: bool = False,
    ) -> Path:
        key = (family, rank, tuple(targets), seed, alpha, use_rslora, use_dora, ensure_weight_tying)
        if key not in built:
            out = root / f"adapter-{len(built)}"
            built[key] = make_peft_adapter(
                tiny_model_dir(family),
                out,
                rank=rank,
                alpha=alpha,
                target_modules=tuple(targets),
                seed=seed,
                use_rslora=use_rslora,
                use_dora=use_dora,
                ensure_weight_tying=ensure_weight_tying,
            )
        return built[key]

    return get


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread for the test, then restore the setting.

    Tiny models gain nothing from a second thread, and on the shared 2-core machines OpenMP's barrier
    waits under CPU steal made a 64-step greedy loop 5-35x slower (0.2 s → up to 9 s, measured).
    Opt in per module: `pytestmark = pytest.mark.usefixtures("single_torch_thread")`.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `@pytest.mark.gpu` tests on machines without CUDA (torch imported only when one exists); lift the
    per-test timeout for --sim-long (100,000 scenarios take about an hour)."""
    if config.getoption("--sim-long"):
        for item in items:
            if "sim" in item.nodeid:
                item.add_marker(pytest.mark.timeout(0))
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


def pytest_addoption(parser: pytest.Parser) -> None:
    """The engine simulation's knobs (tests/sim): how many seeded scenarios, and replaying one."""
    group = parser.getgroup("loraplex engine simulation")
    group.addoption("--sim-scenarios", type=int, default=2000, help="seeded scenarios per run (CI: 2000)")
    group.addoption("--sim-long", action="store_true", help="run 100,000 seeded scenarios")
    group.addoption("--sim-seed", type=int, default=None, help="replay the scenario of this seed, verbosely")
    group.addoption("--sim-first-seed", type=int, default=0, help="the first seed of a seeded run")
    group.addoption("--sim-replay", default=None, help="replay a shrunk (hypothesis) scenario: its draws")
