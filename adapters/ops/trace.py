"""OpTrace: record the aten ops a piece of code dispatches, and refuse host synchronisation.

Used by the tests and bench/bench_dispatch.py to prove that a decode step could be captured by a CUDA graph
on a machine without one: a captured graph replays a fixed sequence of kernels, so the step must not read a
device value on the host (`.item()`, `.tolist()`, `if tensor:`, data-dependent shapes such as `nonzero`),
and two steps of one bucket must dispatch the same ops. Ops that only make views (no kernel) are recorded
apart from the ops that compute.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read device data on the host, or whose output shape depends on device data (a sync on CUDA).
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.nonzero_static",
    "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2", "aten.unique_consecutive",
    "aten.unique_dim", "aten.equal", "aten.repeat_interleave",
})
_HOST_READS = ("tolist", "numpy")
# Ops that launch no kernel: views, aliases and autograd bookkeeping.
METADATA_OPS = frozenset({"aten.detach", "aten.lift_fresh", "aten._unsafe_view", "aten.view", "aten.alias",
                          "aten._reshape_alias", "aten.squeeze", "aten.unsqueeze"})


class HostSyncError(RuntimeError):
    """Code under OpTrace(forbid_sync=True) dispatched an op that synchronises with the host."""


class OpTrace(TorchDispatchMode):
    """with OpTrace() as trace: ...  then trace.compute (names of kernel ops, in order), trace.syncs."""

    def __init__(self, *, forbid_sync: bool = True) -> None:
        super().__init__()
        self.forbid_sync = forbid_sync
        self.compute: list[str] = []
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.syncs: list[str] = []

    def __enter__(self) -> OpTrace:
        # .tolist() / .numpy() read a CPU tensor's memory without dispatching any op: watch them directly.
        self._saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._host_read(name, original))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        super().__exit__(*exc)

    def _host_read(self, name: str, original: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.syncs.append(f"Tensor.{name}")
            if self.forbid_sync:
                raise HostSyncError(f"Tensor.{name}() reads device data on the host")
            return original(tensor, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in SYNC_OPS or _copies_to_host(name, args, kwargs):
            self.syncs.append(name)
            if self.forbid_sync:
                raise HostSyncError(f"{name} synchronises with the host")
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or name in METADATA_OPS):
            self.compute.append(name)
            self.shapes.append((name, tuple(out.shape) if isinstance(out, torch.Tensor) else ()))
        return out

    def counts(self) -> Counter[str]:
        return Counter(self.compute)


@contextlib.contextmanager
def traced_forward(module: torch.nn.Module, *, forbid_sync: bool = True) -> Iterator[OpTrace]:
    """`with traced_forward(engine.runner.model) as trace: engine.step()`: trace only the model's forward calls
    inside the block (what a captured graph would replay), not the step's host-side work around them."""
    trace, forward = OpTrace(forbid_sync=forbid_sync), module.forward

    def traced(*args: Any, **kwargs: Any) -> Any:
        with trace:
            return forward(*args, **kwargs)

    module.forward = traced
    try:
        yield trace
    finally:
        module.forward = forward


def _copies_to_host(name: str, args: Any, kwargs: Any) -> bool:
    """A device tensor copied to the CPU (`.cpu()`, `.to("cpu")`, a copy_ into a CPU tensor)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("aten._to_copy", "aten.to") and tensors:
        device = (kwargs or {}).get("device")
        return tensors[0].device.type != "cpu" and device is not None and torch.device(device).type == "cpu"
    if name == "aten.copy_" and len(tensors) >= 2:
        return tensors[0].device.type == "cpu" and tensors[1].device.type != "cpu"
    return False
