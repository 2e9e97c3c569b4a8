"""Run under torchrun with 2 processes: ERC loss and gradients in several layouts vs one process.

For each layout, every rank evaluates the distributed ERC on its shard of a fixed random layer, reduces
gradients the way megatron's DDP and finalize_model_grads do (every gradient times 1/DP; router: summed
over DP, then over TP under sequence parallelism; experts: summed over expert-DP), and compares with the
single-process computation of the full layer.
Prints one JSON line per layout: {"layout", "loss", "loss_ref", "router_err", "expert_err"}.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from moe_erc.compat import prepare_runtime

prepare_runtime("cpu")
from megatron.core import parallel_state as ps  # noqa: E402

from moe_erc.model import erc  # noqa: E402
from moe_erc.model.layers.erc_layer import distributed_activation_matrix, gradient_scales  # noqa: E402

N, d, D, ALPHA = 8, 12, 10, 0.5


def layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randn(N, D, d, generator=g)


def reference(R, W, noise_seed):
    R = R.clone().requires_grad_()
    W = W.clone().requires_grad_()
    P = erc.proxy_tokens(R, erc.noise_bounds(R), torch.Generator().manual_seed(noise_seed))
    loss = erc.erc_loss_from_matrix(erc.activation_matrix(P, W), ALPHA)
    loss.backward()
    return loss.item(), R.grad, W.grad


def distributed(R, W, noise_seed, tp, ep):
    sp = tp > 1
    etp_rank, ep_rank = ps.get_expert_tensor_parallel_rank(), ps.get_expert_model_parallel_rank()
    per_rank, shard = N // ep, D // tp
    experts = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
    rows = slice(etp_rank * shard, (etp_rank + 1) * shard)
    R = R.clone().requires_grad_()
    local = [W[j, rows].clone().requires_grad_() for j in experts]
    P = erc.proxy_tokens(R, erc.noise_bounds(R), torch.Generator().manual_seed(noise_seed))
    M = distributed_activation_matrix(
        P, local, expert_tp_group=ps.get_expert_tensor_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        expert_group=ps.get_expert_tensor_and_model_parallel_group(), **gradient_scales(sp))
    loss = erc.erc_loss_from_matrix(M, ALPHA)
    loss.backward()
    dp = ps.get_data_parallel_world_size()
    router_grad = R.grad / dp
    dist.all_reduce(router_grad, group=ps.get_data_parallel_group())
    if sp:
        dist.all_reduce(router_grad, group=ps.get_tensor_model_parallel_group())
    expert_grads = {}
    for j, w in zip(experts, local):
        grad = w.grad / dp
        dist.all_reduce(grad, group=ps.get_expert_data_parallel_group())
        expert_grads[j] = grad
    return loss.item(), router_grad, expert_grads, rows


def main():
    dist.init_process_group("gloo")
    R, W = layer()
    results = []
    for name, tp, ep in [("dp2", 1, 1), ("ep2", 1, 2), ("tp2", 2, 1)]:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=tp)
        loss_ref, router_ref, expert_ref = reference(R, W, noise_seed=17)
        loss, router, experts, rows = distributed(R, W, 17, tp, ep)
        expert_err = max(float((g - expert_ref[j, rows]).abs().max()) for j, g in experts.items())
        results.append({"layout": name, "rank": dist.get_rank(), "loss": loss, "loss_ref": loss_ref,
                        "router_err": float((router - router_ref).abs().max()),
                        "router_scale": float(router_ref.abs().max()), "expert_err": expert_err,
                        "expert_scale": float(expert_ref.abs().max())})
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        for r in results:
            print(json.dumps(r))
    else:
        for r in results:
            print(json.dumps(r), file=sys.stderr)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
