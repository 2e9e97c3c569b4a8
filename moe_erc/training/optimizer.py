"""Optimizer and LR schedule: megatron-core's AdamW, Muon or the symmetric stack (chained dense/expert
optimizers, AdamW for vectors) + warmup/decay."""

from __future__ import annotations

import torch

from moe_erc.compat import import_megatron
from moe_erc.config import Config, param_class_settings

import_megatron()
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402


def wrap_ddp(cfg: Config, tf_config: TransformerConfig, model: torch.nn.Module) -> DistributedDataParallel:
    """megatron DDP: contiguous grad buffers, fp32 grad reduction, DP/expert-DP groups from parallel state."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return DistributedDataParallel(config=tf_config, ddp_config=ddp_config, module=model)


def megatron_optimizer_name(cfg: Config) -> str:
    """``adam``, or the name our Muon variants are registered under in megatron's emerging optimizers."""
    if cfg.optimizer.name == "adamw":
        return "adam"
    from moe_erc.errors import ConfigError
    from moe_erc.training import symmetric

    if not symmetric.HAVE_EMERGING_OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name={cfg.optimizer.name} needs megatron's Muon backend, the emerging-optimizers package: "
            f"pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0 absl-py "
            f"(scripts/setup_env.sh installs it)")
    return symmetric.REGISTRY_NAME[cfg.optimizer.name]


def newton_schulz_precision(cfg: Config) -> str:
    """``optimizer.muon_fp32_matmul_prec`` with ``auto`` resolved: bf16 (medium) on GPU, fp32 on CPU."""
    from moe_erc.compat import runtime_device

    prec = cfg.optimizer.muon_fp32_matmul_prec
    return prec if prec != "auto" else ("medium" if runtime_device() == "cuda" else "highest")


def tag_parameters(cfg: Config, model_chunks: list) -> dict[str, str]:
    """Set each parameter's Muon / symmetric update rule on it; returns ``{name: rule}``."""
    o = cfg.optimizer
    from moe_erc.training import symmetric

    return symmetric.tag_parameters(
        model_chunks, o.name, gated=cfg.model.swiglu, head_dim=cfg.model.hidden_size // cfg.model.num_attention_heads,
        embedding_rule=o.symmetric_embedding_rule, router_rule=o.symmetric_router_rule, mlp_rule=o.symmetric_mlp_rule,
        router_shift_invariant=cfg.moe.moe_router_score_function != "sigmoid",
        class_rules=param_class_settings(cfg)[0])


def describe(cfg: Config, model_chunks: list, adam: str) -> str:
    """The banner's optimizer field: ``torch AdamW``, or ``symmetric (spectral 9, row_norm 2, ...; vectors
    torch AdamW)`` counting parameter tensors per update rule."""
    from moe_erc.training import param_groups, symmetric

    per_class = param_groups.summarize(cfg)
    if cfg.optimizer.name == "adamw":
        return f"{adam} ({per_class})" if per_class else adam
    rules = {n: getattr(p, "symmetry_rule", "adamw") for c in model_chunks for n, p in c.named_parameters()
             if p.requires_grad}
    preset = f"preset {cfg.optimizer.symmetric_preset}: " if cfg.optimizer.symmetric_preset != "none" else ""
    return (f"{cfg.optimizer.name} ({preset}{symmetric.summarize(rules)}; adamw = {adam}"
            + (f"; {per_class})" if per_class else ")"))


def build_optimizer(cfg: Config, tf_config: TransformerConfig, model_chunks: list):
    """megatron optimizer over the DDP-wrapped chunks (torch AdamW when apex/TE are absent)."""
    from moe_erc.training import param_groups

    o = cfg.optimizer
    name = megatron_optimizer_name(cfg)
    param_groups.tag_classes(model_chunks)
    muon = {}
    if name != "adam":
        tag_parameters(cfg, model_chunks)
        muon = dict(muon_momentum=o.muon_momentum, muon_nesterov=o.muon_nesterov,
                    muon_num_ns_steps=o.muon_num_ns_steps, muon_coefficient_type=o.muon_coefficient_type,
                    muon_scale_mode=o.muon_scale_mode, muon_extra_scale_factor=o.muon_extra_scale_factor,
                    muon_tp_mode=o.muon_tp_mode, muon_fp32_matmul_prec=newton_schulz_precision(cfg),
                    muon_split_qkv=True)
    opt_config = OptimizerConfig(
        optimizer=name,
        **muon,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=tf_config.bf16,
        fp16=tf_config.fp16,
        params_dtype=tf_config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks, config_overrides=param_groups.megatron_overrides(cfg))
    if name != "adam":
        from moe_erc.training import symmetric

        symmetric.propagate_tags(model_chunks)
    return optimizer


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 to ``lr``, then ``lr_decay_style`` to ``min_lr``; counted in iterations."""
    o, t = cfg.optimizer, cfg.training
    decay_iters = o.lr_decay_iters or t.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=min(o.lr_warmup_iters, max(decay_iters - 1, 0)),
        lr_decay_steps=decay_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=decay_iters // 10 if o.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="cosine" if o.lr_decay_style == "WSD" else None,
        # On resume the config's schedule wins over the checkpoint's (megatron's default keeps the saved one
        # silently); the trainer says which schedule settings changed.
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )


SCHEDULE_KEYS = ("training.train_iters", "optimizer.lr", "optimizer.min_lr", "optimizer.lr_warmup_iters",
                 "optimizer.lr_decay_style", "optimizer.lr_decay_iters", "optimizer.weight_decay")


def schedule_changes(saved_config: dict, cfg: Config) -> list[str]:
    """``key: old -> new`` for each LR/WD schedule setting that differs from the checkpoint's config."""
    now = cfg.to_dict()
    changes = []
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        old, new = (saved_config.get(section) or {}).get(name), now[section][name]
        if section in saved_config and old != new:
            changes.append(f"{key}: {old} -> {new}")
    return changes
