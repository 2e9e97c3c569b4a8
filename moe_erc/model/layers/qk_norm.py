"""RMSNorm of Q and K over the whole projection, all heads together (OLMoE's ``q_norm`` / ``k_norm``).

megatron-core's ``qk_layernorm`` normalises each head on its own (Qwen3-MoE); OLMoE normalises the query
projection over all ``heads x head_dim`` values of a token, and the key projection over all ``groups x head_dim``.
``model.qk_layernorm_over: projection`` puts :class:`QueryProjectionNorm` / :class:`KeyProjectionNorm` in the
layer spec's ``q_layernorm`` / ``k_layernorm`` slots (megatron calls them on ``[s, b, heads_local, head_dim]``).

Under tensor parallelism each rank holds its heads' slice of the weight (partitioned along dim 0, so checkpoints
reshard across TP sizes) and the sum of squares is all-reduced over the TP group, forward and backward: every
rank normalises by the statistics of the whole projection, as one process does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_erc.compat import import_megatron

import_megatron()
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint  # noqa: E402


class _SumOverTensorParallel(torch.autograd.Function):
    """All-reduce (sum) over the TP group in forward and in backward: each rank's output depends on every
    rank's input, so each input's gradient is the sum of what every rank's output sends back."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ProjectionRMSNorm(MegatronModule):
    """``x / rms(x over all heads) * weight`` for ``x`` of shape ``[s, b, heads_local, head_dim]``."""

    def __init__(self, hidden_size: int, config, eps: float = 1e-5, heads: int = 0):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.head_dim, self.local_heads, self.width, self.eps = hidden_size, heads // tp, heads * hidden_size, eps
        self.weight = torch.nn.Parameter(torch.ones(self.local_heads * hidden_size, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x.float().pow(2).sum(dim=(-2, -1), keepdim=True)           # [s, b, 1, 1]
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            squares = _SumOverTensorParallel.apply(squares, parallel_state.get_tensor_model_parallel_group())
        normed = x.float() * torch.rsqrt(squares / self.width + self.eps)
        return normed.to(x.dtype) * self.weight.view(self.local_heads, self.head_dim)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


class QueryProjectionNorm(_ProjectionRMSNorm):
    """OLMoE's ``q_norm``: over ``num_attention_heads x head_dim``."""

    def __init__(self, hidden_size: int, config, eps: float = 1e-5):
        super().__init__(hidden_size, config, eps, heads=config.num_attention_heads)


class KeyProjectionNorm(_ProjectionRMSNorm):
    """OLMoE's ``k_norm``: over ``num_query_groups x head_dim``."""

    def __init__(self, hidden_size: int, config, eps: float = 1e-5):
        super().__init__(hidden_size, config, eps, heads=config.num_query_groups or config.num_attention_heads)
