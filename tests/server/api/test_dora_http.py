"""DoRA, embedding-LoRA and lm_head-LoRA adapters over HTTP (issue 26): registered through the admin API (the
record says use_dora), then served at once beside a plain LoRA adapter and the base model: every completion's
greedy text and each token's logprob equal PEFT's (atol 1e-4), and an lm_head adapter scores a prompt (echo,
max_tokens 0: every prompt row through the adapted output projection) as PEFT does.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from loraplex.adapters.targets import TARGET_MODULES

from ..engine_helpers import PeftReference
from .conftest import ok

ATOL = 1e-4
N_TOKENS = 6
# name -> (rank, targets, seed, use_dora)
ADAPTERS = {
    "dora": (8, TARGET_MODULES, 71, True),
    "emb-head": (4, ("embed_tokens", "lm_head", "q_proj"), 72, False),
    "dora-emb-head": (4, ("embed_tokens", "lm_head", "v_proj"), 73, True),
    "lora": (8, ("q_proj", "down_proj"), 74, False),
}


@pytest.fixture(scope="module")
def dirs(adapter_dir):
    return {name: adapter_dir("llama", r, t, s, use_dora=d) for name, (r, t, s, d) in ADAPTERS.items()}


@pytest.fixture(scope="module")
def live(server_factory, dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("dora-root")
    for name, path in dirs.items():
        shutil.copytree(path, root / name)
    server = server_factory("--max-loras", "4", adapter_root=root)
    for name in dirs:
        resp = httpx.post(f"{server.url}/v1/adapters", json={"name": name, "path": name}, timeout=60)
        assert resp.status_code == 201, resp.text
    return server


@pytest.fixture(scope="module")
def references(tiny_model_dir, dirs):
    """One PeftReference per adapter: PEFT serves a DoRA adapter only on its own (no mixed-batch DoRA)."""
    return {name: PeftReference(tiny_model_dir("llama"), {name: path}) for name, path in dirs.items()}


def _peft_logprobs(ref: PeftReference, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1]: PEFT's log-probability of ids[i + 1] given ids[:i + 1]."""
    with torch.no_grad(), ref._using(adapter):
        logits = ref.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_registration_records_say_which_adapters_are_dora(live):
    records = {r["name"]: r for r in httpx.get(f"{live.url}/v1/adapters", timeout=30).json()["data"]}
    assert {name: records[name]["use_dora"] for name in ADAPTERS} == {n: a[3] for n, a in ADAPTERS.items()}


def test_concurrent_completions_of_every_kind_equal_peft(live, references, tokenizer):
    model = httpx.get(f"{live.url}/v1/models", timeout=30).json()["data"][0]["id"]
    plan = [*ADAPTERS, None]  # every kind of row, and a base row, sent at once (they share steps)
    prompts = [tokenizer.encode(text) for text in ("the quick brown fox", "one two three", "a b c d e f",
                                                   "hello world", "numbers: 1 2 3")]

    def complete(i: int) -> dict:
        body = {"model": plan[i] or model, "prompt": prompts[i], "max_tokens": N_TOKENS, "temperature": 0,
                "logprobs": 1, "ignore_eos": True}
        return ok(live, "/v1/completions", body)["choices"][0]

    with ThreadPoolExecutor(len(plan)) as pool:
        choices = list(pool.map(complete, range(len(plan))))
    for adapter, prompt, choice in zip(plan, prompts, choices, strict=True):
        ref = references[adapter or "lora"]
        tokens = ref.generate(prompt, adapter, N_TOKENS)
        assert choice["text"] == tokenizer.decode(tokens), adapter
        expected = _peft_logprobs(ref, adapter, prompt + tokens)[len(prompt) - 1:]
        assert torch.allclose(torch.tensor(choice["logprobs"]["token_logprobs"]), expected, atol=ATOL), adapter


@pytest.mark.parametrize("adapter", ["emb-head", "dora-emb-head"])
def test_an_lm_head_adapter_scores_a_prompt_as_peft_does(live, references, tokenizer, adapter):
    prompt = tokenizer.encode("one two three four five six seven")
    body = {"model": adapter, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    lp = ok(live, "/v1/completions", body)["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None
    expected = _peft_logprobs(references[adapter], adapter, prompt)
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), expected, atol=ATOL)
