"""Structured output under load: 16 concurrent requests, half under a JSON schema, against none (BENCHMARK.md).

Our `LLMEngine` on bench-small (SmolLM2-135M-Instruct, real weights; fp32 on the CPU, bf16 on CUDA), base
model, no adapters. 16 chat-templated requests start together; each asks for a fictional person as JSON,
after a snippet of real text cut at a seeded offset. Sampling: temperature 0.7, one fixed seed per request
(the same in both arms), up to 96 new tokens, EOS ends a request (`ignore_eos=False`).

  none   the 16 requests, no grammar
  mixed  the same 16 requests; every other one (8) carries `guided=GuidedSpec.json_schema(SCHEMA)`

Headline (the target, >= 0.85): output tokens per second over the whole batch, wall clock from the first
`add_request` until the last request finished, mixed / none, per round and the median of the per-round
ratios. A guided request stops as soon as its JSON closes while an unconstrained one may keep talking, so the
two arms do not generate the same tokens and the mixed batch thins out sooner (a smaller batch makes fewer
tokens per second on a CPU). The cleaner cost measure is therefore also printed: the mean latency of a decode
step (every running request one token) at the full batch of 16, where both arms run the same shape, and the
grammar's own time on the engine thread, per step: filling the bitmask rows (`LLMEngine._guided_bitmask`),
masking the logits (`sampler._apply_bitmask`) and advancing the states (`GuidedState.accept`). Those three
are wrapped with timers for the whole run (both arms; a few hundred nanoseconds per call), for measurement
only.

Rounds: a warm-up of both arms (the grammar compiled, the allocator warm), then both arms once per round,
order rotating (common.interleaved), `--repeats` rounds (default 7, >= 3). Validity: every guided output must
`json.loads` and validate against SCHEMA (`jsonschema`) unless it ended by length (counted apart); for the
unconstrained requests the table also says how many happened to hold a valid object anyway.

Run: .venv/bin/python bench/bench_structured.py [--repeats N] [--threads N] [--quick] [--model DIR]
Writes bench/results/structured.json (`--quick`: 4 requests, 16 new tokens, 1 round, for the test).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jsonschema  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    Measure,
    Stopwatch,
    bench_small_dir,
    interleaved,
    machine_facts,
    median,
    print_facts,
    text_prompts,
    write_json,
)

from loraplex.server.config import LoRAConfig, ModelConfig  # noqa: E402
from loraplex.server.engine import sampler as sampler_module  # noqa: E402
from loraplex.server.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from loraplex.server.engine.guided import GuidedSpec, GuidedState  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402
from loraplex.server.engine.scheduler import SchedulerConfig  # noqa: E402
from loraplex.server.model_loader import load_model  # noqa: E402

TARGET = 0.85
TEMPERATURE = 0.7
SEED0 = 1000
BLOCK_SIZE = 16
WARMUP_TOKENS = 4
SNIPPET_TOKENS = (24, 48)  # real text before the instruction, seeded lengths
ARMS = ("none", "mixed")
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
ASKS = (
    "Describe a fictional person who could have written this, as JSON with the keys name, age, city and hobbies.",
    "Invent a character from this text. Answer with a JSON object: name, age, city, hobbies (a list).",
    "Give me a made-up person related to this passage as JSON (name, age, city, hobbies).",
    "Create a fictional reader of this text and describe them in JSON with name, age, city and hobbies.",
)


@dataclass(frozen=True)
class Workload:
    requests: int
    max_tokens: int
    seed: int = 0

    def prompts(self, tokenizer: Any) -> list[list[int]]:
        """Chat-templated: a snippet of real text (text_prompts, seeded) and a request for a person as JSON."""
        rng = random.Random(self.seed)
        lengths = [rng.randint(*SNIPPET_TOKENS) for _ in range(self.requests)]
        out = []
        for i, ids in enumerate(text_prompts(tokenizer, lengths, self.seed)):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            message = f'Here is a text:\n"{text}"\n\n{ASKS[i % len(ASKS)]}'
            out.append(list(tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)))
        return out

    def guided(self, arm: str) -> list[bool]:
        """Which requests carry the schema: none in `none`, every other one (half) in `mixed`."""
        return [arm == "mixed" and i % 2 == 1 for i in range(self.requests)]


# ---- timers on the grammar's work (measurement only) --------------------------------------------------------
class GrammarProbe:
    """Accumulates seconds spent in the grammar's three pieces of engine-thread work, and in `_sample` (which
    holds the mask's application and the accepts) for scale. Installed once for the whole run, both arms."""

    PARTS = ("fill", "apply", "accept", "sample")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.calls = dict.fromkeys(self.PARTS, 0)
        self._restore: list[Callable[[], None]] = []

    def _timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
                self.calls[part] += 1
        return wrapper

    def install(self, engine: LLMEngine) -> None:
        engine._guided_bitmask = self._timed("fill", engine._guided_bitmask)  # instance attributes
        engine._sample = self._timed("sample", engine._sample)
        apply, accept = sampler_module._apply_bitmask, GuidedState.accept
        sampler_module._apply_bitmask = self._timed("apply", apply)  # looked up as a module global
        GuidedState.accept = self._timed("accept", accept)
        self._restore += [lambda: setattr(sampler_module, "_apply_bitmask", apply),
                          lambda: setattr(GuidedState, "accept", accept)]

    def uninstall(self) -> None:
        while self._restore:
            self._restore.pop()()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


# ---- one run of the batch -------------------------------------------------------------------------------------
@dataclass
class Step:
    seconds: float
    num_tokens: int
    num_seqs: int
    grammar: dict[str, float]  # seconds per probe part in this step


@dataclass
class Run:
    arm: str
    measure: Measure
    steps: list[Step]
    tokens: list[list[int]]
    texts: list[str]
    finish: list[str]
    guided: list[bool]
    errors: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, model_dir: Path, work: Workload, device: str) -> None:
        dtype = "bfloat16" if device == "cuda" else "float32"
        self.loaded = load_model(ModelConfig(path=model_dir, quantize="none", dtype=dtype, device=device))
        self.device, self.work = self.loaded.device, work
        self.tokenizer = self.loaded.tokenizer
        self.prompts = work.prompts(self.tokenizer)
        longest = max(map(len, self.prompts)) + work.max_tokens
        per_seq = -(-longest // BLOCK_SIZE)
        cfg = EngineConfig(
            max_model_len=longest,
            block_size=BLOCK_SIZE,
            num_kv_blocks=work.requests * (per_seq + 1),
            # the whole batch's prompts in one step: prefill is step 1, every later step is decode only
            scheduler=SchedulerConfig(max_num_seqs=work.requests, max_batch_tokens=work.requests * longest),
            lora=LoRAConfig(max_loras=1, max_lora_rank=8, max_cpu_loras=1),
        )
        self.engine = LLMEngine(self.loaded, cfg)
        self.spec = GuidedSpec.json_schema(SCHEMA)
        self.probe = GrammarProbe()
        self.probe.install(self.engine)
        self._n = 0

    def params(self, i: int, guided: bool, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE, seed=SEED0 + i, ignore_eos=False,
                              guided=self.spec if guided else None)

    def run(self, arm: str, max_tokens: int | None = None) -> Run:
        """Every request added at once; timed from the first add_request until the last one finished."""
        eng, n = self.engine, max_tokens or self.work.max_tokens
        guided = self.work.guided(arm)
        params = [self.params(i, g, n) for i, g in enumerate(guided)]
        ids, tokens, texts, finish, errors, steps = [], {}, {}, {}, [], []
        with Stopwatch(self.device) as sw:
            for prompt, p in zip(self.prompts, params, strict=True):
                self._n += 1
                ids.append(f"{arm}-{self._n}")
                eng.add_request(ids[-1], prompt, p)
            while eng.has_work():
                before, start = self.probe.snapshot(), time.perf_counter()
                result = eng.step()
                seconds = time.perf_counter() - start
                after = self.probe.snapshot()
                steps.append(Step(seconds, result.stats.num_tokens, result.stats.num_seqs,
                                  {k: after[k] - before[k] for k in after}))
                for o in result.outputs:
                    tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                    texts[o.request_id] = texts.get(o.request_id, "") + o.new_text
                    if o.finished:
                        finish[o.request_id] = o.finish_reason
                    if o.error:
                        errors.append(f"{o.request_id}: {o.error}")
        toks = [tokens.get(i, []) for i in ids]
        return Run(arm, sw.measure(sum(map(len, toks))), steps, toks, [texts.get(i, "") for i in ids],
                   [finish.get(i, "missing") for i in ids], guided, errors)


# ---- judging outputs --------------------------------------------------------------------------------------------
def judge(text: str, reason: str, strict: bool = True) -> str:
    """'valid', 'length' (cut by max_tokens, not judged), 'error' or 'invalid'. strict: the whole text is the
    JSON (what a grammar promises); otherwise the first '{' to the last '}' (an unconstrained answer's object)."""
    if reason == "error":
        return "error"
    if not strict:
        start, end = text.find("{"), text.rfind("}")
        text = text[start:end + 1] if 0 <= start < end else text
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return "length" if reason == "length" else "invalid"
    return "valid"


def validity(runs: list[Run]) -> dict[str, Any]:
    """Counts over every timed run: guided outputs judged strictly, unguided ones (both arms) leniently."""
    guided = {"valid": 0, "invalid": 0, "length": 0, "error": 0}
    free = {"valid": 0, "invalid": 0, "length": 0, "error": 0}
    bad_examples, distinct = [], set()
    for run in runs:
        for text, reason, g in zip(run.texts, run.finish, run.guided, strict=True):
            verdict = judge(text, reason, strict=g)
            if g:
                distinct.add(text)
            (guided if g else free)[verdict] += 1
            if g and verdict in ("invalid", "error") and len(bad_examples) < 5:
                bad_examples.append({"text": text, "finish_reason": reason})
    # Seeded sampling repeats itself: every round's outputs are normally the same texts again.
    return {"guided": guided | {"outputs": sum(guided.values()), "distinct_outputs": len(distinct)},
            "unguided_lenient": free | {"outputs": sum(free.values())}, "guided_bad_examples": bad_examples}


# ---- summarizing ----------------------------------------------------------------------------------------------
def run_summary(run: Run, full: int) -> dict[str, Any]:
    decode = [s for s in run.steps if s.num_seqs and s.num_tokens == s.num_seqs]
    at_full = [s for s in decode if s.num_seqs == full]
    prefill = [s for s in run.steps if s.num_tokens > s.num_seqs]

    def mean_ms(steps: list[Step], part: str | None = None) -> float | None:
        if not steps:
            return None
        values = [s.seconds if part is None else s.grammar[part] for s in steps]
        return 1000 * statistics.fmean(values)

    guided_rows = _guided_row_steps(run)
    grammar_s = sum(s.grammar["fill"] + s.grammar["apply"] + s.grammar["accept"] for s in run.steps)
    return {
        "tokens": int(run.measure.work), "wall_s": run.measure.wall_s, "cpu_s": run.measure.cpu_s,
        "tok_s": run.measure.rate, "cpu_tok_s": run.measure.cpu_rate,
        "steps": len(run.steps), "decode_steps": len(decode), "decode_steps_at_full_batch": len(at_full),
        "prefill_ms": 1000 * sum(s.seconds for s in prefill),
        "decode_step_ms": mean_ms(decode), "decode_step_ms_at_full_batch": mean_ms(at_full),
        "mean_decode_batch": statistics.fmean(s.num_seqs for s in decode) if decode else None,
        "decode_step_ms_by_batch": {n: mean_ms([s for s in decode if s.num_seqs == n])
                                    for n in sorted({s.num_seqs for s in decode}, reverse=True)},
        "grammar_ms_per_decode_step": {p: mean_ms(decode, p) for p in GrammarProbe.PARTS},
        "grammar_ms_per_full_batch_step": {p: mean_ms(at_full, p) for p in GrammarProbe.PARTS},
        "grammar_s": grammar_s, "grammar_share_of_wall": grammar_s / run.measure.wall_s,
        "guided_row_steps": guided_rows,
        "grammar_us_per_guided_token": 1e6 * grammar_s / guided_rows if guided_rows else None,
        "output_tokens": [len(t) for t in run.tokens], "finish_reasons": run.finish, "errors": run.errors,
    }


def _guided_row_steps(run: Run) -> int:
    """Tokens sampled under a grammar (one bitmask row each)."""
    return sum(len(t) for t, g in zip(run.tokens, run.guided, strict=True) if g)


def agreement(none: Run, mixed: Run) -> float | None:
    """Fraction of the requests without a grammar in `mixed` whose tokens equal the same request's in `none`
    (same prompt, same seed: the schema on their batch-mates should not change them)."""
    free = [i for i, g in enumerate(mixed.guided) if not g]
    return sum(none.tokens[i] == mixed.tokens[i] for i in free) / len(free) if free else None


def summarize(runs: dict[str, list[Run]], full: int) -> dict[str, Any]:
    rounds = []
    for none, mixed in zip(runs["none"], runs["mixed"], strict=True):
        a, b = run_summary(none, full), run_summary(mixed, full)
        step_ratio = (a["decode_step_ms_at_full_batch"] / b["decode_step_ms_at_full_batch"]
                      if a["decode_step_ms_at_full_batch"] and b["decode_step_ms_at_full_batch"] else None)
        rounds.append({"none": a, "mixed": b, "ratio_tok_s": b["tok_s"] / a["tok_s"],
                       "ratio_cpu_tok_s": b["cpu_tok_s"] / a["cpu_tok_s"],
                       "ratio_wall": a["wall_s"] / b["wall_s"],  # none s / mixed s: the batch done sooner, > 1
                       "ratio_decode_step_at_full_batch": step_ratio,  # none ms / mixed ms: > 1 is faster
                       "unguided_token_agreement": agreement(none, mixed)})

    def med(path: Callable[[dict[str, Any]], float | None]) -> float | None:
        values = [v for r in rounds if (v := path(r)) is not None]
        return median(values) if values else None

    medians: dict[str, Any] = {"ratio_tok_s": med(lambda r: r["ratio_tok_s"]),
                               "ratio_cpu_tok_s": med(lambda r: r["ratio_cpu_tok_s"]),
                               "ratio_wall": med(lambda r: r["ratio_wall"]),
                               "ratio_decode_step_at_full_batch": med(lambda r: r["ratio_decode_step_at_full_batch"])}
    keys = ("tok_s", "cpu_tok_s", "tokens", "wall_s", "decode_step_ms", "decode_step_ms_at_full_batch",
            "mean_decode_batch", "decode_steps", "prefill_ms", "grammar_share_of_wall", "grammar_us_per_guided_token")
    for arm in ARMS:
        medians[arm] = {k: med(lambda r, k=k, arm=arm: r[arm][k]) for k in keys}
        medians[arm]["grammar_ms_per_full_batch_step"] = {
            p: med(lambda r, p=p, arm=arm: r[arm]["grammar_ms_per_full_batch_step"][p]) for p in GrammarProbe.PARTS}
        medians[arm]["grammar_ms_per_decode_step"] = {
            p: med(lambda r, p=p, arm=arm: r[arm]["grammar_ms_per_decode_step"][p]) for p in GrammarProbe.PARTS}
        sizes = sorted({n for r in rounds for n in r[arm]["decode_step_ms_by_batch"]}, reverse=True)
        medians[arm]["decode_step_ms_by_batch"] = {
            n: med(lambda r, n=n, arm=arm: r[arm]["decode_step_ms_by_batch"].get(n)) for n in sizes}
    ratio = medians["ratio_tok_s"]
    return {"rounds": rounds, "medians": medians, "ratio": ratio, "target": TARGET, "met": ratio >= TARGET,
            "validity": validity(runs["none"] + runs["mixed"])}


# ---- report ---------------------------------------------------------------------------------------------------
def _f(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def print_report(summary: dict[str, Any], work: Workload) -> None:
    print(f"\n{work.requests} requests at once, {sum(work.guided('mixed'))} under the JSON schema in `mixed`; "
          f"up to {work.max_tokens} new tokens, temperature {TEMPERATURE}, seeded")
    print(f"{'round':<6}{'none tok/s':>11}{'mixed tok/s':>12}{'ratio':>7}{'(cpu)':>7}"
          f"{'none tok':>9}{'mixed tok':>10}{'step@full none':>15}{'mixed':>7}{'ratio':>7}"
          f"{'grammar/step':>13}{'agree':>7}")
    for r, row in enumerate(summary["rounds"], 1):
        a, b = row["none"], row["mixed"]
        gm = b["grammar_ms_per_full_batch_step"]
        grammar = None if gm["fill"] is None else gm["fill"] + gm["apply"] + gm["accept"]
        print(f"{r:<6}{a['tok_s']:>11.1f}{b['tok_s']:>12.1f}{row['ratio_tok_s']:>7.3f}{row['ratio_cpu_tok_s']:>7.3f}"
              f"{a['tokens']:>9}{b['tokens']:>10}{_f(a['decode_step_ms_at_full_batch'], '.1f'):>15}"
              f"{_f(b['decode_step_ms_at_full_batch'], '.1f'):>7}{_f(row['ratio_decode_step_at_full_batch'], '.3f'):>7}"
              f"{_f(grammar, '.2f'):>13}{_f(row['unguided_token_agreement'], '.2f'):>7}")
    m = summary["medians"]
    print("(step@full: mean ms of a decode step with all requests running; its ratio is none / mixed, > 1 faster."
          " grammar/step: fill + apply + accept ms in such a step of `mixed`. agree: unguided requests of `mixed`"
          " with the same tokens as in `none`.)")
    for arm in ARMS:
        g, a = m[arm]["grammar_ms_per_full_batch_step"], m[arm]
        print(f"median {arm:<6} {_f(a['tok_s'], '.1f')} tok/s ({_f(a['cpu_tok_s'], '.1f')} per CPU-s), "
              f"{_f(a['tokens'], '.0f')} tokens, decode step {_f(a['decode_step_ms'], '.1f')} ms mean over a mean "
              f"batch of {_f(a['mean_decode_batch'], '.1f')}, {_f(a['decode_step_ms_at_full_batch'], '.1f')} ms at "
              f"the full batch; per full-batch step: fill {_f(g['fill'], '.3f')} ms, apply {_f(g['apply'], '.3f')} "
              f"ms, accept {_f(g['accept'], '.3f')} ms, whole _sample {_f(g['sample'], '.3f')} ms")
    for arm in ARMS:
        by = ", ".join(f"{n}: {v:.0f}" for n, v in m[arm]["decode_step_ms_by_batch"].items())
        print(f"decode step ms by running requests, {arm:<5} (median over rounds): {by}")
    print(f"grammar cost in `mixed`: {_f(m['mixed']['grammar_us_per_guided_token'], '.0f')} us per guided token, "
          f"{_f(100 * (m['mixed']['grammar_share_of_wall'] or 0), '.1f')} % of the wall time")
    v = summary["validity"]
    gv, fv = v["guided"], v["unguided_lenient"]
    print(f"guided outputs: {gv['valid']}/{gv['outputs']} valid, {gv['invalid']} invalid, {gv['length']} cut by "
          f"max_tokens, {gv['error']} errors ({gv['distinct_outputs']} distinct texts); unguided (first '{{' to "
          f"last '}}'): {fv['valid']}/{fv['outputs']} "
          "valid against the schema")
    ok = "PASS" if summary["met"] else "MISS"
    print(f"throughput, half under a JSON schema / none: {summary['ratio']:.3f} (target >= {TARGET})  {ok}; "
          f"decode step at the full batch, none / mixed: {_f(m['ratio_decode_step_at_full_batch'], '.3f')}; "
          f"batch wall time, none / mixed: {_f(m['ratio_wall'], '.3f')}")
    if not summary["met"]:
        print(f"MISS: mixed / none = {summary['ratio']:.3f} < {TARGET} (median of {len(summary['rounds'])} rounds). "
              f"The arms generate {_f(m['none']['tokens'], '.0f')} and {_f(m['mixed']['tokens'], '.0f')} tokens per "
              "batch; the full-batch step ratio and the grammar's ms per step above say how much of the gap is the "
              "grammar's work and how much the batch's shape.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 requests, 16 new tokens, 1 round (for the test)")
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: bench-small)")
    parser.add_argument("--requests", type=int, default=None, help="concurrent requests (default 16; quick 4)")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens at most (default 96; quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7, >= 3; quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "structured.json")
    args = parser.parse_args()
    args.requests = args.requests or (4 if args.quick else 16)
    args.max_tokens = args.max_tokens or (16 if args.quick else 96)
    args.repeats = args.repeats or (1 if args.quick else 7)
    if args.repeats < 3 and not args.quick:
        parser.error("--repeats: the protocol asks for a median of >= 3 rounds (--quick runs 1)")
    if args.requests < 2:
        parser.error("--requests: at least 2 (half of them guided)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Workload(args.requests, args.max_tokens)
    facts = machine_facts(args.device)
    if args.model is not None:
        facts["model"] = str(args.model)
    print_facts(facts)
    bench = Bench(args.model or bench_small_dir(), work, args.device)
    print(f"prompts: {[len(p) for p in bench.prompts]} tokens; warm-up ({WARMUP_TOKENS} new tokens per arm)",
          flush=True)
    for arm in ARMS:
        bench.run(arm, WARMUP_TOKENS)
    runs: dict[str, list[Run]] = {arm: [] for arm in ARMS}

    def case(arm: str) -> Callable[[], Measure]:
        def go() -> Measure:
            runs[arm].append(bench.run(arm))
            return runs[arm][-1].measure
        return go

    interleaved({arm: case(arm) for arm in ARMS}, args.repeats, log=lambda line: print(line, flush=True))
    bench.probe.uninstall()
    summary = summarize(runs, work.requests)
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_report(summary, work)
    samples = [{"finish_reason": r, "text": t} for t, r, g in
               zip(runs["mixed"][-1].texts, runs["mixed"][-1].finish, runs["mixed"][-1].guided, strict=True) if g][:3]
    unguided = [{"finish_reason": r, "text": t} for t, r in
                zip(runs["none"][-1].texts[:2], runs["none"][-1].finish[:2], strict=True)]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {
        "machine": facts, "settings": settings,
        "params": {"requests": work.requests, "guided_in_mixed": sum(work.guided("mixed")),
                   "max_tokens": work.max_tokens, "temperature": TEMPERATURE, "ignore_eos": False,
                   "seeds": [SEED0 + i for i in range(work.requests)], "prompt_tokens": [len(p) for p in bench.prompts],
                   "dtype": str(bench.loaded.dtype).removeprefix("torch."), "schema": SCHEMA},
        "wall_s": round(time.perf_counter() - started, 1),
        **summary,
        "sample_guided_outputs": samples, "sample_unguided_outputs": unguided,
    })


if __name__ == "__main__":
    main()
