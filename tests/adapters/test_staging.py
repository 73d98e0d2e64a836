"""HostStaging: a step's small host -> device inputs through one page-locked buffer (CUDA), plain on the CPU."""

from __future__ import annotations

import pytest
import torch

from loraplex.adapters.ops.staging import HostStaging


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_inputs_arrive_whole_in_their_dtype_across_growth_and_resets(device):
    staging = HostStaging(torch.device(device), capacity=64)  # small: the third input outgrows it
    ids = staging.to_device([1, 2, 3], torch.long)
    flags = staging.to_device([True, False], torch.bool)
    big = staging.to_device(list(range(100)), torch.int32)
    dst = torch.zeros(5, dtype=torch.float32, device=device)
    staging.copy_into(dst, [0.5, 1.5])
    assert ids.tolist() == [1, 2, 3] and flags.tolist() == [True, False] and big.tolist() == list(range(100))
    assert dst.tolist() == [0.5, 1.5, 0.0, 0.0, 0.0] and big.dtype == torch.int32 and big.device.type == device
    staging.reset()  # the next step reuses the buffer from its start
    assert staging.to_device([7], torch.long).tolist() == [7]
