"""Analytic FLOP counts of one training step, per method, and ERC's share of them: the one counter that
``moe-erc plan``, ``benchmarks/erc_overhead.py`` and ``benchmarks/gpu_step.py`` (MFU) all use.

Conventions (also returned as :class:`Assumptions` and printed by every caller):

* A multiply-add is 2 FLOPs; elementwise work (norms, activations, softmax, top-K) is not counted.
* Training = 3 x forward for every GEMM with a trainable weight (forward, input gradient, weight
  gradient). K-Means' cosine scoring has no weight: 2 x forward.
* Attention scores (``Q K^T`` and ``A V``) over the full ``s x s`` matrix, no causal saving (as Megatron's
  and PaLM's MFU counts): ``4 s d`` FLOPs per token and layer forward (``2 s heads (qk + v)`` with other head sizes
  and multi-latent attention; ``s`` becomes ``min(s, window + 1)`` in sliding-window layers).
* Shared experts are a dense MLP in every MoE layer; each multi-token-prediction layer is a ``2d -> d``
  projection, a layer shaped as the decoder's last and the output GEMM.
* The input embedding is a lookup: 0 FLOPs. The output layer is a ``d x V`` GEMM (V padded as training pads it).
* Tokens per step = ``training.global_batch_size x model.seq_length``; per-GPU figures divide the step's
  total evenly over the world (pipeline bubbles and load imbalance are not modelled).

Per MoE layer and token (forward), by ``moe.router``:

* ``topk`` (vanilla, aux-loss-free, ERC): router ``2 n d``; K experts ``K * 2 * mats * d * D``
  (``mats`` = 3 with SwiGLU, else 2).
* ``kmeans``: cosine to n centroids ``2 n d`` (no parameter, 2 x forward in training); experts as ``topk``.
* ``aoe``: the all-expert scoring GEMM ``x @ Wdown`` ``2 n d r`` (every token, all n experts); K experts of
  width ``D'`` continuing from the low-rank activation: ``K * 2 * D' * (r + 2 d)``; where the cache cannot be
  reused (EP > 1, TP > 1 or a capacity factor: tokens arrive from other ranks or are dropped) the selected
  experts recompute ``x @ Wdown_e``,
  ``K * 2 d r``. ``r = moe.aoe_rank`` (default d/3), ``D' = moe_erc.model.layers.routers.aoe.aoe_width(cfg)``.

The ERC loss runs once per step and MoE layer. Each GPU computes the ``[n, n/ep]`` block of ``M`` on its
``D/etp`` shard: one GEMM of ``2 n (n/ep) d (D/etp)`` FLOPs; forward, its recomputation in backward and the
two gradient GEMMs make :data:`ERC_GEMMS` = 4 of them (:mod:`moe_erc.model.erc` keeps no ``[n, n, D]``
activation). Two shares are reported:

* **the paper's accounting** (:attr:`StepFlops.erc_share_paper`): ERC's gate GEMMs against the routed
  experts' forward on the same GPU, ``2 n (n/ep) d (D/etp)`` per layer against ``K T_gpu * 2 mats d D``,
  i.e. ``n^2 edp / (mats K T)`` with ``edp`` = expert-data-parallel size and ``T`` tokens per step. With the
  paper's "3M tokens per batch" (T = 3.0e6) this gives 0.182 % at 3B (n=64, dp=32, ep=1) and 0.728 % at 15B
  (n=256, dp=64, ep=8) against the paper's 0.18 % and 0.72 %; with our configs' 768 x 4096 = 3.15M tokens,
  0.174 % and 0.694 %. This is the number to compare with the paper.
* **the share of all training FLOPs** (:attr:`StepFlops.erc_share_model`): the 4 ERC GEMMs against the whole
  model's training FLOPs on the GPU (attention, router, experts, output layer, forward and backward): 0.115 %
  at 3B and 0.393 % at 15B. Lower, because the denominator holds everything the model computes, not only the
  experts' forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_erc.config import Config, layer_kinds

ERC_GEMMS = 4  # forward, recompute in backward, gradient into the proxies, gradient into the gate weights


def num_moe_layers(cfg: Config) -> int:
    return sum(layer_kinds(cfg))


def expert_width(cfg: Config) -> int:
    """D of a top-K / K-Means expert (``moe.moe_ffn_hidden_size``, else the dense width)."""
    return cfg.moe.moe_ffn_hidden_size or cfg.model.ffn_hidden_size or 4 * cfg.model.hidden_size


def padded_vocab_size(cfg: Config, vocab_size: int | None = None) -> int:
    """``vocab_size`` (default ``model.vocab_size``) padded to a multiple of ``make_vocab_size_divisible_by`` that
    TP also divides (their lcm), so the embedding's shape, and a checkpoint's, is the same in every layout whose TP
    divides it (Megatron-LM pads to the product, which changes with TP)."""
    import math

    vocab = cfg.model.vocab_size if vocab_size is None else vocab_size
    if vocab is None:
        raise ValueError("no vocabulary size: set model.vocab_size or pass vocab_size")
    multiple = math.lcm(cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
    return -(-vocab // multiple) * multiple


def aoe_shape(cfg: Config) -> tuple[int, int]:
    from moe_erc.model.layers.routers.aoe import aoe_rank, aoe_width  # imports megatron: only when AoE is counted

    return aoe_rank(cfg), aoe_width(cfg)


def aoe_recomputes(cfg: Config) -> bool:
    """AoE experts recompute ``x @ Wdown_e`` unless they see exactly the router's tokens (EP = TP = 1 and
    dropless routing, as ``AoEExperts._low_rank`` decides)."""
    p = cfg.parallel
    return (p.expert_model_parallel_size > 1 or p.tensor_model_parallel_size > 1
            or cfg.moe.moe_expert_capacity_factor is not None)


@dataclass(frozen=True)
class Assumptions:
    """What the count assumes; :meth:`lines` is what plan and the benchmarks print."""

    seq_length: int
    vocab_size: int          # padded
    tokens_per_step: int
    world_size: int
    erc_gemms: int = ERC_GEMMS
    attention: str = "Q K^T and A V over the full s x s (no causal saving): 4 s d FLOPs per token and layer forward"
    input_embedding: str = "a lookup, 0 FLOPs (excluded); the output layer is counted (d x V)"
    training: str = ("3 x forward for GEMMs with weights (fwd, input grad, weight grad); K-Means scoring 2 x "
                     "(no weight); elementwise ops not counted")
    notes: tuple[str, ...] = field(default_factory=tuple)

    def lines(self) -> list[str]:
        out = [f"sequence length {self.seq_length}; vocabulary {self.vocab_size} (padded); "
               f"{self.tokens_per_step:,} tokens per step over {self.world_size} GPU(s) (spread evenly)",
               f"attention: {self.attention}",
               f"input embedding: {self.input_embedding}",
               f"training: {self.training}",
               f"ERC: once per step and MoE layer, {self.erc_gemms} GEMMs of 2 n (n/ep) d (D/etp) per GPU "
               f"(forward, recompute, 2 gradients); the paper's accounting compares one of them with the "
               f"routed experts' forward, n^2 edp / (mats K T), independent of sequence length, vocabulary and "
               f"attention"]
        return out + list(self.notes)


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs of one optimizer step. ``per_token`` holds training FLOPs per token of the whole model
    by component (ERC excluded: it does not scale with tokens)."""

    per_token: dict             # attention, attention_scores, router, experts, aoe_recompute, dense_mlp, output
    tokens_per_step: int
    world_size: int
    erc_per_gpu: float          # ERC training FLOPs of one step on one GPU (0 when ERC is off / impossible)
    erc_forward_per_gpu: float  # one ERC GEMM per MoE layer of this GPU (the paper's numerator)
    expert_forward_per_gpu: float  # routed experts' forward FLOPs of one step on one GPU (the paper's denominator)
    assumptions: Assumptions

    @property
    def per_token_total(self) -> float:
        return sum(self.per_token.values())

    @property
    def model_per_gpu(self) -> float:
        """Training FLOPs of one step on one GPU, model only (ERC excluded)."""
        return self.tokens_per_step * self.per_token_total / self.world_size

    @property
    def moe_per_gpu(self) -> float:
        """Training FLOPs of the MoE layers (router or scoring, experts, AoE recompute) and ERC, per GPU."""
        moe = sum(self.per_token[k] for k in ("router", "experts", "aoe_recompute"))
        return self.tokens_per_step * moe / self.world_size + self.erc_per_gpu

    @property
    def erc_share_model(self) -> float:
        """ERC's training FLOPs as a fraction of the model's training FLOPs on one GPU."""
        return self.erc_per_gpu / self.model_per_gpu

    @property
    def erc_share(self) -> float:  # the name older callers use
        return self.erc_share_model

    @property
    def erc_share_paper(self) -> float:
        """The paper's accounting: ERC's gate GEMMs vs the routed experts' forward on one GPU
        (paper: 0.18 % at 3B, 0.72 % predicted at 15B)."""
        return self.erc_forward_per_gpu / self.expert_forward_per_gpu if self.erc_forward_per_gpu else 0.0


def _windowed(cfg: Config, layer: int) -> bool:
    """Layer ``layer`` (0-based) attends over ``model.window_size``: megatron's own rule."""
    if cfg.model.window_size is None:
        return False
    from megatron.core.transformer.utils import is_layer_window_attention

    return is_layer_window_attention(tuple(cfg.model.window_size), cfg.model.window_attn_skip_freq, layer + 1)


def attention_forward(cfg: Config) -> tuple[float, list[float]]:
    """Forward FLOPs per token of one layer's attention projections, and of each layer's scores (``Q K^T``
    and ``A V``, all keys up to the sequence length or the window, no causal saving)."""
    m = cfg.model
    d, s, heads = m.hidden_size, m.seq_length, m.num_attention_heads
    if m.multi_latent_attention:
        qk, v = m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim
        q = d * m.q_lora_rank + m.q_lora_rank * heads * qk if m.q_lora_rank else d * heads * qk
        projections = 2 * (q + d * (m.kv_lora_rank + m.qk_pos_emb_head_dim)
                           + m.kv_lora_rank * heads * (m.qk_head_dim + v) + heads * v * d)
    else:
        qk = v = m.kv_channels or d // heads
        groups = m.num_query_groups or heads
        projections = 2 * (d * (heads + 2 * groups) * qk + heads * qk * d)
    scores = []
    for layer in range(m.num_layers):
        keys = min(s, m.window_size[0] + 1) if _windowed(cfg, layer) else s
        scores.append(2 * keys * heads * (qk + v))
    return projections, scores


def step_flops(cfg: Config, world_size: int, vocab_size: int | None = None) -> StepFlops:
    """Training FLOPs of one optimizer step of ``cfg`` on ``world_size`` GPUs.

    ``vocab_size``: the tokenizer's size before padding (default ``model.vocab_size``); it is padded here
    as training pads it. ERC is counted when ``erc.enabled`` (and the router is ``topk``).
    """
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    d, s, n, k = m.hidden_size, m.seq_length, moe.num_experts, moe.moe_router_topk
    vocab = padded_vocab_size(cfg, vocab_size)
    mats = 3 if m.swiglu else 2
    n_moe, n_dense = num_moe_layers(cfg), m.num_layers - num_moe_layers(cfg)
    notes = []

    router_fwd, scoring_factor, experts_fwd, recompute_fwd = 2 * n * d, 3, k * 2 * mats * d * expert_width(cfg), 0
    if moe.router == "kmeans":
        scoring_factor = 2
        notes.append("K-Means: cosine scoring 2 n d per token (no router weight); centroid update not counted")
    elif moe.router == "aoe":
        r, width = aoe_shape(cfg)
        router_fwd = 2 * n * d * r
        experts_fwd = k * 2 * width * (r + 2 * d)
        recompute = aoe_recomputes(cfg)
        recompute_fwd = k * 2 * d * r if recompute else 0
        when = "counted (EP>1, TP>1 or capacity factor)" if recompute else "none (EP=TP=1, dropless)"
        notes.append(f"AoE: rank r={r}, expert width D'={width}; scoring 2 n d r per token; experts "
                     f"K*2*D'*(r+2d); recompute K*2*d*r {when}")

    projections, scores = attention_forward(cfg)
    shared_fwd = 2 * mats * d * (moe.moe_shared_expert_intermediate_size or 0)
    dense_fwd = 2 * mats * d * (m.ffn_hidden_size or 4 * d)
    per_token = {
        "attention": 3 * m.num_layers * projections,
        "attention_scores": 3 * sum(scores),
        "router": scoring_factor * n_moe * router_fwd,
        "experts": 3 * n_moe * experts_fwd,
        "aoe_recompute": 3 * n_moe * recompute_fwd,
        "shared_experts": 3 * n_moe * shared_fwd,
        "dense_mlp": 3 * n_dense * dense_fwd,
        "output": 3 * 2 * d * vocab,
    }
    if m.mtp_num_layers:  # each: [embedding; hidden] -> d, one layer shaped as the decoder's last, the output GEMM
        last_is_moe = layer_kinds(cfg)[-1]
        mlp_fwd = (router_fwd + experts_fwd + recompute_fwd + shared_fwd) if last_is_moe else dense_fwd
        per_token["mtp"] = 3 * m.mtp_num_layers * (2 * 2 * d * d + projections + scores[-1] + mlp_fwd + 2 * d * vocab)
        notes.append(f"MTP: {m.mtp_num_layers} layer(s), each a projection 2d -> d, a layer like the decoder's "
                     f"last and the output GEMM")
    if m.multi_latent_attention:
        notes.append("MLA: the Q (or Q-LoRA), KV-down and KV-up projections; scores over qk_head_dim + "
                     "qk_pos_emb_head_dim, values over v_head_dim")
    if m.window_size is not None:
        notes.append(f"sliding window {m.window_size}: scores over min(s, window + 1) keys in windowed layers")
    tokens = cfg.training.global_batch_size * s
    erc_fwd = 0.0
    if cfg.erc.enabled and moe.router == "topk":
        ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or p.tensor_model_parallel_size
        erc_fwd = n_moe / p.pipeline_model_parallel_size * 2 * n * (n / ep) * d * (expert_width(cfg) / etp)
    expert_fwd = tokens * n_moe * k * 2 * mats * d * expert_width(cfg) / world_size
    return StepFlops(
        per_token=per_token, tokens_per_step=tokens, world_size=world_size, erc_per_gpu=ERC_GEMMS * erc_fwd,
        erc_forward_per_gpu=erc_fwd, expert_forward_per_gpu=expert_fwd,
        assumptions=Assumptions(seq_length=s, vocab_size=vocab, tokens_per_step=tokens, world_size=world_size,
                                notes=tuple(notes)),
    )


# The methods plan compares at one config's shapes: (label, moe.router, ERC on).
METHODS = (("top-k / aux-free", "topk", False), ("ERC", "topk", True), ("AoE", "aoe", False),
           ("K-Means", "kmeans", False))


def method_variant(cfg: Config, router: str, erc: bool) -> Config:
    """``cfg`` with another method's routing (same shapes, layout and batch)."""
    return cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"router": router}),
                                  "erc": cfg.erc.model_copy(update={"enabled": erc})})


def method_flops(cfg: Config, world_size: int, vocab_size: int | None = None) -> dict[str, StepFlops]:
    """:func:`step_flops` of every method in :data:`METHODS` at ``cfg``'s shapes."""
    return {label: step_flops(method_variant(cfg, router, erc), world_size, vocab_size)
            for label, router, erc in METHODS}


def method_label(cfg: Config) -> str:
    """Which row of :data:`METHODS` ``cfg`` is."""
    for label, router, erc in METHODS:
        if cfg.moe.router == router and (router != "topk" or cfg.erc.enabled == erc):
            return label
    return cfg.moe.router
