"""lm-eval's `local-completions` model (what evaluation harnesses point at an OpenAI-compatible server) scores
a small multiple-choice set through loraplex exactly as lm-eval's own Hugging Face model (`HFLM`, with the same
PEFT adapter) scores it in-process: the same loglikelihoods (fp32) and the same greedy flags, so the same
answers."""

from __future__ import annotations

import math
import shutil

import pytest

QUESTIONS = [("The capital of France is", [" Paris", " London", " a cat", " blue"]),
             ("Two plus two equals", [" four", " five", " seven", " the sea"]),
             ("The sky is", [" blue", " green", " loud", " made of cheese"])]


@pytest.fixture(scope="module")
def adapter_path(adapter_dir):
    return adapter_dir("llama", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 51)


@pytest.fixture(scope="module")
def live(server_factory, adapter_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-root")
    shutil.copytree(adapter_path, root / "a1")
    return server_factory("--preload", "a1=a1", adapter_root=root)


def _requests():
    from lm_eval.api.instance import Instance

    pairs = [(context, option) for context, options in QUESTIONS for option in options]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _answers(scores: list[tuple[float, bool]]) -> list[int]:
    per = len(QUESTIONS[0][1])
    return [max(range(per), key=lambda j: scores[q * per + j][0]) for q in range(len(QUESTIONS))]


def test_local_completions_scores_like_hf(live, tiny_model_dir, adapter_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model_dir = str(tiny_model_dir("llama"))
    served = LocalCompletionsAPI(base_url=live.url + "/v1/completions", model="a1", tokenizer=model_dir,
                                 tokenizer_backend="huggingface", max_retries=1, timeout=120)
    ours = served.loglikelihood(_requests())
    direct = HFLM(pretrained=model_dir, peft=str(adapter_path), device="cpu", dtype="float32", batch_size=1)
    theirs = direct.loglikelihood(_requests())
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs, strict=True):
        assert math.isclose(ll, ref_ll, abs_tol=1e-3), (ll, ref_ll)
        assert greedy == ref_greedy
    assert _answers(ours) == _answers(theirs)
