"""megatron-core's balancing baselines in moe-erc: aux-loss-free expert bias, z-loss, auxiliary losses."""

import math

import pytest
import torch

from launch import TINY, losses, records, train


@pytest.fixture(scope="module")
def env():
    """megatron's parallel state in this process (world size 1), for routers built on their own."""
    from moe_erc.model import gpt as model_lib
    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    device = prepare_runtime("cpu")
    cfg = load_config(None, TINY)
    parallel.initialize(cfg, device)
    yield model_lib
    parallel.destroy()


def _config(model_lib, *overrides):
    from moe_erc.config import load_config

    return model_lib.transformer_config(load_config(None, list(overrides)))


def _maxvio(load: torch.Tensor) -> float:
    return float((load.max() - load.mean()) / load.mean())


# ------------------------------------------------------------------------------------------------
# Aux-loss-free balancing: megatron's expert-bias update (what finalize_model_grads runs every step)


@pytest.mark.parametrize("router_type", ["topk", "kmeans"])
def test_expert_bias_update_moves_a_skewed_load_toward_balance(env, router_type):
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from moe_erc.model.layers.routers.kmeans import KMeansRouter

    rate = 0.02
    config = _config(env, "model.hidden_size=16", "model.num_attention_heads=2", "model.num_layers=1",
                     "moe.num_experts=8", "moe.moe_router_topk=2", "moe.moe_router_load_balancing_type=none",
                     "moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true",
                     f"moe.moe_router_bias_update_rate={rate}")
    cls = TopKRouter if router_type == "topk" else KMeansRouter
    router = cls(config=config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    router.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if router_type == "topk":
            router.weight.copy_(0.3 * torch.randn(8, 16, generator=g))
            rows = router.weight
        else:
            rows = router.centroids
        favoured = rows[0] + rows[1]  # hidden states that favour experts 0 and 1
    x = (favoured + 0.5 * torch.randn(512, 16, generator=g) * favoured.norm() / 4).view(512, 1, 16)

    history = []
    for step in range(40):
        router(x)
        load = router.local_tokens_per_expert.clone()
        before = router.expert_bias.clone()
        _update_router_expert_bias([router], config)
        reset_model_temporary_tensors(config, [router])
        assert router.local_tokens_per_expert.sum() == 0
        # sign update: under-loaded experts up by the rate, over-loaded ones down
        expected = before + rate * torch.sign(load.mean() - load)
        assert torch.allclose(router.expert_bias, expected)
        history.append(_maxvio(load))
    first_load_skewed = history[0]
    assert first_load_skewed > 1.0, history
    assert max(history[-5:]) < 0.35 * first_load_skewed, history
    assert router.expert_bias[0] < 0 and router.expert_bias[1] < 0  # the favoured experts were pushed down


# ------------------------------------------------------------------------------------------------
# Router z-loss


def test_z_loss_is_the_mean_squared_logsumexp_times_its_coefficient(env):
    from megatron.core.transformer.moe.moe_utils import z_loss_func

    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 3.0, 0.5], [10.0, 9.0, -10.0, 0.0],
                           [-1.0, -1.0, -1.0, 5.0], [0.25, 0.5, 0.75, 1.0]])
    coeff = 1e-2

    def lse(row):
        top = max(row)
        return top + math.log(sum(math.exp(v - top) for v in row))

    squares = [lse(row) ** 2 for row in logits.tolist()]
    assert z_loss_func(logits, coeff).item() == pytest.approx(coeff * sum(squares) / len(squares), rel=1e-6)
    padding = torch.tensor([False, True, False, True, False])  # megatron's convention: True = padding
    kept = [s for s, pad in zip(squares, padding.tolist()) if not pad]
    assert z_loss_func(logits, coeff, padding_mask=padding).item() == pytest.approx(
        coeff * sum(kept) / len(kept), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Each balancing loss's own effect, through megatron's router (its gradient alone, no LM loss)


def _router_alone(env, *overrides, hidden=16, experts=4):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    router = TopKRouter(config=_config(env, f"model.hidden_size={hidden}", "model.num_attention_heads=2",
                                       "model.num_layers=1", f"moe.num_experts={experts}", "moe.moe_router_topk=1",
                                       "moe.moe_router_pre_softmax=true", *overrides),
                        pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    router.train()
    return router


def _aux_gradient_step(router, tokens: torch.Tensor, lr: float) -> None:
    """One SGD step on the router weight driven by the attached auxiliary losses only (upstream gradient 0)."""
    router.weight.grad = None
    probs, _ = router(tokens)
    probs.backward(torch.zeros_like(probs))  # MoEAuxLossAutoScaler hands the aux losses their gradient
    with torch.no_grad():
        router.weight -= lr * router.weight.grad


def _recorded(name: str) -> float:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    value = float(tracker.metrics[name].values[0])
    tracker.clear()
    return value


def _recorded_clear() -> None:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    get_moe_metrics_tracker().clear()


def test_the_aux_loss_gradient_moves_a_skewed_load_toward_balance(env):
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    router = _router_alone(env, "moe.moe_router_load_balancing_type=aux_loss", "moe.moe_aux_loss_coeff=1.0")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, 1, 16, generator=g) + 2.0  # a shared direction: a few experts take everything
    with torch.no_grad():
        router.weight.copy_(torch.randn(4, 16, generator=g) * 0.3)
    def mean_probs():  # P_i, the differentiable half of n * sum_i f_i P_i
        return torch.softmax(router.gating(tokens).view(64, 4), dim=-1).mean(0).detach()

    before = mean_probs()
    for _ in range(10):
        _aux_gradient_step(router, tokens, lr=0.05)
    after = mean_probs()
    top = int(before.argmax())  # the loss only pushes experts that get tokens (f_i > 0): the busiest gives
    assert after[top] < before[top] - 0.05 and _maxvio(after) < 0.75 * _maxvio(before), (before, after)


def test_the_z_loss_gradient_lowers_the_logits(env):
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    router = _router_alone(env, "moe.moe_router_load_balancing_type=none", "moe.moe_z_loss_coeff=1.0")
    tokens = torch.randn(32, 1, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        router.weight.mul_(50.0)  # large logits: a large logsumexp
    before = torch.logsumexp(router.gating(tokens).view(32, 4), dim=-1).square().mean()
    for _ in range(5):
        _aux_gradient_step(router, tokens, lr=0.05)
    after = torch.logsumexp(router.gating(tokens).view(32, 4), dim=-1).square().mean()
    assert after < 0.6 * before, (float(before), float(after))


def test_the_per_sequence_loss_sees_imbalance_that_the_batch_loss_averages_away(env):
    """Two sequences routed to opposite experts: balanced over the batch (aux_loss at its minimum, 1 with
    megatron's scaling), unbalanced within each sequence (seq_aux_loss higher)."""
    values = {}
    for kind in ("aux_loss", "seq_aux_loss"):
        router = _router_alone(env, f"moe.moe_router_load_balancing_type={kind}", "moe.moe_aux_loss_coeff=1.0",
                               hidden=4, experts=2)
        with torch.no_grad():
            router.weight.copy_(torch.tensor([[10.0, 0, 0, 0], [-10.0, 0, 0, 0]]))
        tokens = torch.zeros(8, 2, 4)  # [s, b, d]: sequence 0 -> expert 0, sequence 1 -> expert 1
        tokens[:, 0, 0], tokens[:, 1, 0] = 1.0, -1.0
        _recorded_clear()
        router(tokens)
        name = "load_balancing_loss" if kind == "aux_loss" else "seq_load_balancing_loss"
        values[kind] = _recorded(name)
    assert values["aux_loss"] == pytest.approx(1.0, rel=1e-3)  # n * sum f_i P_i at perfect balance
    assert values["seq_aux_loss"] > 1.9 * values["aux_loss"], values


# ------------------------------------------------------------------------------------------------
# Every balancing type trains from the CLI; the expert bias lives in checkpoints


BALANCING = {
    "aux_loss+z_loss": (1, ["moe.moe_router_load_balancing_type=aux_loss", "moe.moe_z_loss_coeff=1e-3"],
                        ["load_balancing_loss", "z_loss"]),
    "seq_aux_loss": (1, ["moe.moe_router_load_balancing_type=seq_aux_loss"], ["seq_load_balancing_loss"]),
    # two processes: the global token counts are reduced over DP
    "global_aux_loss-dp2": (2, ["moe.moe_router_load_balancing_type=global_aux_loss"],
                            ["global_load_balancing_loss"]),
    # two processes with EP=2: the bias update all-reduces token counts over DP x TP
    "aux_free-ep2": (2, ["moe.moe_router_load_balancing_type=none", "moe.moe_router_score_function=sigmoid",
                         "moe.moe_router_enable_expert_bias=true", "parallel.expert_model_parallel_size=2"], []),
}


@pytest.fixture(scope="module")
def balancing_runs(tiny_corpus, tmp_path_factory):
    runs = {}
    for name, (nproc, overrides, _) in BALANCING.items():
        run_dir = tmp_path_factory.mktemp(name.replace("+", "_")) / "run"
        train(run_dir, tiny_corpus, "training.train_iters=3", *overrides, nproc=nproc)
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("name", list(BALANCING))
def test_each_balancing_type_trains_three_steps_and_logs_its_loss(balancing_runs, name):
    rows = records(balancing_runs[name])
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["lm_loss"]) for r in rows)
    for metric in BALANCING[name][2]:
        assert all(math.isfinite(r[metric]) and r[metric] > 0 for r in rows), (metric, rows)
    history = losses(balancing_runs[name])
    assert history[3] < history[1]


def test_expert_bias_is_saved_and_restored_by_the_resume_loader(env, balancing_runs, tiny_corpus):
    """The aux-free run's checkpoint holds each layer's bias after 3 sign updates of 1e-3 (megatron's
    update in finalize_model_grads ran on CPU with EP=2); the loader resume uses puts it back."""
    from moe_erc.training import checkpoint
    from moe_erc.config import load_config
    from moe_erc.data.tokenizer import resolve_tokenizer

    _, overrides, _ = BALANCING["aux_free-ep2"]
    cfg = load_config(None, [*TINY, *overrides[:3]])
    vocab = env.padded_vocab_size(resolve_tokenizer([tiny_corpus], None).vocab_size, cfg)
    model = env.build_model(cfg, env.transformer_config(cfg), vocab)
    routers = [m.router for m in model.modules() if getattr(m, "router", None) is not None]
    assert len(routers) == 2 and all(torch.equal(r.expert_bias, torch.zeros(4)) for r in routers)
    keys = [k for k in model.sharded_state_dict() if k.endswith("router.expert_bias")]
    assert keys == ["decoder.layers.0.mlp.router.expert_bias", "decoder.layers.1.mlp.router.expert_bias"]
    checkpoint.load(checkpoint.resolve(balancing_runs["aux_free-ep2"] / "checkpoints"), [model])
    for router in routers:
        bias = router.expert_bias
        assert bias.dtype == torch.float32 and bias.abs().max() > 0
        assert bias.abs().max() <= 3e-3 + 1e-9
        steps = bias / 1e-3  # a sum of three signs in {-1, 0, 1}
        assert torch.allclose(steps, steps.round(), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# The per-method configs


METHOD_KEYS = {
    "vanilla": {},
    "erc": {("erc", "enabled"): True},
    "aoe": {("moe", "router"): "aoe"},
    "kmeans": {("moe", "router"): "kmeans", ("moe", "moe_router_load_balancing_type"): "none",
               ("moe", "kmeans_center"): True},  # the K-Means ablation's pick (docs/study/kmeans)
    "auxfree": {("moe", "moe_router_score_function"): "sigmoid", ("moe", "moe_router_enable_expert_bias"): True,
                ("moe", "moe_router_load_balancing_type"): "none"},
}


@pytest.mark.parametrize("method", list(METHOD_KEYS))
def test_method_configs_differ_from_tiny_only_in_their_method_keys(method):
    from launch import REPO
    from moe_erc.config import load_config

    base = load_config(REPO / "configs" / "tiny.yaml").to_dict()
    cfg = load_config(REPO / "configs" / f"tiny-{method}.yaml").to_dict()
    assert cfg["logging"].pop("run_dir") == f"runs/tiny-{method}"
    base["logging"].pop("run_dir")
    changed = {(section, key): cfg[section][key] for section in cfg for key in cfg[section]
               if cfg[section][key] != base[section][key]}
    assert changed == METHOD_KEYS[method]
