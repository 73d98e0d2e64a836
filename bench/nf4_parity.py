"""Why greedy outputs on an nf4 base agree with HF's only ~50-60 % of the time (bench_engine.py's
"token_agreement"), teacher-forced, on bench-small (SmolLM2-135M-Instruct's real weights) with bitsandbytes nf4.

Every comparison runs the same 16 real-text prompts (32-96 tokens) and the same continuation (HF's own greedy
tokens from a batch of 1), so all logits are conditioned on identical prefixes:

  hf_b1_vs_hf_b16   HF nf4, each sequence alone (batch 1)  vs  HF nf4, the 16 in one left-padded batch
  ours_vs_hf_b1     our engine nf4 (one packed ragged step per position)  vs  HF nf4 batch 1
  ours_vs_hf_b16    our engine nf4  vs  HF nf4 batch 16
  fp32: the same three on the fp32 base (the control: rounding of fp32 matmuls only)

Per comparison: the largest |logit difference|, the median per-position max difference, and the fraction of
positions whose argmax agrees. If HF against itself at two batch shapes disagrees as often as ours against
HF, the gap is bitsandbytes' shape-dependent rounding (its 4-bit matmul dequantises and accumulates in an
order that depends on the number of rows), not ours; near ties then flip, and greedy paths split there.

Then free-running greedy decoding (what bench_engine's "token_agreement" compares), 16 prompts x 24 tokens:
HF generate one prompt at a time, HF generate the 16 in one left-padded batch, our engine with the 16 at once:
the fraction of positions with the same token, and of sequences that never split.

Run: .venv/bin/python bench/nf4_parity.py     Writes bench/results/nf4_parity.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from common import RESULTS_DIR, bench_small_dir, bench_small_label, machine_facts, print_facts, text_prompts, write_json  # noqa: E402,E501

from loraplex.server.config import LoRAConfig, ModelConfig  # noqa: E402
from loraplex.server.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402
from loraplex.server.engine.scheduler import SchedulerConfig  # noqa: E402
from loraplex.server.model_loader import load_model  # noqa: E402

N, NEW = 16, 24


@torch.inference_mode()
def hf_logits_alone(model: torch.nn.Module, seqs: list[list[int]], prompt_lens: list[int]) -> list[torch.Tensor]:
    """Per sequence [NEW, V]: logits at the positions predicting its continuation, batch of 1."""
    return [model(input_ids=torch.tensor([s])).logits[0, p - 1: len(s) - 1].float() for s, p in zip(seqs, prompt_lens,
                                                                                                    strict=True)]


@torch.inference_mode()
def hf_logits_batched(model: torch.nn.Module, seqs: list[list[int]], prompt_lens: list[int], pad: int
                      ) -> list[torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    return [logits[i, width - len(s) + p - 1: width - 1] for i, (s, p) in enumerate(zip(seqs, prompt_lens,
                                                                                        strict=True))]


def ours_logits(engine: LLMEngine, seqs: list[list[int]], prompt_lens: list[int]) -> list[torch.Tensor]:
    """Teacher-forced through the engine: each request scores its whole sequence as its prompt (prompt
    logprobs are log_softmax of the runner's logits: rebuild logits up to a per-row constant, enough for
    differences of log-probabilities and for argmax)."""
    for i, s in enumerate(seqs):
        engine.add_request(f"t{i}", s, SamplingParams(max_tokens=0, prompt_logprobs=20, temperature=0.0))
    rows: dict[str, list] = {}
    while engine.has_work():
        for out in engine.step().outputs:
            if out.prompt_logprobs is not None:
                rows[out.request_id] = out.prompt_logprobs
    result = []
    for i, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        chosen = rows[f"t{i}"][p: len(s)]  # entries predicting tokens p .. len(s)-1
        result.append(chosen)
    return result


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    """Log-softmax differences (logits differ by a per-row constant between implementations)."""
    worst, medians, agree, total = 0.0, [], 0, 0
    for x, y in zip(a, b, strict=True):
        lx, ly = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        d = (lx - ly).abs().amax(-1)
        worst = max(worst, float(d.max()))
        medians.append(float(d.median()))
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
        total += x.shape[0]
    medians.sort()
    return {"max_abs_logprob_diff": round(worst, 5), "median_max_diff": round(medians[len(medians) // 2], 5),
            "argmax_agreement": round(agree / total, 4)}


def ours_vs(seen: list, reference: list[torch.Tensor]) -> dict[str, float]:
    """Our prompt logprobs (chosen token's logprob, top-20) against a reference's logits: the chosen token's
    log-probability difference and whether our top-1 is the reference's argmax."""
    worst, diffs, agree, total = 0.0, [], 0, 0
    for entries, ref in zip(seen, reference, strict=True):
        lref = torch.log_softmax(ref, -1)
        for entry, row in zip(entries, lref, strict=True):
            d = abs(entry.logprob - float(row[entry.token]))
            worst, total = max(worst, d), total + 1
            diffs.append(d)
            agree += int(entry.top[0][0] == int(row.argmax()))
    diffs.sort()
    return {"max_abs_logprob_diff": round(worst, 5), "median_abs_diff": round(diffs[len(diffs) // 2], 6),
            "argmax_agreement": round(agree / total, 4)}


@torch.inference_mode()
def hf_greedy_batched(model: torch.nn.Module, prompts: list[list[int]], pad: int) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=pad)
    return [row[width:].tolist() for row in out]


def ours_greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", p, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step().outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [got[f"g{i}"] for i in range(len(prompts))]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    same = sum(x == y for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=False))
    total = sum(min(len(s), len(t)) for s, t in zip(a, b, strict=True))
    return {"token_agreement": round(same / total, 4), "sequences_identical": sum(s == t for s, t in zip(a, b,
                                                                                                       strict=True))}


def run(quantize: str, model_dir) -> dict[str, object]:
    loaded = load_model(ModelConfig(path=model_dir, quantize=quantize, dtype="float32", device="cpu"))
    tok = loaded.tokenizer
    prompts = text_prompts(tok, [32 + 4 * i for i in range(N)], seed=5)
    seqs, lens = [], []
    with torch.inference_mode():
        for p in prompts:  # HF's own greedy continuation, batch of 1
            ids = torch.tensor([p])
            out = loaded.model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id)
            seqs.append(out[0].tolist())
            lens.append(len(p))
    alone = hf_logits_alone(loaded.model, seqs, lens)
    batched = hf_logits_batched(loaded.model, seqs, lens, tok.eos_token_id)
    hf_b1 = [s[p:] for s, p in zip(seqs, lens, strict=True)]
    hf_b16 = hf_greedy_batched(loaded.model, prompts, tok.eos_token_id)
    cfg = EngineConfig(max_model_len=256, block_size=16, num_kv_blocks=N * 16,
                       scheduler=SchedulerConfig(max_num_seqs=N, max_batch_tokens=4096, prefix_caching=False),
                       lora=LoRAConfig(max_loras=1, max_lora_rank=8, max_cpu_loras=1))
    engine = LLMEngine(loaded, cfg)
    ours = ours_logits(engine, seqs, lens)
    free = ours_greedy(engine, prompts)
    return {"teacher_forced": {"hf_b1_vs_hf_b16": compare(alone, batched), "ours_vs_hf_b1": ours_vs(ours, alone),
                               "ours_vs_hf_b16": ours_vs(ours, batched)},
            "greedy": {"hf_b1_vs_hf_b16": agreement(hf_b1, hf_b16), "ours_vs_hf_b1": agreement(free, hf_b1),
                       "ours_vs_hf_b16": agreement(free, hf_b16)}}


def main() -> None:
    torch.set_num_threads(1)
    facts = machine_facts("cpu")
    print_facts(facts)
    model_dir = bench_small_dir()
    results = {q: run(q, model_dir) for q in ("none", "nf4")}
    for q, r in results.items():
        for kind, comparisons in r.items():
            for name, m in comparisons.items():
                print(f"{q:5s} {kind:15s} {name:16s} {m}")
    write_json(RESULTS_DIR / "nf4_parity.json", {"machine": facts, "model": bench_small_label(),
                                                 "sequences": N, "new_tokens": NEW, "results": results})


if __name__ == "__main__":
    main()
