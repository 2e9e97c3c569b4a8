"""Is everything finite? Checks that cost O(1) memory and leave the answer on the device; what a step that is not
finite does (``training.nan_policy``).

``torch.isfinite(t).all()`` allocates a bool tensor as large as ``t``: for a 3B model's gradient buffer
that is 1.27 GiB every step, enough to run a full GPU out of memory. A min/max reduction needs no such
tensor: NaN propagates through both, and +-inf shows up in one of them. The answer stays a 0-dim tensor
on the tensor's device, so callers decide when (once per step, with the other flags) to read it on the host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from moe_erc.errors import UserError


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


class TrainingHalted(UserError):
    """Training stopped on purpose (non-finite values); exit code 3, message names the diagnostic."""

    exit_code = 3


def non_finite_parameters(model_chunks, limit: int = 50) -> list[str]:
    """Names of the parameters whose gradient (megatron's ``main_grad``) is not finite, at most ``limit``."""
    names = []
    for chunk in model_chunks:
        for name, param in chunk.module.named_parameters():
            grad = getattr(param, "main_grad", None)
            if grad is not None and not bool(tensor_finite(grad)):
                names.append(name)
    return names[:limit]


class NonFinitePolicy:
    """``training.nan_policy`` for a step whose loss or gradients are not finite (its update already skipped):
    ``skip`` goes on, until more than ``max_skipped_steps`` were skipped; ``stop`` (or too many) writes
    ``nan_diagnostic_stepN.json`` in the run directory and raises :class:`TrainingHalted`."""

    def __init__(self, training_cfg, run_dir: Path, ckpt_dir: Path, is_logger: bool, say=print):
        self.cfg, self.run_dir, self.ckpt_dir, self.is_logger, self.say = training_cfg, run_dir, ckpt_dir, is_logger, say
        self.skipped_steps = 0

    def __call__(self, step: int, lm_loss: float, model_chunks, erc_stats: Callable[[], dict] | None) -> None:
        """Collective when it stops (``erc_stats``, the ERC statistics for the diagnostic, reduce over ranks)."""
        t = self.cfg
        self.skipped_steps += 1
        self.say(f"non-finite loss or gradients at step {step} (loss {lm_loss}); "
                 f"update skipped ({self.skipped_steps} so far)")
        if t.nan_policy == "skip" and self.skipped_steps <= t.max_skipped_steps:
            return
        path = self.run_dir / f"nan_diagnostic_step{step}.json"
        # Every rank runs the collectives, not only the logging one: a rank that skipped them would leave the
        # others waiting until the NCCL timeout.
        extra = {"erc": erc_stats()} if erc_stats is not None else {}
        if self.is_logger:
            diagnostic = {"step": step, "lm_loss": lm_loss, "skipped_steps": self.skipped_steps,
                          "policy": t.nan_policy, "non_finite_gradients": non_finite_parameters(model_chunks), **extra}
            path.write_text(json.dumps(diagnostic, indent=1, default=str))
        reason = ("training.nan_policy=stop" if t.nan_policy == "stop"
                  else f"more than training.max_skipped_steps={t.max_skipped_steps} skipped steps")
        raise TrainingHalted(f"non-finite loss or gradients at step {step} ({reason}); "
                             f"diagnostic: {path}; the last checkpoint is in {self.ckpt_dir}")
