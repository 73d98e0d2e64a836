"""Structured output: a grammar per sequence, turned into one bitmask row of allowed tokens per step.

Requests ask for JSON (`response_format` `json_object` / `json_schema`) or use the vLLM extensions
`guided_regex` / `guided_choice`; the API layer turns them into a `GuidedSpec`. `GuidedCompiler.compile`
(HTTP worker threads, LRU-cached) makes a `CompiledGrammar`; each generating sequence gets its own
`GuidedState` from it. Per engine step, `fill_bitmasks` writes one int32 row per guided sequence on the CPU,
`apply_bitmask` masks those rows of the logits on the engine's device, and the sampled token goes back
through `GuidedState.accept`. Rows without a grammar are never touched.

Bitmask layout (llguidance's and xgrammar's): a row is ceil(vocab_size / 32) int32 words, bit j of word w
is token 32w + j, 1 = allowed. EOS is allowed exactly when the grammar is complete; ids the tokenizer does
not have (a model's padded vocabulary) and special tokens other than EOS are never allowed.

A mask never lets through a token the parser would refuse, and never offers EOS where the output would be
incomplete, whatever the tokenizer: llguidance's row is corrected where it can be wrong. A state in error (a
lexer limit hit mid-way) allows nothing (llguidance would offer only EOS, and a request would end "stop" with
invalid text); EOS is cleared unless the grammar accepts; and where the vocabulary lacks some bytes (a
byte-level BPE trained on a small corpus), a state whose forced continuation holds such a byte allows nothing
(llguidance then offers tokens that do not start with the forced bytes, which its parser refuses). An empty row
fails the request with the reason (`GuidedState.dead_end`). Whatever can be seen at the grammar's start is
refused at compile time instead (`GuidedError`, a 400 before admission): a grammar the library cannot build or
that hits a limit at once, one that allows no output, and one whose forced start this vocabulary cannot spell.

The library is llguidance, chosen by measurement (bench/bench_guided.py, bench/results/guided.json): every
random output valid on every test grammar (xgrammar 0.2.9 let raw control characters into strings with
`maxLength`: invalid JSON), grammars compile in 0.6-4 ms at vocab 49152 without holding the GIL (xgrammar:
24-78 ms, holding it), and per-token masks cost tens of microseconds for JSON, as xgrammar's do.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import llguidance
import llguidance.hf
import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GuidedKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]

# The request field each kind comes from: GuidedError messages name it, so a 400 says what to fix.
FIELDS: dict[str, str] = {
    "json_object": "response_format",
    "json_schema": "response_format.json_schema.schema",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}
MAX_SPEC_BYTES = 64 * 1024  # a schema's canonical JSON text, or a regex
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
CACHE_SIZE = 256  # compiled grammars kept per compiler (LRU)
LEXER_FUEL = 200_000  # llguidance's initial_lexer_fuel (its default: 1,000,000); see GuidedCompiler
# JSON whitespace: none but one space after ':' and ',' (`{"a": 1, "b": 2}`), as OpenAI's structured outputs
# look. Flexible whitespace lets a small model pad an object with spaces and newlines until max_tokens cuts it
# (measured: a random-weight model under a 16-character cap per gap still ran 80 tokens of whitespace).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = '{"type":"object"}'
# Batched fills go to llguidance's thread pool only from this many rows and usable CPUs: on 2 shared cores
# the pool was no reliable win (8 rows at vocab 49152, across runs: 240-890 us pooled, 240-720 us in a loop;
# bench/results/guided.json) and its threads compete with the engine's.
PARALLEL_MIN_ROWS = 4
PARALLEL_MIN_CPUS = 8


class GuidedError(ValueError):
    """A spec the engine cannot enforce: bad shape, too large, or rejected by the grammar library. The
    message is "`field`: `reason`", `field` the OpenAI request field at fault; an API naming it otherwise
    (TGI's `parameters.grammar.value`, vLLM's `guided_json`) puts its own name before `reason`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


# ---- specs -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidedSpec:
    """What a request constrains its output to; hashable (the compile cache's key).

    `value`: a schema's canonical JSON text (json_schema), a regex, the tuple of choices, or None
    (json_object). Build it with the classmethods, which validate cheaply; the library validates the rest
    at compile time.
    """

    kind: GuidedKind
    value: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        expected = {"json_object": type(None), "json_schema": str, "regex": str, "choice": tuple,
                    "grammar": str}.get(self.kind)
        if expected is None:
            raise ValueError(f"unknown guided kind {self.kind!r}; expected one of {sorted(FIELDS)}")
        if not isinstance(self.value, expected):
            raise ValueError(f"a {self.kind} spec holds a {expected.__name__}, got {type(self.value).__name__}")

    @property
    def field(self) -> str:
        return FIELDS[self.kind]

    @classmethod
    def json_object(cls) -> GuidedSpec:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> GuidedSpec:
        """`schema` as a dict or JSON text. Canonical text: compact separators, key order kept (the order of
        `properties` is the order the output's keys are generated in, as OpenAI does)."""
        field = FIELDS["json_schema"]
        if isinstance(schema, str):
            _check_size(field, schema)
            schema = _parse_json(field, schema)
        if not isinstance(schema, dict):
            raise GuidedError(field, f"must be a JSON object, got {type(schema).__name__}")
        try:
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise GuidedError(field, f"is not plain JSON ({exc})") from None
        _check_size(field, text)
        return cls("json_schema", text)

    @classmethod
    def regex(cls, pattern: str) -> GuidedSpec:
        """The whole output must match `pattern` (Rust `regex` syntax: no look-around, no backreferences)."""
        field = FIELDS["regex"]
        if not isinstance(pattern, str) or not pattern:
            raise GuidedError(field, "must be a non-empty string")
        _check_size(field, pattern)
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, lark: str) -> GuidedSpec:
        """The whole output must match the grammar `lark` (llguidance's Lark syntax: `start: ...` rules)."""
        field = FIELDS["grammar"]
        if not isinstance(lark, str) or not lark.strip():
            raise GuidedError(field, "must be a non-empty string")
        _check_size(field, lark)
        return cls("grammar", lark)

    @classmethod
    def choice(cls, options: Sequence[str]) -> GuidedSpec:
        """The output is exactly one of `options` (duplicates dropped, order kept)."""
        field = FIELDS["choice"]
        if isinstance(options, str | bytes) or not isinstance(options, Sequence):
            raise GuidedError(field, "must be a list of strings")
        if not 1 <= len(options) <= MAX_CHOICES:
            raise GuidedError(field, f"must hold 1 to {MAX_CHOICES} choices, got {len(options)}")
        for i, option in enumerate(options):
            if not isinstance(option, str) or not option or len(option) > MAX_CHOICE_CHARS:
                raise GuidedError(field, f"choice {i} must be a non-empty string of at most {MAX_CHOICE_CHARS} "
                                         "characters")
        return cls("choice", tuple(dict.fromkeys(options)))


def _check_size(field: str, text: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise GuidedError(field, f"is {size} bytes; at most {MAX_SPEC_BYTES} are accepted")


def _parse_json(field: str, text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise GuidedError(field, f"is not valid JSON ({exc})") from None


# ---- compiling ---------------------------------------------------------------------------------------------
class CompiledGrammar:
    """One compiled spec, shared by every request that asks for it: a pristine llguidance matcher that new
    states deep-copy (microseconds). Immutable once published."""

    __slots__ = ("spec", "vocab_size", "words", "vocab", "_template")

    def __init__(self, spec: GuidedSpec, template: llguidance.LLMatcher, vocab_size: int, words: int,
                 vocab: _Vocabulary) -> None:
        # words: the library's row width, ceil(max(vocab_size, len(tokenizer)) / 32)
        self.spec, self._template, self.vocab_size, self.words = spec, template, vocab_size, words
        self.vocab = vocab

    def new_state(self) -> GuidedState:
        """A state at the grammar's start, for one generating sequence."""
        return GuidedState(self, self._template.deep_copy())


class GuidedCompiler:
    """Compiles specs for one tokenizer and one logits width; thread-safe, with an LRU cache.

    `vocab_size` is the model's logits width (it may exceed `len(tokenizer)`: ids past the tokenizer are
    never allowed). `eos_token_ids`: every id that ends a sequence for the engine (default: the tokenizer's
    EOS); the mask allows them exactly when the grammar may end. Building llguidance's view of the
    tokenizer costs ~0.5-0.9 s for a 49k vocabulary, holding the GIL, so it happens once, here: build the
    compiler before serving. A tokenizer llguidance cannot read (not a fast one) raises ValueError.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                 eos_token_ids: Sequence[int] | None = None, cache_size: int = CACHE_SIZE) -> None:
        if vocab_size < 1 or cache_size < 1:
            raise ValueError(f"vocab_size and cache_size must be >= 1, got {vocab_size} and {cache_size}")
        # llguidance refuses a vocabulary smaller than the tokenizer's: a model whose logits are narrower
        # than its tokenizer gets masks at the tokenizer's width, cut down in fill_bitmasks.
        n_vocab = max(vocab_size, len(tokenizer))
        eos = [t for t in (eos_token_ids or [tokenizer.eos_token_id]) if t is not None and 0 <= t < vocab_size]
        if not eos:
            raise ValueError(f"no EOS id inside the vocabulary of {vocab_size}: pass eos_token_ids")
        self.vocab_size, self.words = vocab_size, (n_vocab + 31) // 32
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos)
        self._vocab = _Vocabulary(self._tokenizer, n_vocab, eos)
        # verbose_errors=False: a rejected spec's message is the reason, not a dump of parser state.
        # initial_lexer_fuel: a fifth of the library's default. What a regex may cost to analyse before it is refused:
        # `(?:a{1000}){1000}` took 1.8-2.9 s and +254 MiB to refuse at the default, 0.2-0.5 s and +25-49 MiB here;
        # JSON schemas with 60 patterned fields, 256-value enums of 200 characters, 256 choices of 1,000 characters,
        # formats (email, date-time, uuid) need far less (measured).
        self._limits = llguidance.LLParserLimits(verbose_errors=False, initial_lexer_fuel=LEXER_FUEL)
        # Refusals are cached too: a spec that fails to compile may cost a few hundred milliseconds each time.
        self._cache: OrderedDict[GuidedSpec, CompiledGrammar | GuidedError] = OrderedDict()
        self._pending: dict[GuidedSpec, Future[CompiledGrammar]] = {}
        self._lock = threading.Lock()
        self._cache_size = cache_size
        # The first mask ever computed with a tokenizer builds its token trie lazily (~3 ms at 49k tokens):
        # pay it here rather than in the first guided request's engine step.
        self.compile(GuidedSpec.json_object())

    def compile(self, spec: GuidedSpec) -> CompiledGrammar:
        """The compiled grammar for `spec` (cached). Concurrent calls for one spec compile it once; the
        library drops the GIL while it builds. Raises GuidedError naming the field when the library rejects
        the spec."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                if isinstance(hit, GuidedError):
                    raise GuidedError(hit.field, hit.reason)
                return hit
            pending = self._pending.get(spec)
            owner = pending is None
            if owner:
                pending = self._pending[spec] = Future()
        if not owner:
            return pending.result()
        try:
            compiled = self._build(spec)
        except BaseException as exc:
            self._settle(spec, exc if isinstance(exc, GuidedError) else None)
            pending.set_exception(exc)
            raise
        self._settle(spec, compiled)
        pending.set_result(compiled)
        return compiled

    def cached(self) -> int:
        """Compiled grammars in the cache (refusals not counted)."""
        with self._lock:
            return sum(not isinstance(v, GuidedError) for v in self._cache.values())

    def _settle(self, spec: GuidedSpec, compiled: CompiledGrammar | GuidedError | None) -> None:
        with self._lock:
            del self._pending[spec]
            if compiled is None:
                return
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _build(self, spec: GuidedSpec) -> CompiledGrammar:
        matcher = llguidance.LLMatcher(self._tokenizer, _grammar(spec), log_level=0, limits=self._limits)
        if matcher.is_error():
            raise GuidedError(spec.field, f"cannot be enforced: {_clean(matcher.get_error())}")
        compiled = CompiledGrammar(spec, matcher, self.vocab_size, self.words, self._vocab)
        _probe(compiled)
        return compiled


def _probe(compiled: CompiledGrammar) -> None:
    """Refuse (GuidedError) what the grammar's start already shows it cannot honour, on copies (the template stays
    at the start). Lexer states (and, the first time, the tokenizer's trie: ~3 ms at 49k tokens) are built lazily
    and shared by copies, so this also moves that cost off the engine thread.

    - the first mask: the library failing (a limit), no token allowed, or a forced start this vocabulary cannot
      spell;
    - the output the grammar forces from there, consumed: a grammar that forces output without end (a `$ref`
      cycle whose every branch is required) hits the parser's item limit here, in tens of milliseconds;
    - a second start: lexer states the first mask built count against the library's limits for every copy after
      it (`(?:a{1000}){1000}` passes the first mask and fails all later ones).
    """
    start = compiled.new_state()
    unspellable = compiled.vocab.unspellable(start._matcher.compute_ff_bytes()) if compiled.vocab.missing else None
    if unspellable is not None:
        raise GuidedError(compiled.spec.field, f"cannot be enforced: {unspellable}")
    _check_row(start)
    forced = start._matcher.compute_ff_tokens()
    if forced:
        if not start._matcher.consume_tokens(forced) or start._matcher.is_error():
            raise GuidedError(compiled.spec.field, f"cannot be enforced: {_clean(start._matcher.get_error())}")
        _check_row(start)
    _check_row(compiled.new_state())


def _check_row(state: GuidedState) -> None:
    row = torch.empty(1, state.grammar.words, dtype=torch.int32)
    _fill_into([state], row, parallel=False)
    field = state.grammar.spec.field
    if state.dead_end is not None:
        raise GuidedError(field, f"cannot be enforced: {state.dead_end}")
    if not row.any():
        raise GuidedError(field, "cannot be enforced: it allows no output that this model's vocabulary can spell")


def _grammar(spec: GuidedSpec) -> str:
    """The llguidance grammar text of a spec."""
    matcher = llguidance.LLMatcher
    if spec.kind == "regex":
        return matcher.grammar_from_regex(spec.value)
    if spec.kind == "grammar":
        return matcher.grammar_from_lark(spec.value)
    if spec.kind == "choice":
        # Lark string literals take JSON escapes: quotes, backslashes and control characters are safe.
        return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.value))
    schema = spec.value if spec.kind == "json_schema" else _ANY_OBJECT
    try:
        return matcher.grammar_from_json_schema(schema, overrides=_json_options(schema))
    except ValueError as exc:
        raise GuidedError(spec.field, f"cannot be enforced: {_clean(str(exc))}") from None


def _json_options(schema: str) -> dict[str, object]:
    """Our compact JSON layout, unless the schema's `x-guidance` sets a `whitespace_pattern` (vLLM's field): then
    the separators are bare and every gap between tokens matches that pattern."""
    options = json.loads(schema).get("x-guidance")
    if isinstance(options, dict) and "whitespace_pattern" in options:
        return {**_JSON_OPTIONS, "item_separator": ",", "key_separator": ":"}
    return _JSON_OPTIONS


def _clean(message: str) -> str:
    """The library's reason on one line: no grammar-source excerpt, no state marker, bounded length."""
    message = message.replace("<non-verbose/>", "")
    if message.strip() == "NoExtensionBias":  # llguidance's name for "the mask came out empty"
        return "no token can continue the output here (the grammar allows nothing more, or nothing this model's " \
               "vocabulary can spell)"
    message = re.sub(r"^at \d+\(\d+\): ", "", message)  # a position in the generated grammar text, not the user's
    message = re.split(r"\n\s*\d+ \|", message)[0]  # a lark source excerpt follows the reason
    message = re.sub(r"\s+", " ", message).strip()
    return message if len(message) <= 500 else message[:497] + "..."


class _Vocabulary:
    """What a mask needs beyond llguidance's own view of the tokenizer: where the EOS bits are, and the bytes no
    token holds (none for a byte-level BPE with all 256 bytes, or a byte-fallback vocabulary; some for a BPE trained
    on a small corpus). Built once per compiler: one decode per token (~50 ms at 49k tokens)."""

    __slots__ = ("eos_keep", "missing")

    def __init__(self, tokenizer: llguidance.LLTokenizer, n_vocab: int, eos: Sequence[int]) -> None:
        # (word, int32 with every bit set but the EOS token's): `row[word] &= keep` clears it
        self.eos_keep = tuple((t // 32, _int32(~(1 << (t % 32)))) for t in eos)
        held: set[int] = set()
        for token in range(n_vocab):
            if not tokenizer.is_special_token(token):
                held.update(tokenizer.decode_bytes([token]))
        self.missing = _UTF8_BYTES - held

    def unspellable(self, forced: bytes) -> str | None:
        """Why `forced` (bytes the grammar requires next) cannot be written with this vocabulary; None if it can."""
        bad = sorted({b for b in forced if b in self.missing})
        if not bad:
            return None
        text = forced.decode("utf-8", "replace")
        shown = ", ".join(repr(chr(b)) if 32 <= b < 127 else f"0x{b:02x}" for b in bad)
        return (f"the output must continue with {text[:80]!r}, which this model's vocabulary cannot spell (no token "
                f"holds {shown})")


# Bytes that occur in UTF-8 text (0xC0, 0xC1 and 0xF5-0xFF never do): the only ones a grammar can force.
_UTF8_BYTES = frozenset(range(0xC0)) | frozenset(range(0xC2, 0xF5))


def _int32(value: int) -> int:
    return (value + 2**31) % 2**32 - 2**31


# ---- per-sequence state -------------------------------------------------------------------------------------
class GuidedState:
    """Where one generating sequence is in its grammar. Engine thread only."""

    __slots__ = ("grammar", "_matcher", "dead_end")

    def __init__(self, grammar: CompiledGrammar, matcher: llguidance.LLMatcher) -> None:
        self.grammar, self._matcher = grammar, matcher
        # Set by each fill: why no token may follow (the row allowed nothing), None while the grammar can go on.
        self.dead_end: str | None = None

    def fill(self, bitmask_row: torch.Tensor) -> None:
        """Write the tokens allowed next into `bitmask_row` [ceil(vocab_size / 32)] int32, CPU, contiguous."""
        if bitmask_row.dim() != 1:
            raise ValueError(f"bitmask_row must be 1-D, got shape {tuple(bitmask_row.shape)}")
        fill_bitmasks([self], self.grammar.vocab_size, out=bitmask_row.unsqueeze(0))

    def accept(self, token: int) -> bool:
        """Advance by the sampled token. False: the token breaks the grammar (the state is dead from then on:
        fail the request)."""
        return self._matcher.consume_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and nothing but EOS can follow: the sequence is done."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def can_end(self) -> bool:
        """EOS is allowed now (the output so far is complete, though it may go on: `"yes"` of `yes|yes sir`)."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        """Why the state died (a refused token), None while it is alive."""
        return _clean(self._matcher.get_error()) if self._matcher.is_error() else None

    def copy(self) -> GuidedState:
        """An independent state at the same point (a deep copy: microseconds)."""
        return GuidedState(self.grammar, self._matcher.deep_copy())

    def _correct(self, row: np.ndarray) -> None:
        """Fix llguidance's row [W] int32 where it can be wrong (module docstring) and set `dead_end`."""
        self.dead_end = self._find_dead_end()
        if self.dead_end is not None:
            row[:] = 0
        elif not self._matcher.is_accepting():
            for word, keep in self.grammar.vocab.eos_keep:
                row[word] &= keep

    def _find_dead_end(self) -> str | None:
        if self._matcher.is_error():
            return f"the grammar failed: {_clean(self._matcher.get_error())}"
        if not self.grammar.vocab.missing:
            return None
        return self.grammar.vocab.unspellable(self._matcher.compute_ff_bytes())


# ---- batches ------------------------------------------------------------------------------------------------
_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def _parallel() -> llguidance.LLExecutor:
    """llguidance's thread pool for batched fills (created on first use; its default size: 80% of the CPUs,
    at most 32)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def fill_bitmasks(states: Sequence[GuidedState], vocab_size: int, out: torch.Tensor | None = None,
                  parallel: bool | None = None) -> torch.Tensor:
    """Bitmask rows for `states` → [M, ceil(vocab_size / 32)] int32 on the CPU (row i ↔ states[i]).

    The library drops the GIL while it fills. `parallel`: fill on llguidance's thread pool (None: when there
    are PARALLEL_MIN_ROWS rows and PARALLEL_MIN_CPUS usable CPUs). `out` (e.g. pinned memory, reused across
    steps) receives the rows when given.
    """
    if parallel is None:
        parallel = len(states) >= PARALLEL_MIN_ROWS and _usable_cpus() >= PARALLEL_MIN_CPUS
    words = (vocab_size + 31) // 32
    if out is None:
        out = torch.empty(len(states), words, dtype=torch.int32)
    _check_bitmask(out, words, rows=len(states))
    if not states:
        return out
    compiled_for = {(s.grammar.vocab_size, s.grammar.words) for s in states}
    if len(compiled_for) != 1 or next(iter(compiled_for))[0] != vocab_size:
        raise ValueError(f"states compiled for vocab sizes {sorted(v for v, _ in compiled_for)}, "
                         f"filled for {vocab_size}")
    library_words = next(iter(compiled_for))[1]
    if library_words == words:
        _fill_into(states, out, parallel)
    else:  # logits narrower than the tokenizer: fill at the tokenizer's width, keep the head
        wide = torch.empty(len(states), library_words, dtype=torch.int32)
        _fill_into(states, wide, parallel)
        out.copy_(wide[:, :words])
    if vocab_size % 32:  # bits past vocab_size in the last word: never allowed
        out[:, -1] &= (1 << (vocab_size % 32)) - 1
    return out


def _fill_into(states: Sequence[GuidedState], out: torch.Tensor, parallel: bool) -> None:
    """out [M, W] int32 (W = the states' width), CPU, contiguous: row i at data_ptr + i * 4W bytes; then each row
    corrected (GuidedState._correct)."""
    row_bytes = 4 * out.shape[1]
    if parallel and len(states) > 1:
        pairs = [(s._matcher, i) for i, s in enumerate(states)]
        _parallel().unsafe_compute_mask_ptr(pairs, out.data_ptr(), row_bytes, out.shape[0])
    else:
        base = out.data_ptr()
        for i, state in enumerate(states):
            state._matcher.unsafe_compute_mask_ptr(base + i * row_bytes, row_bytes)
    rows = out.numpy()  # a view: scalar edits cost ~100 ns here, microseconds through torch
    for i, state in enumerate(states):
        state._correct(rows[i])


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_bitmask(bitmask: torch.Tensor, words: int, rows: int | None = None) -> None:
    """The library writes through a raw pointer: refuse anything but a CPU, contiguous int32 [rows, words]."""
    shape_ok = bitmask.dim() == 2 and bitmask.shape[1] == words and (rows is None or bitmask.shape[0] == rows)
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous() or not shape_ok:
        raise ValueError(f"bitmask must be a contiguous CPU int32 tensor of {rows or 1} x {words} words, got "
                         f"{bitmask.dtype} {tuple(bitmask.shape)} on {bitmask.device}")


# ---- applying on the device ----------------------------------------------------------------------------------
def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[M, W] int32 → [M, vocab_size] bool (True = allowed), on bitmask's device; ids past W*32 are False."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # >> is arithmetic on int32: bit 31 of a negative word still lands in bit 0 before & 1.
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool()  # [M, W, 32]
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :vocab_size]
    if allowed.shape[1] < vocab_size:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)
    return allowed


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """logits [N, V] with rows `rows` [M] masked by `bitmask` [M, W] (disallowed → -inf); out of place, on
    logits' device. A CPU bitmask is copied there (non_blocking: asynchronous from pinned memory). Rows not
    listed are returned unchanged."""
    rows = torch.as_tensor(rows, dtype=torch.long, device=logits.device)
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])  # [M, V]
    masked = logits.index_select(0, rows).masked_fill(~allowed, float("-inf"))  # [M, V]
    return logits.index_copy(0, rows, masked)
