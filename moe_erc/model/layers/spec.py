"""The layer spec: which module runs each part of a transformer layer, decided in one place.

megatron-core builds every layer from a ``ModuleSpec``; moe-erc starts from megatron's spec and swaps
classes in it, never subclassing the model:

| part | transformer-engine present | otherwise (plain CUDA torch, CPU) |
|---|---|---|
| linears, norms | megatron's TE spec | megatron's local spec |
| core attention (``model.attention_backend=auto``) | TE's fused attention | :class:`moe_erc.model.layers.attention.SDPAttention` (megatron's for windows / sinks) |
| experts, ``moe.moe_grouped_gemm=true`` | TE grouped GEMM (``TEGroupedMLP``) | :class:`moe_erc.model.layers.experts.GroupedExperts` |
| experts, ``moe.moe_grouped_gemm=false`` | ``SequentialMLP`` | ``SequentialMLP`` |
| router (and AoE's experts) | :mod:`moe_erc.model.layers.routers` | :mod:`moe_erc.model.layers.routers` |
"""

from __future__ import annotations

import functools

from moe_erc.compat import import_megatron
from moe_erc.config import Config, layer_kinds
from moe_erc.model.layers import routers
from moe_erc.model.layers.kernels import have_transformer_engine

import_megatron()
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec  # noqa: E402


def decoder_block_spec(cfg: Config, tf_config):
    """megatron's decoder block spec for ``tf_config`` with moe-erc's modules swapped in."""
    use_te = have_transformer_engine()
    if cfg.model.add_bias_linear and not use_te and cfg.moe.router == "topk" and any(layer_kinds(cfg)):
        _check_expert_biases(cfg)
    block_spec = get_gpt_decoder_block_spec(tf_config, use_transformer_engine=use_te)
    router, experts = routers.router_and_experts(cfg)
    if experts is None and cfg.moe.moe_grouped_gemm and not use_te:
        from moe_erc.model.layers.experts import GroupedExperts

        experts = GroupedExperts
    if router is not None or experts is not None:
        _use_moe_classes(block_spec, router, experts)
    if cfg.model.multi_latent_attention and cfg.model.q_lora_rank is None and not use_te:
        # No Q compression: no Q latent to normalise (DeepSeek-V2-Lite, Moonlight); the KV latent keeps its norm.
        from megatron.core.transformer.identity_op import IdentityOp

        from moe_erc.model.layers.mla import LocalMLASelfAttention

        for spec in block_spec.layer_specs:
            spec.submodules.self_attention.module = LocalMLASelfAttention
            spec.submodules.self_attention.submodules.q_layernorm = IdentityOp
    if cfg.model.qk_layernorm_over == "projection":
        from moe_erc.model.layers.qk_norm import KeyProjectionNorm, QueryProjectionNorm

        for spec in block_spec.layer_specs:
            spec.submodules.self_attention.submodules.q_layernorm = QueryProjectionNorm
            spec.submodules.self_attention.submodules.k_layernorm = KeyProjectionNorm
    if attention_backend(cfg) == "sdpa":
        from moe_erc.model.layers.attention import SDPAttention

        for spec in block_spec.layer_specs:
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return block_spec


def _check_expert_biases(cfg: Config) -> None:
    """Expert biases without transformer-engine: GroupedExperts has them; megatron-core 0.19.2's SequentialMLP adds
    them in place on an autograd view and fails in backward. (Expert-TP > 1 with expert biases megatron's own
    TransformerConfig refuses, in every spec: "Bias in Moe is only supported when ETP==1".)"""
    from moe_erc.errors import ConfigError

    if not cfg.moe.moe_grouped_gemm:
        raise ConfigError("model.add_bias_linear=true with MoE layers needs moe.moe_grouped_gemm=true without "
                          "transformer-engine (megatron-core 0.19.2's SequentialMLP fails in backward with expert "
                          "biases); or use model.add_qkv_bias for attention biases only")


def attention_backend(cfg: Config) -> str:
    """Which core attention the layers run: ``te`` (transformer-engine's, when it imports), ``sdpa``
    (:class:`~moe_erc.model.layers.attention.SDPAttention`), or ``local`` (megatron's unfused attention, which
    ``auto`` picks without TE for what SDPA cannot express here: sliding windows and attention sinks)."""
    m = cfg.model
    if m.attention_backend == "local":
        return "local"
    if m.attention_backend == "sdpa":
        return "sdpa"
    if have_transformer_engine():
        return "te"
    return "local" if (m.window_size is not None or m.softmax_type != "vanilla") else "sdpa"


def mtp_block_spec(cfg: Config, tf_config, block_spec):
    """megatron's multi-token-prediction block spec (None without ``model.mtp_num_layers``): its layers are
    the decoder's last layer spec, so they carry moe-erc's router, experts and attention too."""
    if not cfg.model.mtp_num_layers:
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    return get_gpt_mtp_block_spec(tf_config, block_spec, use_transformer_engine=have_transformer_engine())


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
