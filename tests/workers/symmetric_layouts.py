"""Run under torchrun with 2 processes: the symmetric optimizer's update in TP=2 / EP=2 / DP=2 vs one process.

One block of every rule class, sharded as megatron shards it (column-parallel fc1 with each rank holding
its neurons' gate and up rows, row-parallel fc2, vocab-parallel embedding, replicated router, stacked
experts split over EP and their hidden width over expert-TP). Each rank takes two SymmetricMuon steps on
its shards with the same (already reduced) gradients; the shards are gathered back and compared with two
steps on the whole blocks in one process. Prints one JSON line per layout: {"layout", "rank", "errors"}.
"""

import json
import sys

import torch
import torch.distributed as dist

from moe_erc.compat import prepare_runtime

prepare_runtime("cpu")
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402

from moe_erc.training.symmetric import SymmetricMuon  # noqa: E402

E, D, d, V = 4, 6, 8, 16

# name: (rule, full shape, TP partition dim or None, expert?, gated fc1?)
BLOCKS = {
    "qkv_like": ("spectral", (12, d), 0, False, False),   # megatron's own Muon path
    "proj": ("spectral", (d, 12), 1, False, False),
    "fc1": ("row_aware", (2 * D, d), 0, False, True),
    "fc2": ("col_aware", (d, D), 1, False, False),
    "embedding": ("row_norm", (V, d), 0, False, False),
    "output_hybrid": ("hybrid", (V, d), 0, False, False),
    "router": ("centered_row_norm", (E, d), None, False, False),
    "router_left": ("left_spectral", (E, d), None, False, False),
    "experts_fc1": ("row_aware", (E, 2 * D, d), 1, True, True),
    "experts_fc2": ("col_aware", (E, d, D), 2, True, False),
    # the authors' rules (symmetric_preset: paper); heads of 2 rows / columns, whole on each TP rank
    "embedding_unit": ("row_unit", (V, d), 0, False, False),
    "output_centered_unit": ("centered_row_unit", (V, d), 0, False, False),  # mean over vocab spans TP
    "router_nuclear": ("left_polar_nuclear", (E, d), None, False, False),
    "qkv_heads": ("spectral_heads", (12, d), 0, False, False),
    "proj_heads": ("spectral_heads", (d, 12), 1, False, False),
}
HEAD_DIM = 2


def full_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=g) for name, (_, shape, *_rest) in BLOCKS.items()}


def shard(name, t, tp, tp_rank, ep, ep_rank):
    rule, _, dim, expert, gated = BLOCKS[name]
    if expert:
        t = t.chunk(ep, dim=0)[ep_rank]
    if dim is None or tp == 1:
        return t
    if gated:  # each rank: [gate rows of its neurons; up rows of its neurons]
        gate, up = t.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim)
    return t.chunk(tp, dim=dim)[tp_rank]


def unshard(name, t, tp, ep):
    """All-gather a shard back into the full block (inverse of :func:`shard`)."""
    rule, _, dim, expert, gated = BLOCKS[name]
    if dim is not None and tp > 1:
        group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        if gated:
            halves = [p.chunk(2, dim=dim) for p in parts]
            t = torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)],
                          dim=dim)
        else:
            t = torch.cat(parts, dim=dim)
    if expert and ep > 1:
        parts = [torch.empty_like(t) for _ in range(ep)]
        dist.all_gather(parts, t.contiguous(), group=ps.get_expert_model_parallel_group())
        t = torch.cat(parts, dim=0)
    return t


def two_steps(params, grads_list, pg_collection):
    opt = SymmetricMuon(list(params.values()), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                        fp32_matmul_prec="highest", extra_scale_factor=0.2, pg_collection=pg_collection,
                        tp_mode="duplicated")
    for grads in grads_list:
        for name, p in params.items():
            p.grad = grads[name].clone()
        opt.step()
    return {name: p.detach() for name, p in params.items()}


def make_params(weights, tp, tp_rank, ep, ep_rank, sharded):
    params = {}
    for name, w in weights.items():
        rule, _, dim, expert, gated = BLOCKS[name]
        p = torch.nn.Parameter((shard(name, w, tp, tp_rank, ep, ep_rank) if sharded else w).clone())
        p.symmetry_rule, p.glu_halves, p.expert_tp = rule, gated, expert
        p.head_dim, p.head_layout = HEAD_DIM, "rows" if dim == 0 else "cols"
        p.tensor_model_parallel = sharded and dim is not None and tp > 1
        p.partition_dim = dim if p.tensor_model_parallel else -1
        params[name] = p
    return params


def main():
    dist.init_process_group("gloo")
    weights, grads = full_tensors(0), [full_tensors(1), full_tensors(2)]
    reference = two_steps(make_params(weights, 1, 0, 1, 0, sharded=False), grads, None)
    results = []
    for layout, tp, ep in [("dp2", 1, 1), ("ep2", 1, 2), ("tp2", 2, 1)]:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=tp)
        tp_rank, ep_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
        params = make_params(weights, tp, tp_rank, ep, ep_rank, sharded=True)
        local_grads = [{n: shard(n, g[n], tp, tp_rank, ep, ep_rank) for n in BLOCKS} for g in grads]
        updated = two_steps(params, local_grads, ProcessGroupCollection.use_mpu_process_groups())
        errors = {}
        for name in BLOCKS:
            whole = unshard(name, updated[name], tp, ep)
            moved = (reference[name] - weights[name]).abs().max().item()
            errors[name] = [(whole - reference[name]).abs().max().item(), moved]
        results.append({"layout": layout, "rank": dist.get_rank(), "errors": errors})
        ps.destroy_model_parallel()
    for r in results:  # one rank at a time on its own stream: lines never interleave
        print(json.dumps(r), file=sys.stdout if dist.get_rank() == 0 else sys.stderr)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
