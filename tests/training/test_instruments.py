"""Instruments against hand computations: MaxVio, tokens per expert, dead experts, cosine, the coupling
scores (rank correlation and top-K overlap), the token sample, and the recompute guard of the router hook.
Layout independence (DP/EP/TP vs one process): tests/training/test_instruments_layouts.py."""

import json
import math

import pytest
import torch

from moe_erc.training import instruments


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


# ------------------------------------------------------------------------------------------------
# The coupling score as functions


def _spearman_loop(a, b):
    """Float64 loop: Spearman of two lists without ties, 1 - 6 sum d^2 / (n (n^2 - 1))."""
    n = len(a)
    rank_a = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: a[i]))}
    rank_b = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: b[i]))}
    return 1 - 6 * sum((rank_a[i] - rank_b[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def _overlap_loop(selected, norms):
    chosen = [i for i, s in enumerate(selected) if s]
    largest = sorted(range(len(norms)), key=lambda i: -norms[i])[: len(chosen)]
    return len(set(chosen) & set(largest)) / len(chosen)


def test_ranks_average_ties_and_spearman_matches_the_textbook_formula():
    assert instruments.average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == [[2.5, 0.0, 2.5, 1.0]]
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    norms = torch.tensor([[10.0, 30.0, 20.0, 40.0], [4.0, 3.0, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]])
    rho = instruments.spearman_rows(scores, norms)
    assert rho[:3].tolist() == pytest.approx([0.8, -1.0, 1.0], abs=1e-12)  # 1 - 6 * 2 / (4 * 15) = 0.8
    assert math.isnan(rho[3])  # a constant row has no ranking
    # with ties: Pearson of the average ranks [0, 1.5, 1.5, 3] and [0, 1, 2, 3]
    tied = instruments.spearman_rows(torch.tensor([[1.0, 2.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert tied.item() == pytest.approx(4.5 / math.sqrt(4.5 * 5.0), abs=1e-12)
    # only orderings count: softmax, sigmoid, temperature or a cosine give the same value as the logits
    g = torch.Generator().manual_seed(0)
    logits, gate = torch.randn(50, 8, generator=g), torch.rand(50, 8, generator=g)
    expected = torch.tensor([_spearman_loop(a, b) for a, b in zip(logits.tolist(), gate.tolist())], dtype=torch.float64)
    for transformed in (logits, logits.softmax(-1), torch.sigmoid(logits), logits / 0.5 + 1):
        assert torch.allclose(instruments.spearman_rows(transformed, gate), expected, atol=1e-12)
    assert torch.allclose(instruments.spearman_rows(logits, gate * 7.0), expected, atol=1e-12)


def test_topk_overlap_of_known_rows():
    selected = torch.tensor([[True, True, False, False], [False, False, True, True], [False, False, False, True],
                             [False, False, False, False]])
    norms = torch.tensor([[5.0, 1.0, 4.0, 0.0], [0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    overlap = instruments.topk_overlap(selected, norms)
    assert overlap[:3].tolist() == [0.5, 1.0, 0.0] and math.isnan(overlap[3])
    g = torch.Generator().manual_seed(1)
    norms = torch.rand(40, 6, generator=g)
    selected = torch.zeros(40, 6, dtype=torch.bool).scatter_(1, torch.rand(40, 6, generator=g).topk(2).indices, True)
    expected = [_overlap_loop(s, v) for s, v in zip(selected.tolist(), norms.tolist())]
    assert instruments.topk_overlap(selected, norms).tolist() == pytest.approx(expected, abs=0)


def test_token_sample_is_seeded_spread_over_all_positions_and_split_exactly_over_shards():
    seq, batch, count = 64, 4, 64
    sample = instruments.coupling_sample(seq, batch, count, seed=5)
    assert sample.tolist() == instruments.coupling_sample(seq, batch, count, seed=5).tolist()  # same on every rank
    assert sample.tolist() != instruments.coupling_sample(seq, batch, count, seed=6).tolist()
    assert len(set(sample.tolist())) == count and sample.tolist() != list(range(count))  # not the first rows
    positions = sample // batch
    assert int(positions.max()) >= seq * 7 // 8 and int((positions >= seq // 2).sum()) >= count // 4
    assert set((sample % batch).tolist()) == set(range(batch))  # every sequence of the micro-batch
    # sequence parallelism: each of 2 ranks holds half of the positions and measures exactly its share
    halves = [instruments.local_rows(sample, batch, first, seq // 2) for first in (0, seq // 2)]
    back = torch.cat([halves[0], halves[1] + (seq // 2) * batch])
    assert back.tolist() == sample.tolist()
    assert instruments.coupling_sample(8, 2, 1000, seed=5).tolist() == list(range(16))  # fewer tokens: all


# ------------------------------------------------------------------------------------------------
# The hook on a real model (world size 1)


@pytest.fixture(scope="module")
def env():
    """Parallel state of one process (world size 1), torn down after the module."""
    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    device = prepare_runtime("cpu")
    parallel.initialize(load_config(None, []), device)
    yield
    parallel.destroy()


def _build(*overrides, num_layers=2):
    from moe_erc.model import gpt as model_lib
    from moe_erc.config import load_config

    cfg = load_config(None, ["model.hidden_size=16", "model.num_attention_heads=2", "moe.num_experts=4",
                             "moe.moe_router_topk=1", "moe.moe_router_pre_softmax=true", "moe.moe_ffn_hidden_size=8",
                             f"model.num_layers={num_layers}", "model.seq_length=8", *overrides])
    model = model_lib.build_model(cfg, model_lib.transformer_config(cfg), vocab_size=32)
    return model, [m for _, m in instruments._routers([model])]


@pytest.fixture(scope="module")
def monitored_model(env):
    """A 2-layer MoE GPT (4 experts, top-1) with a RoutingMonitor attached."""
    model, _ = _build()
    monitor = instruments.RoutingMonitor([model], num_layers=2, num_experts=4, seed=3)
    yield model, monitor
    monitor.close()


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


class _StubRouter(torch.nn.Module):
    """Returns the routing map it is given (no gating: the coupling score skips it)."""

    def forward(self, routing_map):
        return routing_map.float(), routing_map


def test_window_step_and_validation_loads_of_hand_made_routing_maps(env):
    """Hand-made maps through the hook: the window sums two steps, MaxVio is the last step's, dead experts
    are those of the whole window, validation MaxVio is over all validation batches."""
    layer = torch.nn.Module()
    layer.router, layer.experts = _StubRouter(), torch.nn.Identity()
    layer.router.layer_number = 1
    monitor = instruments.RoutingMonitor([layer], num_layers=1, num_experts=5)
    maps = {  # tokens x experts, top-2
        "step1a": [[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 0, 0]],
        "step1b": [[0, 1, 1, 0, 0]],
        "step2": [[1, 0, 0, 1, 0], [1, 0, 0, 1, 0]],
        "valid1": [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]],
        "valid2": [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]],
    }
    route = {k: torch.tensor(v, dtype=torch.bool) for k, v in maps.items()}
    layer.train()
    layer.router(route["step1a"])
    layer.router(route["step1b"])  # two micro-batches of step 1
    first = monitor.train_stats(end_of_window=False)
    assert first == {"maxvio": [pytest.approx((3 - 1.6) / 1.6)]}  # loads [3, 3, 2, 0, 0], mean 8/5
    monitor.step_counts.zero_()  # what the trainer does at the start of every step
    layer.router(route["step2"])
    second = monitor.train_stats(end_of_window=True)
    assert second["tokens_per_expert"] == [[5.0, 3.0, 2.0, 2.0, 0.0]]  # the window: steps 1 and 2
    assert second["dead_experts"] == [1.0]
    assert second["maxvio"] == [pytest.approx((2 - 0.8) / 0.8)]  # step 2 alone: [2, 0, 0, 2, 0]
    layer.eval()
    monitor.start_validation()
    layer.router(route["valid1"])
    layer.router(route["valid2"])
    valid = monitor.valid_stats()
    assert valid["maxvio_global"] == [pytest.approx((3 - 1.6) / 1.6)]  # [1, 1, 1, 3, 2]
    assert valid["coupling"] == [None] and valid["coupling_topk"] == [None]  # no router scores, no score
    monitor.close()


@pytest.mark.parametrize("recompute", ["torch-reentrant", "torch-non-reentrant", "megatron"])
def test_activation_recompute_does_not_count_tokens_twice(monitored_model, recompute, tmp_path):
    """Under activation checkpointing the router's forward runs again inside backward; the hook must not
    count (or trace) the tokens a second time."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    from megatron.core import tensor_parallel

    model, monitor = monitored_model
    layer = _layers(model)[1]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 2, 16, generator=g, requires_grad=True)
    model.train()
    monitor.train_stats(end_of_window=True)  # empty the window
    monitor.trace_path, monitor.trace_interval = tmp_path / "trace.jsonl", 1  # trace this step

    def run(hidden):
        probs, _ = layer.router(hidden)
        return probs

    if recompute == "megatron":
        probs = tensor_parallel.checkpoint(run, False, x)
    else:  # non-reentrant: without early stop, the recomputation runs the whole function (hooks included)
        with set_checkpoint_early_stop(False):
            probs = checkpoint(run, x, use_reentrant=recompute == "torch-reentrant")
    (probs * torch.arange(1.0, 5.0)).sum().backward()
    with torch.no_grad():
        _, expected = layer.router.__class__.forward(layer.router, x.detach())  # one forward, no hook
    stats = monitor.train_stats(end_of_window=True)
    assert stats["tokens_per_expert"][1] == expected.sum(0).double().tolist()
    assert sum(stats["tokens_per_expert"][1]) == 32  # 32 tokens, top-1: not 64
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [row["layer"] for row in trace] == [2]  # traced once
    monitor.trace_path, monitor.trace_interval = None, 0


def _coupling(monitor, layer, hidden):
    """Validation pass of one layer's router on ``hidden``: (coupling, coupling_topk) of its layer."""
    number = layer.router.layer_number
    layer.router.eval()
    monitor.start_validation()
    with torch.no_grad():
        layer.router(hidden)
    stats = monitor.valid_stats()
    layer.router.train()
    return stats["coupling"][number - 1], stats["coupling_topk"][number - 1]


def _set_coupling_tokens(monitor, count):
    monitor.coupling_tokens = count
    monitor._samples.clear()


def test_a_perfectly_coupled_layer_scores_one(monitored_model):
    """Real router and experts set by hand: expert j's gate has one row, the router row R_j, and tokens and
    R are positive, so ||x Wg_j|| = x . R_j = the router's logit for j for every token."""
    model, monitor = monitored_model
    layer = _layers(model)[0]
    g = torch.Generator().manual_seed(2)
    router_rows = torch.rand(4, 16, generator=g) + 0.1
    with torch.no_grad():
        layer.router.weight.copy_(router_rows)
        for j, expert in enumerate(layer.experts.local_experts):
            expert.linear_fc1.weight.zero_()
            expert.linear_fc1.weight[0] = router_rows[j]  # gate half first (SwiGLU)
    _set_coupling_tokens(monitor, 64)
    rank_corr, overlap = _coupling(monitor, layer, torch.rand(32, 4, 16, generator=g))
    assert rank_corr == 1.0 and overlap == 1.0


def _route(router, x):
    """The routing map of ``x`` [T, d] in evaluation mode, without the hooks."""
    router.eval()
    with torch.no_grad():
        routing_map = type(router).forward(router, x.unsqueeze(1))[1]
    router.train()
    return routing_map


def _hand_coupling(monitor, hidden, scores_fn, norms_fn, selected_fn):
    """Float64 loops over the tokens the monitor samples from ``hidden`` [s, b, d]."""
    s, b, d = hidden.shape
    rows = instruments.coupling_sample(s, b, monitor.coupling_tokens, monitor.seed)
    x = hidden.reshape(-1, d)[rows]
    scores, norms, selected = scores_fn(x).tolist(), norms_fn(x).tolist(), selected_fn(x).tolist()
    rho = [_spearman_loop(a, v) for a, v in zip(scores, norms)]
    overlap = [_overlap_loop(c, v) for c, v in zip(selected, norms)]
    return sum(rho) / len(rho), sum(overlap) / len(overlap)


def test_a_random_layer_scores_zero_and_top_k_at_chance(monitored_model):
    """Independent random router and gate weights: rank correlation about 0, top-1 overlap about 1/4; both
    equal to float64 loops over the sampled tokens."""
    model, monitor = monitored_model
    layer = _layers(model)[0]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer.router.weight.normal_(generator=g)
        for expert in layer.experts.local_experts:
            expert.linear_fc1.weight.normal_(generator=g)
    _set_coupling_tokens(monitor, 4096)
    hidden = torch.randn(1024, 4, 16, generator=g)
    rank_corr, overlap = _coupling(monitor, layer, hidden)
    gates = [e.linear_fc1.weight.detach()[:8].double() for e in layer.experts.local_experts]
    expected = _hand_coupling(
        monitor, hidden, lambda x: x.double() @ layer.router.weight.detach().double().t(),
        lambda x: torch.stack([(x.double() @ w.t()).norm(dim=-1) for w in gates], dim=1),
        lambda x: _route(layer.router, x))
    assert (rank_corr, overlap) == pytest.approx(expected, abs=1e-9)
    # chance levels (std over 4096 tokens: 0.009 and 0.007)
    assert abs(rank_corr) < 0.04 and abs(overlap - 0.25) < 0.03


def test_aoe_is_not_coupled_by_construction_and_keeps_its_cache(env):
    """AoE's router scores are the norms of the low-rank gate slices x Wdown_j; the gate activation is
    (x Wdown_j) Wup_j. On random weights they agree only as far as Wup_j preserves norms: a value between
    0 and 1, equal to float64 loops, and the router's cached activation for its experts is left alone."""
    model, (layer,) = _build("moe.router=aoe", "moe.moe_router_topk=2", "moe.aoe_rank=2", num_layers=1)
    monitor = instruments.RoutingMonitor([model], num_layers=1, num_experts=4, coupling_tokens=1024, seed=11)
    router, experts = layer.router, layer.experts
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(256, 4, 16, generator=g)
    rank_corr, overlap = _coupling(monitor, layer, hidden)
    r = router.rank
    down = router.down.detach().double().view(4, r, 16)
    up = experts.up_gate.detach().double()
    expected = _hand_coupling(
        monitor, hidden, lambda x: torch.stack([(x.double() @ down[j].t()).norm(dim=-1) for j in range(4)], 1),
        lambda x: torch.stack([(x.double() @ down[j].t() @ up[j].t()).norm(dim=-1) for j in range(4)], 1),
        lambda x: _route(router, x))
    assert (rank_corr, overlap) == pytest.approx(expected, abs=1e-9)
    assert 0.5 < rank_corr < 0.95, rank_corr  # coupled by design (low-rank norms), but not 1 by construction
    # the hook's scoring pass did not replace the router's cache with the sampled tokens' activations
    router.eval()
    with torch.no_grad():
        router.gating(hidden.reshape(-1, 16))
        cache = router.cached_low
        monitor.start_validation()
        router(hidden)
        assert router.cached_low.shape == cache.shape and torch.equal(router.cached_low, cache)
    monitor.valid_stats()
    monitor.close()
