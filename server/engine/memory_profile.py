"""The profile run that sizes the KV pool on CUDA (kv_sizing.py): the engine's largest step, on a stand-in pool.

The largest step is one prefill chunk of --max-batch-tokens tokens (at most --max-model-len - 1) whose every row
keeps its logits, as a request with prompt logprobs does, followed by the engine's log-softmax over them:
[T, V] fp32 twice, the biggest transient of a step at a large vocabulary (2048 x 128k x 4 B = 1 GiB each).
Its KV rows go to the stand-in pool's scratch block (every block-table entry points there), so the stand-in
needs one block; the activations are the real ones. CUDA graphs are captured on the same stand-in to measure
what they hold, then dropped: the real ones are captured over the real pool once it is allocated.
"""

from __future__ import annotations

import torch

from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.request import Request
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.engine.scheduler import ScheduledChunk


def profile_step(runner: ModelRunner, num_tokens: int) -> None:
    """Run the largest step (module docstring) through `runner`, whose pool is a stand-in."""
    req = Request("loraplex-memory-profile", [0] * (num_tokens + 1), SamplingParams(max_tokens=1, prompt_logprobs=0),
                  None, None, None, None)  # type: ignore[arg-type]  # no detokenizer / stop matcher: never sampled
    req.blocks = [runner.kv.scratch_block] * -(-(num_tokens + 1) // runner.block_size)
    out = runner.execute([ScheduledChunk(req, 0, num_tokens)])
    for _, rows in out.prompt_logits:
        torch.log_softmax(rows, dim=-1)  # the engine's prompt-logprob pass allocates as much again
