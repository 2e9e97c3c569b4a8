"""AoE experts differ between expert-parallel ranks on a GPU (tests/aoe_ranks.py explains the check).

Before the fix the weights were made on the CPU while the RNG tracker forked the CUDA generator, so every
EP rank drew the same experts. One GPU suffices: rank 0's and rank 1's initialisation run in one process.
"""

import torch

from aoe_ranks import experts_as_ep_rank


def test_each_expert_parallel_rank_draws_its_own_experts_on_the_device(device):
    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    cfg = load_config(None, ["moe.router=aoe", "model.hidden_size=64", "model.num_attention_heads=2",
                             "moe.num_experts=4", "moe.moe_ffn_hidden_size=32", "model.num_layers=1",
                             f"training.device={device}", "training.precision=bf16"])
    parallel.initialize(cfg, prepare_runtime(device))
    try:
        rank0, rank1, rank0_again = (experts_as_ep_rank(cfg, r) for r in (0, 1, 0))
    finally:
        parallel.destroy()
    for name in rank0:
        assert not torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], rank0_again[name]), name
