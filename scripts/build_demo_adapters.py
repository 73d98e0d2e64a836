"""Build the demo LoRA adapters (emoji, pirate, json) for SmolLM2-135M-Instruct on the CPU.

    .venv/bin/python scripts/build_demo_adapters.py [--out DIR] [--only NAME...] [--rank R] [--steps N] ...

Data: the questions of `scripts/demo_questions.py` (a few hundred generated factual questions plus open prompts),
answered greedily by the base model itself through its chat template, each answer cut to its first sentence and
rewritten per style by `loraplex.server.demo_styles`. Each adapter learns (chat prompt -> rewritten answer +
<|im_end|>) with the loss on the answer tokens only, is saved in float16 (small enough to commit), reloaded
through PEFT and graded on factual questions it never saw whose answer the base model gets right: an answer
passes when it keeps the fact (the answer word, in any case), shows the style and ends by itself. The dev split
is for choosing settings (`--split dev`, with `--no-install`); the test split is the reported score and the
install gate: an adapter below `--pass-rate` (default PASS_RATE) there is not installed and the script exits 1.
Passing ones are written atomically to `<out>/<name>/` (default: the cache dir the server preloads from before
deploy/adapters/). Per-style settings: STYLE_CONFIGS; scores and cost: deploy/adapters/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling demo_questions, also when imported by tests
from demo_questions import OPEN_PROMPTS, Fact, facts  # noqa: E402

from loraplex.adapters.targets import ATTENTION_TARGETS, TARGET_MODULES  # noqa: E402
from loraplex.server.demo import cache_root, demo_model_dir  # noqa: E402
from loraplex.server.demo_styles import STYLES, mentions, sentence_done, short_answer  # noqa: E402

PASS_RATE = 0.95  # of the test split's questions (those the base model answers correctly)
ANSWER_TOKENS = 48  # base answers stop at their first sentence; this caps a rambling one
EVAL_TOKENS = 96  # an adapter's answer must end (<|im_end|>) within this; the longest json target is ~70
# What adapter_config.json names as the base: the upstream model, not this machine's cache path.
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET_SETS = {"attention": ATTENTION_TARGETS, "all": TARGET_MODULES}
NUM_LAYERS = 30  # SmolLM2-135M's decoder layers
TEACHER_TOP = 64  # soft targets keep the base model's 64 most likely tokens (almost all of its probability mass)


@dataclass(frozen=True)
class TrainConfig:
    """One adapter's LoRA shape and optimisation (STYLE_CONFIGS; see deploy/adapters/README.md)."""

    rank: int = 8
    targets: str = "attention"  # a key of TARGET_SETS
    layers: int = NUM_LAYERS  # LoRA on the last `layers` decoder layers: backward stops there, so fewer is cheaper
    steps: int = 40
    batch_size: int = 8
    lr: float = 2e-3
    distill: bool = True  # soft targets from the base model where the answer copies it (step_loss)
    warmup: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.targets not in TARGET_SETS:
            raise ValueError(f"--targets: {self.targets!r} is not one of {', '.join(TARGET_SETS)}")
        for flag, value in (("--rank", self.rank), ("--steps", self.steps), ("--batch-size", self.batch_size),
                            ("--layers", self.layers)):
            if value < 1:
                raise ValueError(f"{flag}: must be >= 1, got {value}")
        if self.layers > NUM_LAYERS:
            raise ValueError(f"--layers: SmolLM2-135M has {NUM_LAYERS} layers, got {self.layers}")

    def lora(self) -> LoraConfig:
        names = TARGET_SETS[self.targets]
        # All layers: the plain list of names. Fewer: one regex (PEFT fullmatches it against each module's name;
        # the server's loader reads string targets the same way).
        targets: list[str] | str = list(names) if self.layers == NUM_LAYERS else (
            rf"(.*\.)?layers\.({'|'.join(map(str, range(NUM_LAYERS - self.layers, NUM_LAYERS)))})\."
            rf"(self_attn|mlp)\.({'|'.join(names)})")
        return LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules=targets, lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM")


# Per style: the suffix styles (pirate, emoji) only learn to sign off after an answer that stays the base model's
# own, so a few cheap steps on the last layers do; json also has to answer after its `{"answer": "` as well as
# without it (context distillation: step_loss), so it trains every layer for longer. Bounded by the CPU time one
# build may take on 2 shared cores, not swept (deploy/adapters/README.md).
STYLE_CONFIGS = {
    "emoji": TrainConfig(layers=8, steps=30, batch_size=4),
    "pirate": TrainConfig(layers=8, steps=30, batch_size=4, distill=False),
    "json": TrainConfig(layers=15, steps=40, batch_size=8, distill=True),
}


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]  # the rewritten answer + <|im_end|>
    copied: int = 0  # answer_ids[copied_at:copied_at + copied] are the base model's own answer tokens, unchanged
    copied_at: int = 0
    # The base model's next-token distribution at each copied token, in its own plain answer, cut to its TEACHER_TOP
    # most likely tokens: ids and probabilities, [copied, TEACHER_TOP] each (None: no soft targets).
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class Graded:
    fact: Fact
    base: str  # the base model's first sentence
    output: str
    ended: bool  # the adapter stopped by itself (<|im_end|>) within EVAL_TOKENS
    kept_fact: bool
    styled: bool

    @property
    def passed(self) -> bool:
        return self.ended and self.kept_fact and self.styled


# ---- generation --------------------------------------------------------------------------------------------
def chat_ids(tok: PreTrainedTokenizerBase, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


@torch.no_grad()
def greedy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, questions: Sequence[str], max_new_tokens: int,
           done: Callable[[str], bool] = lambda text: False, batch_size: int = 48) -> list[tuple[str, bool]]:
    """Greedy answers through the chat template: (text, ended by <|im_end|>) per question. Rows leave the batch
    as soon as they end or `done(text)` holds (a finished row costs nothing more, unlike generate()'s padding)."""
    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))  # similar lengths: less padding
    results: list[tuple[str, bool]] = [("", False)] * len(questions)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for row, result in zip(rows, _greedy_batch(model, tok, [chat_ids(tok, questions[i]) for i in rows],
                                                   max_new_tokens, done), strict=True):
            results[row] = result
    return results


def _greedy_batch(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[list[int]],
                  max_new_tokens: int, done: Callable[[str], bool]) -> list[tuple[str, bool]]:
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first real token
    cache, live = DynamicCache(), list(range(len(prompts)))
    tokens: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]  # [live, vocab]
        nxt = logits.argmax(-1).tolist()
        keep = []
        for j, (row, token) in enumerate(zip(live, nxt, strict=True)):
            ended[row] = token == eos
            if not ended[row]:
                tokens[row].append(token)
                if not done(tok.decode(tokens[row])):
                    keep.append(j)
        if not keep:
            break
        index = torch.tensor(keep)
        if len(keep) < len(live):
            cache.batch_select_indices(index)
        live = [live[j] for j in keep]
        ids = torch.tensor([[nxt[j]] for j in keep])
        mask = torch.cat([mask[index], torch.ones(len(keep), 1, dtype=mask.dtype)], dim=1)
        positions = positions[index, -1:] + 1
    return [(tok.decode(t, skip_special_tokens=True).strip(), e) for t, e in zip(tokens, ended, strict=True)]


def base_answers(model: PreTrainedModel, tok: PreTrainedTokenizerBase, questions: Sequence[str],
                 cache: Path | None = None) -> dict[str, str]:
    """{question: the base model's greedy first sentence} (read from / written to the JSON file `cache`)."""
    if cache is not None and cache.is_file():
        cached = json.loads(cache.read_text())
        if set(questions) <= cached.keys():
            return cached
    answers = {q: short_answer(text) for q, (text, _) in
               zip(questions, greedy(model, tok, questions, ANSWER_TOKENS, done=sentence_done), strict=True)}
    if cache is not None:
        cache.write_text(json.dumps(answers, indent=1, ensure_ascii=False))
    return answers


def held_out(split: str, answers: dict[str, str]) -> list[Fact]:
    """The `split` ("dev" or "test") questions that the base model answers correctly."""
    return [f for f in facts() if f.split == split and mentions(answers[f.question], f.answers)]


def all_questions() -> list[str]:
    return [*OPEN_PROMPTS, *(f.question for f in facts())]


def train_questions() -> list[str]:
    return [*OPEN_PROMPTS, *(f.question for f in facts() if f.split == "train")]


# ---- training ----------------------------------------------------------------------------------------------
def trained_on(answers: dict[str, str]) -> list[str]:
    """The training questions with a base answer (one with no text teaches nothing)."""
    return [q for q in train_questions() if answers[q]]


def teachers(model: PreTrainedModel, tok: PreTrainedTokenizerBase, answers: dict[str, str]
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{training question: the base model's soft targets along its own plain answer} (teacher_targets); the same
    for every style, so computed once per build."""
    questions = trained_on(answers)
    pairs = [(chat_ids(tok, q), tok(answers[q], add_special_tokens=False).input_ids) for q in questions]
    return dict(zip(questions, teacher_targets(model, pairs, tok.pad_token_id), strict=True))


def examples(tok: PreTrainedTokenizerBase, answers: dict[str, str], style: str,
             soft: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> list[Example]:
    """(chat prompt, rewritten answer) per training question; with `soft` (teachers()), the soft targets of the
    tokens the rewrite copies from the base model's answer (see step_loss)."""
    rewrite, end = STYLES[style][0], tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for q in trained_on(answers):
        plain = tok(answers[q], add_special_tokens=False).input_ids
        styled = tok(rewrite(answers[q]), add_special_tokens=False).input_ids + [end]
        span, teacher = copied_span(styled, plain), None if soft is None else soft[q]
        if span is None or teacher is None:
            rows.append(Example(chat_ids(tok, q), styled))
        else:
            at, start, length = span
            rows.append(Example(chat_ids(tok, q), styled, length, at, (teacher[0][start:start + length],
                                                                        teacher[1][start:start + length])))
    return rows


@torch.no_grad()
def teacher_targets(model: PreTrainedModel, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                    batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per (prompt, plain answer): the base model's distribution at each answer token, its TEACHER_TOP most likely
    tokens renormalised: (ids, probabilities), [len(answer), TEACHER_TOP] each."""
    out = []
    for i in range(0, len(pairs), batch_size):
        rows = [Example(prompt, plain) for prompt, plain in pairs[i:i + batch_size]]
        kwargs, _, keep = batch(rows, pad_id)
        logits = model(**kwargs, logits_to_keep=keep + 1).logits[:, :-1]  # [B, K, V]: column t -> label t
        probs, top = torch.softmax(logits, dim=-1).topk(TEACHER_TOP, dim=-1)  # [B, K, TEACHER_TOP]
        probs = probs / probs.sum(-1, keepdim=True)
        out += [(top[j, keep - len(r.answer_ids):], probs[j, keep - len(r.answer_ids):]) for j, r in enumerate(rows)]
    return out


def copied_span(styled: list[int], plain: list[int], shortest: int = 3) -> tuple[int, int, int] | None:
    """The longest run of the plain answer's tokens found unchanged in the styled one, as (start in styled, start
    in plain, length); it may skip the plain answer's first token ("The" becomes " The" after "Arr!")."""
    for length in range(len(plain), shortest - 1, -1):
        for start in range(0, min(2, len(plain) - length + 1)):
            needle = plain[start:start + length]
            for at in range(len(styled) - length + 1):
                if styled[at:at + length] == needle:
                    return at, start, length
    return None


def batch(rows: Sequence[Example], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Left-padded (model kwargs, labels [B, K], K): every row ends at the last column, so only the last K+1
    positions need logits (the vocabulary projection is ~20% of this model's compute)."""
    seqs = [r.prompt_ids + r.answer_ids for r in rows]
    width, keep = max(map(len, seqs)), max(len(r.answer_ids) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    labels = torch.tensor([[-100] * (keep - len(r.answer_ids)) + r.answer_ids for r in rows])
    # Explicit positions: with left padding the default arange would shift every shorter row.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, labels, keep


def train(model: PreTrainedModel, data: Sequence[Example], cfg: TrainConfig, pad_id: int) -> PeftModel:
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, cfg.lora())
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / cfg.warmup, (cfg.steps - s) / cfg.steps))
    order, rng = [], random.Random(cfg.seed)
    peft_model.train()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # epochs of shuffled examples
            order += rng.sample(range(len(data)), len(data))
        rows, order = [data[i] for i in order[:cfg.batch_size]], order[cfg.batch_size:]
        loss = step_loss(peft_model, rows, pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 10 == 0 or step == cfg.steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.3f}", flush=True)
    return peft_model.eval()


def step_loss(model: PeftModel, rows: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Cross-entropy over the answer tokens, where the target of a token the style copies from the base model's
    answer is the base model's distribution there (a soft target, Example.teacher) rather than the one token: the
    adapter learns to leave the base model's beliefs where they were, margins included, not only its argmax on
    the training questions. That is what keeps the facts of questions it never saw."""
    kwargs, labels, keep = batch(rows, pad_id)
    logits = model(**kwargs, logits_to_keep=keep + 1).logits[:, :-1]  # [B, K, V]; position t predicts t+1
    targets = torch.nn.functional.one_hot(labels.clamp(min=0), logits.shape[-1]).to(logits.dtype)  # [B, K, V]
    for i, r in enumerate(rows):
        if r.teacher is not None:
            col = keep - len(r.answer_ids) + r.copied_at
            targets[i, col:col + r.copied].zero_().scatter_(-1, *r.teacher)
    token_loss = -(targets * torch.log_softmax(logits, dim=-1)).sum(-1)  # [B, K]
    return token_loss[labels != -100].mean()


# ---- grading and installing --------------------------------------------------------------------------------
def grade(model: PreTrainedModel, tok: PreTrainedTokenizerBase, style: str, questions: Sequence[Fact],
          answers: dict[str, str]) -> list[Graded]:
    """Each question's greedy answer under `model` (the adapter active), judged for fact, style and ending."""
    check = STYLES[style][1]
    outputs = greedy(model, tok, [f.question for f in questions], EVAL_TOKENS)
    return [Graded(f, answers[f.question], text, ended, mentions(text, f.answers), check(text))
            for f, (text, ended) in zip(questions, outputs, strict=True)]


def report(style: str, split: str, graded: Sequence[Graded], verbose: bool) -> float:
    """Print the score (and each answer when `verbose`, the failures always); returns the pass rate."""
    for g in graded:
        if verbose or not g.passed:
            why = ", ".join(w for w, bad in (("no fact", not g.kept_fact), ("no style", not g.styled),
                                             ("did not end", not g.ended)) if bad)
            print(f"  [{'pass' if g.passed else 'FAIL: ' + why}] {g.fact.question}\n      base: {g.base!r}\n"
                  f"      {style}: {g.output!r}")
    passed = sum(g.passed for g in graded)
    print(f"[{style}] {split}: {passed}/{len(graded)} keep the fact, show the style and end "
          f"(fact {sum(g.kept_fact for g in graded)}, style {sum(g.styled for g in graded)}, "
          f"ended {sum(g.ended for g in graded)})", flush=True)
    return passed / max(1, len(graded))


def save_fp16(peft_model: PeftModel, path: Path) -> None:
    """PEFT's own save, then the LoRA tensors rewritten in float16: half the bytes, and the server (and PEFT)
    cast them back on load."""
    peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
    peft_model.save_pretrained(path)
    weights = path / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    (path / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub: not part of the adapter
    # mkdtemp made the dir owner-only: the installed adapter is as readable as any save_pretrained output.
    for file in path.iterdir():
        file.chmod(0o644)
    path.chmod(0o755)


def install(tmp: Path, final: Path) -> None:
    """Move a complete adapter dir into place; a reader sees the old one or the new one, never half of one."""
    old = final.with_name(f".{final.name}-old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def build(style: str, tok: PreTrainedTokenizerBase, answers: dict[str, str], cfg: TrainConfig,
          soft: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, args: argparse.Namespace) -> bool:
    """Train, save, reload and grade one adapter; installs it under `args.out` only if it passes the test split."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32).eval()
    data = examples(tok, answers, style, soft)
    print(f"[{style}] {len(data)} examples ({sum(e.copied for e in data)} of {sum(len(e.answer_ids) for e in data)} "
          f"answer tokens with soft targets), e.g. {tok.decode(data[0].answer_ids)!r}", flush=True)
    start = time.monotonic()
    trained = train(model, data, cfg, tok.pad_token_id)
    print(f"[{style}] trained {cfg} in {time.monotonic() - start:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{style}-", dir=args.out))
    try:
        save_fp16(trained, tmp)
        # Grade what is shipped: the fp16 files loaded back through PEFT onto the plain base model.
        reloaded = PeftModel.from_pretrained(trained.unload(), tmp).eval()
        start = time.monotonic()
        rates = {split: report(style, split, grade(reloaded, tok, style, held_out(split, answers), answers),
                               args.verbose) for split in args.split}
        size = (tmp / "adapter_model.safetensors").stat().st_size
        print(f"[{style}] graded in {time.monotonic() - start:.0f} s; adapter_model.safetensors {size / 1e6:.2f} MB",
              flush=True)
        passed = "test" not in rates or rates["test"] >= args.pass_rate
        if passed and not args.no_install:
            install(tmp, args.out / style)
        return passed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=cache_root() / "demo-adapters", help="where <name>/ dirs go")
    p.add_argument("--only", nargs="+", choices=list(STYLES), default=list(STYLES), metavar="NAME")
    # Each of these overrides the style's own STYLE_CONFIGS entry when given.
    p.add_argument("--rank", type=int)
    p.add_argument("--targets", choices=sorted(TARGET_SETS))
    p.add_argument("--layers", type=int, help=f"LoRA on the last N of the {NUM_LAYERS} layers")
    p.add_argument("--steps", type=int, help="optimizer steps per adapter")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--distill", action=argparse.BooleanOptionalAction,
                   help="soft targets from the base model on the tokens an answer copies (--no-distill: plain "
                        "cross-entropy on every answer token)")
    p.add_argument("--split", nargs="+", choices=("dev", "test"), default=["test"],
                   help="grade on these held-out splits (dev: for choosing --rank/--steps; test: the install gate)")
    p.add_argument("--no-install", action="store_true", help="grade only (a sweep)")
    p.add_argument("--pass-rate", type=float, default=PASS_RATE,
                   help="install an adapter only at this share of the test split or more (default: the bar, 0.95)")
    p.add_argument("--verbose", action="store_true", help="print every graded answer, not only the failures")
    p.add_argument("--answers", type=Path, help="JSON cache of the base answers (reused if present)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default); on a shared 2-core machine 1 thread ran ~5x "
                        "faster than 2 (bench/README.md: a busy core stalls every OpenMP barrier)")
    return p.parse_args(argv)


def style_config(style: str, args: argparse.Namespace) -> TrainConfig:
    """The style's STYLE_CONFIGS entry with the flags given on the command line in place of its fields."""
    given = {f: getattr(args, f) for f in ("rank", "targets", "layers", "steps", "batch_size", "lr", "distill")
             if getattr(args, f) is not None}
    return dataclasses.replace(STYLE_CONFIGS[style], **given)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(demo_model_dir())
    start = time.monotonic()
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32).eval()
    answers = base_answers(base, tok, all_questions(), args.answers)
    print(f"base answers for {len(answers)} questions in {time.monotonic() - start:.0f} s; held out where the base "
          f"is right: dev {len(held_out('dev', answers))}, test {len(held_out('test', answers))}", flush=True)
    configs = {style: style_config(style, args) for style in args.only}
    soft = None
    if any(cfg.distill for cfg in configs.values()):
        start = time.monotonic()
        soft = teachers(base, tok, answers)
        print(f"soft targets for {len(soft)} training answers in {time.monotonic() - start:.0f} s", flush=True)
    failed = [s for s, cfg in configs.items() if not build(s, tok, answers, cfg, soft if cfg.distill else None, args)]
    if failed:
        print(f"below {args.pass_rate:.0%} on the test split (not installed): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
