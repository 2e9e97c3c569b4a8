"""Faults of the world around a run (docs/launching.md#faults-handled): a second writer on one run directory,
a crash between checkpoints, a full disk, data that does not fit the model, a model that does not fit the machine.
Each ends in one line (exit 2) or is handled, with nothing on disk damaged."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import records, train

LOCK = ".moe-erc.lock"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-12-03 09:00:00 UTC",
                                "job": None, **holder}))
    return path


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tiny_corpus, tmp_path):
    """A run directory whose lock a live process holds (this test's own pid) is refused in one line naming host,
    pid and since, before anything is written; a lock left by a process that died is taken over with a notice, and
    a finished run leaves no lock."""
    run = tmp_path / "run"
    _write_lock(run)
    proc = train(run, tiny_corpus, "training.train_iters=1", expect_success=False, debug=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert (f"run directory {run} is being written by another process (host {socket.gethostname()}, pid "
            f"{os.getpid()}, since 2026-12-03 09:00:00 UTC)") in line, line
    assert sorted(p.name for p in run.iterdir()) == [LOCK]  # no config, metrics or checkpoint written
    dead = _dead_pid()
    _write_lock(run, pid=dead)
    proc = train(run, tiny_corpus, "training.train_iters=1")
    assert f"taking over the lock of run directory {run}" in proc.stdout
    assert f"no process {dead} runs on this host any more" in proc.stdout
    assert [r["step"] for r in records(run)] == [1] and not (run / LOCK).exists()


def test_the_lock_across_hosts_and_restarts(tmp_path, monkeypatch):
    """Another host's lock holds while its heartbeat is fresh and is taken over once it is stale; an earlier
    attempt of the same torchrun job (its run id) on another node is taken over without a notice, a live process
    of it on this host is not; the holder's heartbeat moves."""
    from moe_erc.errors import UserError
    from moe_erc.outputs import WriterLock

    notes = []
    path = _write_lock(tmp_path, host="node-7", pid=4242, job="slurm-1")
    lock = WriterLock(path, "run directory X", "give a new logging.run_dir")
    with pytest.raises(UserError, match="host node-7, pid 4242, since 2026-12-03 09:00:00 UTC, job slurm-1"):
        lock.acquire(say=notes.append)
    old = time.time() - WriterLock.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    lock.acquire(say=notes.append)
    assert len(notes) == 1 and "no heartbeat from node-7 for" in notes[0]
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-abc")
    _write_lock(tmp_path, host="node-3", pid=4242, job="job-abc")  # fresh heartbeat: only the job id lets it in
    lock.acquire(say=notes.append)
    assert len(notes) == 1 and json.loads(path.read_text())["job"] == "job-abc"
    lock.release()
    _write_lock(tmp_path, pid=1, job="job-abc")  # a live process here with our job id: a second writer all the same
    with pytest.raises(UserError, match="pid 1,"):
        lock.acquire(say=notes.append)
    monkeypatch.setattr(WriterLock, "HEARTBEAT_S", 0.05)
    WriterLock(tmp_path / "other.lock", "d", "f").acquire()
    os.utime(tmp_path / "other.lock", (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / "other.lock").stat().st_mtime < 5
    WriterLock.release_all()
    assert not (tmp_path / "other.lock").exists()
    path.unlink()


def test_after_a_crash_and_resume_each_step_is_logged_once_in_jsonl_and_tensorboard(tiny_corpus, tmp_path):
    """SIGKILL after step 3 with a checkpoint at step 2: the resumed run re-logs step 3, so the crashed attempt's
    row 3 moves to metrics.superseded.jsonl (nothing is lost) and TensorBoard purges its step-3 event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moe_erc.training.trainer import KILL_TEST_ENV

    run = tmp_path / "run"
    args = ("training.train_iters=4", "checkpoint.save_interval=2", "logging.tensorboard=true")
    crashed = train(run, tiny_corpus, *args, env={KILL_TEST_ENV: "0@3"}, expect_success=False)
    assert crashed.returncode != 0
    first = [(r["step"], r["lm_loss"]) for r in records(run) if r["split"] == "train"]
    assert [s for s, _ in first] == [1, 2, 3]
    resumed = train(run, tiny_corpus, *args)
    assert "1 rows logged after step 2" in resumed.stdout
    rows = [(r["step"], r["lm_loss"]) for r in records(run) if r["split"] == "train"]
    assert [s for s, _ in rows] == [1, 2, 3, 4] and rows[:2] == first[:2]
    superseded = [json.loads(line) for line in (run / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lm_loss"]) for r in superseded] == [first[2]]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("train/lm_loss")]
    assert [s for s, _ in curve] == [1, 2, 3, 4]
    assert curve[2][1] == pytest.approx(rows[2][1], rel=1e-6)


def test_wandb_resumes_the_run_directorys_own_run_and_rewinds_it_after_a_crash(tmp_path, monkeypatch):
    """No network here: a stand-in ``wandb`` module records what moe-erc asks of it. The first start creates an id
    kept in the run directory; a restart resumes that id (not a new run per attempt); online, a resume from step S
    rewinds the run to S + 1, where the resumed attempt logs next."""
    import types

    from moe_erc.config import load_config
    from moe_erc.training.metrics import _wandb_run

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or "run",
                                 util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, ["logging.wandb=true", "logging.wandb_mode=offline"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    _wandb_run(cfg, tmp_path, 0)
    _wandb_run(cfg, tmp_path, 2)
    assert (tmp_path / "wandb_run_id").read_text().strip() == "abc123"
    assert [(c.get("id"), c.get("resume")) for c in calls] == [("abc123", "allow"), ("abc123", "allow")]
    monkeypatch.setenv("WANDB_MODE", "online")
    _wandb_run(cfg, tmp_path, 2)
    assert calls[-1]["resume_from"] == "abc123?_step=3" and "id" not in calls[-1]


def test_a_full_disk_during_a_save_stops_in_one_line_or_goes_on_and_the_previous_checkpoint_stays_latest(
        tiny_corpus, tmp_path):
    """The save of step 4 fails as a full disk does (after its shards are written): one line naming the directory
    and the space needed, the partial save removed, step 2 intact, loadable and latest; a resume continues from it.
    With checkpoint.on_save_error=continue the run goes on, says so at each failed save, and saves when it can."""
    from moe_erc.training.checkpoint import DISK_FULL_TEST_ENV, verify

    run = tmp_path / "run"
    args = ("training.train_iters=6", "checkpoint.save_interval=2", "checkpoint.keep_last=3")
    proc = train(run, tiny_corpus, *args, env={DISK_FULL_TEST_ENV: "4"}, expect_success=False, debug=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert f"no space left to save checkpoint step_0000004 under {run / 'checkpoints'}" in line, line
    assert "(the size of step_0000002)" in line and "step_0000002 is intact and still latest" in line
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002"]
    assert (ckpts / "latest").read_text().strip() == "step_0000002" and verify(ckpts / "step_0000002") is None
    resumed = train(run, tiny_corpus, *args)
    assert "resum" in resumed.stdout and [r["step"] for r in records(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    going = tmp_path / "going"
    proc = train(going, tiny_corpus, *args, "checkpoint.on_save_error=continue", env={DISK_FULL_TEST_ENV: "4"})
    assert "WARNING: checkpoint at step 4 NOT saved, training goes on" in proc.stdout
    assert sorted(p.name for p in (going / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000006"]


def test_data_with_token_ids_beyond_the_vocabulary_is_refused_before_the_first_step(tiny_corpus, tmp_path):
    """A dataset made with a larger tokenizer (ids up to 700, no tokenizer beside it) trained with the 512-id
    tokenizer: one line naming the dataset, its largest id and the vocabulary, before any step or checkpoint.
    Without a .stats.json sidecar the ids are read from the .bin; with one, the sidecar's figure is used."""
    import numpy

    from moe_erc.compat import ensure_importable
    from moe_erc.data.datasets import largest_token_id

    ensure_importable()
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = str(tmp_path / "wide_text_document")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(1000))
    rng = numpy.random.default_rng(0)
    for _ in range(40):
        ids = rng.integers(0, 500, 80)
        ids[rng.integers(0, 80)] = 700 if _ == 17 else ids[0]
        builder.add_document(ids, [ids.size])
    builder.finalize(f"{prefix}.idx")
    assert largest_token_id(prefix) == 700
    run = tmp_path / "run"
    proc = train(run, prefix, "training.train_iters=1", f"tokenizer.path={tiny_corpus}.tokenizer.json",
                 expect_success=False, debug=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert f"dataset {prefix} holds token id 700 but the model's vocabulary has 512 ids" in line, line
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    (tmp_path / "wide_text_document.stats.json").write_text(json.dumps({"max_token_id": 123}))
    assert largest_token_id(prefix) == 123  # the sidecar is read, not the data


def test_a_model_too_big_for_the_machine_is_refused_before_allocating(tiny_corpus, tmp_path):
    """A 48-layer d=8192 MoE (hundreds of GiB with its optimizer) on this CPU is refused in one line with both
    figures, in seconds (nothing allocated, the meta-device count); the override lets a run through that the check
    would refuse (here a tiny model with the available memory set to 1 MiB by the test hook)."""
    from moe_erc.training.memory_check import AVAILABLE_TEST_ENV

    run = tmp_path / "run"
    start = time.perf_counter()
    proc = train(run, tiny_corpus, "model.num_layers=48", "model.hidden_size=8192", "model.num_attention_heads=64",
                 "model.ffn_hidden_size=28672", "moe.moe_ffn_hidden_size=8192", "moe.num_experts=16",
                 expect_success=False, debug=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("moe-erc: error: the model does not fit: this rank needs about ") and "but can have" in line
    need = float(line.split("needs about ")[1].split(" GiB")[0])
    assert need > 500 and time.perf_counter() - start < 60
    assert not (run / "metrics.jsonl").exists()
    refused = train(tmp_path / "small", tiny_corpus, "training.train_iters=1", env={AVAILABLE_TEST_ENV: str(2**20)},
                    expect_success=False, debug=False)
    assert refused.returncode == 2 and "can have 0.00 GiB (test hook)" in refused.stderr
    train(tmp_path / "small", tiny_corpus, "training.train_iters=1", "training.memory_check=false",
          env={AVAILABLE_TEST_ENV: str(2**20)})
