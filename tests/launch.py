"""One way for tests to run training and the CLI: the real entry points, in processes forked warm.

Every training run, worker script and CLI command a test starts goes through :func:`train`, :func:`run_worker`
or :func:`cli`. By default they run in processes forked from one ``multiprocessing`` forkserver that has
already imported moe-erc, megatron-core and torch: a launch costs ~0.3 s instead of ~8 s of imports
(measured: a 2-step tiny run 13.1 s as ``python -m moe_erc`` vs 4.7 s forked; a 2-process EP=2 run 15.7 s
under torchrun vs 4.8 s). The code that runs is the user's: ``moe_erc.cli.main`` with the same argv, in a
process of its own with its own environment, working directory, stdout/stderr, exit code, and for N
processes the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). Tests about the
launchers themselves (restarts, signals, the scripts) use ``launcher="torchrun"`` or their own subprocess.
With CUDA (the GPU tier) every launch is a plain subprocess / torchrun: a forkserver whose imports touched
CUDA (transformer-engine's do) would hand its children a CUDA context they cannot use.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a launch is dominated by process start-up, big enough to be an MoE
# with every parallel dimension exercised: 2 layers, 4 experts top-2, 4 heads.
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
    "model.seq_length=64", "model.make_vocab_size_divisible_by=64", "moe.num_experts=4", "moe.moe_router_topk=2",
    "moe.moe_ffn_hidden_size=64", "training.micro_batch_size=4", "training.global_batch_size=8",
    "training.eval_iters=1", "training.eval_interval=1000", "logging.log_interval=1", "logging.tensorboard=false",
    "logging.progress=false", "checkpoint.save_interval=1000", "optimizer.lr_warmup_iters=0",
    "data.split=3,1,0",
]

# Imported once by the forkserver; every forked process starts with them loaded.
_PRELOAD = ["moe_erc.cli", "moe_erc.training.trainer", "moe_erc.commands.export", "moe_erc.commands.report", "moe_erc.commands.analyze",
            "moe_erc.commands.plan", "moe_erc.commands.study"]
_context = None


def train(run_dir: Path, data_prefix: str, *overrides: str, nproc: int = 1, timeout: int = 240,
          expect_success: bool = True, debug: bool = True, launcher: str = "fork",
          env: dict | None = None, config: Path | str | None = None) -> subprocess.CompletedProcess:
    """Run ``moe-erc train`` on the tiny model: forked warm (default) or under ``torchrun`` (``launcher``);
    ``env`` adds environment variables; ``config``: a YAML file under the TINY overrides."""
    args = [*([str(config)] if config else []), *TINY, f"data.data_path={data_prefix}", f"logging.run_dir={run_dir}",
            *overrides]
    if launcher == "torchrun":
        cmd = ([sys.executable, "-m", "moe_erc", "train", *(["--debug"] if debug else []), *args] if nproc == 1
               else [*_torchrun(nproc), "-m", "moe_erc.train", *args])
        return _run(cmd, run_dir.parent, nproc, timeout, expect_success, env)
    argv = ["train", *(["--debug"] if debug and nproc == 1 else []), *args]
    return _fork("cli", argv, run_dir.parent, nproc, timeout, expect_success, env)


def cli(*args: str, cwd: Path | str = REPO, timeout: int = 300, env: dict | None = None,
        expect_success: bool = False) -> subprocess.CompletedProcess:
    """``moe-erc ARGS`` (``python -m moe_erc``) in one forked process; returncode, stdout and stderr as subprocess's."""
    return _fork("cli", list(args), Path(cwd), 1, timeout, expect_success, env)


def run_worker(script: str, *args: str, nproc: int = 2, timeout: int = 240) -> list[dict]:
    """Run ``tests/workers/<script> args...`` on nproc ranks; return the JSON lines every rank printed."""
    proc = _fork("script", [str(REPO / "tests" / "workers" / script), *args], REPO, nproc, timeout, True)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def run_script(path: Path | str, *args: str, cwd: Path | str = REPO, timeout: int = 300,
               expect_success: bool = False) -> subprocess.CompletedProcess:
    """``python PATH ARGS`` (a benchmark or other script) in one forked process."""
    return _fork("script", [str(path), *args], Path(cwd), 1, timeout, expect_success)


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def _run(cmd, cwd, nproc, timeout, expect_success, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
           **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_success and proc.returncode != 0:
        raise AssertionError(f"{cmd[-1]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _child(kind: str, argv: list[str], cwd: str, env: dict, out: str, err: str, threads: int) -> None:
    """Body of a forked process: become a fresh ``moe-erc`` (or worker script) process, then run it."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    import torch

    torch.set_num_threads(threads)
    if kind == "cli":
        from moe_erc.cli import main

        sys.argv = ["moe-erc", *argv]
        sys.exit(main(argv))
    sys.argv = list(argv)
    sys.path.insert(0, str(Path(argv[0]).parent))
    runpy.run_path(argv[0], run_name="__main__")


def _fork(kind, argv, cwd, nproc, timeout, expect_success, env=None) -> subprocess.CompletedProcess:
    """Run ``argv`` on ``nproc`` forked ranks; like torchrun, the others are stopped when one fails."""
    if _cuda():
        python = [sys.executable, *([] if kind == "script" else ["-m", "moe_erc"])]
        if nproc > 1:
            python = [*_torchrun(nproc), *([] if kind == "script" else ["-m", "moe_erc.train"])]
            argv = argv[1:] if kind == "cli" else argv  # torchrun's entry point is `moe_erc.train`
        return _run([*python, *argv], cwd, nproc, timeout, expect_success, env)
    ctx = _forkserver()
    base = {**os.environ, **(env or {})}
    threads = 1 if nproc > 1 else int(base.get("OMP_NUM_THREADS", "2"))
    port = _free_port()
    logs = Path(tempfile.mkdtemp(prefix="moe-erc-launch-"))
    procs = []
    for rank in range(nproc):
        rank_env = dict(base, OMP_NUM_THREADS=str(threads))
        if nproc > 1:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                            GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        proc = ctx.Process(target=_child, args=(kind, argv, str(cwd), rank_env, str(logs / f"{rank}.out"),
                                                str(logs / f"{rank}.err"), threads))
        proc.start()
        procs.append(proc)
    deadline, failed_at = time.monotonic() + timeout, None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 10):
            for p in procs:
                p.kill()
            if now > deadline:
                raise subprocess.TimeoutExpired(argv, timeout, _read(logs, nproc, "out"), _read(logs, nproc, "err"))
        time.sleep(0.02)
    codes = [p.exitcode for p in procs]
    result = subprocess.CompletedProcess(argv, next((c for c in codes if c != 0), 0),
                                         _read(logs, nproc, "out"), _read(logs, nproc, "err"))
    for path in logs.iterdir():
        path.unlink()
    logs.rmdir()
    if expect_success and result.returncode != 0:
        raise AssertionError(f"{argv[0]} failed (exit codes {codes}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _read(logs: Path, nproc: int, stream: str) -> str:
    return "".join((logs / f"{rank}.{stream}").read_text(errors="replace") for rank in range(nproc)
                   if (logs / f"{rank}.{stream}").exists())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records(run_dir: Path, split: str = "train") -> list[dict]:
    """The metrics.jsonl records of one split, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in records(run_dir)}
