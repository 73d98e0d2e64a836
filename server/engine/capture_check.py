"""CaptureCheck: what a CUDA graph capture relies on, checked on a machine without CUDA.

A captured graph replays a fixed list of kernels at fixed addresses; the Python that built it never runs again.
A forward that breaks that contract gives correct tokens when it is simply re-run, so a CPU test needs a re-run
that fails where a replay would go wrong. Under this dispatch mode (an `OpTrace` that forbids host syncs):
  - a host sync fails at once (`.item()`, `.tolist()`, `nonzero`, a device -> host copy): capture would fail,
    or bake in the value it read;
  - a tensor made from host data (`torch.tensor(...)`, `aten.lift_fresh`) fails: on CUDA that is a host ->
    device copy of pageable memory inside the capture, whose source the replay never reads again;
  - every tensor an op reads that this run did not compute must live in a static tensor's storage (the graph's
    input buffers, the model's parameters and buffers, the KV pool): anything else is memory the graph would
    keep reading at the address it had during capture;
  - `signature()` (every op, views included, with its inputs' shapes, and the storages read from outside) of
    each replay must equal the capture's: a difference is Python state (an int, a branch, a fresh tensor) that
    the graph froze.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from loraplex.adapters.ops.trace import HostSyncError, OpTrace

HOST_DATA_OPS = frozenset({"aten.lift_fresh", "aten.lift_fresh_copy", "aten.lift"})


class CaptureError(RuntimeError):
    """The forward does something a CUDA graph cannot replay faithfully."""


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class CaptureCheck(OpTrace):
    """with CaptureCheck(static_tensors) as check: forward()  -> raises CaptureError / HostSyncError."""

    def __init__(self, static: list[torch.Tensor]) -> None:
        super().__init__(forbid_sync=True)
        self.allowed = {_storage(t) for t in static}
        self.made: set[int] = set()  # storages this run allocated (the graph's private pool on CUDA)
        self.reads: list[int] = []  # storages read from outside, in op order
        self.ops: list[tuple[str, tuple[tuple[int, ...], ...]]] = []  # every op (views too) and its inputs' shapes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in HOST_DATA_OPS:
            raise CaptureError(f"{name}: a tensor made from host data during capture (its values would be baked "
                               "into the graph)")
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        self.ops.append((name, tuple(tuple(t.shape) for t in tensors)))
        for t in tensors:
            if t.numel() and _storage(t) not in self.made:
                self._read(name, t)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage(t) not in self.allowed:
                self.made.add(_storage(t))
        return out

    def _read(self, name: str, t: torch.Tensor) -> None:
        ptr = _storage(t)
        if ptr not in self.allowed:
            raise CaptureError(f"{name} reads a {tuple(t.shape)} {t.dtype} tensor that is neither a static buffer "
                               "nor computed inside the graph: a replay would read whatever its address holds then")
        self.reads.append(ptr)

    def signature(self) -> tuple[tuple[tuple[str, tuple[tuple[int, ...], ...]], ...], tuple[int, ...]]:
        return tuple(self.ops), tuple(self.reads)

    def same_as(self, captured: tuple[Any, Any]) -> None:
        ops, reads = self.signature()
        if ops != captured[0]:
            first = next((i for i, (a, b) in enumerate(zip(ops, captured[0], strict=False)) if a != b),
                         min(len(ops), len(captured[0])))
            raise CaptureError(f"the replayed forward dispatched other ops than the captured one (op {first}: "
                               f"{ops[first:first + 1]} vs {captured[0][first:first + 1]}): Python state read at "
                               "capture changed, and a real graph would replay the old ops")
        if reads != captured[1]:
            raise CaptureError("the replayed forward read other static tensors than the captured one: a real graph "
                               "keeps reading the addresses it captured")


__all__ = ["CaptureCheck", "CaptureError", "HostSyncError"]
