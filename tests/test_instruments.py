"""Instruments on hand-made routing: known MaxVio, dead experts, cosine, and the coupling score."""

import math

import pytest
import torch

from moe_erc import instruments


def test_maxvio_of_known_loads():
    counts = torch.tensor([[4.0, 4.0, 4.0, 4.0], [8.0, 4.0, 2.0, 2.0], [0.0, 0.0, 0.0, 12.0]])
    assert instruments.maxvio(counts).tolist() == pytest.approx([0.0, 1.0, 3.0])


def test_router_cosine_of_known_rows():
    orthogonal = torch.eye(3)
    assert instruments.router_cosine(orthogonal) == pytest.approx(0.0)
    parallel = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    assert instruments.router_cosine(parallel) == pytest.approx(1.0)
    sixty = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert instruments.router_cosine(sixty) == pytest.approx(0.5)


def test_coupling_statistics_are_pearson_correlations():
    g = torch.Generator().manual_seed(0)
    stats = instruments.CouplingStats(num_layers=2, num_experts=3)
    for expert in range(3):
        s = torch.rand(500, generator=g)
        stats.add(1, torch.full((500,), expert), s, 3 * s + 1)                       # perfectly coupled
        stats.add(2, torch.full((500,), expert), s, torch.rand(500, generator=g))   # independent
    coupled, random = stats.correlation().tolist()
    assert coupled == pytest.approx(1.0, abs=1e-9)
    assert abs(random) < 0.15


@pytest.fixture(scope="module")
def monitored_model():
    """A 2-layer MoE GPT in this process (world size 1) with a RoutingMonitor attached."""
    from moe_erc import model as model_lib, parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    device = prepare_runtime("cpu")
    cfg = load_config(None, ["model.hidden_size=16", "model.num_attention_heads=2", "moe.num_experts=4",
                             "moe.moe_router_topk=1", "moe.moe_router_pre_softmax=true", "moe.moe_ffn_hidden_size=8", "model.num_layers=2",
                             "model.seq_length=8"])
    parallel.initialize(cfg, device)
    model = model_lib.build_model(cfg, model_lib.transformer_config(cfg), vocab_size=32)
    monitor = instruments.RoutingMonitor([model], num_layers=2, num_experts=4)
    yield model, monitor
    monitor.close()
    parallel.destroy()


def _layers(model):
    return [m for _, m in instruments._routers([model])]


def test_hooks_count_tokens_dead_experts_and_maxvio(monitored_model):
    """Route hand-made hidden states: layer 1 sends everything to expert 2, layer 2 spreads 3/1/0/0."""
    model, monitor = monitored_model
    first, second = _layers(model)
    with torch.no_grad():
        first.router.weight.zero_()
        first.router.weight[2, 0] = 1.0
        second.router.weight.copy_(torch.eye(4, 16) * 5)
    x1 = torch.zeros(4, 1, 16)
    x1[:, 0, 0] = 1.0
    x2 = torch.zeros(4, 1, 16)
    x2[[0, 1, 2], 0, 0] = 1.0
    x2[3, 0, 1] = 1.0
    model.train()
    first.router(x1)
    second.router(x2)
    stats = monitor.train_stats(end_of_window=True)
    assert stats["tokens_per_expert"] == [[0.0, 0.0, 4.0, 0.0], [3.0, 1.0, 0.0, 0.0]]
    assert stats["dead_experts"] == [3.0, 2.0]
    assert stats["maxvio"] == pytest.approx([3.0, 2.0])
    assert stats["router_cosine"][1] == pytest.approx(0.0)


def test_coupling_is_high_when_gate_norms_follow_router_scores(monitored_model):
    model, monitor = monitored_model
    layer = _layers(model)[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(4, 16, generator=g))
    hidden = torch.randn(64, 1, 16, generator=g)

    class CoupledExperts(torch.nn.Module):  # gate norm = 10 x the router's softmax score: perfectly coupled
        def gate_activation_norms(self, x):
            return 10 * torch.softmax(layer.router.gating(x).float(), dim=-1)

    class RandomExperts(torch.nn.Module):
        def gate_activation_norms(self, x):
            return torch.rand(x.shape[0], 4, generator=g)

    results = {}
    real = layer.experts
    model.eval()
    for name, experts in (("coupled", CoupledExperts()), ("random", RandomExperts())):
        layer.experts = experts
        monitor.start_validation()
        with torch.no_grad():
            layer.router(hidden)
        results[name] = monitor.valid_stats()["coupling"][0]
    layer.experts = real
    model.train()
    assert results["coupled"] == pytest.approx(1.0, abs=1e-6)
    assert abs(results["random"]) < 0.35
