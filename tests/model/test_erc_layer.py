"""ERC inside megatron-core: layouts agree with one process, weight layouts, and training lowers the loss."""

import math

import pytest
import torch

from launch import losses, records, run_worker, train


@pytest.fixture(scope="module")
def layout_results():
    return run_worker("erc_layouts.py", nproc=2)


@pytest.mark.parametrize("layout", ["dp2", "ep2", "tp2"])
def test_loss_and_gradients_match_one_process(layout_results, layout):
    rows = [r for r in layout_results if r["layout"] == layout]
    assert len(rows) == 2  # both ranks reported
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_ref"], rel=1e-6)
        assert r["router_err"] <= 1e-6 * max(r["router_scale"], 1.0)
        assert r["expert_err"] <= 1e-6 * max(r["expert_scale"], 1.0)
    assert rows[0]["loss"] == rows[1]["loss"]  # every rank evaluates the same loss


def test_gate_weights_of_sequential_and_unknown_expert_layouts():
    from moe_erc.model.layers.erc_layer import gate_weights

    class Linear(torch.nn.Module):
        def __init__(self, out, inp):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(out, inp))

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_fc1 = Linear(6, 4)

    sequential = torch.nn.Module()
    sequential.local_experts = torch.nn.ModuleList([Expert(), Expert()])
    gated = gate_weights(sequential, gated=True)
    assert [tuple(w.shape) for w in gated] == [(3, 4), (3, 4)]
    assert gated[1].data_ptr() == sequential.local_experts[1].linear_fc1.weight.data_ptr()  # a view: the gate half
    assert [tuple(w.shape) for w in gate_weights(sequential, gated=False)] == [(6, 4), (6, 4)]

    grouped = torch.nn.Module()
    grouped.linear_fc1 = torch.nn.Module()
    grouped.linear_fc1.num_gemms = 2
    grouped.linear_fc1.weight0 = torch.nn.Parameter(torch.randn(8, 4))
    grouped.linear_fc1.weight1 = torch.nn.Parameter(torch.randn(8, 4))
    assert [tuple(w.shape) for w in gate_weights(grouped, gated=True)] == [(4, 4), (4, 4)]

    with pytest.raises(NotImplementedError, match="weight layout of Module"):
        gate_weights(torch.nn.Module(), gated=True)


@pytest.fixture(scope="module")
def erc_run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("erc") / "run"
    train(run_dir, tiny_corpus, "training.train_iters=30", "optimizer.lr=3e-3", "erc.enabled=true",
          "erc.alpha=0.5", "logging.log_interval=1")
    return run_dir


def test_training_with_erc_drives_its_loss_down_and_logs_per_layer_stats(erc_run):
    rows = records(erc_run)
    first, last = rows[0], rows[-1]
    assert first["erc_loss"] > 0
    assert last["erc_loss"] < 0.2 * first["erc_loss"], (first["erc_loss"], last["erc_loss"])
    assert len(first["erc_loss_per_layer"]) == 2 and all(v >= 0 for v in first["erc_loss_per_layer"])
    for key in ("eps_mean", "eps_min", "eps_max", "erc_margin"):
        assert math.isfinite(first[key])
    assert first["eps_min"] <= first["eps_mean"] <= first["eps_max"]
    assert last["erc_margin"] > first["erc_margin"]


def test_erc_leaves_the_reported_lm_loss_of_step_one_unchanged(erc_run, tiny_corpus, tmp_path):
    """ERC reaches backward only: the first forward's LM loss is the vanilla one (same init, same data)."""
    vanilla = tmp_path / "vanilla"
    train(vanilla, tiny_corpus, "training.train_iters=1", "optimizer.lr=3e-3")
    assert losses(vanilla)[1] == pytest.approx(losses(erc_run)[1], rel=1e-6)


@pytest.mark.parametrize("layout", [["parallel.expert_model_parallel_size=2"],
                                    ["parallel.tensor_model_parallel_size=2"]], ids=["ep2", "tp2-sp"])
def test_erc_training_layouts_match_one_process(erc_run, tiny_corpus, tmp_path, layout):
    """Strong ERC (alpha 0.1, coeff 100): its gradients visibly change step 2's LM loss, and the layouts
    agree with one process on both the LM and the ERC loss."""
    common = ["training.train_iters=2", "training.resume=none", f"checkpoint.load={erc_run / 'checkpoints'}",
              "erc.enabled=true", "erc.alpha=0.1"]
    single, double, inert = tmp_path / "single", tmp_path / "double", tmp_path / "inert"
    train(single, tiny_corpus, *common, "erc.coeff=100")
    train(inert, tiny_corpus, *common, "erc.coeff=0")
    train(double, tiny_corpus, *common, "erc.coeff=100", *layout, nproc=2)
    one, two = records(single), records(double)
    assert one[0]["erc_loss"] > 0
    assert abs(one[1]["lm_loss"] - records(inert)[1]["lm_loss"]) > 1e-3  # the ERC gradient matters here
    for a, b in zip(one, two):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=2e-5)
        assert b["erc_loss"] == pytest.approx(a["erc_loss"], rel=1e-4, abs=1e-7)
