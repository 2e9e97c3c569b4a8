"""Crash safety and numerical faults: signals, SIGKILL mid-save, corrupt checkpoints, NaN policies."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import TINY, losses, records, train

REPO = Path(__file__).resolve().parents[2]


def _popen(run_dir: Path, prefix: str, *overrides: str, env_extra=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moe_erc", "train", *TINY, f"data.data_path={prefix}",
           f"logging.run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=run_dir.parent, env={**os.environ, **(env_extra or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=180):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def _train_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"split": "train"' in line)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resume_finishes(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = _popen(run_dir, tiny_corpus, "training.train_iters=400")
    _wait_for(lambda: _train_steps(run_dir) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out
    stopped_at = max(losses(run_dir))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:07d}"
    train(run_dir, tiny_corpus, f"training.train_iters={stopped_at + 2}")
    assert max(losses(run_dir)) == stopped_at + 2


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tiny_corpus, tmp_path):
    from moe_erc.training import checkpoint

    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    proc = _popen(run_dir, tiny_corpus, "training.train_iters=8", "checkpoint.save_interval=2",
                  env_extra={checkpoint.PAUSE_ENV: "120@4"})
    _wait_for(lambda: (ckpt / ".save-paused").is_file(), proc)
    proc.kill()
    proc.wait()
    assert (ckpt / ".tmp-step_0000004").is_dir()            # the interrupted save, never renamed
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    assert checkpoint.find_latest(ckpt) == ckpt / "step_0000002"
    result = train(run_dir, tiny_corpus, "training.train_iters=5")
    assert "resumed from" in result.stdout and "step_0000002 at step 2" in result.stdout
    assert max(losses(run_dir)) == 5


def test_corrupt_latest_is_detected_and_auto_resume_falls_back(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, tiny_corpus, "training.train_iters=4", "checkpoint.save_interval=2")
    ckpt = run_dir / "checkpoints"
    shard = next((ckpt / "step_0000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated shard
    explicit = train(run_dir, tiny_corpus, "training.train_iters=6", f"training.resume={ckpt / 'step_0000004'}",
                     expect_success=False, debug=False)
    assert explicit.returncode == 2
    assert "is truncated" in explicit.stderr.strip().splitlines()[-1] and "Traceback" not in explicit.stderr
    result = train(run_dir, tiny_corpus, "training.train_iters=6")
    assert "skipping checkpoint step_0000004" in result.stdout and "at step 2" in result.stdout
    assert max(losses(run_dir)) == 6


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss_policies(tiny_corpus, tmp_path, policy):
    from moe_erc.training.trainer import NAN_TEST_ENV

    run_dir = tmp_path / policy
    proc = train(run_dir, tiny_corpus, "training.train_iters=4", f"training.nan_policy={policy}",
                 expect_success=False, debug=False, env={NAN_TEST_ENV: "1"})  # the loss of the 2nd step is NaN
    if policy == "skip":
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if '"split": "train"' in line]
        assert [r["skipped"] for r in rows] == [0, 1, 0, 0]
        assert all(r["lm_loss"] == r["lm_loss"] for r in rows if not r["skipped"])  # finite afterwards
    else:
        assert proc.returncode == 3
        last = proc.stderr.strip().splitlines()[-1]
        assert "non-finite loss or gradients at step 2 (training.nan_policy=stop)" in last
        diagnostic = json.loads((run_dir / "nan_diagnostic_step2.json").read_text())
        assert diagnostic["step"] == 2 and diagnostic["non_finite_gradients"]


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_in_one_line(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, tiny_corpus, "training.train_iters=1")
    # raising train_iters on a finished run: it continues, on the new schedule, and says so
    longer = train(run_dir, tiny_corpus, "training.train_iters=2")
    assert "training.train_iters: 1 -> 2" in longer.stdout and "at step 1" in longer.stdout, longer.stdout[-2000:]
    assert "torch.distributed.checkpoint" not in longer.stderr  # DCP's load-time warnings are filtered
    other = tmp_path / "other"
    proc = train(other, tiny_corpus, "training.train_iters=1", "moe.num_experts=8",
                 f"checkpoint.load={run_dir / 'checkpoints'}", expect_success=False, debug=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("moe-erc: error: cannot load") and "Traceback" not in proc.stderr
    assert "check that the config matches" in last


def test_stopping_on_a_non_finite_step_with_pp2_and_erc_does_not_hang(tiny_corpus, tmp_path):
    """The stop path reduces the ERC statistics over the pipeline group: every rank must join (a rank
    that skipped the collective left the other waiting until the timeout)."""
    from moe_erc.training.trainer import NAN_TEST_ENV

    run_dir = tmp_path / "pp2"
    proc = train(run_dir, tiny_corpus, "training.train_iters=4", "training.nan_policy=stop", "erc.enabled=true",
                 "parallel.pipeline_model_parallel_size=2", nproc=2, timeout=150, expect_success=False,
                 env={NAN_TEST_ENV: "1"})
    assert proc.returncode != 0
    diagnostic = json.loads((run_dir / "nan_diagnostic_step2.json").read_text())
    assert diagnostic["step"] == 2 and "erc" in diagnostic


def test_the_checkpoint_to_resume_is_decided_on_rank0_and_broadcast():
    from launch import run_worker

    rows = run_worker("checkpoint_rank0.py", nproc=2)
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert {r["chosen"] for r in rows} == {"step_0000004"}  # rank 0's, though rank 1 listed step 6
    assert all(r["error"] and "no complete checkpoint" in r["error"] for r in rows)


def test_rng_states_are_restored_only_into_the_layout_they_were_saved_from(tiny_corpus, tmp_path):
    """Same world size but another EP size (as recorded in the checkpoint): the per-rank RNG streams mean
    something else there, so they are not restored (the weights and optimizer are)."""
    run_dir = tmp_path / "run"
    train(run_dir, tiny_corpus, "training.train_iters=4", "training.exit_interval=2")
    meta_path = run_dir / "checkpoints" / "step_0000002" / "moe_erc.json"
    same = train(run_dir, tiny_corpus, "training.train_iters=3")
    assert "at step 2 (RNG states restored)" in same.stdout
    meta = json.loads(meta_path.read_text())
    meta["layout"]["expert_model_parallel_size"] = 2
    meta_path.write_text(json.dumps(meta))
    (run_dir / "checkpoints" / "latest").write_text("step_0000002\n")
    other = train(run_dir, tiny_corpus, "training.train_iters=3", "training.resume=" + str(meta_path.parent))
    assert "RNG states not restored: saved in another layout" in other.stdout


def test_a_run_never_erases_itself(tiny_corpus, tmp_path):
    """Every checkpoint damaged: resume=auto refuses in one line and changes nothing; a fresh start
    (resume=none, or auto with metrics but no checkpoint) in a used directory is refused the same way."""
    run_dir = tmp_path / "run"
    train(run_dir, tiny_corpus, "training.train_iters=4", "checkpoint.save_interval=2")
    ckpt = run_dir / "checkpoints"
    for step in ("step_0000002", "step_0000004"):
        shard = next((ckpt / step).glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    def snapshot():
        return {str(p.relative_to(run_dir)): p.stat().st_size for p in run_dir.rglob("*") if p.is_file()}

    before = snapshot()
    for extra in (["training.train_iters=6"], ["training.train_iters=6", "training.resume=none"]):
        result = train(run_dir, tiny_corpus, *extra, expect_success=False, debug=False)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert str(run_dir) in last, last
        assert snapshot() == before  # nothing written, rotated or appended
        if "training.resume=none" not in extra:
            assert "step_0000002: " in last and "step_0000004: " in last and "truncated" in last, last

    fresh = tmp_path / "no-checkpoint"  # metrics of a run that died before its first save
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 1, "split": "train", "lm_loss": 6.0}\n')
    result = train(fresh, tiny_corpus, "training.train_iters=2", expect_success=False, debug=False)
    assert result.returncode == 2 and "metrics.jsonl" in result.stderr.strip().splitlines()[-1]
    assert (fresh / "metrics.jsonl").read_text().count("\n") == 1


def test_rotation_keeps_the_newest_loadable_checkpoint(tmp_path):
    from moe_erc.training import checkpoint

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):  # step 2 intact (metadata only, no shards), 4 and 6 incomplete
        d = root / checkpoint.step_dir_name(step)
        d.mkdir(parents=True)
    (root / "step_0000002" / checkpoint.METADATA).write_text("{}")
    import torch
    import torch.distributed.checkpoint as dcp  # a real (tiny) DCP checkpoint

    dcp.save({"w": torch.zeros(2)}, checkpoint_id=str(root / "step_0000002"), no_dist=True)
    (root / "step_0000002" / "metadata.json").write_text("{}")  # megatron's own metadata file
    assert checkpoint.verify(root / "step_0000002") is None
    checkpoint._prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]
    (root / "step_0000008").mkdir()
    checkpoint._prune(root, keep_last=1)  # still no good one among the kept: step 2 stays
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000008"]


def test_a_crashed_rank_restarts_and_the_run_finishes_with_the_same_losses(tiny_corpus, tmp_path):
    """EP=2 with ERC under torchrun --max-restarts 1: rank 1 is SIGKILLed after step 3 (checkpoint at step 2).
    The agent restarts both workers; they meet in a fresh store prefix, resume from step 2 (the lock of the run
    directory lets the same job back in) and finish. Every step is logged once (the crashed attempt's step 3 moved
    to metrics.superseded.jsonl) with the loss of an uninterrupted run."""
    from moe_erc.training.trainer import KILL_TEST_ENV

    common = ["training.train_iters=5", "checkpoint.save_interval=2", "erc.enabled=true", "erc.alpha=0.5",
              "parallel.expert_model_parallel_size=2"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(straight, tiny_corpus, *common, nproc=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "moe_erc.train", *TINY, f"data.data_path={tiny_corpus}", f"logging.run_dir={crashed}", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_TEST_ENV: "1@3"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout, proc.stdout[-2000:]
    expected = losses(straight)
    logged = [(r["step"], r["lm_loss"]) for r in records(crashed)]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5], logged
    superseded = [json.loads(line) for line in (crashed / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded] == [3] and superseded[0]["lm_loss"] == pytest.approx(expected[3], rel=1e-6)
    for step, loss in logged:
        assert loss == pytest.approx(expected[step], rel=1e-6), (step, loss, expected)
