"""BAD_INPUTS rows 33-44 over HTTP, each beside another tenant's long request (DESIGN "Isolation").

The engine is held through its test hooks, so every odd or bad request is queued while the long request is
mid-generation and they run in the same steps: by construction, not by timing. The long request must end
with exactly the text it produces alone; no answer is a 5xx (row 44, a fault inside a step, excepted: there
the step's own requests get a clear 500 and the next request is served).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from ..engine_helpers import overflowing_adapter
from .engine_hooks import allow_steps, engine_state, held, wait_queued, wait_until
from .test_lifecycle import data_lines, raw_post, read_to_end

COMPLETIONS = "/v1/completions"
LONG = {"model": "good", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
ODD_PROMPT = "The weather today"


@dataclass(frozen=True)
class Case:
    row: str
    status: int
    payload: dict | None = None
    raw: bytes | None = None  # sent as the body as is (not valid JSON text)
    words: tuple[str, ...] = ()  # the error message must name these
    greedy: bool = False  # the answer must equal plain greedy decoding of ODD_PROMPT
    path: str = COMPLETIONS
    extra: dict = field(default_factory=dict)

    @property
    def queued(self) -> bool:  # accepted, so it reaches the engine and runs beside the long request
        return self.status == 200 or self.row.startswith("39")


def odd(**fields) -> dict:
    return {"model": "loraplex-base", "prompt": ODD_PROMPT, "max_tokens": 8, "ignore_eos": True, **fields}


CASES = [
    Case("33 temperature 1e-45", 200, odd(temperature=1e-45), greedy=True),
    Case("33 temperature 5e-324", 200, odd(temperature=5e-324), greedy=True),
    Case("33 temperature 1e-30", 200, odd(temperature=1e-30), greedy=True),
    Case("33 TGI temperature 1e-45", 200, path="/generate", payload={"inputs": ODD_PROMPT, "parameters": {
        "do_sample": True, "temperature": 1e-45, "max_new_tokens": 8}}),
    Case("34 top_p 5e-324", 200, odd(temperature=1.0, top_p=5e-324), greedy=True),
    Case("35 top_k far above the vocabulary", 200, odd(temperature=1.0, top_k=10**9)),
    Case("36 seed 0", 200, odd(temperature=1.0, seed=0)),
    Case("36 seed -1", 200, odd(temperature=1.0, seed=-1)),
    Case("36 seed 2**63-1", 200, odd(temperature=1.0, seed=2**63 - 1)),
    Case("36 seed 2**64", 422, odd(temperature=1.0, seed=2**64), words=("seed",)),
    Case("37 lone surrogate", 400, raw=b'{"model": "loraplex-base", "prompt": "a\\udcff b", "max_tokens": 4}',
         words=("prompt", "surrogate")),
    Case("37 lone surrogate in chat", 400, path="/v1/chat/completions",
         raw=b'{"model": "loraplex-base", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}',
         words=("messages", "surrogate")),
    Case("37 TGI lone surrogate", 400, path="/generate", raw=b'{"inputs": "\\udfff", "parameters": {}}',
         words=("inputs",)),
    Case("37 invalid UTF-8 bytes", 400, raw=b'{"model": "loraplex-base", "prompt": "\xff\xfe", "max_tokens": 4}',
         words=("prompt", "UTF-8")),
    Case("37 overlong UTF-8 bytes", 400, raw=b'{"model": "loraplex-base", "prompt": "\xc0\xaf", "max_tokens": 4}',
         words=("prompt", "UTF-8")),
    Case("38 token ids outside the vocabulary", 400, odd(prompt=[1, 2, 10**6]), words=("prompt", "vocabulary")),
    Case("39 adapter whose logits overflow", 400, {**odd(temperature=0), "model": "overflow"},
         words=("non-finite", "overflow")),
    Case("40 stop strings", 200, odd(temperature=0, stop=["e", " t", "Z"])),
    Case("41 min_tokens > max_tokens", 422, odd(min_tokens=9), words=("min_tokens",)),
]


@pytest.fixture(scope="module")
def live(server_factory, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation-root")
    good = adapter_dir("llama", 8, ("q_proj", "v_proj"), 21)
    shutil.copytree(good, root / "good")
    overflowing_adapter(good, root / "overflow")
    return server_factory("--preload", "good=good", "--preload", "overflow=overflow", "--max-loras", "2",
                          "--served-model-name", "loraplex-base", adapter_root=root)


def send(live, case: Case) -> httpx.Response:
    if case.raw is not None:
        return httpx.post(live.url + case.path, content=case.raw, timeout=120,
                          headers={"content-type": "application/json"})
    return httpx.post(live.url + case.path, json=case.payload, timeout=120)


def message(resp) -> str:
    err = resp.json()["error"]
    return err["message"] if isinstance(err, dict) else err


def text_alone(live, payload) -> str:
    resp = httpx.post(live.url + COMPLETIONS, json=payload, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_rows_33_to_43_beside_a_long_request(live):
    expected_long = text_alone(live, LONG)
    expected_greedy = text_alone(live, odd(temperature=0))
    queued = sum(c.queued for c in CASES)
    with held(live.url), httpx.stream("POST", live.url + COMPLETIONS, json={**LONG, "stream": True},
                                      timeout=300) as long:
        wait_queued(live.url, waiting=1)
        steps = engine_state(live.url)["steps"]
        allow_steps(live.url, 3)  # the long request is mid-generation when the others arrive
        wait_until(lambda: engine_state(live.url)["steps"] == steps + 3, "three steps of the long request")
        with ThreadPoolExecutor(len(CASES)) as pool:
            futures = [pool.submit(send, live, case) for case in CASES]
            wait_queued(live.url, waiting=queued, running=1)
            gone = raw_post(live, COMPLETIONS, odd(max_tokens=50))  # row 43: leaves while queued
            wait_queued(live.url, waiting=queued + 1, running=1)
            gone.close()
            wait_queued(live.url, waiting=queued, running=1)  # aborted in the queue
            allow_steps(live.url, None)
            answers = [f.result() for f in futures]
        text, chunks = read_to_end(long.iter_lines())
    assert text == expected_long
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    for case, resp in zip(CASES, answers, strict=True):
        assert resp.status_code == case.status, (case.row, resp.text)
        if case.status != 200:
            assert all(w in message(resp) for w in case.words), (case.row, message(resp))
        elif case.greedy:
            assert resp.json()["choices"][0]["text"] == expected_greedy, case.row
    wait_until(lambda: engine_state(live.url) | {"steps": 0} == {"waiting": 0, "running": 0, "steps": 0},
               "the engine idle")


def test_row_44_a_fault_in_a_step_fails_that_step_only(live):
    expected = text_alone(live, LONG)
    with held(live.url), httpx.stream("POST", live.url + COMPLETIONS, json={**LONG, "stream": True},
                                      timeout=300) as streamed, ThreadPoolExecutor(1) as pool:
        plain = pool.submit(httpx.post, live.url + COMPLETIONS, json=LONG, timeout=300)
        wait_queued(live.url, waiting=2)
        assert httpx.post(live.url + "/_test/engine/fail_next_step", timeout=30).status_code == 200
        allow_steps(live.url, None)
        events = list(data_lines(streamed.iter_lines()))
        failed = plain.result()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "injected fault" in error["message"]
    assert failed.status_code == 500 and "injected fault" in message(failed)
    assert text_alone(live, LONG) == expected  # the engine serves the next request
