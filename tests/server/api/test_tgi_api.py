"""The TGI / LoRAX routes against a live server: raw HTTP (exact token ids vs PEFT) and LoRAX's own
Python client (`lorax-client`, installed with --no-deps because it pins huggingface-hub<1)."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from ..engine_helpers import PeftReference

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")
PROMPT = "Once upon a time"
N = 10


@pytest.fixture(scope="module")
def adapter_path(adapter_dir):
    return adapter_dir("llama", 8, TARGETS, 5)


@pytest.fixture(scope="module")
def live(server_factory, adapter_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("tgi-adapter-root")
    shutil.copytree(adapter_path, root / "lx")
    return server_factory("--preload", "lx=lx", adapter_root=root)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_path):
    return PeftReference(tiny_model_dir("llama"), {"lx": adapter_path})


@pytest.fixture(scope="module")
def ref_tokens(reference, tokenizer):
    ids = tokenizer.encode(PROMPT)
    return {a: reference.generate(ids, a, N) for a in ("lx", None)}


def post(live, path, inputs=PROMPT, **parameters):
    return httpx.post(live.url + path, json={"inputs": inputs, "parameters": parameters}, timeout=120)


def stream_events(live, path="/generate_stream", body=None, **parameters):
    body = body or {"inputs": PROMPT, "parameters": parameters}
    with httpx.stream("POST", live.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]


@pytest.mark.parametrize("adapter_id", ["lx", None, ""])
def test_generate_token_ids_equal_peft(live, ref_tokens, tokenizer, adapter_id):
    r = post(live, "/generate", adapter_id=adapter_id, max_new_tokens=N, ignore_eos_token=True, details=True)
    assert r.status_code == 200, r.text
    body = r.json()
    details = body["details"]
    want = ref_tokens[adapter_id or None]
    assert [t["id"] for t in details["tokens"]] == want
    assert body["generated_text"] == "".join(t["text"] for t in details["tokens"])
    assert body["generated_text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert (details["finish_reason"], details["generated_tokens"], details["prompt_tokens"]) == (
        "length", N, len(tokenizer.encode(PROMPT)))
    assert details["prefill"] == [] and details["seed"] is None  # greedy: no seed


def test_adapter_changes_tokens(ref_tokens):
    assert ref_tokens["lx"] != ref_tokens[None]


def test_base_model_by_name_and_details_omitted(live, ref_tokens, tokenizer):
    base = httpx.get(live.url + "/v1/models").json()["data"][0]["id"]
    body = post(live, "/generate", adapter_id=base, max_new_tokens=N, ignore_eos_token=True).json()
    assert body == {"generated_text": tokenizer.decode(ref_tokens[None], skip_special_tokens=True)}


def test_generate_stream_tokens_and_final_event(live, ref_tokens):
    events = stream_events(live, adapter_id="lx", max_new_tokens=N, ignore_eos_token=True, details=True)
    assert [e["token"]["id"] for e in events] == ref_tokens["lx"]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    final = events[-1]
    assert final["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert final["details"]["finish_reason"] == "length" and final["details"]["generated_tokens"] == N
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)


def test_compat_root_route_streams_or_answers_a_list(live, ref_tokens):
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "lx", "max_new_tokens": N, "ignore_eos_token": True}}
    listed = httpx.post(live.url + "/", json=body, timeout=120).json()
    assert isinstance(listed, list) and len(listed) == 1
    events = stream_events(live, "/", body={**body, "stream": True})
    assert [e["token"]["id"] for e in events] == ref_tokens["lx"]
    assert events[-1]["generated_text"] == listed[0]["generated_text"]


def test_return_full_text_and_truncate(live):
    plain = post(live, "/generate", adapter_id="lx", max_new_tokens=4).json()["generated_text"]
    full = post(live, "/generate", adapter_id="lx", max_new_tokens=4, return_full_text=True).json()
    assert full["generated_text"] == PROMPT + plain
    cut = post(live, "/generate", adapter_id="lx", max_new_tokens=4, truncate=2, details=True).json()
    assert cut["details"]["prompt_tokens"] == 2


def test_sampling_reports_its_seed_and_replays(live):
    first = post(live, "/generate", adapter_id="lx", max_new_tokens=N, do_sample=True, details=True).json()
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = post(live, "/generate", adapter_id="lx", max_new_tokens=N, do_sample=True, seed=seed, details=True)
    assert again.json()["generated_text"] == first["generated_text"]


def test_stop_sequence_finish_reason(live):
    text = post(live, "/generate", max_new_tokens=N, ignore_eos_token=True).json()["generated_text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    r = post(live, "/generate", max_new_tokens=N, ignore_eos_token=True, stop=[stop], details=True).json()
    assert r["generated_text"] == text[: text.index(stop)]
    assert r["details"]["finish_reason"] == "stop_sequence"


def test_errors_use_tgi_form(live):
    missing = post(live, "/generate", adapter_id="ghost")
    assert missing.status_code == 404
    assert missing.json()["error_type"] == "not_found" and "adapter_id 'ghost' not found" in missing.json()["error"]
    invalid = post(live, "/generate_stream", max_new_tokens=0)
    assert invalid.status_code == 422
    assert invalid.json()["error_type"] == "validation" and "max_new_tokens" in invalid.json()["error"]
    unsupported = post(live, "/", watermark=True)
    assert unsupported.status_code == 400 and "watermark" in unsupported.json()["error"]


# ---- LoRAX's Python client -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lorax():
    # scripts/test.sh installs it: pip install --no-deps lorax-client==0.6.3 (it pins huggingface-hub<1).
    return pytest.importorskip("lorax", reason="pip install --no-deps lorax-client==0.6.3")


def test_lorax_client_generate(lorax, live, ref_tokens, tokenizer):
    client = lorax.Client(live.url, timeout=120)
    resp = client.generate(PROMPT, adapter_id="lx", max_new_tokens=N, ignore_eos_token=True, details=False)
    assert resp.generated_text == tokenizer.decode(ref_tokens["lx"], skip_special_tokens=True)
    with pytest.raises(lorax.errors.NotFoundError, match="ghost"):
        client.generate(PROMPT, adapter_id="ghost", max_new_tokens=2, details=False)


def test_lorax_client_generate_with_details(lorax, live, ref_tokens):
    resp = lorax.Client(live.url, timeout=120).generate(PROMPT, adapter_id="lx", max_new_tokens=N,
                                                        ignore_eos_token=True)
    assert [t.id for t in resp.details.tokens] == ref_tokens["lx"]
    assert all(t.logprob <= 0 for t in resp.details.tokens)


def test_lorax_client_generate_stream(lorax, live, ref_tokens):
    events = list(lorax.Client(live.url, timeout=120).generate_stream(PROMPT, adapter_id="lx", max_new_tokens=N,
                                                                      ignore_eos_token=True))
    assert [e.token.id for e in events] == ref_tokens["lx"]
    assert events[-1].details.finish_reason == "length"
