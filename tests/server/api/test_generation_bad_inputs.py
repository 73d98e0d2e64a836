"""Every Generation row of BAD_INPUTS.md (20-30; 31 and 32 need their own servers: test_lifecycle.py),
then schemathesis over the whole OpenAPI schema: no input the schema allows (or nearly allows) gets a 5xx.

One server for the module: --api-key (row 30), a small --max-body-bytes (row 29), a short --max-model-len
(rows 22/23, and short generations for schemathesis).
"""

from __future__ import annotations

import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

KEY = "gen-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_LEN = 32
MAX_BODY = 4096
OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions")
TGI_ROUTES = ("/generate", "/generate_stream", "/")


@pytest.fixture(scope="module")
def live(server_factory, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs-root")
    shutil.copytree(adapter_dir("llama", 8, ("q_proj", "v_proj"), 3), root / "a1")
    return server_factory("--preload", "a1=a1", "--api-key", KEY, "--max-body-bytes", str(MAX_BODY),
                          "--max-model-len", str(MAX_LEN), adapter_root=root)


def call(live, path, body=None, *, content=None, headers=AUTH):
    kwargs = {"content": content} if content is not None else {"json": body}
    return httpx.post(live.url + path, headers={"content-type": "application/json", **headers}, timeout=60,
                      **kwargs)


def message(resp) -> str:
    """The error text of either dialect: OpenAI {"error": {"message"}} or TGI {"error"}."""
    err = resp.json()["error"]
    return err["message"] if isinstance(err, dict) else err


def openai_body(path, **fields):
    """A body for `path`; `prompt` goes to completions only, `messages` to chat only (the other is an unknown
    field there, refused)."""
    base = {"model": "a1", "max_tokens": 2}
    if path.endswith("chat/completions"):
        fields.pop("prompt", None)
        return {**base, "messages": [{"role": "user", "content": "hi"}], **fields}
    fields.pop("messages", None)
    return {**base, "prompt": "hi", **fields}


def assert_error(resp, status, *words):
    assert resp.status_code == status, resp.text
    text = message(resp)
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"


# ---- row 20: unknown model / adapter_id ----------------------------------------------------------
@pytest.mark.parametrize("path", OPENAI_ROUTES)
def test_20_unknown_model_openai(live, path):
    resp = call(live, path, openai_body(path, model="missing-adapter"))
    assert_error(resp, 404, "missing-adapter")
    assert resp.json()["error"]["param"] == "model"


@pytest.mark.parametrize("path", TGI_ROUTES)
def test_20_unknown_adapter_id_tgi(live, path):
    resp = call(live, path, {"inputs": "hi", "parameters": {"adapter_id": "missing-adapter"}})
    assert_error(resp, 404, "missing-adapter")
    assert resp.json()["error_type"] == "not_found"


# ---- row 21: empty prompt ------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["", [], [""], [[]]])
def test_21_empty_prompt_completions(live, prompt):
    assert_error(call(live, "/v1/completions", openai_body("/v1/completions", prompt=prompt)), 422, "prompt")


def test_21_empty_messages_and_inputs(live):
    assert_error(call(live, "/v1/chat/completions", openai_body("/v1/chat/completions", messages=[])), 422,
                 "messages")
    for path in TGI_ROUTES:
        assert_error(call(live, path, {"inputs": ""}), 422, "inputs")


# ---- rows 22/23: context length ------------------------------------------------------------------
@pytest.mark.parametrize("path", [*OPENAI_ROUTES, "/generate"])
def test_22_prompt_longer_than_max_model_len(live, path, tokenizer):
    text = "the quick brown fox jumps " * 20
    n = len(tokenizer.encode(text))
    assert n > MAX_LEN
    body = ({"inputs": text} if path == "/generate" else
            openai_body(path, prompt=text, messages=[{"role": "user", "content": text}]))
    resp = call(live, path, body)
    assert resp.status_code == 400, resp.text
    assert str(MAX_LEN) in message(resp) and "max-model-len" in message(resp)
    if path == "/v1/completions":
        assert str(n) in message(resp)


def test_23_prompt_plus_max_tokens_over_context(live, tokenizer):
    n = len(tokenizer.encode("hi"))
    resp = call(live, "/v1/completions", openai_body("/v1/completions", max_tokens=MAX_LEN))
    assert_error(resp, 400, str(n), str(MAX_LEN), str(n + MAX_LEN))
    tgi = call(live, "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": MAX_LEN}})
    assert_error(tgi, 400, str(MAX_LEN))


def test_23_token_ids_outside_vocabulary(live):
    assert_error(call(live, "/v1/completions", openai_body("/v1/completions", prompt=[1, 10**9])), 400,
                 "prompt", str(10**9))


# ---- rows 24/25/27: bounds -----------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 10**12), ("max_tokens", 1e12), ("max_tokens", "ten"),
    ("temperature", -0.5), ("temperature", 2.5), ("top_p", 0), ("top_p", 1.5), ("top_k", -2),
    ("min_tokens", -1), ("seed", 2**64), ("stop", ["s"] * 17), ("stop", "x" * 300), ("stop", [""]),
])
@pytest.mark.parametrize("path", OPENAI_ROUTES)
def test_24_25_27_out_of_bounds_openai(live, path, field, value):
    assert_error(call(live, path, openai_body(path, **{field: value})), 422, field)


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", 0), ("max_new_tokens", 10**12), ("temperature", -1.0), ("top_p", 1.5), ("top_k", -1),
    ("top_k", 0), ("stop", ["s"] * 17), ("stop", ["x" * 300]), ("seed", -1),
])
def test_24_25_27_out_of_bounds_tgi(live, field, value):
    resp = call(live, "/generate", {"inputs": "hi", "parameters": {field: value}})
    assert_error(resp, 422, field)
    assert resp.json()["error_type"] == "validation"


def test_min_tokens_above_max_tokens(live):
    assert_error(call(live, "/v1/completions", openai_body("/v1/completions", min_tokens=5)), 422, "min_tokens")


# ---- row 26: unsupported features (n, best_of, logprobs, echo and penalties are supported since issue 13) ----
@pytest.mark.parametrize(("field", "value"), [("suffix", "tail")])
def test_26_unsupported_completion_features(live, field, value):
    resp = call(live, "/v1/completions", openai_body("/v1/completions", **{field: value}))
    assert_error(resp, 400, "not supported")
    assert resp.json()["error"]["param"] == field


def test_26_best_of_below_n_is_400(live):
    resp = call(live, "/v1/completions", openai_body("/v1/completions", n=3, best_of=2))
    assert_error(resp, 400, "best_of (2) must be >= n (3)", "best_of")


@pytest.mark.parametrize(("field", "value"), [("tools", [{"type": "function"}])])
def test_26_unsupported_chat_features(live, field, value):
    assert_error(call(live, "/v1/chat/completions", openai_body("/v1/chat/completions", **{field: value})), 400,
                 "not supported", field)


@pytest.mark.parametrize(("field", "value"), [("watermark", True), ("typical_p", 0.5)])
def test_26_unsupported_tgi_features(live, field, value):
    assert_error(call(live, "/generate", {"inputs": "hi", "parameters": {field: value}}), 400, "not supported",
                 field)


# ---- row 28: malformed bodies --------------------------------------------------------------------
@pytest.mark.parametrize("path", [*OPENAI_ROUTES, *TGI_ROUTES])
@pytest.mark.parametrize("content", [b'{"model": "a1", "prompt": ', b"[1, 2]", b'"text"', b"null", b"",
                                     b"\xff\xfe", b"[" * 1500 + b"]" * 1500])
def test_28_malformed_json_and_non_objects(live, path, content):
    resp = call(live, path, content=content)
    assert resp.status_code in (400, 422), resp.text
    assert message(resp)


@pytest.mark.parametrize("body", [{"model": 5, "prompt": "hi"}, {"model": "a1", "prompt": 5},
                                  {"model": "a1", "prompt": "hi", "stream": "yes"},
                                  {"model": "a1", "prompt": [[[[[1]]]]]}])
def test_28_wrong_types(live, body):
    # (No `model` at all is the served base model, as in vLLM: tests/server/api/test_request_fields.py.)
    assert_error(call(live, "/v1/completions", body), 422)


def test_28_wrong_types_chat_and_tgi(live):
    assert_error(call(live, "/v1/chat/completions", openai_body("/v1/chat/completions", messages=[{"role": "x"}])),
                 422, "messages")
    assert_error(call(live, "/generate", {"inputs": ["a"], "parameters": {}}), 422, "inputs")
    assert_error(call(live, "/generate", {"inputs": "a", "parameters": {"details": "yes"}}), 422, "details")


# ---- row 29: body over the limit -----------------------------------------------------------------
@pytest.mark.parametrize("path", [*OPENAI_ROUTES, "/generate"])
def test_29_body_over_limit(live, path):
    big = "word " * MAX_BODY
    body = {"inputs": big} if path == "/generate" else openai_body(path, prompt=big,
                                                                   messages=[{"role": "user", "content": big}])
    assert_error(call(live, path, body), 413, str(MAX_BODY))


# ---- row 30: API key -----------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}])
@pytest.mark.parametrize("path", [*OPENAI_ROUTES, *TGI_ROUTES])
def test_30_api_key_required(live, path, headers):
    body = {"inputs": "hi"} if path in TGI_ROUTES else openai_body(path)
    resp = call(live, path, body, headers=headers)
    assert_error(resp, 401, "API key")


def test_30_models_list_needs_the_key_too(live):
    assert httpx.get(live.url + "/v1/models").status_code == 401
    assert httpx.get(live.url + "/v1/models", headers=AUTH).status_code == 200


def test_chat_without_max_tokens_fills_the_context(live):
    body = openai_body("/v1/chat/completions", temperature=0, ignore_eos=True)
    del body["max_tokens"]
    usage = call(live, "/v1/chat/completions", body).json()["usage"]
    assert usage["total_tokens"] == MAX_LEN


# ---- still serving, nothing leaked ---------------------------------------------------------------
def test_server_still_serves_after_bad_inputs(live):
    resp = call(live, "/v1/completions", openai_body("/v1/completions", max_tokens=3))
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] <= 3
    metrics = httpx.get(live.url + "/metrics").text
    assert "loraplex_kv_cache_usage_ratio 0.0" in metrics
    assert "vllm:num_requests_running 0.0" in metrics


# ---- schemathesis over every operation (last: it may call the adapter admin routes) ----------------
EXAMPLES_PER_MODE = 15  # positive + negative: 30 cases per operation


def test_no_server_errors_on_any_operation(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream"} <= {
        op.path for op in operations}
    for op in operations:
        _fuzz(op, GenerationMode.POSITIVE)
        try:
            _fuzz(op, GenerationMode.NEGATIVE)
        except Unsatisfiable:  # every input is valid: no body, no parameters or only free-form strings
            continue


def _fuzz(operation, mode):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
    def run(case):
        resp = case.call(headers=AUTH, timeout=30)
        assert resp.status_code < 500, f"{case.method} {case.path} -> {resp.status_code}: {resp.text[:500]}"

    run()
