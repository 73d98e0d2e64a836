"""Soak test: a real `loraplex serve` on 127.0.0.1 under a bounded, seeded, mixed workload.

The server runs the tiny random Llama test model (`tiny_models.build_model_dir`) with seeded synthetic PEFT
adapters, all built in a temporary directory. For `--minutes` (default 10) concurrent client workers send:

- traffic (`--workers` of them): generation over `/v1/completions`, `/v1/chat/completions` and TGI's
  `/generate`, streamed or not, across the base model and 4 adapters (more adapters than device slots, so
  the cache churns); clients that hang up before the first token, mid-stream, or before a non-streamed
  answer; and greedy probes whose token ids must equal the solo reference taken before the load started;
- bad inputs (1 worker): every BAD_INPUTS.md generation row 20-41 that one request can show, round-robin
  in a seeded order, while the traffic runs (so each one has batch-mates);
- adapter churn (1 worker): register (path under --adapter-root, or multipart upload), send requests that
  race the deletion of their adapter, DELETE, then a request after the delete; plus bad registrations;
- hostile clients and adapters (1 worker, BAD_INPUTS.md rows 45-57, issue 20): streams that are never read
  (tiny receive windows), half-sent and silent connections, an endless header, a chunked body over the limit,
  odd logit_bias keys, a prompt far over the context, grammars over the library's limits, requests with more
  choices than one may run, ties merges with ever-new weights, and uploads: tar header bombs, adapters with a
  training-only tensor or a catastrophic rank_pattern (registered, then deleted), a backreference pattern, an
  overflowing lora_alpha.

Accounting: every request the soak sends ends in exactly one outcome recorded by the client: `completed`,
`clean_error` (a 4xx JSON error, or an error event in a stream that the contract allows), `client_abort`,
`server_error` (a 5xx or an in-stream server fault), `lost` (no answer, connection dropped) or `broken` (a
protocol violation: a stream with no terminal event, events after it, a 200 without a finish reason, a 4xx
that is not JSON). "finished" counts the first three; the check passes when finished == accepted (sent). A raw
connection the server closes by contract (408, 431, a stream cut after --stream-write-timeout) is a clean error.

Afterwards: /health and /ready, /metrics must show 0 running / 0 waiting requests and KV usage 0, and the
server must exit 0 on SIGTERM. The server's RSS (VmRSS) is sampled every 5 s; it must be flat over the second
half of the run (end within 10 % or 32 MiB of the middle).

Run: .venv/bin/python bench/soak.py [--minutes 10] [--workers 4] [--seed 0]
Writes bench/results/soak.json (soak_quick.json when --minutes < 10).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import re
import socket
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
from common import RESULTS_DIR, ServerProcess, machine_facts, print_facts, write_json  # noqa: E402
from synthetic_adapters import make_peft_adapter  # noqa: E402
from tiny_models import CORPUS, build_model_dir  # noqa: E402

from loraplex.adapters.targets import ATTENTION_TARGETS, TARGET_MODULES  # noqa: E402

BASE = "tiny-base"
VOCAB = 512  # the tiny model's vocabulary (ids 0..2 are special tokens)
MAX_MODEL_LEN = 1024  # long enough for a stream bigger than the socket buffers (the hostile worker's stalled one)
BODY_LIMIT = 65536
STABLE = {"ad-r4": (4, ATTENTION_TARGETS), "ad-r8": (8, TARGET_MODULES), "ad-r16": (16, ("q_proj", "v_proj")),
          "ad-r32": (32, ATTENTION_TARGETS)}
CHURN_SOURCES = 3
SERVER_FLAGS = ("--device", "cpu", "--dtype", "float32", "--served-model-name", BASE, "--max-lora-rank", "32",
                "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "2048", "--block-size", "8",
                "--max-loras", "2", "--max-cpu-loras", "4", "--max-num-seqs", "16", "--max-queue", "64",
                "--max-body-bytes", str(BODY_LIMIT), "--log-level", "warning",
                # the connection limits the hostile worker runs into, shorter than their defaults
                "--stream-write-timeout", "5", "--header-timeout", "3", "--body-timeout", "3",
                "--max-connections", "256")
REQUEST_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
FINISHED = ("completed", "clean_error", "client_abort")
OK = frozenset({"200"})
RACE_OK = frozenset({"200", "404", "stream_error:404", "stream_error"})
TEXTS = [line for line in CORPUS.splitlines() if line.strip()]


# ---- assets and the server ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assets:
    model: Path
    root: Path  # --adapter-root
    state: Path
    churn: list[Path]  # adapter dirs under root, registered and deleted in turn


def build_assets(tmp: Path) -> Assets:
    model = build_model_dir(tmp / "model", "llama", seed=0)
    root = tmp / "adapters"
    for i, (name, (rank, targets)) in enumerate(STABLE.items()):
        make_peft_adapter(model, root / name, rank=rank, target_modules=targets, seed=100 + i)
    churn = [make_peft_adapter(model, root / f"churn-src-{i}", rank=8, seed=200 + i) for i in range(CHURN_SOURCES)]
    return Assets(model, root, tmp / "state", churn)


class Server(ServerProcess):
    """The soak's server over its assets, with the RSS probe."""

    def __init__(self, assets: Assets, log_path: Path) -> None:
        super().__init__(["--model", str(assets.model), "--adapter-root", str(assets.root), "--state-dir",
                          str(assets.state), *SERVER_FLAGS], log_path, env={"OMP_NUM_THREADS": "1",
                                                                            "PYTHONUNBUFFERED": "1"})

    def rss_mib(self) -> float | None:
        """VmRSS of the server process in MiB (None once it has exited)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return round(int(match[1]) / 1024, 1) if match else None



def scrape(url: str) -> dict[str, float]:
    """{'name{labels}': value} of every sample on /metrics ({} when the server does not answer)."""
    try:
        text = httpx.get(url + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    return {m[1]: float(m[2]) for m in re.finditer(r"^([A-Za-z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def requests_by_status(metrics: dict[str, float]) -> Counter[str]:
    out: Counter[str] = Counter()
    for key, value in metrics.items():
        match = re.match(r'loraplex_requests_total\{.*status="(\d+)"', key)
        if match:
            out[match[1]] += int(value)
    return out


# ---- one request -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One HTTP request of the soak and what the contract allows as its answer (status labels)."""

    kind: str
    path: str
    body: Any = None  # sent as JSON
    raw: bytes | None = None  # sent as is, with content-type application/json
    files: dict[str, tuple[str, bytes]] | None = None  # multipart upload
    method: str = "POST"
    stream: bool = False
    abort: str | None = None  # "early": before the first token; "mid": after `abort_after` events; "plain"
    abort_after: float = 0  # events (mid) or seconds (plain)
    expect: frozenset[str] = OK
    racing: bool = False  # its adapter may be deleted meanwhile: an in-stream error is the contract's 404
    probe: str | None = None  # key of a greedy solo reference the token ids must equal
    stop: str | None = None  # a stop string the returned text must not contain
    names: str = ""  # what an error message must name (BAD_INPUTS.md: "naming the field")
    raw_conn: RawConn | None = None  # sent on a connection of its own, byte by byte (the hostile worker)
    chunked: int = 0  # send `body` JSON padded to this many bytes, chunked (no Content-Length)


@dataclass(frozen=True)
class RawConn:
    """A request sent on a raw socket: `payload` (then, for `endless`, header bytes until the server stops taking
    them), with a receive window of `rcvbuf` bytes, not read for `stall_s` seconds, then read to the end."""

    payload: bytes
    rcvbuf: int | None = None
    stall_s: float = 0.0
    endless: int = 0  # MiB of header value to offer


@dataclass
class Result:
    kind: str
    label: str  # "200", "404", "stream_error:500", "abort", "timeout", "transport", "no_terminal", ...
    outcome: str  # completed | clean_error | client_abort | server_error | lost | broken
    message: str = ""
    expected: bool = True
    ids: list[int] | None = None
    text: str | None = None
    violation: str = ""


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _error_message(data: Any) -> str | None:
    """The message of an OpenAI or TGI error body, None if `data` is not one."""
    if not isinstance(data, dict) or "error" not in data:
        return None
    error = data["error"]
    return str(error.get("message")) if isinstance(error, dict) else str(error)


def from_response(call: Call, status: int, body: bytes) -> Result:
    data = _json(body)
    message = _error_message(data)
    if status >= 500:
        return Result(call.kind, str(status), "server_error", message or body[:300].decode(errors="replace"))
    if status >= 400:
        outcome = "clean_error" if message is not None else "broken"
        return Result(call.kind, str(status), outcome, message or f"not a JSON error: {body[:200]!r}")
    if status in (200, 201, 204):
        return _success(call, status, data)
    return Result(call.kind, str(status), "broken", f"unexpected status: {body[:200]!r}")


def _success(call: Call, status: int, data: Any) -> Result:
    if call.path in ("/v1/completions", "/v1/chat/completions"):
        choice = (data or {}).get("choices", [{}])[0]
        text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
        ok = choice.get("finish_reason") in ("stop", "length")
        return Result(call.kind, str(status), "completed" if ok else "broken",
                      "" if ok else "200 without a finish_reason", text=text)
    if call.path == "/generate":
        ok = isinstance(data, dict) and isinstance(data.get("generated_text"), str)
        ids = [t["id"] for t in data["details"]["tokens"]] if ok and data.get("details") else None
        return Result(call.kind, str(status), "completed" if ok else "broken", "" if ok else "no generated_text",
                      ids=ids, text=data.get("generated_text") if ok else None)
    return Result(call.kind, str(status), "completed")


@dataclass
class StreamState:
    """What a server-sent event stream carried: its terminal event(s) and anything after them."""

    openai: bool
    events: int = 0
    finish: str | None = None
    error: Any = None
    done: bool = False  # OpenAI: [DONE] seen; TGI: the final event (or an error) seen
    after_end: int = 0
    ids: list[int] = field(default_factory=list)
    text: str = ""

    @property
    def open(self) -> bool:
        """Nothing final seen yet (hanging up now is a mid-stream abort, not a missed result)."""
        return not self.done and self.finish is None and self.error is None

    def feed(self, data: str) -> None:
        if self.done:
            self.after_end += 1
            return
        if self.openai and data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        self.events += 1
        if "error" in event:
            self.error, self.done = event["error"], not self.openai  # OpenAI sends [DONE] after an error
        elif self.openai:
            self._openai(event)
        else:
            self._tgi(event)

    def _openai(self, event: dict[str, Any]) -> None:
        for choice in event.get("choices") or []:
            self.finish = choice.get("finish_reason") or self.finish
            self.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""

    def _tgi(self, event: dict[str, Any]) -> None:
        self.ids.append(event["token"]["id"])
        if event.get("generated_text") is not None:
            self.finish, self.done, self.text = "end", True, event["generated_text"]


def stream_result(call: Call, st: StreamState) -> Result:
    if st.after_end:
        return Result(call.kind, "after_end", "broken", f"{st.after_end} events after the end of the stream")
    if st.error is not None:
        return _stream_error(call, st)
    if not st.done or st.finish is None:
        what = "[DONE]" if st.openai and not st.done else "a finish reason"
        return Result(call.kind, "no_terminal", "broken", f"stream ended without {what} after {st.events} events")
    return Result(call.kind, "200", "completed", ids=st.ids or None, text=st.text)


def _stream_error(call: Call, st: StreamState) -> Result:
    if isinstance(st.error, dict):  # OpenAI: the code is the status the request would have had
        code = st.error.get("code")
        outcome = "server_error" if not isinstance(code, int) or code >= 500 else "clean_error"
        return Result(call.kind, f"stream_error:{code}", outcome, str(st.error.get("message")))
    # TGI's error event carries no status: only the deletion of a racing request's adapter makes one clean.
    clean = call.racing and "regist" in str(st.error)  # "... was unregistered" / "... is not registered"
    return Result(call.kind, "stream_error", "clean_error" if clean else "server_error", str(st.error))


async def run_stream(client: httpx.AsyncClient, call: Call) -> Result:
    async with client.stream("POST", call.path, json=call.body) as r:
        if r.status_code != 200:
            return from_response(call, r.status_code, await r.aread())
        if call.abort == "early":
            return Result(call.kind, "abort", "client_abort")  # closes the connection before any event
        st = StreamState(openai=call.path.startswith("/v1/"))
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                st.feed(line[5:].strip())
            if call.abort == "mid" and st.events >= call.abort_after and st.open:
                return Result(call.kind, "abort", "client_abort")
        return stream_result(call, st)


async def run_plain(client: httpx.AsyncClient, call: Call) -> Result:
    if call.files is not None:
        r = await client.request(call.method, call.path, files=call.files)
    elif call.raw is not None:
        r = await client.request(call.method, call.path, content=call.raw,
                                 headers={"content-type": "application/json"})
    else:
        r = await client.request(call.method, call.path, json=call.body)
    return from_response(call, r.status_code, r.content)


async def run_raw(call: Call) -> Result:
    """A raw connection: label the status line the server sent ("closed" when none), "200" for a stream that ended
    with [DONE], "200_cut" for one the server cut (its client stalled past --stream-write-timeout)."""
    raw = call.raw_conn
    assert raw is not None
    host, port = call.path.removeprefix("http://").split(":")
    sock = socket.socket()
    if raw.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, raw.rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    data = b""
    try:
        writer.write(raw.payload)
        for _ in range(raw.endless):
            writer.write(b"a" * 2**20)
            await asyncio.wait_for(writer.drain(), 10)
        await writer.drain()
        await asyncio.sleep(raw.stall_s)
        while chunk := await asyncio.wait_for(reader.read(65536), REQUEST_TIMEOUT.read):
            data += chunk
    except TimeoutError:
        return Result(call.kind, "timeout", "lost", f"no end within {REQUEST_TIMEOUT.read} s")
    except ConnectionError as exc:  # the server closed on us: a bomb mid-send, or a stalled stream it cut
        if not data:
            return Result(call.kind, "closed", "clean_error", repr(exc))
    finally:
        writer.close()
    status = data.split(b"\r\n", 1)[0].decode(errors="replace")
    if not status:
        return Result(call.kind, "closed", "clean_error", "closed without an answer")
    code = status.split(" ")[1] if " " in status else status
    if code == "200" and b"text/event-stream" in data[:2000]:
        return Result(call.kind, "200" if b"data: [DONE]" in data else "200_cut",
                      "completed" if b"data: [DONE]" in data else "clean_error")
    return Result(call.kind, code, "clean_error" if code.startswith("4") else
                  "server_error" if code.startswith("5") else "completed", status)


async def run_chunked(client: httpx.AsyncClient, call: Call) -> Result:
    async def chunks() -> Any:
        head = json.dumps(call.body).encode()
        yield head[:-1] + b', "pad": "'
        for _ in range(call.chunked // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    r = await client.post(call.path, content=chunks(), headers={"content-type": "application/json"})
    return from_response(call, r.status_code, r.content)


async def execute(client: httpx.AsyncClient, call: Call) -> Result:
    try:
        if call.raw_conn is not None:
            return await run_raw(call)
        if call.chunked:
            return await run_chunked(client, call)
        if call.stream:
            return await run_stream(client, call)
        if call.abort == "plain":
            return await asyncio.wait_for(run_plain(client, call), call.abort_after)
        return await run_plain(client, call)
    except TimeoutError:  # our own wait_for: the client hung up before the answer
        return Result(call.kind, "abort", "client_abort")
    except httpx.TimeoutException as exc:
        return Result(call.kind, "timeout", "lost", f"no answer within {REQUEST_TIMEOUT.read} s: {exc!r}")
    except httpx.TransportError as exc:
        return Result(call.kind, "transport", "lost", repr(exc))
    except Exception as exc:  # noqa: BLE001 - a bad event (not JSON...) is a finding, not a crash of the soak
        return Result(call.kind, "client_exception", "broken", repr(exc))


# ---- the workload: good traffic -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ctx:
    models: tuple[str, ...]  # the base name and the stable adapters

    def model(self, rng: random.Random) -> str:
        return rng.choice(self.models)


def text(rng: random.Random) -> str:
    line = rng.choice(TEXTS)
    start = rng.randrange(0, max(1, len(line) // 2))
    return line[start:start + rng.randint(8, 80)] or line


def sampling(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {"temperature": rng.choice([0.0, 0.7, 1.0])}
    if out["temperature"]:
        out["seed"] = rng.randrange(2**31)
        out.update(rng.choice([{}, {"top_p": 0.9}, {"top_k": 20}]))
    return out


def completion(rng: random.Random, model: str, stream: bool = False) -> dict[str, Any]:
    body = {"model": model, "prompt": text(rng), "max_tokens": rng.randint(4, 32), "stream": stream,
            **sampling(rng)}
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


def chat(rng: random.Random, model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text(rng)}],
            "max_tokens": rng.randint(4, 32), "stream": stream, **sampling(rng)}


def tgi(rng: random.Random, model: str) -> dict[str, Any]:
    params = {"adapter_id": None if model == BASE else model, "max_new_tokens": rng.randint(4, 32),
              "details": True}
    s = sampling(rng)
    if s["temperature"]:
        params.update(do_sample=True, **s)
    return {"inputs": text(rng), "parameters": params}


def generation_call(rng: random.Random, model: str, kind: str, stream: bool) -> Call:
    """A good request of one of the three dialects (kind: completion, chat or tgi)."""
    if kind == "completion":
        return Call(f"{'stream_' * stream}completion", "/v1/completions", completion(rng, model, stream), stream=stream)
    if kind == "chat":
        return Call(f"{'stream_' * stream}chat", "/v1/chat/completions", chat(rng, model, stream), stream=stream)
    path = "/generate_stream" if stream else "/generate"
    return Call(f"tgi{'_stream' * stream}", path, tgi(rng, model), stream=stream)


PROBE_IDS = [17, 42, 99, 123, 7, 301, 64, 255]


def probe_call(model: str) -> Call:
    """Greedy, fixed prompt, EOS ignored: its token ids must equal the solo reference however it is batched."""
    body = {"inputs": "The quick brown fox", "parameters": {"adapter_id": None if model == BASE else model,
            "max_new_tokens": 16, "ignore_eos_token": True, "details": True}}
    return Call("greedy_probe", "/generate", body, probe=model)


def abort_call(rng: random.Random, ctx: Ctx) -> Call:
    model, how = ctx.model(rng), rng.choice(["early", "mid", "plain"])
    expect = frozenset({"abort", "200"})  # a short answer may finish before the client hangs up
    if how == "plain":
        call = generation_call(rng, model, rng.choice(["completion", "chat", "tgi"]), stream=False)
        return Call("abort_before_answer", call.path, call.body, abort="plain",
                    abort_after=rng.uniform(0.005, 0.3), expect=expect)
    call = generation_call(rng, model, rng.choice(["completion", "chat", "tgi"]), stream=True)
    body = {**call.body, "max_tokens": 32} if "max_tokens" in call.body else call.body
    kind = "abort_before_first_token" if how == "early" else "abort_mid_stream"
    return Call(kind, call.path, body, stream=True, abort=how, abort_after=rng.randint(1, 4), expect=expect)


def stop_call(rng: random.Random, model: str) -> Call:
    """Row 40: stop strings matching inside a token, across tokens, or at the first character."""
    stop = rng.choice([" ", "e", "the", "\n", ".", "o"])
    body = {"model": model, "prompt": text(rng), "max_tokens": 32, "temperature": 0.0, "stop": [stop]}
    return Call("stop_string", "/v1/completions", body, stop=stop)


def traffic_call(rng: random.Random, ctx: Ctx) -> Call:
    roll = rng.random()
    if roll < 0.15:
        return abort_call(rng, ctx)
    if roll < 0.22:
        return probe_call(ctx.model(rng))
    if roll < 0.27:
        return stop_call(rng, ctx.model(rng))
    return generation_call(rng, ctx.model(rng), rng.choice(["completion", "chat", "tgi"]), rng.random() < 0.5)


# ---- the workload: bad inputs (BAD_INPUTS.md rows 20-41) ---------------------------------------------------
def _c(**fields: Any) -> dict[str, Any]:
    return {"model": BASE, "prompt": "Once upon a time", "max_tokens": 8, **fields}


def _g(**params: Any) -> dict[str, Any]:
    return {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8, **params}}


def _ids(n: int) -> list[int]:
    return [3 + (i * 37) % (VOCAB - 3) for i in range(n)]


V1, TGI, CHAT = "/v1/completions", "/generate", "/v1/chat/completions"
E400, E422, E4XX = frozenset({"400"}), frozenset({"422"}), frozenset({"400", "422"})


@dataclass(frozen=True)
class Bad:
    """One bad input: a JSON body (or raw bytes), the statuses the contract allows, and what an error
    message must name where BAD_INPUTS.md says "naming ..." (a substring, "" for no such rule)."""

    kind: str
    path: str
    body: Any
    expect: frozenset[str]
    names: str = ""

    def call(self) -> Call:
        if isinstance(self.body, bytes):
            return Call(self.kind, self.path, raw=self.body, expect=self.expect, names=self.names)
        return Call(self.kind, self.path, self.body, expect=self.expect, names=self.names)


BAD_CASES: list[Bad] = [
    Bad("r20_unknown_model", V1, _c(model="no-such-adapter"), frozenset({"404"}), "no-such-adapter"),
    Bad("r20_unknown_adapter_id", TGI, _g(adapter_id="no-such-adapter"), frozenset({"404"}), "no-such-adapter"),
    Bad("r21_empty_prompt", V1, _c(prompt=""), E422),
    Bad("r21_empty_inputs_tgi", TGI, {"inputs": "", "parameters": {}}, E422),
    Bad("r21_empty_messages", CHAT, {"model": BASE, "messages": []}, E422),
    Bad("r22_prompt_over_max_model_len", V1, _c(prompt=_ids(MAX_MODEL_LEN + 40)), E400, str(MAX_MODEL_LEN)),
    Bad("r23_prompt_plus_max_tokens_over", V1, _c(prompt=_ids(200), max_tokens=100), frozenset({"400", "200"}),
        str(MAX_MODEL_LEN)),
    Bad("r24_max_tokens_0", V1, _c(max_tokens=0), E422, "max_tokens"),
    Bad("r24_max_tokens_1e12", V1, _c(max_tokens=10**12), E422, "max_tokens"),
    Bad("r25_temperature_negative", V1, _c(temperature=-1.0), E422, "temperature"),
    Bad("r25_top_p_0", V1, _c(top_p=0.0), E422, "top_p"),
    Bad("r25_top_p_1.5", V1, _c(top_p=1.5), E422, "top_p"),
    Bad("r25_top_k_negative", V1, _c(top_k=-5), E422, "top_k"),
    Bad("r26_n_2", V1, _c(n=2), OK),  # supported since issue 13 (the choices share the prompt's KV blocks)
    Bad("r26_best_of_2", V1, _c(best_of=2, temperature=1.0, seed=4), OK),
    Bad("r27_17_stop_strings", V1, _c(stop=[f"s{i}" for i in range(17)]), E422, "stop"),
    Bad("r27_stop_300_chars", V1, _c(stop=["x" * 300]), E422, "stop"),
    Bad("r28_malformed_json", V1, b'{"model": "tiny-base", "prompt": ', E4XX),
    Bad("r28_wrong_type", V1, _c(max_tokens="8"), E422, "max_tokens"),
    Bad("r28_non_object_body", V1, [1, 2, 3], E4XX),
    Bad("r28_deeply_nested", V1, b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}", E4XX),
    Bad("r29_body_over_limit", V1, _c(prompt="a" * (BODY_LIMIT + 1000)), frozenset({"413"})),
    Bad("r33_temperature_1e-45", V1, _c(temperature=1e-45, seed=1), OK),
    Bad("r33_temperature_1e-30", CHAT, {"model": BASE, "messages": [{"role": "user", "content": "Hi"}],
                                        "max_tokens": 8, "temperature": 1e-30}, OK),
    Bad("r33_temperature_1e-45_tgi", TGI, _g(do_sample=True, temperature=1e-45), OK),
    Bad("r34_top_p_5e-324", V1, _c(temperature=1.0, top_p=5e-324, seed=2), OK),
    Bad("r34_top_p_5e-324_tgi", TGI, _g(do_sample=True, top_p=5e-324), OK),
    Bad("r35_top_k_1e9", V1, _c(temperature=1.0, top_k=10**9, seed=3), OK),
    Bad("r35_top_k_2^64", V1, _c(temperature=1.0, top_k=2**64), frozenset({"200", "422"}), "top_k"),
    Bad("r35_top_k_1e9_tgi", TGI, _g(top_k=10**9), OK),
    Bad("r36_seed_0", V1, _c(temperature=1.0, seed=0), OK),
    Bad("r36_seed_-1", V1, _c(temperature=1.0, seed=-1), frozenset({"200", "422"}), "seed"),
    Bad("r36_seed_2^63-1", V1, _c(temperature=1.0, seed=2**63 - 1), OK),
    Bad("r36_seed_2^64", V1, _c(temperature=1.0, seed=2**64), E422, "seed"),
    Bad("r36_seed_-1_tgi", TGI, _g(do_sample=True, seed=-1), E422, "seed"),
    Bad("r37_invalid_utf8_bytes", V1, b'{"model": "tiny-base", "prompt": "abc \xed\xa0\x80 \xc0\xaf", "max_tokens": 4}',
        E400, "prompt"),
    Bad("r37_lone_surrogate_escaped", V1, b'{"model": "tiny-base", "prompt": "abc \\ud800 def", "max_tokens": 4}',
        E4XX, "prompt"),
    Bad("r37_lone_surrogate_tgi", TGI, b'{"inputs": "abc \\udfff", "parameters": {"max_new_tokens": 4}}', E4XX,
        "inputs"),
    Bad("r38_token_id_over_vocab", V1, _c(prompt=[5, VOCAB + 100]), E400, str(VOCAB)),
    Bad("r38_token_id_negative", V1, _c(prompt=[5, -1]), E400, str(VOCAB)),
    Bad("r38_token_id_2^70", V1, _c(prompt=[2**70]), E400, str(VOCAB)),
    Bad("r41_min_tokens_over_max", V1, _c(min_tokens=10, max_tokens=5), frozenset({"422", "200"}), "min_tokens"),
]


# ---- the workload: adapter churn ---------------------------------------------------------------------------
def register_call(i: int, assets: Assets) -> Call:
    name, src = f"churn-{i}", assets.churn[i % len(assets.churn)]
    if i % 2:
        files = {f: (f, (src / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
        return Call("register_upload", f"/v1/adapters/{name}", method="PUT", files=files, expect=frozenset({"201"}))
    body = {"name": name, "path": str(src.relative_to(assets.root))}
    return Call("register_path", "/v1/adapters", body, expect=frozenset({"201"}))


def race_call(rng: random.Random, name: str) -> Call:
    call = generation_call(rng, name, rng.choice(["completion", "chat", "tgi"]), rng.random() < 0.6)
    body = {**call.body, "max_tokens": 32} if "max_tokens" in call.body else call.body
    return Call("race_" + call.kind, call.path, body, stream=call.stream, expect=RACE_OK, racing=True)


def bad_registrations(assets: Assets) -> list[Call]:
    """BAD_INPUTS rows 2-5 and 18, sent while the traffic runs."""
    src = str(assets.churn[0].relative_to(assets.root))
    return [
        Call("reg_duplicate_name", "/v1/adapters", {"name": "ad-r4", "path": src}, expect=frozenset({"409"})),
        Call("reg_missing_path", "/v1/adapters", {"name": "ghost", "path": "no/such/dir"}, expect=frozenset({"404"})),
        Call("reg_outside_root", "/v1/adapters", {"name": "escape", "path": "../../etc"}, expect=frozenset({"403"})),
        Call("reg_bad_name", "/v1/adapters", {"name": "a/../b", "path": src}, expect=E422),
        Call("delete_unknown", "/v1/adapters/never-registered", method="DELETE", expect=frozenset({"404"})),
    ]


# ---- the workload: hostile clients and adapters (BAD_INPUTS.md rows 45-57) --------------------------------
EVIL = r"(?:[\w.]?){22}[\w.]{22}!"  # catastrophic backtracking for Python's re
VELORA = "base_model.model.model.layers.0.self_attn.q_proj.lora_velora_embed"
E400_413 = frozenset({"400", "413"})


def _post(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _archive(members: dict[str, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass(frozen=True)
class HostileUploads:
    """Upload bodies built once from a churn source adapter."""

    velora: dict[str, tuple[str, bytes]]  # + a 16 MiB training-only tensor: registered, then deleted
    evil_pattern: dict[str, tuple[str, bytes]]  # a catastrophic rank_pattern key: registered, then deleted
    backreference: dict[str, tuple[str, bytes]]  # a pattern RE2 cannot run: 400
    huge_alpha: dict[str, tuple[str, bytes]]  # lora_alpha 1e308: 400
    long_name: dict[str, tuple[str, bytes]]  # a tar.gz with an 8 MiB GNU long name: 400
    pax_name: dict[str, tuple[str, bytes]]  # the same as a pax record: 400

    @classmethod
    def build(cls, adapter: Path) -> HostileUploads:
        import torch
        from safetensors.torch import load_file, save

        config = json.loads((adapter / "adapter_config.json").read_text())
        weights = (adapter / "adapter_model.safetensors").read_bytes()
        velora = save(load_file(adapter / "adapter_model.safetensors") | {VELORA: torch.zeros(4 * 2**20)})

        def files(config_changes: dict[str, Any], data: bytes = weights) -> dict[str, tuple[str, bytes]]:
            cfg = json.dumps(config | config_changes).encode()
            return {"adapter_config.json": ("adapter_config.json", cfg),
                    "adapter_model.safetensors": ("adapter_model.safetensors", data)}

        def archive(fmt: int) -> dict[str, tuple[str, bytes]]:
            return {"archive": ("a.tar.gz", _archive({"n" * 2**23 + "/adapter_config.json": b"{}"}, fmt))}

        return cls(files({}, velora), files({"rank_pattern": {EVIL: 4}}), files({"rank_pattern": {r"(q)\1": 4}}),
                   files({"lora_alpha": 1e308}), archive(tarfile.GNU_FORMAT), archive(tarfile.PAX_FORMAT))


def hostile_calls(rng: random.Random, url: str, i: int, uploads: HostileUploads) -> list[Call]:
    """One round of the hostile worker: every attack once, in a seeded order (uploads keep their order)."""
    # ~5.6 MB of events (8 choices x 1000 tokens x 20 alternatives): more than the socket buffers take (Linux lets
    # the server's send buffer grow to 4 MiB), so the send stalls and the server cuts the stream after
    # --stream-write-timeout (5 s) of the 15 s the client waits.
    stall = {"model": BASE, "prompt": "Hello", "max_tokens": 1000, "n": 8, "logprobs": 20, "stream": True,
             "ignore_eos": True, "temperature": 1.0, "seed": i}
    cut_ok = frozenset({"200", "200_cut", "429"})
    head = b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
    calls = [
        Call("h_stream_never_read", url, raw_conn=RawConn(_post("/v1/completions", stall), rcvbuf=4096, stall_s=15),
             expect=cut_ok),
        Call("h_half_sent_headers", url, raw_conn=RawConn(head), expect=frozenset({"408"})),
        Call("h_silent_connection", url, raw_conn=RawConn(b""), expect=frozenset({"408"})),
        Call("h_endless_header", url, raw_conn=RawConn(b"GET /health HTTP/1.1\r\nX-Endless: ", endless=8),
             expect=frozenset({"431", "closed"})),
        Call("h_chunked_over_limit", V1, _c(), chunked=BODY_LIMIT + 1, expect=frozenset({"413"})),
        Call("h_logit_bias_key", V1, _c(logit_bias={rng.choice(["²", "¹²³", "٣", "9" * 5000, "+3"]): 5}),
             expect=E400, names="logit_bias"),
        Call("h_prompt_far_over_context", V1, _c(prompt="word " * ((BODY_LIMIT - 2000) // 5)), expect=E400_413),
        Call("h_grammar_over_limit", V1, _c(guided_regex="(?:a{1000}){1000}"), expect=E400, names="guided_regex"),
        Call("h_grammar_ref_cycle", CHAT, {"model": BASE, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 8, "response_format": {"type": "json_schema", "json_schema": {
                                               "name": "x", "schema": {"$ref": "#/$defs/a",
                                                                       "$defs": {"a": {"$ref": "#/$defs/a"}}}}}},
             expect=E400, names="response_format"),
        Call("h_too_many_choices", V1, _c(prompt=["x y"] * 5, n=5), expect=E400, names="25"),
        Call("h_merge_new_weights", V1, _c(adapters=[{"name": "ad-r4", "weight": round(rng.uniform(0.1, 0.9), 6)},
                                                     {"name": "ad-r8", "weight": 1.0}], merge_strategy="ties",
                                           density=0.5), expect=frozenset({"200", "429"})),
    ]
    rng.shuffle(calls)
    name = f"hostile-{i}"
    uploads_round = [
        Call("h_upload_velora", f"/v1/adapters/{name}", method="PUT", files=uploads.velora, expect=frozenset({"201"})),
        Call("h_delete_velora", f"/v1/adapters/{name}", method="DELETE", expect=frozenset({"200"})),
        Call("h_upload_evil_pattern", f"/v1/adapters/{name}", method="PUT", files=uploads.evil_pattern,
             expect=frozenset({"201"})),
        Call("h_delete_evil_pattern", f"/v1/adapters/{name}", method="DELETE", expect=frozenset({"200"})),
        Call("h_upload_backreference", f"/v1/adapters/{name}", method="PUT", files=uploads.backreference,
             expect=E400, names="rank_pattern"),
        Call("h_upload_huge_alpha", f"/v1/adapters/{name}", method="PUT", files=uploads.huge_alpha, expect=E400,
             names="lora_alpha"),
        Call("h_upload_tar_long_name", f"/v1/adapters/{name}", method="PUT", files=uploads.long_name, expect=E400,
             names="header"),
        Call("h_upload_tar_pax_name", f"/v1/adapters/{name}", method="PUT", files=uploads.pax_name, expect=E400,
             names="header"),
    ]
    return calls + uploads_round


# ---- the soak ----------------------------------------------------------------------------------------------
@dataclass
class Soak:
    client: httpx.AsyncClient
    ctx: Ctx
    assets: Assets
    deadline: float
    max_requests: int
    server_alive: Callable[[], bool]
    references: dict[str, list[int]] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    accepted: int = 0

    def running(self) -> bool:
        return time.monotonic() < self.deadline and self.accepted < self.max_requests and self.server_alive()

    async def send(self, call: Call) -> Result:
        self.accepted += 1
        res = await execute(self.client, call)
        res.expected = res.label in call.expect
        res.violation = self._violation(call, res)
        self.results.append(res)
        return res

    def _violation(self, call: Call, res: Result) -> str:
        if res.outcome == "clean_error" and "internal" in res.message.lower():
            return f"a {res.label} that reports an internal fault: {res.message}"
        if res.outcome == "clean_error" and call.names and call.names not in res.message:
            return f"the error does not name {call.names!r}: {res.message}"
        if res.outcome != "completed":
            return ""
        if call.probe is not None and res.ids != self.references.get(call.probe):
            return f"greedy ids on {call.probe} differ from the solo reference: {res.ids}"
        if call.stop is not None and res.text is not None and call.stop in res.text:
            return f"stop string {call.stop!r} left in the text {res.text!r}"
        return ""

    async def traffic_worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            await self.send(traffic_call(rng, self.ctx))

    async def bad_worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            for case in rng.sample(BAD_CASES, len(BAD_CASES)):
                if not self.running():
                    return
                await self.send(case.call())
                await asyncio.sleep(0.05)

    async def hostile_worker(self, seed: int, url: str) -> None:
        rng, uploads, i = random.Random(seed), HostileUploads.build(self.assets.churn[0]), 0
        while self.running():
            for call in hostile_calls(rng, url, i, uploads):
                if not self.running():
                    return
                await self.send(call)
                await asyncio.sleep(0.05)
            i += 1

    async def churn_worker(self, seed: int) -> None:
        rng, bad, i = random.Random(seed), bad_registrations(self.assets), 0
        while self.running():
            await self.churn_cycle(rng, i)
            await self.send(bad[i % len(bad)])
            i += 1
            await asyncio.sleep(rng.uniform(0.1, 0.5))

    async def churn_cycle(self, rng: random.Random, i: int) -> None:
        """Register an adapter, race requests against its deletion, and ask for it once it is gone."""
        name = f"churn-{i}"
        if (await self.send(register_call(i, self.assets))).label != "201":
            return
        racers = [asyncio.create_task(self.send(race_call(rng, name))) for _ in range(rng.randint(1, 4))]
        await asyncio.sleep(rng.uniform(0.0, 0.4))
        await self.send(Call("delete", f"/v1/adapters/{name}", method="DELETE", expect=frozenset({"200", "204"})))
        await asyncio.gather(*racers)
        gone = generation_call(rng, name, rng.choice(["completion", "chat", "tgi"]), stream=False)
        await self.send(Call("after_delete", gone.path, gone.body, expect=frozenset({"404"})))


async def take_references(soak: Soak) -> None:
    """Greedy probe ids per model, one request at a time before any load (the solo reference)."""
    for model in soak.ctx.models:
        res = await execute(soak.client, probe_call(model))
        if res.outcome != "completed" or res.ids is None:
            raise RuntimeError(f"solo reference for {model} failed: {res}")
        soak.references[model] = res.ids


async def sample_rss(server: Server, soak: Soak, samples: list[tuple[float, float]], t0: float) -> None:
    while soak.running():
        rss = server.rss_mib()
        if rss is not None:
            samples.append((round(time.monotonic() - t0, 1), rss))
        await asyncio.sleep(5.0)


async def soak_run(server: Server, assets: Assets, args: argparse.Namespace,
                   rss: list[tuple[float, float]]) -> Soak:
    limits = httpx.Limits(max_connections=4 * args.workers + 16)
    async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT, limits=limits) as client:
        soak = Soak(client, Ctx((BASE, *STABLE)), assets, time.monotonic() + 3600, args.max_requests,
                    lambda: server.proc.poll() is None)
        await take_references(soak)
        t0 = time.monotonic()
        soak.deadline = t0 + 60 * args.minutes
        workers = [soak.traffic_worker(args.seed * 1000 + w) for w in range(args.workers)]
        await asyncio.gather(*workers, soak.bad_worker(args.seed * 1000 + 900),
                             soak.churn_worker(args.seed * 1000 + 901),
                             soak.hostile_worker(args.seed * 1000 + 902, server.url),
                             sample_rss(server, soak, rss, t0))
        return soak


# ---- after the traffic -------------------------------------------------------------------------------------
def register_stable(server: Server) -> None:
    for name in STABLE:
        r = httpx.post(server.url + "/v1/adapters", json={"name": name, "path": name}, timeout=60)
        if r.status_code != 201:
            raise RuntimeError(f"registering {name} failed: {r.status_code} {r.text[:300]}")


def idle_state(url: str, wait_s: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and no KV block is used (or `wait_s` passes)."""
    keys = ("loraplex_num_requests_running", "loraplex_num_requests_waiting", "loraplex_kv_cache_usage_ratio")
    deadline = time.monotonic() + wait_s
    while True:
        metrics = scrape(url)
        state = {k.removeprefix("loraplex_"): metrics.get(k, float("nan")) for k in keys}
        if not metrics or all(v == 0 for v in state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def health(url: str) -> dict[str, int]:
    """Status of /health and /ready (0: no answer)."""
    out = {}
    for path in ("/health", "/ready"):
        try:
            out[path] = httpx.get(url + path, timeout=10).status_code
        except httpx.HTTPError:
            out[path] = 0
    return out


def log_errors(log: str, limit: int = 30) -> list[dict[str, Any]]:
    """Server log lines that name an error (tracebacks' last lines included), timestamps cut, counted."""
    lines = [re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+ ", "", ln.strip()) for ln in log.splitlines()
             if re.search(r"ERROR|Error:|Exception", ln)]
    return [{"line": line, "count": n} for line, n in Counter(lines).most_common(limit)]


# ---- the report --------------------------------------------------------------------------------------------
def by_kind(results: list[Result]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"n": 0, "status": Counter(), "unexpected": Counter()})
    for res in results:
        row = rows[res.kind]
        row["n"] += 1
        row["status"][res.label] += 1
        if not res.expected:
            row["unexpected"][res.label] += 1
    return {k: {"n": v["n"], "status": dict(v["status"]), "unexpected": dict(v["unexpected"])}
            for k, v in sorted(rows.items())}


def grouped(results: list[Result], keep: Callable[[Result], bool], message: Callable[[Result], str]
            ) -> list[dict[str, Any]]:
    # churn-<i> names differ per cycle: one line per message shape, not per adapter
    counts = Counter((r.kind, r.label, re.sub(r"churn-\d+", "churn-N", message(r))[:300]) for r in results if keep(r))
    return [{"kind": k, "status": s, "message": m, "count": c} for (k, s, m), c in counts.most_common()]


def rss_flat(rss: dict[str, Any]) -> bool:
    """The second half of the run added at most 10 % (or 32 MiB) to the server's RSS."""
    middle, end = rss["middle_mib"], rss["end_mib"]
    return middle is not None and end is not None and end - middle <= max(32.0, 0.1 * middle)


def rss_points(start: float | None, samples: list[tuple[float, float]], end: float | None) -> dict[str, Any]:
    middle = samples[len(samples) // 2][1] if samples else None
    return {"start_mib": start, "middle_mib": middle, "end_mib": end, "samples": samples}


def build_report(soak: Soak, extra: dict[str, Any]) -> dict[str, Any]:
    results = soak.results
    outcomes = Counter(r.outcome for r in results)
    finished = sum(outcomes[o] for o in FINISHED)
    unexpected = [r for r in results if not r.expected]
    checks = {
        "accepted_equals_finished": soak.accepted == finished == len(results),
        "no_5xx": outcomes["server_error"] == 0,
        "statuses_as_expected": not unexpected,
        "no_violations": not any(r.violation for r in results),
        "healthy_at_end": all(code == 200 for code in extra["health_end"].values()),
        "rss_flat": rss_flat(extra["rss"]),
        "idle_at_end": all(v == 0 for v in extra["idle_end"].values()),
        "exit_code_0": extra["exit_code"] == 0,
    }
    return {
        "checks": checks, "accepted": soak.accepted, "finished": finished, "outcomes": dict(outcomes),
        "by_kind": by_kind(results),
        "server_errors": grouped(results, lambda r: r.outcome == "server_error", lambda r: r.message),
        "lost_or_broken": grouped(results, lambda r: r.outcome in ("lost", "broken"), lambda r: r.message),
        "unexpected": grouped(unexpected, lambda r: True, lambda r: r.message),
        "violations": grouped(results, lambda r: bool(r.violation), lambda r: r.violation),
        "errors_by_kind": grouped(results, lambda r: r.outcome == "clean_error", lambda r: r.message),
        **extra,
    }


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_report(rep: dict[str, Any]) -> None:
    print(f"\naccepted {rep['accepted']}  finished {rep['finished']}  outcomes {rep['outcomes']}")
    print(f"\n{'kind':<34} {'n':>5}  statuses (unexpected marked !)")
    for kind, row in rep["by_kind"].items():
        marks = "  ".join(f"{s}x{c}{'!' if s in row['unexpected'] else ''}" for s, c in sorted(row["status"].items()))
        print(f"{kind:<34} {row['n']:>5}  {marks}")
    _print_list("5xx / in-stream server faults (each is a MISS)", rep["server_errors"])
    _print_list("lost or broken (no single clean terminal outcome)", rep["lost_or_broken"])
    _print_list("unexpected statuses (contract: BAD_INPUTS.md)", rep["unexpected"])
    _print_list("violations (greedy isolation, stop strings)", rep["violations"])
    _print_list("clean errors by kind", rep["errors_by_kind"], limit=60)
    rss = rep["rss"]
    print(f"\nserver RSS MiB: start {rss['start_mib']}  middle {rss['middle_mib']}  end {rss['end_mib']}")
    print(f"server requests by status (/metrics): {rep['server_requests_by_status']}")
    print(f"end: health {rep['health_end']}  idle {rep['idle_end']}  exit code {rep['exit_code']}")
    print("server log errors:" + ("" if rep["server_log_errors"] else " none"))
    for row in rep["server_log_errors"][:12]:
        print(f"  {row['count']:>4} x {row['line'][:200]}")
    print()
    for name, ok in rep["checks"].items():
        print(f"{mark(ok)}  {name}")


def _print_list(title: str, rows: list[dict[str, Any]], limit: int = 40) -> None:
    if not rows:
        print(f"\n{title}: none")
        return
    print(f"\n{title}:")
    for row in rows[:limit]:
        print(f"  {row['count']:>4} x {row['kind']} [{row['status']}]: {row['message'][:200]}")
    if len(rows) > limit:
        print(f"  ... {len(rows) - limit} more in the JSON")


# ---- main --------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="traffic duration (default 10)")
    p.add_argument("--workers", type=int, default=4, help="concurrent traffic workers (plus 1 bad, 1 churn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/soak[_quick].json)")
    return p.parse_args()


def soak_server(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    assets = build_assets(tmp)
    server = Server(assets, tmp / "server.log")
    try:
        soak, extra = observe(server, assets, args)
    finally:
        exit_code = server.stop()
    extra.update(exit_code=exit_code, server_log_errors=log_errors(server.log()), server_args=server.args[3:])
    return build_report(soak, extra)


def observe(server: Server, assets: Assets, args: argparse.Namespace) -> tuple[Soak, dict[str, Any]]:
    """Register the stable adapters, run the soak, then read RSS, /metrics, /health and /ready."""
    register_stable(server)
    before, rss_start, rss = scrape(server.url), server.rss_mib(), []
    soak = asyncio.run(soak_run(server, assets, args, rss))
    idle, rss_end = idle_state(server.url), server.rss_mib()
    served = requests_by_status(scrape(server.url)) - requests_by_status(before)
    return soak, {"health_end": health(server.url), "idle_end": idle, "rss": rss_points(rss_start, rss, rss_end),
                  "server_requests_by_status": dict(served)}


def main() -> None:
    args = parse_args()
    facts = machine_facts("cpu")
    print_facts(facts)
    print(f"soak: {args.minutes} min, {args.workers} traffic workers + 1 bad-input + 1 churn, seed {args.seed}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as tmp:
        report = soak_server(args, Path(tmp))
    print_report(report)
    out = args.out or RESULTS_DIR / ("soak.json" if args.minutes >= 10 else "soak_quick.json")
    write_json(out, {"machine": facts, "args": {k: str(v) for k, v in vars(args).items()}, **report})
    sys.exit(0 if all(report["checks"].values()) else 1)


if __name__ == "__main__":
    main()
