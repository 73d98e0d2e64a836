"""CUDA graphs for padded decode steps: capture once per shape, then replay with new inputs.

A padded decode step (model_runner.py) is a dict of named input tensors whose shapes depend only on the
batch bucket (and, on the gather attention path, the context width), a forward that reads nothing else,
and no host sync. `DecodeGraphs` keeps, per key (input shapes, with or without LoRA), a set of device
buffers and a graph captured over them; a step copies its inputs into the buffers and replays. Adapter
weights live in the slot stacks, written in place, so a graph serves whichever adapters the slots hold.

With a paged attention kernel every bucket has one shape, so `capture_buckets` captures them all at start
(base-only and LoRA per bucket, on pad rows that touch only the scratch block) and logs the memory they
hold. Nothing is captured while serving: a step whose key was not captured at start runs eagerly (the runner
asks `serves` first); the engine turns graphs off on the gather path, whose context width changes per step.

The graph itself is behind a two-method interface: `CudaGraph` on CUDA, `CheckedGraph` where there is no
CUDA. A CPU cannot replay a graph, so CheckedGraph re-runs the captured callable, under checks that make the
re-run fail wherever a real replay would silently differ from it (capture_check.py): a host sync, a tensor
made from host data, a read of any tensor that is not a static buffer (the graph's input buffers, the model's
parameters and buffers, the KV pool), and a replay whose ops or read addresses differ from the capture's
(Python state read at capture, frozen in a real graph).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from loraplex.adapters.inject import LoRAInjection
from loraplex.adapters.ops import LoRABatch
from loraplex.server.engine.capture_check import CaptureCheck

log = logging.getLogger(__name__)

Inputs = dict[str, torch.Tensor]
Forward = Callable[[Inputs, LoRABatch | None], torch.Tensor]  # (device inputs, LoRA batch) -> logits [B, V]
GraphKey = tuple[bool, tuple[tuple[str, tuple[int, ...]], ...]]


class Graph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record `fn` (which reads only buffers) and return its output tensor, which replay() refreshes."""

    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph over a memory pool shared by all graphs of the engine (one bucket runs at a time,
    so their activations can reuse the same memory)."""

    def __init__(self, pool: tuple[int, int]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, Triton compiles, cuBLAS workspaces
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        # thread_local: the host loader may pin memory meanwhile, which global capture mode would refuse.
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class CheckedGraph:
    """The stand-in without CUDA: replay re-runs the captured callable into the same output tensor, each run
    under `CaptureCheck` (the static tensors: what the graph may read that it did not compute itself)."""

    def __init__(self, static: Callable[[], list[torch.Tensor]]) -> None:
        self.static = static

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        with CaptureCheck(self.static()) as check:
            self.out = fn()
        self.signature = check.signature()
        return self.out

    def replay(self) -> None:
        with CaptureCheck(self.static()) as check:
            out = self.fn()
        check.same_as(self.signature)
        self.out.copy_(out)


@dataclass
class _Captured:
    buffers: Inputs
    graph: Graph
    output: torch.Tensor  # [B, V] logits, refreshed by each replay


class DecodeGraphs:
    """One captured decode forward per key; `run` copies a step's host inputs into the key's buffers and
    replays (capturing first when the key is new)."""

    def __init__(self, forward: Forward, lora: LoRAInjection | None, device: torch.device,
                 make_graph: Callable[[], Graph], static: Callable[[], list[torch.Tensor]] = list) -> None:
        self.forward = forward
        self.lora = lora
        self.device = device
        self.make_graph = make_graph
        self.graphs: dict[GraphKey, _Captured] = {}
        self._owned: list[torch.Tensor] = []  # every graph's input buffers and LoRA batch tensors
        self.replays = 0
        self.memory_bytes = 0  # device memory the graphs captured at start hold
        self.static = static  # what a forward may read besides the buffers: parameters, buffers, the KV pool

    @staticmethod
    def for_device(forward: Forward, lora: LoRAInjection | None, device: torch.device,
                   static: Callable[[], list[torch.Tensor]] = list) -> DecodeGraphs:
        """CUDA graphs on a CUDA device (one shared memory pool), the checked stand-in elsewhere."""
        if device.type == "cuda":
            pool = torch.cuda.graph_pool_handle()
            return DecodeGraphs(forward, lora, device, lambda: CudaGraph(pool), static)
        graphs = DecodeGraphs(forward, lora, device, lambda: CheckedGraph(graphs.static_tensors), static)
        return graphs

    def static_tensors(self) -> list[torch.Tensor]:
        """Every tensor a captured forward may read without computing it: the caller's static tensors, every
        graph's input buffers and the LoRA batches over them."""
        return [*self.static(), *self._owned]

    def serves(self, inputs: Inputs, use_lora: bool) -> bool:
        """A graph was captured at start for this step's shapes (else the runner runs it eagerly)."""
        return _key(inputs, use_lora) in self.graphs

    def run(self, inputs: Inputs, use_lora: bool) -> torch.Tensor:
        """Logits [B, V] of the padded decode step described by the host tensors `inputs`, replayed from the
        graph captured at start for its shapes (never captured here: `serves` says whether there is one)."""
        captured = self.graphs.get(_key(inputs, use_lora))
        if captured is None:
            raise RuntimeError(f"no decode graph was captured at start for {_key(inputs, use_lora)}")
        _load(captured.buffers, inputs)
        captured.graph.replay()
        self.replays += 1
        return captured.output

    def capture_buckets(self, step_inputs: Callable[[int], Inputs], buckets: list[int]) -> None:
        """Capture every bucket (base-only and, with adapters, LoRA) at start, on pad-only inputs; log the
        time and the device memory the graphs hold."""
        before = _device_memory(self.device)
        start = time.perf_counter()
        for size in buckets:
            for use_lora in (False, True) if self.lora is not None else (False,):
                inputs = step_inputs(size)
                self._capture(_key(inputs, use_lora), inputs, use_lora)
        held = _device_memory(self.device) - before
        log.info("CUDA graphs: captured %d decode graphs (buckets %s) in %.1f s; they hold %.1f MiB",
                 len(self.graphs), buckets, time.perf_counter() - start, held / 2**20)
        self.memory_bytes = held

    def _capture(self, key: GraphKey, inputs: Inputs, use_lora: bool) -> _Captured:
        buffers = {name: torch.empty_like(t, device=self.device) for name, t in inputs.items()}
        _load(buffers, inputs)
        batch = self.lora.static_batch(buffers["token_slots"], buffers["group_slots"]) if use_lora else None
        self._owned += [*buffers.values(), *((batch.rows, batch.padding) if batch is not None else ())]
        graph = self.make_graph()
        output = graph.capture(lambda: self.forward(buffers, batch))
        captured = _Captured(buffers, graph, output)
        self.graphs[key] = captured
        log.debug("captured a decode graph for %s", key)
        return captured


def _key(inputs: Inputs, use_lora: bool) -> GraphKey:
    return use_lora, tuple((name, tuple(t.shape)) for name, t in sorted(inputs.items()))


def _load(buffers: Inputs, inputs: Inputs) -> None:
    for name, t in inputs.items():
        buffers[name].copy_(t, non_blocking=True)


def _device_memory(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_reserved(device)
