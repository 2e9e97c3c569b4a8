"""Launch scripts: syntax, dry runs that print well-formed torchrun/srun commands, sbatch headers."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("scripts/*.sh"), *REPO.glob("scripts/slurm/*.sbatch"), REPO / ".ci" / "run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
    env.update(extra)
    return env


def test_launch_dry_run_prints_a_two_node_torchrun_command():
    env = _clean_env(NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="6000", NPROC_PER_NODE="8")
    out = subprocess.run(["bash", "scripts/launch.sh", "--dry-run", "configs/erc-3b.yaml", "erc.alpha=0.5"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    argv = shlex.split(out)
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    flags = dict(zip(argv[3:15:2], argv[4:15:2]))
    assert flags == {"--nnodes": "2", "--node-rank": "1", "--nproc-per-node": "8", "--master-addr": "node0",
                     "--master-port": "6000", "--max-restarts": "0"}
    env["MAX_RESTARTS"] = "3"
    again = shlex.split(subprocess.run(["bash", "scripts/launch.sh", "--dry-run", "configs/erc-3b.yaml"], cwd=REPO,
                                       env=env, capture_output=True, text=True, check=True).stdout)
    assert again[again.index("--max-restarts") + 1] == "3"
    assert argv[-4:] == ["-m", "moe_erc.train", "configs/erc-3b.yaml", "erc.alpha=0.5"]


def test_launch_without_arguments_is_a_usage_error():
    proc = subprocess.run(["bash", "scripts/launch.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_sbatch_has_headers_and_its_dry_run_is_clean_under_set_u(tmp_path):
    text = (REPO / "scripts/slurm/train.sbatch").read_text()
    headers = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert any("--nodes" in h for h in headers) and any("--ntasks-per-node=1" in h for h in headers)
    env = _clean_env(DRY_RUN="1", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="42", MOE_ERC_RUNS=str(tmp_path),
                     MOE_ERC_LOGS=str(tmp_path / "logs"), MOE_ERC_IMAGE="moe-erc:latest",
                     MOE_ERC_MOUNTS="/data:/data")
    proc = subprocess.run(["bash", "-u", "scripts/slurm/train.sbatch", "configs/erc-15b.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[0] == "srun" and "--container-image" in argv and "--container-mounts" in argv
    assert "--rdzv-endpoint" in argv and argv[argv.index("--rdzv-id") + 1] == "42"
    assert argv[argv.index("--max-restarts") + 1] == "1" and "#SBATCH --requeue" in headers
    # stable across resubmissions (a 48 h job limit against a long run): the job id is not in the run dir
    assert f"logging.run_dir={tmp_path}/erc-15b" in argv and "parallel.world_size=16" in argv
    env["SLURM_JOB_ID"] = "43"
    again = shlex.split(subprocess.run(["bash", "-u", "scripts/slurm/train.sbatch", "configs/erc-15b.yaml"], cwd=REPO,
                                       env=env, capture_output=True, text=True).stdout)
    assert [a for a in again if a.startswith("logging.run_dir=")] == [f"logging.run_dir={tmp_path}/erc-15b"]
