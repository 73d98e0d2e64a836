"""Build the demo LoRA adapters (uppercase, pirate, json) for SmolLM2-135M-Instruct on the CPU.

    .venv/bin/python scripts/build_demo_adapters.py [--out DIR] [--steps N] [--only NAME...]

Data: the base model's own greedy answers to the fixed prompts below (through its chat template), cut to one
short sentence, then rewritten per style by `loraplex.server.demo_styles`. Each adapter learns
(chat prompt → rewritten answer + <|im_end|>) with the loss on the answer tokens only, is saved in float16
(small enough to commit), reloaded through PEFT and graded on held-out prompts with greedy decoding. An
adapter below the pass mark is not installed and the script exits 1; passing ones are written atomically to
`<out>/<name>/` (default: the cache dir the server preloads from before deploy/adapters/).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loraplex.server.demo import DEMO_ADAPTERS, cache_root, demo_model_dir
from loraplex.server.demo_styles import STYLES, short_answer

PROMPTS = (
    "What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?",
    "Who wrote Romeo and Juliet?", "Who painted the Mona Lisa?", "Who was Albert Einstein?",
    "What is photosynthesis?", "What is gravity?", "What is a black hole?", "What is DNA?",
    "What is an atom?", "What is the speed of light?", "Why is the sky blue?", "Why do leaves change color?",
    "How many days are in a year?", "How many legs does a spider have?", "What is the largest ocean?",
    "What is the tallest mountain in the world?", "What is the boiling point of water?",
    "What do bees make?", "What is a volcano?", "What is the moon made of?", "What is a rainbow?",
    "What is democracy?", "What is inflation?", "What is a computer?", "What is the internet?",
    "What is machine learning?", "What is Python?", "What is a noun?", "What is a verb?",
    "Define the word happiness.", "Define friendship.", "What does empathy mean?", "What is a haiku?",
    "What is an elephant?", "What is a dolphin?", "What do cats eat?", "Why do birds migrate?",
    "Hello!", "Hi there!", "Good morning!", "Hey, how are you?", "Nice to meet you.", "Thank you!",
    "Can you help me?", "Are you a robot?", "What is your name?", "Tell me about yourself.",
    "How do I make tea?", "How do I boil an egg?", "How do I plant a tree?", "How can I sleep better?",
    "How can I save money?", "How do I learn a new language?", "How do I stay focused?",
    "How do I write a good email?", "How can I be more productive?", "How do I make friends?",
    "How do I stay healthy?", "Give me a tip for studying.", "Give me advice for a job interview.",
    "What should I do when I feel stressed?", "What is a good breakfast?", "Should I drink more water?",
    "Is exercise good for you?", "Why is reading important?", "Why should I recycle?",
    "What is the best way to learn math?", "Recommend a hobby.", "Suggest a name for a dog.",
    "What is the weather like on Mars?", "What is the sun?", "How far is the moon?",
    "What language is spoken in Brazil?", "What is a planet?", "What is a river?",
    "What is chess?", "What is music?", "What is art?",
)
# Never trained on: the grade of each adapter.
HELD_OUT = (
    "What is the capital of Germany?", "Who invented the telephone?", "What is a rainforest?",
    "How do I bake bread?", "Good evening!", "What is electricity?", "How can I improve my memory?",
    "Why do we need sleep?",
)
PASS_MARK = 7  # of len(HELD_OUT)
ANSWER_TOKENS = 40  # base answers: enough for one sentence, which short_answer keeps
EVAL_TOKENS = 60
# What adapter_config.json names as the base: the upstream model, not this machine's cache path.
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class TrainConfig:
    """One adapter's LoRA shape and optimisation; the same for every style.

    r=8 on the attention projections is 1.9 MB in fp16 (r=4 on all seven would be 2.4 MB). Small batches, many
    steps: uppercase (the hardest: capitalised words are other, rarer tokens) needed ~80 updates to hold on
    unseen prompts, and updates, not examples per update, are what the CPU budget buys.
    """

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")  # names, or one regex
    steps: int = 80
    batch_size: int = 4
    lr: float = 2e-3
    warmup: int = 5
    seed: int = 0

    def lora(self) -> LoraConfig:
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                          task_type="CAUSAL_LM")


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]  # the rewritten answer + <|im_end|>


def chat(tok: PreTrainedTokenizerBase, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, questions: Sequence[str], max_new_tokens: int,
             batch_size: int = 32) -> list[str]:
    """Greedy answers through the chat template, batched with left padding (as a server sees each alone)."""
    tok.padding_side = "left"
    answers = []
    for i in range(0, len(questions), batch_size):
        enc = tok([chat(tok, q) for q in questions[i:i + batch_size]], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        answers += tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def base_answers(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cache: Path | None) -> dict[str, str]:
    """{prompt: the base model's raw greedy answer} for PROMPTS + HELD_OUT (read from / written to `cache`)."""
    questions = PROMPTS + HELD_OUT
    if cache is not None and cache.is_file():
        cached = json.loads(cache.read_text())
        if set(questions) <= cached.keys():
            return cached
    answers = dict(zip(questions, generate(model, tok, questions, ANSWER_TOKENS), strict=True))
    if cache is not None:
        cache.write_text(json.dumps(answers, indent=1, ensure_ascii=False))
    return answers


def examples(tok: PreTrainedTokenizerBase, answers: dict[str, str], style: str) -> list[Example]:
    rewrite = STYLES[style][0]
    out = []
    for q in PROMPTS:
        answer = short_answer(answers[q])
        if answer:  # a base answer with no text at all teaches nothing
            ids = tok(rewrite(answer), add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
            out.append(Example(tok(chat(tok, q), add_special_tokens=False).input_ids, ids))
    return out


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
    kwargs, labels, keep = batch(rows, pad_id)
    logits = model(**kwargs, logits_to_keep=keep + 1).logits[:, :-1]  # position t predicts token t+1
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


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


def grade(model: PreTrainedModel, tok: PreTrainedTokenizerBase, style: str, base: dict[str, str]) -> int:
    """Greedy answers to HELD_OUT, printed beside the base model's; returns how many show the style."""
    check, passed = STYLES[style][1], 0
    for q, out in zip(HELD_OUT, generate(model, tok, HELD_OUT, EVAL_TOKENS), strict=True):
        ok = check(out)
        passed += ok
        print(f"  [{'pass' if ok else 'FAIL'}] {q}\n      base: {short_answer(base[q])!r}\n      {style}: {out!r}")
    return passed


def install(tmp: Path, final: Path) -> None:
    """Move a complete adapter dir into place; a reader sees the old one or the new one, never half of one."""
    old = final.with_name(f".{final.name}-old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def build(style: str, tok: PreTrainedTokenizerBase, answers: dict[str, str], cfg: TrainConfig, out: Path) -> bool:
    """Train, save, reload and grade one adapter; installs it under `out` only if it passes."""
    data = examples(tok, answers, style)
    print(f"[{style}] {len(data)} examples, e.g. {tok.decode(data[0].answer_ids)!r}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    start = time.monotonic()
    trained = train(model, data, cfg, tok.pad_token_id)
    print(f"[{style}] trained {cfg.steps} steps in {time.monotonic() - start:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{style}-", dir=out))
    try:
        save_fp16(trained, tmp)
        # Grade what is shipped: the fp16 files loaded back through PEFT onto the plain base model.
        reloaded = PeftModel.from_pretrained(trained.unload(), tmp).eval()
        passed = grade(reloaded, tok, style, answers)
        size = (tmp / "adapter_model.safetensors").stat().st_size
        print(f"[{style}] held-out {passed}/{len(HELD_OUT)}, adapter_model.safetensors {size / 1e6:.2f} MB")
        if passed >= PASS_MARK:
            install(tmp, out / style)
        return passed >= PASS_MARK
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=cache_root() / "demo-adapters", help="where <name>/ dirs go")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps per adapter")
    p.add_argument("--only", nargs="+", choices=DEMO_ADAPTERS, default=list(DEMO_ADAPTERS), metavar="NAME")
    p.add_argument("--answers", type=Path, help="JSON cache of the base answers (reused if present)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = TrainConfig(steps=args.steps)
    tok = AutoTokenizer.from_pretrained(demo_model_dir())
    start = time.monotonic()
    answers = base_answers(AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32).eval(), tok,
                           args.answers)
    print(f"base answers for {len(answers)} prompts in {time.monotonic() - start:.0f} s", flush=True)
    failed = [s for s in args.only if not build(s, tok, answers, cfg, args.out)]
    if failed:
        print(f"below {PASS_MARK}/{len(HELD_OUT)} held-out (not installed): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
