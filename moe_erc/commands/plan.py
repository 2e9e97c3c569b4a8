"""``moe-erc plan CONFIG [--world-size N] [--json]``: size a run before it gets a cluster.

Builds the whole model on the meta device in this process (megatron-core's real modules, no memory, no
GPU), counts its parameters, and derives for the configured layout: per-rank parameters and the memory
of weights, gradients and optimizer state (with and without the distributed optimizer), an activation
estimate per micro-batch, FLOPs per token and ERC's FLOP share, and the cost of every method (top-k,
ERC, AoE, K-Means) at the config's shapes. FLOPs come from :mod:`moe_erc.model.flops`, whose assumptions are printed.

Conventions: *active* parameters are the ones a token computes with (attention, router or AoE's
down projections of all experts, K of n experts, dense MLPs, output layer; not the input embedding
table, which is a lookup). Memory assumes bf16
weights (or the configured precision), fp32 gradient buffers and fp32 Adam (master weights + 2 moments).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from moe_erc.config import Config, check_layout, data_parallel_size, expert_data_parallel_size, load_config
from moe_erc.errors import ConfigError
from moe_erc.model.flops import METHODS, method_flops, method_label, method_variant, padded_vocab_size, step_flops
from moe_erc.model.memory import BYTES, GiB, activation_bytes, state_bytes


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
    counts = dict.fromkeys(asdict(ParameterCounts(0, 0, 0, 0, 0, 0, 0)), 0)
    for name, shape in parameter_shapes_on_meta(cfg, vocab_size):
        counts[_role(name, len(shape))] += _numel(shape)
    return ParameterCounts(**counts)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_SHAPES: dict = {}


def parameter_shapes_on_meta(cfg: Config, vocab_size: int) -> list[tuple[str, tuple]]:
    """``(name, shape)`` of every parameter of the full model (one process, no parallelism), built on meta."""
    key = (cfg.model_dump_json(), vocab_size)
    if key not in _SHAPES:
        _SHAPES[key] = _build_on_meta(cfg, vocab_size)
    return _SHAPES[key]


def _build_on_meta(cfg: Config, vocab_size: int) -> list[tuple[str, tuple]]:
    from moe_erc.model import gpt
    from moe_erc.training import parallel

    single = parallel.one_process_config(cfg)
    # Same parameters as TE grouped GEMM, built from megatron's local modules (no TE needed here).
    single = single.model_copy(update={"moe": cfg.moe.model_copy(update={"moe_grouped_gemm": False})})
    with parallel.one_process(single, "cpu"):
        tf_config = gpt.transformer_config(single, "bf16")
        tf_config.perform_initialization = False
        with torch.device("meta"):
            net = gpt.build_model(single, tf_config, vocab_size)
        return [(name, tuple(param.shape)) for name, param in net.named_parameters()]


def _role(name: str, ndim: int) -> str:
    if "word_embeddings" in name or "position_embeddings" in name:
        return "embedding"
    if name.startswith("output_layer"):
        return "output"
    if ".mlp.experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if "self_attention" in name and "layernorm" not in name and ndim > 1:
        return "attention"
    if ".mlp." in name and ndim > 1:
        return "dense_mlp"
    return "other"


@dataclass
class Plan:
    world_size: int
    layout: str
    method: str                     # the configured method's row of flops.METHODS
    total_params: int
    active_params: int              # what a token computes with, input embedding excluded (a lookup)
    active_params_with_embedding: int  # the same with the input embedding (how model cards count "A3B")
    params: dict
    per_rank_params: int
    memory_gib: dict
    activation_gib_per_microbatch: float
    flops_per_token: float          # training FLOPs per token of the configured method (ERC excluded)
    flops_per_token_parts: dict     # the same by component (flops.StepFlops.per_token)
    erc_flop_share: Optional[float]  # the paper's accounting (fraction); None without a router matrix
    erc_share_of_model_flops: Optional[float]  # against all model training FLOPs of the step (fraction)
    tokens_per_step: int
    method_costs: dict              # per method at these shapes: FLOPs per GPU per step, activations
    flop_assumptions: list
    optimizer: dict                 # optimizer_cost(): state, Newton-Schulz TFLOP and workspace per rank
    distributed_optimizer: bool = False  # parallel.use_distributed_optimizer (AdamW state sharded over DP)


def make_plan(cfg: Config, world_size: int) -> Plan:
    check_layout(cfg, world_size, device="cuda")
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size is not set; plan needs it (the tokenizer is not read): "
                          "add model.vocab_size to the config or pass model.vocab_size=N")
    p, moe, t = cfg.parallel, cfg.moe, cfg.training
    vocab = padded_vocab_size(cfg)
    counts = count_parameters_on_meta(cfg, vocab)
    k_of_n = moe.moe_router_topk / moe.num_experts
    active = counts.total - counts.embedding - counts.experts + round(counts.experts * k_of_n)

    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    dp = data_parallel_size(cfg, world_size)
    edp = expert_data_parallel_size(cfg, world_size)
    # The busiest rank: a pipeline stage's share of the layers plus the larger of the embedding/output.
    dense = (counts.attention + counts.dense_mlp) / (tp * pp) + (counts.router + counts.other) / pp \
        + max(counts.embedding, counts.output) / tp
    experts = counts.experts / (ep * etp * pp)
    per_rank = dense + experts
    weight_bytes = BYTES["bf16" if t.precision in ("auto", "bf16") else t.precision]
    memory = {k: v / GiB for k, v in state_bytes(dense, experts, weight_bytes, dp, edp).items()}
    own = step_flops(cfg, world_size)
    opt = optimizer_cost(cfg, parameter_shapes_on_meta(cfg, vocab), dense, experts, weight_bytes, own.model_per_gpu)
    if cfg.optimizer.name != "adamw":
        memory["optimizer"] = opt["state_gib"]
        memory["optimizer_distributed"] = float("nan")  # replicated state only (see check_layout)
    memory["total"] = memory["weights"] + memory["gradients"] + memory["optimizer"]
    memory["total_distributed_optimizer"] = memory["weights"] + memory["gradients"] + memory["optimizer_distributed"]
    # The headline: the optimizer this config runs, plus one micro-batch of activations (a PP schedule keeps up
    # to PP micro-batches in flight on the first stage).
    in_use = memory["total_distributed_optimizer"] if p.use_distributed_optimizer and cfg.optimizer.name == "adamw" \
        else memory["total"]
    memory["per_gpu_total"] = in_use + min(pp, t.global_batch_size // (t.micro_batch_size * dp) or 1) \
        * activation_bytes(cfg) / GiB
    per_method = method_flops(cfg, world_size)
    erc = per_method["ERC"]  # what ERC costs, or would cost in a top-k twin of this config
    has_router = moe.router == "topk"
    top_k = per_method["top-k / aux-free"]
    method_costs = {}
    for label, router, erc_on in METHODS:
        f = per_method[label]
        variant = method_variant(cfg, router, erc_on)
        method_costs[label] = {
            "router_tflop": f.tokens_per_step * f.per_token["router"] / world_size / 1e12,
            "experts_tflop": f.tokens_per_step * f.per_token["experts"] / world_size / 1e12,
            "aoe_recompute_tflop": f.tokens_per_step * f.per_token["aoe_recompute"] / world_size / 1e12,
            "erc_tflop": f.erc_per_gpu / 1e12,
            "moe_tflop": f.moe_per_gpu / 1e12,
            "model_tflop": (f.model_per_gpu + f.erc_per_gpu) / 1e12,
            "model_vs_topk": (f.model_per_gpu + f.erc_per_gpu) / top_k.model_per_gpu,
            "moe_vs_topk": f.moe_per_gpu / top_k.moe_per_gpu,
            "activation_gib_per_microbatch": activation_bytes(variant) / GiB,
        }
    return Plan(
        world_size=world_size,
        layout=f"TP{tp} PP{pp} EP{ep} ETP{etp} DP{dp} (expert-DP {edp})",
        method=method_label(cfg),
        total_params=counts.total, active_params=active, active_params_with_embedding=active + counts.embedding,
        params=asdict(counts), per_rank_params=round(per_rank),
        memory_gib={k: round(v, 3) for k, v in memory.items()},
        activation_gib_per_microbatch=round(activation_bytes(cfg) / GiB, 3),
        flops_per_token=own.per_token_total,
        flops_per_token_parts=dict(own.per_token),
        erc_flop_share=erc.erc_share_paper if has_router else None,
        erc_share_of_model_flops=erc.erc_share_model if has_router else None,
        tokens_per_step=own.tokens_per_step,
        method_costs=method_costs,
        flop_assumptions=erc.assumptions.lines() + [
            line for label in ("AoE", "K-Means") for line in per_method[label].assumptions.notes],
        optimizer={k: (round(v, 6) if isinstance(v, float) else v) for k, v in opt.items()},
        distributed_optimizer=p.use_distributed_optimizer and cfg.optimizer.name == "adamw",
    )


def optimizer_cost(cfg: Config, shapes: list[tuple[str, tuple]], dense: float, experts: float,
                   weight_bytes: int, training_flops_per_gpu: float) -> dict:
    """State memory, Newton-Schulz FLOPs and workspace of ``optimizer.name`` on the busiest rank.

    ``dense`` / ``experts``: that rank's non-expert / expert parameter counts. AdamW keeps 2 fp32 moments per
    parameter, Muon's rules 1 (momentum); both add an fp32 master copy with 16-bit weights. Newton-Schulz
    runs on each matrix whole (``duplicated``: every TP rank orthogonalizes the gathered matrix), so its
    FLOPs per rank are not divided by TP: a PP stage's share of the dense matrices, plus its local experts'.
    """
    o, p = cfg.optimizer, cfg.parallel
    master = 4 if weight_bytes == 2 else 0
    if o.name == "adamw":
        return {"name": "adamw", "state_gib": (dense + experts) * (8 + master) / GiB, "adamw_state_gib":
                (dense + experts) * (8 + master) / GiB, "ns_tflop_per_step": 0.0, "ns_share_of_step": 0.0,
                "ns_matrices_per_rank": 0, "ns_workspace_mib": 0.0}
    from moe_erc.training.symmetric import newton_schulz_flops, rule_for

    pp, ep = p.pipeline_model_parallel_size, p.expert_model_parallel_size
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    kv = m.hidden_size // heads
    muon_params = {"dense": 0, "experts": 0}
    total = {"dense": 0, "experts": 0}
    ns_flops, ns_count, largest = 0.0, 0.0, (0, 0)
    for name, shape in shapes:
        kind = "experts" if ".mlp.experts." in name else "dense"
        total[kind] += _numel(shape)
        rule = rule_for(name, torch.empty(shape, device="meta"), o.name, o.symmetric_embedding_rule,
                        o.symmetric_router_rule, o.symmetric_mlp_rule, cfg.moe.moe_router_score_function != "sigmoid")
        if rule == "adamw":
            continue
        muon_params[kind] += _numel(shape)
        if rule in ("row_norm", "centered_row_norm"):
            continue  # row-wise: no Newton-Schulz
        blocks = [shape[-2:]] * (shape[0] if len(shape) == 3 else 1)
        if "linear_qkv" in name:  # megatron's QKV split: Q, K and V orthogonalized separately
            blocks = [(heads * kv, shape[1]), (groups * kv, shape[1]), (groups * kv, shape[1])]
        share = 1.0 if "embeddings" in name or "output_layer" in name else 1.0 / pp
        if kind == "experts":
            share /= ep
        for rows, cols in blocks:
            ns_flops += share * newton_schulz_flops(rows, cols, o.muon_num_ns_steps)
            ns_count += share
            largest = max(largest, (rows, cols), key=lambda rc: rc[0] * rc[1])
    frac = {k: muon_params[k] / total[k] if total[k] else 0.0 for k in total}
    per_rank_muon = dense * frac["dense"] + experts * frac["experts"]
    per_rank_adam = dense + experts - per_rank_muon
    # Workspace of one Newton-Schulz call on the largest (gathered) matrix, fp32: X, X X^T, B and B X.
    rows, cols = largest
    return {"name": o.name,
            "state_gib": (per_rank_muon * (4 + master) + per_rank_adam * (8 + master)) / GiB,
            "adamw_state_gib": (dense + experts) * (8 + master) / GiB,
            "ns_tflop_per_step": ns_flops / 1e12,
            "ns_share_of_step": ns_flops / training_flops_per_gpu if training_flops_per_gpu else 0.0,
            "ns_matrices_per_rank": round(ns_count),
            "ns_workspace_mib": 4 * (2 * rows * cols + 2 * min(rows, cols) ** 2) / 2**20}


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.3f} %"


def _optimizer_in_use(plan: Plan) -> str:
    return f"{plan.optimizer['name']}{', distributed' if plan.distributed_optimizer else ''}"


def _optimizer_line(o: dict) -> str:
    if o["name"] == "adamw":
        return f"AdamW: {o['state_gib']:.2f} GiB of state per rank (fp32 moments + master weights)"
    return (f"{o['name']}: state {o['state_gib']:.2f} GiB per rank (AdamW: {o['adamw_state_gib']:.2f}); "
            f"Newton-Schulz on {o['ns_matrices_per_rank']} matrices, {o['ns_tflop_per_step']:.3f} TFLOP per rank "
            f"per step = {100 * o['ns_share_of_step']:.2f} % of the step's model FLOPs; workspace "
            f"{o['ns_workspace_mib']:.1f} MiB (largest gathered matrix, fp32)")


def print_plan(plan: Plan) -> None:
    c = plan.params
    no_router = f"n/a ({plan.method} has no router matrix; see the ERC row below)"
    would = " if ERC were on" if plan.method != "ERC" else ""
    rows = [
        ("world size / layout", f"{plan.world_size}: {plan.layout}"),
        ("method", plan.method),
        ("total parameters", f"{plan.total_params / 1e9:.3f} B"),
        ("active parameters / token", f"{plan.active_params / 1e6:.0f} M (input embedding excluded; "
                                      f"{plan.active_params_with_embedding / 1e6:.0f} M with it)"),
        ("  experts / attention / router", f"{c['experts'] / 1e9:.3f} B / {c['attention'] / 1e6:.0f} M / "
                                           f"{c['router'] / 1e6:.2f} M"),
        ("  embedding / output layer", f"{c['embedding'] / 1e6:.0f} M / {c['output'] / 1e6:.0f} M"),
        ("parameters on the busiest rank", f"{plan.per_rank_params / 1e6:.0f} M"),
        ("per-GPU total (est.)", f"{plan.memory_gib['per_gpu_total']:.2f} GiB: weights, gradients and the state of "
                                 f"the optimizer this config uses ({_optimizer_in_use(plan)}), plus activations"),
        ("weights + grads + optimizer per rank", f"{plan.memory_gib['weights']:.2f} + "
         f"{plan.memory_gib['gradients']:.2f} + {plan.memory_gib['optimizer']:.2f} = {plan.memory_gib['total']:.2f} GiB"),
        ("  with the distributed optimizer", f"Adam {plan.memory_gib['optimizer_distributed']:.2f} GiB, total "
                                             f"{plan.memory_gib['total_distributed_optimizer']:.2f} GiB"
         if plan.optimizer["name"] == "adamw" else "n/a (Muon optimizers keep replicated state)"),
        ("optimizer", _optimizer_line(plan.optimizer)),
        ("activations per micro-batch (est.)", f"{plan.activation_gib_per_microbatch:.2f} GiB (bf16, flash attention, no recompute)"),
        ("training FLOPs per token", f"{plan.flops_per_token / 1e9:.2f} GFLOP"),
        ("tokens per step", f"{plan.tokens_per_step:,}"),
        ("ERC FLOP share (paper's accounting)",
         _pct(plan.erc_flop_share) + would + " (ERC gate GEMMs vs routed experts' forward; paper: 0.18 % at 3B, "
                                             "0.72 % at 15B)"
         if plan.erc_flop_share is not None else no_router),
        ("ERC share of all model FLOPs", _pct(plan.erc_share_of_model_flops) + would
         + " (4 ERC GEMMs vs the step's training FLOPs)"
         if plan.erc_share_of_model_flops is not None else no_router),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("\nper method at these shapes (TFLOP per GPU per step, training; activations per micro-batch, one stage):")
    header = ["method", "router/scoring", "experts", "AoE recompute", "ERC", "MoE total", "model total",
              "MoE vs top-k", "model vs top-k", "activations"]
    table = [header]
    for label, cost in plan.method_costs.items():
        table.append([("* " if label == plan.method else "  ") + label, f"{cost['router_tflop']:.3f}",
                      f"{cost['experts_tflop']:.2f}", f"{cost['aoe_recompute_tflop']:.3f}", f"{cost['erc_tflop']:.3f}",
                      f"{cost['moe_tflop']:.2f}", f"{cost['model_tflop']:.2f}", f"{cost['moe_vs_topk']:.3f}x",
                      f"{cost['model_vs_topk']:.3f}x",
                      f"{cost['activation_gib_per_microbatch']:.2f} GiB"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        print("  " + "  ".join(cells))
    print("\nFLOP count assumptions (moe_erc/model/flops.py):")
    for line in plan.flop_assumptions:
        print(f"  {line}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-erc plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--world-size", type=int, default=None, help="default: parallel.world_size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_intermixed_args(argv)  # flags may come after the overrides
    if args.world_size is not None and args.world_size < 1:
        raise ConfigError(f"--world-size {args.world_size} must be >= 1 (the number of GPUs the run gets)")
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
