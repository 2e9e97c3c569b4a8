"""Online K-Means router: cosine top-K, EMA centroid update, no parameters, checkpoints, training, EP=2."""

import math
from pathlib import Path

import pytest
import torch

from launch import TINY, losses, records, train

KMEANS = ["moe.router=kmeans", "moe.moe_router_load_balancing_type=none"]


# ------------------------------------------------------------------------------------------------
# In this process (world size 1): the tiny model of the launched runs, and routers built on their own


@pytest.fixture(scope="module")
def env():
    from moe_erc.model import gpt as model_lib
    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    device = prepare_runtime("cpu")
    cfg = load_config(None, [*TINY, *KMEANS])
    parallel.initialize(cfg, device)
    yield cfg, model_lib
    parallel.destroy()


def _tiny_model(env, *overrides, vocab_size=128):
    from moe_erc.config import load_config

    cfg, model_lib = env
    cfg = load_config(None, [*TINY, *KMEANS, *overrides])
    return model_lib.build_model(cfg, model_lib.transformer_config(cfg), vocab_size=vocab_size)


def _router(env, *overrides, hidden=8, experts=4, topk=2):
    """A KMeansRouter built alone from a megatron TransformerConfig (d=8, n=4, top-2 unless overridden)."""
    from moe_erc.config import load_config
    from moe_erc.model.layers.routers.kmeans import kmeans_router_class

    _, model_lib = env
    cfg = load_config(None, [f"model.hidden_size={hidden}", "model.num_attention_heads=2", "model.num_layers=1",
                             f"moe.num_experts={experts}", f"moe.moe_router_topk={topk}", *KMEANS, *overrides])
    router = kmeans_router_class(cfg)(config=model_lib.transformer_config(cfg))
    router.set_layer_number(1)
    return router


def _routers(model):
    return [m.router for m in model.modules() if getattr(m, "router", None) is not None and hasattr(m, "experts")]


def test_router_has_no_parameters_and_checkpoints_its_centroids_as_replicated_tensors(env):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from moe_erc.config import load_config
    from moe_erc.model.layers.routers.kmeans import KMeansRouter, initial_centroids, kmeans_router_class

    model = _tiny_model(env)
    routers = _routers(model)
    assert len(routers) == 2 and all(isinstance(r, KMeansRouter) for r in routers)
    for router in routers:
        assert list(router.parameters()) == [] and not hasattr(router, "weight")
        assert router.centroids.shape == (4, 64) and router.centroids.dtype == torch.float32
        assert torch.allclose(router.centroids.norm(dim=1), torch.ones(4), atol=1e-6)
    assert not [name for name, _ in model.named_parameters() if ".router." in name]
    assert not torch.allclose(routers[0].centroids, routers[1].centroids)  # seeded per layer
    again = _routers(_tiny_model(env))  # a second build (another rank, another layout): same centroids
    assert all(torch.equal(a.centroids, b.centroids) for a, b in zip(routers, again))
    bound = kmeans_router_class(load_config(None, [*KMEANS, "training.seed=7", "moe.kmeans_momentum=0.5"]))
    assert issubclass(bound, KMeansRouter) and (bound.base_seed, bound.momentum) == (7, 0.5)
    assert not torch.equal(initial_centroids(4, 64, 7, 1), initial_centroids(4, 64, 8, 1))

    sharded = model.sharded_state_dict()
    keys = [k for k in sharded if ".router." in k]
    buffers = ("centroids", "idle_updates", "seeded_from_data")
    assert sorted(keys) == sorted(f"decoder.layers.{i}.mlp.router.{b}" for i in (0, 1) for b in buffers)
    for key in keys:
        tensor = sharded[key]
        assert isinstance(tensor, ShardedTensor)
        if key.endswith("centroids"):
            assert tuple(tensor.local_shape) == (4, 64) and tuple(tensor.global_shape)[-2:] == (4, 64)  # no TP split


def test_the_model_builds_routers_with_the_configured_momentum_and_seed(env):
    model = _tiny_model(env, "moe.kmeans_momentum=0.5", "training.seed=99")
    for router in _routers(model):
        assert router.momentum == 0.5
        assert torch.equal(router.centroids, _initial(99, router.layer_number))


def _initial(seed, layer):
    from moe_erc.model.layers.routers.kmeans import initial_centroids

    return initial_centroids(4, 64, seed, layer)


def _cosines(x, c):
    """Float64 loops: [T][n] cosine similarities."""
    def norm(v):
        return math.sqrt(sum(a * a for a in v))
    return [[sum(a * b for a, b in zip(t, ci)) / (norm(t) * norm(ci)) for ci in c] for t in x]


def test_routes_each_token_to_its_most_cosine_similar_centroids_with_softmax_gates(env):
    router = _router(env)
    router.eval()
    g = torch.Generator().manual_seed(3)
    centroids = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    router.centroids.copy_(centroids)
    # tokens of very different norms: only their direction may matter
    x = torch.randn(6, 1, 8, generator=g) * torch.tensor([0.01, 1, 100, 3, 0.5, 20]).view(6, 1, 1)
    x.requires_grad_()
    probs, routing_map = router(x)
    assert probs.shape == routing_map.shape == (6, 4) and routing_map.dtype == torch.bool
    cos = _cosines(x.detach().view(6, 8).double().tolist(), centroids.double().tolist())
    for t, row in enumerate(cos):
        top = sorted(range(4), key=lambda i: -row[i])[:2]
        assert set(routing_map[t].nonzero().flatten().tolist()) == set(top)
        z = sum(math.exp(row[i] / router.temperature) for i in top)
        for i in range(4):
            expected = math.exp(row[i] / router.temperature) / z if i in top else 0.0
            assert probs[t, i].item() == pytest.approx(expected, abs=1e-6)
    # gates reach the hidden states (softmax gates sum to 1, so weight them before summing)
    (probs * torch.arange(1.0, 5.0)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the coupling instrument's logits: cos / temperature
    assert torch.allclose(router.gating(x.detach().view(6, 8)).double(),
                          torch.tensor(cos, dtype=torch.float64) / router.temperature, atol=1e-6)


def test_expert_bias_moves_selection_but_not_gates(env):
    router = _router(env, "moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true")
    router.eval()
    g = torch.Generator().manual_seed(4)
    router.centroids.copy_(torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1))
    x = torch.randn(5, 1, 8, generator=g)
    cos = _cosines(x.view(5, 8).double().tolist(), router.centroids.double().tolist())
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 always wins a slot
    probs, routing_map = router(x)
    for t, row in enumerate(cos):
        top = [3, max(range(3), key=lambda i: row[i])]
        assert set(routing_map[t].nonzero().flatten().tolist()) == set(top)
        sig = {i: 1 / (1 + math.exp(-row[i] / router.temperature)) for i in top}
        for i in top:  # sigmoid gates normalised over the selected experts, bias-free
            assert probs[t, i].item() == pytest.approx(sig[i] / sum(sig.values()), abs=1e-6)
    # megatron's load counter for the bias update sees training forwards' non-padding tokens only
    assert router.local_tokens_per_expert.sum() == 0
    router.train()
    router(x.clone().requires_grad_(), padding_mask=torch.tensor([False, True, False, False, True]).view(5, 1))
    assert router.local_tokens_per_expert[3] == 3 and router.local_tokens_per_expert.sum() == 6


def test_ema_update_once_per_step_matches_a_hand_computation(env):
    router = _router(env)
    router.momentum = 0.9
    router.seeded_from_data.fill_(1.0)  # already seeded, and no idle re-seeding: the EMA alone
    router.reseed_steps = 0
    e = torch.eye(8)
    old = torch.stack([e[0], torch.nn.functional.normalize(e[0] + e[1], dim=0), e[1], -e[0]])
    router.centroids.copy_(old)
    g = torch.Generator().manual_seed(5)
    batches = [e[0] * 2 + 0.7 * torch.randn(7, 8, generator=g) for _ in range(2)]  # expert 3 never chosen
    padding = torch.tensor([False, False, True, False, False, True, False])  # megatron's router: True = padding
    router.train()
    # two micro-batches of one step; the second has two padding tokens, which must not count
    router(batches[0].view(7, 1, 8).clone().requires_grad_())
    router(batches[1].view(7, 1, 8).clone().requires_grad_(), padding_mask=padding.view(7, 1))
    with torch.no_grad():  # no-grad and eval forwards do not count
        router(torch.randn(7, 1, 8, generator=g))
    router.eval()
    router(torch.randn(7, 1, 8, generator=g))
    router.train()
    assert torch.equal(router.centroids, old)  # nothing moves before the step ends
    router.update_after_step()

    m, d = 0.9, 8
    sums = [[0.0] * d for _ in range(4)]
    counts = [0] * 4
    for batch, skip in zip(batches, [torch.zeros(7, dtype=torch.bool), padding]):
        rows = [r for r, pad in zip(batch.double().tolist(), skip.tolist()) if not pad]
        for t, row in zip(rows, _cosines(rows, old.double().tolist())):
            length = math.sqrt(sum(a * a for a in t))
            for i in sorted(range(4), key=lambda i: -row[i])[:2]:
                counts[i] += 1
                sums[i] = [s + a / length for s, a in zip(sums[i], t)]
    assert counts[3] == 0 and sum(counts) == 2 * 12
    for i in range(4):
        c = old[i].double().tolist()
        if counts[i]:
            v = [m * ci + (1 - m) * s / counts[i] for ci, s in zip(c, sums[i])]
            length = math.sqrt(sum(a * a for a in v))
            c = [a / length for a in v]
        assert router.centroids[i].double().tolist() == pytest.approx(c, abs=1e-6)
    assert router.tokens_per_expert.tolist() == counts
    after = router.centroids.clone()
    router.update_after_step()  # accumulators were reset: a step without forwards changes nothing
    assert torch.equal(router.centroids, after) and router.tokens_per_expert.sum() == 0


def test_centroids_survive_an_in_process_checkpoint_round_trip(env, tmp_path):
    from moe_erc.training import checkpoint

    model = _tiny_model(env)
    routers = _routers(model)
    trained = [torch.nn.functional.normalize(torch.randn(4, 64), dim=1) for _ in routers]
    for router, c in zip(routers, trained):
        router.centroids.copy_(c)
    step_dir = checkpoint.save(tmp_path, 1, [model], None, None, {"step": 1}, with_optimizer=False)
    fresh = _tiny_model(env)
    assert not torch.equal(_routers(fresh)[0].centroids, trained[0])
    checkpoint.load(step_dir, [fresh])
    for router, c in zip(_routers(fresh), trained):
        assert torch.equal(router.centroids, c)
    # a loaded router keeps its centroids even if megatron sets the layer number again
    _routers(fresh)[0].set_layer_number(1)
    assert torch.equal(_routers(fresh)[0].centroids, trained[0])


# ------------------------------------------------------------------------------------------------
# Real runs through the CLI


@pytest.fixture(scope="module")
def kmeans_run(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("kmeans") / "run"
    train(run_dir, tiny_corpus, *KMEANS, "training.train_iters=8", "optimizer.lr=3e-3")
    return run_dir


def test_kmeans_trains_and_moves_its_centroids(env, kmeans_run, tiny_corpus):
    history = losses(kmeans_run)
    assert sorted(history) == list(range(1, 9)) and all(math.isfinite(v) for v in history.values())
    assert history[8] < history[1] - 0.3, history
    valid = records(kmeans_run, "valid")
    assert valid[-1]["lm_loss"] < valid[0]["lm_loss"] - 0.2

    # the saved checkpoint holds trained centroids (unit, moved from their seeded start), loaded by the
    # same function resume uses
    from moe_erc.training import checkpoint
    from moe_erc.data.tokenizer import resolve_tokenizer
    from moe_erc.model.gpt import padded_vocab_size
    from moe_erc.model.layers.routers.kmeans import initial_centroids

    cfg, _ = env
    vocab = padded_vocab_size(resolve_tokenizer([tiny_corpus], None).vocab_size, cfg)
    model = _tiny_model(env, vocab_size=vocab)
    checkpoint.load(checkpoint.resolve(kmeans_run / "checkpoints"), [model])
    for router in _routers(model):
        start = initial_centroids(4, 64, cfg.training.seed, router.layer_number)
        assert torch.allclose(router.centroids.norm(dim=1), torch.ones(4), atol=1e-5)
        assert (router.centroids - start).abs().max() > 1e-3


def test_ep2_matches_one_process_which_resumes_with_its_centroids(kmeans_run, tiny_corpus, tmp_path):
    """Both load the trained checkpoint: validation before any step equals the run's last validation (the
    centroids came back); EP=2 logs the same losses as one process (the centroid update is reduced over
    the ranks holding different tokens); one process stopped after step 2 and resumed logs EP=2's step 3
    (centroids restored on resume)."""
    common = [*KMEANS, "training.train_iters=3", f"checkpoint.load={kmeans_run / 'checkpoints'}"]
    single, double = tmp_path / "single", tmp_path / "double"
    train(single, tiny_corpus, *common, "training.resume=none", "training.exit_interval=2")
    train(double, tiny_corpus, *common, "training.resume=none", "parallel.expert_model_parallel_size=2", nproc=2)
    trained_valid = records(kmeans_run, "valid")[-1]["lm_loss"]
    assert records(single, "valid")[0]["lm_loss"] == pytest.approx(trained_valid, rel=1e-7)
    assert records(double, "valid")[0]["lm_loss"] == pytest.approx(trained_valid, rel=2e-5)
    assert sorted(losses(single)) == [1, 2]
    train(single, tiny_corpus, *common)  # resume=auto: from its step-2 checkpoint
    one, two = losses(single), losses(double)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        assert one[step] == pytest.approx(two[step], rel=2e-5), (step, one, two)


def _normalised_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.reshape(-1, x.shape[-1]).float(), dim=-1)


def _is_one_of(row: torch.Tensor, rows: torch.Tensor) -> bool:
    return bool(torch.isclose(rows, row.unsqueeze(0), atol=1e-6).all(dim=1).any())


def test_the_first_update_seeds_every_centroid_from_a_sampled_token(env):
    """Random unit vectors have cosine ~1/sqrt(d) with every token: the first update replaces them by
    tokens of the step's first sequence (positions drawn from a seeded generator)."""
    router = _router(env)
    router.train()
    g = torch.Generator().manual_seed(11)
    first = torch.randn(7, 2, 8, generator=g)  # [s, b, d]: the first sequence is batch row 0
    router(first.clone().requires_grad_())
    router(torch.randn(7, 2, 8, generator=g).requires_grad_())  # a second micro-batch is not sampled
    random_start = router.centroids.clone()
    router.update_after_step()
    candidates = _normalised_rows(first[:, 0])
    for i in range(4):
        assert _is_one_of(router.centroids[i], candidates), i
        assert not torch.allclose(router.centroids[i], random_start[i])
    assert router.seeded_from_data.item() == 1.0


def test_a_centroid_idle_for_the_window_is_reseeded_from_a_token(env):
    router = _router(env)
    router.seeded_from_data.fill_(1.0)
    router.reseed_steps = 2
    e = torch.eye(8)
    router.centroids.copy_(torch.stack([e[0], e[1], e[2], -e[0]]))  # expert 3 faces away from every token
    router.train()
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        tokens = (e[0] + e[1] + e[2]) + 0.1 * torch.randn(5, 1, 8, generator=g)
        router(tokens.clone().requires_grad_())
        before = router.centroids[3].clone()
        router.update_after_step()
        if step == 0:
            assert torch.equal(router.centroids[3], before) and router.idle_updates[3].item() == 1
    assert _is_one_of(router.centroids[3], _normalised_rows(tokens[:, 0])) and router.idle_updates[3].item() == 0


def test_a_skipped_step_leaves_no_trace_and_non_finite_means_are_never_folded(env):
    from moe_erc.model.layers.routers.kmeans import ema_update

    router = _router(env)
    router.seeded_from_data.fill_(1.0)
    router.reseed_steps = 0
    router.train()
    before = router.centroids.clone()
    poisoned = torch.randn(6, 1, 8)
    poisoned[2, 0, 0] = float("nan")
    router(poisoned.clone().requires_grad_())
    router.discard_step()  # what routers.end_of_step(applied=False) calls when the trainer skips the step
    router.update_after_step()
    assert torch.equal(router.centroids, before) and router.tokens_per_expert.sum() == 0
    # and were the statistics folded anyway, a non-finite mean keeps the old centroid
    sums = torch.randn(4, 8)
    sums[1, 3] = float("inf")
    new = ema_update(before, sums, torch.tensor([2.0, 3.0, 0.0, 1.0]), 0.5)
    assert torch.isfinite(new).all() and torch.equal(new[1], before[1]) and torch.equal(new[2], before[2])
    assert not torch.equal(new[0], before[0])


# ------------------------------------------------------------------------------------------------
# The options the ablation compares: running mean, many-sequence seeding, centring, gate gradient


def test_running_mean_update_is_the_direction_of_every_routed_tokens_sum(env):
    """``moe.kmeans_update=running_mean``: with running-sum lengths L, ``c <- normalize(L c + sum of the step's
    normalised tokens)`` and ``L <- |L c + sum|``; a fresh centroid (L=0) becomes its tokens' mean direction,
    an expert with no token keeps c and L."""
    router = _router(env, "moe.kmeans_update=running_mean")
    assert router.update == "running_mean" and "running_sum_norm" in router.state_dict()
    router.seeded_from_data.fill_(1.0)
    router.reseed_steps = 0
    e = torch.eye(8)
    old = torch.stack([e[0], e[1], e[2], -e[0]])
    lengths = [3.0, 0.0, 5.0, 2.0]
    router.centroids.copy_(old)
    router.running_sum_norm.copy_(torch.tensor(lengths, dtype=torch.float64))
    g = torch.Generator().manual_seed(9)
    tokens = (e[0] + e[1] + e[2]) + 0.3 * torch.randn(6, 1, 8, generator=g)
    router.train()
    router(tokens.clone().requires_grad_())
    router.update_after_step()
    rows = tokens.view(6, 8).double().tolist()
    totals = [[lengths[i] * c for c in old[i].double().tolist()] for i in range(4)]
    counts = [0] * 4
    for t, cos in zip(rows, _cosines(rows, old.double().tolist())):
        length = math.sqrt(sum(a * a for a in t))
        for i in sorted(range(4), key=lambda i: -cos[i])[:2]:
            counts[i] += 1
            totals[i] = [s + a / length for s, a in zip(totals[i], t)]
    assert counts[3] == 0 and counts[1] > 0
    for i in range(4):
        norm = math.sqrt(sum(a * a for a in totals[i]))
        expected_c = [a / norm for a in totals[i]] if counts[i] else old[i].double().tolist()
        assert router.centroids[i].double().tolist() == pytest.approx(expected_c, abs=1e-6), i
        assert router.running_sum_norm[i].item() == pytest.approx(norm if counts[i] else lengths[i], rel=1e-6)


def test_centring_and_gates_without_gradient(env):
    """``kmeans_center``: tokens are compared as normalize(h - mu), mu the EMA of the raw hidden-state mean
    (the first update sets it); ``kmeans_gate_grad=false``: the gates carry no gradient."""
    router = _router(env, "moe.kmeans_center=true", "moe.kmeans_gate_grad=false", "moe.kmeans_momentum=0.5")
    assert router.center and not router.gate_grad and "hidden_mean" in router.state_dict()
    g = torch.Generator().manual_seed(4)
    centroids = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    router.centroids.copy_(centroids)
    router.seeded_from_data.fill_(0.0)
    router.train()
    first = torch.randn(5, 1, 8, generator=g) + 3.0
    probs, _ = router(first.clone().requires_grad_())
    assert not probs.requires_grad  # constants for backward
    router.update_after_step()
    mu = first.view(5, 8).mean(dim=0)
    assert torch.allclose(router.hidden_mean, mu, atol=1e-6)
    second = torch.randn(5, 1, 8, generator=g) - 1.0
    router.eval()
    x = second.view(5, 8)
    cos = _cosines((x - mu).double().tolist(), router.centroids.double().tolist())
    assert torch.allclose(router.gating(x).double(), torch.tensor(cos, dtype=torch.float64), atol=1e-6)
    router.train()
    router(second.clone().requires_grad_())
    router.update_after_step()
    assert torch.allclose(router.hidden_mean, 0.5 * mu + 0.5 * x.mean(dim=0), atol=1e-6)
    with_grad = _router(env, "moe.kmeans_center=true")
    probs, _ = with_grad(first.clone().requires_grad_())
    assert probs.requires_grad  # the default: gates carry gradient into the hidden states


def test_the_seed_sample_draws_from_several_sequences(env):
    """``kmeans_seed_sequences=R``: the first update seeds centroids from tokens of batch rows 0..R-1 of the
    step's first micro-batch (R=1: row 0 only, as before)."""
    g = torch.Generator().manual_seed(21)
    batch = torch.randn(16, 4, 8, generator=g)  # [s, b, d]
    rows_of = {}
    for sequences in (1, 4):
        router = _router(env, f"moe.kmeans_seed_sequences={sequences}", experts=8)
        router.train()
        router(batch.clone().requires_grad_())
        router.update_after_step()
        rows_of[sequences] = set()
        for i in range(8):
            found = [b for b in range(4) if _is_one_of(router.centroids[i], _normalised_rows(batch[:, b]))]
            assert len(found) == 1, (sequences, i)
            rows_of[sequences] |= set(found)
    assert rows_of[1] == {0}
    assert rows_of[4] <= {0, 1, 2, 3} and len(rows_of[4]) > 1, rows_of


def test_the_ablation_options_match_one_process_under_ep2_and_resume(tiny_corpus, tmp_path):
    """Running mean, centring, 4-sequence seeding and detached gates together, from the same checkpoint (a
    1-step run with them: its running-sum lengths and hidden-state mean load back): EP=2 (DP=2 for the
    hidden-state and centroid statistics) logs one process's losses, and one process stopped after step 2
    resumes onto the same step 3."""
    options = [*KMEANS, "moe.kmeans_update=running_mean", "moe.kmeans_center=true", "moe.kmeans_seed_sequences=4",
               "moe.kmeans_gate_grad=false", "moe.kmeans_reseed_steps=1"]
    base = tmp_path / "base"
    train(base, tiny_corpus, *options, "training.train_iters=1")
    common = [*options, "training.train_iters=3", "checkpoint.save_interval=2", f"checkpoint.load={base / 'checkpoints'}"]
    single, double = tmp_path / "single", tmp_path / "double"
    train(single, tiny_corpus, *common, "training.exit_interval=2")
    train(double, tiny_corpus, *common, "parallel.expert_model_parallel_size=2", nproc=2)
    train(single, tiny_corpus, *common)  # resume=auto from step 2
    one, two = losses(single), losses(double)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        assert one[step] == pytest.approx(two[step], rel=2e-5), (step, one, two)
