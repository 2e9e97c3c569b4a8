"""``moe-erc plan CONFIG [--world-size N] [--json]``: size a run before it gets a cluster.

Builds the whole model on the meta device in this process (megatron-core's real modules, no memory, no
GPU), counts its parameters, and derives for the configured layout: per-rank parameters and the memory
of weights, gradients and optimizer state (with and without the distributed optimizer), an activation
estimate per micro-batch, FLOPs per token and ERC's FLOP share.

Conventions: *active* parameters are the ones a token computes with (attention, router, K of n experts,
dense MLPs, output layer; not the input embedding table, which is a lookup). Memory assumes bf16
weights (or the configured precision), fp32 gradient buffers and fp32 Adam (master weights + 2 moments).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from moe_erc.config import Config, check_layout, data_parallel_size, load_config
from moe_erc.errors import ConfigError
from moe_erc.flops import active_matmul_params, num_moe_layers, step_flops

GiB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class ParameterCounts:
    embedding: int   # input word embeddings (+ learned positions)
    output: int      # output layer (0 when tied)
    attention: int   # attention projections, all layers
    experts: int     # routed experts, all layers
    router: int      # router matrices (AoE: the experts' down projections)
    dense_mlp: int   # dense (non-MoE) MLPs
    other: int       # norms, biases, K-Means buffers are not parameters

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


def count_parameters_on_meta(cfg: Config, vocab_size: int) -> ParameterCounts:
    """Build the full model (one process, no parallelism) on the meta device and count by role."""
    from moe_erc import model as model_lib, parallel
    from moe_erc.compat import prepare_runtime

    single = cfg.model_copy(update={
        "parallel": cfg.parallel.model_copy(update={
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1,
            "expert_tensor_parallel_size": None, "sequence_parallel": None, "use_distributed_optimizer": False,
            "world_size": None}),
        "training": cfg.training.model_copy(update={"global_batch_size": cfg.training.micro_batch_size}),
        # Same parameters as TE grouped GEMM, built from megatron's local modules (no TE needed here).
        "moe": cfg.moe.model_copy(update={"moe_grouped_gemm": False}),
    })
    device = prepare_runtime("cpu")
    parallel.initialize(single, device)
    try:
        tf_config = model_lib.transformer_config(single, "bf16")
        tf_config.perform_initialization = False
        with torch.device("meta"):
            net = model_lib.build_model(single, tf_config, vocab_size)
        counts = dict.fromkeys(asdict(ParameterCounts(0, 0, 0, 0, 0, 0, 0)), 0)
        for name, param in net.named_parameters():
            counts[_role(name, param)] += param.numel()
        return ParameterCounts(**counts)
    finally:
        parallel.destroy()


def _role(name: str, param) -> str:
    if "word_embeddings" in name or "position_embeddings" in name:
        return "embedding"
    if name.startswith("output_layer"):
        return "output"
    if ".mlp.experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if "self_attention" in name and "layernorm" not in name and param.dim() > 1:
        return "attention"
    if ".mlp." in name and param.dim() > 1:
        return "dense_mlp"
    return "other"


@dataclass
class Plan:
    world_size: int
    layout: str
    total_params: int
    active_params: int
    params: dict
    per_rank_params: int
    memory_gib: dict
    activation_gib_per_microbatch: float
    flops_per_token: float
    erc_flop_share: float           # the paper's accounting (fraction)
    erc_share_of_model_flops: float  # against all model FLOPs of the step (fraction)
    tokens_per_step: int


def make_plan(cfg: Config, world_size: int) -> Plan:
    check_layout(cfg, world_size, device="cuda")
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size is not set; plan needs it (the tokenizer is not read): "
                          "add model.vocab_size to the config or pass model.vocab_size=N")
    m, p, moe, t = cfg.model, cfg.parallel, cfg.moe, cfg.training
    multiple = m.make_vocab_size_divisible_by * p.tensor_model_parallel_size
    vocab = -(-m.vocab_size // multiple) * multiple
    counts = count_parameters_on_meta(cfg, vocab)
    k_of_n = moe.moe_router_topk / moe.num_experts
    active = counts.total - counts.embedding - counts.experts + round(counts.experts * k_of_n)

    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    dp = data_parallel_size(cfg, world_size)
    edp = world_size // (pp * ep * etp)
    # The busiest rank: a pipeline stage's share of the layers plus the larger of the embedding/output.
    dense = (counts.attention + counts.dense_mlp) / (tp * pp) + (counts.router + counts.other) / pp \
        + max(counts.embedding, counts.output) / tp
    experts = counts.experts / (ep * etp * pp)
    per_rank = dense + experts
    weight_bytes = BYTES["bf16" if t.precision in ("auto", "bf16") else t.precision]
    adam = 12 if weight_bytes == 2 else 8  # fp32 master copy only with 16-bit weights
    memory = {
        "weights": per_rank * weight_bytes / GiB,
        "gradients": per_rank * 4 / GiB,
        "optimizer": per_rank * adam / GiB,
        "optimizer_distributed": (dense / dp + experts / edp) * adam / GiB,
    }
    memory["total"] = memory["weights"] + memory["gradients"] + memory["optimizer"]
    memory["total_distributed_optimizer"] = memory["weights"] + memory["gradients"] + memory["optimizer_distributed"]

    flops = step_flops(cfg.model_copy(update={"erc": cfg.erc.model_copy(update={"enabled": True})}),
                       world_size, vocab)
    tokens = t.global_batch_size * m.seq_length
    n = moe.num_experts
    # Paper's accounting: per EP rank, ERC is the gate forward of n * (n/ep) proxy-expert pairs (1/3 of an
    # expert's forward each) against the K * T / dp token-expert forwards of its routed tokens.
    paper_share = (n * (n / ep) / 3) / (moe.moe_router_topk * tokens / dp)
    return Plan(
        world_size=world_size,
        layout=f"TP{tp} PP{pp} EP{ep} ETP{etp} DP{dp} (expert-DP {edp})",
        total_params=counts.total, active_params=active, params=asdict(counts), per_rank_params=round(per_rank),
        memory_gib={k: round(v, 3) for k, v in memory.items()},
        activation_gib_per_microbatch=round(activation_bytes(cfg) / GiB, 3),
        flops_per_token=6 * active_matmul_params(cfg, vocab) + 12 * m.num_layers * m.seq_length * m.hidden_size,
        erc_flop_share=paper_share,  # what ERC costs, or would cost in a vanilla twin
        erc_share_of_model_flops=flops.erc_share,
        tokens_per_step=tokens,
    )


def activation_bytes(cfg: Config) -> float:
    """Activations one pipeline stage keeps, bf16, no recomputation, sequence parallel (an estimate).

    Per layer, after Korthikanti et al. (2022), with flash/fused attention (no ``a s^2 b`` score matrix, as
    with transformer-engine on GPU): attention ``11 s b h`` + norms ``4 s b h``, and
    for an MoE MLP ``K`` copies of the dense MLP's ``19 s b h`` scaled by ``D / 4h`` (SwiGLU: x 1.5); all
    divided by TP. The first 1F1B stage holds ``min(PP, micro-batches)`` micro-batches of its layers.
    """
    m, p, moe, t = cfg.model, cfg.parallel, cfg.moe, cfg.training
    s, b, h = m.seq_length, t.micro_batch_size, m.hidden_size
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    width = moe.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * h
    glu = 1.5 if m.swiglu else 1.0
    attention = 11 * s * b * h + 4 * s * b * h
    moe_mlp = moe.moe_router_topk * 19 * s * b * h * width / (4 * h) * glu
    dense_mlp = 19 * s * b * h * (m.ffn_hidden_size or 4 * h) / (4 * h) * glu
    n_moe = num_moe_layers(cfg)
    per_stage = (m.num_layers * attention + n_moe * moe_mlp + (m.num_layers - n_moe) * dense_mlp) / (tp * pp)
    micro_batches = t.global_batch_size // (t.micro_batch_size * max(1, data_parallel_size(cfg, p.world_size or 1)))
    return per_stage * min(pp, max(1, micro_batches))


def print_plan(plan: Plan) -> None:
    c = plan.params
    rows = [
        ("world size / layout", f"{plan.world_size}: {plan.layout}"),
        ("total parameters", f"{plan.total_params / 1e9:.3f} B"),
        ("active parameters / token", f"{plan.active_params / 1e6:.0f} M (input embedding excluded)"),
        ("  experts / attention / router", f"{c['experts'] / 1e9:.3f} B / {c['attention'] / 1e6:.0f} M / "
                                           f"{c['router'] / 1e6:.2f} M"),
        ("  embedding / output layer", f"{c['embedding'] / 1e6:.0f} M / {c['output'] / 1e6:.0f} M"),
        ("parameters on the busiest rank", f"{plan.per_rank_params / 1e6:.0f} M"),
        ("weights + grads + Adam per rank", f"{plan.memory_gib['weights']:.2f} + {plan.memory_gib['gradients']:.2f}"
                                            f" + {plan.memory_gib['optimizer']:.2f} = {plan.memory_gib['total']:.2f} GiB"),
        ("  with the distributed optimizer", f"Adam {plan.memory_gib['optimizer_distributed']:.2f} GiB, total "
                                             f"{plan.memory_gib['total_distributed_optimizer']:.2f} GiB"),
        ("activations per micro-batch (est.)", f"{plan.activation_gib_per_microbatch:.2f} GiB (bf16, flash attention, no recompute)"),
        ("training FLOPs per token", f"{plan.flops_per_token / 1e9:.2f} GFLOP"),
        ("tokens per step", f"{plan.tokens_per_step:,}"),
        ("ERC FLOP share (paper's accounting)", f"{100 * plan.erc_flop_share:.3f} %"),
        ("ERC share of all model FLOPs", f"{100 * plan.erc_share_of_model_flops:.3f} %"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-erc plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--world-size", type=int, default=None, help="default: parallel.world_size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_intermixed_args(argv)  # flags may come after the overrides
    cfg = load_config(args.config, args.overrides)
    world = args.world_size or cfg.parallel.world_size
    if world is None:
        raise ConfigError("no world size: set parallel.world_size in the config or pass --world-size N")
    if args.world_size and cfg.parallel.world_size and args.world_size != cfg.parallel.world_size:
        cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"world_size": args.world_size})})
    plan = make_plan(cfg, world)
    if args.json:
        print(json.dumps(asdict(plan)))
    else:
        print_plan(plan)
    return 0
