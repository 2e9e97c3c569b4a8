"""The layer spec: which module runs each part of a transformer layer, decided in one place.

megatron-core builds every layer from a ``ModuleSpec``; moe-erc starts from megatron's spec and swaps
classes in it, never subclassing the model:

| part | transformer-engine present | otherwise (plain CUDA torch, CPU) |
|---|---|---|
| linears, norms | megatron's TE spec | megatron's local spec |
| core attention (``model.attention_backend=auto``) | TE's fused attention | :class:`moe_erc.model.layers.attention.SDPAttention` |
| experts, ``moe.moe_grouped_gemm=true`` | TE grouped GEMM (``TEGroupedMLP``) | :class:`moe_erc.model.layers.experts.GroupedExperts` |
| experts, ``moe.moe_grouped_gemm=false`` | ``SequentialMLP`` | ``SequentialMLP`` |
| router (and AoE's experts) | :mod:`moe_erc.model.layers.routers` | :mod:`moe_erc.model.layers.routers` |
"""

from __future__ import annotations

import functools

from moe_erc.compat import import_megatron
from moe_erc.config import Config
from moe_erc.model.layers import routers
from moe_erc.model.layers.kernels import have_transformer_engine

import_megatron()
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec  # noqa: E402


def decoder_block_spec(cfg: Config, tf_config):
    """megatron's decoder block spec for ``tf_config`` with moe-erc's modules swapped in."""
    use_te = have_transformer_engine()
    block_spec = get_gpt_decoder_block_spec(tf_config, use_transformer_engine=use_te)
    router, experts = routers.router_and_experts(cfg)
    if experts is None and cfg.moe.moe_grouped_gemm and not use_te:
        from moe_erc.model.layers.experts import GroupedExperts

        experts = GroupedExperts
    if router is not None or experts is not None:
        _use_moe_classes(block_spec, router, experts)
    backend = cfg.model.attention_backend
    if backend == "sdpa" or (backend == "auto" and not use_te):
        from moe_erc.model.layers.attention import SDPAttention

        for spec in block_spec.layer_specs:
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return block_spec


def _moe_submodules(layer_spec):
    """The ``MoESubmodules`` of a layer spec's MLP, or None for a dense layer. megatron-core 0.19 builds
    the MLP entry as ``partial(MoELayer, submodules=...)``; older releases as a ``ModuleSpec``."""
    mlp = getattr(layer_spec.submodules, "mlp", None)
    if isinstance(mlp, functools.partial):
        submodules = mlp.keywords.get("submodules")
    else:
        submodules = getattr(mlp, "submodules", None)
    return submodules if hasattr(submodules, "router") else None


def _use_moe_classes(block_spec, router, experts) -> None:
    """Swap router / expert classes in every MoE layer spec (megatron's plug-in point; no MoELayer subclass)."""
    for spec in block_spec.layer_specs:
        submodules = _moe_submodules(spec)
        if submodules is not None:
            if router is not None:
                submodules.router = router
            if experts is not None:
                submodules.experts = experts
