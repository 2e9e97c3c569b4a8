"""megatron-core's step code that reads the device on a plain PyTorch install, made device-only.

Without transformer-engine or apex, megatron-core 0.19 falls back to implementations that stop the host
until the GPU has caught up (counted by ``benchmarks/step_budget.py``):

| megatron fallback | host reads per step | replacement here |
|---|---|---|
| ``local_multi_tensor_l2_norm`` in the gradient norm | one per gradient tensor (``torch.tensor`` of a list of device norms), then ``float()`` | :func:`foreach_l2_norm`: ``torch._foreach_norm`` (one multi-tensor kernel per device and dtype) and one reduction; the norm stays a ``[1]`` device tensor |
| ``get_grad_norm_fp32`` with no tensor-scale kernel | ``total_norm.item()`` | megatron keeps the norm on the device when a tensor-scale kernel exists (TE's path): :func:`foreach_scale` is that kernel, so the clip coefficient ``min(1, max_norm / norm)`` is computed and applied on the device |
| ``local_multi_tensor_scale`` (clipping, main -> model copies) | none, but two launches per tensor | :func:`foreach_scale`: ``torch._foreach_mul_`` / ``_foreach_copy_`` |
| ``ChainedOptimizer.get_grad_norm`` (dense and expert optimizers with different gradient-statistics groups) | ``bool(norm)`` and ``math.sqrt`` of each optimizer's norm | :func:`chained_grad_norm`: the same ``sqrt(sum of squares)`` on the device |
| ``VocabParallelCrossEntropy.calculate_predicted_logits`` | two boolean-mask assignments per micro-batch (``index_put_`` runs ``nonzero``) | the same function with ``masked_fill_`` (same values) |

:func:`install` swaps these into megatron's modules only where megatron chose its local fallback (with TE
or apex their kernels stay), on GPU and CPU alike, and returns what it swapped. The trainer then reads the
gradient norm only on logging steps.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from moe_erc.compat import import_megatron

import_megatron()
from megatron.core import utils as megatron_utils  # noqa: E402
from megatron.core.optimizer import clip_grads  # noqa: E402
from megatron.core.optimizer import optimizer as megatron_optimizer  # noqa: E402
from megatron.core.optimizer.optimizer import ChainedOptimizer  # noqa: E402
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy  # noqa: E402


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor=False, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm``: (``[1]`` fp32 L2 norm of every tensor, None), on the device."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale, *args):
    """Drop-in for ``amp_C.multi_tensor_scale`` and TE's ``multi_tensor_scale_tensor``: ``dst = src * scale``
    for every pair of ``tensor_lists = [src, dst]``; ``scale`` a float or a one-element device tensor."""
    src, dst = tensor_lists
    if not dst:
        return
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(())
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif isinstance(scale, float) and scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def predicted_logits_masked_fill(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 logits_max: torch.Tensor, vocab_start_index: int, vocab_end_index: int
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's ``calculate_predicted_logits`` with ``masked_fill_`` where it assigns through a boolean mask
    (``[s, b, v/tp]`` logits, ``[s, b]`` targets; same outputs, no ``nonzero``)."""
    vocab_parallel_logits -= logits_max.unsqueeze(dim=-1)
    target_mask = (target < vocab_start_index) | (target >= vocab_end_index)
    masked_target = (target.clone() - vocab_start_index).masked_fill_(target_mask, 0)
    logits_2d = vocab_parallel_logits.view(-1, vocab_parallel_logits.size()[-1])
    masked_target_1d = masked_target.view(-1)
    arange_1d = torch.arange(start=0, end=logits_2d.size()[0], device=logits_2d.device)
    predicted_logits_1d = logits_2d[arange_1d, masked_target_1d].clone().contiguous()
    predicted_logits = predicted_logits_1d.view_as(target).masked_fill_(target_mask, 0.0)
    exp_logits = vocab_parallel_logits
    torch.exp(vocab_parallel_logits, out=exp_logits)
    sum_exp_logits = exp_logits.sum(dim=-1)
    return target_mask, masked_target_1d, predicted_logits, sum_exp_logits, exp_logits


# megatron's originals (this module is imported before install() runs): the reference for tests.
_MEGATRON_CHAINED_GRAD_NORM = ChainedOptimizer.get_grad_norm
MEGATRON_PREDICTED_LOGITS = VocabParallelCrossEntropy.calculate_predicted_logits


@torch.no_grad()
def chained_grad_norm(self: ChainedOptimizer):
    """``ChainedOptimizer.get_grad_norm`` with the per-optimizer norms combined on the device."""
    if len(self.chained_optimizers) == 1 or self.grads_states_parallel_group_is_shared():
        return _MEGATRON_CHAINED_GRAD_NORM(self)
    norms = [optimizer.get_grad_norm() for optimizer in self.chained_optimizers]
    tensors = [n.reshape(-1).float() for n in norms if isinstance(n, torch.Tensor)]
    if not tensors or len(tensors) != sum(n is not None for n in norms):  # host floats: megatron's arithmetic
        return math.sqrt(sum(float(n or 0.0) ** 2 for n in norms))
    return torch.linalg.vector_norm(torch.cat(tensors))


def install() -> list[str]:
    """Swap the replacements into megatron where it uses its local fallbacks; idempotent. Returns their names."""
    swapped = []
    if clip_grads.l2_norm_impl in (megatron_utils.local_multi_tensor_l2_norm, foreach_l2_norm):
        clip_grads.l2_norm_impl = foreach_l2_norm
        clip_grads.multi_tensor_scale_impl = foreach_scale
        clip_grads.multi_tensor_scale_tensor_impl = foreach_scale
        swapped += ["grad-norm", "grad-clip"]
    if megatron_optimizer.multi_tensor_scale_impl in (megatron_utils.local_multi_tensor_scale, foreach_scale):
        megatron_optimizer.multi_tensor_scale_impl = foreach_scale
        swapped.append("param-copy")
    ChainedOptimizer.get_grad_norm = chained_grad_norm
    swapped.append("chained-grad-norm")
    VocabParallelCrossEntropy.calculate_predicted_logits = staticmethod(predicted_logits_masked_fill)
    swapped.append("cross-entropy")
    return swapped
