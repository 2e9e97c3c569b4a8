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


def FROM_REFERENCE(reference: Path) -> list[str]:
    return ["training.train_iters=2", "training.resume=none", f"checkpoint.load={reference / 'checkpoints'}"]


@pytest.fixture(scope="module")
def single_from_reference(reference, tmp_path_factory) -> Path:
    """One process, 2 steps from the reference checkpoint: what every 2-process layout must log."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(run_dir, str(_prefix(reference)), *FROM_REFERENCE(reference))
    return run_dir


@pytest.mark.parametrize("layout", [
    [],                                                          # DP=2, experts replicated
    ["parallel.expert_model_parallel_size=2"],                   # EP=2 (and DP=2)
    ["parallel.tensor_model_parallel_size=2"],                   # TP=2 with sequence parallelism
    ["parallel.pipeline_model_parallel_size=2"],                 # PP=2, one layer per stage
    ["parallel.expert_model_parallel_size=2", "moe.moe_token_dispatcher_type=allgather"],
], ids=["dp2", "ep2", "tp2-sp", "pp2", "ep2-allgather"])
def test_two_process_layouts_match_one_process(reference, single_from_reference, tmp_path, layout):
    """Same weights (the reference checkpoint, resharded on load), same data: the first two steps' losses
    agree with one process. Step 1 checks the forward pass, step 2 the gradients and optimizer update."""
    double = tmp_path / "double"
    train(double, str(_prefix(reference)), *FROM_REFERENCE(reference), *layout, nproc=2)
    one, two = losses(single_from_reference), losses(double)
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


COMBINED = {  # every 4-rank layout the 3B/15B configs combine, each with ERC on and grouped experts
    "tp2-ep2": "parallel.tensor_model_parallel_size=2,parallel.expert_model_parallel_size=2",
    "pp2-ep2": "parallel.pipeline_model_parallel_size=2,parallel.expert_model_parallel_size=2",
    "dp4-ep2": "parallel.expert_model_parallel_size=2",  # expert data parallelism: 2 replicas of each expert
    "ep4": "parallel.expert_model_parallel_size=4",
}


def test_combined_four_process_layouts_match_one_process(reference, tmp_path):
    """From the same vanilla checkpoint, loaded with ERC at alpha=0.5 (so its loss is not zero) and grouped
    experts, TP2xEP2, PP2xEP2, DP4xEP2 and EP4 log one process's LM and ERC losses over 2 steps. All four run
    in one 4-process launch (tests/workers/combined_layouts.py; gloo's uneven all-gather is handled by the
    CPU compat layer)."""
    from launch import run_worker

    common = ["training.train_iters=2", "training.resume=none", "training.micro_batch_size=2",
              "training.eval_iters=0", "erc.enabled=true", "erc.alpha=0.5", "moe.moe_grouped_gemm=true",
              f"checkpoint.load={reference / 'checkpoints'}"]
    single = tmp_path / "single"
    train(single, str(_prefix(reference)), *common)
    layouts = [f"{name}:{','.join(common)},{overrides}" for name, overrides in COMBINED.items()]
    run_worker("combined_layouts.py", str(_prefix(reference)), str(tmp_path), *layouts, nproc=4, timeout=600)
    one = {r["step"]: r for r in records(single)}
    assert all(one[s]["erc_loss"] > 0 for s in (1, 2)), one
    for name in COMBINED:
        got = {r["step"]: r for r in records(tmp_path / name)}
        assert got.keys() == {1, 2}, (name, got)
        for step in (1, 2):
            for key in ("lm_loss", "erc_loss"):
                assert got[step][key] == pytest.approx(one[step][key], rel=2e-5, abs=1e-7), (name, step, key)
