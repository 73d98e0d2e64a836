"""Load a PEFT LoRA adapter directory into validated fp32 CPU tensors (safetensors only, never pickle).

Everything a user can get wrong is checked from `adapter_config.json` and the safetensors *header* before a
single tensor is allocated: the header is parsed here by hand (8-byte little-endian length + JSON), so a
header that declares a [10**9, 10**9] tensor in a 100-byte file is refused without touching memory.

Memory is charged for what is kept: only the lora_A / lora_B tensors are read, each into its own buffer, so
`AdapterWeights.size_bytes` is what the host tier holds; a training-only tensor saved beside them (VeLoRA's
embedding can be gigabytes) is never read. Names quoted back in errors are cut to a bounded length.

Files are reached through an `AdapterFiles` object, and each is opened once and read only through that
handle: sources that confine adapters to a root hand in one that re-checks confinement at open time.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from loraplex.adapters.errors import AdapterNotFoundError, AdapterValidationError
from loraplex.adapters.peft_config import CONFIG_NAME, MAX_CONFIG_BYTES, LoraSpec, parse_adapter_config

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".ckpt"})
# The JSON header: ~130 bytes per tensor, so this is ~120k tensors (a LoRA on every expert of a large MoE model).
# safetensors itself allows 100 MiB; parsing that much JSON holds the GIL for a second, stalling the server.
MAX_HEADER_BYTES = 16 * 1024 * 1024
_SHOWN = 120  # characters of a tensor name quoted back in an error
# Floating dtypes safetensors can hold that cast losslessly enough to fp32; bool/int are not LoRA weights.
FLOAT_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_PEFT_PREFIX = "base_model.model."
# `<module>.lora_A.weight`, or `<module>.lora_A.<adapter>.weight` as some PEFT paths write it.
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# Training-only state PEFT saves beside A/B (VeLoRA's compression embed, MonteCLoRA's sampler priors): in
# eval mode both variants run plain LoRA on lora_A/lora_B, so these are read past and dropped.
_TRAINING_ONLY_KEY = re.compile(r"\.(lora_velora_embed|lora_monteclora_sampler\.[A-Za-z_]+)$")


@dataclass(frozen=True)
class TensorHeader:
    """One safetensors header entry; `start`/`end` are byte offsets into the data section (end exclusive)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class LoraModuleWeights:
    """One target module's LoRA pair, fp32 on CPU: a [r, in], b [out, r]; delta y = scale · b @ (a @ x)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter: its spec, {full base-module name: weights}, and in-memory tensor bytes (fp32)."""

    spec: LoraSpec
    modules: dict[str, LoraModuleWeights]
    size_bytes: int

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def prepared(self, *, pin: bool = False) -> AdapterWeights:
        """The same adapter laid out as device slots hold it, so the engine thread's slot copy is a plain copy:
        the scale folded into B, and B stored transposed ([r, out] contiguous; `b` is its [out, r] view,
        scale 1.0). Done off the engine thread (host loader, registration). `pin`: in page-locked memory
        (needs CUDA), so host->device copies run asynchronously on a side stream."""
        modules = {name: _slot_layout(m, pin) for name, m in self.modules.items()}
        return AdapterWeights(self.spec, modules, self.size_bytes)


def _slot_layout(m: LoraModuleWeights, pin: bool) -> LoraModuleWeights:
    """scale · B, stored as a contiguous [r, out] (B^T); already-prepared weights are returned as they are."""
    b_t = m.b.t()
    owned = not b_t.is_contiguous()  # then the one transposing copy below is ours to scale in place
    b_t = b_t.contiguous()
    if m.scale != 1.0:
        b_t = b_t.mul_(m.scale) if owned else b_t * m.scale
    a = m.a.contiguous()
    if pin:
        a, b_t = a.pin_memory(), b_t.pin_memory()
    return LoraModuleWeights(a, b_t.t(), 1.0)


def _invalid(message: str, field: str = WEIGHTS_NAME) -> AdapterValidationError:
    return AdapterValidationError(message, field=field)


def _q(value: object) -> str:
    """A name or header value quoted for an error message, cut to a bounded length (names are user input)."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "...'"


class AdapterFiles:
    """How `load_adapter_dir` reaches an adapter's files: here by plain path. Sources that confine adapters
    to a root (adapters/sources) subclass it so that every open re-checks confinement."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.label = self.path.name or str(self.path)

    def check(self) -> None:
        """AdapterNotFoundError (404) when the directory is gone."""
        if not self.path.is_dir():
            raise AdapterNotFoundError(f"adapter directory {str(self.path)!r} does not exist", field="path")

    def open(self, filename: str) -> BinaryIO:
        """One of the adapter's regular files, opened for reading; FileNotFoundError when absent."""
        return regular_file(os.open(self.path / filename, _READ_FLAGS), filename)

    def names(self) -> list[str]:
        """The directory's entry names (only to name pickle files that are refused)."""
        return [p.name for p in self.path.iterdir()]


# O_NONBLOCK: opening a FIFO planted in place of a file must not hang the loader (it is then refused).
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def regular_file(fd: int, name: str) -> BinaryIO:
    """Wrap an fd opened for reading; 400 unless it is a regular file (a FIFO blocks, a device never ends)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _invalid(f"{name} is not a regular file", field=name)
    return os.fdopen(fd, "rb")


# ---------------------------------------------------------------------------------------------------------
# safetensors header
# ---------------------------------------------------------------------------------------------------------


def read_safetensors_header(path: str | Path, max_bytes: int) -> dict[str, TensorHeader]:
    """Parse and check a safetensors header without reading tensor data; {tensor name: TensorHeader}."""
    with open(path, "rb") as f:
        data_size, header_json = _read_header_bytes(f, Path(path).name)
    return _entries(header_json, data_size, max_bytes)


def _entries(header_json: bytes, data_size: int, max_bytes: int) -> dict[str, TensorHeader]:
    raw = _parse_header_json(header_json)
    raw.pop("__metadata__", None)
    entries = {name: _tensor_entry(name, spec, max_bytes) for name, spec in raw.items()}
    _check_layout(entries, data_size, max_bytes)
    return entries


def _read_header_bytes(f: BinaryIO, name: str) -> tuple[int, bytes]:
    """-> (size of the data section after the header, the header's JSON bytes), read from the start of `f`."""
    file_size = os.fstat(f.fileno()).st_size
    if file_size < 8:
        raise _invalid(f"{name} is truncated: {file_size} bytes, less than the 8-byte header length")
    f.seek(0)
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > file_size - 8:
        raise _invalid(
            f"{name} is truncated or corrupt: header length {header_len} exceeds the "
            f"{file_size - 8} bytes that follow it"
        )
    if header_len > MAX_HEADER_BYTES:
        raise _invalid(f"{name} header is {header_len} bytes, over the {MAX_HEADER_BYTES}-byte cap")
    return file_size - 8 - header_len, f.read(header_len)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _invalid(f"safetensors header lists tensor {_q(key)} twice")
        out[key] = value
    return out


def _parse_header_json(header: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(header.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _invalid(f"{WEIGHTS_NAME} has a corrupt header (not JSON): {exc}") from exc
    if not isinstance(raw, dict):
        raise _invalid(f"{WEIGHTS_NAME} header must be a JSON object, got {type(raw).__name__}")
    meta = raw.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _invalid(f"{WEIGHTS_NAME} header __metadata__ must map strings to strings")
    return raw


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _tensor_entry(name: str, spec: Any, max_bytes: int) -> TensorHeader:
    """Check one entry's dtype, shape and offsets; the byte span must equal numel × itemsize exactly."""
    if not isinstance(spec, dict):
        raise _invalid(f"header entry for tensor {_q(name)} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in FLOAT_ITEMSIZE:
        raise _invalid(
            f"tensor {_q(name)} has dtype {_q(dtype)}, which cannot be cast to float "
            f"(supported: {', '.join(FLOAT_ITEMSIZE)})"
        )
    if not _int_list(shape) or any(d < 0 for d in shape):
        raise _invalid(f"tensor {_q(name)} has an invalid shape {_q(shape)}")
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise _invalid(f"tensor {_q(name)} has invalid data_offsets {_q(offsets)}")
    # Python ints: no overflow, so [10**9, 10**9] is a plain (huge) number compared before any allocation.
    declared = math.prod(shape) * FLOAT_ITEMSIZE[dtype]
    if declared > max_bytes:
        raise _invalid(
            f"tensor {_q(name)} declares shape {_q(shape)} ({declared} bytes), over the {max_bytes}-byte limit"
        )
    if declared != offsets[1] - offsets[0]:
        raise _invalid(
            f"tensor {_q(name)} declares shape {_q(shape)} of {dtype} ({declared} bytes) but its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]} bytes"
        )
    return TensorHeader(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(entries: dict[str, TensorHeader], data_size: int, max_bytes: int) -> None:
    """Spans must lie inside the file, not overlap, and tile the data section (the format has no holes)."""
    total = sum(e.end - e.start for e in entries.values())
    if total > max_bytes:
        raise _invalid(f"{WEIGHTS_NAME} declares {total} tensor bytes, over the {max_bytes}-byte limit")
    cursor, prev = 0, None
    for name, e in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.end > data_size:
            raise _invalid(
                f"tensor {_q(name)} data_offsets [{e.start}, {e.end}] lie outside the file's {data_size} data "
                "bytes: the file is truncated or corrupt"
            )
        if e.start < cursor:
            raise _invalid(f"tensor {_q(name)} overlaps tensor {_q(prev)} in the data section")
        if e.start > cursor:
            raise _invalid(f"{WEIGHTS_NAME} has a gap of {e.start - cursor} bytes before tensor {_q(name)}")
        cursor, prev = e.end, name
    if cursor != data_size:
        raise _invalid(f"{WEIGHTS_NAME} has {data_size - cursor} trailing bytes after the last tensor")


# ---------------------------------------------------------------------------------------------------------
# adapter directory
# ---------------------------------------------------------------------------------------------------------


def load_adapter_dir(
    path: str | Path | AdapterFiles,
    module_shapes: Mapping[str, tuple[int, int]],
    *,
    max_rank: int,
    max_bytes: int = 2**31,
) -> AdapterWeights:
    """Validate a PEFT LoRA dir against the base model and load it as fp32 CPU tensors.

    path: the directory, or an `AdapterFiles` that opens its files (e.g. confined to a root).
    module_shapes: {full base-model module name: (in_features, out_features)}, e.g.
    {"model.layers.0.self_attn.q_proj": (4096, 4096)}. Every check runs on the config and the header
    before the tensor data is read.
    """
    files = path if isinstance(path, AdapterFiles) else AdapterFiles(path)
    files.check()
    spec = _read_spec(files)
    with _open_weights(files) as weights_file:
        data_size, header_json = _read_header_bytes(weights_file, WEIGHTS_NAME)
        header = _entries(header_json, data_size, max_bytes)
        _check_rank(spec, max_rank)
        _check_targets(spec, module_shapes)
        pairs = _pair_tensors(header, spec, module_shapes)
        for module, (key_a, key_b) in pairs.items():
            _check_pair_shapes(module, header[key_a], header[key_b], key_a, key_b, spec, module_shapes[module])
        kept = [key for pair in pairs.values() for key in pair]  # training-only tensors are never read
        tensors = _load_tensors(weights_file, {key: header[key] for key in kept}, header_json, data_size)
    modules = {
        module: LoraModuleWeights(
            a=_to_fp32(tensors[key_a]), b=_to_fp32(tensors[key_b]), scale=_scale(spec, module, tensors[key_b])
        )
        for module, (key_a, key_b) in pairs.items()
    }
    size = sum(t.numel() * t.element_size() for m in modules.values() for t in (m.a, m.b))
    return AdapterWeights(spec=spec, modules=modules, size_bytes=size)


def _scale(spec: LoraSpec, module: str, b: torch.Tensor) -> float:
    """The module's PEFT scale; 400 naming lora_alpha when scale · lora_B is not finite in float32 (slots hold B
    scaled: every request for the adapter would fail on infinities, e.g. lora_alpha 1e308)."""
    scale = spec.scale_for(module)
    top = float(b.abs().max()) if b.numel() else 0.0
    if not math.isfinite(scale) or top * abs(scale) > torch.finfo(torch.float32).max:
        raise AdapterValidationError(
            f"lora_alpha={spec.alpha_for(module):g} with r={spec.rank_for(module)}"
            f"{' (rsLoRA)' if spec.use_rslora else ''} scales module {_q(module)} by {scale:g}: scale x lora_B "
            f"(largest |B| {top:g}) is not finite in float32", field="lora_alpha")
    return scale


def _read_spec(files: AdapterFiles) -> LoraSpec:
    """adapter_config.json through `files` (size-capped before parsing), then peft_config's checks."""
    try:
        f = files.open(CONFIG_NAME)
    except FileNotFoundError:
        raise AdapterValidationError(f"{CONFIG_NAME} is missing in {files.label}", field=CONFIG_NAME) from None
    with f:
        data = f.read(MAX_CONFIG_BYTES + 1)  # never more, even if the file grows while we read
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterValidationError(f"{CONFIG_NAME} is over the {MAX_CONFIG_BYTES}-byte limit", field=CONFIG_NAME)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterValidationError(f"{CONFIG_NAME} is not valid JSON: {exc}", field=CONFIG_NAME) from exc
    if not isinstance(raw, dict):
        raise AdapterValidationError(
            f"{CONFIG_NAME} must be a JSON object, got {type(raw).__name__}", field=CONFIG_NAME
        )
    return parse_adapter_config(raw)


def _open_weights(files: AdapterFiles) -> BinaryIO:
    try:
        return files.open(WEIGHTS_NAME)
    except FileNotFoundError:
        pass
    # Pickle files are only *named* here, never opened: unpickling runs arbitrary code.
    pickles = sorted(n for n in files.names() if Path(n).suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _invalid(
            f"safetensors only: found {', '.join(pickles)} but no {WEIGHTS_NAME}; pickle-based weights are "
            "never loaded. Re-save the adapter with save_pretrained(..., safe_serialization=True)"
        )
    raise _invalid(f"{WEIGHTS_NAME} is missing in {files.label}")


def _check_rank(spec: LoraSpec, max_rank: int) -> None:
    ranks = [("r", spec.r)] + [(f"rank_pattern[{k!r}]", v) for k, v in spec.rank_pattern.items()]
    for name, rank in ranks:
        if rank > max_rank:
            raise AdapterValidationError(
                f"adapter rank {name}={rank} exceeds the server's maximum LoRA rank {max_rank} "
                "(--max-lora-rank)",
                field="r",
            )


def _check_targets(spec: LoraSpec, module_shapes: Mapping[str, tuple[int, int]]) -> None:
    missing = spec.unmatched_targets(module_shapes)
    if missing:
        raise AdapterValidationError(
            f"target_modules {missing} match no module of the base model", field="target_modules"
        )


def _pair_tensors(
    header: Mapping[str, TensorHeader], spec: LoraSpec, module_shapes: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[str, str]]:
    """{module name: (lora_A key, lora_B key)}; refuses unknown tensors, duplicates and half pairs."""
    found: dict[str, dict[str, str]] = {}
    for key in (k for k in header if not _TRAINING_ONLY_KEY.search(k)):
        match = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
        if match is None:
            raise _invalid(
                f"unsupported tensor {_q(key)}: only lora_A/lora_B weights of linear layers are supported"
            )
        module, kind = match["module"], match["kind"]
        _check_module(key, module, spec, module_shapes)
        if kind in found.setdefault(module, {}):
            raise _invalid(f"tensors {_q(found[module][kind])} and {_q(key)} are both {kind} of {_q(module)}")
        found[module][kind] = key
    if not found:
        raise _invalid(f"{WEIGHTS_NAME} holds no LoRA tensors")
    for module, kinds in found.items():
        for kind in ("lora_A", "lora_B"):
            if kind not in kinds:
                only = next(iter(kinds.values()))
                raise _invalid(f"module {_q(module)} has no {kind} tensor (found only {_q(only)})")
    return {module: (kinds["lora_A"], kinds["lora_B"]) for module, kinds in found.items()}


def _check_module(
    key: str, module: str, spec: LoraSpec, module_shapes: Mapping[str, tuple[int, int]]
) -> None:
    if module not in module_shapes:
        raise AdapterValidationError(
            f"tensor {_q(key)} targets module {_q(module)}, which the base model does not have (or is not a "
            "linear layer)",
            field="target_modules",
        )
    if not spec.targets(module):
        # PEFT would never wrap this module, so it would drop these weights; serving them would diverge.
        raise AdapterValidationError(
            f"tensor {_q(key)} is for module {_q(module)}, which target_modules does not select",
            field="target_modules",
        )


def _check_pair_shapes(
    module: str,
    a: TensorHeader,
    b: TensorHeader,
    key_a: str,
    key_b: str,
    spec: LoraSpec,
    in_out: tuple[int, int],
) -> None:
    """A must be [r_m, in] and B [out, r_m], with r_m the module's rank from r / rank_pattern."""
    rank, (in_features, out_features) = spec.rank_for(module), in_out
    for key, got, want in ((key_a, a.shape, (rank, in_features)), (key_b, b.shape, (out_features, rank))):
        if got != want:
            raise _invalid(
                f"tensor {_q(key)} has shape {_q(list(got))}, expected {list(want)} for module {_q(module)} "
                f"(in_features={in_features}, out_features={out_features}, r={rank})"
            )


def _load_tensors(
    file: BinaryIO, header: Mapping[str, TensorHeader], header_json: bytes, data_size: int
) -> dict[str, torch.Tensor]:
    """Read the tensors of `header` (the ones kept), each into a buffer of its own that its tensor views (no mmap, no
    pickle); bytes of tensors not asked for are never read, so memory is exactly what is kept.

    The file could have changed since the header check: its size and header bytes must still be the validated ones
    once the tensors are read. Then a finiteness check per tensor: a NaN/inf adapter would poison every token it
    touches.
    """
    base = 8 + len(header_json)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for key, h in sorted(header.items(), key=lambda item: item[1].start):
            buffer = bytearray(h.end - h.start)
            file.seek(base + h.start)
            if _read_fully(file, buffer) != len(buffer):
                raise _invalid(f"{WEIGHTS_NAME} changed while it was being loaded")
            tensors[key] = _view(buffer, h)
        file.seek(0)
        unchanged = file.read(base) == len(header_json).to_bytes(8, "little") + header_json
    except OSError as exc:
        raise _invalid(f"{WEIGHTS_NAME} could not be read: {exc}") from exc
    if not unchanged or os.fstat(file.fileno()).st_size != base + data_size:
        raise _invalid(f"{WEIGHTS_NAME} changed while it was being loaded")
    bad = next((key for key, t in tensors.items() if not _finite(t)), None)
    if bad is not None:
        raise _invalid(f"tensor {_q(bad)} contains NaN or infinite values")
    return tensors


def _read_fully(file: BinaryIO, buffer: bytearray) -> int:
    """readinto until `buffer` is full or the file ends; bytes read."""
    view, done = memoryview(buffer), 0
    while done < len(buffer):
        n = file.readinto(view[done:])
        if not n:
            break
        done += n
    return done


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _view(buffer: bytearray, h: TensorHeader) -> torch.Tensor:
    dtype = _TORCH_DTYPES[h.dtype]
    if not buffer:
        return torch.empty(h.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(h.shape)


def _finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.float() if t.element_size() == 1 else t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def _to_fp32(tensor: torch.Tensor) -> torch.Tensor:
    # fp32 tensors stay views of the buffer we own (no copy); other float dtypes are cast once.
    return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)
