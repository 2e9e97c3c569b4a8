"""ERC inside megatron-core's MoE layer: a router that adds ``coeff * L_ERC`` to its layer's backward.

:class:`ERCRouter` is megatron's ``TopKRouter`` plus, once per training step, the ERC loss of its layer
(SPEC §1), attached to the routing probabilities the way megatron attaches its load-balancing loss: the
LM loss value is unchanged, and backward adds ``coeff * dL_ERC`` to this layer's router and experts.

Distributed evaluation (:func:`distributed_activation_matrix`), for expert weights split over EP ranks
(whole experts) and expert-TP ranks (gate rows ``D`` split):

* each rank computes the squared norms of its ``[n, m_local]`` block on its ``D`` shard;
* partial squared norms are summed over the expert-TP group (backward: identity), then square-rooted;
* blocks are all-gathered over the EP group (backward: each rank keeps its own slice), so every rank
  evaluates the same loss and each expert's gradient stays on the rank that owns it;
* the proxies' gradient is summed over the expert-TP x EP group (every rank holds only part of it), then
  divided by TP because megatron sums router gradients over TP under sequence parallelism, and averages
  them over DP;
* expert gradients are multiplied by DP / expert-DP, because megatron DDP scales expert gradients by
  1 / DP and sums them over the expert-DP group, which is right for token losses (each EP rank receives
  the tokens of several DP ranks) but not for a loss every rank evaluates in full.

Router and expert gradients therefore equal the single-process ones in every layout.

All ranks draw the same noise: the generator is seeded from (seed, step, layer).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from moe_erc.compat import comm_device, import_megatron
from moe_erc.config import ERCConfig
from moe_erc.model import erc

import_megatron()
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.mappings import (  # noqa: E402
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Which step it is (the trainer advances it; ERC runs once per layer per step and seeds its noise)

_STEP = {"value": 0}


def set_training_step(step: int) -> None:
    """Called by the trainer before each optimizer step (0-based step being computed)."""
    _STEP["value"] = step


def current_training_step() -> int:
    return _STEP["value"]


def layer_slot(router) -> int:
    """1-based row of a router's layer in per-layer tables (0: not numbered yet): decoder layers 1..L, then the
    multi-token-prediction layers L+1..L+mtp, whose own numbering restarts at 1 (megatron's MoE metrics do the same)."""
    number = router.layer_number or 0
    return number + router.config.num_layers if number and getattr(router, "is_mtp_layer", False) else number


def noise_seed(base_seed: int, step: int, layer_number: int) -> int:
    """Same on every rank; different for every (step, layer)."""
    return (base_seed * 1_000_003 + step * 10_007 + layer_number * 101) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------
# Expert weight layouts


def gate_weights(experts: torch.nn.Module, gated: bool):
    """This rank's gate projections: a stacked ``[m, D_shard, d]`` view (GroupedExperts) or one ``[D_shard, d]``
    view per local expert.

    SwiGLU experts keep ``[gate; up]`` stacked in ``linear_fc1`` (gate first), non-gated experts use all
    of ``linear_fc1``. Supports :class:`moe_erc.model.layers.experts.GroupedExperts`, megatron's ``SequentialMLP`` and
    TE ``GroupedLinear`` (``weight0..``).
    """
    if hasattr(experts, "gate_weight"):  # GroupedExperts: one strided view, no copy
        return experts.gate_weight()
    fc1_weights: list[torch.Tensor]
    if hasattr(experts, "local_experts"):  # SequentialMLP
        fc1_weights = [expert.linear_fc1.weight for expert in experts.local_experts]
    elif hasattr(experts, "linear_fc1") and hasattr(experts.linear_fc1, "weight0"):  # TEGroupedMLP
        fc1 = experts.linear_fc1
        fc1_weights = [getattr(fc1, f"weight{i}") for i in range(fc1.num_gemms)]
    else:
        raise NotImplementedError(
            f"ERC does not know the weight layout of {type(experts).__name__}; supported: GroupedExperts, "
            f"SequentialMLP, TEGroupedMLP (set moe.moe_grouped_gemm=false to use SequentialMLP)")
    if not gated:
        return fc1_weights
    return [w[: w.shape[0] // 2] for w in fc1_weights]


# ------------------------------------------------------------------------------------------------
# Distributed evaluation


class _ScaledGradSum(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over ``group``, times ``scale``."""

    @staticmethod
    def forward(ctx, x, group, scale):
        ctx.group, ctx.scale = group, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(grad, group=ctx.group)
        return grad * ctx.scale if ctx.scale != 1.0 else grad, None, None


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def distributed_activation_matrix(proxies: torch.Tensor, local_gate: list[torch.Tensor],
                                  expert_tp_group=None, ep_group=None, expert_group=None,
                                  router_grad_scale: float = 1.0, expert_grad_scale: float = 1.0) -> torch.Tensor:
    """``[n, d]`` proxies (same on every rank) and this rank's ``m_local`` gate shards -> full ``M`` ``[n, n]``.

    ``expert_group`` is the expert-TP x EP group (all ranks that together hold one copy of the experts).
    Gradients reaching the proxies are multiplied by ``router_grad_scale``, those reaching the gate weights
    by ``expert_grad_scale`` (see the module docstring for the values megatron's reductions need).
    """
    proxy_scale = router_grad_scale / expert_grad_scale  # the expert scale also flows back into the proxies
    if _size(expert_group) > 1 or proxy_scale != 1.0:
        proxies = _ScaledGradSum.apply(proxies, expert_group, proxy_scale)
    squared = erc.gate_squared_norms(proxies, local_gate)  # [n, m_local], partial over D shards
    if expert_grad_scale != 1.0:
        squared = _ScaledGradSum.apply(squared, None, expert_grad_scale)
    if _size(expert_tp_group) > 1:
        squared = reduce_from_tensor_model_parallel_region(squared, group=expert_tp_group)
    local_m = erc.norms_from_squares(squared)
    if _size(ep_group) > 1:
        gathered = gather_from_sequence_parallel_region(local_m.t().contiguous(), tensor_parallel_output_grad=False,
                                                        group=ep_group)  # [n_experts, n]
        return gathered.t()
    return local_m


def gradient_scales(sequence_parallel: bool) -> dict[str, float]:
    """``router_grad_scale`` and ``expert_grad_scale`` that undo megatron's reductions for a loss every rank
    evaluates in full: router gradients are summed over TP under SP; expert gradients get DP / expert-DP."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    edp = parallel_state.get_expert_data_parallel_world_size()
    return {"router_grad_scale": 1.0 / tp if sequence_parallel else 1.0, "expert_grad_scale": dp / edp}


class _AttachLoss(torch.autograd.Function):
    """Forward: return ``activation`` unchanged. Backward: give ``loss`` the gradient ``scale()``.

    Megatron's MoEAuxLossAutoScaler scales aux losses by 1/micro-batches because they are added on every
    micro-batch; ERC is evaluated once per step, so it needs its own (constant) scale.
    """

    @staticmethod
    def forward(ctx, activation, loss, scale_fn):
        ctx.scale_fn = scale_fn
        ctx.loss_shape = loss.shape
        return activation

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.loss_shape, ctx.scale_fn(), dtype=torch.float32, device=grad.device), None


# ------------------------------------------------------------------------------------------------
# The router


class ERCRouter(TopKRouter):
    """``TopKRouter`` + the ERC loss of this layer (once per training step).

    Built by megatron's ``MoELayer`` from the spec (``MoESubmodules.router``); :func:`attach_experts`
    hands it its layer's experts after construction (kept as a plain reference, not a submodule).
    """

    erc_config: ERCConfig = ERCConfig(enabled=True)
    base_seed: int = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._experts_ref: tuple = ()
        self._erc_step: Optional[int] = None
        self.erc_stats: dict[str, torch.Tensor] = {}

    def attach_experts(self, experts: torch.nn.Module) -> None:
        gate_weights(experts, self.config.gated_linear_unit)  # fail now on an unknown layout
        self._experts_ref = (experts,)

    def erc_matrix(self, step: int, noise: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M ``[n, n]``, eps ``[n]``) for this layer at ``step``; collective over the expert groups."""
        cfg = self.erc_config
        weight = self.weight if cfg.grad_to_router else self.weight.detach()
        eps = erc.noise_bounds(self.weight)
        if cfg.noise if noise is None else noise:
            generator = torch.Generator(device=self.weight.device)
            generator.manual_seed(noise_seed(self.base_seed, step, layer_slot(self)))
            proxies = erc.proxy_tokens(weight, eps, generator)
        else:
            proxies = weight.float()
        M = distributed_activation_matrix(
            proxies, gate_weights(self._experts_ref[0], self.config.gated_linear_unit),
            expert_tp_group=parallel_state.get_expert_tensor_parallel_group(),
            ep_group=parallel_state.get_expert_model_parallel_group(),
            expert_group=parallel_state.get_expert_tensor_and_model_parallel_group(),
            **gradient_scales(self.config.sequence_parallel))
        return M, eps

    def erc_loss_and_stats(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(``L_ERC`` of this layer at ``step``, its statistics as 0-dim device tensors: no host read)."""
        M, eps = self.erc_matrix(step)
        loss = erc.erc_loss_from_matrix(M, self.erc_config.alpha)
        return loss, {"erc_loss": loss.detach(), "erc_margin": erc.diagonal_margin(M),
                      "eps_mean": eps.mean(), "eps_min": eps.min(), "eps_max": eps.max()}

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().forward(input, padding_mask=padding_mask)
        step = current_training_step()
        if self.training and torch.is_grad_enabled() and self._experts_ref and self._erc_step != step:
            self._erc_step = step
            with torch.autograd.profiler.record_function("moe_erc.erc_loss"):  # a named span in profiles
                loss, self.erc_stats = self.erc_loss_and_stats(step)
            coeff = self.erc_config.coeff
            grad_scale_func = self.config.grad_scale_func  # fp16 loss scaling, as for the main loss

            def scale() -> float:
                if grad_scale_func is None:
                    return coeff
                return coeff * float(grad_scale_func(torch.ones(1, device=loss.device)))

            probs = _AttachLoss.apply(probs, loss, scale)
        return probs, routing_map


def router_class(erc_config: ERCConfig, seed: int) -> type:
    """An :class:`ERCRouter` subclass bound to this run's ERC settings (what the layer spec builds)."""
    return type("ERCRouter", (ERCRouter,), {"erc_config": erc_config, "base_seed": seed})


def erc_layer_stats(model_chunks, num_layers: int) -> dict[str, list[float]]:
    """Per-layer ERC statistics of the last step (``num_layers`` entries: decoder then MTP layers, NaN where no MoE
    layer; :func:`layer_slot`).
    Collective over the pipeline group (each stage holds its own layers)."""
    names = ("erc_loss", "erc_margin", "eps_mean", "eps_min", "eps_max")
    values = torch.zeros(len(names), num_layers, dtype=torch.float64, device=comm_device())
    present = torch.zeros(num_layers, dtype=torch.float64, device=comm_device())
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, ERCRouter) and module.erc_stats and module.layer_number:
                for k, name in enumerate(names):
                    values[k, layer_slot(module) - 1] = float(module.erc_stats[name])
                present[layer_slot(module) - 1] = 1.0
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if _size(pp_group) > 1:
        dist.all_reduce(values, group=pp_group)
        dist.all_reduce(present, group=pp_group)
    return {name: [v if p else float("nan") for v, p in zip(values[k].tolist(), present.tolist())]
            for k, name in enumerate(names)}


@torch.no_grad()
def router_matrix_stats(model_chunks, num_layers: int, posthoc_alpha: Optional[float] = None) -> dict[str, list[float]]:
    """Per layer, for every router with a router matrix (top-K with or without ERC, aux-loss-free; not AoE
    or K-Means): ``eps_mean/min/max`` of the clean rows and, with ``posthoc_alpha``, the post-hoc ERC loss
    ``erc_loss_posthoc`` (clean rows, no noise: the paper's Table 2 measure) -- for every method alike, so
    vanilla and ERC runs compare. NaN where a layer has none.

    Collective: the post-hoc loss gathers ``M`` over the expert groups, and every stage's values are summed
    over the pipeline group; call it on every rank.
    """
    names = ("eps_mean", "eps_min", "eps_max") + (("erc_loss_posthoc",) if posthoc_alpha is not None else ())
    values = torch.zeros(len(names), num_layers, dtype=torch.float64, device=comm_device())
    present = torch.zeros(num_layers, dtype=torch.float64, device=comm_device())
    for chunk in model_chunks:
        for module in chunk.modules():
            router, experts = getattr(module, "router", None), getattr(module, "experts", None)
            weight = getattr(router, "weight", None)
            if experts is None or not isinstance(weight, torch.Tensor) or not router.layer_number:
                continue
            row = layer_slot(router) - 1
            eps = erc.noise_bounds(weight)
            stats = [eps.mean(), eps.min(), eps.max()]
            if posthoc_alpha is not None:
                M = distributed_activation_matrix(
                    weight.float(), gate_weights(experts, router.config.gated_linear_unit),
                    expert_tp_group=parallel_state.get_expert_tensor_parallel_group(),
                    ep_group=parallel_state.get_expert_model_parallel_group())
                stats.append(erc.erc_loss_from_matrix(M, posthoc_alpha))
            values[:, row] = torch.stack([v.double() for v in stats]).to(values.device)
            present[row] = 1.0
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if _size(pp_group) > 1:
        dist.all_reduce(values, group=pp_group)
        dist.all_reduce(present, group=pp_group)
    present_list = present.tolist()
    return {name: [v if p else float("nan") for v, p in zip(values[k].tolist(), present_list)]
            for k, name in enumerate(names)}
