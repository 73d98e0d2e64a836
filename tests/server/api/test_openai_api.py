"""The OpenAI-compatible routes, driven by the real `openai` client against a live server.

Greedy outputs are checked against PEFT (`PeftReference`): with `ignore_eos` the server must produce the
same tokens as PeftModel for each adapter and for the base model, so the text must equal the reference
tokens decoded.
"""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from ..engine_helpers import PeftReference

ADAPTERS = {"a1": (8, ("q_proj", "k_proj", "v_proj", "o_proj"), 1), "a2": (4, ("q_proj", "v_proj", "down_proj"), 2)}
PROMPT = "The quick brown fox"
N = 12


@pytest.fixture(scope="module")
def adapter_dirs(adapter_dir):
    return {name: adapter_dir("llama", rank, targets, seed) for name, (rank, targets, seed) in ADAPTERS.items()}


@pytest.fixture(scope="module")
def live(server_factory, adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-adapter-root")
    flags = []
    for name, src in adapter_dirs.items():
        shutil.copytree(src, root / name)
        flags += ["--preload", f"{name}={name}"]
    return server_factory(*flags, adapter_root=root)


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def base_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dirs):
    return PeftReference(tiny_model_dir("llama"), adapter_dirs)


def expected_text(reference, tokenizer, prompt_ids, adapter, n=N):
    return tokenizer.decode(reference.generate(prompt_ids, adapter, n), skip_special_tokens=True)


def test_models_list_shows_base_and_adapters_with_parent(client, base_name):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base_name, "a1", "a2"}
    assert models[base_name].owned_by == "loraplex" and models[base_name].parent is None
    assert models["a1"].parent == base_name and models["a2"].parent == base_name
    assert client.models.retrieve("a2").parent == base_name
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.models.retrieve("nope")


@pytest.mark.parametrize("adapter", ["a1", "a2", None])
def test_completion_greedy_equals_peft(client, base_name, reference, tokenizer, adapter):
    ids = tokenizer.encode(PROMPT)
    resp = client.completions.create(model=adapter or base_name, prompt=PROMPT, max_tokens=N, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.object == "text_completion" and resp.model == (adapter or base_name)
    assert resp.choices[0].text == expected_text(reference, tokenizer, ids, adapter)
    assert resp.choices[0].finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        len(ids), N, len(ids) + N)


def test_adapters_change_the_output(client, base_name):
    # Guards the comparison above: if adapters were ignored, all three would agree with the base.
    texts = {m: client.completions.create(model=m, prompt=PROMPT, max_tokens=N, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
             for m in ("a1", "a2", base_name)}
    assert len(set(texts.values())) == 3


def test_streamed_completion_from_token_ids_equals_peft(client, reference, tokenizer):
    ids = tokenizer.encode("Once upon a time")
    stream = client.completions.create(model="a1", prompt=ids, max_tokens=N, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text(reference, tokenizer, ids, "a1")
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
    assert chunks[-1].usage.prompt_tokens == len(ids)


def chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_chat_completion_equals_peft_streamed_and_not(client, reference, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]
    want = expected_text(reference, tokenizer, chat_ids(tokenizer, messages), "a2")
    resp = client.chat.completions.create(model="a2", messages=messages, max_tokens=N, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content == want
    assert resp.usage.completion_tokens == N and resp.usage.prompt_tokens == len(chat_ids(tokenizer, messages))
    chunks = list(client.chat.completions.create(model="a2", messages=messages, max_tokens=N, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_content_parts_are_joined_text(client):
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]
    as_parts = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": parts}],
                                              max_tokens=6, temperature=0)
    as_text = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Tell me\na story."}],
                                             max_tokens=6, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_unknown_model_is_not_found(client, kind):
    with pytest.raises(openai.NotFoundError, match="no-such-adapter"):
        if kind == "completions":
            client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
        else:
            client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}])


def test_stop_string_cuts_the_text(client, base_name):
    full = client.completions.create(model=base_name, prompt=PROMPT, max_tokens=N, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    resp = client.completions.create(model=base_name, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == full[: full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model="a1", prompt=PROMPT, max_tokens=N, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True, "top_k": 50}).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10))


def test_metrics_count_requests_per_adapter(client, live):
    client.completions.create(model="a2", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="unregistered-name", prompt="hi", max_tokens=2)
    text = httpx.get(live.url + "/metrics").text
    assert 'loraplex_requests_total{adapter="a2",endpoint="/v1/completions",status="200"}' in text
    # An unknown name never becomes a label value.
    assert 'loraplex_requests_total{adapter="unknown",endpoint="/v1/completions",status="404"}' in text
    assert "unregistered-name" not in text
