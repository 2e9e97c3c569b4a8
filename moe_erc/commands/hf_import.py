"""``moe-erc import HF_DIR --out CHECKPOINT_DIR``: a transformers MoE checkpoint as a moe-erc checkpoint.

The inverse of ``moe-erc export`` (:mod:`moe_erc.commands.export`) for the classes it writes and Qwen3-MoE: the
transformers model is loaded from the local directory (never the hub), its architecture becomes a moe-erc YAML
config, its weights are renamed and fused back into megatron's layout (the table ``export`` reads the other way,
:mod:`moe_erc.model.hf_mapping`), and a dist_checkpointing checkpoint is written at step 0 without optimizer state,
so ``checkpoint.load=`` starts any method (ERC on, a fresh optimizer) from it in any TP / EP / PP layout. The tokenizer is copied beside it
(``tokenizer.json``, the config's ``tokenizer.path``).

==================  ===========================================================================================
transformers class  moe-erc config
==================  ===========================================================================================
Mixtral             softmax over all, top-K, renormalised = megatron's top-K then softmax over the K
Qwen2-MoE           ``norm_topk_prob=false`` -> ``moe_router_pre_softmax``; ``mlp_only_layers`` -> ``moe_layer_freq``
Qwen3-MoE           as Qwen2-MoE, plus per-head QK RMSNorm -> ``model.qk_layernorm``; ``head_dim`` -> ``kv_channels``
Qwen2-MoE's extras  ``shared_expert`` + ``shared_expert_gate`` -> ``moe_shared_expert_intermediate_size`` + gate;
                    ``qkv_bias`` -> ``model.add_qkv_bias``
OLMoE               QK RMSNorm over the whole projection -> ``qk_layernorm_over: projection``; softmax over all
GLM-4-MoE / 4.5     sigmoid + ``e_score_correction_bias`` -> aux-loss-free routing (expert bias), first k dense;
                    ``n_shared_experts`` -> an ungated shared expert; ``partial_rotary_factor`` -> ``rotary_percent``;
                    ``attention_bias`` -> ``add_qkv_bias``; ``use_qk_norm`` -> per-head QK norm;
                    ``routed_scaling_factor`` -> ``moe_router_topk_scaling_factor``
DeepSeek-V2 (Lite)  as DeepSeek-V3 with softmax over all experts, no renormalisation (``moe_router_pre_softmax``),
                    routed scaling, ``group_limited_greedy`` when top-K = ``topk_group``
gpt-oss             attention sinks -> ``softmax_type: learnable``; ``layer_types`` + ``sliding_window`` W ->
                    ``window_size [W-1, 0]`` + a 0/1 ``window_attn_skip_freq``; yarn (``truncate``) -> ``rope_type:
                    yarn``; biases on every linear and the router -> ``add_bias_linear`` (grouped-GEMM experts);
                    the clamped GLU -> ``quick_gelu`` + ``activation_func_clamp_value`` + ``glu_linear_offset: 1``
DeepSeek-V3         multi-latent attention (``q_lora_rank`` or none, ``kv_lora_rank``, head sizes; the RoPE rows of
(Moonlight, Kimi)   ``rope_interleave: false`` reordered), sigmoid + correction bias, group-limited routing, shared experts,
                    routed scaling, dense first layers (its MTP layer is not in transformers' model)
==================  ===========================================================================================

Refused in one line naming the feature: output-projection biases and sliding windows outside gpt-oss, rope
scaling outside gpt-oss's yarn, partial rotary outside GLM, group-limited routing other than DeepSeek's, and
anything that is not one of these classes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from moe_erc.errors import ConfigError, UserError
from moe_erc.model.hf_mapping import hf_to_megatron
from moe_erc.outputs import check_output_dir, output_lock, staged_directory

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")
# Sigmoid routing with expert bias, dense first layers, ungated shared experts, routed scaling.
SIGMOID = ("glm4_moe", "deepseek_v3")
MLA = ("deepseek_v2", "deepseek_v3")  # multi-latent attention, DeepSeek's names
DENSE = ("llama", "mistral", "qwen2", "qwen3")  # upcycled (--upcycle)
# Classes whose attention biases are on Q, K and V only (model.add_qkv_bias): Qwen2 always, Qwen2-MoE's qkv_bias,
# GLM-4-MoE's attention_bias.
QKV_BIAS = ("qwen2", "qwen2_moe", "glm4_moe")


class ImportError_(UserError):
    """The directory is not a transformers checkpoint moe-erc can express."""


# ----------------------------------------------------------------------------------------------- config


def read_hf_config(hf_dir: str):
    """The transformers config in ``hf_dir`` (local files only)."""
    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise ImportError_(f"{hf_dir} is not a Hugging Face checkpoint (no config.json); pass a directory written "
                           f"by save_pretrained")
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError("moe-erc import needs transformers: pip install -e '.[hf]'") from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notes on odd config values are not ours to repeat; refusals are
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ImportError_(f"{hf_dir}/config.json cannot be read by transformers: {first}") from None


def _get(hf, *names, default=None):
    for name in names:
        if getattr(hf, name, None) is not None:
            return getattr(hf, name)
    return default


def _rope_theta(hf) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    return float(params.get("rope_theta", _get(hf, "rope_theta", default=10000.0)))


def unsupported(hf, upcycle: bool = False) -> list[str]:
    """The features of ``hf`` moe-erc's config cannot express (empty: importable)."""
    kind = hf.model_type
    if kind in DENSE and not upcycle:
        return [f"{type(hf).__name__} is a dense model; pass --upcycle --num-experts N --topk K to make it an MoE"]
    if upcycle and kind not in DENSE:
        return [f"--upcycle takes a dense model ({', '.join(DENSE)}), not model_type '{kind}'"]
    if kind not in SUPPORTED + DENSE:
        return [f"model_type '{kind}' (supported: {', '.join(SUPPORTED)}; dense, with --upcycle: {', '.join(DENSE)})"]
    out = []
    params = getattr(hf, "rope_parameters", None) or {}
    if params.get("rope_type", "default") not in ("default", "yarn" if kind == "gpt_oss" else "default"):
        out.append(f"rope scaling '{params.get('rope_type')}'")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0 and kind != "glm4_moe":
        out.append(f"partial rotary (partial_rotary_factor={params.get('partial_rotary_factor')})")
    if kind != "gpt_oss" and _get(hf, "sliding_window") is not None and _get(hf, "use_sliding_window", default=True):
        out.append(f"sliding-window attention (sliding_window={hf.sliding_window})")
    if kind not in QKV_BIAS + ("gpt_oss",) and _get(hf, "attention_bias", default=False):
        out.append("attention_bias (biases on Q, K, V and the output projection)")
    if kind == "olmoe" and _get(hf, "clip_qkv") is not None:
        out.append(f"OLMoE's clip_qkv={hf.clip_qkv}")
    if _get(hf, "mlp_bias", default=False):
        out.append("MLP biases")
    if _get(hf, "hidden_act", default="silu") != "silu":
        out.append(f"hidden_act={hf.hidden_act} (SwiGLU experts use silu)")
    if kind in SIGMOID:
        groups, group_topk = _get(hf, "n_group", default=1), _get(hf, "topk_group", default=1)
        if groups != 1 and hf.num_experts_per_tok != 2 * group_topk:
            out.append(f"group-limited routing with num_experts_per_tok={hf.num_experts_per_tok} != 2 x topk_group="
                       f"{group_topk} (transformers scores a group by its top-2 experts, megatron by its top-K/groups)")
        if bool(_get(hf, "norm_topk_prob", default=True)) != (hf.num_experts_per_tok > 1):
            out.append("norm_topk_prob that differs from megatron's sigmoid top-K normalisation")
    if kind == "deepseek_v2" and _get(hf, "topk_method", default="greedy") == "group_limited_greedy" and \
            (_get(hf, "n_group", default=1) or 1) > 1 and hf.num_experts_per_tok != hf.topk_group:
        out.append(f"group_limited_greedy with num_experts_per_tok={hf.num_experts_per_tok} != topk_group="
                   f"{hf.topk_group} (transformers scores a group by its best expert, megatron by its top-K/groups)")
    if kind == "deepseek_v2" and _get(hf, "topk_method", default="greedy") not in ("greedy", "group_limited_greedy"):
        out.append(f"topk_method={hf.topk_method}")
    if kind == "gpt_oss":
        if float(hf.swiglu_alpha) != 1.702:
            out.append(f"swiglu_alpha={hf.swiglu_alpha} (megatron's quick_gelu is x * sigmoid(1.702 x))")
        types = set(hf.layer_types or [])
        if types - {"sliding_attention", "full_attention"}:
            out.append(f"layer_types {sorted(types)}")
    if kind in ("qwen2_moe", "qwen3_moe") and _get(hf, "decoder_sparse_step", default=1) != 1:
        out.append(f"decoder_sparse_step={hf.decoder_sparse_step} (use mlp_only_layers)")
    return out


def layer_pattern(hf) -> list[int]:
    """1 for each MoE layer, 0 for each dense one."""
    n = hf.num_hidden_layers
    if hf.model_type in DENSE:
        return [0] * n
    if hf.model_type in SIGMOID + MLA:
        return [0 if i < (hf.first_k_dense_replace or 0) else 1 for i in range(n)]
    if hf.model_type in ("qwen2_moe", "qwen3_moe"):
        dense = set(_get(hf, "mlp_only_layers", default=[]) or [])
        return [0 if i in dense else 1 for i in range(n)]
    return [1] * n


def config_from_hf(hf, tokenizer_path: str | None = None, upcycle: dict | None = None) -> dict:
    """The moe-erc YAML config (as a dict) that rebuilds ``hf``'s architecture; ``upcycle``
    (``num_experts``, ``topk``, ``expert_width``): a dense model's config with every MLP an MoE layer."""
    problems = unsupported(hf, upcycle is not None)
    if problems:
        raise ImportError_(f"cannot import {type(hf).__name__}: " + "; ".join(problems))
    kind, heads = hf.model_type, hf.num_attention_heads
    head_dim = _get(hf, "head_dim", default=hf.hidden_size // heads)
    experts = _get(hf, "num_local_experts", "num_experts", "n_routed_experts")
    expert_width = _get(hf, "moe_intermediate_size", default=hf.intermediate_size)
    pattern = layer_pattern(hf)
    if upcycle is not None:
        experts, expert_width = upcycle["num_experts"], upcycle.get("expert_width") or hf.intermediate_size
        if hf.intermediate_size % expert_width or experts % (hf.intermediate_size // expert_width):
            raise ImportError_(f"--expert-width {expert_width} must divide the dense width {hf.intermediate_size} "
                               f"and the number of experts must be a multiple of their ratio (the granularity)")
        pattern = [1] * hf.num_hidden_layers
    model = {
        "num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size, "num_attention_heads": heads,
        "num_query_groups": _get(hf, "num_key_value_heads", default=heads), "ffn_hidden_size": hf.intermediate_size,
        "seq_length": min(2048, hf.max_position_embeddings), "max_position_embeddings": hf.max_position_embeddings,
        "position_embedding_type": "rope", "rotary_base": int(_rope_theta(hf)), "normalization": "RMSNorm",
        "norm_epsilon": float(hf.rms_norm_eps), "swiglu": True, "add_bias_linear": False,
        "qk_layernorm": kind in ("qwen3_moe", "qwen3", "olmoe") or (kind == "glm4_moe" and bool(
            _get(hf, "use_qk_norm", default=False))),
        "qk_layernorm_over": "projection" if kind == "olmoe" else "head",
        "kv_channels": head_dim if head_dim * heads != hf.hidden_size and kind not in MLA else None,
        "add_qkv_bias": kind == "qwen2" or (kind == "qwen2_moe" and bool(_get(hf, "qkv_bias", default=False)))
                        or (kind == "glm4_moe" and bool(_get(hf, "attention_bias", default=False))),
        "rotary_percent": float((getattr(hf, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0))
                          if kind == "glm4_moe" else 1.0,
        "untie_embeddings_and_output_weights": not hf.tie_word_embeddings,
        "make_vocab_size_divisible_by": 128, "vocab_size": hf.vocab_size, "moe_layer_freq": pattern if 0 in pattern else 1,
    }
    if kind == "gpt_oss":
        model.update(_gpt_oss_model(hf))
    if kind in MLA:  # multi-latent attention; its KV latent (and Q latent) always normalised
        model.update(multi_latent_attention=True, q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
                     qk_head_dim=hf.qk_nope_head_dim, qk_pos_emb_head_dim=hf.qk_rope_head_dim,
                     v_head_dim=hf.v_head_dim, qk_layernorm=True, num_query_groups=None)
    topk = upcycle["topk"] if upcycle is not None else hf.num_experts_per_tok
    moe = {"num_experts": experts, "moe_router_topk": topk, "moe_ffn_hidden_size": expert_width, "router": "topk"}
    if kind in SIGMOID:
        moe.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                   moe_router_load_balancing_type="none")
        if float(_get(hf, "routed_scaling_factor", default=1.0)) != 1.0:
            moe["moe_router_topk_scaling_factor"] = float(hf.routed_scaling_factor)
        if _get(hf, "n_group", default=1) != 1:
            moe.update(moe_router_num_groups=hf.n_group, moe_router_group_topk=hf.topk_group)
    elif kind == "gpt_oss":  # top-K of the logits, softmax over the K (megatron's default); biased experts
        moe.update(moe_grouped_gemm=True, moe_aux_loss_coeff=float(hf.router_aux_loss_coef))
    elif kind in ("qwen2_moe", "qwen3_moe", "olmoe") and not _get(hf, "norm_topk_prob", default=False):
        moe["moe_router_pre_softmax"] = True
    elif kind == "deepseek_v2":  # softmax over all experts, top-K, not renormalised, scaled
        moe["moe_router_pre_softmax"] = True
        if float(_get(hf, "routed_scaling_factor", default=1.0)) != 1.0:
            moe["moe_router_topk_scaling_factor"] = float(hf.routed_scaling_factor)
        if hf.topk_method == "group_limited_greedy" and (hf.n_group or 1) > 1:
            moe.update(moe_router_num_groups=hf.n_group, moe_router_group_topk=hf.topk_group)
    shared = (_get(hf, "shared_expert_intermediate_size", default=0) if kind == "qwen2_moe"
              else (_get(hf, "n_shared_experts", default=0) or 0) * expert_width if kind in SIGMOID + MLA else 0)
    if shared and upcycle is None:
        moe.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=kind == "qwen2_moe")
    cfg = {"model": model, "moe": moe}
    if tokenizer_path:
        cfg["tokenizer"] = {"path": tokenizer_path}
    return cfg


def _gpt_oss_model(hf) -> dict:
    """gpt-oss's attention (sinks, windows on the sliding layers, yarn), biases and clamped GLU as model keys."""
    model = {"add_bias_linear": True, "add_qkv_bias": False, "softmax_type": "learnable", "activation": "quick_gelu",
             "activation_func_clamp_value": float(hf.swiglu_limit), "glu_linear_offset": 1.0}
    windowed = [int(kind == "sliding_attention") for kind in hf.layer_types]
    if any(windowed) and hf.sliding_window:  # transformers: key k visible to query q when q - W < k <= q
        model.update(window_size=[int(hf.sliding_window) - 1, 0], window_attn_skip_freq=windowed)
    params = getattr(hf, "rope_parameters", None) or {}
    if params.get("rope_type") == "yarn":
        factor = float(params["factor"])
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if params.get("attention_factor") is not None and factor > 1:  # megatron's ratio with a denominator of 1
            mscale, mscale_all_dim = (float(params["attention_factor"]) - 1) / (0.1 * math.log(factor)), 0.0
        elif not (mscale and mscale_all_dim):  # transformers' default attention factor 0.1 ln(factor) + 1
            mscale, mscale_all_dim = 1.0, 0.0
        model.update(rope_type="yarn", rotary_scaling_factor=factor,
                     original_max_position_embeddings=int(params["original_max_position_embeddings"]),
                     beta_fast=float(params.get("beta_fast", 32.0)), beta_slow=float(params.get("beta_slow", 1.0)),
                     mscale=float(mscale), mscale_all_dim=float(mscale_all_dim),
                     yarn_correction_range_round_to_int=bool(params.get("truncate", True)))
    return model


# ---------------------------------------------------------------------------------------------- import


def check_weight_files(hf_dir: str) -> None:
    """Every safetensors file the checkpoint names is present and whole (header readable, every tensor's bytes
    inside the file): a damaged download is one line naming the file, before transformers reads it."""
    path = Path(hf_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise ImportError_(f"{index} is damaged (not a safetensors index with a weight_map); re-download it") from None
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise ImportError_(f"{hf_dir} lacks {len(missing)} of the {len(shards)} weight shards its index names "
                               f"({', '.join(missing[:3])}); the download is incomplete")
        files = [path / name for name in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    for file in files:
        problem = _safetensors_problem(file)
        if problem:
            raise ImportError_(f"{file} is damaged ({problem}); re-download or re-save the checkpoint")


def _safetensors_problem(file: Path) -> str | None:
    """Why ``file`` is not a whole safetensors file (None if it is): 8-byte header length, JSON header,
    tensors' byte ranges within the data that follows."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes: no header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"truncated: the header alone needs {length + 8} bytes, the file has {size}"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            return "its header is not JSON"
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError):
        return "its header does not describe tensors"
    if 8 + length + end > size:
        return f"truncated: its tensors need {8 + length + end} bytes, the file has {size}"
    return None


def load_hf_model(hf_dir: str):
    """The transformers model in ``hf_dir`` (fp32, CPU, eval mode; local files only)."""
    from transformers import AutoModelForCausalLM

    check_weight_files(hf_dir)
    try:
        return AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001 (safetensors' own error class is not importable everywhere)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ImportError_(f"cannot load the weights in {hf_dir}: {first}") from None


def import_checkpoint(hf_dir: str, out: str, config_out: str | None = None, tokenizer: bool = True,
                      upcycle: dict | None = None) -> dict:
    """Write a moe-erc checkpoint of ``hf_dir`` under ``out`` (``out/step_0000000``); returns a summary.
    ``upcycle`` (``num_experts``, ``topk``, ``expert_width``): a dense model made an MoE (:func:`upcycled`)."""
    from moe_erc.config import Config
    from moe_erc.model import gpt
    from moe_erc.training import checkpoint, parallel

    hf = read_hf_config(hf_dir)
    raw = config_from_hf(hf, upcycle=upcycle)  # refuses before any weight is read
    out_dir = Path(out)
    has_tokenizer = tokenizer and (Path(hf_dir) / "tokenizer.json").is_file()
    if has_tokenizer:  # beside config.yaml, as in a run directory (export finds it there)
        raw["tokenizer"] = {"path": str(out_dir.resolve() / "tokenizer.json")}
    cfg = Config.model_validate(raw)
    if has_tokenizer:
        from moe_erc.data.tokenizer import load_tokenizer

        ids = load_tokenizer(Path(hf_dir) / "tokenizer.json").vocab_size
        if ids > hf.vocab_size:
            raise ImportError_(f"the tokenizer in {hf_dir} has {ids} ids but the model's vocab_size is "
                               f"{hf.vocab_size}: its embedding cannot hold them")
    hf_state = {k: v for k, v in load_hf_model(hf_dir).state_dict().items()}
    if hf.model_type == "gpt_oss" and not hf.attention_bias:  # moe-erc's add_bias_linear has them: zeros
        for i in range(hf.num_hidden_layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                weight = hf_state[f"model.layers.{i}.self_attn.{proj}.weight"]
                hf_state[f"model.layers.{i}.self_attn.{proj}.bias"] = weight.new_zeros(weight.shape[0])
    padded = gpt.padded_vocab_size(hf.vocab_size, cfg)
    source_cfg = cfg if upcycle is None else Config.model_validate(
        {**raw, "model": {**raw["model"], "moe_layer_freq": [0] * hf.num_hidden_layers}})
    weights = hf_to_megatron(source_cfg, hf_state, padded, hf.model_type,
                             rope_interleaved=hf.model_type == "deepseek_v2"  # complex rotation of pairs
                             or bool(_get(hf, "rope_interleave", default=False)))
    with staged_directory(out_dir) as staging:  # a failure half-way leaves nothing behind under --out
        with parallel.one_process(cfg, "cpu"):
            net = gpt.build_model(source_cfg, gpt.transformer_config(source_cfg), padded)
            _load_exactly(net, weights, hf.model_type)
            if upcycle is not None:
                net = upcycled(cfg, net, padded)
            checkpoint.save(staging, 0, [net], None, None, {"step": 0, "consumed_samples": 0}, with_optimizer=False,
                            keep_last=1, describe={"config": cfg.to_dict(), "padded_vocab_size": padded,
                                                   "imported_from": str(Path(hf_dir).resolve()),
                                                   **({"upcycled": upcycle} if upcycle else {})})
        if has_tokenizer:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(hf_dir) / name).is_file():
                    shutil.copy2(Path(hf_dir) / name, staging / name)
        import yaml

        (staging / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if config_out:
        Path(config_out).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return {"architecture": type(hf).__name__.replace("Config", ""), "layers": hf.num_hidden_layers,
            "experts": cfg.moe.num_experts, "vocab_size": hf.vocab_size, "padded_vocab_size": padded,
            "checkpoint": str(out_dir / checkpoint.step_dir_name(0)), "config": config_out or str(out_dir / "config.yaml")}


def _load_exactly(net, weights: dict, kind: str) -> None:
    state = {k: v for k, v in net.state_dict().items() if "_extra_state" not in k}
    missing, extra = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or extra:
        raise ImportError_(f"weight mapping mismatch for {kind}: missing {missing[:4]}, unexpected {extra[:4]}")
    net.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in weights.items()}}, strict=True)


def upcycled(cfg, dense_net, padded: int):
    """The MoE model of ``cfg`` initialised from ``dense_net`` by megatron-core's upcycling
    (``transformer/moe/upcycling_utils.py``, arXiv 2410.07524): every expert a copy of the dense MLP (granularity
    g = dense width / expert width > 1: each copy split into g finer experts), routers as megatron initialises
    them (N(0, init_method_std)) with each copy's g experts sharing one row, everything else copied. megatron scales
    fine-grained experts' fc1 and fc2 by g^(1/3) (an activation-scale heuristic); when K is a multiple of g we
    scale fc2 by g instead, which makes the MoE compute the dense model exactly (the K selected experts are whole
    copies, each slice's renormalised gate is 1/g of its copy's). With g = 1 nothing is scaled: exact too."""
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from moe_erc.model import gpt

    moe_net = gpt.build_model(cfg, gpt.transformer_config(cfg), padded)
    state = upcycle_state_dict([moe_net], [dense_net])["model"]
    g = (cfg.model.ffn_hidden_size or 4 * cfg.model.hidden_size) // cfg.moe.moe_ffn_hidden_size
    if g > 1 and cfg.moe.moe_router_topk % g == 0:
        s = g ** (1 / 3)
        for key in state:
            if ".mlp.experts." in key and key.endswith("linear_fc1.weight"):
                state[key] = state[key] / s
            elif ".mlp.experts." in key and key.endswith("linear_fc2.weight"):
                state[key] = state[key] * (g / s)
    moe_net.load_state_dict(state, strict=True)
    return moe_net


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-erc import", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="a transformers model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="the checkpoint directory to write (checkpoint.load= it)")
    parser.add_argument("--config-out", default=None, help="also write the moe-erc YAML config here")
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    parser.add_argument("--upcycle", action="store_true",
                        help="a dense model (Llama, Mistral, Qwen2, Qwen3): every MLP becomes an MoE layer of copies")
    parser.add_argument("--num-experts", type=int, default=None, help="with --upcycle: experts per layer")
    parser.add_argument("--topk", type=int, default=None, help="with --upcycle: experts per token")
    parser.add_argument("--expert-width", type=int, default=None,
                        help="with --upcycle: each expert's width (default: the dense width; smaller = finer experts)")
    args = parser.parse_args(argv)
    upcycle = None
    if args.upcycle:
        if not args.num_experts or not args.topk or args.topk > args.num_experts:
            raise UserError("--upcycle needs --num-experts N and --topk K with 1 <= K <= N")
        upcycle = {"num_experts": args.num_experts, "topk": args.topk, "expert_width": args.expert_width}
    elif args.num_experts or args.topk or args.expert_width:
        raise UserError("--num-experts / --topk / --expert-width apply to --upcycle only")
    check_output_dir(args.out, must_be_empty=True, force=args.force)
    lock = output_lock(args.out, "import")  # another import writing the same --out is refused in one line
    try:
        if args.config_out and Path(args.config_out).exists() and not args.force:
            raise UserError(f"--config-out {args.config_out} exists; choose another path or pass --force")
        summary = import_checkpoint(args.hf_dir, args.out, args.config_out, upcycle=upcycle)
        print(f"import: {summary['architecture']} ({summary['layers']} layers, {summary['experts']} experts, vocab "
              f"{summary['vocab_size']}) -> {summary['checkpoint']}; config {summary['config']}")
        print(json.dumps(summary))
    finally:
        lock.release()
    return 0
