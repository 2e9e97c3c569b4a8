"""Typed run configuration: YAML file + ``section.key=value`` overrides -> :class:`Config`.

One group per concern (``model``, ``moe``, ``erc``, ``parallel``, ``data``, ``tokenizer``, ``training``,
``optimizer``, ``logging``, ``checkpoint``). MoE option names follow Megatron-LM's flags so a Megatron
user can read a config without a dictionary. Everything is validated here, before any process group
starts; :mod:`moe_erc.model.gpt` translates the result into megatron-core's config objects.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from moe_erc.errors import ConfigError


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Group):
    """Transformer shape. MoE layers replace the dense MLP where ``moe_layer_freq`` says so."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None  # dense MLP width; default 4 * hidden_size
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None  # default seq_length
    position_embedding_type: Literal["rope", "learned_absolute", "none"] = "rope"
    rotary_base: int = 10000
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5  # RMSNorm / LayerNorm epsilon (megatron's layernorm_epsilon)
    swiglu: bool = True
    add_bias_linear: bool = False
    qk_layernorm: bool = False  # RMSNorm of Q and K (with multi-latent attention: of the Q and KV latents)
    qk_layernorm_over: Literal["head", "projection"] = "head"  # each head (Qwen3-MoE), or all heads together (OLMoE)
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    untie_embeddings_and_output_weights: bool = True
    # auto: transformer-engine's attention where TE imports, else PyTorch SDPA (flash / memory-efficient
    # kernels); sdpa: always SDPA; local: megatron's unfused DotProductAttention (materialises [s, s] scores).
    attention_backend: Literal["auto", "sdpa", "local"] = "auto"
    make_vocab_size_divisible_by: int = 128
    # Vocabulary for `moe-erc plan` (which reads no tokenizer). Training takes the tokenizer's size and
    # refuses a tokenizer larger than this when it is set.
    vocab_size: Optional[int] = None
    # 1 = every layer is MoE; k = every k-th layer; a list of 0/1 per layer (Megatron-LM semantics). Dense first
    # k layers (DeepSeek's first_k_dense_replace) are a list: [0, 1, 1, ...].
    moe_layer_freq: Union[int, list[int]] = 1
    # ---- architecture features of today's open MoE models (megatron-core's names; docs/architectures.md)
    kv_channels: Optional[int] = None  # head dimension; default hidden_size / num_attention_heads
    add_qkv_bias: bool = False  # biases on Q, K and V only (Qwen2-MoE, GLM-4.5); add_bias_linear: on every linear
    rotary_percent: float = 1.0  # fraction of each head's dimensions RoPE rotates (GLM-4.5: 0.5)
    # Multi-latent attention (DeepSeek-V2/V3): Q (unless q_lora_rank is null) and KV go through low-rank
    # projections; a head has qk_head_dim + qk_pos_emb_head_dim (its RoPE part) for Q and K, v_head_dim for V.
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None  # null: Q is not compressed (DeepSeek-V2-Lite, Moonlight)
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    # RoPE scaling: rope (none) or yarn with these settings (megatron's MLATransformerConfig fields with
    # multi-latent attention, GPTModel's yarn position embedding otherwise: gpt-oss).
    rope_type: Literal["rope", "yarn"] = "rope"
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None  # yarn: the pre-training context; default seq_length
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # yarn: round the correction range to whole dimensions (megatron's default; transformers' ``truncate``;
    # gpt-oss: false). Standard attention only: megatron's MLA always rounds.
    yarn_correction_range_round_to_int: bool = True
    # Sliding-window attention: [left, right] tokens each query sees (causal: [W, 0]). window_attn_skip_freq
    # (megatron's): every N-th layer keeps full attention (gpt-oss alternates: 2), or a 0/1 list (1 = windowed).
    window_size: Optional[list[int]] = None
    window_attn_skip_freq: Optional[Union[int, list[int]]] = None
    # Attention sinks: the vanilla softmax, off-by-one (an extra zero logit), learnable (a logit per head: gpt-oss).
    softmax_type: Literal["vanilla", "off-by-one", "learnable"] = "vanilla"
    # The MLP's activation: null = silu with swiglu (SwiGLU), gelu without; quick_gelu = x * sigmoid(1.702 x)
    # (gpt-oss's GLU, with activation_func_clamp_value 7 and glu_linear_offset 1).
    activation: Optional[Literal["silu", "gelu", "quick_gelu"]] = None
    activation_func_clamp_value: Optional[float] = None  # GLU: gate clamped above, linear part to +-value
    glu_linear_offset: float = 0.0  # GLU: act(gate) * (linear + offset)
    # Multi-token prediction (DeepSeek-V3): extra layers predicting token t+1+k, their loss scaled by this factor.
    mtp_num_layers: Optional[int] = None
    mtp_loss_scaling_factor: float = 0.1


class MoEConfig(_Group):
    """Routing and experts (names after Megatron-LM's ``--num-experts``, ``--moe-*`` flags)."""

    num_experts: int = 8
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # default ffn_hidden_size
    router: Literal["topk", "aoe", "kmeans"] = "topk"
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    moe_aux_loss_coeff: float = 0.01
    moe_z_loss_coeff: Optional[float] = None
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    # Softmax over all experts before the top-K (gates not renormalised) instead of over the K selected.
    # None = the method's default: true for router=aoe (its reference code), false otherwise (megatron's).
    moe_router_pre_softmax: Optional[bool] = None
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    moe_grouped_gemm: bool = False
    moe_expert_capacity_factor: Optional[float] = None
    moe_router_dtype: Optional[Literal["fp32", "fp64"]] = "fp32"
    # Shared experts (DeepSeek, Qwen2-MoE, GLM-4.5): one always-on MLP of this width (all shared experts together)
    # beside the routed ones; a sigmoid gate on its output (Qwen2-MoE); overlap with the dispatch (alltoall).
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    moe_shared_expert_overlap: bool = False
    # Group-limited routing (DeepSeek-V3): experts in num_groups groups, each token's top-K drawn from the
    # group_topk groups with the largest scores; the gates of the K experts scaled by topk_scaling_factor.
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    # Autonomy-of-Experts (router: aoe): rank r of each expert's factorised gate (default hidden/3) and the
    # expert width D' (default: chosen so total parameters match the router + expert MoE).
    aoe_rank: Optional[int] = None
    aoe_ffn_hidden_size: Optional[int] = None
    # Online K-Means (router: kmeans): EMA momentum of the per-expert centroids.
    kmeans_momentum: float = 0.99
    kmeans_temperature: float = 1.0  # gates: softmax over the selected cosine similarities / temperature
    # Re-seed a centroid from a sampled token after this many updates without a token (0: never).
    kmeans_reseed_steps: int = 100
    # Centroid update: `ema` (momentum above, once per step) or `running_mean` (each expert's centroid is the
    # running average of every token routed to it: an expert with few tokens moves little).
    kmeans_update: Literal["ema", "running_mean"] = "ema"
    # Seed / re-seed sample drawn from this many sequences of the step's first micro-batch (1: one sequence).
    kmeans_seed_sequences: int = 1
    # Centre hidden states (subtract their running mean) before the cosine with the centroids.
    kmeans_center: bool = False
    # Gates carry gradient into the hidden states (false: the gates are constants for backward).
    kmeans_gate_grad: bool = True


class ERCConfig(_Group):
    """Expert-router coupling loss (SPEC §1)."""

    enabled: bool = False
    alpha: float = 1.0
    coeff: float = 1.0
    grad_to_router: bool = True
    noise: bool = True


class ParallelConfig(_Group):
    """Parallel layout. DP is whatever is left: world / (TP * PP); EP divides DP*TP as in megatron-core."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # default: tensor_model_parallel_size
    sequence_parallel: Optional[bool] = None  # default: on when TP > 1 (megatron requires it with MoE)
    use_distributed_optimizer: bool = False
    world_size: Optional[int] = None  # the intended world size (checked at launch, used by `plan`)


class DataConfig(_Group):
    """Megatron indexed datasets: ``data_path`` is a prefix, a list, or a blend ``[w1, p1, w2, p2]``."""

    data_path: Union[str, list[Union[str, float]]] = "embedded"
    split: str = "969,30,1"
    num_workers: int = 0
    cache_dir: Optional[str] = None  # default: <dir of the first prefix>/index-cache
    embedded_vocab_size: int = 8192  # vocab of the BPE trained when data_path is 'embedded'


class TokenizerConfig(_Group):
    """``path`` = tokenizer.json / GPT-2 vocab dir / HF name; None = the tokenizer saved beside the data."""

    path: Optional[str] = None


class TrainingConfig(_Group):
    train_iters: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 16
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 10
    resume: str = "auto"  # auto | none | <checkpoint dir>
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # Refuse before allocating a run whose estimated memory per rank (moe-erc plan's) exceeds what the process can
    # have (free GPU memory; available RAM on CPU): false skips the check.
    memory_check: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Optional fused kernels (masked softmax, RoPE, bias-activation, ...) are used where what they need
    # imports (moe_erc/model/layers/kernels.py; the banner lists them); false = the unfused PyTorch paths everywhere.
    fused_kernels: bool = True
    # torch.compile each transformer layer (torchtitan-style, graph breaks allowed around MoE dispatch).
    # Off by default; a no-op where TORCH_COMPILE_DISABLE=1 (the CLI sets it on CPU-only machines).
    compile: bool = False
    exit_interval: Optional[int] = None  # stop (with a checkpoint) after this many steps of this run
    nan_policy: Literal["skip", "stop"] = "skip"  # non-finite loss/gradients: skip the update, or stop
    max_skipped_steps: int = 10  # with nan_policy=skip: stop (with a diagnostic) after more skipped steps


ParamClass = Literal["embedding", "output_layer", "router", "experts", "shared_experts", "mlp", "attention", "vectors"]
UpdateRule = Literal["spectral", "spectral_heads", "row_norm", "hybrid", "row_aware", "col_aware", "centered_row_norm",
                     "left_spectral", "row_unit", "centered_row_unit", "left_polar_nuclear", "adamw"]

PARAM_CLASSES: tuple[str, ...] = get_args(ParamClass)  # moe_erc.training.param_groups reads them off the model

# optimizer.symmetric_preset: a published assignment of rule, lr and weight decay per parameter class (docs/
# optimizers.md, "The authors' OLMoE stack"). ``paper`` is Lau & Su's OLMoE run from their code (timlautk/
# equivariant_optimizers, train_olmoe.py: RowNormM for the embedding, centred RowNormM for the LM head and the router,
# head-wise Muon for attention, per-expert Muon, AdamW for vectors); ``paper_adamw_control`` is their control (AdamW
# for embedding, LM head and router, the rest unchanged). Explicit param_rules / param_lr / param_weight_decay win.
_PAPER_MATRICES = {"attention": 5e-3, "experts": 5e-3, "shared_experts": 5e-3, "mlp": 5e-3}
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        # optimizer keys the preset sets unless the config sets them: Muon as their Muon (Keller Jordan's
        # max(1, out/in)^0.5 scale, no extra factor, Polar Express coefficients)
        "fields": {"name": "symmetric", "muon_scale_mode": "shape_scaling", "muon_extra_scale_factor": 1.0,
                   "muon_coefficient_type": "polar_express", "muon_momentum": 0.95, "muon_nesterov": True},
        "rules": {"embedding": "row_unit", "output_layer": "centered_row_unit", "router": "centered_row_unit",
                  "attention": "spectral_heads", "experts": "spectral", "shared_experts": "spectral",
                  "mlp": "spectral", "vectors": "adamw"},
        "lr": {"embedding": 0.5, "output_layer": 5e-3, "router": 7.5e-4, **_PAPER_MATRICES, "vectors": 1e-2},
        "weight_decay": {"embedding": 0.0, "output_layer": 0.0, "router": 0.0, "attention": 1e-3, "experts": 1e-3,
                         "shared_experts": 1e-3, "mlp": 1e-3, "vectors": 1e-3},
    },
}
PRESETS["paper_adamw_control"] = {
    "fields": PRESETS["paper"]["fields"],
    "rules": {**PRESETS["paper"]["rules"], "embedding": "adamw", "output_layer": "adamw", "router": "adamw"},
    "lr": {**PRESETS["paper"]["lr"], "embedding": 5e-4, "output_layer": 5e-4, "router": 7.5e-4},
    "weight_decay": PRESETS["paper"]["weight_decay"],
}
# A router whose scores change under a shared shift (sigmoid) has no shift symmetry to keep: uncentred rule.
_UNCENTRED = {"centered_row_unit": "row_unit", "centered_row_norm": "row_norm", "left_spectral": "row_norm",
              "left_polar_nuclear": "row_unit"}


class OptimizerConfig(_Group):
    """The update rule, then warmup and decay to ``min_lr`` (Megatron-LM names). docs/optimizers.md.

    ``adamw``: megatron-core's AdamW. ``muon``: megatron-core's Muon (emerging-optimizers) on every matrix,
    AdamW on embeddings, LM head and vectors. ``symmetric``: one symmetry-compatible rule per parameter
    class (moe_erc/training/symmetric.py), AdamW on vectors. The ``muon_*`` keys apply to both Muon variants.
    """

    name: Literal["adamw", "muon", "symmetric"] = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 20
    lr_decay_style: Literal["cosine", "linear", "constant", "WSD", "inverse-square-root"] = "cosine"
    lr_decay_iters: Optional[int] = None  # default: training.train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_num_ns_steps: int = 5  # Newton-Schulz iterations per matrix and step
    # emerging-optimizers' Newton-Schulz coefficient sets ("custom" needs coefficients moe-erc does not pass)
    muon_coefficient_type: Literal["simple", "quintic", "polar_express", "cans", "aol", "deepseekv4"] = "quintic"
    # megatron's scale modes; "spectral" (sqrt(max(out, in))) gives unit-RMS updates, which the extra
    # factor 0.2 brings to AdamW's typical update RMS, so AdamW's lr carries over (Moonshot's recipe).
    muon_scale_mode: Literal["spectral", "unit_rms_norm", "shape_scaling"] = "spectral"
    muon_extra_scale_factor: float = 0.2
    # duplicated: gather a TP-sharded matrix, orthogonalize it whole (the single-process update);
    # blockwise: orthogonalize each shard (no communication, a different update per layout).
    muon_tp_mode: Literal["duplicated", "blockwise", "distributed"] = "duplicated"
    # Newton-Schulz matmuls: medium = bf16 (fast on GPU), highest = fp32; auto = medium on GPU, highest on
    # CPU (where bf16 matmuls of small matrices are ~10x slower than fp32).
    muon_fp32_matmul_prec: Literal["auto", "highest", "high", "medium"] = "auto"
    symmetric_embedding_rule: Literal["row_norm", "hybrid", "spectral"] = "row_norm"  # embeddings, LM head
    symmetric_router_rule: Literal["centered_row_norm", "left_spectral"] = "centered_row_norm"
    symmetric_mlp_rule: Literal["aware", "spectral"] = "aware"  # aware: fc1 row-aware, fc2 column-aware
    # Per parameter class (PARAM_CLASSES): update rule, peak lr, weight decay; a preset (PRESETS) fills them
    # (paper: Lau & Su's OLMoE assignment; paper_adamw_control: their AdamW-for-embedding/head/router control).
    symmetric_preset: Literal["none", "paper", "paper_adamw_control"] = "none"
    param_rules: dict[ParamClass, UpdateRule] = {}
    param_lr: dict[ParamClass, float] = {}
    param_weight_decay: dict[ParamClass, float] = {}

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """The preset's ``fields`` filled in where the raw section sets none."""
        preset = PRESETS.get(data.get("symmetric_preset", "none")) if isinstance(data, dict) else None
        return data if preset is None else {**preset["fields"], **data}


class LoggingConfig(_Group):
    run_dir: str = "runs/tiny"
    log_interval: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "moe-erc"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    progress: bool = True  # the progress line on the console
    routing_trace: bool = False  # write routing_trace.jsonl: top-K expert ids of sampled tokens
    trace_interval: int = 100  # steps between traced steps
    trace_tokens: int = 64  # tokens traced per layer and traced step
    coupling_tokens: int = 256  # tokens per validation micro-batch used for the coupling score
    max_scalars: int = 256  # cap on scalar keys per record in TensorBoard/wandb (per-layer ones dropped first)


class CheckpointConfig(_Group):
    save_interval: int = 100
    dir: Optional[str] = None  # default: <run_dir>/checkpoints
    keep_last: int = 2
    load: Optional[str] = None  # initialise weights from this checkpoint dir (no optimizer, step 0)
    save_optimizer: bool = True
    # A save that fails for want of space (the previous checkpoint stays intact and latest): stop the run (exit 2),
    # or continue training without that checkpoint, saying so at every save interval (the final save still stops).
    on_save_error: Literal["stop", "continue"] = "stop"


class Config(_Group):
    model: ModelConfig = ModelConfig()
    moe: MoEConfig = MoEConfig()
    erc: ERCConfig = ERCConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    training: TrainingConfig = TrainingConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _check_values(self) -> "Config":
        for message in _value_problems(self):
            raise ValueError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _value_problems(cfg: Config):
    """Single-field and cross-field checks that do not depend on the world size."""
    m, moe, p, t, o = cfg.model, cfg.moe, cfg.parallel, cfg.training, cfg.optimizer
    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads, "model.seq_length": m.seq_length,
        "moe.num_experts": moe.num_experts, "moe.moe_router_topk": moe.moe_router_topk,
        "parallel.tensor_model_parallel_size": p.tensor_model_parallel_size,
        "parallel.pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "parallel.expert_model_parallel_size": p.expert_model_parallel_size,
        "training.train_iters": t.train_iters, "training.micro_batch_size": t.micro_batch_size,
        "training.global_batch_size": t.global_batch_size, "training.eval_interval": t.eval_interval,
        "logging.log_interval": cfg.logging.log_interval, "checkpoint.save_interval": cfg.checkpoint.save_interval,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
    }
    for key, value in positive.items():
        if value < 1:
            yield f"{key}={value} must be >= 1"
    if p.world_size is not None and p.world_size < 1:
        yield f"parallel.world_size={p.world_size} must be >= 1"
    if t.eval_iters < 0:
        yield f"training.eval_iters={t.eval_iters} must be >= 0"
    if moe.moe_router_topk > moe.num_experts:
        yield f"moe.moe_router_topk={moe.moe_router_topk} exceeds moe.num_experts={moe.num_experts}"
    if m.hidden_size % m.num_attention_heads and m.kv_channels is None and not m.multi_latent_attention:
        yield (f"model.hidden_size={m.hidden_size} is not divisible by "
               f"model.num_attention_heads={m.num_attention_heads} (or set the head size, model.kv_channels)")
    if m.num_query_groups is not None and m.num_attention_heads % m.num_query_groups:
        yield (f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
               f"model.num_query_groups={m.num_query_groups}")
    if cfg.erc.alpha < 0:
        yield f"erc.alpha={cfg.erc.alpha} must be >= 0 (smaller = stronger specialisation; 1.0 is the paper's 3B value)"
    if cfg.erc.coeff < 0:
        yield f"erc.coeff={cfg.erc.coeff} must be >= 0"
    if cfg.erc.enabled and moe.router != "topk":
        yield (f"erc.enabled=true needs a router matrix, but moe.router={moe.router} has none; "
               f"use moe.router=topk or set erc.enabled=false")
    if moe.moe_router_topk == 1 and moe.moe_router_score_function == "softmax" and not router_pre_softmax(cfg):
        yield ("moe.moe_router_topk=1 with softmax scores needs moe.moe_router_pre_softmax=true "
               "(a softmax over one selected expert has zero gradient)")
    if moe.router == "kmeans" and moe.moe_router_load_balancing_type != "none":
        yield ("moe.router=kmeans has no parameters a balancing loss could train; set "
               "moe.moe_router_load_balancing_type=none (and moe.moe_router_enable_expert_bias=true to balance)")
    if moe.kmeans_temperature <= 0:
        yield f"moe.kmeans_temperature={moe.kmeans_temperature} must be > 0"
    if moe.moe_router_enable_expert_bias and moe.moe_router_score_function != "sigmoid" and moe.router == "topk":
        yield ("moe.moe_router_enable_expert_bias=true (aux-loss-free balancing) needs "
               "moe.moe_router_score_function=sigmoid")
    if moe.kmeans_reseed_steps < 0:
        yield f"moe.kmeans_reseed_steps={moe.kmeans_reseed_steps} must be >= 0 (0 = never re-seed)"
    if not 0.0 <= moe.kmeans_momentum < 1.0:
        yield f"moe.kmeans_momentum={moe.kmeans_momentum} must be in [0, 1)"
    if moe.kmeans_seed_sequences < 1:
        yield f"moe.kmeans_seed_sequences={moe.kmeans_seed_sequences} must be >= 1"
    if moe.aoe_rank is not None and not 0 < moe.aoe_rank <= m.hidden_size:
        yield f"moe.aoe_rank={moe.aoe_rank} must be in 1..model.hidden_size={m.hidden_size}"
    if not 0.0 <= o.min_lr <= o.lr:
        yield f"optimizer.min_lr={o.min_lr} must be between 0 and optimizer.lr={o.lr}"
    if o.lr_warmup_iters < 0:
        yield f"optimizer.lr_warmup_iters={o.lr_warmup_iters} must be >= 0"
    if o.clip_grad < 0:
        yield f"optimizer.clip_grad={o.clip_grad} must be >= 0 (0 disables clipping)"
    if o.lr < 0:
        yield f"optimizer.lr={o.lr} must be >= 0"
    if o.weight_decay < 0:
        yield f"optimizer.weight_decay={o.weight_decay} must be >= 0"
    for key in ("adam_beta1", "adam_beta2", "muon_momentum"):
        if not 0.0 <= getattr(o, key) < 1.0:
            yield f"optimizer.{key}={getattr(o, key)} must be in [0, 1)"
    if o.adam_eps <= 0:
        yield f"optimizer.adam_eps={o.adam_eps} must be > 0"
    if o.muon_num_ns_steps < 1:
        yield f"optimizer.muon_num_ns_steps={o.muon_num_ns_steps} must be >= 1 (Newton-Schulz iterations; 5 is usual)"
    if o.muon_extra_scale_factor <= 0:
        yield f"optimizer.muon_extra_scale_factor={o.muon_extra_scale_factor} must be > 0"
    yield from _param_class_problems(cfg)
    if o.lr_decay_iters is not None and o.lr_decay_iters < 1:
        yield f"optimizer.lr_decay_iters={o.lr_decay_iters} must be >= 1 (or unset: training.train_iters)"
    head_dim = m.kv_channels or (m.hidden_size // m.num_attention_heads if m.hidden_size % m.num_attention_heads == 0
                                 else 0)
    if m.position_embedding_type == "rope" and not m.multi_latent_attention and int(head_dim * m.rotary_percent) % 2:
        yield (f"model.position_embedding_type=rope needs an even number of rotated dimensions per head, but the "
               f"head size {head_dim} (model.kv_channels, or hidden_size / num_attention_heads) x "
               f"model.rotary_percent={m.rotary_percent} is {head_dim * m.rotary_percent:g}; change either")
    if m.norm_epsilon <= 0:
        yield f"model.norm_epsilon={m.norm_epsilon} must be > 0"
    if not 0.0 <= m.hidden_dropout < 1.0 or not 0.0 <= m.attention_dropout < 1.0:
        yield "model.hidden_dropout and model.attention_dropout must be in [0, 1)"
    if isinstance(m.moe_layer_freq, list):
        if len(m.moe_layer_freq) != m.num_layers or set(m.moe_layer_freq) - {0, 1}:
            yield (f"model.moe_layer_freq as a list needs one 0/1 per layer "
                   f"({m.num_layers} entries), got {m.moe_layer_freq}")
    elif m.moe_layer_freq < 1:
        yield f"model.moe_layer_freq={m.moe_layer_freq} must be >= 1"
    if t.resume not in ("auto", "none") and not t.resume:
        yield "training.resume must be 'auto', 'none' or a checkpoint directory"
    sizes = [int(s) for s in cfg.data.split.replace("/", ",").split(",") if s.strip().isdigit()]
    if len(sizes) != len(cfg.data.split.replace("/", ",").split(",")) or not sizes or sum(sizes) <= 0:
        yield f"data.split='{cfg.data.split}' must be comma-separated non-negative weights, e.g. '969,30,1'"
    yield from _architecture_problems(cfg)


def _architecture_problems(cfg: Config):
    """The architecture features (attention variants, shared experts, group routing, MTP): values and the
    combinations megatron-core or a routing method cannot build, one line each."""
    m, moe = cfg.model, cfg.moe
    for key in ("kv_channels", "q_lora_rank", "mtp_num_layers", "original_max_position_embeddings"):
        if getattr(m, key) is not None and getattr(m, key) < 1:
            yield f"model.{key}={getattr(m, key)} must be >= 1 (or null)"
    if not 0.0 < m.rotary_percent <= 1.0:
        yield f"model.rotary_percent={m.rotary_percent} must be in (0, 1] (the fraction of a head RoPE rotates)"
    if m.multi_latent_attention:
        for key in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if getattr(m, key) < 1:
                yield f"model.{key}={getattr(m, key)} must be >= 1"
        if m.position_embedding_type != "rope" or m.qk_pos_emb_head_dim % 2:
            yield ("model.multi_latent_attention=true needs model.position_embedding_type=rope and an even "
                   f"model.qk_pos_emb_head_dim (got {m.position_embedding_type}, {m.qk_pos_emb_head_dim})")
        if m.add_qkv_bias or m.kv_channels is not None or m.num_query_groups not in (None, m.num_attention_heads):
            yield ("model.multi_latent_attention=true has its own projections and head sizes: model.add_qkv_bias, "
                   "model.kv_channels and model.num_query_groups do not apply (remove them)")
        if not m.yarn_correction_range_round_to_int:
            yield ("model.yarn_correction_range_round_to_int=false applies to standard attention: megatron's "
                   "multi-latent attention always rounds the yarn correction range")
    elif m.rope_type != "rope" and m.position_embedding_type != "rope":
        yield f"model.rope_type={m.rope_type} scales RoPE: it needs model.position_embedding_type=rope"
    if m.rotary_scaling_factor <= 0:
        yield f"model.rotary_scaling_factor={m.rotary_scaling_factor} must be > 0"
    if m.window_size is not None and (len(m.window_size) != 2 or m.window_size[0] < 0 or m.window_size[1] < -1):
        yield f"model.window_size={m.window_size} must be [left, right] tokens, e.g. [127, 0] (causal)"
    skip = m.window_attn_skip_freq
    if skip is not None and m.window_size is None:
        yield "model.window_attn_skip_freq needs model.window_size (the window the other layers use)"
    if isinstance(skip, list) and (len(skip) != m.num_layers or set(skip) - {0, 1}):
        yield f"model.window_attn_skip_freq as a list needs one 0/1 per layer ({m.num_layers} entries), got {skip}"
    elif isinstance(skip, int) and skip < 1:
        yield f"model.window_attn_skip_freq={skip} must be >= 1 (every N-th layer has full attention)"
    if m.qk_layernorm_over == "projection" and (not m.qk_layernorm or m.multi_latent_attention
                                                or m.normalization != "RMSNorm"):
        yield ("model.qk_layernorm_over=projection (OLMoE's Q/K RMSNorm over all heads) needs model.qk_layernorm=true, "
               "model.normalization=RMSNorm and standard attention (not multi-latent)")
    if m.multi_latent_attention and m.attention_backend == "local":
        yield ("model.attention_backend=local cannot run multi-latent attention (megatron's unfused attention takes "
               "one head size for Q, K and V); use auto or sdpa")
    if m.multi_latent_attention and (m.window_size is not None or m.softmax_type != "vanilla"):
        yield "model.multi_latent_attention=true with sliding windows or attention sinks is not built (no model has both)"
    if m.attention_backend == "sdpa" and (m.window_size is not None or m.softmax_type != "vanilla"):
        yield ("model.attention_backend=sdpa cannot express sliding windows or attention sinks here; use auto "
               "(megatron's attention for those layers' models) or local")
    glu_options = m.activation_func_clamp_value is not None or m.glu_linear_offset != 0.0
    if glu_options and not m.swiglu:
        yield "model.activation_func_clamp_value / glu_linear_offset shape a gated MLP: they need model.swiglu=true"
    if m.activation_func_clamp_value is not None and m.activation_func_clamp_value <= 0:
        yield f"model.activation_func_clamp_value={m.activation_func_clamp_value} must be > 0"
    if m.mtp_loss_scaling_factor < 0:
        yield f"model.mtp_loss_scaling_factor={m.mtp_loss_scaling_factor} must be >= 0"
    shared = moe.moe_shared_expert_intermediate_size
    if shared is not None and shared < 1:
        yield f"moe.moe_shared_expert_intermediate_size={shared} must be >= 1 (or null: no shared expert)"
    if shared is None and (moe.moe_shared_expert_gate or moe.moe_shared_expert_overlap):
        yield "moe.moe_shared_expert_gate / moe_shared_expert_overlap need moe.moe_shared_expert_intermediate_size"
    if moe.moe_shared_expert_overlap and moe.moe_token_dispatcher_type != "alltoall":
        yield "moe.moe_shared_expert_overlap=true needs moe.moe_token_dispatcher_type=alltoall"
    groups, group_topk = moe.moe_router_num_groups, moe.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        yield "group-limited routing needs both moe.moe_router_num_groups and moe.moe_router_group_topk"
    elif groups is not None:
        if groups < 1 or moe.num_experts % groups:
            yield f"moe.moe_router_num_groups={groups} must divide moe.num_experts={moe.num_experts}"
        elif not 1 <= group_topk <= groups or moe.moe_router_topk % group_topk:
            yield (f"moe.moe_router_group_topk={group_topk} must be in 1..moe_router_num_groups={groups} and divide "
                   f"moe.moe_router_topk={moe.moe_router_topk}")
        elif moe.moe_router_topk // group_topk > moe.num_experts // groups:
            yield (f"moe.moe_router_topk={moe.moe_router_topk} over {group_topk} groups takes more experts per group "
                   f"than a group has ({moe.num_experts // groups})")
    scaling = moe.moe_router_topk_scaling_factor
    if scaling is not None and scaling <= 0:
        yield f"moe.moe_router_topk_scaling_factor={scaling} must be > 0"
    if moe.router != "topk" and (groups is not None or scaling is not None):
        yield (f"moe.router={moe.router} chooses its experts itself: group-limited routing and "
               f"moe.moe_router_topk_scaling_factor apply to moe.router=topk")
    if moe.router == "aoe" and (m.activation not in (None, "silu") or glu_options or not m.swiglu):
        yield "moe.router=aoe's experts are SwiGLU: model.activation, clamp and offset options do not apply"


def param_class_settings(cfg: Config) -> tuple[dict[str, str], dict[str, float], dict[str, float]]:
    """``(rules, lr, weight_decay)`` per parameter class: the preset's entries updated by the config's explicit ones."""
    o = cfg.optimizer
    preset = PRESETS.get(o.symmetric_preset, {})
    rules = {**preset.get("rules", {}), **o.param_rules}
    if "router" in rules and cfg.moe.moe_router_score_function == "sigmoid" and "router" not in o.param_rules:
        rules["router"] = _UNCENTRED.get(rules["router"], rules["router"])
    return rules, {**preset.get("lr", {}), **o.param_lr}, {**preset.get("weight_decay", {}), **o.param_weight_decay}


def _param_class_problems(cfg: Config):
    """One line per inconsistent per-class setting."""
    o = cfg.optimizer
    rules, lrs, wds = param_class_settings(cfg)
    if o.symmetric_preset != "none" and o.name != "symmetric":
        yield (f"optimizer.symmetric_preset={o.symmetric_preset} is an assignment of the symmetric stack; set "
               f"optimizer.name=symmetric (or leave it unset)")
    if o.name == "adamw" and any(rule != "adamw" for rule in rules.values()):
        yield "optimizer.param_rules needs optimizer.name=muon or symmetric (AdamW has one rule for every class)"
    if rules.get("vectors", "adamw") != "adamw":
        yield f"optimizer.param_rules: vectors (1-D parameters) can only use adamw, not {rules['vectors']}"
    for cls, lr in lrs.items():
        if lr < 0:
            yield f"optimizer.param_lr.{cls}={lr} must be >= 0"
    for cls, wd in wds.items():
        if wd < 0:
            yield f"optimizer.param_weight_decay.{cls}={wd} must be >= 0"
        elif wd > 0 and o.weight_decay == 0:
            yield (f"optimizer.param_weight_decay.{cls}={wd} needs optimizer.weight_decay > 0 (per-class decay is "
                   f"megatron's multiple of it)")


def layer_kinds(cfg: Config) -> list[bool]:
    """``True`` for each MoE layer (megatron's ``moe_layer_freq``: an int k = every k-th layer, or a 0/1 list)."""
    freq = cfg.model.moe_layer_freq
    if isinstance(freq, list):
        return [bool(f) for f in freq]
    return [i % freq == 0 for i in range(cfg.model.num_layers)]


def layer_rows(cfg: Config) -> int:
    """Rows of the per-layer tables (metrics, instruments): the decoder's layers, then the multi-token-prediction
    layers (megatron numbers those apart; moe_erc.model.layers.erc_layer.layer_slot)."""
    return cfg.model.num_layers + (cfg.model.mtp_num_layers or 0)


def router_pre_softmax(cfg: "Config") -> bool:
    """``moe.moe_router_pre_softmax`` with the method's default filled in (AoE: true, as its reference)."""
    value = cfg.moe.moe_router_pre_softmax
    return cfg.moe.router == "aoe" if value is None else value


# --------------------------------------------------------------------------------------------------
# Layout checks (need the world size, which only the launcher knows)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)


def expert_data_parallel_size(cfg: Config, world_size: int) -> int:
    """Replicas of each expert: world / (PP x EP x expert-TP)."""
    p = cfg.parallel
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    return world_size // (p.pipeline_model_parallel_size * p.expert_model_parallel_size * etp)


def check_layout(cfg: Config, world_size: int, device: str = "cuda") -> None:
    """Raise :class:`ConfigError` if the parallel layout cannot run on ``world_size`` processes."""
    p, m, moe, t = cfg.parallel, cfg.model, cfg.moe, cfg.training
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    if p.world_size is not None and p.world_size != world_size:
        raise ConfigError(
            f"parallel.world_size={p.world_size} but {world_size} processes were launched; "
            f"launch {p.world_size} or override parallel.world_size={world_size}")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size*pipeline_model_parallel_size"
            f"={tp}*{pp}; change parallel.* or the number of processes")
    dp = world_size // (tp * pp)
    if moe.num_experts % ep:
        raise ConfigError(
            f"moe.num_experts={moe.num_experts} is not divisible by parallel.expert_model_parallel_size={ep}; "
            f"pick an EP size that divides the number of experts")
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}")
    if (world_size // pp) % (etp * ep):
        raise ConfigError(
            f"expert_model_parallel_size*expert_tensor_parallel_size={ep}*{etp} must divide "
            f"world_size/pipeline_model_parallel_size={world_size // pp}")
    groups = m.num_query_groups or m.num_attention_heads
    if groups % tp:
        raise ConfigError(f"model.num_query_groups={groups} is not divisible by tensor_model_parallel_size={tp}")
    if m.num_layers % pp:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_model_parallel_size={pp}")
    if tp > 1 and p.sequence_parallel is False:
        raise ConfigError(
            "parallel.sequence_parallel=false with tensor_model_parallel_size>1: megatron-core's MoE layer "
            "requires sequence parallelism with TP; remove the override")
    if (tp > 1 or p.sequence_parallel) and m.seq_length % tp:
        raise ConfigError(f"model.seq_length={m.seq_length} must be divisible by tensor_model_parallel_size={tp}")
    if device == "cpu" and t.precision == "fp16":
        raise ConfigError("training.precision=fp16 needs a CUDA GPU (megatron-core's fp16 loss scaling is "
                          "CUDA-only); use bf16 or fp32 on CPU")
    opt = cfg.optimizer.name
    if opt != "adamw" and p.use_distributed_optimizer:
        raise ConfigError(
            f"optimizer.name={opt} keeps its state replicated over data-parallel ranks (megatron's layer-wise "
            f"distributed Muon is not wired in yet); set parallel.use_distributed_optimizer=false")
    if opt != "adamw" and t.precision == "fp16":
        raise ConfigError(f"optimizer.name={opt} does not support fp16 (megatron's Muon); use bf16 or fp32")
    if device == "cpu" and p.use_distributed_optimizer:
        raise ConfigError(
            "parallel.use_distributed_optimizer=true needs CUDA: megatron-core's distributed optimizer only "
            "accepts torch.cuda parameter types; set it to false on CPU")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} must be a multiple of "
            f"micro_batch_size*data_parallel_size={t.micro_batch_size}*{dp}")


# --------------------------------------------------------------------------------------------------
# Loading


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a YAML file names one key twice (plain YAML keeps the last silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping, naming it and both lines."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(f"duplicate key '{key}' at line {key_node.start_mark.line + 1} (first at "
                                        f"line {seen[key] + 1}); YAML would keep only the last: remove one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML file (or the defaults), apply ``section.key=value`` overrides, validate.

    Values in overrides are parsed as YAML (``50`` -> int, ``true`` -> bool, ``[a, b]`` -> list).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except DuplicateKeyError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, moe:, ...)")
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    _reject_unknown_keys(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value, e.g. training.train_iters=50")
    key, text = item.split("=", 1)
    key = key.strip().lstrip("-")
    if key.count(".") != 1:
        raise ConfigError(f"override key '{key}' must be section.key, e.g. moe.num_experts")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    section, name = key.split(".")
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"'{section}' must be a mapping in the config file, not {type(target).__name__}")
    target[name] = value


def _suggest(name: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(sorted(options))}"


def _reject_unknown_keys(raw: dict) -> None:
    sections = Config.model_fields
    for section, body in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}'{_suggest(str(section), sections)}")
        if body is None:
            raw[section] = {}
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of keys, got {body!r}")
        fields = sections[section].annotation.model_fields
        for key in body:
            if key not in fields:
                raise ConfigError(f"unknown config key '{section}.{key}'{_suggest(str(key), fields, section + '.')}")


def _format_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" or not loc:
        return msg
    return f"{loc}={err.get('input')!r}: {msg}"
