"""Autonomy-of-Experts: scores are gate norms, cached and recomputed paths agree, training and layouts."""

import pytest
import torch

from launch import losses, train


@pytest.fixture(scope="module")
def aoe_layer():
    """One AoE MoE layer built by megatron from our spec, in this process (world size 1)."""
    from moe_erc.model import gpt as model_lib
    from moe_erc.training import parallel
    from moe_erc.model.layers import routers
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config
    from moe_erc.model.layers.routers.aoe import AoEExperts, AoERouter

    device = prepare_runtime("cpu")
    cfg = load_config(None, ["moe.router=aoe", "model.hidden_size=24", "model.num_attention_heads=2",
                             "moe.num_experts=4", "moe.moe_router_topk=2", "moe.moe_ffn_hidden_size=16",
                             "model.num_layers=1", "model.seq_length=8", "moe.aoe_rank=5"])
    parallel.initialize(cfg, device)
    model = model_lib.build_model(cfg, model_lib.transformer_config(cfg), vocab_size=64)
    layer = next(m for m in model.modules() if isinstance(getattr(m, "router", None), AoERouter))
    assert isinstance(layer.experts, AoEExperts)
    yield cfg, model, layer
    parallel.destroy()


def test_aoe_has_no_router_matrix_and_matches_parameters(aoe_layer):
    cfg, model, layer = aoe_layer
    names = [n for n, _ in layer.named_parameters()]
    assert "router.weight" not in names and "router.down" in names
    d, r, n = 24, 5, 4
    width = layer.experts.width
    aoe_expert = d * r + r * width + 2 * d * width
    # D' rounded to a multiple of 8 (aligned rows for the grouped GEMM): within 4 columns of a match
    assert width % 8 == 0 and abs(aoe_expert - (d + 3 * d * 16)) <= 4 * (r + 2 * d)


def test_default_aoe_widths_are_aligned_for_the_grouped_gemm():
    from moe_erc.config import load_config
    from moe_erc.model.layers.routers.aoe import aoe_rank, aoe_width

    for d, D in [(256, 128), (128, 256), (1536, 768), (24, 16)]:
        cfg = load_config(None, ["moe.router=aoe", f"model.hidden_size={d}", f"moe.moe_ffn_hidden_size={D}"])
        r, w = aoe_rank(cfg), aoe_width(cfg)
        assert r % 8 == 0 and w % 8 == 0 and abs(r - d / 3) <= 4, (d, D, r, w)
        exact = (d + 3 * d * D - d * r) / (r + 2 * d)  # the parameter-matching width
        assert abs(w - exact) <= 4 or (w == 8 and exact < 8), (d, D, w, exact)


def test_scores_are_norms_of_each_experts_low_rank_slice(aoe_layer):
    _, _, layer = aoe_layer
    router = layer.router
    x = torch.randn(6, 24)
    scores = router.gating(x)
    down = router.down.detach().view(4, 5, 24)
    expected = torch.stack([(x @ down[i].t()).norm(dim=-1) for i in range(4)], dim=1)
    assert torch.allclose(scores, expected, atol=1e-6)
    probs, routing_map = router(x)
    top2 = expected.topk(2, dim=1).indices
    assert torch.equal(routing_map.nonzero()[:, 1].view(6, 2).sort(1).values, top2.sort(1).values)
    # The reference (trestad/Autonomy-of-Experts AoE.py): softmax over all n norms, top-K, no renormalising.
    assert torch.allclose(probs.gather(1, top2), expected.softmax(dim=1).gather(1, top2), atol=1e-6)
    assert not torch.allclose(probs.sum(1), torch.ones(6))  # not renormalised over the selected


def test_softmax_over_the_selected_norms_is_an_option():
    from moe_erc.model import gpt as model_lib
    from moe_erc.config import load_config

    base = ["moe.router=aoe", "model.hidden_size=24", "model.num_attention_heads=2", "moe.num_experts=4"]
    assert model_lib.transformer_config(load_config(None, base)).moe_router_pre_softmax is True
    option = load_config(None, [*base, "moe.moe_router_pre_softmax=false"])
    assert model_lib.transformer_config(option).moe_router_pre_softmax is False
    assert model_lib.transformer_config(load_config(None, [])).moe_router_pre_softmax is False  # top-k


def test_scores_keep_the_sequence_and_batch_dims_for_the_per_sequence_aux_loss(aoe_layer, monkeypatch):
    """megatron's routing reads ``seq_length, bsz = logits.shape[:2]``; [T, n] scores made it divide the
    per-sequence aux loss by n instead of the batch size."""
    _, _, layer = aoe_layer
    router = layer.router
    seen = []
    original = router._apply_seq_aux_loss
    monkeypatch.setattr(router, "_apply_seq_aux_loss",
                        lambda probs, scores, rmap, seq_length, bsz, **kw: seen.append((seq_length, bsz))
                        or original(probs, scores, rmap, seq_length, bsz, **kw))
    x = torch.randn(5, 3, 24)  # [s, b, d]
    assert router.gating(x).shape == (5, 3, 4)
    router(x)
    assert seen == [(5, 3)]


def test_scoring_keeps_no_fp32_copy_of_the_low_rank_activations(aoe_layer):
    """In bf16 the ``[T, n*r]`` activations are kept once, in bf16 (an fp32 copy was ~1 GiB/layer at 3B)."""
    _, _, layer = aoe_layer
    router = layer.router
    x = torch.randn(64, 24, dtype=torch.bfloat16)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        with torch.autocast("cpu", enabled=False):
            down = router.down.detach().bfloat16().requires_grad_()
            original, router.down = router.down, torch.nn.Parameter(down)
            try:
                router.gating(x)
            finally:
                router.down = original
                router.cached_low = None
    big_fp32 = [t for t in kept if t.dtype == torch.float32 and t.numel() >= 64 * 4 * 5]
    assert not big_fp32, [tuple(t.shape) for t in big_fp32]


def test_cached_low_rank_activation_equals_recomputation(aoe_layer):
    """The experts' reuse of the router's cache (EP=1) gives exactly what recomputing x Wdown gives."""
    _, _, layer = aoe_layer
    hidden = torch.randn(8, 1, 24)
    out_cached, _ = layer(hidden)
    cached_ok = layer.router.cached_low is None  # consumed by the experts
    # Force recomputation: a router whose cache is never used.
    original = layer.router.forward

    def forward_without_cache(x, padding_mask=None):
        probs, routing_map = original(x, padding_mask=padding_mask)
        layer.router.cached_low = None
        return probs, routing_map

    layer.router.forward = forward_without_cache
    try:
        out_recomputed, _ = layer(hidden)
    finally:
        layer.router.forward = original
    assert cached_ok
    assert torch.allclose(out_cached, out_recomputed, atol=1e-6)
    # ... and the same gradients, into the low-rank factor Wdown (reached through the cache or the
    # recomputation) and every expert weight
    grads = []
    for out in (out_cached, out_recomputed):
        layer.zero_grad()
        out.square().sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
    assert "router.down" in grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
    layer.zero_grad()


def test_each_expert_parallel_rank_draws_its_own_experts(aoe_layer):
    """Rank 1's experts differ from rank 0's and are reproducible; weights live on the device whose
    generator the RNG tracker forks (tests/gpu/ repeats this on a GPU, where that is the CUDA device)."""
    from aoe_ranks import experts_as_ep_rank

    cfg = aoe_layer[0]
    rank0, rank1, rank0_again = (experts_as_ep_rank(cfg, r) for r in (0, 1, 0))
    for name in rank0:
        assert not torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], rank0_again[name]), name


@pytest.fixture(scope="module")
def aoe_run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("aoe") / "run"
    train(run_dir, tiny_corpus, "moe.router=aoe", "training.train_iters=10", "optimizer.lr=3e-3")
    return run_dir


def test_aoe_trains(aoe_run):
    history = losses(aoe_run)
    assert history[10] < history[1] - 0.3, history


def test_aoe_ep2_matches_one_process_and_its_checkpoint_resumes_in_one_process(aoe_run, tiny_corpus, tmp_path):
    """EP=2 logs the same losses as one process; stopped after 2 steps, its checkpoint (optimizer state
    included, resharded from EP=2 to one process) continues with the uninterrupted run's step-3 loss."""
    common = ["moe.router=aoe", "training.train_iters=3", f"checkpoint.load={aoe_run / 'checkpoints'}"]
    single, double = tmp_path / "single", tmp_path / "double"
    train(single, tiny_corpus, *common, "training.resume=none")
    train(double, tiny_corpus, *common, "training.resume=none", "training.exit_interval=2",
          "parallel.expert_model_parallel_size=2", nproc=2)
    one, two = losses(single), losses(double)
    assert sorted(two) == [1, 2]
    for step in (1, 2):
        assert two[step] == pytest.approx(one[step], rel=2e-5), (one, two)
    train(double, tiny_corpus, *common)  # resume=auto picks up the EP=2 checkpoint
    assert losses(double)[3] == pytest.approx(one[3], rel=2e-5)
