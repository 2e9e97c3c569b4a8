"""Muon and the symmetric stack through the real CLI: they train, name their rules, resume across layouts."""

import pytest

from launch import losses, train


@pytest.mark.parametrize("name, precision, banner, drop", [
    ("muon", "fp32", "optimizer muon (spectral 22, adamw 7;", 0.3),
    ("symmetric", "fp32", "optimizer symmetric (spectral 4, row_norm 2, row_aware 8, col_aware 8, "
                          "centered_row_norm 2, adamw 5;", 0.3),
    ("symmetric", "bf16", "optimizer symmetric (", 0.3),  # fp32 main params carry the rules (propagate_tags)
    # the authors' per-class rates (Muon 5e-3 unscaled, AdamW 5e-4) move this tiny model more slowly
    ("symmetric_preset=paper_adamw_control", "fp32", "optimizer symmetric (preset paper_adamw_control: spectral 16, "
     "spectral_heads 4, adamw 9;", 0.05),
])
def test_the_muon_optimizers_lower_the_loss_and_name_their_rules(tiny_corpus, tmp_path, name, precision, banner,
                                                                 drop):
    """TINY: 2 layers x (QKV, proj, router, 4 experts x fc1/fc2), embedding, LM head, 5 norms."""
    run = tmp_path / "run"
    chosen = f"optimizer.{name}" if "=" in name else f"optimizer.name={name}"
    proc = train(run, tiny_corpus, "training.train_iters=8", "optimizer.lr=1e-2", chosen,
                 f"training.precision={precision}")
    assert banner in proc.stdout + proc.stderr
    loss = losses(run)
    assert loss[8] < loss[1] - drop, loss


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


def test_the_paper_preset_trains_with_its_classes_and_resumes_under_tp2(tiny_corpus, tmp_path):
    """Lau & Su's OLMoE assignment: the banner names each class's rule, lr and decay; momenta saved by one
    process resume on TP=2 (vocab-parallel LM head centred over all ranks' rows, heads whole per rank) and
    steps 3-4 match the run that never stopped."""
    common = ["training.train_iters=4", "optimizer.symmetric_preset=paper"]
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    proc = train(straight, tiny_corpus, *common)
    assert ("optimizer symmetric (preset paper: spectral 16, spectral_heads 4, row_unit 1, centered_row_unit 3, "
            "adamw 5;") in proc.stdout + proc.stderr
    assert "lr embedding 0.5, output_layer 0.005, router 0.00075" in proc.stdout + proc.stderr
    train(moved, tiny_corpus, *common, "training.exit_interval=2")
    train(moved, tiny_corpus, *common, "parallel.tensor_model_parallel_size=2", nproc=2)
    for step in (3, 4):
        assert losses(moved)[step] == pytest.approx(losses(straight)[step], rel=2e-5), (losses(moved), losses(straight))
    assert losses(straight)[4] < losses(straight)[1]
