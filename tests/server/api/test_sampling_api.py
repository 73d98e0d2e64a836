"""vLLM/OpenAI sampling parity over HTTP: logprobs (completions and chat, streamed and not), echo and
prompt_logprobs, n and best_of, seeds per choice, penalties and logit_bias, TGI's details / top_n_tokens /
decoder_input_details / best_of, and lm-eval's loglikelihood request shape scoring a multiple-choice set
exactly as HF does."""

from __future__ import annotations

import json
import math
import shutil

import httpx
import pytest
import torch

from ..engine_helpers import PeftReference
from .conftest import ok, post

ADAPTER = ("q_proj", "k_proj", "v_proj", "o_proj")
A2 = ("q_proj", "v_proj", "down_proj")
ATOL = 1e-4


@pytest.fixture(scope="module")
def adapter_path(adapter_dir):
    return adapter_dir("llama", 8, ADAPTER, 41)


@pytest.fixture(scope="module")
def live(server_factory, adapter_path, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling-root")
    shutil.copytree(adapter_path, root / "a1")
    shutil.copytree(adapter_dir("llama", 4, A2, 42), root / "a2")
    return server_factory("--preload", "a1=a1", "--preload", "a2=a2", adapter_root=root)


@pytest.fixture(scope="module")
def base(live):
    return httpx.get(live.url + "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_path):
    return PeftReference(tiny_model_dir("llama"), {"a1": adapter_path})


def hf_logprobs(reference, ids: list[int], adapter: str | None) -> torch.Tensor:
    """[len(ids), V]: log_softmax of PEFT's logits at every position (row i predicts ids[i + 1])."""
    with torch.no_grad(), reference._using(adapter):
        return torch.log_softmax(reference.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


# ---- logprobs -------------------------------------------------------------------------------------------
def test_completion_logprobs_equal_peft(live, reference, tokenizer):
    prompt = tokenizer.encode("the quick brown fox")
    body = {"model": "a1", "prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    choice = ok(live, "/v1/completions", body)["choices"][0]
    lp = choice["logprobs"]
    tokens = reference.generate(prompt, "a1", 5)
    expected = hf_logprobs(reference, prompt + tokens, "a1")[len(prompt) - 1 : -1]  # [5, V]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in tokens]
    chosen = expected.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), chosen, atol=ATOL)
    for row, top in zip(expected, lp["top_logprobs"], strict=True):
        values, ids = row.topk(3)
        for token_id, value in zip(ids.tolist(), values.tolist(), strict=True):
            # Keys are token texts (OpenAI's format): of two tokens with one text, the likelier one's.
            text = tokenizer.decode([token_id])
            best = max(v for t, v in enumerate(row.tolist()) if tokenizer.decode([t]) == text)
            assert math.isclose(top[text], max(best, value), abs_tol=ATOL)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_with_logprobs_and_zero_tokens_scores_the_prompt(live, reference, tokenizer):
    prompt = tokenizer.encode("one two three four five")
    body = {"model": "a1", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    choice = ok(live, "/v1/completions", body)["choices"][0]
    assert choice["text"] == tokenizer.decode(prompt) and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(prompt)
    expected = hf_logprobs(reference, prompt, "a1")[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), expected, atol=ATOL)


def test_prompt_logprobs_extension(live, reference, tokenizer, base):
    prompt = tokenizer.encode("hello there general")
    body = {"model": base, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2, "temperature": 0}
    entries = ok(live, "/v1/completions", body)["choices"][0]["prompt_logprobs"]
    expected = hf_logprobs(reference, prompt, None)
    assert entries[0] is None and len(entries) == len(prompt)
    for i, entry in enumerate(entries[1:], start=1):
        mine = entry[str(prompt[i])]
        assert math.isclose(mine["logprob"], expected[i - 1, prompt[i]].item(), abs_tol=ATOL)
        assert mine["rank"] == int((expected[i - 1] > expected[i - 1, prompt[i]]).sum()) + 1
        assert len(entry) in (2, 3)  # the prompt token plus the top 2 (it may be one of them)


def test_chat_logprobs_streamed_and_not(live):
    body = {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    content = ok(live, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - ATOL  # greedy: the chosen is the top
    streamed = []
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    streamed += (choice.get("logprobs") or {}).get("content", [])
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert all(math.isclose(a["logprob"], b["logprob"], abs_tol=ATOL) for a, b in zip(streamed, content,
                                                                                         strict=True))


def test_top_logprobs_without_logprobs_is_400(live):
    body = {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    answer = post(live, "/v1/chat/completions", body)
    assert answer.status_code == 400 and "top_logprobs needs logprobs" in answer.json()["error"]["message"]


# ---- n, best_of, seeds ------------------------------------------------------------------------------------
def test_n_seeded_choices_are_reproducible_and_independent(live):
    body = {"model": "a1", "prompt": "once upon a time", "max_tokens": 8, "temperature": 1.0, "n": 4, "seed": 7,
            "ignore_eos": True}
    first, again = ok(live, "/v1/completions", body), ok(live, "/v1/completions", body)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert texts == [c["text"] for c in again["choices"]]  # reproducible
    assert len(set(texts)) == 4  # independent draws
    single = ok(live, "/v1/completions", {**body, "n": 1})["choices"][0]["text"]
    assert single == texts[0]  # choice 0 draws from the request's own seed
    assert first["usage"]["completion_tokens"] == 32


def test_n_choices_stream_with_their_index(live):
    body = {"model": "a1", "prompt": "once upon a time", "max_tokens": 5, "temperature": 1.0, "n": 2, "seed": 3,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    texts, finished, usage = {0: "", 1: ""}, set(), None
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                finished.add(choice["index"])
    expected = ok(live, "/v1/completions", {**body, "stream": False, "stream_options": None})
    assert [texts[0], texts[1]] == [c["text"] for c in expected["choices"]]
    assert finished == {0, 1} and usage["completion_tokens"] == 10


def test_best_of_returns_the_likeliest_choices(live):
    body = {"model": "a1", "prompt": "the weather", "max_tokens": 6, "temperature": 1.0, "seed": 5,
            "ignore_eos": True, "logprobs": 0}
    candidates = ok(live, "/v1/completions", {**body, "n": 3})["choices"]
    best = ok(live, "/v1/completions", {**body, "n": 1, "best_of": 3})["choices"]
    scores = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in candidates}
    assert len(best) == 1 and best[0]["text"] == max(scores, key=scores.get)


@pytest.mark.parametrize(("body", "message"), [
    ({"n": 3, "best_of": 2}, "best_of (2) must be >= n (3)"),
    ({"n": 1, "best_of": 2, "stream": True}, "best_of > n cannot stream"),
    ({"logit_bias": {"abc": 5}}, "logit_bias: key 'abc' is not a token id"),
])
def test_bad_choice_and_bias_parameters_are_400(live, body, message):
    answer = post(live, "/v1/completions", {"model": "a1", "prompt": "x", "max_tokens": 2, **body})
    assert answer.status_code == 400 and message in answer.json()["error"]["message"], answer.text


# ---- penalties and logit_bias ------------------------------------------------------------------------------
def test_logit_bias_forces_a_token_and_penalties_break_the_repetition(live, tokenizer):
    forced = tokenizer.encode("fox")[-1]
    body = {"model": "a1", "prompt": "the quick", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(forced): 15}}

    def count(extra: dict) -> int:
        answer = ok(live, "/v1/completions", {**body, **extra, "prompt": tokenizer.encode("the quick")})
        return tokenizer.encode(answer["choices"][0]["text"], add_special_tokens=False).count(forced)

    assert count({}) == 12  # the bias alone repeats the token
    # A penalty that grows with each repeat (frequency) or divides the logit (repetition) stops it; a presence
    # penalty alone (one fixed 2.0) cannot outweigh a bias of 15 (its semantics are unit-tested in the sampler).
    assert count({"frequency_penalty": 2.0}) < 12
    assert count({"repetition_penalty": 10.0}) < 12
    assert count({"presence_penalty": 2.0, "frequency_penalty": 2.0}) < count({"frequency_penalty": 2.0}) + 1


# ---- TGI -----------------------------------------------------------------------------------------------------
def test_tgi_details_top_tokens_and_prefill(live, reference, tokenizer):
    body = {"inputs": "the quick brown", "parameters": {"adapter_id": "a1", "max_new_tokens": 3, "details": True,
                                                        "decoder_input_details": True, "top_n_tokens": 2}}
    details = ok(live, "/generate", body)["details"]
    prompt = tokenizer.encode("the quick brown")
    assert [p["id"] for p in details["prefill"]] == prompt and details["prefill"][0]["logprob"] is None
    expected = hf_logprobs(reference, prompt, "a1")
    assert math.isclose(details["prefill"][1]["logprob"], expected[0, prompt[1]].item(), abs_tol=ATOL)
    assert len(details["top_tokens"]) == 3 and all(len(top) == 2 for top in details["top_tokens"])
    assert [t["id"] for t in details["tokens"]] == [top[0]["id"] for top in details["top_tokens"]]  # greedy


def test_tgi_best_of_lists_the_other_sequences(live):
    body = {"inputs": "the weather", "parameters": {"adapter_id": "a1", "max_new_tokens": 4, "do_sample": True,
                                                    "seed": 3, "best_of": 2, "details": True}}
    details = ok(live, "/generate", body)["details"]
    assert len(details["best_of_sequences"]) == 1
    streamed = post(live, "/generate_stream", body)
    assert streamed.status_code == 422 and "cannot stream" in streamed.text


# ---- lm-eval's loglikelihood requests ---------------------------------------------------------------------
QUESTIONS = [("The capital of France is", [" Paris", " London", " a cat", " blue"]),
             ("Two plus two equals", [" four", " five", " seven", " the sea"]),
             ("The sky is", [" blue", " green", " loud", " made of cheese"])]


@pytest.mark.parametrize("max_tokens", [0, 1])  # lm-eval sends 1 (older versions 0) with echo and logprobs
def test_lm_eval_loglikelihood_shape_scores_like_hf(live, reference, tokenizer, max_tokens):
    """What lm-eval's `local-completions` sends for each (context, continuation): token ids, echo, logprobs=1,
    temperature 0; it sums token_logprobs over the continuation and checks is_greedy against top_logprobs."""
    for context, options in QUESTIONS:
        ours, theirs = [], []
        for option in options:
            ctx, cont = tokenizer.encode(context), tokenizer.encode(context + option)[len(tokenizer.encode(context)):]
            ids = ctx + cont
            body = {"model": "a1", "prompt": [ids], "max_tokens": max_tokens, "echo": True, "logprobs": 1,
                    "temperature": 0, "seed": 1234}
            lp = ok(live, "/v1/completions", body)["choices"][0]["logprobs"]
            span = slice(len(ctx), len(ids))
            ours.append(sum(lp["token_logprobs"][span]))
            expected = hf_logprobs(reference, ids, "a1")[:-1]
            theirs.append(sum(expected[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
            greedy_hf = all(expected[i - 1].argmax().item() == ids[i] for i in range(len(ctx), len(ids)))
            greedy_ours = all(max(top, key=top.get) == tok for top, tok in zip(lp["top_logprobs"][span],
                                                                                 lp["tokens"][span], strict=True))
            assert greedy_ours == greedy_hf, (context, option)
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(ours, theirs, strict=True)), (ours, theirs)
        assert ours.index(max(ours)) == theirs.index(max(theirs)), context


# ---- structured output ------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "color", "n"], "additionalProperties": False}


def test_response_format_json_schema_outputs_validate(live):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    body = {"model": "a1", "messages": [{"role": "user", "content": "give me json"}], "max_tokens": 80,
            "temperature": 1.0, "seed": 11, "n": 3, "response_format": fmt}
    for choice in ok(live, "/v1/chat/completions", body)["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_json_object_regex_and_choice_constraints(live, base, tokenizer):
    import re

    # A free-form object has free strings, which a random-weight model never closes: nudge the tokens that close
    # things (the grammar still decides what is allowed), as bench/bench_guided.py does.
    closers = {str(t): 6 for t in range(512) if any(c in tokenizer.decode([t]) for c in '"}')}
    chat = {"model": base, "messages": [{"role": "user", "content": "json please"}], "max_tokens": 120,
            "temperature": 0.8, "seed": 2, "logit_bias": closers}
    content = ok(live, "/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(content["choices"][0]["message"]["content"]), dict)
    completion = {"model": "a1", "prompt": "the code is", "max_tokens": 20, "temperature": 1.0, "seed": 4}
    text = ok(live, "/v1/completions", {**completion, "guided_regex": "[A-Z]{3}-[0-9]{2}"})["choices"][0]["text"]
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", text), text
    options = ["alpha", "beta", "gamma delta"]
    for seed in range(3):
        chosen = ok(live, "/v1/completions", {**completion, "seed": seed, "guided_choice": options})
        assert chosen["choices"][0]["text"] in options


def test_tgi_grammar(live):
    import jsonschema

    body = {"inputs": "json:", "parameters": {"adapter_id": "a1", "max_new_tokens": 80, "do_sample": True,
                                               "seed": 9, "grammar": {"type": "json", "value": SCHEMA}}}
    jsonschema.validate(json.loads(ok(live, "/generate", body)["generated_text"]), SCHEMA)


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "not": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "(unclosed", "guided_choice": ["a"]}, "guided_choice"),
])
def test_bad_structured_output_requests_are_400_naming_the_field(live, extra, param):
    body = {"model": "a1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, **extra}
    answer = post(live, "/v1/chat/completions", body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


# ---- adapter merging per request -----------------------------------------------------------------------------
def test_merged_adapters_over_openai_and_tgi(live, base, tokenizer, tiny_model_dir, adapter_path, adapter_dir):
    prompt = tokenizer.encode("a merged adapter says")
    body = {"model": base, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}

    def text(extra: dict) -> str:
        return ok(live, "/v1/completions", {**body, **extra})["choices"][0]["text"]

    alone = {name: text({"model": name}) for name in ("a1", "a2")}
    # Weight 1 on a1 and 0 on a2 is a1 exactly: the merge is the weighted sum of the deltas, in one forward.
    assert text({"adapters": [{"name": "a1", "weight": 1.0}, {"name": "a2", "weight": 0.0}]}) == alone["a1"]
    half = text({"adapters": [{"name": "a1", "weight": 0.5}, {"name": "a2", "weight": 0.5}]})
    assert half not in (alone["a1"], alone["a2"])
    tgi = {"inputs": tokenizer.decode(prompt), "parameters": {"max_new_tokens": 8, "merged_adapters": {
        "ids": ["a1", "a2"], "weights": [0.5, 0.5], "merge_strategy": "linear"}}}
    assert ok(live, "/generate", tgi)["generated_text"] == half
    ties = text({"adapters": [{"name": "a1", "weight": 0.7}, {"name": "a2", "weight": 0.3}], "merge_strategy": "ties",
                 "density": 0.5})
    # PEFT's own ties merge (ties_svd: the same deltas and combination, then an SVD back to rank 8) is the oracle.
    ref = PeftReference(tiny_model_dir("llama"), {"a1": adapter_path, "a2": adapter_dir("llama", 4, A2, 42)})
    ref.model.add_weighted_adapter(["a1", "a2"], [0.7, 0.3], "ties", combination_type="ties_svd", density=0.5,
                                   majority_sign_method="total")
    assert ties == tokenizer.decode(ref.generate(prompt, "ties", 8), skip_special_tokens=True)


@pytest.mark.parametrize(("extra", "status", "param"), [
    ({"model": "a1", "adapters": [{"name": "a1"}, {"name": "a2"}]}, 400, "model"),
    ({"adapters": [{"name": "a1"}, {"name": "ghost"}]}, 404, "adapters.1.name"),
    ({"adapters": [{"name": "a1"}, {"name": "a1"}]}, 400, "adapters"),
])
def test_bad_merges_name_the_field(live, base, extra, status, param):
    body = {"model": base, "prompt": "x", "max_tokens": 2, **extra}
    answer = post(live, "/v1/completions", body)
    assert answer.status_code == status and answer.json()["error"]["param"].startswith(param), answer.text
