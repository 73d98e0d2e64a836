"""Terminal subcommands of `loraplex` that talk to a running server through `LoraplexClient`:
`generate`, `adapters ls|show|add|upload|rm` and `bench`.

`--url`, `--api-key` and `--admin-key` come from the flags or from LORAPLEX_URL, LORAPLEX_API_KEY and
LORAPLEX_ADMIN_KEY. A server error answer or an unreachable server prints `loraplex: error: <message>` to
stderr and exits 1; a bad local argument (an adapter dir without its files) exits 2, as argparse does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TextIO

import httpx

from loraplex.clients.client import Adapter, LoraplexClient, LoraplexError

DEFAULT_URL = "http://127.0.0.1:8000"
Handler = Callable[[LoraplexClient, argparse.Namespace], int]


class CliError(Exception):
    """An error to print as `loraplex: error: <message>` with exit status `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---- parser ------------------------------------------------------------------------------------------------


def _connection_flags() -> argparse.ArgumentParser:
    """The flags every client subcommand takes (a parent parser, so they go after the subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"server URL (env LORAPLEX_URL; default {DEFAULT_URL})")
    common.add_argument("--api-key", help="key for generation routes (env LORAPLEX_API_KEY)")
    common.add_argument("--admin-key", help="key for adapter routes (env LORAPLEX_ADMIN_KEY)")
    common.add_argument("--timeout", type=float, default=300.0, help="seconds per HTTP read (default 300)")
    return common


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Register `generate`, `adapters` and `bench` on the `loraplex` subparsers."""
    common = _connection_flags()
    _add_generate(sub, common)
    _add_adapters(sub, common)
    _add_bench(sub, common)


def _add_generate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[common], help="stream a completion to the terminal")
    p.add_argument("prompt", help="the prompt (the user message with --chat); - reads it from standard input")
    p.add_argument("--adapter", help="adapter name (default: the base model)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions with the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.set_defaults(client_handler=cmd_generate)


def _add_adapters(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("adapters", parents=[common], help="list, show, register, upload and remove adapters "
                                                          "(no verb: ls)")
    p.set_defaults(client_handler=cmd_adapters_ls)  # `loraplex adapters` alone lists them
    verbs = p.add_subparsers(dest="adapters_command", metavar="{ls,show,add,upload,rm}")
    verbs.add_parser("ls", parents=[common], help="table of registered adapters").set_defaults(
        client_handler=cmd_adapters_ls)
    show = verbs.add_parser("show", parents=[common], help="one adapter's record as JSON")
    show.add_argument("name")
    show.set_defaults(client_handler=cmd_adapters_show)
    add = verbs.add_parser("add", parents=[common], help="register a PEFT dir by its path on the server")
    add.add_argument("name")
    add.add_argument("path", help="path inside the server's --adapter-root, or an s3:// URL")
    add.add_argument("--pinned", action="store_true", help="never evict it from the device slots")
    add.set_defaults(client_handler=cmd_adapters_add)
    upload = verbs.add_parser("upload", parents=[common], help="upload a local PEFT dir (or .tar.gz)")
    upload.add_argument("name")
    upload.add_argument("dir", help="dir holding adapter_config.json and adapter_model.safetensors")
    upload.add_argument("--pinned", action="store_true", help="never evict it from the device slots")
    upload.set_defaults(client_handler=cmd_adapters_upload)
    rm = verbs.add_parser("rm", parents=[common], help="unregister an adapter")
    rm.add_argument("name")
    rm.set_defaults(client_handler=cmd_adapters_rm)


def _add_bench(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], help="a short streamed load test against a running server")
    p.add_argument("--requests", type=int, default=16, help="requests in all (default 16)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    p.add_argument("--prompt", default="Hello, my name is", help="the prompt every request sends")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME",
                   help="adapter to use, round-robin when repeated (default: the base model)")
    p.set_defaults(client_handler=cmd_bench)


# ---- running a command -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the parsed client subcommand; errors -> `loraplex: error: ...` on stderr and a non-zero status."""
    url = args.url or os.environ.get("LORAPLEX_URL") or DEFAULT_URL
    api_key = args.api_key or os.environ.get("LORAPLEX_API_KEY") or None
    admin_key = args.admin_key or os.environ.get("LORAPLEX_ADMIN_KEY") or None
    try:
        with LoraplexClient(url, api_key=api_key, admin_key=admin_key, timeout=args.timeout) as client:
            return args.client_handler(client, args)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except LoraplexError as exc:
        return _fail(f"{exc.message} (HTTP {exc.status})", 1)
    except httpx.ConnectError as exc:
        return _fail(f"cannot connect to {url}: {exc} (is `loraplex serve` running? set --url or LORAPLEX_URL)", 1)
    except httpx.TransportError as exc:
        return _fail(f"{url}: {type(exc).__name__}: {exc}", 1)
    except FileNotFoundError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, code: int) -> int:
    sys.stdout.flush()
    print(f"loraplex: error: {message}", file=sys.stderr)
    return code


def _base_model(client: LoraplexClient) -> str:
    """The served base model's name: the model in /v1/models without a parent."""
    bases = [m.id for m in client.models() if m.parent is None]
    if not bases:
        raise CliError("the server lists no base model in /v1/models")
    return bases[0]


# ---- generate ----------------------------------------------------------------------------------------------


def cmd_generate(client: LoraplexClient, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Stream the answer to stdout, each delta written and flushed as it arrives."""
    out = out or sys.stdout
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise CliError("the prompt is empty" + (" (nothing on standard input)" if args.prompt == "-" else ""), 2)
    model = args.adapter or _base_model(client)
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.chat:
        deltas = client.stream_chat(model, [{"role": "user", "content": prompt}], **params)
    else:
        deltas = client.stream(model, prompt, **params)
    wrote = False
    try:
        for delta in deltas:
            out.write(delta)
            out.flush()
            wrote = True
    except BaseException:
        if wrote:  # end the partial answer's line so that the error message starts on its own
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    out.flush()
    return 0


# ---- adapters ----------------------------------------------------------------------------------------------

_COLUMNS = ("NAME", "RANK", "TIER", "STATE", "PINNED")


def _row(a: Adapter) -> tuple[str, ...]:
    return (a.name, "-" if a.rank is None else str(a.rank), a.tier, a.state, "yes" if a.pinned else "no")


def format_table(adapters: Sequence[Adapter]) -> str:
    rows = [_COLUMNS, *(_row(a) for a in sorted(adapters, key=lambda a: a.name))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _summary(verb: str, a: Adapter) -> str:
    return f"{verb} {a.name}: rank {a.rank}, tier {a.tier}, state {a.state}, pinned {'yes' if a.pinned else 'no'}"


def cmd_adapters_ls(client: LoraplexClient, args: argparse.Namespace) -> int:
    print(format_table(client.list_adapters()))
    return 0


def cmd_adapters_show(client: LoraplexClient, args: argparse.Namespace) -> int:
    print(json.dumps(client.get_adapter(args.name).raw, indent=2, sort_keys=True))
    return 0


def cmd_adapters_add(client: LoraplexClient, args: argparse.Namespace) -> int:
    print(_summary("added", client.register_adapter(args.name, args.path, pinned=args.pinned)))
    return 0


def cmd_adapters_upload(client: LoraplexClient, args: argparse.Namespace) -> int:
    print(_summary("uploaded", client.upload_adapter(args.name, args.dir, pinned=args.pinned)))
    return 0


def cmd_adapters_rm(client: LoraplexClient, args: argparse.Namespace) -> int:
    print(f"removed {client.delete_adapter(args.name).name}")
    return 0


# ---- bench -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One streamed request: seconds to the first text, seconds per output token after it, output tokens."""

    ttft_s: float
    tpot_s: float | None  # None with a single output token
    tokens: int


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _one_request(client: LoraplexClient, model: str, prompt: str, max_tokens: int) -> Sample:
    """With ignore_eos every request generates exactly `max_tokens` tokens (a chunk may carry several, or
    none while the detokenizer holds back a partial character), so TPOT is the span from the first chunk to
    the last over `max_tokens - 1`."""
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in client.stream(model, prompt, max_tokens=max_tokens, temperature=0,
                                                         ignore_eos=True)]
    if not stamps:
        raise CliError(f"{model}: the stream carried no text")
    tpot = (stamps[-1] - stamps[0]) / (max_tokens - 1) if max_tokens > 1 else None
    return Sample(stamps[0] - start, tpot, max_tokens)


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {percentile(values, 50) * 1e3:.1f} ms  p99 {percentile(values, 99) * 1e3:.1f} ms"


def cmd_bench(client: LoraplexClient, args: argparse.Namespace) -> int:
    """Run the requests with a progress bar on stderr, then print one table of the results on stdout."""
    from tqdm import tqdm  # imported here: the other verbs need no progress bar

    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        raise CliError("--requests, --concurrency and --max-tokens must be at least 1", 2)
    models = args.adapter or [_base_model(client)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool, \
            tqdm(total=args.requests, desc="bench", unit="req", file=sys.stderr) as bar:
        futures = [pool.submit(_one_request, client, models[i % len(models)], args.prompt, args.max_tokens)
                   for i in range(args.requests)]
        for future in as_completed(futures):
            bar.update(1)
            if future.exception() is not None:
                bar.set_postfix_str("errors", refresh=False)
    elapsed = time.perf_counter() - start
    samples, errors = [], []
    for f in futures:
        exc = f.exception()
        (errors if exc else samples).append(exc or f.result())
    if not samples:
        raise errors[0]
    print(bench_table(samples, len(errors), elapsed, args.concurrency, models))
    if errors:
        print(f"first error: {errors[0]}", file=sys.stderr)
    return 1 if errors else 0


def bench_table(samples: Sequence[Sample], failed: int, elapsed: float, concurrency: int,
                models: Sequence[str]) -> str:
    """The results as a two-column table (label, value)."""
    tokens = sum(s.tokens for s in samples)
    rows = [
        ("requests:", f"{len(samples)} ok, {failed} failed in {elapsed:.2f} s"),
        ("concurrency:", f"{concurrency} ({', '.join(models)})"),
        ("req/s:", f"{len(samples) / elapsed:.2f}"),
        ("output tok/s:", f"{tokens / elapsed:.1f}"),
        ("TTFT:", _ms([s.ttft_s for s in samples])),
        ("TPOT:", _ms([s.tpot_s for s in samples if s.tpot_s is not None])),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
