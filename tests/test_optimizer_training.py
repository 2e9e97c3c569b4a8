"""Muon and the symmetric stack through the real CLI: they train, name their rules, resume across layouts."""

import pytest

from launch import losses, train


@pytest.mark.parametrize("name, precision, banner", [
    ("muon", "fp32", "optimizer muon (spectral 22, adamw 7;"),
    ("symmetric", "fp32", "optimizer symmetric (spectral 4, row_norm 2, row_aware 8, col_aware 8, "
                          "centered_row_norm 2, adamw 5;"),
    ("symmetric", "bf16", "optimizer symmetric ("),  # fp32 main params carry the rules (propagate_tags)
])
def test_the_muon_optimizers_lower_the_loss_and_name_their_rules(tiny_corpus, tmp_path, name, precision, banner):
    """TINY: 2 layers x (QKV, proj, router, 4 experts x fc1/fc2), embedding, LM head, 5 norms."""
    run = tmp_path / "run"
    proc = train(run, tiny_corpus, "training.train_iters=8", "optimizer.lr=1e-2", f"optimizer.name={name}",
                 f"training.precision={precision}")
    assert banner in proc.stdout + proc.stderr
    loss = losses(run)
    assert loss[8] < loss[1] - 0.3, loss


def test_symmetric_state_resumes_under_tp2_like_the_uninterrupted_run(tiny_corpus, tmp_path):
    """Momenta saved by one process are resharded onto TP=2 (vocab, column and row shards, gathered for
    Newton-Schulz): steps 3-4 match the run that never stopped, which checks TP=2's update too."""
    common = ["training.train_iters=4", "optimizer.name=symmetric", "optimizer.lr=3e-3"]
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    train(straight, tiny_corpus, *common)
    train(moved, tiny_corpus, *common, "training.exit_interval=2")
    train(moved, tiny_corpus, *common, "parallel.tensor_model_parallel_size=2", nproc=2)
    for step in (3, 4):
        assert losses(moved)[step] == pytest.approx(losses(straight)[step], rel=2e-5), (losses(moved), losses(straight))


def test_muon_with_the_distributed_optimizer_is_a_clear_error(tiny_corpus, tmp_path):
    proc = train(tmp_path / "run", tiny_corpus, "optimizer.name=muon", "parallel.use_distributed_optimizer=true",
                 expect_success=False, debug=False)
    assert proc.returncode != 0
    assert "set parallel.use_distributed_optimizer=false" in proc.stderr
    assert "Traceback" not in proc.stderr
