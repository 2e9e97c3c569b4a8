"""Analytic FLOP counts: the model's training FLOPs per step and ERC's share of them (per GPU).

Conventions: a multiply-add is 2 FLOPs; training = 3x forward (forward + two backward GEMMs). The ERC
loss runs once per step and layer and costs ``2 n m_local d D_local`` per GEMM; forward, recompute in
backward, and the two gradient GEMMs make 4 of them (:mod:`moe_erc.erc` keeps no activations).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_erc.config import Config


def num_moe_layers(cfg: Config) -> int:
    freq = cfg.model.moe_layer_freq
    if isinstance(freq, list):
        return sum(freq)
    return sum(1 for i in range(cfg.model.num_layers) if i % freq == 0)


def _expert_width(cfg: Config) -> int:
    return cfg.moe.moe_ffn_hidden_size or cfg.model.ffn_hidden_size or 4 * cfg.model.hidden_size


def active_matmul_params(cfg: Config, vocab_size: int) -> int:
    """Weights one token multiplies through (attention, K experts, router, dense MLPs, LM head)."""
    m, moe = cfg.model, cfg.moe
    d, heads = m.hidden_size, m.num_attention_heads
    kv = (m.num_query_groups or heads) * (d // heads)
    attention = d * (d + 2 * kv) + d * d
    mlp_mats = 3 if m.swiglu else 2
    expert = mlp_mats * d * _expert_width(cfg)
    dense = mlp_mats * d * (m.ffn_hidden_size or 4 * d)
    n_moe = num_moe_layers(cfg)
    return (m.num_layers * attention + n_moe * (moe.moe_router_topk * expert + moe.num_experts * d)
            + (m.num_layers - n_moe) * dense + d * vocab_size)


@dataclass(frozen=True)
class StepFlops:
    model_per_gpu: float  # training FLOPs of one step on one GPU (model only)
    erc_per_gpu: float    # ERC FLOPs of one step on one GPU

    @property
    def erc_share(self) -> float:
        """ERC FLOPs as a fraction of the model's (the paper reports 0.18 % at 3B, 0.72 % at 15B)."""
        return self.erc_per_gpu / self.model_per_gpu


def step_flops(cfg: Config, world_size: int, vocab_size: int) -> StepFlops:
    """Per-GPU FLOPs of one optimizer step for ``cfg`` on ``world_size`` GPUs."""
    m, p = cfg.model, cfg.parallel
    tokens = cfg.training.global_batch_size * m.seq_length
    attention_scores = 12 * m.num_layers * m.seq_length * m.hidden_size  # QK^T and AV, fwd + bwd, per token
    model_total = tokens * (6 * active_matmul_params(cfg, vocab_size) + attention_scores)
    n = cfg.moe.num_experts
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    erc_layers_per_gpu = num_moe_layers(cfg) / p.pipeline_model_parallel_size if cfg.erc.enabled else 0.0
    erc_gemm = 2 * n * (n / ep) * m.hidden_size * (_expert_width(cfg) / etp)
    return StepFlops(model_per_gpu=model_total / world_size, erc_per_gpu=erc_layers_per_gpu * 4 * erc_gemm)
