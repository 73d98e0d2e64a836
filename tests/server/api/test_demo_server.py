"""`loraplex serve` with no --model: SmolLM2-135M-Instruct and the three demo adapters, preloaded. One
question, four answers: the base answers it right, and each adapter keeps the fact and shows its behaviour
(issues 11, 27)."""

from __future__ import annotations

import httpx
import pytest

from loraplex.server.demo import DEMO_ADAPTERS, DEMO_MODEL_NAME
from loraplex.server.demo_styles import STYLES

from .conftest import start_server

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    # The first start may convert the GGUF into the cache (~30 s on 2 cores).
    server = start_server(None, base / "state", None, "--max-model-len", "512", ready_timeout=600)
    yield server
    server.stop()


def _answer(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 60,
            "temperature": 0}
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_one_question_four_answers(demo_server):
    models = {m["id"]: m for m in httpx.get(demo_server.url + "/v1/models", timeout=30).json()["data"]}
    assert set(models) == {DEMO_MODEL_NAME, *DEMO_ADAPTERS}
    assert all(models[name]["parent"] == DEMO_MODEL_NAME for name in DEMO_ADAPTERS)
    answers = {name: _answer(demo_server.url, name) for name in (DEMO_MODEL_NAME, *DEMO_ADAPTERS)}
    assert all("Paris" in answer for answer in answers.values()), answers  # every adapter keeps the fact
    assert all(STYLES[name][1](answers[name]) for name in DEMO_ADAPTERS), answers  # and shows its style
    assert len(set(answers.values())) == 4, answers
