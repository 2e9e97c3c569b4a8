"""End-to-end training through the real CLI: loss falls, layouts agree, resume is exact."""

from pathlib import Path

import pytest

from launch import losses, records, train


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory) -> Path:
    """One process, 12 steps: the run the others are compared with (its checkpoint seeds them)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(run_dir, tiny_corpus, "training.train_iters=12", "optimizer.lr=3e-3")
    return run_dir


def test_single_process_run_lowers_the_loss_and_writes_its_outputs(reference):
    train_losses = losses(reference)
    assert sorted(train_losses) == list(range(1, 13))
    assert train_losses[12] < train_losses[1] - 0.4, train_losses
    valid = records(reference, "valid")
    assert valid[0]["step"] == 0 and valid[-1]["step"] == 12
    assert valid[-1]["lm_loss"] < valid[0]["lm_loss"] - 0.3
    assert (reference / "config.yaml").is_file()
    latest = (reference / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_0000012" and (reference / "checkpoints" / latest / "metadata.json").is_file()


@pytest.mark.parametrize("layout", [
    [],                                                          # DP=2, experts replicated
    ["parallel.expert_model_parallel_size=2"],                   # EP=2 (and DP=2)
    ["parallel.tensor_model_parallel_size=2"],                   # TP=2 with sequence parallelism
    ["parallel.pipeline_model_parallel_size=2"],                 # PP=2, one layer per stage
    ["parallel.expert_model_parallel_size=2", "moe.moe_token_dispatcher_type=allgather"],
], ids=["dp2", "ep2", "tp2-sp", "pp2", "ep2-allgather"])
def test_two_process_layouts_match_one_process(reference, tmp_path, layout):
    """Same weights (the reference checkpoint, resharded on load), same data: the first two steps' losses
    agree with one process. Step 1 checks the forward pass, step 2 the gradients and optimizer update."""
    common = ["training.train_iters=2", "training.resume=none",
              f"checkpoint.load={reference / 'checkpoints'}"]
    single = tmp_path / "single"
    train(single, str(_prefix(reference)), *common)
    double = tmp_path / "double"
    train(double, str(_prefix(reference)), *common, *layout, nproc=2)
    one, two = losses(single), losses(double)
    assert one.keys() == two.keys() == {1, 2}
    for step in (1, 2):
        assert two[step] == pytest.approx(one[step], rel=2e-5), (step, one, two)


@pytest.mark.parametrize("variant, nproc, extra", [
    # one process; with dropout, so the RNG states must be restored too (a plain run is a subset of this)
    ("dropout-rng", 1, ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]),
    ("ep2", 2, ["parallel.expert_model_parallel_size=2", "erc.enabled=true"]),          # ERC noise by step
    ("bf16-erc", 1, ["training.precision=bf16", "erc.enabled=true"]),  # mixed-precision optimizer state
], ids=lambda v: v if isinstance(v, str) else "")
def test_resume_continues_exactly(tiny_corpus, tmp_path, variant, nproc, extra):
    """Stopped after 3 steps and resumed, a run logs the same losses as one that never stopped."""
    straight = tmp_path / "straight"
    train(straight, tiny_corpus, "training.train_iters=6", *extra, nproc=nproc)
    stopped = tmp_path / "stopped"
    train(stopped, tiny_corpus, "training.train_iters=6", "training.exit_interval=3", *extra, nproc=nproc)
    assert max(losses(stopped)) == 3
    train(stopped, tiny_corpus, "training.train_iters=6", *extra, nproc=nproc)
    expected, resumed = losses(straight), losses(stopped)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=0), (step, expected, resumed)


def _prefix(run_dir: Path) -> str:
    import yaml

    data_path = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["data_path"]
    return data_path if isinstance(data_path, str) else data_path[0]


def test_a_one_process_checkpoint_with_optimizer_state_resumes_under_ep2(tiny_corpus, tmp_path):
    """Optimizer state saved by one process continues under EP=2 like the uninterrupted run."""
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    train(straight, tiny_corpus, "training.train_iters=4")
    train(moved, tiny_corpus, "training.train_iters=4", "training.exit_interval=2")
    train(moved, tiny_corpus, "training.train_iters=4", "parallel.expert_model_parallel_size=2", nproc=2)
    for step in (3, 4):
        assert losses(moved)[step] == pytest.approx(losses(straight)[step], rel=2e-5)
