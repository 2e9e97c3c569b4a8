"""Optimizer and LR schedule: megatron-core's AdamW (chained dense/expert when EP > 1) + warmup/decay."""

from __future__ import annotations

import torch

from moe_erc.compat import import_megatron
from moe_erc.config import Config

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


def build_optimizer(cfg: Config, tf_config: TransformerConfig, model_chunks: list):
    """megatron optimizer over the DDP-wrapped chunks (torch AdamW when apex/TE are absent)."""
    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam",
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
    return get_megatron_optimizer(opt_config, model_chunks)


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
    )
