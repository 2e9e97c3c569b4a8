"""``moe-erc export CHECKPOINT --out DIR``: a Hugging Face transformers model directory from any checkpoint.

The checkpoint is loaded into one process whatever layout it was saved in (dist_checkpointing merges the
TP / EP / PP shards), its weights are renamed and split by the mapping ``import`` shares (:mod:`moe_erc.model.hf_mapping`,
docs/export.md), and transformers writes ``config.json``, ``model.safetensors`` shards and ``generation_config.json`` in its
hub format; the run's tokenizer is written beside them as a fast tokenizer. The architecture follows the
run's routing, so the exported forward is the trained one:

=======================================  ===================  ==========================================
routing and features                     architecture          how it is expressed
=======================================  ===================  ==========================================
top-K, softmax over the K (megatron's)   MixtralForCausalLM    softmax over all, top-K, renormalised
                                                               (the same gates)
the same with dense layers mixed in      Qwen2MoeForCausalLM   ``mlp_only_layers``, ``norm_topk_prob``
either, with per-head QK RMSNorm         Qwen3MoeForCausalLM   ``q_norm`` / ``k_norm`` over head_dim
either, QK RMSNorm over the projection   OlmoeForCausalLM      ``q_norm`` / ``k_norm`` over all heads,
(``qk_layernorm_over: projection``)                            ``norm_topk_prob``
softmax over all, top-K, no renorm       Qwen2MoeForCausalLM   ``norm_topk_prob=false``
(``moe_router_pre_softmax``)
a gated shared expert, QKV biases        Qwen2MoeForCausalLM   ``shared_expert`` + ``shared_expert_gate``,
                                                               ``qkv_bias``
sigmoid + expert bias (aux-loss-free)    Glm4MoeForCausalLM    ``e_score_correction_bias``, one group,
(+ an ungated shared expert, partial                           ``first_k_dense_replace``, ``n_shared_experts``,
rotary, QKV biases, per-head QK norm,                          ``partial_rotary_factor``, ``attention_bias``,
routed scaling: GLM-4.5)                                       ``use_qk_norm``, ``routed_scaling_factor``
the clamped GLU (``quick_gelu``, clamp,   GptOssForCausalLM     ``swiglu_limit``, ``sinks``, ``layer_types``
offset 1) with attention sinks (+ windows,                     + ``sliding_window``, yarn ``rope_parameters``,
yarn, biases: gpt-oss)                                         biases (zeros where the run has none)
the same with multi-latent attention     DeepseekV3ForCausalLM  ``q_lora_rank``, ``kv_lora_rank``, head sizes,
(+ group-limited routing, MTP dropped)                         ``rope_interleave`` (megatron's RoPE pairs),
                                                               ``n_group`` / ``topk_group``
=======================================  ===================  ==========================================

Anything else (AoE, K-Means, LayerNorm, linear biases, a capacity factor, and the architecture features whose
mappings are not written yet: MLA, MTP, windows, sinks, group routing, ...) is refused in one line naming it. ERC adds no parameters: an ERC run exports like its router.
Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from moe_erc.config import Config
from moe_erc.errors import ConfigError, UserError
from moe_erc.model.hf_mapping import layer_kinds, megatron_to_hf
from moe_erc.outputs import check_output_dir, output_lock, staged_directory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(UserError):
    """The checkpoint's model has no exact transformers equivalent (or cannot be read)."""


# ----------------------------------------------------------------------------------------- architecture


def architecture(cfg: Config) -> str:
    """``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``glm4_moe``, ``deepseek_v2`` or ``deepseek_v3`` for this run's routing
    and features;
    :class:`ExportError` otherwise."""
    from moe_erc.config import router_pre_softmax
    from moe_erc.model.flops import expert_width

    m, moe = cfg.model, cfg.moe
    missing = []
    if moe.router != "topk":
        missing.append(f"moe.router={moe.router} (no transformers model routes like "
                       f"{'Autonomy-of-Experts' if moe.router == 'aoe' else 'online K-Means'})")
    if m.normalization != "RMSNorm":
        missing.append(f"model.normalization={m.normalization} (the MoE classes use RMSNorm)")
    if not m.swiglu:
        missing.append("model.swiglu=false (the MoE classes use SwiGLU experts)")
    sigmoid = moe.moe_router_score_function == "sigmoid"
    if _is_gpt_oss(cfg):
        missing += _gpt_oss_problems(cfg)
        if missing:
            raise ExportError("cannot export to transformers: " + "; ".join(missing))
        return "gpt_oss"
    if m.add_bias_linear:
        missing.append("model.add_bias_linear=true (linear biases outside gpt-oss's architecture: quick_gelu GLU "
                       "and attention sinks)")
    mla = m.multi_latent_attention
    v2 = mla and not sigmoid and router_pre_softmax(cfg) and not moe.moe_router_enable_expert_bias
    if mla and not m.qk_layernorm:
        missing.append("multi-latent attention without the latent norms (model.qk_layernorm; DeepSeek always has them)")
    if mla and not v2 and not (sigmoid and moe.moe_router_enable_expert_bias):
        missing.append("multi-latent attention with routing other than DeepSeek-V3's (sigmoid + expert bias) or "
                       "DeepSeek-V2's (softmax over all experts, moe.moe_router_pre_softmax)")
    if mla and m.rope_type != "rope":
        missing.append(f"model.rope_type={m.rope_type} (yarn's transformers mapping is not written yet)")
    groups = moe.moe_router_num_groups
    if groups is not None and not (mla and moe.moe_router_topk == (1 if v2 else 2) * moe.moe_router_group_topk):
        missing.append("group-limited routing other than DeepSeek-V3's (top-K = 2 x groups kept) or DeepSeek-V2's "
                       "(top-K = groups kept): transformers scores a group by its top 2 / best expert")
    features = {"model.mtp_num_layers (outside DeepSeek-V3, whose transformers class drops MTP)":
                    m.mtp_num_layers and not mla,
                "model.window_size": m.window_size is not None, "model.softmax_type": m.softmax_type != "vanilla",
                "model.activation": m.activation not in (None, "silu"),
                "model.activation_func_clamp_value": m.activation_func_clamp_value is not None,
                "model.glu_linear_offset": m.glu_linear_offset != 0.0,
                "model.rotary_percent (outside GLM-4-MoE's sigmoid routing)": m.rotary_percent != 1.0 and not sigmoid,
                "moe.moe_router_topk_scaling_factor (outside GLM-4-MoE's and DeepSeek's routing)":
                    moe.moe_router_topk_scaling_factor is not None and not sigmoid and not v2}
    missing += [f"{key} (its transformers mapping is not written yet)" for key, on in features.items() if on]
    shared, gated = moe.moe_shared_expert_intermediate_size, moe.moe_shared_expert_gate
    if shared and not gated and (not (sigmoid or mla) or shared % expert_width(cfg)):
        missing.append("an ungated shared expert needs sigmoid routing or multi-latent attention (GLM-4-MoE's, "
                       "DeepSeek's n_shared_experts) and a width that is a multiple of the expert width; a gated one "
                       "is Qwen2-MoE's")
    if gated and moe.moe_router_score_function == "sigmoid":
        missing.append("a gated shared expert with sigmoid routing (Qwen2-MoE's shared expert gate, GLM-4-MoE's routing)")
    if m.qk_layernorm_over == "projection" and (shared or m.add_qkv_bias or sigmoid or not all(layer_kinds(cfg))):
        missing.append("OLMoE's projection QK norm with shared experts, QKV biases, sigmoid routing or dense layers")
    if m.position_embedding_type != "rope":
        missing.append(f"model.position_embedding_type={m.position_embedding_type} (the MoE classes use RoPE)")
    if moe.moe_expert_capacity_factor is not None:
        missing.append("moe.moe_expert_capacity_factor (token dropping)")
    kinds = layer_kinds(cfg)
    if sigmoid and not moe.moe_router_enable_expert_bias:
        missing.append("sigmoid routing without expert bias (Glm4Moe always adds its correction bias; enable "
                       "moe.moe_router_enable_expert_bias)")
    if sigmoid and kinds != sorted(kinds):
        missing.append("dense layers after MoE layers with sigmoid routing (Glm4Moe: only the first k dense)")
    if missing:
        raise ExportError("cannot export to transformers: " + "; ".join(missing))
    if mla:
        return "deepseek_v2" if v2 else "deepseek_v3"
    if sigmoid:
        return "glm4_moe"
    if m.qk_layernorm and m.qk_layernorm_over == "projection":  # RMSNorm of the whole Q and K projections
        return "olmoe"
    if m.qk_layernorm:  # per-head RMSNorm on Q and K, as megatron's
        if shared or m.add_qkv_bias:
            raise ExportError("cannot export to transformers: per-head QK norm with a shared expert or QKV biases "
                              "(no transformers MoE class has both)")
        return "qwen3_moe"
    if router_pre_softmax(cfg) or not all(kinds) or shared or m.add_qkv_bias:
        return "qwen2_moe"
    return "mixtral"


def _is_gpt_oss(cfg: Config) -> bool:
    """gpt-oss's signature: its clamped quick_gelu GLU with attention sinks."""
    return cfg.model.activation == "quick_gelu" and cfg.model.softmax_type == "learnable"


def _gpt_oss_problems(cfg: Config) -> list[str]:
    """What GptOss cannot express of this run (its routing, attention and MLP are fixed)."""
    from moe_erc.config import router_pre_softmax

    m, moe = cfg.model, cfg.moe
    checks = {
        "model.glu_linear_offset != 1 / no model.activation_func_clamp_value (gpt-oss: (clamp(up) + 1) * "
        "quick_gelu(clamp(gate)))": m.glu_linear_offset != 1.0 or m.activation_func_clamp_value is None,
        "sigmoid routing, expert bias or moe.moe_router_pre_softmax (gpt-oss: softmax over the top-K logits)":
            moe.moe_router_score_function != "softmax" or moe.moe_router_enable_expert_bias or router_pre_softmax(cfg),
        "shared experts, group routing or routed scaling": bool(moe.moe_shared_expert_intermediate_size) or
            moe.moe_router_num_groups is not None or moe.moe_router_topk_scaling_factor is not None,
        "dense layers (gpt-oss: every layer MoE)": not all(layer_kinds(cfg)),
        "QK norm, multi-latent attention, partial rotary or MTP": m.qk_layernorm or m.multi_latent_attention or
            m.rotary_percent != 1.0 or bool(m.mtp_num_layers),
        "a window that looks ahead (model.window_size [left, 0] only)": m.window_size is not None and
            m.window_size[1] != 0,
        f"model.position_embedding_type={m.position_embedding_type} (gpt-oss: RoPE)": m.position_embedding_type != "rope",
        "moe.moe_expert_capacity_factor (token dropping)": moe.moe_expert_capacity_factor is not None,
    }
    return [f"gpt-oss with {what}" for what, bad in checks.items() if bad]


def _gpt_oss_rope(cfg: Config) -> dict:
    """transformers' rope_parameters of this run: default, or yarn with megatron's attention factor written out."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

    m = cfg.model
    rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rope_type != "yarn":
        return rope
    return {"rope_type": "yarn", "rope_theta": float(m.rotary_base), "factor": m.rotary_scaling_factor,
            "beta_fast": m.beta_fast, "beta_slow": m.beta_slow, "truncate": m.yarn_correction_range_round_to_int,
            "original_max_position_embeddings": m.original_max_position_embeddings or m.seq_length,
            "attention_factor": _yarn_get_concentration_factor(m.rotary_scaling_factor, m.mscale, m.mscale_all_dim)}


def hf_config(cfg: Config, arch: str, vocab_size: int, eod: int, dtype: str):
    """The transformers config of ``arch`` with this run's shapes."""
    import transformers

    from moe_erc.config import router_pre_softmax

    m, moe = cfg.model, cfg.moe
    heads = m.num_attention_heads
    common = dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=heads, num_key_value_heads=m.num_query_groups or heads,
        head_dim=m.kv_channels or m.hidden_size // heads,
        hidden_act="silu", max_position_embeddings=m.max_position_embeddings or m.seq_length, rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights, attention_dropout=0.0,
        num_experts_per_tok=moe.moe_router_topk, bos_token_id=None, eos_token_id=eod, pad_token_id=eod,
        dtype=DTYPES[dtype],
    )
    rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    expert_width = moe.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size
    dense_width = m.ffn_hidden_size or 4 * m.hidden_size
    if arch == "gpt_oss":
        from megatron.core.transformer.utils import is_layer_window_attention

        window = tuple(m.window_size) if m.window_size is not None else None
        types = ["sliding_attention" if is_layer_window_attention(window, m.window_attn_skip_freq, i + 1)
                 else "full_attention" for i in range(m.num_layers)]
        return transformers.GptOssConfig(
            **common, intermediate_size=expert_width, num_local_experts=moe.num_experts, layer_types=types,
            sliding_window=window[0] + 1 if window else None, swiglu_limit=m.activation_func_clamp_value,
            attention_bias=True, router_aux_loss_coef=moe.moe_aux_loss_coeff, rope_parameters=_gpt_oss_rope(cfg))
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=expert_width, num_local_experts=moe.num_experts,
                                          router_jitter_noise=0.0, sliding_window=None, rope_parameters=rope)
    kinds = layer_kinds(cfg)
    shared = moe.moe_shared_expert_intermediate_size or 0
    if arch == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=expert_width, num_experts=moe.num_experts,
                                        norm_topk_prob=not router_pre_softmax(cfg), attention_bias=False,
                                        clip_qkv=None, rope_parameters=rope)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, intermediate_size=dense_width, moe_intermediate_size=expert_width, num_experts=moe.num_experts,
            norm_topk_prob=not router_pre_softmax(cfg), attention_bias=False, decoder_sparse_step=1,
            mlp_only_layers=[i for i, is_moe in enumerate(kinds) if not is_moe], use_sliding_window=False,
            rope_parameters=rope)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, intermediate_size=dense_width, moe_intermediate_size=expert_width, num_experts=moe.num_experts,
            shared_expert_intermediate_size=shared, norm_topk_prob=not router_pre_softmax(cfg), qkv_bias=m.add_qkv_bias,
            decoder_sparse_step=1, mlp_only_layers=[i for i, is_moe in enumerate(kinds) if not is_moe],
            use_sliding_window=False, rope_parameters=rope)
    if arch == "deepseek_v2":
        common.pop("head_dim"), common.pop("num_key_value_heads")
        grouped = (moe.moe_router_num_groups or 1) > 1
        return transformers.DeepseekV2Config(
            **common, intermediate_size=dense_width, moe_intermediate_size=expert_width,
            n_routed_experts=moe.num_experts, n_shared_experts=shared // expert_width,
            topk_method="group_limited_greedy" if grouped else "greedy",
            n_group=moe.moe_router_num_groups if grouped else None, topk_group=moe.moe_router_group_topk if grouped else None,
            norm_topk_prob=False, routed_scaling_factor=moe.moe_router_topk_scaling_factor or 1.0,
            first_k_dense_replace=kinds.index(True) if any(kinds) else m.num_layers,
            q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_head_dim,
            qk_rope_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim, attention_bias=False,
            rope_parameters=rope, num_key_value_heads=heads)
    if arch == "deepseek_v3":
        common.pop("head_dim"), common.pop("num_key_value_heads")
        return transformers.DeepseekV3Config(
            **common, intermediate_size=dense_width, moe_intermediate_size=expert_width,
            n_routed_experts=moe.num_experts, n_shared_experts=shared // expert_width,
            n_group=moe.moe_router_num_groups or 1, topk_group=moe.moe_router_group_topk or 1,
            norm_topk_prob=moe.moe_router_topk > 1, routed_scaling_factor=moe.moe_router_topk_scaling_factor or 1.0,
            first_k_dense_replace=kinds.index(True) if any(kinds) else m.num_layers,
            q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_head_dim,
            qk_rope_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim, rope_interleave=True,
            attention_bias=False, rope_parameters=rope, num_key_value_heads=heads)
    return transformers.Glm4MoeConfig(
        **common, intermediate_size=dense_width, moe_intermediate_size=expert_width, n_routed_experts=moe.num_experts,
        n_shared_experts=shared // expert_width, n_group=1, topk_group=1, norm_topk_prob=moe.moe_router_topk > 1,
        routed_scaling_factor=moe.moe_router_topk_scaling_factor or 1.0,
        first_k_dense_replace=kinds.index(True) if any(kinds) else m.num_layers, use_qk_norm=m.qk_layernorm,
        attention_bias=m.add_qkv_bias, rope_parameters={**rope, "partial_rotary_factor": m.rotary_percent})


# ---------------------------------------------------------------------------------------------- weights


def convert(cfg: Config, state: dict, arch: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """megatron GPTModel state (one process) -> transformers state of ``arch`` (in-memory names): the shared
    mapping (:func:`moe_erc.model.hf_mapping.megatron_to_hf`) plus what ``arch`` builds on its own."""
    out = megatron_to_hf(cfg, state, vocab_size, arch)
    d = cfg.model.hidden_size
    if arch == "gpt_oss":  # its class always has attention and router biases: zeros where the run has none
        heads, groups = cfg.model.num_attention_heads, cfg.model.num_query_groups or cfg.model.num_attention_heads
        head = cfg.model.kv_channels or d // heads
        sizes = {"q_proj": heads * head, "k_proj": groups * head, "v_proj": groups * head, "o_proj": d}
        for i in range(cfg.model.num_layers):
            for proj, size in sizes.items():
                out.setdefault(f"model.layers.{i}.self_attn.{proj}.bias", torch.zeros(size))
            out.setdefault(f"model.layers.{i}.mlp.router.bias", torch.zeros(cfg.moe.num_experts))
    for i, is_moe in enumerate(layer_kinds(cfg)):
        dst = f"model.layers.{i}"
        bias = f"{dst}.mlp.gate.e_score_correction_bias"
        if bias in out:
            out[bias] = out[bias].float()  # transformers keeps the correction bias in fp32 whatever the dtype
        if is_moe and arch in ("qwen2_moe", "glm4_moe", "deepseek_v2", "deepseek_v3") and \
                not cfg.moe.moe_shared_expert_intermediate_size:
            # their always-built shared expert, made zero-width
            shared = "shared_expert" if arch == "qwen2_moe" else "shared_experts"
            for proj, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                out[f"{dst}.mlp.{shared}.{proj}.weight"] = torch.zeros(shape)
            if arch == "qwen2_moe":
                out[f"{dst}.mlp.shared_expert_gate.weight"] = torch.zeros(1, d)
    return out


# ------------------------------------------------------------------------------------------- tokenizer


def run_tokenizer(cfg: Config, step_dir: Path, tokenizer: str | None = None):
    """The tokenizer the run trained with: ``--tokenizer``, the copy in the run directory, or the one saved
    beside its data (``tokenizer.path`` / data prefix, relative to the current directory)."""
    from moe_erc.data.tokenizer import _load_tokenizer_file, load_tokenizer, resolve_tokenizer

    if tokenizer:
        return load_tokenizer(tokenizer)
    for parent in step_dir.parents:
        if (parent / "tokenizer.json").is_file() and (parent / "config.yaml").is_file():
            return _load_tokenizer_file(parent / "tokenizer.json")
    from moe_erc.data.corpus import EMBEDDED_PREFIX

    raw = cfg.data.data_path
    if raw in ("embedded", ["embedded"]):
        raw = str(EMBEDDED_PREFIX)
    prefixes = [raw] if isinstance(raw, str) else [p for p in raw if isinstance(p, str)]
    try:
        return resolve_tokenizer(prefixes, cfg.tokenizer.path)
    except UserError as exc:
        raise ExportError(f"cannot find the run's tokenizer ({exc}); pass --tokenizer PATH") from None


def save_tokenizer(tokenizer, out: Path) -> None:
    """The tokenizer as a transformers fast tokenizer; its end-of-document token is EOS and padding."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf_tokenizer, eos_token=tokenizer.eod_token,
                                   pad_token=tokenizer.eod_token, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------- export


def export(path: str, out: str, dtype: str = "fp32", tokenizer: str | None = None,
           max_shard_size: str = "5GB") -> dict:
    """Write the transformers directory ``out``; returns a summary (architecture, parameters, files)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("moe-erc export needs transformers: pip install -e '.[hf]' "
                          "(scripts/setup_env.sh installs it)") from None
    from transformers import AutoModelForCausalLM, GenerationConfig

    from moe_erc.training.checkpoint import one_process_model

    out_dir = Path(out)
    with one_process_model(path, check=architecture) as (cfg, net, meta):  # refused before loading
        arch = architecture(cfg)
        tok = run_tokenizer(cfg, Path(meta["step_dir"]), tokenizer)
        state = {k: v for k, v in net.state_dict().items() if "_extra_state" not in k}
        vocab = max(tok.vocab_size, cfg.model.vocab_size or 0)  # an imported model keeps its own vocabulary size
        weights = convert(cfg, state, arch, vocab)
    config = hf_config(cfg, arch, vocab, tok.eod, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    expected = set(model.state_dict())
    if set(weights) != expected:
        raise ExportError(f"weight mapping mismatch for {arch}: missing {sorted(expected - set(weights))[:4]}, "
                          f"unexpected {sorted(set(weights) - expected)[:4]}")
    model.load_state_dict({k: v.to(DTYPES[dtype]) if v.is_floating_point() and "correction_bias" not in k else v
                           for k, v in weights.items()}, strict=True, assign=True)
    with staged_directory(out_dir) as staging:  # a failure half-way leaves an earlier export as it was
        model.save_pretrained(str(staging), max_shard_size=max_shard_size)
        GenerationConfig(eos_token_id=tok.eod, pad_token_id=tok.eod, bos_token_id=None).save_pretrained(str(staging))
        save_tokenizer(tok, staging)
    summary = {"architecture": type(model).__name__, "checkpoint": meta["step_dir"], "step": meta.get("step"),
               "dtype": dtype, "vocab_size": vocab, "parameters": sum(w.numel() for w in weights.values()),
               "out": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir())}
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-erc export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory (step_XXXXXXX or its parent)")
    parser.add_argument("--out", required=True, help="the transformers model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save (default: the run's)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    args = parser.parse_args(argv)
    check_output_dir(args.out, must_be_empty=True, force=args.force)
    lock = output_lock(args.out, "export")  # another export writing the same --out is refused in one line
    try:
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B)?\s*", args.max_shard_size, flags=re.IGNORECASE):
            raise ExportError(f"--max-shard-size '{args.max_shard_size}' must be a size such as 5GB, 500MB or 2GiB")
        summary = export(args.checkpoint, args.out, args.dtype, args.tokenizer, args.max_shard_size)
        print(f"export: {summary['architecture']} ({summary['parameters'] / 1e6:.2f}M parameters, {summary['dtype']}) "
              f"from step {summary['step']} -> {summary['out']}: {', '.join(summary['files'])}")
        print(json.dumps(summary))
    finally:
        lock.release()
    return 0
