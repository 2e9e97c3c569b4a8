"""Memory of a run per rank: the planner's estimate (``moe-erc plan``), also what training checks before it allocates.

Weights in the compute precision, fp32 gradient buffers (megatron DDP's ``grad_reduce_in_fp32``), AdamW state
(fp32 master copy with 16-bit weights + 2 fp32 moments; sharded over DP with the distributed optimizer), and
activations after Korthikanti et al. (2022) (:func:`activation_bytes`).
"""

from __future__ import annotations

from moe_erc.config import Config, data_parallel_size, layer_kinds
from moe_erc.model.flops import aoe_shape, expert_width, num_moe_layers

GiB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def state_bytes(dense: float, experts: float, weight_bytes: int, dp: int, edp: int) -> dict[str, float]:
    """Bytes per rank of weights, gradients and AdamW state (replicated, and sharded by the distributed optimizer)
    for ``dense`` / ``experts`` parameters on the rank, ``dp`` / ``edp`` its (expert-)data-parallel sizes."""
    adam = 12 if weight_bytes == 2 else 8  # fp32 master copy only with 16-bit weights
    per_rank = dense + experts
    return {"weights": per_rank * weight_bytes, "gradients": per_rank * 4, "optimizer": per_rank * adam,
            "optimizer_distributed": (dense / dp + experts / edp) * adam}


def activation_bytes(cfg: Config) -> float:
    """Activations one pipeline stage keeps, bf16, no recomputation, sequence parallel (an estimate).

    Per layer, after Korthikanti et al. (2022), with flash/fused attention (no ``a s^2 b`` score matrix, as
    with transformer-engine on GPU): attention ``2 s b (h + q + k + v + o) + s b h`` bytes (the projection input,
    Q, K, V, the attention output, a dropout mask; ``11 s b h`` for full multi-head attention) + norms ``4 s b h``;
    multi-latent attention also keeps its latents (Q's, normalised, and KV's with the RoPE key). An MoE MLP keeps
    ``K`` copies of the dense MLP's ``19 s b h`` scaled by ``D / 4h`` (SwiGLU: x 1.5), plus its shared expert's
    at its width; all divided by TP. AoE (gated experts of width ``D'``) also keeps the all-expert low-rank
    activation ``[T, n*r]`` (``2 s b n r`` bytes) and its selected experts' ``[T*K, r]`` pieces (``2 K s b r``).
    ERC keeps O(n^2) per layer and K-Means' scores are ``[T, n]`` (both not counted).
    The first 1F1B stage holds ``min(PP, micro-batches)`` micro-batches of its layers; MTP layers (one more
    layer each, plus the ``2h`` concatenation of embedding and hidden state) are added once, as the last stage's.
    """
    m, p, moe, t = cfg.model, cfg.parallel, cfg.moe, cfg.training
    s, b, h = m.seq_length, t.micro_batch_size, m.hidden_size
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    glu = 1.5 if m.swiglu else 1.0
    heads = m.num_attention_heads
    if m.multi_latent_attention:
        qk, v = heads * (m.qk_head_dim + m.qk_pos_emb_head_dim), heads * m.v_head_dim
        projections = qk + qk + v + v + 2 * (m.q_lora_rank or 0) + 2 * m.kv_lora_rank + m.qk_pos_emb_head_dim
    else:
        head, groups = m.kv_channels or h // heads, m.num_query_groups or heads
        projections = heads * head + 2 * groups * head + heads * head
    attention = 2 * s * b * (h + projections) + s * b * h + 4 * s * b * h
    if moe.router == "aoe":
        r, width = aoe_shape(cfg)
        k = moe.moe_router_topk
        moe_mlp = k * 19 * s * b * h * width / (4 * h) * 1.5 + 2 * s * b * moe.num_experts * r + 2 * k * s * b * r
    else:
        moe_mlp = moe.moe_router_topk * 19 * s * b * h * expert_width(cfg) / (4 * h) * glu
    moe_mlp += 19 * s * b * h * (moe.moe_shared_expert_intermediate_size or 0) / (4 * h) * glu
    dense_mlp = 19 * s * b * h * (m.ffn_hidden_size or 4 * h) / (4 * h) * glu
    n_moe = num_moe_layers(cfg)
    per_stage = (m.num_layers * attention + n_moe * moe_mlp + (m.num_layers - n_moe) * dense_mlp) / (tp * pp)
    micro_batches = t.global_batch_size // (t.micro_batch_size * max(1, data_parallel_size(cfg, p.world_size or 1)))
    last_kind_moe = bool(layer_kinds(cfg)[-1])
    mtp = (m.mtp_num_layers or 0) * (attention + (moe_mlp if last_kind_moe else dense_mlp) + 2 * s * b * 2 * h) / tp
    return per_stage * min(pp, max(1, micro_batches)) + mtp
