"""AoE experts as a given expert-parallel rank would initialise them, in one process (CPU or one GPU).

megatron's RNG tracker gives every EP rank its own expert stream (``model_parallel_cuda_manual_seed``
with ``ep_rank``). Building the experts twice, as rank 0 and as rank 1, shows whether their weights come
from that stream: on a GPU the tracker forks the CUDA generator, so weights allocated on the CPU would
come out identical for every rank (the bug this guards against).
"""

from __future__ import annotations

import torch


def experts_as_ep_rank(cfg, ep_rank: int, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Freshly initialised AoE expert weights (2 local experts) for ``ep_rank``; parallel state initialised."""
    from megatron.core import tensor_parallel

    from moe_erc.model import gpt as model_lib
    from moe_erc.model.layers.routers.aoe import aoe_classes, expert_param_device

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, ep_rank=ep_rank)
    experts = aoe_classes(cfg)[1](num_local_experts=2, config=model_lib.transformer_config(cfg))
    weights = dict(experts.named_parameters())
    assert all(w.device == expert_param_device() for w in weights.values())
    return {name: w.detach().cpu().clone() for name, w in weights.items()}
