"""GroupedExperts on the GPU: torch._grouped_mm (CUTLASS in bf16 on Hopper) against the per-expert loop.

bf16 outputs and gradients of two GEMM chains differ by rounding only: compared with a relative L2 error
below 2e-2 (bf16 carries 8 bits of mantissa; the two paths accumulate in different orders).
"""

import pytest
import torch


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("counts", [[512, 0, 300, 1234], [1, 2, 3, 4]])
def test_grouped_experts_match_sequential_mlp_in_bf16(device, counts):
    from moe_erc.model import gpt as model_lib
    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    base = ["model.num_layers=1", "model.hidden_size=128", "model.num_attention_heads=4", "moe.num_experts=4",
            "moe.moe_ffn_hidden_size=256", f"training.device={device}"]
    parallel.initialize(load_config(None, base), prepare_runtime(device))
    try:
        experts = []
        for grouped in ("false", "true"):
            cfg = load_config(None, [*base, f"moe.moe_grouped_gemm={grouped}"])
            parallel.set_seed(cfg.training.seed)
            net = model_lib.build_model(cfg, model_lib.transformer_config(cfg, "bf16"), vocab_size=128)
            experts.append(net.decoder.layers[0].mlp.experts)
        sequential, grouped = experts
        assert torch.equal(grouped.weight1[0].cpu(), sequential.local_experts[0].linear_fc1.weight.cpu())
        x = torch.randn(sum(counts), 128, device=grouped.weight1.device, dtype=torch.bfloat16)
        probs = torch.rand(sum(counts), device=x.device)
        outs, grads = [], []
        for module in (sequential, grouped):
            xi = x.clone().requires_grad_()
            out, _ = module(xi, torch.tensor(counts), probs)
            out.backward(torch.ones_like(out))
            outs.append(out)
            grads.append(xi.grad)
        assert outs[1].device == x.device and outs[1].dtype == torch.bfloat16
        assert _rel(outs[1], outs[0]) < 2e-2 and _rel(grads[1], grads[0]) < 2e-2
        for e, expert in enumerate(sequential.local_experts):
            if counts[e]:  # an expert without tokens has zero gradients in both
                assert _rel(grouped.weight1.grad[e], expert.linear_fc1.weight.grad) < 2e-2
                assert _rel(grouped.weight2.grad[e], expert.linear_fc2.weight.grad) < 2e-2
            else:
                assert not grouped.weight1.grad[e].any()
    finally:
        parallel.destroy()
