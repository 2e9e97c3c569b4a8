"""Is everything finite? Checks that cost O(1) memory and leave the answer on the device.

``torch.isfinite(t).all()`` allocates a bool tensor as large as ``t``: for a 3B model's gradient buffer
that is 1.27 GiB every step, enough to run a full GPU out of memory. A min/max reduction needs no such
tensor: NaN propagates through both, and +-inf shows up in one of them. The answer stays a 0-dim tensor
on the tensor's device, so callers decide when (once per step, with the other flags) to read it on the host.
"""

from __future__ import annotations

from typing import Iterable

import torch


def tensor_finite(tensor: torch.Tensor) -> torch.Tensor:
    """0-dim bool on ``tensor.device``: no NaN or +-inf in ``tensor``. One reduction pass, no full-size temporary."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-dim bool on ``device``: every tensor finite (True for none)."""
    ok = torch.ones((), dtype=torch.bool, device=device)
    for tensor in tensors:
        ok &= tensor_finite(tensor).to(device)
    return ok


def gradient_buffers(model_chunks) -> list[torch.Tensor]:
    """The contiguous gradient buffers of megatron-DDP-wrapped chunks (dense and expert-parallel)."""
    return [buffer.grad_data for chunk in model_chunks
            for buffer in (*chunk.buffers, *chunk.expert_parallel_buffers)]
