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
    attempt of the same torchrun job (its run id) is taken over without a notice; the holder's heartbeat moves."""
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
    _write_lock(tmp_path, pid=1, job="job-abc")  # pid 1 is alive: only the job id lets the restart in
    lock.acquire(say=notes.append)
    assert len(notes) == 1 and json.loads(path.read_text())["job"] == "job-abc"
    monkeypatch.setattr(WriterLock, "HEARTBEAT_S", 0.05)
    beating = WriterLock(tmp_path / "other.lock", "d", "f").acquire()
    os.utime(tmp_path / "other.lock", (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / "other.lock").stat().st_mtime < 5
    WriterLock.release_all()
    assert not path.exists() and not (tmp_path / "other.lock").exists()
