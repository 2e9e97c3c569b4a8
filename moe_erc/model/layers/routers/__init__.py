"""Which router (and experts) each MoE layer uses, chosen by ``moe.router`` and ``erc.enabled``.

megatron-core builds every MoE layer from a spec; this package swaps the router class in that spec
(and, for Autonomy-of-Experts, the expert class), wires routers to their layer's experts after the
model is built, and runs the per-step router updates that happen outside autograd.

| ``moe.router`` | router | experts |
|---|---|---|
| ``topk`` | megatron's ``TopKRouter`` (``ERCRouter`` with ``erc.enabled``) | megatron's |
| ``kmeans`` | :class:`moe_erc.model.layers.routers.kmeans.KMeansRouter` (parameter-free) | megatron's |
| ``aoe`` | :class:`moe_erc.model.layers.routers.aoe.AoERouter` (scores from expert gates) | :class:`AoEExperts` |
"""

from __future__ import annotations

import torch

from moe_erc.config import Config


def router_and_experts(cfg: Config):
    """(router class or None to keep megatron's, experts class or None to keep megatron's)."""
    if cfg.moe.router == "kmeans":
        from moe_erc.model.layers.routers.kmeans import kmeans_router_class

        return kmeans_router_class(cfg), None
    if cfg.moe.router == "aoe":
        from moe_erc.model.layers.routers.aoe import aoe_classes

        return aoe_classes(cfg)
    if cfg.erc.enabled:
        from moe_erc.model.layers.erc_layer import router_class

        return router_class(cfg.erc, cfg.training.seed), None
    return None, None


def wire(model: torch.nn.Module) -> None:
    """After construction: cross-references inside each MoE layer (plain references, not submodules):
    ERC routers read their experts' gate weights, AoE experts read their router's cache and ``Wdown``."""
    for module in model.modules():
        router = getattr(module, "router", None)
        experts = getattr(module, "experts", None)
        if router is None or experts is None:
            continue
        if hasattr(router, "attach_experts"):
            router.attach_experts(experts)
        if hasattr(experts, "attach_router"):
            experts.attach_router(router)


@torch.no_grad()
def end_of_step(model_chunks, applied: bool) -> None:
    """Once per step on every rank: updates that are not gradients (K-Means centroids; collective) after an
    applied optimizer step, or, for a skipped step (non-finite values), discarding what it gathered."""
    for chunk in model_chunks:
        for module in chunk.modules():
            hook = getattr(module, "update_after_step" if applied else "discard_step", None)
            if hook is not None:
                hook()
