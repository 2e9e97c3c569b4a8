"""One way for tests to run training: the real CLI, under torchrun when more than one process.

Every multi-process test goes through :func:`train`, so process start-up is paid the same way
everywhere and the launched code path is the one users run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a launch is dominated by process start-up (~5 s), big enough to be an MoE
# with every parallel dimension exercised: 2 layers, 4 experts top-2, 4 heads.
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
    "model.seq_length=64", "model.make_vocab_size_divisible_by=64", "moe.num_experts=4", "moe.moe_router_topk=2",
    "moe.moe_ffn_hidden_size=64", "training.micro_batch_size=4", "training.global_batch_size=8",
    "training.eval_iters=1", "training.eval_interval=1000", "logging.log_interval=1", "logging.tensorboard=false",
    "logging.progress=false", "checkpoint.save_interval=1000", "optimizer.lr_warmup_iters=0",
    "data.split=3,1,0",
]


def train(run_dir: Path, data_prefix: str, *overrides: str, nproc: int = 1, timeout: int = 240,
          expect_success: bool = True, debug: bool = True) -> subprocess.CompletedProcess:
    """Run ``moe-erc train`` (``torchrun --nproc-per-node nproc`` if nproc > 1) on the tiny model."""
    args = [*TINY, f"data.data_path={data_prefix}", f"logging.run_dir={run_dir}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "moe_erc", "train", *(["--debug"] if debug else []), *args]
    else:
        cmd = [*_torchrun(nproc), "-m", "moe_erc.train", *args]
    return _run(cmd, run_dir.parent, nproc, timeout, expect_success)


def run_worker(script: str, *args: str, nproc: int = 2, timeout: int = 240) -> list[dict]:
    """Run ``tests/workers/<script> args...`` under torchrun; return the JSON lines every rank printed."""
    proc = _run([*_torchrun(nproc), str(REPO / "tests" / "workers" / script), *args], REPO, nproc, timeout, True)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def _run(cmd, cwd, nproc, timeout, expect_success) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_success and proc.returncode != 0:
        raise AssertionError(f"{cmd[-1]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def records(run_dir: Path, split: str = "train") -> list[dict]:
    """The metrics.jsonl records of one split, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in records(run_dir)}
