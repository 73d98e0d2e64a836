"""Every request field OpenAI's and vLLM's current completions and chat APIs document is either implemented, with its
effect checked here, or refused with a 400 that names it; unknown fields are refused too, and a short allow-list of
harmless ones is accepted and changes nothing. Also: structured_outputs (json, regex, choice, Lark grammar,
json_object, whitespace_pattern) outputs validate, /tokenize round-trips through /detokenize, /version answers.

The field lists below are copied from the two APIs' references (OpenAI's API reference for /v1/completions and
/v1/chat/completions; vLLM's `CompletionRequest` / `ChatCompletionRequest` in
vllm/entrypoints/openai/{completion,chat_completion}/protocol.py, plus its deprecated guided_* spelling).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable

import httpx
import jsonschema
import pytest
from tiny_models import EOS_ID, EOS_TOKEN

from loraplex.server.api.schemas_openai import (
    _CHAT_NOT_IMPLEMENTED,
    _COMPLETION_NOT_IMPLEMENTED,
    IGNORED,
    ChatCompletionRequest,
    CompletionRequest,
)

from .conftest import ok, post

OPENAI_COMPLETIONS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
}
OPENAI_CHAT = {
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
}
VLLM_BOTH = {
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "watermarking", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "truncation_side", "allowed_token_ids", "prompt_logprobs", "logprob_token_ids",
    "bad_words", "add_special_tokens", "response_format", "structured_outputs", "priority", "request_id",
    "session_id", "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "kv_transfer_params",
    "ec_transfer_params", "vllm_xargs", "repetition_detection", "thinking_token_budget", "stream_interval",
    "routed_experts_prompt_start", "return_token_offsets", "return_mm_kwargs", "logits_processors",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_whitespace_pattern",
    "guided_decoding_backend",
}
VLLM_COMPLETIONS = VLLM_BOTH | {"prompt_embeds"}
VLLM_CHAT = VLLM_BOTH | {
    "best_of", "echo", "add_generation_prompt", "continue_final_message", "documents", "chat_template",
    "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs", "include_reasoning", "reasoning_effort",
}
COMPLETION_FIELDS = OPENAI_COMPLETIONS | VLLM_COMPLETIONS
CHAT_FIELDS = OPENAI_CHAT | VLLM_CHAT
# Our own extensions (LoRAX's per-request merging), checked by test_merge_*.
OWN = {"adapters", "merge_strategy", "density", "majority_sign_method"}

# A value that asks for the feature, for each field this server refuses.
ASKING = {
    "use_beam_search": True, "length_penalty": 0.5, "include_stop_str_in_output": True,
    "spaces_between_special_tokens": False, "truncate_prompt_tokens": 4, "truncation_side": "left",
    "allowed_token_ids": [5, 6], "bad_words": ["the"], "logprob_token_ids": [5], "watermarking": True,
    "priority": 3, "return_tokens_as_token_ids": True, "return_token_ids": True,
    "kv_transfer_params": {"a": 1}, "ec_transfer_params": {"a": 1}, "vllm_xargs": {"a": 1},
    "logits_processors": ["x"], "repetition_detection": {"max_pattern_size": 3}, "thinking_token_budget": 10,
    "routed_experts_prompt_start": 2, "stream_interval": 4, "prompt_embeds": "AAAA", "mm_processor_kwargs": {"a": 1},
    "media_io_kwargs": {"image": {}}, "suffix": "tail", "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "functions": [{"name": "f"}], "function_call": "auto",
    "tool_choice": "required", "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low",
    "verbosity": "low", "web_search_options": {}, "echo": True, "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}", "chat_template_kwargs": {"enable_thinking": False},
    "tools": [{"type": "function", "function": {"name": "f"}}],
}
HARMLESS = {"user": "u-1", "metadata": {"k": "v"}, "service_tier": "auto", "store": False,
            "safety_identifier": "s", "prompt_cache_key": "k", "session_id": "s1", "parallel_tool_calls": True,
            "include_reasoning": True, "return_token_offsets": True, "return_mm_kwargs": False}
GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def live(server_factory, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fields-root")
    shutil.copytree(adapter_dir("llama", 8, ("q_proj", "v_proj"), 5), root / "alpha")
    shutil.copytree(adapter_dir("llama", 8, ("q_proj", "v_proj"), 6), root / "alpha-v2")  # `user`'s check
    return server_factory("--preload", "alpha=alpha", "--served-model-name", "base", adapter_root=root)


# ---- completions: every field's effect --------------------------------------------------------------
def cmp(live, **fields: object) -> dict:
    return ok(live, "/v1/completions", {"model": "base", "prompt": "The sky is", **GREEDY, **fields})


def text(answer: dict, i: int = 0) -> str:
    return answer["choices"][i]["text"]


def ids_of(live, s: str) -> list[int]:
    return ok(live, "/tokenize", {"prompt": s})["tokens"]


def _stream_events(live, body: dict) -> list:
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def _check_model(live, base: dict) -> None:
    assert text(cmp(live, model="alpha")) != text(base)
    body = {"prompt": "The sky is", **GREEDY}
    assert text(ok(live, "/v1/completions", body)) == text(base)  # no model: the served base (vLLM's rule)


def _check_user(live, base: dict) -> None:
    """`user` keys a sticky canary route: under a 50/50 route of two versions of "alpha", each user always lands on
    one version, and 16 users reach both."""
    v1 = httpx.get(live.url + "/v1/adapters/alpha", timeout=30).json()["version"]
    replaced = post(live, "/v1/adapters", {"name": "alpha", "path": "alpha-v2", "replace": True})
    assert replaced.status_code == 200, replaced.text
    v2 = replaced.json()["version"]
    route = httpx.put(live.url + "/v1/adapters/alpha/route", timeout=30,
                      json={"versions": [{"version": v1, "weight": 1}, {"version": v2, "weight": 1}]})
    assert route.status_code == 200, route.text
    try:
        seen = {}
        for user in (f"user-{i}" for i in range(16)):
            got = {post(live, "/v1/completions", {"model": "alpha", "prompt": "The sky is", **GREEDY, "user": user})
                   .headers["x-loraplex-adapter-version"] for _ in range(2)}
            assert len(got) == 1, (user, got)
            seen[user] = got.pop()
        assert set(seen.values()) == {v1, v2}, seen
    finally:  # the other checks use "alpha" as it was
        assert httpx.post(live.url + "/v1/adapters/alpha/rollback", timeout=30).status_code == 200


def _check_best_of(live, base: dict) -> None:
    three = cmp(live, n=3, temperature=1, seed=3, logprobs=0)
    best = cmp(live, best_of=3, temperature=1, seed=3, logprobs=0)
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in three["choices"]]
    assert len(best["choices"]) == 1 and text(best) == text(three, sums.index(max(sums)))


def _check_penalty(name: str) -> Callable:
    def check(live, base: dict) -> None:
        assert text(cmp(live, **{name: 2.0, "max_tokens": 24})) != text(cmp(live, max_tokens=24))
    return check


def _check_logit_bias(live, base: dict) -> None:
    token = ids_of(live, " blue")[-1]
    out = cmp(live, logit_bias={str(token): 100}, max_tokens=4)
    assert text(out) == ok(live, "/detokenize", {"tokens": [token] * 4})["prompt"]


def _check_stop(live, base: dict) -> None:
    word = text(base)[4:7]
    assert text(cmp(live, stop=[word])) == text(base)[: text(base).index(word)]


def _check_stop_token_ids(live, base: dict) -> None:
    token = ids_of(live, " blue")[-1]
    forced = {"logit_bias": {str(token): 100}, "max_tokens": 4}
    assert cmp(live, **forced)["choices"][0]["finish_reason"] == "length"
    out = cmp(live, **forced, stop_token_ids=[token])
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 1


def _check_eos(live, base: dict) -> None:
    eos = {"logit_bias": {str(EOS_ID): 100}, "max_tokens": 5}
    assert cmp(live, **eos, ignore_eos=False)["usage"]["completion_tokens"] == 1
    assert cmp(live, **eos, ignore_eos=True)["usage"]["completion_tokens"] == 5


def _check_min_tokens(live, base: dict) -> None:
    out = cmp(live, logit_bias={str(EOS_ID): 100}, max_tokens=8, ignore_eos=False, min_tokens=3)
    assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["finish_reason"] == "stop"


def _check_skip_special(live, base: dict) -> None:
    eos = {"logit_bias": {str(EOS_ID): 100}, "max_tokens": 2}
    assert EOS_TOKEN not in text(cmp(live, **eos))
    assert text(cmp(live, **eos, skip_special_tokens=False)) == EOS_TOKEN * 2


def _check_add_special(live, base: dict) -> None:
    for flag in (True, False):
        counted = ok(live, "/tokenize", {"prompt": "The sky is", "add_special_tokens": flag})["count"]
        assert cmp(live, add_special_tokens=flag)["usage"]["prompt_tokens"] == counted


def _check_stream_options(live, base: dict) -> None:
    events = _stream_events(live, {"model": "base", "prompt": "The sky is", **GREEDY, "stream": True,
                                   "stream_options": {"include_usage": True}})
    assert events[-1]["usage"]["completion_tokens"] == GREEDY["max_tokens"]


def _check_stream(live, base: dict) -> None:
    events = _stream_events(live, {"model": "base", "prompt": "The sky is", **GREEDY, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == text(base)


def _check_sampled_is_greedy(**fields: object) -> Callable:
    def check(live, base: dict) -> None:
        assert text(cmp(live, temperature=1.0, seed=11, **fields)) == text(base)
    return check


def _check_temperature(live, base: dict) -> None:
    assert text(cmp(live, temperature=1.5, seed=11)) != text(base)
    assert text(cmp(live, temperature=0, seed=11)) == text(base)


def _check_seed(live, base: dict) -> None:
    a, b, c = (text(cmp(live, temperature=1.0, seed=s)) for s in (5, 5, 6))
    assert a == b != c


def _check_cache_salt(live, base: dict) -> None:
    """A prompt's blocks are found again with the same salt only (and the usage says how many tokens)."""
    long = "the quick brown fox jumps over the lazy dog " * 6

    def cached(salt: str) -> int:
        return cmp(live, prompt=long, cache_salt=salt)["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("tenant-a") == 0 and cached("tenant-a") > 0
    assert cached("tenant-b") == 0


def _check_structured(kind: str) -> Callable:
    def check(live, base: dict) -> None:
        validate_structured(live, "/v1/completions", kind)
    return check


COMPLETION_EFFECTS: dict[str, Callable] = {
    "model": _check_model,
    "prompt": lambda live, base: (cmp(live, prompt="A much longer prompt than before")["usage"]["prompt_tokens"]
                                  > base["usage"]["prompt_tokens"]) or pytest.fail("prompt ignored"),
    "best_of": _check_best_of,
    "echo": lambda live, base: text(cmp(live, echo=True)) == "The sky is" + text(base) or pytest.fail("echo"),
    "frequency_penalty": _check_penalty("frequency_penalty"),
    "presence_penalty": _check_penalty("presence_penalty"),
    "repetition_penalty": _check_penalty("repetition_penalty"),
    "logit_bias": _check_logit_bias,
    "logprobs": lambda live, base: len(cmp(live, logprobs=2)["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
    or pytest.fail("logprobs"),
    "max_tokens": lambda live, base: cmp(live, max_tokens=3)["usage"]["completion_tokens"] == 3
    or pytest.fail("max_tokens"),
    "n": lambda live, base: len(cmp(live, n=2)["choices"]) == 2 or pytest.fail("n"),
    "seed": _check_seed,
    "stop": _check_stop,
    "stream": _check_stream,
    "stream_options": _check_stream_options,
    "temperature": _check_temperature,
    "top_p": _check_sampled_is_greedy(top_p=1e-9),
    "top_k": _check_sampled_is_greedy(top_k=1),
    "min_p": _check_sampled_is_greedy(min_p=1.0),
    "stop_token_ids": _check_stop_token_ids,
    "ignore_eos": _check_eos,
    "min_tokens": _check_min_tokens,
    "skip_special_tokens": _check_skip_special,
    "prompt_logprobs": lambda live, base: len(cmp(live, prompt_logprobs=1)["choices"][0]["prompt_logprobs"])
    == base["usage"]["prompt_tokens"] or pytest.fail("prompt_logprobs"),
    "add_special_tokens": _check_add_special,
    "response_format": _check_structured("response_format"),
    "structured_outputs": _check_structured("regex"),
    "request_id": lambda live, base: cmp(live, request_id="my-id-1")["id"] == "cmpl-my-id-1"
    or pytest.fail("request_id"),
    "user": _check_user,
    "cache_salt": _check_cache_salt,
    "guided_json": _check_structured("guided_json"),
    "guided_regex": _check_structured("guided_regex"),
    "guided_choice": _check_structured("guided_choice"),
    "guided_grammar": _check_structured("guided_grammar"),
    "guided_whitespace_pattern": _check_structured("guided_whitespace_pattern"),
    "guided_decoding_backend": lambda live, base: validate_structured(live, "/v1/completions", "guided_regex",
                                                                       guided_decoding_backend="guidance"),
}


def _implemented(model: type) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def test_every_documented_field_is_implemented_refused_or_harmless():
    for model, documented, refused in ((CompletionRequest, COMPLETION_FIELDS, _COMPLETION_NOT_IMPLEMENTED),
                                       (ChatCompletionRequest, CHAT_FIELDS, _CHAT_NOT_IMPLEMENTED)):
        classes = [_implemented(model) - OWN, set(refused) | {"tools"}, set(IGNORED)]
        for name in documented:
            assert sum(name in c for c in classes) >= 1, f"{model.__name__}: {name} is neither implemented, " \
                                                          "refused nor harmless"
        # Nothing implemented here is outside the two APIs (our merge extension aside).
        assert _implemented(model) - OWN <= documented, _implemented(model) - OWN - documented


def test_every_implemented_completion_field_has_its_effect(live):
    base = cmp(live)
    implemented = _implemented(CompletionRequest) - OWN
    assert implemented == set(COMPLETION_EFFECTS), implemented ^ set(COMPLETION_EFFECTS)
    for check in COMPLETION_EFFECTS.values():
        check(live, base)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_refused_fields_get_a_400_naming_them(live, path):
    table = _COMPLETION_NOT_IMPLEMENTED if path == "/v1/completions" else _CHAT_NOT_IMPLEMENTED
    start = {"model": "base", **GREEDY, **({"prompt": "hi"} if path == "/v1/completions"
                                            else {"messages": [{"role": "user", "content": "hi"}]})}
    for name in [*table, *(["tools"] if path != "/v1/completions" else [])]:
        resp = post(live, path, {**start, name: ASKING[name]})
        assert resp.status_code == 400, (name, resp.text)
        error = resp.json()["error"]
        assert name in error["message"] and error["param"] == name, (name, error)
        neutral = table.get(name, ((),))[0]
        if neutral:  # a client filling in the neutral default is not refused
            assert post(live, path, {**start, name: neutral[0]}).status_code == 200, name


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_fields_are_refused_and_harmless_ones_change_nothing(live, path):
    start = {"model": "base", **GREEDY, **({"prompt": "hi"} if path == "/v1/completions"
                                            else {"messages": [{"role": "user", "content": "hi"}]})}
    for name in ("max_token", "temprature", "guided_jsn"):  # misspellings must not pass silently
        resp = post(live, path, {**start, name: 1})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == name, resp.text
        assert "unknown field" in resp.json()["error"]["message"]
    resp = post(live, path, {**start, "stream_options": {"include_usage": True, "usage_everywhere": True}})
    assert resp.status_code == 400 and "stream_options.usage_everywhere" in resp.text
    plain = ok(live, path, start)["choices"][0]
    with_harmless = ok(live, path, {**start, **HARMLESS})["choices"][0]
    assert with_harmless == plain


# ---- chat: the fields only chat has ------------------------------------------------------------------
def chat(live, **fields: object) -> dict:
    return ok(live, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                                             **GREEDY, **fields})


def test_chat_only_fields_have_their_effect(live):
    base = chat(live)
    content = base["choices"][0]["message"]["content"]
    assert chat(live, max_completion_tokens=3, max_tokens=None)["usage"]["completion_tokens"] == 3
    assert chat(live, max_tokens=3)["usage"]["completion_tokens"] == 3
    lp = chat(live, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    assert len(lp) == GREEDY["max_tokens"] and len(lp[0]["top_logprobs"]) == 2
    assert post(live, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                                               "top_logprobs": 2}).status_code == 400  # needs logprobs: true
    no_cue = chat(live, add_generation_prompt=False)
    assert no_cue["usage"]["prompt_tokens"] < base["usage"]["prompt_tokens"]
    prefilled = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well"}]
    cont = chat(live, messages=prefilled, add_generation_prompt=False, continue_final_message=True)
    closed = chat(live, messages=prefilled, add_generation_prompt=False)
    assert cont["usage"]["prompt_tokens"] < closed["usage"]["prompt_tokens"]  # no end-of-turn marker after "Well"
    both = post(live, "/v1/chat/completions", {"model": "base", "messages": prefilled, "continue_final_message": True})
    assert both.status_code == 400 and "add_generation_prompt" in both.text
    named = chat(live, messages=[{"role": "user", "content": "Hi", "name": "ann"}])
    assert named["choices"][0]["message"]["content"] == content  # the template shows no names; accepted
    assert chat(live, request_id="abc")["id"] == "chatcmpl-abc"
    assert len(chat(live, n=2, best_of=3, temperature=1, seed=1)["choices"]) == 2
    validate_structured(live, "/v1/chat/completions", "json_object")
    tool_msg = post(live, "/v1/chat/completions", {
        "model": "base", "messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]})
    assert tool_msg.status_code == 400 and tool_msg.json()["error"]["param"] == "messages.0.tool_calls"


# ---- structured outputs ------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}
CHOICES = ["red", "green", "blue"]
LARK = 'start: "id-" DIGIT DIGIT DIGIT\nDIGIT: /[0-9]/'
REGEX = "[a-c]{3}-[0-9]{2}"


def _constraint(kind: str) -> tuple[dict, Callable[[str], None]]:
    def is_json(out: str) -> None:
        jsonschema.validate(json.loads(out), SCHEMA)

    def matches(pattern: str) -> Callable[[str], None]:
        return lambda out: re.fullmatch(pattern, out) or pytest.fail(f"{out!r} !~ {pattern}")

    return {
        "regex": ({"structured_outputs": {"regex": REGEX}}, matches(REGEX)),
        "json": ({"structured_outputs": {"json": SCHEMA}}, is_json),
        "json_text": ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, is_json),
        "choice": ({"structured_outputs": {"choice": CHOICES}}, lambda out: out in CHOICES or pytest.fail(out)),
        "grammar": ({"structured_outputs": {"grammar": LARK}}, matches("id-[0-9]{3}")),
        "json_object": ({"structured_outputs": {"json_object": True}},
                        lambda out: isinstance(json.loads(out), dict) or pytest.fail(out)),
        "whitespace": ({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": "\n?"}},
                       lambda out: (is_json(out), re.search(r"[ \t]", out) and pytest.fail(repr(out)))),
        "response_format": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                      "schema": SCHEMA}}}, is_json),
        "guided_json": ({"guided_json": SCHEMA}, is_json),
        "guided_regex": ({"guided_regex": REGEX}, matches(REGEX)),
        "guided_choice": ({"guided_choice": CHOICES}, lambda out: out in CHOICES or pytest.fail(out)),
        "guided_grammar": ({"guided_grammar": LARK}, matches("id-[0-9]{3}")),
        "guided_whitespace_pattern": ({"guided_json": SCHEMA, "guided_whitespace_pattern": "\n?"},
                                      lambda out: (is_json(out), re.search(r"[ \t]", out) and pytest.fail(repr(out)))),
    }[kind]


def validate_structured(live, path: str, kind: str, **extra: object) -> None:
    fields, check = _constraint(kind)
    if kind == "json_object":  # any object: a random model may add keys forever; "}" favoured, where allowed
        extra = {"logit_bias": {str(ids_of(live, "}")[-1]): 8}, **extra}
    body = {"model": "base", "max_tokens": 64, "temperature": 1.0, **fields, **extra}
    body |= {"prompt": "Answer:"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Go"}]}
    finished = 0
    for seed in range(3):
        answer = ok(live, path, {**body, "seed": seed})["choices"][0]
        out = answer["text"] if path == "/v1/completions" else answer["message"]["content"]
        if answer["finish_reason"] == "stop":  # cut by max_tokens: valid so far, but incomplete
            check(out)
            finished += 1
    assert finished, f"{kind}: no output finished within {body['max_tokens']} tokens"


@pytest.mark.parametrize("kind", ["regex", "json", "json_text", "choice", "grammar", "json_object", "whitespace"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_structured_outputs_validate(live, path, kind):
    validate_structured(live, path, kind)


@pytest.mark.parametrize(("fields", "param"), [
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "start: ::= 'a'"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a"}, "guided_regex": "b"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": SCHEMA, "disable_additional_properties": True}},
     "structured_outputs.disable_additional_properties"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
    ({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "guided_decoding_backend"),
])
def test_bad_structured_outputs_are_a_400_naming_the_field(live, fields, param):
    resp = post(live, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 4, **fields})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.json()


# ---- tokenize / detokenize / version / models ----------------------------------------------------------
def test_tokenize_round_trips_and_counts_what_generation_counts(live):
    text_in = "Héllo wörld, 你好! The sky is blue."
    for model in ("base", "alpha", None):  # an adapter's tokenizer is the base's
        body = {"prompt": text_in, "return_token_strs": True} | ({"model": model} if model else {})
        tok = ok(live, "/tokenize", body)
        assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 256
        assert ok(live, "/detokenize", {"model": model or "base", "tokens": tok["tokens"]})["prompt"] == text_in
    assert ok(live, "/tokenize", {"prompt": "The sky is"})["count"] == cmp(live)["usage"]["prompt_tokens"]
    messages = [{"role": "user", "content": "Hi"}]
    assert ok(live, "/tokenize", {"messages": messages})["count"] == chat(live)["usage"]["prompt_tokens"]
    for bad, status, param in (({"prompt": "x", "model": "nope"}, 404, "model"), ({}, 400, "prompt"),
                               ({"prompt": "x", "messages": messages}, 400, "prompt")):
        resp = post(live, "/tokenize", bad)
        assert resp.status_code == status and resp.json()["error"]["param"] == param, resp.text
    resp = post(live, "/detokenize", {"tokens": [10**6]})
    assert resp.status_code == 400 and "vocabulary" in resp.text


def test_version_and_model_cards(live):
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", httpx.get(live.url + "/version").json()["version"])
    card = httpx.get(live.url + "/v1/models/base").json()
    assert card["max_model_len"] == 256 and card["sampling_defaults"] == {}
    adapter = httpx.get(live.url + "/v1/models/alpha").json()
    assert adapter["parent"] == "base" and adapter["max_model_len"] == 256
    assert httpx.get(live.url + "/v1/models/nope").status_code == 404


# ---- --generation-config and the context length from the model -----------------------------------------
@pytest.fixture(scope="module")
def model_with_defaults(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-config") / "model"
    shutil.copytree(tiny_model_dir("llama"), out)
    (out / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 1, "max_new_tokens": 5,
                                                            "eos_token_id": EOS_ID}))
    return out


def test_generation_config_supplies_the_defaults_a_request_omits(model_with_defaults, tmp_path):
    from .conftest import start_server

    body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    auto = start_server(model_with_defaults, tmp_path / "auto", None, "--served-model-name", "base",
                        "--max-model-len", "64")
    try:
        answer = ok(auto, "/v1/chat/completions", body)
        assert answer["usage"]["completion_tokens"] == 5  # max_new_tokens (without the file: to the context's end)
        greedy = ok(auto, "/v1/chat/completions", {**body, "temperature": 0, "max_tokens": 5})
        assert answer["choices"][0]["message"] == greedy["choices"][0]["message"]  # temperature 0 from the file
        sampled = ok(auto, "/v1/chat/completions", {**body, "temperature": 1.0, "top_k": 0, "seed": 3})
        assert sampled["usage"]["completion_tokens"] == 5  # the request's own values win, the rest still apply
        assert httpx.get(auto.url + "/v1/models/base").json()["sampling_defaults"] == {
            "temperature": 0.0, "top_k": 1, "max_tokens": 5}
    finally:
        auto.stop()


def test_generation_config_choices(model_with_defaults, tmp_path):
    from loraplex.server.generation_config import check_choice, sampling_defaults

    expected = {"temperature": 0.0, "top_k": 1, "max_tokens": 5}
    assert sampling_defaults("auto", model_with_defaults) == expected
    assert sampling_defaults("vllm", model_with_defaults) == {}  # OpenAI's defaults
    assert sampling_defaults(str(model_with_defaults), None) == expected  # a folder holding the file
    assert sampling_defaults(str(model_with_defaults / "generation_config.json"), None) == expected
    assert sampling_defaults("auto", tmp_path) == {}  # a model without the file
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ValueError, match=r"--generation-config: .*top_p must be a number in \(0, 1\], got 0"):
        sampling_defaults("auto", tmp_path)
    with pytest.raises(ValueError, match="--generation-config: expected auto, vllm or a folder"):
        check_choice(str(tmp_path / "missing"))


def test_max_model_len_defaults_to_the_models_own_capped_by_the_kv_pool(tiny_model_dir, tmp_path, caplog):
    from loraplex.server.cli import build_parser, configs_from_args
    from loraplex.server.runtime import Runtime

    common = ["serve", "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--dtype", "float32",
              "--block-size", "8", "--max-num-seqs", "2"]
    for extra, expected in (([], 512), (["--num-kv-blocks", "40"], 320), (["--max-model-len", "100"], 100)):
        rt = Runtime(configs_from_args(build_parser().parse_args(
            [*common, "--state-dir", str(tmp_path / str(expected)), *extra])))
        caplog.clear()
        with caplog.at_level("INFO"):
            rt.load()
        try:
            assert rt.fatal_error is None and rt.max_model_len == expected  # 512: max_position_embeddings
            logged = "\n".join(r.getMessage() for r in caplog.records)
            assert f"max_model_len {expected}" in logged or f"capped to {expected}" in logged, logged
        finally:
            rt.shutdown()
