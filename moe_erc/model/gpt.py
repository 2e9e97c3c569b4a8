"""Build megatron-core's GPTModel with MoE layers from a :class:`moe_erc.config.Config`.

The model knows nothing about launchers or data: it takes a config and the vocabulary size and returns
the module for this pipeline stage. Parallel state must already be initialised
(:func:`moe_erc.training.parallel.initialize`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_erc.compat import import_megatron, runtime_device
from moe_erc.config import Config, router_pre_softmax
from moe_erc.errors import ConfigError
from moe_erc.model.layers import routers
from moe_erc.model.layers.dispatch import use_device_counts
from moe_erc.model.layers.kernels import Kernels
from moe_erc.model.layers.kernels import detect as detect_kernels
from moe_erc.model.layers.spec import decoder_block_spec, mtp_block_spec
from moe_erc.model.layers.sync_free import install as install_sync_free

import_megatron()
from megatron.core import parallel_state  # noqa: E402
from megatron.core.activations import quick_gelu  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer import MLATransformerConfig, TransformerConfig  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(cfg: Config, device: str) -> str:
    """``auto`` -> bf16 on GPU, fp32 on CPU."""
    if cfg.training.precision != "auto":
        return cfg.training.precision
    return "bf16" if device == "cuda" else "fp32"


def padded_vocab_size(vocab_size: int, cfg: Config) -> int:
    """Round the tokenizer's vocabulary up so the embedding splits evenly over TP ranks
    (:func:`moe_erc.model.flops.padded_vocab_size`: the same shape in every TP layout)."""
    from moe_erc.model.flops import padded_vocab_size as padded

    return padded(cfg, vocab_size)


def transformer_config(cfg: Config, precision: str = "fp32", kernels: Kernels | None = None) -> TransformerConfig:
    """Translate our config into megatron-core's ``TransformerConfig``.

    ``kernels`` says which optional fused kernels to switch on (:func:`moe_erc.model.layers.kernels.detect`); by default
    those that run on this machine's CUDA device, none on CPU.
    """
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    if kernels is None:
        kernels = detect_kernels(runtime_device(), cfg.training.fused_kernels)
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    try:
        tf_config = _megatron_transformer_config(cfg, precision, tp, kernels, ffn)
    except (ValueError, AssertionError) as exc:  # megatron's own checks: one line for the user
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"megatron-core rejected the model configuration: {first_line}") from None
    if m.rope_type == "yarn" and not m.multi_latent_attention:
        # GPTModel's yarn position embedding and the attention's cos/sin scale read these (no TransformerConfig
        # fields: Megatron-LM sets them from its arguments). mscale / mscale_all_dim give transformers' attention
        # factor (0.1 ln s + 1 with the defaults).
        for key, value in dict(rotary_scaling_factor=m.rotary_scaling_factor,
                               original_max_position_embeddings=m.original_max_position_embeddings or m.seq_length,
                               beta_fast=m.beta_fast, beta_slow=m.beta_slow, mscale=m.mscale,
                               mscale_all_dim=m.mscale_all_dim,
                               correction_range_round_to_int=m.yarn_correction_range_round_to_int).items():
            setattr(tf_config, f"yarn_{key}", value)
    return tf_config


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "quick_gelu": quick_gelu}


def _architecture_fields(cfg: Config) -> dict:
    """The TransformerConfig fields of the architecture features (attention variants, shared experts, group
    routing, MTP), and MLATransformerConfig's with multi-latent attention."""
    m, moe = cfg.model, cfg.moe
    activation = m.activation or ("silu" if m.swiglu else "gelu")
    fields = dict(
        kv_channels=m.kv_channels, add_qkv_bias=m.add_qkv_bias, activation_func=_ACTIVATIONS[activation],
        activation_func_clamp_value=m.activation_func_clamp_value, glu_linear_offset=m.glu_linear_offset,
        window_size=tuple(m.window_size) if m.window_size is not None else None,
        window_attn_skip_freq=m.window_attn_skip_freq, softmax_type=m.softmax_type,
        mtp_num_layers=m.mtp_num_layers, mtp_loss_scaling_factor=m.mtp_loss_scaling_factor,
        moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=moe.moe_shared_expert_gate, moe_shared_expert_overlap=moe.moe_shared_expert_overlap,
        moe_router_num_groups=moe.moe_router_num_groups, moe_router_group_topk=moe.moe_router_group_topk,
        moe_router_topk_scaling_factor=moe.moe_router_topk_scaling_factor,
    )
    if m.multi_latent_attention:
        fields.update(
            multi_latent_attention=True, q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
            qk_head_dim=m.qk_head_dim, qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
            rope_type=m.rope_type, rotary_base=m.rotary_base, rotary_percent=m.rotary_percent,
            rotary_scaling_factor=m.rotary_scaling_factor,
            original_max_position_embeddings=m.original_max_position_embeddings or m.seq_length,
            beta_fast=m.beta_fast, beta_slow=m.beta_slow, mscale=m.mscale, mscale_all_dim=m.mscale_all_dim)
    return fields


def _megatron_transformer_config(cfg: Config, precision: str, tp: int, kernels: Kernels, ffn: int):
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    config_class = MLATransformerConfig if m.multi_latent_attention else TransformerConfig
    return config_class(
        **_architecture_fields(cfg),
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=ffn,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu,
        add_bias_linear=m.add_bias_linear,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        # parallel layout
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or tp,
        sequence_parallel=p.sequence_parallel if p.sequence_parallel is not None else tp > 1,
        # MoE (Megatron-LM names)
        num_moe_experts=moe.num_experts,
        moe_layer_freq=m.moe_layer_freq,
        moe_router_topk=moe.moe_router_topk,
        moe_ffn_hidden_size=moe.moe_ffn_hidden_size or ffn,
        moe_router_load_balancing_type=moe.moe_router_load_balancing_type,
        moe_aux_loss_coeff=moe.moe_aux_loss_coeff,
        moe_z_loss_coeff=moe.moe_z_loss_coeff,
        moe_router_score_function=moe.moe_router_score_function,
        moe_router_pre_softmax=router_pre_softmax(cfg),
        moe_router_enable_expert_bias=moe.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=moe.moe_router_bias_update_rate,
        moe_token_dispatcher_type=moe.moe_token_dispatcher_type,
        # TE's grouped GEMM; without TE, moe_erc.model.layers.spec puts GroupedExperts in the spec instead.
        moe_grouped_gemm=moe.moe_grouped_gemm and kernels.transformer_engine,
        moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
        moe_router_dtype=moe.moe_router_dtype,
        moe_permute_fusion=kernels.permute,
        # precision
        params_dtype=_DTYPES[precision],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        pipeline_dtype=_DTYPES[precision],
        # Optional fused kernels: on only where what they need imports (moe_erc/model/layers/kernels.py).
        masked_softmax_fusion=kernels.masked_softmax,
        bias_activation_fusion=kernels.bias_activation,
        bias_dropout_fusion=kernels.bias_dropout,
        apply_rope_fusion=kernels.rope,
        gradient_accumulation_fusion=kernels.grad_accumulation,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=kernels.cross_entropy,
        cross_entropy_fusion_impl="native",
        # Weights are drawn per rank from the RNG tracker (TP/EP-aware seeds). use_cpu_initialization
        # would give every EP rank the same experts.
        use_cpu_initialization=False,
    )


def build_model(cfg: Config, tf_config: TransformerConfig, vocab_size: int) -> GPTModel:
    """GPTModel for this pipeline stage. ``vocab_size`` is the padded size (:func:`padded_vocab_size`)."""
    block_spec = decoder_block_spec(cfg, tf_config)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    model = GPTModel(
        config=tf_config,
        transformer_layer_spec=block_spec,
        vocab_size=vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings or cfg.model.seq_length,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        # MLA applies its own RoPE (rope_type); standard attention's yarn is GPTModel's 'yarn' embedding.
        position_embedding_type="yarn" if cfg.model.rope_type == "yarn" and not cfg.model.multi_latent_attention
        else cfg.model.position_embedding_type,
        rotary_base=cfg.model.rotary_base,
        rotary_percent=cfg.model.rotary_percent,
        mtp_block_spec=mtp_block_spec(cfg, tf_config, block_spec),
    )
    routers.wire(model)
    use_device_counts(model)  # token counts stay on the device for experts that take them
    install_sync_free()  # megatron's grad norm / clip / cross-entropy without host reads (no TE/apex)
    # Expert parameters always live in megatron's expert groups, as they do at EP > 1: the optimizer is then
    # the same chained dense + expert one in every layout, so checkpoints with optimizer state reshard
    # across EP sizes. At EP = 1 the expert-DP group is the DP group, so gradients are unchanged.
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
    _cast_parameters(model, tf_config.params_dtype)
    if runtime_device() == "cuda" and torch.get_default_device().type != "meta":
        model.cuda(torch.cuda.current_device())
    return model


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter in the compute dtype, as megatron's ``Float16Module`` leaves them.

    A few modules ignore ``params_dtype`` (torch's RMSNorm/LayerNorm in the local spec are built in fp32).
    megatron's mixed-precision optimizer keeps fp32 parameters in a separate group that its non-distributed
    ``sharded_state_dict`` cannot map ("Param id ... does not match any model sharded param" at the first
    save), and an fp32 norm weight makes the norm run outside the compute dtype. Buffers (expert bias,
    K-Means centroids, RoPE frequencies) keep their own precision.
    """
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` every transformer layer in place (``nn.Module.compile``); returns how many.

    One compiled region per layer (as torchtitan does) keeps compile time bounded and lets the MoE
    dispatch, whose shapes depend on the routing, fall back to eager between regions.
    """
    layers = list(getattr(getattr(model, "decoder", None), "layers", []))
    for layer in layers:
        layer.compile()
    return len(layers)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters held by this rank."""
    return sum(p.numel() for p in model.parameters())
