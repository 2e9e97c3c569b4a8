"""Instruments under DP=2, EP=2 and TP=2 (2 processes, gloo) against one process from the same checkpoint.

Tokens per expert, dead experts and MaxVio of the train log steps, and validation MaxVio and coupling scores,
must not depend on how the model and the batch are split: the same weights (one checkpoint, resharded on
load) see the same batches, so counts are equal exactly and the coupling scores (the same sampled tokens,
rank statistics) to rounding.
"""

from pathlib import Path

import pytest

from launch import records, train

# 64 of the 256 tokens of each micro-batch: a real sample, which every layout must draw alike
COMMON = ["training.train_iters=2", "training.resume=none", "logging.coupling_tokens=64"]


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory) -> Path:
    """A few steps of one process, so routing is no longer that of the initial weights; its checkpoint seeds
    the runs below."""
    run_dir = tmp_path_factory.mktemp("instruments") / "trained"
    train(run_dir, tiny_corpus, "training.train_iters=3", "optimizer.lr=3e-3")
    return run_dir / "checkpoints"


@pytest.fixture(scope="module")
def one_process(trained, tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("instruments") / "single"
    train(run_dir, tiny_corpus, *COMMON, f"checkpoint.load={trained}")
    return run_dir


def _by_step(run_dir: Path, split: str) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir, split)}


@pytest.mark.parametrize("layout", [
    [],                                            # DP=2
    ["parallel.expert_model_parallel_size=2"],     # EP=2 (and DP=2): gate norms of half the experts per rank
    ["parallel.tensor_model_parallel_size=2"],     # TP=2 + SP: half the positions and half of every gate per rank
], ids=["dp2", "ep2", "tp2-sp"])
def test_instruments_match_one_process(one_process, trained, tiny_corpus, tmp_path, layout):
    two = tmp_path / "two"
    train(two, tiny_corpus, *COMMON, f"checkpoint.load={trained}", *layout, nproc=2)
    train_one, train_two = _by_step(one_process, "train"), _by_step(two, "train")
    assert train_one.keys() == train_two.keys() == {1, 2}
    for step in (1, 2):
        a, b = train_one[step], train_two[step]
        assert b["tokens_per_expert"] == a["tokens_per_expert"], step
        assert sum(a["tokens_per_expert"][0]) == 8 * 64 * 2  # the whole global batch, top-2
        assert b["dead_experts_per_layer"] == a["dead_experts_per_layer"], step
        assert b["maxvio_per_layer"] == a["maxvio_per_layer"], step
    valid_one, valid_two = _by_step(one_process, "valid"), _by_step(two, "valid")
    assert valid_one.keys() == valid_two.keys() == {0, 2}
    for step in (0, 2):
        a, b = valid_one[step], valid_two[step]
        assert b["maxvio_global_per_layer"] == a["maxvio_global_per_layer"], step
        for key in ("coupling_per_layer", "coupling_topk_per_layer"):
            assert all(v is not None for v in a[key]), (key, a[key])
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-12), (step, key, a[key], b[key])
